"""Agreement of gradloc's CAM methods with pytorch-grad-cam and torchcam (same model, layer, classes, inputs).

For each method, the raw maps (at the target layer's resolution, before any normalisation) of gradloc and of
each library are compared as ``max |gradloc - library| / max |library|`` over images and classes (the
largest difference, relative to the library map's peak). Library raw maps: pytorch-grad-cam's
``get_cam_image`` on its own hooked activations/gradients, followed by the ReLU its ``forward`` applies;
torchcam's ``compute_cams(..., normalized=False)`` (its ReLU where the method has one). Guided Backprop is
compared at the input resolution (``max over colours of |gradient|``), against pytorch-grad-cam's
``GuidedBackpropReLUModel`` (one image at a time).

First-principal-component maps (EigenCAM, ``eigen_smooth``) have no sign of their own and pytorch-grad-cam
leaves it to LAPACK; its maps are compared after orienting them by gradloc's convention (:func:`oriented`,
:mod:`gradloc.cams.eigen`). ``aug_smooth`` is compared pass by pass (the raw maps of each augmented input are
the library's) and through the library's own post-processing (:func:`aug_smooth_like_library`): gradloc
averages raw maps where the library averages normalised ones, a documented difference.

Models: a seeded two-conv CNN (``tiny``) and torchvision's resnet18 with seeded random weights at ``layer4``
(no download).

The libraries (test extras of gradloc: ``pip install -e '.[test]'``) are imported when a function needs
them. ``python scripts/agreement.py`` prints the README's table; ``tests/cams/test_agreement.py`` asserts it.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from gradloc.cams.gradient import GRADIENT_MAPS
from gradloc.cams.methods import TEST_TIME_AUGMENTATIONS, compute_cams

LIBRARY_METHODS = {  # gradloc method -> (pytorch-grad-cam class name or None, torchcam class name or None)
    "cam": (None, "CAM"),
    "gradcam": ("GradCAM", "GradCAM"),
    "gradcampp": ("GradCAMPlusPlus", "GradCAMpp"),
    "xgradcam": ("XGradCAM", "XGradCAM"),
    "layercam": ("LayerCAM", "LayerCAM"),
    "hirescam": ("HiResCAM", None),
    "eigencam": ("EigenCAM", None),
    "scorecam": ("ScoreCAM", "ScoreCAM"),
    "guided_backprop": ("GuidedBackpropReLUModel", None),
}


class TinyNet(nn.Module):
    """Two convolutions, ReLU, global average pooling and a linear head (declared for CAM)."""

    gradloc_gap_linear = ("features.3", "fc")

    def __init__(self, n_classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2,
                                                                                           padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def tiny_case(seed: int = 0) -> tuple[nn.Module, str, torch.Tensor, list[int]]:
    """(model, layer name, images, classes) of the tiny CNN: 2 images 32x32, classes 0, 3."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TinyNet().eval()
    images = torch.randn(2, 3, 32, 32, generator=generator)
    return model, "features.3", images, [0, 3]


def resnet_case(seed: int = 0) -> tuple[nn.Module, str, torch.Tensor, list[int]]:
    """torchvision resnet18, seeded random weights (no download), layer4, one 96x96 image, classes 1, 7."""
    from torchvision.models import resnet18

    torch.manual_seed(seed)
    model = resnet18(weights=None, num_classes=10).eval()
    model.gradloc_gap_linear = ("layer4", "fc")
    images = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(seed))
    return model, "layer4", images, [1, 7]


def _module(model: nn.Module, name: str) -> nn.Module:
    return dict(model.named_modules())[name]


def oriented(projection: np.ndarray, plain: np.ndarray) -> np.ndarray:
    """First-principal-component maps ``[B, h, w]`` oriented by gradloc's sign convention
    (:mod:`gradloc.cams.eigen`): each map times the sign of its correlation with ``plain`` (the map the projection
    replaces), or, when that is 0, the sign of its value of largest magnitude."""
    flat, reference = projection.reshape(len(projection), -1), plain.reshape(len(plain), -1)
    agreement = (flat * reference).sum(axis=1)
    peak = flat[np.arange(len(flat)), np.abs(flat).argmax(axis=1)]
    sign = np.where(agreement != 0, np.sign(agreement), np.sign(peak))
    return projection * sign[:, None, None]


