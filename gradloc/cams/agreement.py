"""Agreement of gradloc's CAM methods with pytorch-grad-cam and torchcam (same model, layer, classes, inputs).

For each method, the raw maps (at the target layer's resolution, before any normalisation) of gradloc and of
each library are compared as ``max |gradloc - library| / max |library|`` over images and classes (the
largest difference, relative to the library map's peak). Library raw maps: pytorch-grad-cam's
``get_cam_image`` on its own hooked activations/gradients, followed by the ReLU its ``forward`` applies;
torchcam's ``compute_cams(..., normalized=False)`` (its ReLU where the method has one). Guided Backprop is
compared at the input resolution (``max over colours of |gradient|``), against pytorch-grad-cam's
``GuidedBackpropReLUModel`` (one image at a time).

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

from gradloc.cams.methods import compute_cams

LIBRARY_METHODS = {  # gradloc method -> (pytorch-grad-cam class name or None, torchcam class name or None)
    "cam": (None, "CAM"),
    "gradcam": ("GradCAM", "GradCAM"),
    "gradcampp": ("GradCAMPlusPlus", "GradCAMpp"),
    "xgradcam": ("XGradCAM", "XGradCAM"),
    "layercam": ("LayerCAM", "LayerCAM"),
    "hirescam": ("HiResCAM", None),
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


def pytorch_grad_cam_maps(method: str, model: nn.Module, layer: str, images: torch.Tensor,
                          classes: list[int]) -> np.ndarray:
    """Raw maps [B, K, h, w] (or [B, K, H, W] for guided backprop) from pytorch-grad-cam."""
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
            raw = cam.get_cam_image(images, target_layer, targets, activations, grads, False)
            maps.append(np.maximum(raw, 0))
    return np.stack(maps, axis=1)


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


def gradloc_maps(method: str, model: nn.Module, layer: str, images: torch.Tensor, classes: list[int]) -> np.ndarray:
    maps, _ = compute_cams(model, images, classes, method=method, layer=layer)
    return maps.numpy()


def relative_difference(ours: np.ndarray, reference: np.ndarray) -> float:
    """``max |ours - reference| / max |reference|``."""
    return float(np.abs(ours - reference).max() / max(np.abs(reference).max(), 1e-30))


def agreement_rows(case_name: str, case: tuple[nn.Module, str, torch.Tensor, list[int]]) -> list[dict[str, object]]:
    """One row per (method, library) with the measured largest relative difference."""
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
    return rows
