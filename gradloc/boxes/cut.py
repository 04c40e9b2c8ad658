"""Heatmap -> boxes for a whole threshold sweep.

A raw class map (after ReLU, at feature resolution) is back-projected once onto a working grid over the
original image (``gradloc.core.geometry.upsample``), every threshold of the sweep is cut from that one map, and the
boxes are converted to VOC pixel boxes by ``gradloc.core.geometry.grid_boxes_to_voc``.

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

The sweep kernel releases the GIL: the maps of one call are split across the CPUs this process may use
(:func:`sweep_threads`), and since the kernel's rows are sorted afterwards the result does not depend on the
split (tested). The back-projection multiplies tiny matrices, on which BLAS threads gain nothing: the boxes
stage runs them with one BLAS thread (:func:`gradloc.run.boxes.cut_boxes`), so the sweep's threads get the cores.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from gradloc.boxes.kernels import (
    COL_AREA,
    COL_C0,
    COL_C1,
    COL_FIRST,
    COL_K,
    COL_PEAK,
    COL_R0,
    COL_R1,
    COL_SUM,
    COL_T,
    _component_sweep,
    _integral_images,
    _nms_keep,
)
from gradloc.core.geometry import Geometry, grid_boxes_to_voc, upsample, working_size
from gradloc.core.ranges import THRESHOLD_RANGE

logger = logging.getLogger(__name__)


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


def _group_starts(table: np.ndarray) -> np.ndarray:
    """Start row of each (threshold, map) group of a table sorted by (t, k, first); int64[G]."""
    if table.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    new = np.ones(table.shape[0], dtype=bool)
    new[1:] = (table[1:, COL_T] != table[:-1, COL_T]) | (table[1:, COL_K] != table[:-1, COL_K])
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
    order = np.lexsort((table[:, COL_FIRST], -table[:, COL_AREA], table[:, COL_K], table[:, COL_T]))
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
        ((COL_C0, COL_R0, COL_FIRST), np.minimum),
        ((COL_C1, COL_R1, COL_PEAK), np.maximum),
        ((COL_AREA, COL_SUM), np.add),
    ):
        out[:, list(columns)] = ufunc.reduceat(table[:, list(columns)], starts, axis=0)
    return out


BOX_MODES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "largest": _box_largest,
    "all": _box_all,
    "union": _box_union,
}


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


def _check_thresholds(thresholds: Sequence[float]) -> np.ndarray:
    taus = np.asarray(thresholds, dtype=np.float64)
    if taus.ndim != 1:
        raise ValueError(f"thresholds must be a flat sequence of numbers, got shape {taus.shape}")
    for tau in taus[~((taus >= 0.0) & (taus <= 1.0))][:1]:
        THRESHOLD_RANGE.check(tau, "threshold")  # raises, naming the range
    return taus


def _check_maps(maps: np.ndarray, what: str) -> np.ndarray:
    maps = np.asarray(maps)
    if maps.ndim != 3 or 0 in maps.shape:
        raise ValueError(f"{what}: expected non-empty maps of shape (K, h, w), got shape {maps.shape}")
    if not np.all(np.isfinite(maps)):
        raise ValueError(f"{what}: maps hold NaN or infinite values; check the CAM engine output")
    return np.ascontiguousarray(maps, dtype=np.float32)


def split_by_threshold(t: np.ndarray, n_thresholds: int, *columns: np.ndarray) -> list[tuple[np.ndarray, ...]]:
    """Split row-aligned arrays sorted by threshold index ``t`` into one tuple per threshold (views)."""
    cuts = np.searchsorted(t, np.arange(n_thresholds + 1))
    return [tuple(column[lo:hi] for column in columns) for lo, hi in itertools.pairwise(cuts)]


def sweep_threads() -> int:
    """Threads of the sweep kernel: the CPUs this process may run on (``os.sched_getaffinity``; else the
    CPU count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@functools.cache
def _sweep_pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="gradloc-sweep")


