"""Baselines of the box stage: boxes that keep the CAM row's classes and confidences and change only where the
box is."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from gradloc.core.geometry import Geometry, grid_boxes_to_voc


def _baseline_center(geometry: Geometry) -> np.ndarray:
    """The middle half of the image: continuous ``[W/4, 3W/4) x [H/4, 3H/4)`` covered by whole pixels, i.e.
    ``[⌊W/4⌋ + 1, ⌊H/4⌋ + 1, ⌈3W/4⌉, ⌈3H/4⌉]`` (500x375 -> [126, 94, 375, 282])."""
    w, h = geometry.width, geometry.height
    return grid_boxes_to_voc(np.array([[w / 4, h / 4, 3 * w / 4, 3 * h / 4]]), w, h, w, h)[0]


def _baseline_full(geometry: Geometry) -> np.ndarray:
    """The whole image: ``[1, 1, W, H]``."""
    return np.array([1.0, 1.0, geometry.width, geometry.height])


BASELINES: dict[str, Callable[[Geometry], np.ndarray]] = {
    "center": _baseline_center,
    "full": _baseline_full,
}


def random_maps(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Maps for the random-heatmap baseline: i.i.d. uniform noise in [0, 1) at feature resolution.

    Noise on the feature grid becomes smooth blobs once bilinearly back-projected onto the image.

    Args:
        shape: e.g. ``(K, h, w)`` (the shape of the real maps it replaces).
        seed: seed of ``numpy.random.default_rng``; same seed, same maps.
    Returns:
        float32[*shape].
    """
    return np.random.default_rng(seed).random(shape, dtype=np.float32)
