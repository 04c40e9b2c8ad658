"""Shared fixtures: the real VOC2007 subset (or a skip) and a small synthetic demo dataset and model."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]  # the repository
CONFIGS = ROOT / "configs"
# ../shared/voc/VOCdevkit seen from the repository root, or $GRADLOC_VOC_ROOT (e.g. from a git worktree elsewhere)
VOC_ROOT = Path(os.environ.get("GRADLOC_VOC_ROOT") or ROOT.parent / "shared" / "voc" / "VOCdevkit")

# A shell starts background jobs with SIGINT ignored (`cmd &`), and the interrupt tests assume Python's own
# handler: give it back, so the suite behaves the same in the foreground and in the background.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Parameters of the small demo dataset used by the test suite (a few dozen images, generated in ~0.3 s).
DEMO_SMALL = {"n_train": 24, "n_val": 12, "n_test": 8, "seed": 0}


@pytest.fixture(scope="session")
def voc_root() -> Path:
    """The real VOC2007 train/val subset (VOCdevkit folder); skips the test when it is absent."""
    if not (VOC_ROOT / "VOC2007" / "ImageSets" / "Main").is_dir():
        pytest.skip(f"real VOC2007 subset not found at {VOC_ROOT} (see ../shared/voc/README.md)")
    return VOC_ROOT


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """VOCdevkit folder of a small demo dataset (``DEMO_SMALL``); open with ``VOCDataset(p, year="demo",
    classes=gradloc.datasets.demo.DEMO_CLASSES)``. Shared by the session: do not modify it."""
    from gradloc.datasets.demo import generate_demo

    return generate_demo(tmp_path_factory.mktemp("demo_data"), **DEMO_SMALL)


@pytest.fixture(scope="session")
def demo_checkpoint(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``gradloc.checkpoint/1`` DemoNet trained for 3 epochs at input size 64 on ``demo_data`` (about a
    second; it classifies poorly, use it for plumbing, not for accuracy; runs must use input size 64, the
    checkpoint's). Load with ``gradloc.models.build.load_model("demo_cnn", checkpoint=...)``."""
    from gradloc.models.demo_cnn import train_demo_model

    return train_demo_model(demo_data, tmp_path_factory.mktemp("demo_model") / "demo_cnn.pt", input_size=64,
                            epochs=3, max_seconds=60.0)


@pytest.fixture
def demo_copy(demo_data: Path, tmp_path: Path) -> Path:
    """A private copy of ``demo_data`` (VOCdevkit folder) that the test may edit."""
    import shutil

    return Path(shutil.copytree(demo_data, tmp_path / "data" / "VOCdevkit"))


@pytest.fixture
def cams_config(demo_checkpoint: Path, tmp_path: Path):
    """``cams_config(voc_root, **overrides)``: a RunConfig computing ``demo_checkpoint``'s Grad-CAM maps of
    the val split of a demo VOCdevkit, with cache and outputs under tmp_path."""
    from gradloc.datasets.demo import DEMO_CLASSES
    from gradloc.run.config import load_config

    def make(voc_root: Path, **overrides):
        return load_config(None, {
            "data.voc_root": str(voc_root), "data.year": "demo", "data.split": "val",
            "data.classes": list(DEMO_CLASSES), "model.name": "demo_cnn", "model.checkpoint": str(demo_checkpoint),
            "model.head": "voc", "cache_dir": str(tmp_path / "cache"), "out": str(tmp_path / "results"),
            "name": "t", **overrides})

    return make
