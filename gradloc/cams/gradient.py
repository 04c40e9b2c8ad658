"""Gradient methods: (activations A [B, C, h, w], gradients G [K, B, C, h, w]) -> maps [B, K, h, w].

Each method weighs the activations, per channel (``w^c_k A^k``: Grad-CAM, Grad-CAM++, XGrad-CAM) or per cell
(``W^c_kij A^k_ij``: LayerCAM, HiResCAM), and sums over channels. With ``eigen_smooth`` (pytorch-grad-cam's
option of that name) the channel sum is replaced by the first principal component of the weighted activations
(:func:`gradloc.cams.eigen.principal_component_map`, with its sign convention), before the ReLU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from gradloc.cams.eigen import principal_component_map
from gradloc.cams.engine import layer_activations_and_gradients


def _combine(weights: Tensor, activation: Tensor, eigen_smooth: bool = False) -> Tensor:
    """``ReLU(sum_k weights[k, b, c] A[b, c])`` for channel weights ``[K, B, C]``, ``ReLU(sum_c weights[k, b, c, i,
    j] A[b, c, i, j])`` for cell weights ``[K, B, C, h, w]``; with ``eigen_smooth`` the ReLU of the first principal
    component of the weighted activations instead of their channel sum (one image at a time, so the
    ``[K, C, h, w]`` weighted activations of one image are all that is held).

    Args:
        weights: ``[K, B, C]`` or ``[K, B, C, h, w]``. activation: ``[B, C, h, w]``.

    Returns:
        ``[B, K, h, w]``.
    """
    if eigen_smooth:
        cells = weights if weights.ndim == 5 else weights[..., None, None]
        return torch.stack([principal_component_map(cells[:, b] * activation[b]) for b in range(len(activation))]
                           ).relu()
    if weights.ndim == 3:
        return torch.einsum("kbc,bchw->bkhw", weights, activation).relu()
    return (weights * activation).sum(dim=2).relu().transpose(0, 1)


def gradcam_map(activation: Tensor, grads: Tensor, eigen_smooth: bool = False) -> Tensor:
    """Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
    Localization", ICCV 2017).

    ``alpha_k^c = (1/Z) sum_ij g^{kc}_ij``, ``L^c = ReLU(sum_k alpha_k^c A^k)``.

    With a GAP+linear head ``g^{kc}_ij = w_ck / Z`` so ``alpha_k^c = w_ck / Z`` and Grad-CAM = CAM / Z.

    Agreement: equal to pytorch-grad-cam's and torchcam's ``GradCAM`` to float32 rounding (largest relative
    difference < 1e-6; ``tests/test_agreement.py``, ``scripts/agreement.py``).

    Args:
        activation: ``[B, C, h, w]``. grads: ``[K, B, C, h, w]``. eigen_smooth: the first principal component of the
            weighted activations instead of their channel sum (module docstring).

    Returns:
        ``[B, K, h, w]``, same dtype.
    """
    return _combine(grads.mean(dim=(-2, -1)), activation, eigen_smooth)


def gradcampp_map(activation: Tensor, grads: Tensor, eigen_smooth: bool = False) -> Tensor:
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
        activation: ``[B, C, h, w]``. grads: ``[K, B, C, h, w]``. eigen_smooth: the first principal component of the
            weighted activations instead of their channel sum (module docstring).

    Returns:
        ``[B, K, h, w]``, same dtype.
    """
    totals = activation.sum(dim=(-2, -1))[..., None, None]  # [B, C, 1, 1]
    denominator = torch.addcmul(torch.full((), 2.0, dtype=grads.dtype, device=grads.device), totals, grads)
    # ReLU(g) / denominator; x/0 (inf or nan) only where the denominator is 0, which contributes 0
    ratio = grads.clamp(min=0).div_(denominator).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    return _combine(ratio.sum(dim=(-2, -1)), activation, eigen_smooth)