def pytorch_grad_cam_maps(method: str, model: nn.Module, layer: str, images: torch.Tensor,
                          classes: list[int], eigen_smooth: bool = False) -> np.ndarray:
    """Raw maps [B, K, h, w] (or [B, K, H, W] for guided backprop) from pytorch-grad-cam: the ReLU of its
    ``get_cam_image``; EigenCAM's and ``eigen_smooth``'s projections :func:`oriented` first."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    name = LIBRARY_METHODS[method][0]
    if method == "guided_backprop":
        out = np.zeros((images.shape[0], len(classes), *images.shape[2:]), dtype=np.float32)
        for b in range(images.shape[0]):
            for k, c in enumerate(classes):
                guided = pytorch_grad_cam.GuidedBackpropReLUModel(copy.deepcopy(model), device="cpu")
                out[b, k] = np.abs(guided(images[b : b + 1].clone(), target_category=c)).max(axis=2)
        return out
    maps = []
    target_layer = _module(model, layer)
    for c in classes:
        with getattr(pytorch_grad_cam, name)(model=model, target_layers=[target_layer]) as cam:
            targets = [ClassifierOutputTarget(c) for _ in range(images.shape[0])]
            cam(input_tensor=images, targets=targets)
            activations = cam.activations_and_grads.activations[0].cpu().numpy()
            grads = (cam.activations_and_grads.gradients[0].cpu().numpy()
                     if cam.activations_and_grads.gradients else None)
            raw = cam.get_cam_image(images, target_layer, targets, activations, grads, eigen_smooth)
            if method == "eigencam" or eigen_smooth:
                plain = (activations.sum(axis=1) if method == "eigencam"
                         else cam.get_cam_image(images, target_layer, targets, activations, grads, False))
                raw = oriented(raw, plain)
            maps.append(np.maximum(raw, 0))
    return np.stack(maps, axis=1)


def pytorch_grad_cam_aug_smooth(method: str, model: nn.Module, layer: str, images: torch.Tensor,
                                classes: list[int]) -> np.ndarray:
    """pytorch-grad-cam's output with ``aug_smooth=True``: float32 [B, K, H, W] at the input size, each pass
    rectified, min-max normalised and resized before the six are averaged."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    maps = []
    for c in classes:
        with getattr(pytorch_grad_cam, LIBRARY_METHODS[method][0])(model=model,
                                                                    target_layers=[_module(model, layer)]) as cam:
            maps.append(cam(input_tensor=images, targets=[ClassifierOutputTarget(c)] * len(images), aug_smooth=True))
    return np.stack(maps, axis=1)


