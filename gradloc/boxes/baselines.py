"""Baselines of the box stage: detections with the CAM row's classes and class probabilities whose boxes come
from somewhere else, so that a CAM row is judged against boxes that carry no localization from its maps.

* Box baselines (:data:`BOX_BASELINES`, threshold-free, confidence = the class probability):
  ``center`` -- a box centred in the image covering the fraction ``size`` of its width and of its height
  (``boxes.center_size``; tune it on another split than the one reported, as τ), ``full`` -- the whole image.
* Map baselines (:data:`MAP_BASELINES`): a stand-in map on the working grid, cut exactly like the CAM at every
  τ with the CAM's box mode and confidence rule: ``shuffled`` -- the map of the same class in another image
  (a seeded derangement of the images), laid over this image in relative coordinates; ``blob`` -- a Gaussian
  with the CAM map's own spread (its heat-weighted standard deviation along x and y on the grid) centred at a
  uniformly random cell.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from gradloc.core.geometry import Geometry, grid_boxes_to_voc


def center_box(geometry: Geometry, size: float) -> np.ndarray:
    """The centred box covering the fraction ``size`` of the image's width and height: the continuous range
    ``[(1 - size) W / 2, (1 + size) W / 2)`` (likewise for y) covered by whole pixels, as VOC
    ``[x1, y1, x2, y2]`` (500x375 at size 0.5 -> [126, 94, 375, 282]; size 1 -> the whole image).

    Raises:
        ValueError: ``size`` outside (0, 1].
    """
    if not 0.0 < size <= 1.0:
        raise ValueError(f"center box size {size!r} must be in (0, 1] (a fraction of the image's width and height)")
    w, h = geometry.width, geometry.height
    low, high = (1.0 - size) / 2, (1.0 + size) / 2
    return grid_boxes_to_voc(np.array([[low * w, low * h, high * w, high * h]]), w, h, w, h)[0]


# name -> (geometry, boxes.center_size) -> one VOC box for every explained class of the image
BOX_BASELINES: dict[str, Callable[[Geometry, float], np.ndarray]] = {
    "center": center_box,
    "full": lambda geometry, size: center_box(geometry, 1.0),
}


def blob_heat(heat: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blobs with the spread of each map, at random centres.

    Args:
        heat: float32[K, H, W] maps on the working grid (non-negative).
        rng: draws each blob's centre uniformly over the grid's cell centres.
    Returns:
        float32[K, H, W] ``exp(-((x - cx)² / 2σx² + (y - cy)² / 2σy²))`` with ``σx, σy`` the heat-weighted
        standard deviations of the map's column and row coordinates (at least half a cell); an all-zero map
        stays all-zero.
    """
    k, height, width = heat.shape
    y, x = np.arange(height) + 0.5, np.arange(width) + 0.5
    mass = heat.sum(axis=(1, 2), dtype=np.float64)
    safe = np.where(mass > 0, mass, 1.0)
    col_weight, row_weight = heat.sum(axis=1) / safe[:, None], heat.sum(axis=2) / safe[:, None]
    sx = np.sqrt(np.maximum((col_weight * x**2).sum(1) - (col_weight * x).sum(1) ** 2, 0.25))
    sy = np.sqrt(np.maximum((row_weight * y**2).sum(1) - (row_weight * y).sum(1) ** 2, 0.25))
    cx, cy = rng.random(k) * width, rng.random(k) * height
    blobs = np.exp(-0.5 * (((x[None, None, :] - cx[:, None, None]) / sx[:, None, None]) ** 2
                           + ((y[None, :, None] - cy[:, None, None]) / sy[:, None, None]) ** 2))
    return (blobs * (mass > 0)[:, None, None]).astype(np.float32)


# name -> (the CAM maps of an image float32[K, H, W], the same classes' maps of its partner image laid over
# its grid, rng) -> the baseline's maps on that grid
MAP_BASELINES: dict[str, Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]] = {
    "shuffled": lambda heat, partner_heat, rng: partner_heat,
    "blob": lambda heat, partner_heat, rng: blob_heat(heat, rng),
}

BASELINES = (*BOX_BASELINES, *MAP_BASELINES)


def derangement(n: int, seed: int) -> np.ndarray:
    """A seeded permutation of ``range(n)`` without fixed points (every image gets another image as partner;
    a single image is its own partner)."""
    if n < 2:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    partner = np.empty(n, dtype=np.int64)
    partner[order] = np.roll(order, 1)  # a cycle through a random order: no fixed points
    return partner
