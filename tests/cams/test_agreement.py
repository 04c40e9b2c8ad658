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


# --- EigenCAM, eigen_smooth, aug_smooth (pytorch-grad-cam's) ---------------------------------------------------


@pytest.mark.parametrize("case_name", ["tiny", "resnet"])
def test_eigencam_agrees_up_to_the_documented_sign(case_name, request):
    """pytorch-grad-cam leaves the principal component's sign to LAPACK; oriented by gradloc's convention (hot
    where the total activation is) its maps equal gradloc's. Measured: 1.3e-6 (tiny), 3.8e-7 (resnet18)."""
    case = request.getfixturevalue(case_name)
    ours = _ours("eigencam", case)
    assert np.array_equal(ours[:, 0], ours[:, 1])  # class-agnostic
    reference = agreement.pytorch_grad_cam_maps("eigencam", *case)
    assert reference.max() > 0 and agreement.relative_difference(ours, reference) < 1e-5


@pytest.mark.parametrize("method", ["gradcam", "xgradcam", "layercam", "hirescam"])
@pytest.mark.parametrize("case_name", ["tiny", "resnet"])
def test_eigen_smooth_agrees_up_to_the_documented_sign(method, case_name, request):
    """The first principal component of the weighted activations (pytorch-grad-cam's eigen_smooth), oriented to
    agree with the channel sum it replaces. Measured: 2.6e-7 to 1.0e-6."""
    case = request.getfixturevalue(case_name)
    ours = agreement.gradloc_maps(method, *case, eigen_smooth=True)
    reference = agreement.pytorch_grad_cam_maps(method, *case, eigen_smooth=True)
    assert reference.max() > 0 and agreement.relative_difference(ours, reference) < 1e-5
    assert agreement.relative_difference(ours, agreement.pytorch_grad_cam_maps(method, *case)) > 1e-3  # smoothed


@pytest.mark.parametrize("case_name", ["tiny", "resnet"])
def test_aug_smooth_per_pass_maps_rebuild_the_library_output(case_name, request):
    """pytorch-grad-cam's aug_smooth output (6 passes, each rectified, min-max normalised and resized, then
    averaged) rebuilt from gradloc's raw maps of each pass: equal to float rounding (measured 1.4e-7 / 2.1e-7).
    gradloc's own stored map averages the passes at the layer's resolution, each scaled to max 1: resized and
    normalised like one library map it differs by 0.086 (tiny CNN) and 0.003 (resnet18) of the peak."""
    case = request.getfixturevalue(case_name)
    rows = {r["method"]: r["difference"] for r in agreement.aug_smooth_rows(case_name, case)}
    assert rows["gradcam + aug_smooth (library's averaging)"] < 1e-6
    assert 1e-4 < rows["gradcam + aug_smooth (gradloc's map)"] < {"tiny": 0.1, "resnet": 0.01}[case_name]


def test_aug_smooth_averages_the_six_scaled_passes_mirrored_back(resnet):
    from gradloc.cams.methods import TEST_TIME_AUGMENTATIONS, compute_cams

    model, layer, images, classes = resnet
    maps, scores = compute_cams(model, images, classes, layer=layer, aug_smooth=True)
    passes = TEST_TIME_AUGMENTATIONS["aug_smooth"].passes
    assert passes == ((False, 0.9), (False, 1.0), (False, 1.1), (True, 0.9), (True, 1.0), (True, 1.1))
    total = 0
    for mirrored, factor in passes:
        one, _ = compute_cams(model, (images.flip(3) if mirrored else images) * factor, classes, layer=layer)
        one = one / one.amax(dim=(-2, -1), keepdim=True)
        total = total + (one.flip(3) if mirrored else one)
    torch.testing.assert_close(maps, total / 6, rtol=1e-6, atol=1e-7)
    assert maps.amax() <= 1.0
    torch.testing.assert_close(scores, model(images))  # the scores of the plain image


@pytest.mark.slow
def test_aug_smooth_on_a_real_network_matches_the_library_output():
    """On EfficientNet-Lite0 (ImageNet weights, packaged) and a real photograph, gradloc's stored aug_smooth map,
    resized and normalised as the library does with one map, equals pytorch-grad-cam's aug_smooth output
    (rescaled to max 1) to 1e-4 (measured 4.6e-6): the per-pass scaling at the layer's resolution is the
    library's equal-vote average."""
    skimage = pytest.importorskip("skimage")
    from PIL import Image

    from gradloc.datasets.voc import VOC_CLASSES
    from gradloc.models.build import load_model

    loaded = load_model("efficientnet_lite0", head="imagenet")
    images, _ = loaded.preprocessing.batch([Image.fromarray(skimage.data.chelsea())])
    classes = [VOC_CLASSES.index("cat"), VOC_CLASSES.index("dog")]
    reference = agreement.pytorch_grad_cam_aug_smooth("gradcam", loaded.model, "bn2", images, classes)
    ours = agreement.library_normalised(agreement.gradloc_maps("gradcam", loaded.model, "bn2", images, classes,
                                                               aug_smooth=True), tuple(images.shape[2:]))
    rescaled = reference / reference.max(axis=(-2, -1), keepdims=True)
    assert agreement.relative_difference(ours, rescaled) < 1e-4
