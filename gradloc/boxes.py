"""Heatmap -> boxes for a whole threshold sweep.

A raw class map (after ReLU, at feature resolution) is back-projected once onto a working grid over the
original image (``gradloc.geometry.upsample``), every threshold of the sweep is cut from that one map, and the
boxes are converted to VOC pixel boxes by ``gradloc.geometry.grid_boxes_to_voc``.

Threshold semantics (``THRESHOLD_MODES``; a pixel is foreground when ``heat >= level``, pixels equal to the
level are in, ``level`` is computed in float64 from the float32 map on the working grid):

* ``max`` (default): ``level = τ · max(heat)`` (Grad-CAM: τ = 0.15, CAM: τ = 0.20).
* ``minmax``: ``level = min(heat) + τ · (max(heat) − min(heat))``, i.e. ``heat − min >= τ · (max − min)``.
* ``percentile``: ``level = np.quantile(heat, τ)`` with numpy's default ``"linear"`` method over all cells
  of the map, so about a fraction ``1 − τ`` of the cells is foreground (ties at the level are all in).

A map whose maximum is ``<= 0`` (all zero after ReLU) gives no boxes at any threshold, in every mode.

Connected components use ``connectivity`` 1 (4 neighbours) or 2 (8 neighbours, the default, which is also
``skimage.measure.label``'s default for 2-D images). Components smaller than ``min_area`` original-image
pixels (converted to working-grid cells) are dropped before the box mode is applied. Box modes
(``BOX_MODES``): ``largest`` (one box around the largest component; equal areas -> the component whose first
pixel comes first in raster order, as ``skimage.measure.label`` + ``argmax`` of the areas picks),
``all`` (one box per component, in raster order of their first pixels), ``union`` (one box around all kept
components).

All thresholds of a sweep come from ONE pass over the map (max-tree idea): each cell gets the index of the
highest level it passes, cells are bucketed by that index (counting sort), and a union-find adds the buckets
from the highest level down, keeping per-component area, bounding box, heat sum, peak and first pixel;
after each bucket the components of that level are recorded. This is exactly ``skimage.measure.label`` of
``heat >= level`` at every level (tested), in ``O(cells · α(cells) + T)`` per map instead of ``T``
labellings (numba; about 1.2 ms per 224x168 map for 100 thresholds on this project's CPU, against
~16 ms for 100 ``skimage.measure.label`` calls).

``max_side`` (default 224): the working grid over the original image has its longer side at most
``max_side`` cells (``None`` = the original resolution, exact). Measured by ``scripts/bench_scores.py`` on
synthetic VOC-sized images (14x14 maps, 300 images, 100 thresholds, ``largest`` box): 224-grid boxes have a
mean IoU of 0.98 with the full-resolution boxes for τ < 0.3 (0.97 for τ in [0.3, 0.6), 0.67 for τ >= 0.9,
where boxes shrink to a few pixels around the peak), the best AP@0.5 moves by -0.005 and AP@0.5 by 0.007 on
average over τ, at 1/4 of the time (112: 0.97 / 0.95, -0.006 / 0.010, 1/12 of the time).

``sweep_images`` runs ``image_boxes`` over many images, optionally in worker processes (``spawn``), and
returns per-threshold arrays ready for ``gradloc.detections.Detections``; results do not depend on the
number of workers. Numerical work stays single-threaded: set ``OPENBLAS_NUM_THREADS=1`` (before numpy is
imported) on a shared machine, as the back-projection multiplies tiny matrices.
"""

from __future__ import annotations

import itertools
import logging
import math
import multiprocessing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numba
import numpy as np

from gradloc.geometry import Geometry, grid_boxes_to_voc, upsample, working_size

logger = logging.getLogger(__name__)

# Columns of the per-level component table built by the sweep kernel.
_K, _T, _C0, _R0, _C1, _R1, _AREA, _PEAK, _SUM, _FIRST = range(10)


# --- threshold semantics ------------------------------------------------------------------------------------


def _levels_max(heat: np.ndarray, taus: np.ndarray) -> np.ndarray:
    """Grad-CAM / CAM thresholding: foreground ⇔ ``heat >= τ · max(heat)``.

    Selvaraju et al., "Grad-CAM", ICCV 2017 (τ = 0.15); Zhou et al., "Learning Deep Features for
    Discriminative Localization", CVPR 2016 (τ = 0.20).

    Args:
        heat: float32[K, n] maps on the working grid, flattened.
        taus: float64[T] thresholds in [0, 1].
    Returns:
        float64[K, T] levels.
    """
    peak = heat.max(axis=1).astype(np.float64)
    return taus[None, :] * peak[:, None]


