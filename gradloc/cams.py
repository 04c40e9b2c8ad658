"""CAM method registry and the batched all-class engine.

Every method turns a classifier and a batch of preprocessed images into one heatmap per (image, class).
Notation used in the method docstrings: ``A^k`` is channel ``k`` of the target layer's output (``h x w``
cells, ``Z = h * w``), ``y_c`` is the model's raw output for class ``c`` (pre-sigmoid / pre-softmax) and
``g^{kc}_{ij} = dy_c / dA^k_{ij}``.

The engine (``activations_and_gradients``) computes the gradients of *all* requested classes for a whole
batch with one forward pass:

* the forward runs under ``torch.no_grad()``; a forward hook on the target layer switches grad mode on and
  hands the rest of the network a copy of a detached leaf ``A`` that requires grad, so autograd records only
  the head after the layer (the outer ``no_grad`` context restores the caller's grad mode on exit);
* one ``torch.func.vmap`` over ``torch.autograd.grad(scores, A, grad_outputs=onehot[k])`` back-propagates
  the K one-hot output gradients ``onehot[K, B, N]`` at once (one batched VJP), only through that head and
  only to ``A``: parameters' ``.grad`` are never written. (``torch.autograd.grad(..., is_grads_batched=True)``
  gives the same numbers but runs on the legacy vmap, which has no batching rule for the max-pool and
  adaptive-average-pool backward ops and loops over the K classes there: on VGG16 at ``features.29`` that
  backward took 0.4-1.3 s instead of 0.4-0.5 s on a contended CPU; see ``scripts/bench_cams.py``);
* when the model declares ``gradloc_gap_linear = (layer, linear)`` and the target is that layer, the output
  is ``y_c = sum_k w_ck (1/Z) sum_ij A^k_ij + b_c`` so ``g^{kc}_{ij} = w_ck / Z`` at every cell: the
  gradients come in closed form and no backward pass runs at all (the claim is checked against the output).

Hooks live in context managers that remove them in ``finally``; the model is put in eval mode during the
computation and every module's training flag is restored afterwards.

Maps are returned raw (after the method's ReLU, before any normalization) as float32, at the target layer's
resolution, except Guided Backprop and Guided Grad-CAM whose maps are at the input resolution (they are for
pictures, not boxes).
"""

from __future__ import annotations

import contextlib
import difflib
import itertools
import logging
import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

PROBE_SIZE = 64
"""Side (pixels) of the zero image used by the probe forward of ``list_layers`` / ``default_layer``."""

_ADAPTIVE_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_MAX_LISTED = 12


# --- layers -------------------------------------------------------------------------------------------------


@dataclass
class _ProbeRecord:
    calls: int = 0
    order: int = -1
    shape: tuple[int, ...] | None = None


def _probe(model: nn.Module, input_size: int) -> dict[str, _ProbeRecord]:
    """Run the model in eval mode on a zero image and record, per named module, its calls and output shape.

    ``order`` is the module's last completion index in the forward pass (a container completes after its
    children). ``shape`` is None when the output is not a tensor.
    """
    first_param = next(model.parameters(), None)
    dtype = first_param.dtype if first_param is not None else torch.float32
    device = first_param.device if first_param is not None else torch.device("cpu")
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = first_conv.in_channels if first_conv is not None else 3
    records = {name: _ProbeRecord() for name, _ in model.named_modules() if name}
    counter = itertools.count()

    def make_hook(name: str) -> Callable[[nn.Module, object, object], None]:
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            record = records[name]
            record.calls += 1
            record.order = next(counter)
            record.shape = tuple(output.shape) if isinstance(output, Tensor) else None

        return hook

    modules = dict(model.named_modules())
    with _eval_mode(model), _forward_hooks([(modules[name], make_hook(name)) for name in records]), \
            torch.no_grad():
        model(torch.zeros(1, channels, input_size, input_size, dtype=dtype, device=device))
    return records


def list_layers(model: nn.Module, *, input_size: int = PROBE_SIZE) -> list[str]:
    """Names of the modules usable as target layers, in ``named_modules`` order.

    A module qualifies when, in a probe forward on a zero image of ``input_size x input_size`` pixels (eval
    mode, no grad), it returns a 4-D tensor and runs exactly once (modules reused within one forward, such
    as the shared ReLU of a torchvision Bottleneck, cannot be hooked unambiguously).
    """
    records = _probe(model, input_size)
    return [name for name, rec in records.items() if rec.calls == 1 and rec.shape is not None
            and len(rec.shape) == 4]


@dataclass(frozen=True)
class LayerInfo:
    """A module with a 4-D output: its full name (what ``--layer`` accepts), its output shape [1, C, h, w] on the
    probe, and ``unusable``: why a CAM cannot use it ("" when it can)."""

    name: str
    shape: tuple[int, ...]
    unusable: str


