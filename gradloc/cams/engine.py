"""CAM method registry and the batched all-class engine.

Every method turns a classifier and a batch of preprocessed images into one heatmap per (image, class).
Notation used in the method docstrings: ``A^k`` is channel ``k`` of the target layer's output (``h x w``
cells, ``Z = h * w``), ``y_c`` is the model's raw output for class ``c`` (pre-sigmoid / pre-softmax) and
``g^{kc}_{ij} = dy_c / dA^k_{ij}``.

The engine (``layer_activations_and_gradients``) computes the gradients of *all* requested classes for a whole
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

Under an enclosing ``torch.autocast`` (``--amp``: bfloat16 on a CPU, float16 on CUDA;
:mod:`gradloc.models.execution`) only the network's forward passes are autocast (:func:`run_model`), and the
hook on the target layer ends the autocast for the rest of the pass and hands on a float32 copy of the
activation: the network up to the layer runs in the low precision; the activation ``A``, the head after it,
the scores, the gradients and the map formulas in float32 (:func:`forward_precision`).

Hooks live in context managers that remove them in ``finally``; the model is put in eval mode during the
computation and every module's training flag is restored afterwards.

Maps are returned raw (after the method's ReLU, before any normalization) as float32, at the target layer's
resolution, except Guided Backprop and Guided Grad-CAM whose maps are at the input resolution (they are for
pictures, not boxes).
"""

from __future__ import annotations

import contextlib
import logging
import operator
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradloc.cams.hooks import eval_mode, forward_hooks
from gradloc.cams.layers import default_layer, resolve_layer

logger = logging.getLogger(__name__)


@dataclass
class _Capture:
    """Forward hook keeping the target layer's output.

    With ``track_grad`` it switches grad mode on (the caller's enclosing ``no_grad`` block restores it) and
    feeds the rest of the network a copy of the detached leaf ``activation``, so autograd records only the
    part of the network after the layer. The copy also shields ``activation`` from later in-place ops such
    as ``ReLU(inplace=True)``. Under autocast it switches autocast off for the rest of the pass (the
    ``torch.autocast`` block of :func:`run_model` restores it) and hands on the float32 value of the output.
    """

    name: str
    track_grad: bool
    activation: Tensor | None = field(default=None, init=False)

    def __call__(self, module: nn.Module, inputs: object, output: object) -> Tensor | None:
        if not isinstance(output, Tensor) or output.ndim != 4:
            found = f"shape {tuple(output.shape)}" if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(f"layer {self.name!r} returns {found}; a target layer must return a 4-D tensor "
                             "[B, C, h, w] (see gradloc.cams.layers.list_layers)")
        if self.activation is not None:
            raise ValueError(f"layer {self.name!r} runs more than once per forward pass; pick a module that "
                             "runs once (see gradloc.cams.layers.list_layers)")
        value = output
        if torch.is_autocast_enabled(output.device.type):
            torch.set_autocast_enabled(output.device.type, False)
            value = output.float()
        if not self.track_grad:
            self.activation = value.detach().clone()
            return None if value is output else value
        torch.set_grad_enabled(True)
        self.activation = value.detach().requires_grad_()
        return self.activation.clone()


# The autocast dtype of the network's forward passes inside :func:`forward_precision` (None: float32).
_FORWARD_AUTOCAST: ContextVar[torch.dtype | None] = ContextVar("gradloc_forward_autocast", default=None)


@contextlib.contextmanager
def forward_precision(device_type: str) -> Iterator[None]:
    """Reserve an enclosing ``torch.autocast`` of ``device_type`` for the network's forward passes: inside
    the block autocast is off, and :func:`run_model` turns it back on (same dtype) for each forward pass,
    until the target layer's hook ends it. The entry points of the engine run in this block, so their own
    arithmetic is float32 whatever the caller's autocast."""
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    token = _FORWARD_AUTOCAST.set(dtype)
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        _FORWARD_AUTOCAST.reset(token)


