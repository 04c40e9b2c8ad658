"""Pixel-level methods for pictures: Guided Backprop and Guided Grad-CAM."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradloc.cams.engine import batched_vjp, check_class_range, onehot, run_model
from gradloc.cams.gradient import gradcam_map, gradient_method
from gradloc.cams.hooks import forward_hooks

logger = logging.getLogger(__name__)

def _clamp_negative(grad: Tensor) -> Tensor:
    return grad.clamp(min=0)


def _guide_relu(module: nn.Module, inputs: object, output: Tensor) -> None:
    """Forward hook on an ``nn.ReLU``: clamp the gradient reaching its output to >= 0 (guided backprop)."""
    if output.requires_grad:
        output.register_hook(_clamp_negative)


def guided_backprop(model: nn.Module, images: Tensor, classes: list[int],
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
    with forward_hooks([(relu, _guide_relu) for relu in relus]), torch.enable_grad():
        scores = run_model(model, inputs)
        check_class_range(classes, scores.shape[1])
        step = max(1, batch_size // images.shape[0])
        maps = []
        for start in range(0, len(classes), step):
            chunk = classes[start:start + step]
            grads = batched_vjp(scores, inputs, onehot(chunk, scores), retain_graph=start + step < len(classes))
            if grads is None:
                raise ValueError(f"the output of {type(model).__name__} does not depend on its input")
            maps.append(grads.abs().amax(dim=2).transpose(0, 1))  # [B, k, H, W]
    return torch.cat(maps, dim=1), scores.detach()


def guided_gradcam(model: nn.Module, images: Tensor, classes: list[int], layer: tuple[str, nn.Module],
                    batch_size: int) -> tuple[Tensor, Tensor]:
    """Guided Grad-CAM (Selvaraju et al., ICCV 2017, Sec. 3.1).

    ``Guided Backprop map * Up(Grad-CAM map)``: the layer-resolution Grad-CAM map is upsampled bilinearly
    (``align_corners=False``) to the input size and multiplied element-wise with the Guided Backprop map
    (``max over colour channels of |R_in|``, see guided_backprop), ``[B, K, H, W]``.
    """
    cams, scores = gradient_method(gradcam_map, model, images, classes, layer, batch_size)
    guided, _ = guided_backprop(model, images, classes, None, batch_size)
    upsampled = F.interpolate(cams, size=images.shape[2:], mode="bilinear", align_corners=False)
    return upsampled * guided, scores