def layer_table(model: nn.Module, *, input_size: int = PROBE_SIZE) -> list[LayerInfo]:
    """Every module of :func:`list_layers` with its probe output shape; adaptive pooling layers (they only
    resample) and 1x1 outputs (nothing to localize at this input size) are marked unusable."""
    records = _probe(model, input_size)
    modules = dict(model.named_modules())
    table = []
    for name in list_layers(model, input_size=input_size):
        shape = records[name].shape
        unusable = ("adaptive pooling (resamples only)" if isinstance(modules[name], _ADAPTIVE_POOLS)
                    else f"1x1 output at {input_size} px" if shape[2] * shape[3] == 1 else "")
        table.append(LayerInfo(name, shape, unusable))
    return table


def default_layer(model: nn.Module, *, input_size: int = PROBE_SIZE) -> str:
    """Default target layer of a model.

    ``model.gradloc_layer`` when the model defines it (the model registry sets it). Otherwise the module
    that completes last in a probe forward (zero image, ``input_size`` pixels, eval mode) among those of
    ``list_layers``, skipping adaptive pooling layers (they only resample) and preferring outputs with more
    than one spatial cell: for torchvision ResNets this is ``layer4``, for VGG and EfficientNet ``features``.

    Raises:
        ValueError: no module of the model returns a 4-D tensor.
    """
    declared = getattr(model, "gradloc_layer", None)
    if declared is not None:
        return str(declared)
    records = _probe(model, input_size)
    modules = dict(model.named_modules())
    candidates = [
        (rec.shape[2] * rec.shape[3] > 1, rec.order, name)
        for name, rec in records.items()
        if rec.calls == 1 and rec.shape is not None and len(rec.shape) == 4
        and not isinstance(modules[name], _ADAPTIVE_POOLS)
    ]
    if not candidates:
        raise ValueError(f"{type(model).__name__} has no module with a 4-D output on a "
                         f"{input_size}x{input_size} probe; pass the target layer name explicitly")
    name = max(candidates)[2]
    logger.debug("default layer of %s: %s", type(model).__name__, name)
    return name


def resolve_layer(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    """Find a target layer by exact module name, else by a unique dotted suffix.

    ``"layer4"`` resolves to ``"backbone.layer4"`` when a wrapper nests the torchvision model as
    ``backbone``.

    Returns:
        (full module name, module).

    Raises:
        ValueError: no module or several modules match; the message lists valid candidates.
    """
    modules = dict(model.named_modules())
    if name and name in modules:
        return name, modules[name]
    matches = [full for full in modules if name and full.endswith("." + name)]
    if len(matches) == 1:
        return matches[0], modules[matches[0]]
    if len(matches) > 1:
        raise ValueError(f"layer {name!r} is ambiguous in {type(model).__name__}: it matches "
                         f"{', '.join(matches[:_MAX_LISTED])}; give the full module name")
    candidates = list_layers(model)
    close = _close_matches(name, candidates)
    shortlist = sorted(candidates, key=lambda full: full.count("."))[:_MAX_LISTED]
    more = len(candidates) - len(shortlist)
    raise ValueError(
        f"{type(model).__name__} has no layer {name!r}"
        + (f" (did you mean {', '.join(close)}?)" if close else "")
        + f"; valid layers include {', '.join(shortlist)}"
        + (f" and {more} more (gradloc.cams.list_layers(model))" if more > 0 else "")
    )


def _close_matches(name: str, candidates: list[str], n: int = 3) -> list[str]:
    """Candidates whose trailing dotted parts (as many as ``name`` has) look like ``name``."""
    depth = name.count(".") + 1
    ratios = [(difflib.SequenceMatcher(None, name, ".".join(full.split(".")[-depth:])).ratio(), full)
              for full in candidates]
    return [full for ratio, full in sorted(ratios, key=lambda pair: -pair[0]) if ratio >= 0.6][:n]


# --- hooks and model state ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put the model in eval mode; restore every module's own training flag on exit (also on errors)."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


@contextlib.contextmanager
def _forward_hooks(hooks: Sequence[tuple[nn.Module, Callable[..., object]]]) -> Iterator[None]:
    """Register forward hooks for the duration of the block; remove all of them in ``finally``."""
    handles = []
    try:
        for module, hook in hooks:
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class _Capture:
    """Forward hook keeping the target layer's output.

    With ``track_grad`` it switches grad mode on (the caller's enclosing ``no_grad`` block restores it) and
    feeds the rest of the network a copy of the detached leaf ``activation``, so autograd records only the
    part of the network after the layer. The copy also shields ``activation`` from later in-place ops such
    as ``ReLU(inplace=True)``.
    """

    name: str
    track_grad: bool
    activation: Tensor | None = field(default=None, init=False)

    def __call__(self, module: nn.Module, inputs: object, output: object) -> Tensor | None:
        if not isinstance(output, Tensor) or output.ndim != 4:
            found = f"shape {tuple(output.shape)}" if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(f"layer {self.name!r} returns {found}; a target layer must return a 4-D tensor "
                             "[B, C, h, w] (see gradloc.cams.list_layers)")
        if self.activation is not None:
            raise ValueError(f"layer {self.name!r} runs more than once per forward pass; pick a module that "
                             "runs once (see gradloc.cams.list_layers)")
        if not self.track_grad:
            self.activation = output.detach().clone()
            return None
        torch.set_grad_enabled(True)
        self.activation = output.detach().requires_grad_()
        return self.activation.clone()


def _run(model: nn.Module, images: Tensor) -> Tensor:
    """Forward pass returning the ``[B, N]`` scores, with a clear error for other outputs."""
    scores = model(images)
    if not isinstance(scores, Tensor) or scores.ndim != 2 or scores.shape[0] != images.shape[0]:
        found = f"shape {tuple(scores.shape)}" if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"{type(model).__name__} returned {found} for {images.shape[0]} images; CAMs need "
                         "a tensor of class scores [B, num_classes]")
    return scores


