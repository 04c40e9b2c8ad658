"""The method registry :data:`METHODS` and the entry points :func:`compute_cams`, :func:`compute_gradient_cams`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from gradloc.cams.activation import cam, scorecam
from gradloc.cams.eigen import eigencam
from gradloc.cams.engine import check_inputs, forward_precision, layer_activations_and_gradients
from gradloc.cams.gradient import GRADIENT_CITATIONS, GRADIENT_MAPS, gradient_method
from gradloc.cams.guided import guided_backprop, guided_gradcam
from gradloc.cams.hooks import eval_mode
from gradloc.cams.layers import default_layer, resolve_layer

logger = logging.getLogger(__name__)

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
    eigen_smooth: bool = False  # compute takes eigen_smooth=True (the gradient methods)


METHODS: dict[str, CamMethod] = {
    "cam": CamMethod(cam, "Zhou et al., CVPR 2016", needs_gradients=False),
    **{name: CamMethod(partial(gradient_method, combine), GRADIENT_CITATIONS[name], eigen_smooth=True)
       for name, combine in GRADIENT_MAPS.items()},
    "eigencam": CamMethod(eigencam, "Muhammad & Yeasin, IJCNN 2020", needs_gradients=False),
    "scorecam": CamMethod(scorecam, "Wang et al., CVPR Workshops 2020", needs_gradients=False),
    "guided_backprop": CamMethod(guided_backprop, "Springenberg et al., ICLR Workshops 2015",
                                 uses_layer=False, input_resolution=True),
    "guided_gradcam": CamMethod(guided_gradcam, "Selvaraju et al., ICCV 2017", input_resolution=True),
}


def default_masked_batch(device: torch.device) -> int:
    """Masked inputs per forward pass for Score-CAM when ``cams.masked_batch`` is unset: 32 on CUDA, 2 on a
    CPU, where larger batches are slower per image (Score-CAM of EfficientNet-Lite0 at ``bn2``, 320-px short
    side, 2 cores: 68-74 s per image at 1-2, 128 s at 8, 195 s at 32; ``python scripts/bench_scorecam.py``)."""
    return 32 if device.type == "cuda" else 2


Pass = tuple[bool, float]  # (mirrored, multiplier of the preprocessed input)


@dataclass(frozen=True)
class Augmentation:
    """A test-time augmentation: its passes, and whether each pass's maps are scaled to a maximum of 1 before
    the average (every pass one equal vote) or averaged raw."""

    passes: tuple[Pass, ...]
    scale_passes: bool


TEST_TIME_AUGMENTATIONS: dict[str, Augmentation] = {
    "none": Augmentation(((False, 1.0),), scale_passes=False),
    "flip": Augmentation(((False, 1.0), (True, 1.0)), scale_passes=False),
    # pytorch-grad-cam's aug_smooth: ttach's Compose([HorizontalFlip(), Multiply([0.9, 1, 1.1])]), in its order
    "aug_smooth": Augmentation(tuple((mirrored, factor) for mirrored in (False, True) for factor in (0.9, 1.0, 1.1)),
                               scale_passes=True),
}
"""The test-time augmentations of :func:`compute_cams` (``flip``, ``aug_smooth``)."""


def test_time_augmentation(flip: bool = False, aug_smooth: bool = False) -> Augmentation:
    """The augmentation of ``flip`` / ``aug_smooth`` (:data:`TEST_TIME_AUGMENTATIONS`).

    Raises:
        ValueError: both on (aug_smooth already holds the mirrored passes).
    """
    if flip and aug_smooth:
        raise ValueError("cams.flip and cams.aug_smooth are both on; aug_smooth already averages the mirrored "
                         "image: turn one off (--no-flip)")
    return TEST_TIME_AUGMENTATIONS["aug_smooth" if aug_smooth else "flip" if flip else "none"]


def _scaled(maps: Tensor) -> Tensor:
    """Maps ``[B, K, h, w]`` divided by their own maximum (all-zero maps stay zero)."""
    peak = maps.amax(dim=(-2, -1), keepdim=True)
    return torch.where(peak > 0, maps / torch.where(peak > 0, peak, 1.0), 0.0)


def _averaged(compute: Callable[[Tensor], tuple[dict[str, Tensor], Tensor]], images: Tensor,
              augmentation: Augmentation) -> tuple[dict[str, Tensor], Tensor]:
    """``(1/P) sum_p unmirror_p(M(aug_p(x)))`` over the passes (each map scaled to max 1 first when the
    augmentation says so), and the scores of the plain image."""
    total: dict[str, Tensor] = {}
    scores = None
    passes = augmentation.passes
    for mirrored, factor in passes:
        inputs = images.flip(3) if mirrored else images
        maps, pass_scores = compute(inputs * factor if factor != 1.0 else inputs)
        for name, value in maps.items():
            value = _scaled(value) if augmentation.scale_passes else value
            value = value.flip(3) if mirrored else value
            total[name] = total[name] + value if name in total else value
        if not mirrored and factor == 1.0:
            scores = pass_scores
    return {name: value / len(passes) if len(passes) > 1 else value for name, value in total.items()}, scores


def method_label(method: str, *, aug_smooth: bool = False, eigen_smooth: bool = False) -> str:
    """The method as protocol lines name it: ``gradcam``, ``gradcam (eigen_smooth, aug_smooth)``."""
    options = [name for name, on in (("eigen_smooth", eigen_smooth), ("aug_smooth", aug_smooth)) if on]
    return f"{method} ({', '.join(options)})" if options else method


def compute_cams(model: nn.Module, images: Tensor, classes: Sequence[int], method: str = "gradcam",
                 layer: str | None = None, *, batch_size: int = 32, flip: bool = False, aug_smooth: bool = False,
                 eigen_smooth: bool = False) -> tuple[Tensor, Tensor]:
    """Heatmaps of every requested class for a batch of images.

    Gradient methods cost one forward pass plus one batched backward through the head after the layer (none
    for a declared GAP+linear head); see the module docstring. The model is in eval mode during the call
    and its training flags are restored; hooks are removed; parameters' ``.grad`` are never written. Under
    an enclosing ``torch.autocast`` only the network up to the target layer runs in the low precision
    (:func:`gradloc.cams.engine.forward_precision`).

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
        aug_smooth: pytorch-grad-cam's test-time augmentation: six passes, the input and its mirror image each
            multiplied by 0.9, 1 and 1.1 (on the preprocessed input, as ttach's ``Multiply``); each pass's maps
            (after the method's ReLU) are divided by their maximum, mirrored back and averaged:
            ``M = (1/6) sum_{m, f} m(N(M(f * m(x))))`` with ``N(X) = X / max X``, at the layer's resolution. So
            every pass is one equal vote, as in the library, which min-max normalises each pass after resizing
            it to the input (gradloc resizes at box time, and after a ReLU the minimum is 0 on all but
            all-positive maps). The stored map is therefore not on the network's raw scale (its maximum is at
            most 1); thresholds and confidences only use ratios to the map's own maximum. The per-pass maps
            equal the library's, and its ``aug_smooth`` output rebuilt from them agrees to float rounding
            (tests/cams/test_agreement.py). The scores stay those of the original images. Not with ``flip``
            (``flip`` averages its two passes raw).
        eigen_smooth: for the gradient methods, the first principal component of the weighted activations
            instead of their channel sum (:mod:`gradloc.cams.gradient`, pytorch-grad-cam's option).

    Returns:
        maps float32 ``[B, K, h, w]`` raw (after ReLU, before any normalization) at the target layer's
        resolution, or ``[B, K, H, W]`` at the input resolution for ``guided_backprop`` and
        ``guided_gradcam``; scores float32 ``[B, N]``, the model's outputs (of the unflipped images).

    Raises:
        ValueError: unknown method or layer, bad images/classes/batch_size, CAM without a GAP+linear head,
            ``eigen_smooth`` with a method that is not a gradient method, ``flip`` with ``aug_smooth``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose one of {', '.join(METHODS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    spec = METHODS[method]
    check_eigen_smooth(method, eigen_smooth)
    augmentation = test_time_augmentation(flip, aug_smooth)
    indices = check_inputs(images, classes)
    target = (resolve_layer(model, layer if layer is not None else default_layer(model)) if spec.uses_layer
              else None)
    logger.debug("%s on layer %s for %d images x %d classes", method, target and target[0], len(images),
                 len(indices))
    options = {"eigen_smooth": True} if eigen_smooth else {}

    def one_pass(inputs: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        maps, scores = spec.compute(model, inputs, indices, target, batch_size, **options)
        return {method: maps}, scores

    with eval_mode(model), forward_precision(images.device.type):
        maps, scores = _averaged(one_pass, images, augmentation)
    return maps[method].float().contiguous(), scores.float().contiguous()


def check_eigen_smooth(method: str, eigen_smooth: bool) -> None:
    """Refuse ``eigen_smooth`` for a method that does not weigh activations by gradients.

    Raises:
        ValueError: naming the method and the ones that take it.
    """
    if eigen_smooth and not METHODS[method].eigen_smooth:
        raise ValueError(f"eigen_smooth applies to the gradient methods ({', '.join(GRADIENT_MAPS)}), not "
                         f"{method}" + (" (EigenCAM is already a principal component)" if method == "eigencam"
                                        else ""))


def compute_gradient_cams(model: nn.Module, images: Tensor, classes: Sequence[int], methods: Sequence[str],
                          layer: str | None = None, *, flip: bool = False, aug_smooth: bool = False,
                          eigen_smooth: bool = False) -> tuple[dict[str, Tensor], Tensor]:
    """Several gradient methods (:data:`GRADIENT_MAPS`) from one forward pass and one batched backward (per
    test-time pass).

    Each map equals :func:`compute_cams` with that method, ``flip``, ``aug_smooth`` and ``eigen_smooth`` (same
    activations, gradients and formula); only the network work is shared, so a benchmark of K methods costs
    one pass instead of K.

    Returns:
        ({method: float32 [B, K, h, w] raw maps}, float32 [B, N] scores).

    Raises:
        ValueError: a method that is not a gradient method, bad layer, images or classes, ``flip`` with
            ``aug_smooth``.
    """
    unknown = [m for m in methods if m not in GRADIENT_MAPS]
    if unknown or not methods:
        raise ValueError(f"methods {list(methods)}: give one or more of {', '.join(GRADIENT_MAPS)}")
    augmentation = test_time_augmentation(flip, aug_smooth)
    indices = check_inputs(images, classes)
    target = resolve_layer(model, layer if layer is not None else default_layer(model))

    def one_pass(inputs: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        activation, grads, scores = layer_activations_and_gradients(model, inputs, indices, target)
        return {m: GRADIENT_MAPS[m](activation, grads, eigen_smooth) for m in methods}, scores

    with eval_mode(model), forward_precision(images.device.type):
        maps, scores = _averaged(one_pass, images, augmentation)
    return {m: v.float().contiguous() for m, v in maps.items()}, scores.float().contiguous()
