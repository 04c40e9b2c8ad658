"""MaxBoxAcc and MaxBoxAccV2 on the protocol of wsolevaluation (Choe et al., CVPR 2020), GT-known.

Choe, Oh, Lee, Chun, Akata & Shim, "Evaluating Weakly Supervised Object Localization Methods Right", CVPR
2020 (code: github.com/clovaai/wsolevaluation). For every (image, GT class) pair the class map is min-max
normalised to [0, 1]; at every CAM threshold τ of the grid ``np.arange(0, 1, 0.01)`` (100 values, independent
of a run's own τ list) boxes are cut from the foreground; the pair is correct at (τ, δ) when some box has
IoU >= δ with some GT box of the class. ``BoxAcc(τ, δ) = correct pairs / pairs`` and
``MaxBoxAcc(δ) = max_τ BoxAcc(τ, δ)``. MaxBoxAcc (V1) is δ = 0.5 with the box of the largest connected
region; MaxBoxAccV2 is the mean over δ in {0.3, 0.5, 0.7} (each δ with its own best τ) with one box per
connected region ("all contours"). τ is chosen on the evaluated data (an oracle choice, as in the paper).

Where wsolevaluation's code (``evaluation.py``: ``compute_bboxes_from_scoremaps``, ``BoxEvaluator``,
``calculate_multiple_iou``) differs from its paper's definition, and what each ``convention`` does:

* Quantisation: the code thresholds ``u = (n * 255).astype(uint8)`` (truncation) with a strict
  ``u > int(τ · max u)`` (cv2 ``THRESH_BINARY``); the paper thresholds the float map. ``wsolevaluation``:
  same as the code. ``gradloc``: float map, ``n >= τ`` (pixels equal to τ are foreground).
* Box size: the code's box is ``[x, y, x + w, y + h]`` from ``cv2.boundingRect`` (clipped to ``W - 1, H - 1``)
  but its IoU reads boxes as inclusive (+1 areas), so boxes are one pixel too large on the right and bottom.
  ``wsolevaluation``: same. ``gradloc``: the exact VOC box of the region, ``[c0 + 1, r0 + 1, c1, r1]``.
* Holes: ``cv2.RETR_TREE`` also returns the contours of holes inside a region, each an extra (inner) box
  under "all contours". ``wsolevaluation``: NOT reproduced (one box per 8-connected region; a hole adds no
  box). ``gradloc``: the same, one box per 8-connected region.
* "Largest": the code takes the contour of largest ``cv2.contourArea`` (polygon through the boundary pixel
  centres; a one-pixel region has area 0). ``wsolevaluation``: NOT reproduced, largest by pixel count (ties:
  first in raster order). ``gradloc``: largest by pixel count.
* Nothing foreground: the code scores the box ``[0, 0, 0, 0]`` (VOC ``[1, 1, 1, 1]``). ``wsolevaluation``:
  same. ``gradloc``: no box, a miss. A constant map normalises to all zero: no foreground at any τ.

Both conventions use the +1 (inclusive) IoU of the devkit, which is also ``calculate_multiple_iou``'s, and
``IoU >= δ`` as wsolevaluation does. ``tests/test_wsol.py`` re-implements wsolevaluation's algorithm with
OpenCV and checks ``convention="wsolevaluation"`` against it exactly on seeded maps without holes, and
measures both conventions on general seeded maps. wsolevaluation resizes images and maps to 224 x 224;
gradloc scores maps at the original image resolution against the original VOC boxes (no resize).

The ``wsolevaluation`` convention here is an OpenCV-free approximation on gradloc's grid. The metric exactly as
wsolevaluation's code computes it (224 x 224 stretched frame, bicubic upsampling, OpenCV contours with holes,
its GT resize) is :mod:`gradloc.scoring.wsol_exact`; the run's ``localization.csv`` has both (rows named
``(gradloc convention)`` and ``(wsolevaluation exact, tau step 0.01)``).

Difficult boxes: wsolevaluation has none; pass the GT boxes that should count
(``gradloc.scoring.localization.box_acc_table``
counts difficult boxes as targets, and the pipeline does the same).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from gradloc.boxes.cut import BOX_MODES, component_table
from gradloc.boxes.kernels import COL_C0, COL_C1, COL_K, COL_R0, COL_R1, COL_T
from gradloc.core.geometry import grid_boxes_to_voc
from gradloc.core.ranges import check_ious
from gradloc.scoring.voc import box_iou

logger = logging.getLogger(__name__)


GRID = np.arange(0.0, 1.0, 0.01)
"""wsolevaluation's CAM threshold grid (``cam_curve_interval = 0.01``): 0, 0.01, ..., 0.99."""


