"""The method registry :data:`METHODS` and the entry points :func:`compute_cams`, :func:`compute_gradient_cams`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from gradloc.cams.activation import cam, scorecam
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


METHODS: dict[str, CamMethod] = {
    "cam": CamMethod(cam, "Zhou et al., CVPR 2016", needs_gradients=False),
    **{name: CamMethod(partial(gradient_method, combine), GRADIENT_CITATIONS[name])
       for name, combine in GRADIENT_MAPS.items()},
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


def compute_cams(model: nn.Module, images: Tensor, classes: Sequence[int], method: str = "gradcam",
                 layer: str | None = None, *, batch_size: int = 32, flip: bool = False) -> tuple[Tensor, Tensor]:
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
    indices = check_inputs(images, classes)
    spec = METHODS[method]
    target = (resolve_layer(model, layer if layer is not None else default_layer(model)) if spec.uses_layer
              else None)
    logger.debug("%s on layer %s for %d images x %d classes", method, target and target[0], len(images),
                 len(indices))
    with eval_mode(model), forward_precision(images.device.type):
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
    indices = check_inputs(images, classes)
    target = resolve_layer(model, layer if layer is not None else default_layer(model))
    with eval_mode(model), forward_precision(images.device.type):
        activation, grads, scores = layer_activations_and_gradients(model, images, indices, target)
        maps = {m: GRADIENT_MAPS[m](activation, grads) for m in methods}
        if flip:
            activation, grads, _ = layer_activations_and_gradients(model, images.flip(3), indices, target)
            maps = {m: (maps[m] + GRADIENT_MAPS[m](activation, grads).flip(3)) / 2 for m in methods}
    return {m: v.float().contiguous() for m, v in maps.items()}, scores.float().contiguous()
