"""gradloc: weakly-supervised object localization benchmark for Grad-CAM-family heatmaps on Pascal VOC.

The public API (``from gradloc import ...``) is the few names below; each is loaded from its subpackage when
first used, so ``import gradloc`` stays light (no torch until a torch-backed name is asked for). The package
layout and its layering are in the README's *Design* section.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("gradloc")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

# public name -> the module that defines it
_API = {
    "load_config": "gradloc.run.config",
    "plan_cams": "gradloc.run.cams",
    "open_run": "gradloc.run.folder",
    "VOCDataset": "gradloc.datasets.voc",
    "load_model": "gradloc.models.build",
    "compute_cams": "gradloc.cams.methods",
    "compute_gradient_cams": "gradloc.cams.methods",
    "activations_and_gradients": "gradloc.cams.engine",
    "METHODS": "gradloc.cams.methods",
    "BoxParams": "gradloc.boxes.cut",
    "heatmap_to_boxes": "gradloc.boxes.cut",
    "image_boxes": "gradloc.boxes.cut",
    "Detections": "gradloc.core.formats",
    "GroundTruth": "gradloc.core.formats",
    "evaluate": "gradloc.scoring.voc",
    "map_interval": "gradloc.scoring.bootstrap",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'gradloc' has no attribute {name!r}")
    value = getattr(import_module(_API[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
