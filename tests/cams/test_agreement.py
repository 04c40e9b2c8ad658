"""gradloc's CAM methods against pytorch-grad-cam and torchcam: the measured largest differences, and each
convention where they differ, reproduced from gradloc's own activations and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradloc.cams.engine import activations_and_gradients

pytest.importorskip("pytorch_grad_cam")
pytest.importorskip("torchcam")

from gradloc.cams import agreement


@pytest.fixture(scope="module")
def tiny():
    return agreement.tiny_case(0)


@pytest.fixture(scope="module")
def resnet():
    return agreement.resnet_case(0)


def _ours(method, case):
    return agreement.gradloc_maps(method, *case)


# Measured largest relative differences (scripts/agreement.py): float32 rounding only.
AGREE = [
    ("gradcam", "pytorch-grad-cam"), ("gradcam", "torchcam"),
    ("xgradcam", "pytorch-grad-cam"), ("xgradcam", "torchcam"),
    ("layercam", "pytorch-grad-cam"), ("layercam", "torchcam"),
    ("hirescam", "pytorch-grad-cam"),
]
LIBRARIES = {"pytorch-grad-cam": agreement.pytorch_grad_cam_maps, "torchcam": agreement.torchcam_maps}


@pytest.mark.parametrize(("method", "library"), AGREE)
@pytest.mark.parametrize("case_name", ["tiny", "resnet"])
def test_gradient_methods_agree_to_float_rounding(method, library, case_name, request):
    case = request.getfixturevalue(case_name)
    reference = LIBRARIES[library](method, *case)
    assert np.abs(reference).max() > 0
    assert agreement.relative_difference(_ours(method, case), reference) < 2e-6


def test_guided_backprop_agrees_with_pytorch_grad_cam(tiny):
    reference = agreement.pytorch_grad_cam_maps("guided_backprop", *tiny)
    assert agreement.relative_difference(_ours("guided_backprop", tiny), reference) < 2e-6


def test_cam_torchcam_applies_no_relu(tiny):
    """Agreement convention: torchcam's CAM is ``sum_k w_ck A^k`` without the ReLU; gradloc's = its ReLU."""
    reference = agreement.torchcam_maps("cam", *tiny)
    assert reference.min() < 0  # negative evidence kept by torchcam
    assert agreement.relative_difference(_ours("cam", tiny), np.maximum(reference, 0)) < 2e-6


def _gradcampp_from(activation: torch.Tensor, grads: torch.Tensor, alpha) -> np.ndarray:
    """``ReLU(sum_k (sum_ij alpha_ij ReLU(g_ij)) A^k)`` for a given alpha rule; [B, K, h, w]."""
    a = activation.double()[None]
    g = grads.double()
    weights = (alpha(a, g) * g.clamp(min=0)).sum(dim=(-2, -1))  # [K, B, C]
    return torch.einsum("kbc,bchw->bkhw", weights, activation.double()).relu().numpy()


@pytest.mark.parametrize("case_name", ["tiny", "resnet"])
def test_gradcampp_pytorch_grad_cam_adds_eps_to_the_denominator(case_name, request):
    """Agreement convention: pytorch-grad-cam's alpha is ``g^2 / (2 g^2 + sum(A) g^3 + 1e-6)``."""
    case = request.getfixturevalue(case_name)
    model, layer, images, classes = case
    activation, grads, _ = activations_and_gradients(model, images, classes, layer)
    totals = activation.double().sum(dim=(-2, -1))[None, ..., None, None]

    def with_eps(a, g):
        return torch.where(g != 0, g**2 / (2 * g**2 + totals * g**3 + 1e-6), 0.0)

    reference = agreement.pytorch_grad_cam_maps("gradcampp", *case)
    assert agreement.relative_difference(_gradcampp_from(activation, grads, with_eps), reference) < 1e-4
    assert agreement.relative_difference(_ours("gradcampp", case), reference) > 1e-2  # measured 1.0 / 0.088


@pytest.mark.parametrize("case_name", ["tiny", "resnet"])
def test_gradcampp_torchcam_alpha_stays_squared_gradient(case_name, request):
    """Agreement convention: torchcam divides a boolean-indexed copy of ``g^2`` in place, so alpha stays
    ``g^2`` and its weight is ``sum_ij g_ij^2 ReLU(g_ij)``."""
    case = request.getfixturevalue(case_name)
    model, layer, images, classes = case
    activation, grads, _ = activations_and_gradients(model, images, classes, layer)
    reference = agreement.torchcam_maps("gradcampp", *case)
    assert agreement.relative_difference(_gradcampp_from(activation, grads, lambda a, g: g**2), reference) < 1e-4
    assert agreement.relative_difference(_ours("gradcampp", case), reference) > 1.0  # measured 8.8e5 / 4.0e4


def test_scorecam_differs_only_through_mask_upsampling(tiny):
    """Agreement convention: pytorch-grad-cam upsamples masks with ``align_corners=True``; torchcam
    normalises the channel at layer resolution and then upsamples; gradloc upsamples (``align_corners=False``)
    then normalises. Measured on the tiny CNN: 1.1e-3 and 1.8e-3 (resnet18 layer4: 2.7e-2 and 8.4e-4)."""
    for library, measured in (("pytorch-grad-cam", 1.1e-3), ("torchcam", 1.8e-3)):
        difference = agreement.relative_difference(_ours("scorecam", tiny), LIBRARIES[library]("scorecam", *tiny))
        assert 1e-5 < difference < 2 * measured