def _levels_minmax(heat: np.ndarray, taus: np.ndarray) -> np.ndarray:
    """Min-max normalized thresholding: foreground ⇔ ``heat >= min + τ · (max − min)``.

    The normalization of Choe et al., "Evaluating Weakly Supervised Object Localization Methods Right",
    CVPR 2020 (``(heat − min) / (max − min) >= τ``). A constant map gives the whole grid at every τ.

    Args:
        heat: float32[K, n]; taus: float64[T].
    Returns:
        float64[K, T] levels.
    """
    low = heat.min(axis=1).astype(np.float64)
    high = heat.max(axis=1).astype(np.float64)
    return low[:, None] + taus[None, :] * (high - low)[:, None]


def _levels_percentile(heat: np.ndarray, taus: np.ndarray) -> np.ndarray:
    """Quantile thresholding: foreground ⇔ ``heat >= np.quantile(heat, τ)`` (numpy's ``"linear"`` method).

    About a fraction ``1 − τ`` of the cells is foreground: with ``n`` cells sorted ascending as ``v``,
    the level is ``v[⌊h⌋] + (h − ⌊h⌋) · (v[⌊h⌋+1] − v[⌊h⌋])`` with ``h = τ · (n − 1)``.

    Args:
        heat: float32[K, n]; taus: float64[T].
    Returns:
        float64[K, T] levels.
    """
    return np.quantile(heat.astype(np.float64), taus, axis=1).T.reshape(heat.shape[0], taus.size)


THRESHOLD_MODES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "max": _levels_max,
    "minmax": _levels_minmax,
    "percentile": _levels_percentile,
}


# --- box modes: reductions of the per-level component table ------------------------------------------------


def _group_starts(table: np.ndarray) -> np.ndarray:
    """Start row of each (threshold, map) group of a table sorted by (t, k, first); int64[G]."""
    if table.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    new = np.ones(table.shape[0], dtype=bool)
    new[1:] = (table[1:, _T] != table[:-1, _T]) | (table[1:, _K] != table[:-1, _K])
    return np.flatnonzero(new)


def _box_all(table: np.ndarray) -> np.ndarray:
    """One box per connected component (in raster order of the components' first pixels).

    The "all contours" variant of Choe et al., CVPR 2020 (MaxBoxAccV2).
    """
    return table


def _box_largest(table: np.ndarray) -> np.ndarray:
    """Box of the largest connected component (Zhou et al., CVPR 2016; Selvaraju et al., ICCV 2017).

    Equal areas: the component whose first pixel comes first in raster order.
    """
    if table.shape[0] == 0:
        return table
    order = np.lexsort((table[:, _FIRST], -table[:, _AREA], table[:, _K], table[:, _T]))
    ranked = table[order]
    return ranked[_group_starts(ranked)]


def _box_union(table: np.ndarray) -> np.ndarray:
    """Box of all foreground pixels (of the components kept by ``min_area``): one box per map and level.

    Area and heat sum add up over the components, the peak is their maximum.
    """
    if table.shape[0] == 0:
        return table
    starts = _group_starts(table)
    out = table[starts].copy()
    for columns, ufunc in (
        ((_C0, _R0, _FIRST), np.minimum),
        ((_C1, _R1, _PEAK), np.maximum),
        ((_AREA, _SUM), np.add),
    ):
        out[:, list(columns)] = ufunc.reduceat(table[:, list(columns)], starts, axis=0)
    return out


BOX_MODES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "largest": _box_largest,
    "all": _box_all,
    "union": _box_union,
}


# --- box confidences ---------------------------------------------------------------------------------------


def _conf_score(rows: np.ndarray, score: np.ndarray, heat_max: np.ndarray) -> np.ndarray:
    """``confidence = s_c``, the class score (the classifier's logit/probability that produced the map)."""
    return score.astype(np.float64, copy=True)


def _conf_score_x_peak(rows: np.ndarray, score: np.ndarray, heat_max: np.ndarray) -> np.ndarray:
    """``confidence = s_c · max_{p ∈ component} H(p) / max_p H(p)``."""
    return score * rows[:, 5] / heat_max


def _conf_score_x_mean(rows: np.ndarray, score: np.ndarray, heat_max: np.ndarray) -> np.ndarray:
    """``confidence = s_c · mean_{p ∈ component} H(p) / max_p H(p)``."""
    return score * rows[:, 6] / heat_max


def _conf_mass(rows: np.ndarray, score: np.ndarray, heat_max: np.ndarray) -> np.ndarray:
    """``confidence = Σ_{p ∈ box} H(p) / Σ_p H(p)``, the share of the map's heat inside the box (in [0, 1] for
    non-negative maps; it ignores the class score)."""
    return rows[:, 7].copy()


