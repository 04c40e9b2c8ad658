"""Activation-based methods: CAM (a GAP + linear head's weights) and Score-CAM (masked forward passes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradloc.cams.engine import check_class_range, check_gap_linear, forward_capture, gap_linear_of, run_model


def cam(model: nn.Module, images: Tensor, classes: list[int], layer: tuple[str, nn.Module],
         batch_size: int) -> tuple[Tensor, Tensor]:
    """CAM (Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR 2016).

    ``L^c = ReLU(sum_k w_ck A^k)`` with ``w`` the weights of the linear classifier that follows global
    average pooling of the target layer (``model.gradloc_gap_linear``); the bias is left out.

    Agreement: torchcam's ``CAM`` applies no ReLU (it keeps negative evidence); gradloc's map is the ReLU of
    torchcam's raw map (< 1e-6 relative). pytorch-grad-cam has no plain CAM.
    """
    linear = gap_linear_of(model, layer[1])
    if linear is None:
        spec = getattr(model, "gradloc_gap_linear", None)
        where = (f"its GAP+linear head follows {spec[0]!r}, not {layer[0]!r}" if spec is not None
                 else "it declares none (model.gradloc_gap_linear is unset)")
        raise ValueError(f"CAM needs a global-average-pooling + linear head after the target layer and "
                         f"{type(model).__name__}: {where}; use gradcam or another gradient method")
    activation, scores = forward_capture(model, images, layer, track_grad=False)
    check_gap_linear(linear, activation, scores)
    check_class_range(classes, scores.shape[1])
    weights = linear.weight.detach()[classes].to(activation.dtype)  # [K, C]
    return torch.einsum("kc,bchw->bkhw", weights, activation).relu(), scores


def scorecam(model: nn.Module, images: Tensor, classes: list[int], layer: tuple[str, nn.Module],
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
    activation, scores = forward_capture(model, images, layer, track_grad=False)
    check_class_range(classes, scores.shape[1])
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
            masked_scores[constant] = run_model(model, torch.zeros_like(images[:1]))[:, classes]
        for start in range(0, len(varying), batch_size):
            part = varying[start:start + batch_size]
            upsampled = F.interpolate(flat[part], size=images.shape[2:], mode="bilinear", align_corners=False)
            low = upsampled.amin(dim=(2, 3), keepdim=True)
            span = upsampled.amax(dim=(2, 3), keepdim=True) - low
            masks = torch.where(span > 0, (upsampled - low) / torch.where(span > 0, span, 1.0), 0.0)
            masked_scores[part] = run_model(model, images[image_of[part]] * masks)[:, classes]
    weights = masked_scores.reshape(batch, channels, len(classes)).softmax(dim=1)
    return torch.einsum("bck,bchw->bkhw", weights, activation).relu(), scores