def run_model(model: nn.Module, images: Tensor) -> Tensor:
    """Forward pass returning the ``[B, N]`` scores, autocast as :func:`forward_precision` says, with a clear
    error for other outputs."""
    dtype = _FORWARD_AUTOCAST.get()
    with torch.autocast(images.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
        scores = model(images)
    if not isinstance(scores, Tensor) or scores.ndim != 2 or scores.shape[0] != images.shape[0]:
        found = f"shape {tuple(scores.shape)}" if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"{type(model).__name__} returned {found} for {images.shape[0]} images; CAMs need "
                         "a tensor of class scores [B, num_classes]")
    return scores


def forward_capture(model: nn.Module, images: Tensor, layer: tuple[str, nn.Module],
                     track_grad: bool) -> tuple[Tensor, Tensor]:
    """One forward pass (no grad before the layer) returning (activation float32[B, C, h, w], scores [B, N])."""
    name, module = layer
    capture = _Capture(name, track_grad)
    with forward_hooks([(module, capture)]), torch.no_grad():
        scores = run_model(model, images)
    if capture.activation is None:
        raise ValueError(f"layer {name!r} did not run during the forward pass of {type(model).__name__}; "
                         "pick a module on the path to the output (see gradloc.cams.layers.list_layers)")
    return capture.activation, scores


def gap_linear_of(model: nn.Module, module: nn.Module) -> nn.Linear | None:
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


def check_gap_linear(linear: nn.Linear, activation: Tensor, scores: Tensor) -> None:
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


def onehot(classes: list[int], scores: Tensor) -> Tensor:
    """Batched output gradients: ``[K, B, N]`` with ``onehot[k, :, classes[k]] = 1``."""
    onehot = torch.zeros(len(classes), *scores.shape, dtype=scores.dtype, device=scores.device)
    onehot[torch.arange(len(classes), device=scores.device), :,
           torch.tensor(classes, device=scores.device)] = 1.0
    return onehot


def batched_vjp(outputs: Tensor, inputs: Tensor, cotangents: Tensor,
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


def layer_activations_and_gradients(model: nn.Module, images: Tensor, classes: list[int],
                                    layer: tuple[str, nn.Module]) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`activations_and_gradients` for an already resolved ``(name, module)`` layer, with the model in eval
    mode and the inputs checked (what the methods call)."""
    linear = gap_linear_of(model, layer[1])
    if linear is not None:
        activation, scores = forward_capture(model, images, layer, track_grad=False)
        check_gap_linear(linear, activation, scores)
        check_class_range(classes, scores.shape[1])
        batch, channels, height, width = activation.shape
        alpha = linear.weight.detach()[classes].to(activation.dtype) / (height * width)  # [K, C]
        grads = alpha[:, None, :, None, None].expand(len(classes), batch, channels, height, width)
        logger.debug("layer %s: closed-form GAP+linear gradients", layer[0])
        return activation, grads, scores
    activation, scores = forward_capture(model, images, layer, track_grad=True)
    check_class_range(classes, scores.shape[1])
    grads = batched_vjp(scores, activation, onehot(classes, scores)) if scores.requires_grad else None
    if grads is None:
        raise ValueError(f"the output of {type(model).__name__} does not depend on layer {layer[0]!r}; "
                         "pick a module on the path to the output (see gradloc.cams.layers.list_layers)")
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
    classes = check_inputs(images, classes)
    target = resolve_layer(model, layer if layer is not None else default_layer(model))
    with eval_mode(model), forward_precision(images.device.type):
        return layer_activations_and_gradients(model, images, classes, target)


def check_inputs(images: Tensor, classes: Sequence[int]) -> list[int]:
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


def check_class_range(classes: list[int], num_classes: int) -> None:
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"class indices {bad} are outside [0, {num_classes}) for a model with "
                         f"{num_classes} outputs")