def _conf_score_x_mass(rows: np.ndarray, score: np.ndarray, heat_max: np.ndarray) -> np.ndarray:
    """``confidence = s_c · Σ_{p ∈ box} H(p) / Σ_p H(p)``: the class score times the share of the map's heat
    inside the box, so a confident class whose box misses most of its heat ranks below one whose box holds it."""
    return score * rows[:, 7]


# Each takes (rows float64[n, 8] from heatmap_to_boxes, class score float64[n], map max float64[n]).
CONFIDENCES: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]] = {
    "score": _conf_score,
    "score_x_peak": _conf_score_x_peak,
    "score_x_mean": _conf_score_x_mean,
    "mass": _conf_mass,
    "score_x_mass": _conf_score_x_mass,
}


@dataclass(frozen=True)
class BoxParams:
    """How heatmaps become boxes (see the module docstring for the semantics).

    Attributes:
        threshold_mode: key of ``THRESHOLD_MODES``.
        box_mode: key of ``BOX_MODES``.
        connectivity: 1 (4-neighbour) or 2 (8-neighbour).
        min_area: components smaller than this many original-image pixels are dropped (0 keeps all).
        confidence: key of ``CONFIDENCES``.
        nms_iou: greedy NMS among boxes of one class in one image, suppressing boxes whose IoU (VOC +1
            areas) with a higher-confidence box is ``> nms_iou``; ``None`` = off.
        max_side: longer side of the working grid in cells; ``None`` = original resolution (exact).
    """

    threshold_mode: str = "max"
    box_mode: str = "largest"
    connectivity: int = 2
    min_area: float = 0.0
    confidence: str = "score"
    nms_iou: float | None = None
    max_side: int | None = 224

    def __post_init__(self) -> None:
        for field_name, registry in (
            ("threshold_mode", THRESHOLD_MODES),
            ("box_mode", BOX_MODES),
            ("confidence", CONFIDENCES),
        ):
            value = getattr(self, field_name)
            if value not in registry:
                raise ValueError(f"unknown boxes.{field_name} {value!r}; choose one of {', '.join(registry)}")
        if self.connectivity not in (1, 2):
            raise ValueError(
                f"boxes.connectivity {self.connectivity!r} must be 1 (4-neighbour) or 2 (8-neighbour)"
            )
        if not (math.isfinite(self.min_area) and self.min_area >= 0):
            raise ValueError(f"boxes.min_area {self.min_area!r} must be a finite number of pixels >= 0")
        if self.nms_iou is not None and not 0.0 <= self.nms_iou <= 1.0:
            raise ValueError(f"boxes.nms_iou {self.nms_iou!r} must be in [0, 1] or None (off)")
        if self.max_side is not None and (not isinstance(self.max_side, int) or self.max_side < 1):
            raise ValueError(f"boxes.max_side {self.max_side!r} must be a positive integer or None (full size)")


# --- the one-pass sweep (numba) ----------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _find(parent: np.ndarray, x: int) -> int:
    """Root of ``x`` in the union-find forest ``parent`` (with path halving)."""
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


