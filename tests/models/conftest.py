"""Shared by the model tests: no torch hub cache (every test sees an empty one), small inputs and checkpoint
metadata."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import ResNet18_Weights

from gradloc.models.build import build_architecture
from tests.conftest import VOC_ROOT

needs_voc = pytest.mark.skipif(not (VOC_ROOT / "VOC2007").is_dir(),
                               reason=f"real VOC subset not found at {VOC_ROOT}")


IMAGENET_NAMES = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]


@pytest.fixture(autouse=True)
def _no_hub_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test sees an empty torch hub cache of its own (no test may depend on downloaded files)."""
    home = tmp_path_factory.mktemp("torch_home")
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def _inputs(size: int = 64, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _meta(arch: str, classes: list[str], **overrides: object) -> dict:
    meta = {"arch": arch, "arch_kwargs": {}, "weights": None, "head": "voc", "classes": classes,
            "input_size": 64, "resize_mode": "letterbox", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
            "train": {"split": "train"}, "git_commit": None}
    meta.update(overrides)
    return meta


def _random_voc_resnet18(classes: list[str], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_architecture("resnet18", head="voc", classes=classes)