def library_normalised(raw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """pytorch-grad-cam's post-processing of raw maps [B, K, h, w] of one layer, to [B, K, H, W] (``size`` =
    (H, W)): ReLU, min-max normalisation and resize to the input (``scale_cam_image``), then ReLU and min-max
    again (``aggregate_multi_layers``)."""
    from pytorch_grad_cam.utils.image import scale_cam_image

    out = [scale_cam_image(np.maximum(scale_cam_image(np.maximum(raw[:, k], 0), (size[1], size[0])), 0))
           for k in range(raw.shape[1])]
    return np.stack(out, axis=1)


def aug_smooth_like_library(method: str, model: nn.Module, layer: str, images: torch.Tensor,
                            classes: list[int]) -> np.ndarray:
    """pytorch-grad-cam's ``aug_smooth`` output rebuilt from gradloc's raw maps of the six passes
    (:data:`gradloc.cams.methods.TEST_TIME_AUGMENTATIONS`): each pass's maps normalised as the library does
    (:func:`library_normalised`), mirrored back, averaged. [B, K, H, W]."""
    size = tuple(images.shape[2:])
    passes = TEST_TIME_AUGMENTATIONS["aug_smooth"].passes
    total = 0.0
    for mirrored, factor in passes:
        inputs = (images.flip(3) if mirrored else images) * factor
        normalised = library_normalised(gradloc_maps(method, model, layer, inputs, classes), size)
        total = total + (normalised[..., ::-1] if mirrored else normalised)
    return (total / len(passes)).astype(np.float32)


def torchcam_maps(method: str, model: nn.Module, layer: str, images: torch.Tensor, classes: list[int]) -> np.ndarray:
    """Raw maps [B, K, h, w] from torchcam (``normalized=False``)."""
    import torchcam.methods

    maps = []
    for c in classes:
        extractor = getattr(torchcam.methods, LIBRARY_METHODS[method][1])(
            model, target_layer=layer, input_shape=tuple(images.shape[1:]),
            **({"fc_layer": "fc"} if method == "cam" else {}))
        try:
            with torch.set_grad_enabled(method not in ("cam", "scorecam")):
                scores = model(images)
            maps.append(extractor(c, scores, normalized=False)[0].detach().numpy())
        finally:
            extractor.remove_hooks()
    return np.stack(maps, axis=1)


def gradloc_maps(method: str, model: nn.Module, layer: str, images: torch.Tensor, classes: list[int],
                 **options: bool) -> np.ndarray:
    """gradloc's raw maps (``options``: ``eigen_smooth``, ``aug_smooth`` of :func:`compute_cams`)."""
    maps, _ = compute_cams(model, images, classes, method=method, layer=layer, **options)
    return maps.numpy()


def relative_difference(ours: np.ndarray, reference: np.ndarray) -> float:
    """``max |ours - reference| / max |reference|``."""
    return float(np.abs(ours - reference).max() / max(np.abs(reference).max(), 1e-30))


def agreement_rows(case_name: str, case: tuple[nn.Module, str, torch.Tensor, list[int]]) -> list[dict[str, object]]:
    """One row per (method, library) with the measured largest relative difference; then pytorch-grad-cam's
    ``eigen_smooth`` for each gradient method, and ``aug_smooth`` of Grad-CAM against the library's output:
    gradloc's per-pass maps through the library's post-processing (``library's averaging``: the semantics
    reproduced exactly), and gradloc's own stored map resized and min-max normalised as the library does with
    one map (``gradloc's map``: averaged at the layer's resolution, so not equal on small random networks)."""
    model, layer, images, classes = case
    rows = []
    for method, (grad_cam_name, torchcam_name) in LIBRARY_METHODS.items():
        ours = gradloc_maps(method, model, layer, images, classes)
        for library, available, function in (("pytorch-grad-cam", grad_cam_name, pytorch_grad_cam_maps),
                                             ("torchcam", torchcam_name, torchcam_maps)):
            if available is None:
                continue
            reference = function(method, model, layer, images, classes)
            rows.append({"model": case_name, "method": method, "library": library,
                         "difference": relative_difference(ours, reference)})
    for method in GRADIENT_MAPS:
        ours = gradloc_maps(method, model, layer, images, classes, eigen_smooth=True)
        reference = pytorch_grad_cam_maps(method, model, layer, images, classes, eigen_smooth=True)
        rows.append({"model": case_name, "method": f"{method} + eigen_smooth", "library": "pytorch-grad-cam",
                     "difference": relative_difference(ours, reference)})
    return rows + aug_smooth_rows(case_name, case)


def aug_smooth_rows(case_name: str, case: tuple[nn.Module, str, torch.Tensor, list[int]]) -> list[dict[str, object]]:
    """The two ``aug_smooth`` rows of :func:`agreement_rows` (Grad-CAM)."""
    model, layer, images, classes = case
    rows = []
    reference = pytorch_grad_cam_aug_smooth("gradcam", model, layer, images, classes)
    rebuilt = aug_smooth_like_library("gradcam", model, layer, images, classes)
    stored = library_normalised(gradloc_maps("gradcam", model, layer, images, classes, aug_smooth=True),
                                tuple(images.shape[2:]))
    rescaled = reference / reference.max(axis=(-2, -1), keepdims=True)  # the library's mean is not rescaled
    for label, ours, theirs in (("library's averaging", rebuilt, reference), ("gradloc's map", stored, rescaled)):
        rows.append({"model": case_name, "method": f"gradcam + aug_smooth ({label})", "library": "pytorch-grad-cam",
                     "difference": relative_difference(ours, theirs)})
    return rows