@numba.njit(cache=True, nogil=True)
def _component_sweep(heat: np.ndarray, levels: np.ndarray, connectivity: int, min_area: float) -> np.ndarray:
    """Connected components of ``heat[k] >= levels[k, t]`` for every map k and level t, in one pass per map.

    Each cell gets the index (in descending level order) of the highest level it passes; a counting sort
    groups cells by that index; a union-find (union by size, path halving) adds the groups from the highest
    level down, merging per-component statistics, and after each group records the components of that
    level whose area is at least ``min_area`` (their roots are kept in a swap-remove list).

    Args:
        heat: float32[K, H, W].
        levels: float64[K, T]; a cell is foreground at level t when ``heat >= levels[k, t]`` (never if inf).
        connectivity: 1 (4 neighbours) or 2 (8 neighbours).
        min_area: components with fewer cells are not recorded.
    Returns:
        float64[M, 10] rows ``[k, t, c0, r0, c1, r1, area, peak, heat_sum, first]`` (0-based half-open
        cell box, ``first`` = raster index of the component's first cell), unordered.
    """
    n_maps, height, width = heat.shape
    n_levels = levels.shape[1]
    n = height * width
    # Cells live in a grid padded by one never-foreground cell on each side: no bounds checks.
    padded_w = width + 2
    n_padded = (height + 2) * padded_w
    if connectivity == 1:
        offsets = np.array([-padded_w, -1, 1, padded_w], dtype=np.int64)
    else:
        offsets = np.array(
            [-padded_w - 1, -padded_w, -padded_w + 1, -1, 1, padded_w - 1, padded_w, padded_w + 1],
            dtype=np.int64,
        )
    parent = np.empty(n_padded, dtype=np.int64)  # -1: not (yet) foreground
    # Per-root statistics in one 64-byte row (one cache line): [c0, r0, c1, r1, area, peak, heat_sum, first].
    stats = np.empty((n_padded, 8), dtype=np.float64)
    kept = np.empty(n_padded, dtype=np.int64)  # roots of recorded (area >= min_area) components
    kept_pos = np.empty(n_padded, dtype=np.int64)  # position of a root in `kept`, -1 if absent
    bucket = np.empty(n, dtype=np.int64)
    order = np.empty(n, dtype=np.int64)
    starts = np.empty(n_levels + 2, dtype=np.int64)
    n_bins = 4 * n_levels + 16
    bin_first = np.empty(n_bins, dtype=np.int64)
    bin_stop = np.empty(n_bins, dtype=np.int64)
    capacity = max(64, 2 * n_maps * n_levels)
    out = np.empty((capacity, 10), dtype=np.float64)
    n_out = 0
    for k in range(n_maps):
        flat = heat[k].ravel()
        level_order = np.argsort(-levels[k], kind="mergesort")  # descending
        sorted_levels = levels[k][level_order]
        starts[:] = 0
        n_finite = 0
        while n_finite < n_levels and sorted_levels[n_levels - 1 - n_finite] < np.inf:
            n_finite += 1
        if n_finite == 0:
            continue  # no level can be reached (an all-zero map)
        # Bucket of a cell = smallest b with sorted_levels[b] <= value (n_levels if none), i.e. the highest
        # level it passes. A monotone binning `bin(v)` of values and levels narrows the search: levels in
        # higher bins are > value, levels in lower bins are <= value, only the value's own bin is compared.
        low = sorted_levels[n_levels - 1]
        high = sorted_levels[n_levels - n_finite]
        scale = n_bins / (high - low) if high > low else 0.0
        if not scale < np.inf:  # levels closer than n_bins / max-float (subnormal thresholds): one bin
            scale = 0.0
        bin_first[:] = 0  # number of levels in higher bins
        bin_stop[:] = 0  # number of levels in this or higher bins
        for b in range(n_levels):
            t = (sorted_levels[b] - low) * scale
            bin_stop[n_bins - 1 if t >= n_bins - 1 else (int(t) if t > 0.0 else 0)] += 1
        for b in range(n_bins - 2, -1, -1):
            bin_stop[b] += bin_stop[b + 1]
        bin_first[: n_bins - 1] = bin_stop[1:]
        for p in range(n):
            value = np.float64(flat[p])
            t = (value - low) * scale
            i = n_bins - 1 if t >= n_bins - 1 else (int(t) if t > 0.0 else 0)  # NaN-safe: NaN -> 0
            b = bin_first[i]
            stop = bin_stop[i]
            while b < stop and sorted_levels[b] > value:
                b += 1
            bucket[p] = b
            starts[b + 1] += 1
        for b in range(n_levels + 1):
            starts[b + 1] += starts[b]
        fill = starts[: n_levels + 1].copy()
        for p in range(n):
            order[fill[bucket[p]]] = p
            fill[bucket[p]] += 1
        parent[:] = -1
        n_kept = 0
        for level in range(n_levels):
            for j in range(starts[level], starts[level + 1]):
                p = order[j]
                r = p // width
                c = p - r * width
                x = p + padded_w + 1 + 2 * r  # padded index of cell (r, c)
                root = -1
                for d in range(offsets.size):
                    q = x + offsets[d]
                    up = parent[q]
                    if up < 0 or up == root:
                        continue
                    other = _find(parent, q)
                    if root < 0:
                        root = other
                        continue
                    if other == root:
                        continue
                    if stats[other, 4] > stats[root, 4]:
                        root, other = other, root
                    parent[other] = root  # union by size; `other` is absorbed
                    # (element indexing only: array views in this loop would cost reference counting)
                    stats[root, 0] = min(stats[root, 0], stats[other, 0])
                    stats[root, 1] = min(stats[root, 1], stats[other, 1])
                    stats[root, 2] = max(stats[root, 2], stats[other, 2])
                    stats[root, 3] = max(stats[root, 3], stats[other, 3])
                    stats[root, 4] += stats[other, 4]
                    stats[root, 5] = max(stats[root, 5], stats[other, 5])
                    stats[root, 6] += stats[other, 6]
                    stats[root, 7] = min(stats[root, 7], stats[other, 7])
                    pos = kept_pos[other]
                    if pos >= 0:  # swap-remove the absorbed root from the recorded components
                        n_kept -= 1
                        kept[pos] = kept[n_kept]
                        kept_pos[kept[pos]] = pos
                value = np.float64(flat[p])
                fc = np.float64(c)
                fr = np.float64(r)
                if root < 0:  # a new component
                    parent[x] = x
                    stats[x, 0] = fc
                    stats[x, 1] = fr
                    stats[x, 2] = fc + 1.0
                    stats[x, 3] = fr + 1.0
                    stats[x, 4] = 1.0
                    stats[x, 5] = value
                    stats[x, 6] = value
                    stats[x, 7] = np.float64(p)
                    kept_pos[x] = -1
                    root = x
                else:
                    parent[x] = root
                    stats[root, 0] = min(stats[root, 0], fc)
                    stats[root, 1] = min(stats[root, 1], fr)
                    stats[root, 2] = max(stats[root, 2], fc + 1.0)
                    stats[root, 3] = max(stats[root, 3], fr + 1.0)
                    stats[root, 4] += 1.0
                    stats[root, 5] = max(stats[root, 5], value)
                    stats[root, 6] += value
                    stats[root, 7] = min(stats[root, 7], np.float64(p))
                if kept_pos[root] < 0 and stats[root, 4] >= min_area:
                    kept[n_kept] = root
                    kept_pos[root] = n_kept
                    n_kept += 1
            if n_out + n_kept > capacity:
                capacity = max(2 * capacity, n_out + n_kept)
                grown = np.empty((capacity, 10), dtype=np.float64)
                grown[:n_out] = out[:n_out]
                out = grown
            t_index = level_order[level]
            for i in range(n_kept):
                out[n_out, 0] = k
                out[n_out, 1] = t_index
                for column in range(8):
                    out[n_out, 2 + column] = stats[kept[i], column]
                n_out += 1
    return out[:n_out]