def _forward_capture(model: nn.Module, images: Tensor, layer: tuple[str, nn.Module],
                     track_grad: bool) -> tuple[Tensor, Tensor]:
    """One forward pass (no grad before the layer) returning (activation [B, C, h, w], scores [B, N])."""
    name, module = layer
    capture = _Capture(name, track_grad)
    with _forward_hooks([(module, capture)]), torch.no_grad():
        scores = _run(model, images)
    if capture.activation is None:
        raise ValueError(f"layer {name!r} did not run during the forward pass of {type(model).__name__}; "
                         "pick a module on the path to the output (see gradloc.cams.list_layers)")
    return capture.activation, scores


# --- engine -------------------------------------------------------------------------------------------------


def _gap_linear(model: nn.Module, module: nn.Module) -> nn.Linear | None:
    """The model's linear classifier if ``model.gradloc_gap_linear`` declares ``module`` as its GAP input."""
    spec = getattr(model, "gradloc_gap_linear", None)
    if spec is None:
        return None
    layer_name, linear_name = spec
    if resolve_layer(model, layer_name)[1] is not module:
        return None
    linear = resolve_layer(model, linear_name)[1]
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"model.gradloc_gap_linear names {linear_name!r}, a {type(linear).__name__}; "
                         "it must name the nn.Linear classifier")
    return linear


def _check_gap_linear(linear: nn.Linear, activation: Tensor, scores: Tensor) -> None:
    """Check the declared head: ``scores == linear(mean_ij activation)``."""
    if linear.in_features != activation.shape[1] or linear.out_features != scores.shape[1]:
        raise ValueError(f"model.gradloc_gap_linear: the linear layer maps {linear.in_features} -> "
                         f"{linear.out_features} but the layer has {activation.shape[1]} channels and the "
                         f"model {scores.shape[1]} outputs; fix the model's gradloc_gap_linear or set it "
                         "to None")
    expected = F.linear(activation.mean(dim=(2, 3)), linear.weight, linear.bias)
    error = (expected - scores).abs().max().item()
    if error > 1e-3 * (1.0 + scores.abs().max().item()):
        raise ValueError(f"model.gradloc_gap_linear: linear(global average of the layer) differs from "
                         f"the model's output by {error:.3g}; fix the model's gradloc_gap_linear or set it "
                         "to None")


def _onehot(classes: list[int], scores: Tensor) -> Tensor:
    """Batched output gradients: ``[K, B, N]`` with ``onehot[k, :, classes[k]] = 1``."""
    onehot = torch.zeros(len(classes), *scores.shape, dtype=scores.dtype, device=scores.device)
    onehot[torch.arange(len(classes), device=scores.device), :,
           torch.tensor(classes, device=scores.device)] = 1.0
    return onehot


def _batched_vjp(outputs: Tensor, inputs: Tensor, cotangents: Tensor,
                 retain_graph: bool = False) -> Tensor | None:
    """``[K, *inputs.shape]`` vector-Jacobian products of ``K`` cotangents ``[K, *outputs.shape]`` in one
    batched backward pass (``torch.func.vmap`` over ``torch.autograd.grad``); None when ``outputs`` does not
    depend on ``inputs``."""
    unused = []

    def vjp(cotangent: Tensor) -> Tensor:
        (grad,) = torch.autograd.grad(outputs, inputs, cotangent, retain_graph=retain_graph, allow_unused=True)
        if grad is None:
            unused.append(True)
            return torch.zeros_like(inputs)
        return grad

    grads = torch.func.vmap(vjp)(cotangents)
    return None if unused else grads


def _activations_and_gradients(model: nn.Module, images: Tensor, classes: list[int],
                               layer: tuple[str, nn.Module]) -> tuple[Tensor, Tensor, Tensor]:
    """Engine behind ``activations_and_gradients`` for an already resolved layer (model in eval mode)."""
    linear = _gap_linear(model, layer[1])
    if linear is not None:
        activation, scores = _forward_capture(model, images, layer, track_grad=False)
        _check_gap_linear(linear, activation, scores)
        _check_class_range(classes, scores.shape[1])
        batch, channels, height, width = activation.shape
        alpha = linear.weight.detach()[classes].to(activation.dtype) / (height * width)  # [K, C]
        grads = alpha[:, None, :, None, None].expand(len(classes), batch, channels, height, width)
        logger.debug("layer %s: closed-form GAP+linear gradients", layer[0])
        return activation, grads, scores
    activation, scores = _forward_capture(model, images, layer, track_grad=True)
    _check_class_range(classes, scores.shape[1])
    grads = _batched_vjp(scores, activation, _onehot(classes, scores)) if scores.requires_grad else None
    if grads is None:
        raise ValueError(f"the output of {type(model).__name__} does not depend on layer {layer[0]!r}; "
                         "pick a module on the path to the output (see gradloc.cams.list_layers)")
    return activation.detach(), grads, scores.detach()