def component_table(heat: np.ndarray, levels: np.ndarray, connectivity: int, min_area: float,
                    threads: int | None = None) -> np.ndarray:
    """The rows of :func:`gradloc.boxes.kernels._component_sweep` for K maps sorted by (threshold index, map,
    raster order of the component's first cell), so they do not depend on how the work was split: the maps
    are cut into ``threads`` (None: :func:`sweep_threads`) contiguous chunks run in parallel (the kernel
    releases the GIL)."""
    n_maps = heat.shape[0]
    threads = min(n_maps, sweep_threads() if threads is None else threads)
    if threads < 2:
        table = _component_sweep(heat, levels, connectivity, min_area)
    else:
        chunks = list(itertools.pairwise(np.linspace(0, n_maps, threads + 1).astype(np.int64).tolist()))
        futures = [_sweep_pool(threads).submit(_component_sweep, heat[lo:hi], levels[lo:hi], connectivity,
                                               min_area) for lo, hi in chunks]
        parts = [future.result() for future in futures]
        for (lo, _), part in zip(chunks, parts, strict=True):
            part[:, COL_K] += lo
        table = np.concatenate(parts)
    return table[np.lexsort((table[:, COL_FIRST], table[:, COL_K], table[:, COL_T]))]


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
    table = BOX_MODES[params.box_mode](component_table(heat, levels, params.connectivity, float(min_area_cells)))
    t = table[:, COL_T].astype(np.int64)
    k = table[:, COL_K].astype(np.int64)
    c0, r0, c1, r1 = (table[:, col].astype(np.int64) for col in (COL_C0, COL_R0, COL_C1, COL_R1))
    # Heat inside each box from per-map integral images (summed-area tables), for the `mass` column.
    integral = _integral_images(heat)
    inside = integral[k, r1, c1] - integral[k, r0, c1] - integral[k, r1, c0] + integral[k, r0, c0]
    rows = np.empty((table.shape[0], 8), dtype=np.float64)
    rows[:, :4] = table[:, [COL_C0, COL_R0, COL_C1, COL_R1]]
    rows[:, 4] = table[:, COL_AREA]
    rows[:, 5] = table[:, COL_PEAK]
    rows[:, 6] = table[:, COL_SUM] / table[:, COL_AREA]
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
    return [rows_t for (rows_t,) in split_by_threshold(t, taus.size, rows)]


def working_heat(maps: np.ndarray, geometry: Geometry, max_side: int | None) -> np.ndarray:
    """Raw maps back-projected onto the working grid over the original image (``max_side``, see
    :func:`gradloc.core.geometry.working_size`).

    Args:
        maps: float32[K, h, w] raw maps at feature resolution. geometry: their image's preprocessing.
    Returns:
        float32[K, H', W'] on the working grid of the image.
    """
    maps = _check_maps(maps, "image_boxes")
    return upsample(maps, geometry, *working_size(geometry.width, geometry.height, max_side))


def cut_heat(heat: np.ndarray, class_scores: np.ndarray, width: int, height: int, thresholds: Sequence[float],
             params: BoxParams) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Boxes of maps already on the working grid of a ``width x height`` image, for a whole threshold sweep.

    Args:
        heat: float32[K, H', W'] maps on a grid laid over the image (any grid size: cells are converted to
            the image's pixels by :func:`gradloc.core.geometry.grid_boxes_to_voc`).
        class_scores: float64[K] the class scores behind the maps (the confidences' first factor).
        width, height: the image's size in pixels.
        thresholds: T values τ in [0, 1]. params: box parameters (``max_side`` is not used: the grid is given).
    Returns:
        per threshold ``(k int64[n], confidence float64[n], boxes float64[n, 4])`` as :func:`image_boxes`.
    """
    taus = _check_thresholds(thresholds)
    heat = _check_maps(heat, "cut_heat")
    scores = np.asarray(class_scores, dtype=np.float64).reshape(-1)
    if scores.size != heat.shape[0]:
        raise ValueError(f"image_boxes: {scores.size} class scores for {heat.shape[0]} maps; give one each")
    out_h, out_w = heat.shape[1:]
    cell_area = width * height / (out_w * out_h)
    rows, t, k = _grid_rows(heat, taus, params, params.min_area / cell_area)
    heat_max = heat.reshape(heat.shape[0], -1).max(axis=1).astype(np.float64)
    confidence = CONFIDENCES[params.confidence](rows, scores[k], heat_max[k])
    boxes = grid_boxes_to_voc(rows[:, :4], out_w, out_h, width, height)
    if params.nms_iou is not None and rows.shape[0] > 1:
        starts = np.flatnonzero(np.r_[True, (t[1:] != t[:-1]) | (k[1:] != k[:-1]), True])
        keep = _nms_keep(boxes, confidence, starts, float(params.nms_iou))
        t, k, confidence, boxes = t[keep], k[keep], confidence[keep], boxes[keep]
    return split_by_threshold(t, taus.size, k, confidence, boxes)  # type: ignore[return-value]


def image_boxes(
    maps: np.ndarray,
    class_scores: np.ndarray,
    geometry: Geometry,
    thresholds: Sequence[float],
    params: BoxParams,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Boxes of one image for a whole threshold sweep.

    Each raw map is back-projected once onto the working grid (``max_side``, :func:`working_heat`), every
    threshold is cut from it, confidences are computed (``params.confidence``), boxes are converted to VOC
    pixel boxes by ``grid_boxes_to_voc`` and, if ``params.nms_iou`` is set, NMS runs per map and threshold
    (:func:`cut_heat`).

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
    _check_thresholds(thresholds)
    heat = working_heat(maps, geometry, params.max_side)
    return cut_heat(heat, class_scores, geometry.width, geometry.height, thresholds, params)


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
