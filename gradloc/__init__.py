"""gradloc: weakly-supervised object localization benchmark for Grad-CAM-family heatmaps on Pascal VOC."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gradloc")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