def activations_and_gradients(model: nn.Module, images: Tensor, classes: Sequence[int],
                              layer: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Target-layer activations and the gradients of every requested class, from one forward pass.

    See the module docstring for how the batched gradients are computed (one forward, one batched VJP
    through the head only, or the closed form ``dy_c / dA^k_ij = w_ck / Z`` for a declared GAP+linear head).

    Args:
        model: classifier returning scores ``[B, N]``.
        images: float ``[B, 3, H, W]``, preprocessed.
        classes: K class indices, the same for every image.
        layer: target layer name (see ``resolve_layer``); None for ``default_layer(model)``.

    Returns:
        activations ``[B, C, h, w]``, gradients ``[K, B, C, h, w]`` (``dy_{classes[k]} / dA``; may be an
        expanded view in the closed form), scores ``[B, N]``; all in the model's dtype, detached.
    """
    classes = _check_inputs(images, classes)
    target = resolve_layer(model, layer if layer is not None else default_layer(model))
    with _eval_mode(model):
        return _activations_and_gradients(model, images, classes, target)


# --- gradient methods: (A [B, C, h, w], G [K, B, C, h, w]) -> maps [B, K, h, w] ----------------------------


def _channel_weighted(weights: Tensor, activation: Tensor) -> Tensor:
    """``ReLU(sum_c weights[k, b, c] A[b, c])``.

    Args:
        weights: ``[K, B, C]``. activation: ``[B, C, h, w]``.

    Returns:
        ``[B, K, h, w]``.
    """
    return torch.einsum("kbc,bchw->bkhw", weights, activation).relu()


def gradcam_map(activation: Tensor, grads: Tensor) -> Tensor:
    """Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
    Localization", ICCV 2017).

    ``alpha_k^c = (1/Z) sum_ij g^{kc}_ij``, ``L^c = ReLU(sum_k alpha_k^c A^k)``.

    With a GAP+linear head ``g^{kc}_ij = w_ck / Z`` so ``alpha_k^c = w_ck / Z`` and Grad-CAM = CAM / Z.

    Agreement: equal to pytorch-grad-cam's and torchcam's ``GradCAM`` to float32 rounding (largest relative
    difference < 1e-6; ``tests/test_agreement.py``, ``scripts/agreement.py``).

    Args:
        activation: ``[B, C, h, w]``. grads: ``[K, B, C, h, w]``.

    Returns:
        ``[B, K, h, w]``, same dtype.
    """
    return _channel_weighted(grads.mean(dim=(-2, -1)), activation)


def gradcampp_map(activation: Tensor, grads: Tensor) -> Tensor:
    """Grad-CAM++ (Chattopadhay et al., "Grad-CAM++: Generalized Gradient-Based Visual Explanations for
    Deep Convolutional Networks", WACV 2018), with the exponential closed form of its Eq. 19.

    For ``Y_c = exp(y_c)`` and a piecewise-linear network (zero second derivatives of ``y_c``) the higher
    derivatives are ``d^n Y_c / (dA)^n = exp(y_c) g^n``, and the ``exp(y_c)`` factors cancel in

        ``alpha^{kc}_ij = g_ij^2 / (2 g_ij^2 + (sum_ab A^k_ab) g_ij^3)``   (0 where g_ij = 0 or the
        denominator is 0),

    ``w_k^c = sum_ij alpha^{kc}_ij ReLU(g^{kc}_ij)``, ``L^c = ReLU(sum_k w_k^c A^k)``.

    The paper's weight uses ``ReLU(dY_c/dA) = exp(y_c) ReLU(g)``; like pytorch-grad-cam and torchcam we drop
    the positive per-class constant ``exp(y_c)`` (it overflows for large scores and does not change the
    normalized map): the raw map here is the paper's map times ``exp(-y_c)``. The denominator follows the
    paper (``sum_ab A^k_ab`` times ``g_ij^3``), as pytorch-grad-cam does. Computed as
    ``w_k^c = sum_ij ReLU(g_ij) / (2 + (sum_ab A^k_ab) g_ij)``, the same quantity with ``g_ij^2`` cancelled
    (only cells with ``g_ij > 0`` contribute).

    Agreement: differs by convention from both libraries. pytorch-grad-cam adds ``1e-6`` to the alpha
    denominator (``g^2 / (2 g^2 + sum(A) g^3 + 1e-6)``), comparable to ``g^2`` when gradients are small (e.g.
    at ``layer4``): measured largest relative difference 1.0 (tiny CNN) and 0.088 (random resnet18 layer4).
    torchcam divides a boolean-indexed *copy* of ``g^2`` in place, so its alpha stays ``g^2`` and its weight
    is ``sum_ij g_ij^2 ReLU(g_ij)`` (another scale altogether). Both conventions are reproduced in the tests.

    Args:
        activation: ``[B, C, h, w]``. grads: ``[K, B, C, h, w]``.

    Returns:
        ``[B, K, h, w]``, same dtype.
    """
    totals = activation.sum(dim=(-2, -1))[..., None, None]  # [B, C, 1, 1]
    denominator = torch.addcmul(torch.full((), 2.0, dtype=grads.dtype, device=grads.device), totals, grads)
    # ReLU(g) / denominator; x/0 (inf or nan) only where the denominator is 0, which contributes 0
    ratio = grads.clamp(min=0).div_(denominator).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    return _channel_weighted(ratio.sum(dim=(-2, -1)), activation)


def xgradcam_map(activation: Tensor, grads: Tensor) -> Tensor:
    """XGrad-CAM (Fu et al., "Axiom-based Grad-CAM: Towards Accurate Visualization and Explanation of CNNs",
    BMVC 2020).

    ``alpha_k^c = sum_ij (A^k_ij / sum_ab A^k_ab) g^{kc}_ij`` (0 when ``sum_ab A^k_ab = 0``),
    ``L^c = ReLU(sum_k alpha_k^c A^k)``.

    Agreement: equal to pytorch-grad-cam's and torchcam's ``XGradCAM`` to float32 rounding (< 1e-6 relative;
    pytorch-grad-cam's ``1e-7`` in the denominator does not show at these activations).

    Args:
        activation: ``[B, C, h, w]``. grads: ``[K, B, C, h, w]``.

    Returns:
        ``[B, K, h, w]``, same dtype.
    """
    totals = activation.sum(dim=(-2, -1))  # [B, C]
    weighted = torch.einsum("kbchw,bchw->kbc", grads, activation)
    alpha = torch.where(totals != 0, weighted / torch.where(totals != 0, totals, 1.0), 0.0)
    return _channel_weighted(alpha, activation)


def layercam_map(activation: Tensor, grads: Tensor) -> Tensor:
    """LayerCAM (Jiang et al., "LayerCAM: Exploring Hierarchical Class Activation Maps for Localization",
    IEEE TIP 2021).

    ``L^c_ij = ReLU(sum_k ReLU(g^{kc}_ij) A^k_ij)``.

    Agreement: equal to pytorch-grad-cam's and torchcam's ``LayerCAM`` to float32 rounding (< 1e-6 relative).

    Args:
        activation: ``[B, C, h, w]``. grads: ``[K, B, C, h, w]``.

    Returns:
        ``[B, K, h, w]``, same dtype.
    """
    return (grads.relu() * activation).sum(dim=2).relu().transpose(0, 1)


def hirescam_map(activation: Tensor, grads: Tensor) -> Tensor:
    """HiResCAM (Draelos & Carin, "Use HiResCAM instead of Grad-CAM for faithful explanations of
    convolutional neural networks", arXiv:2011.08891, 2020).

    ``L^c_ij = ReLU(sum_k g^{kc}_ij A^k_ij)`` (element-wise product instead of Grad-CAM's averaged gradient).

    Agreement: equal to pytorch-grad-cam's ``HiResCAM`` to float32 rounding (< 1e-6 relative); torchcam has
    no HiResCAM.

    Args:
        activation: ``[B, C, h, w]``. grads: ``[K, B, C, h, w]``.

    Returns:
        ``[B, K, h, w]``, same dtype.
    """
    return (grads * activation).sum(dim=2).relu().transpose(0, 1)


GradientMap = Callable[[Tensor, Tensor], Tensor]


# --- method implementations (model already in eval mode, inputs validated) ---------------------------------


def _gradient_method(combine: GradientMap, model: nn.Module, images: Tensor, classes: list[int],
                     layer: tuple[str, nn.Module], batch_size: int) -> tuple[Tensor, Tensor]:
    activation, grads, scores = _activations_and_gradients(model, images, classes, layer)
    return combine(activation, grads), scores


def _cam(model: nn.Module, images: Tensor, classes: list[int], layer: tuple[str, nn.Module],
         batch_size: int) -> tuple[Tensor, Tensor]:
    """CAM (Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR 2016).

    ``L^c = ReLU(sum_k w_ck A^k)`` with ``w`` the weights of the linear classifier that follows global
    average pooling of the target layer (``model.gradloc_gap_linear``); the bias is left out.

    Agreement: torchcam's ``CAM`` applies no ReLU (it keeps negative evidence); gradloc's map is the ReLU of
    torchcam's raw map (< 1e-6 relative). pytorch-grad-cam has no plain CAM.
    """
    linear = _gap_linear(model, layer[1])
    if linear is None:
        spec = getattr(model, "gradloc_gap_linear", None)
        where = (f"its GAP+linear head follows {spec[0]!r}, not {layer[0]!r}" if spec is not None
                 else "it declares none (model.gradloc_gap_linear is unset)")
        raise ValueError(f"CAM needs a global-average-pooling + linear head after the target layer and "
                         f"{type(model).__name__}: {where}; use gradcam or another gradient method")
    activation, scores = _forward_capture(model, images, layer, track_grad=False)
    _check_gap_linear(linear, activation, scores)
    _check_class_range(classes, scores.shape[1])
    weights = linear.weight.detach()[classes].to(activation.dtype)  # [K, C]
    return torch.einsum("kc,bchw->bkhw", weights, activation).relu(), scores


def _scorecam(model: nn.Module, images: Tensor, classes: list[int], layer: tuple[str, nn.Module],
              batch_size: int) -> tuple[Tensor, Tensor]:
    """Score-CAM (Wang et al., "Score-CAM: Score-Weighted Visual Explanations for Convolutional Neural
    Networks", CVPR Workshops 2020).

    Masks ``H^k = s(Up(A^k))``: channel ``k`` upsampled bilinearly to the input size, then min-max normalized
    to [0, 1] per image and channel (an all-constant channel gives an all-zero mask; all such channels share
    one forward pass of the zero input, which at EfficientNet-Lite0's ``bn2`` skips about a third of the
    1,280 masked passes on VOC photographs). Weights
    ``alpha_k^c = softmax_k(y_c(X o H^k) - y_c(X_b))``, map ``L^c = ReLU(sum_k alpha_k^c A^k)``.

    "Score" is the raw pre-sigmoid output ``y_c`` of the masked input and the softmax runs over channels, as
    torchcam and pytorch-grad-cam implement it; the paper's softmax over classes has no meaning for a
    multi-label sigmoid head. Because the softmax is shift-invariant, the baseline term ``y_c(X_b)`` cancels:
    this is also the softmax of the score increase over any baseline. Masked inputs are ``X o H^k`` on the
    preprocessed input (0 = mean colour), ``batch_size`` of them per forward pass; each forward scores all
    requested classes at once.

    Agreement: differs from both libraries only in how masks are made. pytorch-grad-cam upsamples with
    ``UpsamplingBilinear2d`` (``align_corners=True``) and adds ``1e-8`` to the normalising range; torchcam
    min-max normalises each channel at the layer's resolution and then upsamples (``align_corners=False``);
    gradloc upsamples (``align_corners=False``) and then normalises. Measured largest relative difference:
    1.1e-3 / 1.8e-3 (pytorch-grad-cam / torchcam) on the tiny CNN, 2.7e-2 / 8.4e-4 on random resnet18 layer4.
    """
    activation, scores = _forward_capture(model, images, layer, track_grad=False)
    _check_class_range(classes, scores.shape[1])
    batch, channels = activation.shape[:2]
    masked_scores = activation.new_empty(batch * channels, len(classes))
    image_of = torch.arange(batch, device=activation.device).repeat_interleave(channels)
    flat = activation.reshape(batch * channels, 1, *activation.shape[2:])
    # A constant channel (often all zero after a ReLU) masks the whole input to 0: one forward of a zero
    # input scores all of them (also keeps interpolation round-off of a constant from becoming a mask).
    constant = flat.amax(dim=(1, 2, 3)) == flat.amin(dim=(1, 2, 3))
    varying = (~constant).nonzero().squeeze(1)
    with torch.no_grad():
        if constant.any():
            masked_scores[constant] = _run(model, torch.zeros_like(images[:1]))[:, classes]
        for start in range(0, len(varying), batch_size):
            part = varying[start:start + batch_size]
            upsampled = F.interpolate(flat[part], size=images.shape[2:], mode="bilinear", align_corners=False)
            low = upsampled.amin(dim=(2, 3), keepdim=True)
            span = upsampled.amax(dim=(2, 3), keepdim=True) - low
            masks = torch.where(span > 0, (upsampled - low) / torch.where(span > 0, span, 1.0), 0.0)
            masked_scores[part] = _run(model, images[image_of[part]] * masks)[:, classes]
    weights = masked_scores.reshape(batch, channels, len(classes)).softmax(dim=1)
    return torch.einsum("bck,bchw->bkhw", weights, activation).relu(), scores


def _clamp_negative(grad: Tensor) -> Tensor:
    return grad.clamp(min=0)


def _guide_relu(module: nn.Module, inputs: object, output: Tensor) -> None:
    """Forward hook on an ``nn.ReLU``: clamp the gradient reaching its output to >= 0 (guided backprop)."""
    if output.requires_grad:
        output.register_hook(_clamp_negative)


def _guided_backprop(model: nn.Module, images: Tensor, classes: list[int],
                     layer: tuple[str, nn.Module] | None, batch_size: int) -> tuple[Tensor, Tensor]:
    """Guided Backprop (Springenberg et al., "Striving for Simplicity: The All Convolutional Net", ICLR
    workshop 2015).

    Back-propagates ``y_c`` to the input with every ReLU's backward replaced by
    ``R_in = ReLU(R_out) * [x > 0]`` (only negative-gradient signals are stopped), through forward hooks on
    the ``nn.ReLU`` modules that are removed afterwards (functional ReLUs and other activations keep their
    plain gradient; a warning is logged when the model has no ``nn.ReLU``). The map is
    ``max over colour channels of |R_in|`` (Simonyan et al. 2014's reduction), ``[B, K, H, W]``.

    This needs a full backward pass: the K classes are back-propagated in batched VJPs of
    ``max(1, batch_size // B)`` classes each.

    Agreement: equal to pytorch-grad-cam's ``GuidedBackpropReLUModel`` gradient reduced the same way to
    float32 rounding (< 1e-6 relative); torchcam has no guided backprop.
    """
    relus = [module for module in model.modules() if isinstance(module, nn.ReLU)]
    if not relus:
        logger.warning("guided backprop: %s has no nn.ReLU module; the result is the plain input gradient",
                       type(model).__name__)
    inputs = images.detach().requires_grad_()
    with _forward_hooks([(relu, _guide_relu) for relu in relus]), torch.enable_grad():
        scores = _run(model, inputs)
        _check_class_range(classes, scores.shape[1])
        step = max(1, batch_size // images.shape[0])
        maps = []
        for start in range(0, len(classes), step):
            chunk = classes[start:start + step]
            grads = _batched_vjp(scores, inputs, _onehot(chunk, scores), retain_graph=start + step < len(classes))
            if grads is None:
                raise ValueError(f"the output of {type(model).__name__} does not depend on its input")
            maps.append(grads.abs().amax(dim=2).transpose(0, 1))  # [B, k, H, W]
    return torch.cat(maps, dim=1), scores.detach()


def _guided_gradcam(model: nn.Module, images: Tensor, classes: list[int], layer: tuple[str, nn.Module],
                    batch_size: int) -> tuple[Tensor, Tensor]:
    """Guided Grad-CAM (Selvaraju et al., ICCV 2017, Sec. 3.1).

    ``Guided Backprop map * Up(Grad-CAM map)``: the layer-resolution Grad-CAM map is upsampled bilinearly
    (``align_corners=False``) to the input size and multiplied element-wise with the Guided Backprop map
    (``max over colour channels of |R_in|``, see guided_backprop), ``[B, K, H, W]``.
    """
    cams, scores = _gradient_method(gradcam_map, model, images, classes, layer, batch_size)
    guided, _ = _guided_backprop(model, images, classes, None, batch_size)
    upsampled = F.interpolate(cams, size=images.shape[2:], mode="bilinear", align_corners=False)
    return upsampled * guided, scores


# --- registry and entry point -------------------------------------------------------------------------------

MethodFunction = Callable[..., tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class CamMethod:
    """A heatmap method of the registry.

    Attributes:
        compute: ``(model, images, classes, (layer name, module) or None, batch_size) -> (maps, scores)``,
            with the model already in eval mode and the inputs validated.
        uses_layer: False for methods that ignore the target layer (Guided Backprop).
        input_resolution: True when maps are ``[B, K, H, W]`` at the input resolution (pixel-level methods,
            for pictures rather than boxes); False for ``[B, K, h, w]`` at the layer's resolution.
        needs_gradients: True when the method back-propagates.
        citation: the paper, for tables and reports (the implementing function's docstring has the formula).
    """

    compute: MethodFunction
    citation: str
    uses_layer: bool = True
    input_resolution: bool = False
    needs_gradients: bool = True


GRADIENT_MAPS: dict[str, GradientMap] = {
    "gradcam": gradcam_map,
    "gradcampp": gradcampp_map,
    "xgradcam": xgradcam_map,
    "layercam": layercam_map,
    "hirescam": hirescam_map,
}
"""The methods that combine one layer's activations and gradients: :func:`compute_gradient_cams` computes any
set of them from a single forward/backward pass."""

_GRADIENT_CITATIONS = {
    "gradcam": "Selvaraju et al., ICCV 2017",
    "gradcampp": "Chattopadhay et al., WACV 2018",
    "xgradcam": "Fu et al., BMVC 2020",
    "layercam": "Jiang et al., IEEE TIP 2021",
    "hirescam": "Draelos & Carin, arXiv:2011.08891",
}

METHODS: dict[str, CamMethod] = {
    "cam": CamMethod(_cam, "Zhou et al., CVPR 2016", needs_gradients=False),
    **{name: CamMethod(partial(_gradient_method, combine), _GRADIENT_CITATIONS[name])
       for name, combine in GRADIENT_MAPS.items()},
    "scorecam": CamMethod(_scorecam, "Wang et al., CVPR Workshops 2020", needs_gradients=False),
    "guided_backprop": CamMethod(_guided_backprop, "Springenberg et al., ICLR Workshops 2015",
                                 uses_layer=False, input_resolution=True),
    "guided_gradcam": CamMethod(_guided_gradcam, "Selvaraju et al., ICCV 2017", input_resolution=True),
}


def _check_inputs(images: Tensor, classes: Sequence[int]) -> list[int]:
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        found = (f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor)
                 else type(images).__name__)
        raise ValueError(f"images must be a float tensor [B, 3, H, W], got {found}")
    if torch.is_inference_mode_enabled():
        raise ValueError("CAMs need autograd: call compute_cams outside torch.inference_mode() "
                         "(torch.no_grad() is fine)")
    try:
        indices = [operator.index(c) for c in classes]
    except TypeError:
        raise ValueError(f"classes must be integer class indices, got {list(classes)!r}") from None
    if not indices:
        raise ValueError("classes is empty; give at least one class index")
    return indices


def _check_class_range(classes: list[int], num_classes: int) -> None:
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"class indices {bad} are outside [0, {num_classes}) for a model with "
                         f"{num_classes} outputs")


def default_masked_batch(device: torch.device) -> int:
    """Masked inputs per forward pass for Score-CAM when ``cams.masked_batch`` is unset: 32 on CUDA, 2 on a
    CPU, where larger batches are slower per image (Score-CAM of EfficientNet-Lite0 at ``bn2``, 320-px short
    side, 2 cores: 68-74 s per image at 1-2, 128 s at 8, 195 s at 32; ``python scripts/bench_scorecam.py``)."""
    return 32 if device.type == "cuda" else 2


def compute_cams(model: nn.Module, images: Tensor, classes: Sequence[int], method: str = "gradcam",
                 layer: str | None = None, *, batch_size: int = 32, flip: bool = False) -> tuple[Tensor, Tensor]:
    """Heatmaps of every requested class for a batch of images.

    Gradient methods cost one forward pass plus one batched backward through the head after the layer (none
    for a declared GAP+linear head); see the module docstring. The model is in eval mode during the call
    and its training flags are restored; hooks are removed; parameters' ``.grad`` are never written.

    Args:
        model: classifier returning raw scores ``[B, N]`` (pre-sigmoid).
        images: float ``[B, 3, H, W]``, already preprocessed.
        classes: K class indices, the same for every image.
        method: a key of ``METHODS``.
        layer: target layer name (exact or unique suffix, see ``resolve_layer``); None for
            ``default_layer(model)``. Ignored by ``guided_backprop``.
        batch_size: masked inputs per forward pass for Score-CAM (:func:`default_masked_batch`); images x
            classes per batched backward for the guided methods.
        flip: test-time horizontal flip: the maps of the mirrored input (``images.flip(3)``), mirrored back,
            are averaged with the original's, raw (before any normalization):
            ``M = (M(x) + flip(M(flip(x)))) / 2``. The whole canvas is mirrored, so the mirrored-back map
            lies on the original's grid whatever the padding. For a mirror-equivariant network
            (``M(flip(x)) = flip(M(x))``) this changes nothing; for any network the averaged maps are
            mirror-equivariant. The scores stay those of the original images.

    Returns:
        maps float32 ``[B, K, h, w]`` raw (after ReLU, before any normalization) at the target layer's
        resolution, or ``[B, K, H, W]`` at the input resolution for ``guided_backprop`` and
        ``guided_gradcam``; scores float32 ``[B, N]``, the model's outputs (of the unflipped images).

    Raises:
        ValueError: unknown method or layer, bad images/classes/batch_size, CAM without a GAP+linear head.
    """
    if method not in METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose one of {', '.join(METHODS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    indices = _check_inputs(images, classes)
    spec = METHODS[method]
    target = (resolve_layer(model, layer if layer is not None else default_layer(model)) if spec.uses_layer
              else None)
    logger.debug("%s on layer %s for %d images x %d classes", method, target and target[0], len(images),
                 len(indices))
    with _eval_mode(model):
        maps, scores = spec.compute(model, images, indices, target, batch_size)
        if flip:
            mirrored, _ = spec.compute(model, images.flip(3), indices, target, batch_size)
            maps = (maps + mirrored.flip(3)) / 2
    return maps.float().contiguous(), scores.float().contiguous()


def compute_gradient_cams(model: nn.Module, images: Tensor, classes: Sequence[int], methods: Sequence[str],
                          layer: str | None = None, *, flip: bool = False) -> tuple[dict[str, Tensor], Tensor]:
    """Several gradient methods (:data:`GRADIENT_MAPS`) from one forward pass and one batched backward.

    Each map equals :func:`compute_cams` with that method and ``flip`` (same activations, gradients and
    formula); only the network work is shared, so a benchmark of K methods costs one pass instead of K.

    Returns:
        ({method: float32 [B, K, h, w] raw maps}, float32 [B, N] scores).

    Raises:
        ValueError: a method that is not a gradient method, bad layer, images or classes.
    """
    unknown = [m for m in methods if m not in GRADIENT_MAPS]
    if unknown or not methods:
        raise ValueError(f"methods {list(methods)}: give one or more of {', '.join(GRADIENT_MAPS)}")
    indices = _check_inputs(images, classes)
    target = resolve_layer(model, layer if layer is not None else default_layer(model))
    with _eval_mode(model):
        activation, grads, scores = _activations_and_gradients(model, images, indices, target)
        maps = {m: GRADIENT_MAPS[m](activation, grads) for m in methods}
        if flip:
            activation, grads, _ = _activations_and_gradients(model, images.flip(3), indices, target)
            maps = {m: (maps[m] + GRADIENT_MAPS[m](activation, grads).flip(3)) / 2 for m in methods}
    return {m: v.float().contiguous() for m, v in maps.items()}, scores.float().contiguous()