@numba.njit(cache=True, nogil=True)
def _integral_images(heat: np.ndarray) -> np.ndarray:
    """Integral images: float32[K, H, W] -> float64[K, H + 1, W + 1], ``S[k, r, c] = Σ heat[k, :r, :c]``."""
    n_maps, height, width = heat.shape
    out = np.zeros((n_maps, height + 1, width + 1), dtype=np.float64)
    for k in range(n_maps):
        for r in range(height):
            row_sum = 0.0
            for c in range(width):
                row_sum += heat[k, r, c]
                out[k, r + 1, c + 1] = out[k, r, c + 1] + row_sum
    return out


@numba.njit(cache=True, nogil=True)
def _nms_keep(boxes: np.ndarray, conf: np.ndarray, starts: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS within each group ``[starts[g], starts[g + 1])`` of VOC boxes; bool[N] keep mask.

    Boxes are visited by descending confidence (stable: equal confidences keep their order); a box is
    suppressed when its IoU with a kept box is ``> iou_threshold``, IoU with VOC +1 areas.
    """
    keep = np.ones(boxes.shape[0], dtype=np.bool_)
    for g in range(starts.size - 1):
        lo, hi = starts[g], starts[g + 1]
        if hi - lo < 2:
            continue
        order = lo + np.argsort(-conf[lo:hi], kind="mergesort")
        for i in range(order.size):
            a = order[i]
            if not keep[a]:
                continue
            area_a = (boxes[a, 2] - boxes[a, 0] + 1.0) * (boxes[a, 3] - boxes[a, 1] + 1.0)
            for j in range(i + 1, order.size):
                b = order[j]
                if not keep[b]:
                    continue
                iw = min(boxes[a, 2], boxes[b, 2]) - max(boxes[a, 0], boxes[b, 0]) + 1.0
                ih = min(boxes[a, 3], boxes[b, 3]) - max(boxes[a, 1], boxes[b, 1]) + 1.0
                if iw <= 0.0 or ih <= 0.0:
                    continue
                inter = iw * ih
                area_b = (boxes[b, 2] - boxes[b, 0] + 1.0) * (boxes[b, 3] - boxes[b, 1] + 1.0)
                if inter / (area_a + area_b - inter) > iou_threshold:
                    keep[b] = False
    return keep


# --- library API -------------------------------------------------------------------------------------------


def _check_thresholds(thresholds: Sequence[float]) -> np.ndarray:
    taus = np.asarray(thresholds, dtype=np.float64)
    if taus.ndim != 1:
        raise ValueError(f"thresholds must be a flat sequence of numbers, got shape {taus.shape}")
    bad = taus[~((taus >= 0.0) & (taus <= 1.0))]
    if bad.size:
        raise ValueError(f"threshold {float(bad[0])!r} is outside [0, 1]; thresholds are fractions (see BoxParams)")
    return taus


def _check_maps(maps: np.ndarray, what: str) -> np.ndarray:
    maps = np.asarray(maps)
    if maps.ndim != 3 or 0 in maps.shape:
        raise ValueError(f"{what}: expected non-empty maps of shape (K, h, w), got shape {maps.shape}")
    if not np.all(np.isfinite(maps)):
        raise ValueError(f"{what}: maps hold NaN or infinite values; check the CAM engine output")
    return np.ascontiguousarray(maps, dtype=np.float32)


def _split_by_threshold(t: np.ndarray, n_thresholds: int, *columns: np.ndarray) -> list[tuple[np.ndarray, ...]]:
    """Split row-aligned arrays sorted by threshold index ``t`` into one tuple per threshold (views)."""
    cuts = np.searchsorted(t, np.arange(n_thresholds + 1))
    return [tuple(column[lo:hi] for column in columns) for lo, hi in itertools.pairwise(cuts)]


def _grid_rows(
    heat: np.ndarray, taus: np.ndarray, params: BoxParams, min_area_cells: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes of K maps on their grid for every threshold.

    Args:
        heat: float32[K, H, W] maps on the working grid (finite).
        taus: float64[T] thresholds in [0, 1].
        params: box parameters.
        min_area_cells: ``params.min_area`` converted to grid cells.
    Returns:
        ``(rows, t, k)``: float64[N, 8] rows ``[c0, r0, c1, r1, area, peak, mean, mass]`` sorted by
        (threshold index, map, raster order of the component), with int64[N] threshold and map indices.
    """
    n_maps, height, width = heat.shape
    flat = heat.reshape(n_maps, -1)
    levels = np.ascontiguousarray(THRESHOLD_MODES[params.threshold_mode](flat, taus), dtype=np.float64)
    levels[flat.max(axis=1) <= 0] = np.inf  # an all-zero map gives no boxes
    table = _component_sweep(heat, levels, params.connectivity, float(min_area_cells))
    table = table[np.lexsort((table[:, _FIRST], table[:, _K], table[:, _T]))]
    table = BOX_MODES[params.box_mode](table)
    t = table[:, _T].astype(np.int64)
    k = table[:, _K].astype(np.int64)
    c0, r0, c1, r1 = (table[:, col].astype(np.int64) for col in (_C0, _R0, _C1, _R1))
    # Heat inside each box from per-map integral images (summed-area tables), for the `mass` column.
    integral = _integral_images(heat)
    inside = integral[k, r1, c1] - integral[k, r0, c1] - integral[k, r1, c0] + integral[k, r0, c0]
    rows = np.empty((table.shape[0], 8), dtype=np.float64)
    rows[:, :4] = table[:, [_C0, _R0, _C1, _R1]]
    rows[:, 4] = table[:, _AREA]
    rows[:, 5] = table[:, _PEAK]
    rows[:, 6] = table[:, _SUM] / table[:, _AREA]
    rows[:, 7] = inside / integral[k, height, width]
    return rows, t, k


def heatmap_to_boxes(
    heat: np.ndarray, thresholds: Sequence[float], params: BoxParams, *, cell_area: float = 1.0
) -> list[np.ndarray]:
    """Cut every threshold of a sweep out of one map.

    Args:
        heat: float32[H, W] map on its grid (finite).
        thresholds: T values τ in [0, 1], meaning ``params.threshold_mode``.
        params: box parameters (``max_side`` is not used here: ``heat`` is already on its grid).
        cell_area: original-image pixels per cell of ``heat`` (1 at full resolution); ``params.min_area``
            is divided by it.
    Returns:
        T arrays float64[N_t, 8], rows ``[c0, r0, c1, r1, area, peak, mean, mass]``: the box as 0-based
        half-open cell ranges of the grid of ``heat`` (columns c0:c1, rows r0:r1), the component's area in
        cells, its peak and mean heat, and the share of the map's total heat inside the box. For ``union``,
        area/peak/mean are over all kept components. Rows within a threshold are in raster order of the
        components' first pixels.
    """
    heat = np.asarray(heat)
    if heat.ndim != 2:
        raise ValueError(f"heatmap_to_boxes: expected one map of shape (H, W), got shape {heat.shape}")
    if not cell_area > 0:
        raise ValueError(f"heatmap_to_boxes: cell_area {cell_area!r} must be > 0 pixels per cell")
    maps = _check_maps(heat[None], "heatmap_to_boxes")
    taus = _check_thresholds(thresholds)
    rows, t, _ = _grid_rows(maps, taus, params, params.min_area / cell_area)
    return [rows_t for (rows_t,) in _split_by_threshold(t, taus.size, rows)]


def _image_rows(
    maps: np.ndarray, class_scores: np.ndarray, geometry: Geometry, taus: np.ndarray, params: BoxParams
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Boxes of one image for all thresholds, flat: ``(t, k, confidence, voc_boxes)`` sorted by (t, k)."""
    maps = _check_maps(maps, "image_boxes")
    scores = np.asarray(class_scores, dtype=np.float64).reshape(-1)
    if scores.size != maps.shape[0]:
        raise ValueError(f"image_boxes: {scores.size} class scores for {maps.shape[0]} maps; give one each")
    out_w, out_h = working_size(geometry.width, geometry.height, params.max_side)
    heat = upsample(maps, geometry, out_w, out_h)
    cell_area = geometry.width * geometry.height / (out_w * out_h)
    rows, t, k = _grid_rows(heat, taus, params, params.min_area / cell_area)
    heat_max = heat.reshape(heat.shape[0], -1).max(axis=1).astype(np.float64)
    confidence = CONFIDENCES[params.confidence](rows, scores[k], heat_max[k])
    boxes = grid_boxes_to_voc(rows[:, :4], out_w, out_h, geometry.width, geometry.height)
    if params.nms_iou is not None and rows.shape[0] > 1:
        starts = np.flatnonzero(np.r_[True, (t[1:] != t[:-1]) | (k[1:] != k[:-1]), True])
        keep = _nms_keep(boxes, confidence, starts, float(params.nms_iou))
        t, k, confidence, boxes = t[keep], k[keep], confidence[keep], boxes[keep]
    return t, k, confidence, boxes


def image_boxes(
    maps: np.ndarray,
    class_scores: np.ndarray,
    geometry: Geometry,
    thresholds: Sequence[float],
    params: BoxParams,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Boxes of one image for a whole threshold sweep.

    Each raw map is back-projected once onto the working grid (``max_side``), every threshold is cut from
    it, confidences are computed (``params.confidence``), boxes are converted to VOC pixel boxes by
    ``grid_boxes_to_voc`` and, if ``params.nms_iou`` is set, NMS runs per map and threshold.

    Args:
        maps: float32[K, h, w] raw maps (after ReLU) at feature resolution, one per explained class.
        class_scores: float64[K] the class scores that produced the maps.
        geometry: the preprocessing of this image.
        thresholds: T values τ in [0, 1].
        params: box parameters.
    Returns:
        per threshold ``(k int64[n], confidence float64[n], boxes float64[n, 4])``: indices into the K maps,
        confidences, VOC boxes (1-based inclusive pixels of the original image), sorted by k.
    """
    taus = _check_thresholds(thresholds)
    t, k, confidence, boxes = _image_rows(maps, class_scores, geometry, taus, params)
    return _split_by_threshold(t, taus.size, k, confidence, boxes)  # type: ignore[return-value]


def peak_points(maps: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Peak of each map back-projected at full original resolution, for the pointing game.

    Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016: a hit when the map's
    maximum falls inside a GT box of the class.

    Args:
        maps: float32[K, h, w] raw maps at feature resolution.
        geometry: the preprocessing of this image.
    Returns:
        float64[K, 2] ``(x, y)`` 1-based VOC pixel of ``argmax`` of each map (ties -> first in raster order;
        an all-zero map points at (1, 1)).
    """
    maps = _check_maps(maps, "peak_points")
    heat = upsample(maps, geometry)
    flat_index = heat.reshape(heat.shape[0], -1).argmax(axis=1)
    y, x = np.divmod(flat_index, geometry.width)
    return np.stack([x + 1, y + 1], axis=1).astype(np.float64)


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


# --- parallel driver over images ---------------------------------------------------------------------------


class SweepEntry(NamedTuple):
    """One image's cached maps: float32[K, h, w] maps, float64[K] class scores, geometry, int64[K] labels."""

    maps: np.ndarray
    class_scores: np.ndarray
    geometry: Geometry
    labels: np.ndarray


class ThresholdDetections(NamedTuple):
    """Detections of one threshold over many images, the arrays of ``gradloc.detections.Detections``."""

    image_index: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray


class BoxRows:
    """The one accumulator of detection rows over many images and a threshold sweep: per row an image index,
    a label, a score and a float64[width] value (a VOC box, width 4, or a point, width 2).

    Rows come out per threshold in the order they were added (image by image), e.g. for
    ``gradloc.detections.Detections``. Picklable, so worker processes can fill one each (``sweep_images``).
    """

    def __init__(self, n_thresholds: int = 1, width: int = 4) -> None:
        self.n_thresholds = n_thresholds
        self.width = width
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, image: int, labels: np.ndarray, scores: np.ndarray, values: np.ndarray,
            threshold_index: int = 0) -> None:
        """Rows of one image at one threshold: int64[n] labels, float64[n] scores, float64[n, width] values."""
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if labels.size:
            self._parts.append((np.full(labels.size, threshold_index, dtype=np.int64),
                                np.full(labels.size, image, dtype=np.int64), labels,
                                np.asarray(scores, dtype=np.float64).reshape(-1),
                                np.asarray(values, dtype=np.float64).reshape(-1, self.width)))

    def add_sweep(self, image: int, labels: np.ndarray,
                  sweep: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
        """The :func:`image_boxes` result of one image; ``labels`` int64[K] is the class of each of its maps."""
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        for t, (k, confidence, boxes) in enumerate(sweep):
            self.add(image, labels[k], confidence, boxes, t)

    def extend(self, other: BoxRows) -> None:
        """Append the rows of another accumulator (e.g. the next chunk of images)."""
        self._parts += other._parts

    def per_threshold(self) -> list[ThresholdDetections]:
        """Per threshold ``ThresholdDetections(image_index, labels, scores, boxes)`` (``boxes`` holds the
        values, float64[n, width]), rows in the order added."""
        if not self._parts:
            empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros((0, self.width)))
            return [ThresholdDetections(*empty) for _ in range(self.n_thresholds)]
        t, *columns = (np.concatenate(column) for column in zip(*self._parts, strict=True))
        order = np.argsort(t, kind="stable")
        split = _split_by_threshold(t[order], self.n_thresholds, *(column[order] for column in columns))
        return [ThresholdDetections(*parts) for parts in split]


def _sweep_chunk(args: tuple[int, Sequence[SweepEntry], np.ndarray, BoxParams]) -> BoxRows:
    """Rows of consecutive images starting at ``offset``."""
    offset, entries, taus, params = args
    rows = BoxRows(taus.size)
    for i, entry in enumerate(entries):
        labels = np.asarray(entry.labels, dtype=np.int64).reshape(-1)
        if labels.size != np.shape(entry.maps)[0]:
            raise ValueError(
                f"sweep_images: image {offset + i} has {labels.size} labels for "
                f"{np.shape(entry.maps)[0]} maps; give one class index per map"
            )
        t, k, confidence, boxes = _image_rows(entry.maps, entry.class_scores, entry.geometry, taus, params)
        rows.add_sweep(offset + i, labels, _split_by_threshold(t, taus.size, k, confidence, boxes))
    return rows


def sweep_images(
    entries: Sequence[SweepEntry | tuple[np.ndarray, np.ndarray, Geometry, np.ndarray]],
    thresholds: Sequence[float],
    params: BoxParams,
    workers: int = 1,
    chunk_size: int = 100,
) -> list[ThresholdDetections]:
    """Boxes of many images for a whole threshold sweep, optionally over worker processes.

    Results are identical whatever ``workers`` is: images are cut into chunks of consecutive images,
    processed independently, and put back in image order.

    Args:
        entries: per image ``(maps float32[K, h, w], class_scores float64[K], geometry, labels int64[K])``.
        thresholds: T values τ in [0, 1].
        params: box parameters.
        workers: 1 = in this process; more = a ``spawn`` process pool of that size.
        chunk_size: images per task.
    Returns:
        per threshold, ``ThresholdDetections(image_index, labels, scores, boxes)`` sorted by image, with
        ``image_index`` the position in ``entries``.
    """
    if workers < 1 or chunk_size < 1:
        raise ValueError(f"sweep_images: workers={workers} and chunk_size={chunk_size} must be >= 1")
    taus = _check_thresholds(thresholds)
    entries = [SweepEntry(*entry) for entry in entries]
    tasks = [(i, entries[i : i + chunk_size], taus, params) for i in range(0, len(entries), chunk_size)]
    logger.debug(
        "sweep of %d images x %d thresholds, %d tasks, %d workers",
        len(entries),
        taus.size,
        len(tasks),
        workers,
    )
    if workers == 1 or len(tasks) < 2:
        results = [_sweep_chunk(task) for task in tasks]
    else:
        with multiprocessing.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
            results = pool.map(_sweep_chunk, tasks)
    rows = BoxRows(taus.size)
    for chunk in results:
        rows.extend(chunk)
    return rows.per_threshold()