def xgradcam_map(activation: Tensor, grads: Tensor, eigen_smooth: bool = False) -> Tensor:
    """XGrad-CAM (Fu et al., "Axiom-based Grad-CAM: Towards Accurate Visualization and Explanation of CNNs",
    BMVC 2020).

    ``alpha_k^c = sum_ij (A^k_ij / sum_ab A^k_ab) g^{kc}_ij`` (0 when ``sum_ab A^k_ab = 0``),
    ``L^c = ReLU(sum_k alpha_k^c A^k)``.

    Agreement: equal to pytorch-grad-cam's and torchcam's ``XGradCAM`` to float32 rounding (< 1e-6 relative;
    pytorch-grad-cam's ``1e-7`` in the denominator does not show at these activations).

    Args:
        activation: ``[B, C, h, w]``. grads: ``[K, B, C, h, w]``. eigen_smooth: the first principal component of the
            weighted activations instead of their channel sum (module docstring).

    Returns:
        ``[B, K, h, w]``, same dtype.
    """
    totals = activation.sum(dim=(-2, -1))  # [B, C]
    weighted = torch.einsum("kbchw,bchw->kbc", grads, activation)
    alpha = torch.where(totals != 0, weighted / torch.where(totals != 0, totals, 1.0), 0.0)
    return _combine(alpha, activation, eigen_smooth)


def layercam_map(activation: Tensor, grads: Tensor, eigen_smooth: bool = False) -> Tensor:
    """LayerCAM (Jiang et al., "LayerCAM: Exploring Hierarchical Class Activation Maps for Localization",
    IEEE TIP 2021).

    ``L^c_ij = ReLU(sum_k ReLU(g^{kc}_ij) A^k_ij)``.

    Agreement: equal to pytorch-grad-cam's and torchcam's ``LayerCAM`` to float32 rounding (< 1e-6 relative).

    Args:
        activation: ``[B, C, h, w]``. grads: ``[K, B, C, h, w]``. eigen_smooth: the first principal component of the
            weighted activations instead of their channel sum (module docstring).

    Returns:
        ``[B, K, h, w]``, same dtype.
    """
    return _combine(grads.relu(), activation, eigen_smooth)


def hirescam_map(activation: Tensor, grads: Tensor, eigen_smooth: bool = False) -> Tensor:
    """HiResCAM (Draelos & Carin, "Use HiResCAM instead of Grad-CAM for faithful explanations of
    convolutional neural networks", arXiv:2011.08891, 2020).

    ``L^c_ij = ReLU(sum_k g^{kc}_ij A^k_ij)`` (element-wise product instead of Grad-CAM's averaged gradient).

    Agreement: equal to pytorch-grad-cam's ``HiResCAM`` to float32 rounding (< 1e-6 relative); torchcam has
    no HiResCAM.

    Args:
        activation: ``[B, C, h, w]``. grads: ``[K, B, C, h, w]``. eigen_smooth: the first principal component of the
            weighted activations instead of their channel sum (module docstring).

    Returns:
        ``[B, K, h, w]``, same dtype.
    """
    return _combine(grads, activation, eigen_smooth)


GradientMap = Callable[..., Tensor]  # (activation, grads, eigen_smooth=False) -> maps


GRADIENT_MAPS: dict[str, GradientMap] = {
    "gradcam": gradcam_map,
    "gradcampp": gradcampp_map,
    "xgradcam": xgradcam_map,
    "layercam": layercam_map,
    "hirescam": hirescam_map,
}
"""The methods that combine one layer's activations and gradients: :func:`compute_gradient_cams` computes any
set of them from a single forward/backward pass."""


GRADIENT_CITATIONS = {
    "gradcam": "Selvaraju et al., ICCV 2017",
    "gradcampp": "Chattopadhay et al., WACV 2018",
    "xgradcam": "Fu et al., BMVC 2020",
    "layercam": "Jiang et al., IEEE TIP 2021",
    "hirescam": "Draelos & Carin, arXiv:2011.08891",
}


def gradient_method(combine: GradientMap, model: nn.Module, images: Tensor, classes: list[int],
                     layer: tuple[str, nn.Module], batch_size: int, eigen_smooth: bool = False
                     ) -> tuple[Tensor, Tensor]:
    activation, grads, scores = layer_activations_and_gradients(model, images, classes, layer)
    return combine(activation, grads, eigen_smooth), scores