IOUS_V2 = (0.3, 0.5, 0.7)


def normalize_minmax(maps: np.ndarray) -> np.ndarray:
    """wsolevaluation's ``normalize_scoremap`` per map: ``(m - min) / max(m - min)`` in float32.

    Args:
        maps: float[K, H, W] raw maps.

    Returns:
        float32[K, H, W] in [0, 1]; a constant map (``min == max``) becomes all zero.
    """
    maps = np.asarray(maps, dtype=np.float32)
    low = maps.min(axis=(1, 2), keepdims=True)
    shifted = maps - low
    high = shifted.max(axis=(1, 2), keepdims=True)
    return np.where(high > 0, shifted / np.where(high > 0, high, 1), np.float32(0)).astype(np.float32)


def _setup_gradloc(normalized: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Foreground ``n >= τ`` on the float map; constant maps get no level (no boxes)."""
    levels = np.repeat(grid[None, :], normalized.shape[0], axis=0)
    levels[normalized.reshape(normalized.shape[0], -1).max(axis=1) <= 0] = np.inf
    return normalized, levels


def _setup_wsolevaluation(normalized: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Foreground ``u > int(τ · max u)`` with ``u = (n * 255).astype(uint8)``, i.e. ``u >= int(τ · max u) + 1``."""
    quantized = (normalized * np.float32(255)).astype(np.uint8)
    peak = quantized.reshape(quantized.shape[0], -1).max(axis=1).astype(np.float64)
    levels = np.floor(grid[None, :] * peak[:, None]) + 1.0
    return quantized.astype(np.float32), levels


def _boxes_gradloc(table: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.stack([table[:, COL_C0] + 1, table[:, COL_R0] + 1, table[:, COL_C1], table[:, COL_R1]], axis=1)


def _boxes_wsolevaluation(table: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.stack([table[:, COL_C0] + 1, table[:, COL_R0] + 1, np.minimum(table[:, COL_C1], width - 1) + 1,
                     np.minimum(table[:, COL_R1], height - 1) + 1], axis=1)


# convention -> (map + grid -> (heat, levels), component table -> VOC boxes, box when nothing is foreground)
CONVENTIONS: dict[str, tuple[Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
                             Callable[[np.ndarray, int, int], np.ndarray], np.ndarray | None]] = {
    "gradloc": (_setup_gradloc, _boxes_gradloc, None),
    "wsolevaluation": (_setup_wsolevaluation, _boxes_wsolevaluation, np.array([1.0, 1.0, 1.0, 1.0])),
}


WSOL_BOX_MODES = ("largest", "all")


def _check_options(grid: Sequence[float], box_mode: str, convention: str) -> np.ndarray:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown MaxBoxAcc convention {convention!r}; choose one of {', '.join(CONVENTIONS)}")
    if box_mode not in WSOL_BOX_MODES:
        raise ValueError(f"MaxBoxAcc box mode {box_mode!r}: choose 'largest' (MaxBoxAcc) or 'all' (MaxBoxAccV2)")
    grid = np.asarray(grid, dtype=np.float64)
    if grid.ndim != 1 or grid.size == 0 or not np.all((grid >= 0) & (grid <= 1)):
        raise ValueError(f"MaxBoxAcc grid must be a non-empty 1-D list of τ in [0, 1], got {grid!r}")
    return grid


def box_hits(
    maps: np.ndarray,
    gt_boxes: Sequence[np.ndarray],
    *,
    ious: Sequence[float] = IOUS_V2,
    grid: Sequence[float] = GRID,
    box_mode: str = "all",
    convention: str = "gradloc",
    image_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Correctness of every (pair, τ, δ) of one image, the ingredient of BoxAcc.

    Args:
        maps: float[K, H, W] raw maps at the original image resolution, one per GT class of the image
            (e.g. ``gradloc.core.geometry.upsample(entry.maps[classes], entry.geometry)``).
        gt_boxes: K arrays float64[M_k, 4], the VOC boxes (1-based inclusive) of each map's class, M_k >= 1.
        ious: IoU thresholds δ in (0, 1).
        grid: CAM thresholds τ in [0, 1] on the min-max normalised map (default: wsolevaluation's 0.01 grid).
        box_mode: ``all`` (one box per connected region, MaxBoxAccV2) or ``largest`` (MaxBoxAcc).
        convention: ``gradloc`` or ``wsolevaluation`` (see the module docstring).
        image_size: ``(width, height)`` of the original image when ``maps`` lie on a coarser working grid
            over it (e.g. ``upsample(maps, geometry, *working_size(width, height, 224))``, about 4x faster
            than full resolution for VOC images); boxes are converted by ``grid_boxes_to_voc``. Only with
            ``convention="gradloc"``; None = maps at image resolution (exact).

    Returns:
        bool[K, T, D]: ``hits[k, t, d]`` when some box of map k at ``grid[t]`` has IoU >= ``ious[d]`` with some
        box in ``gt_boxes[k]``.

    Raises:
        ValueError: maps not [K, H, W] or not finite, K mismatch, a class without GT boxes, bad options.
    """
    ious = np.asarray(check_ious(ious))
    taus = _check_options(grid, box_mode, convention)
    maps = np.asarray(maps)
    if maps.ndim != 3 or 0 in maps.shape:
        raise ValueError(f"box_hits: maps must have shape (K, H, W) at image resolution, got {maps.shape}")
    if not np.all(np.isfinite(maps)):
        raise ValueError("box_hits: maps hold NaN or infinite values; check the CAM engine output")
    if len(gt_boxes) != maps.shape[0]:
        raise ValueError(f"box_hits: {maps.shape[0]} maps but {len(gt_boxes)} GT box arrays; give one per map")
    n_maps, height, width = maps.shape
    setup, to_boxes, fallback = CONVENTIONS[convention]
    on_grid = image_size is not None and tuple(image_size) != (width, height)
    if on_grid and convention != "gradloc":
        raise ValueError(f"box_hits: maps on a {width}x{height} working grid for a {image_size[0]}x{image_size[1]}"
                         " image need convention='gradloc'; wsolevaluation's boxes are defined at full resolution")
    heat, levels = setup(normalize_minmax(maps), taus)
    table = BOX_MODES[box_mode](component_table(np.ascontiguousarray(heat), np.ascontiguousarray(levels), 2, 0.0))
    if on_grid:
        boxes = grid_boxes_to_voc(table[:, [COL_C0, COL_R0, COL_C1, COL_R1]], width, height, *image_size)
    else:
        boxes = to_boxes(table, width, height)
    k, t = table[:, COL_K].astype(np.int64), table[:, COL_T].astype(np.int64)

    gts = [np.asarray(g, dtype=np.float64).reshape(-1, 4) for g in gt_boxes]
    if any(g.shape[0] == 0 for g in gts):
        raise ValueError("box_hits: every map needs >= 1 GT box of its class (GT-known protocol)")
    counts = np.array([g.shape[0] for g in gts])
    starts = np.concatenate(([0], np.cumsum(counts)))
    all_gt = np.concatenate(gts)
    best = np.full((n_maps, taus.size), -np.inf)
    if boxes.shape[0]:
        owner = np.repeat(np.arange(boxes.shape[0]), counts[k])
        offset = np.arange(owner.size) - np.repeat(np.cumsum(counts[k]) - counts[k], counts[k])
        iou = box_iou(boxes[owner], all_gt[starts[k][owner] + offset])
        np.maximum.at(best, (k[owner], t[owner]), iou)
    if fallback is not None:
        empty = np.isneginf(best)
        fallback_iou = np.array([box_iou(fallback[None], g).max() for g in gts])
        best = np.where(empty, fallback_iou[:, None], best)
    return best[:, :, None] >= ious[None, None, :]


def max_box_acc_from_hits(
    hits: np.ndarray,
    *,
    ious: Sequence[float] = IOUS_V2,
    grid: Sequence[float] = GRID,
    box_mode: str = "all",
    convention: str = "gradloc",
) -> pd.DataFrame:
    """MaxBoxAcc per δ (and their mean) from pair hits.

    Args:
        hits: bool[P, T, D] of all (image, GT class) pairs, as :func:`box_hits` returns (concatenated).
        ious, grid, box_mode, convention: those the hits were made with (for the labels).

    Returns:
        One row per δ and, with several δ, a ``mean`` row (named MaxBoxAccV2 for δ = 0.3/0.5/0.7 with box mode
        ``all``); columns ``metric``, ``iou``, ``best_threshold`` (smallest τ reaching the maximum; NaN for the
        mean), ``max_box_acc`` (fraction), ``n_pairs``, ``box_mode``, ``threshold_mode`` and ``convention``.
    """
    ious = check_ious(ious)
    taus = _check_options(grid, box_mode, convention)
    hits = np.asarray(hits, dtype=bool)
    if hits.ndim != 3 or hits.shape[1:] != (taus.size, len(ious)):
        raise ValueError(f"hits have shape {hits.shape}, expected (pairs, {taus.size} thresholds, {len(ious)} IoUs)")
    n_pairs = hits.shape[0]
    acc = hits.mean(axis=0) if n_pairs else np.full(hits.shape[1:], np.nan)
    best = acc.argmax(axis=0) if n_pairs else np.zeros(len(ious), dtype=np.int64)
    label = {"threshold_mode": f"minmax, grid {taus[0]:g}..{taus[-1]:g} ({taus.size} values), oracle τ",
             "box_mode": box_mode, "convention": convention, "n_pairs": n_pairs}
    name = "MaxBoxAcc" if box_mode == "largest" else "MaxBoxAcc (all boxes)"
    rows: list[dict[str, object]] = [
        {"metric": f"{name}@{delta}", "iou": delta, "best_threshold": float(taus[best[d]]),
         "max_box_acc": float(acc[best[d], d]), **label}
        for d, delta in enumerate(ious)
    ]
    if len(ious) > 1:
        v2 = box_mode == "all" and tuple(ious) == IOUS_V2
        rows.append({"metric": "MaxBoxAccV2" if v2 else f"{name} mean", "iou": "mean",
                     "best_threshold": float("nan"),
                     "max_box_acc": float(np.mean([row["max_box_acc"] for row in rows])), **label})
    columns = ["metric", "iou", "best_threshold", "max_box_acc", "n_pairs", "box_mode", "threshold_mode",
               "convention"]
    return pd.DataFrame(rows, columns=columns)


def max_box_acc(
    maps: Sequence[np.ndarray],
    gt_boxes: Sequence[Sequence[np.ndarray]],
    *,
    ious: Sequence[float] = IOUS_V2,
    grid: Sequence[float] = GRID,
    box_mode: str = "all",
    convention: str = "gradloc",
) -> pd.DataFrame:
    """GT-known MaxBoxAcc / MaxBoxAccV2 (Choe et al., CVPR 2020) over many images.

    Args:
        maps: per image, float[K_i, H_i, W_i] raw maps at image resolution, one per GT class of the image.
        gt_boxes: per image, K_i arrays float64[M, 4] of VOC boxes of each map's class.
        ious, grid, box_mode, convention: see :func:`box_hits`. Defaults: MaxBoxAccV2. For MaxBoxAcc (V1)
            pass ``ious=(0.5,), box_mode="largest"``.

    Returns:
        See :func:`max_box_acc_from_hits`.
    """
    if len(maps) != len(gt_boxes):
        raise ValueError(f"max_box_acc: {len(maps)} images of maps but {len(gt_boxes)} of GT boxes")
    options = {"ious": ious, "grid": grid, "box_mode": box_mode, "convention": convention}
    taus = _check_options(grid, box_mode, convention)
    parts = [box_hits(m, g, **options) for m, g in zip(maps, gt_boxes, strict=True)]
    hits = np.concatenate(parts) if parts else np.zeros((0, taus.size, len(ious)), dtype=bool)
    logger.debug("MaxBoxAcc over %d pairs of %d images", hits.shape[0], len(maps))
    return max_box_acc_from_hits(hits, **options)
