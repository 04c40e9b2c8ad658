"""MaxBoxAccV2 computed the way wsolevaluation's code computes it, with OpenCV. gradloc's own convention
is in :mod:`gradloc.scoring.wsol`.

Choe, Oh, Lee, Chun, Akata & Shim, "Evaluating Weakly Supervised Object Localization Methods Right", CVPR
2020. This module re-implements the steps of its code (github.com/clovaai/wsolevaluation, read at 96f4b88)
and copies none of it. For every GT-known (image, GT class) pair:

1. **Score map** (``inference.py``, ``CAMComputer``). wsolevaluation stretches each image to 224 x 224
   without keeping its aspect ratio. It upsamples the raw CAM of that input with
   ``cv2.resize(cam, (224, 224), interpolation=cv2.INTER_CUBIC)`` in float64, then applies
   ``normalize_scoremap``: a map with a NaN, or a constant map, becomes all zeros; any other map becomes
   ``(cam - min) / max(cam - min)``. gradloc's cached map covers the network's input canvas. With
   ``model.resize_mode: stretch`` the image fills that canvas, and :func:`scoremaps` runs ``cv2.resize``
   exactly as above. With ``letterbox`` or ``shortside`` the image covers only part of the map, often a
   fractional number of cells. In that case the same bicubic interpolation is evaluated over the image's
   extent alone, stretched to 224 x 224, with ``cv2.warpAffine(..., INTER_CUBIC, BORDER_REPLICATE)``: the
   same kernel, the same centre-aligned coordinates, the same border replication. Where both functions
   apply they agree to about 1e-6 on maps in [0, 1] (the tests allow 1e-5). Padding cells next to the image
   take part in the interpolation, as they would if the whole canvas were resized and the image then cropped
   out. gradloc stores its maps after the ReLU, while wsolevaluation's CAM has none: the two differ only
   where the raw map is negative.
2. **Boxes** (``evaluation.py``, ``compute_bboxes_from_scoremaps`` with ``multi_contour_eval=True``, as
   MaxBoxAccV2 runs it). ``u = (scoremap * 255).astype(uint8)`` truncates. For every τ of
   ``np.arange(0, 1, interval)``, the foreground is ``u > int(τ · max u)``. It is traced with
   ``cv2.findContours(..., RETR_TREE, CHAIN_APPROX_SIMPLE)``, which also returns the inner contour of every
   hole. Each contour gives ``x, y, w, h = cv2.boundingRect``, and the box is
   ``[x, y, min(x + w, 223), min(y + h, 223)]``. Note that ``x + w`` is one past the last pixel, yet the
   IoU reads boxes as inclusive. If there is no contour, the box is ``[0, 0, 0, 0]``.
3. **GT boxes** (``resize_bbox``). gradloc's choice, because wsolevaluation has no VOC loader: the
   boxes of the pair's class in the image, difficult ones included. Each VOC box (1-based inclusive) is
   made 0-based with ``x - 1``, then mapped with ``int(x * 224 / W)`` and ``int(y * 224 / H)`` on all four
   coordinates, where W x H is the original image size.
4. **IoU** (``calculate_multiple_iou``). Inclusive integer boxes with +1 areas. For each τ the pair gets
   the maximum over all its boxes and all its GT boxes, and it is correct when ``IoU >= δ``
   (``BoxEvaluator.accumulate``).
5. **Accuracy** (``BoxEvaluator.compute``). ``BoxAcc_δ(τ)`` is the share of correct pairs, and
   ``MaxBoxAcc_δ = max_τ BoxAcc_δ(τ)``: the τ is an oracle choice on the evaluated split, made separately
   for each δ. ``MaxBoxAccV2`` is the mean of ``MaxBoxAcc_δ`` over δ in {0.3, 0.5, 0.7}.

The τ step: wsolevaluation's ``config.py`` uses ``cam_curve_interval = 0.001``, while its standalone
``evaluation.py`` command and README example use 0.01. gradloc uses 0.01 (:data:`EXACT_GRID`, 100 values)
and names the step in every row. Pass ``grid=np.arange(0, 1, 0.001)`` to get config.py's grid. Each distinct
integer level ``int(τ · max u)`` is traced once: the 0.001 grid has 255 of them against 100, so its boxes cost
about 2.5 times as much.

OpenCV comes from ``opencv-python-headless``, installed by the ``wsol`` extra (``pip install
'gradloc[wsol]'``). It is imported only when needed: :func:`opencv` returns None when it is missing, and
callers then leave the exact rows out.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import numpy as np
import pandas as pd

from gradloc.core.geometry import Geometry
from gradloc.core.ranges import check_ious
from gradloc.scoring.voc import box_iou
from gradloc.scoring.wsol import IOUS_V2, max_box_acc_from_hits

SIZE = 224
"""Side of wsolevaluation's stretched frame (its ``_RESIZE_LENGTH``, the network input)."""

INTERVAL = 0.01
EXACT_GRID = np.arange(0.0, 1.0, INTERVAL)
"""The τ grid: ``np.arange(0, 1, 0.01)``, 100 values (wsolevaluation's standalone CLI and README)."""

LABEL = "wsolevaluation exact"

INSTALL_HINT = ("install OpenCV (pip install 'gradloc[wsol]', i.e. opencv-python-headless) and rerun "
                "`gradloc boxes` to get the MaxBoxAccV2 (wsolevaluation exact) rows")


def opencv() -> ModuleType | None:
    """The ``cv2`` module, or None when OpenCV is not installed."""
    try:
        import cv2
    except ImportError:
        return None
    return cv2


def _cv2() -> ModuleType:
    cv2 = opencv()
    if cv2 is None:
        raise ModuleNotFoundError(f"MaxBoxAccV2 (wsolevaluation exact) needs OpenCV: {INSTALL_HINT}")
    return cv2


def grid_label(grid: Sequence[float]) -> str:
    """``"tau step 0.01"`` for a regular grid starting at 0, else ``"N tau values"``."""
    grid = np.asarray(grid, dtype=np.float64)
    if grid.size > 1 and grid[0] == 0:
        step = float(grid[1] - grid[0])
        if np.allclose(np.diff(grid), step, rtol=0, atol=1e-12):
            return f"tau step {round(step, 12):g}"
    return f"{grid.size} tau values"


def scoremaps(maps: np.ndarray, geometry: Geometry, size: int = SIZE) -> np.ndarray:
    """Raw feature-resolution maps to wsolevaluation's stretched score maps (step 1, before normalization).

    Args:
        maps: float[K, h, w] raw maps covering the network input canvas (a heatmap cache entry's ``maps``).
        geometry: where the image sits in that canvas.
        size: side of the stretched frame.

    Returns:
        float64[K, size, size]: the bicubic upsampling of each map over the image's extent. With the image
        filling the canvas this is ``cv2.resize(map, (size, size), interpolation=cv2.INTER_CUBIC)``.
    """
    cv2 = _cv2()
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim != 3 or 0 in maps.shape:
        raise ValueError(f"scoremaps: maps must have shape (K, h, w), got {maps.shape}")
    g = geometry
    if (g.pad_x, g.pad_y, g.resized_w, g.resized_h) == (0, 0, g.input_w, g.input_h):
        return np.stack([cv2.resize(m, (size, size), interpolation=cv2.INTER_CUBIC) for m in maps])
    n_h, n_w = maps.shape[1:]
    # output pixel x (centre x + 0.5 of the stretched frame) -> feature index coordinate (centre j + 0.5 at j),
    # the mapping cv2.resize uses for the whole map: f = f0 + (x + 0.5) * extent / size - 0.5
    scale_x, scale_y = g.resized_w * n_w / g.input_w / size, g.resized_h * n_h / g.input_h / size
    shift_x = g.pad_x * n_w / g.input_w + 0.5 * scale_x - 0.5
    shift_y = g.pad_y * n_h / g.input_h + 0.5 * scale_y - 0.5
    affine = np.array([[scale_x, 0.0, shift_x], [0.0, scale_y, shift_y]])
    return np.stack([cv2.warpAffine(m, affine, (size, size), flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
                                    borderMode=cv2.BORDER_REPLICATE) for m in maps])


def normalize_scoremap(cam: np.ndarray) -> np.ndarray:
    """wsolevaluation's ``normalize_scoremap``: float64[H, W] -> float64[H, W] in [0, 1]; a map holding a NaN
    or a constant map becomes all zero, any other ``(cam - min) / max(cam - min)`` (its maximum exactly 1)."""
    cam = np.asarray(cam, dtype=np.float64)
    if np.isnan(cam).any() or cam.min() == cam.max():
        return np.zeros_like(cam)
    shifted = cam - cam.min()
    return shifted / shifted.max()


def scoremap_boxes(scoremap: np.ndarray, grid: Sequence[float] = EXACT_GRID) -> tuple[np.ndarray, np.ndarray]:
    """The boxes of ``compute_bboxes_from_scoremaps`` (all contours) at every τ (step 2).

    Args:
        scoremap: float64[H, W] normalized score map in [0, 1].
        grid: τ values in [0, 1].

    Returns:
        (int64[N, 4] boxes ``[x0, y0, x1, y1]`` in the code's convention -- 0-based, ``x1 = min(x + w, W - 1)``
        --, int64[N] the index into ``grid`` of each box, ascending; every τ has >= 1 box, ``[0, 0, 0, 0]``
        when nothing is foreground).
    """
    cv2 = _cv2()
    height, width = scoremap.shape
    quantized = (scoremap * 255).astype(np.uint8)
    levels = (np.asarray(grid, dtype=np.float64) * quantized.max()).astype(np.int64)  # int(τ · max u)
    unique, back = np.unique(levels, return_inverse=True)  # each distinct level is traced once
    contours, counts = [], np.zeros(len(unique), dtype=np.int64)
    for i, level in enumerate(unique.tolist()):
        binary = cv2.threshold(quantized, level, 1, cv2.THRESH_BINARY)[1]  # u > level
        found = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
        contours.extend(found)
        counts[i] = len(found)
    # cv2.boundingRect of a contour's integer points: x = min, w = max - min + 1 (so x + w = max + 1)
    boxes = np.zeros((len(contours), 4), dtype=np.int64)
    if contours:
        points = np.concatenate(contours).reshape(-1, 2).astype(np.int64)
        starts = np.concatenate(([0], np.cumsum([len(c) for c in contours])[:-1]))
        low, high = np.minimum.reduceat(points, starts), np.maximum.reduceat(points, starts)
        boxes = np.stack([low[:, 0], low[:, 1], np.minimum(high[:, 0] + 1, width - 1),
                          np.minimum(high[:, 1] + 1, height - 1)], axis=1)
    # a level without contours scores the box [0, 0, 0, 0]: give it one zero row
    rows = np.maximum(counts, 1)
    per_level = np.zeros((rows.sum(), 4), dtype=np.int64)
    first = np.concatenate(([0], np.cumsum(rows)[:-1]))
    filled = np.repeat(first, counts) + np.arange(len(contours)) - np.repeat(np.cumsum(counts) - counts, counts)
    per_level[filled] = boxes
    # expand to every τ of the grid, in grid order
    back = back.reshape(-1)
    owner = np.repeat(np.arange(len(back)), rows[back])
    offset = np.arange(len(owner)) - np.repeat(np.cumsum(rows[back]) - rows[back], rows[back])
    return per_level[first[back][owner] + offset], owner


def resize_gt_boxes(boxes: np.ndarray, width: int, height: int, size: int = SIZE) -> np.ndarray:
    """VOC boxes (1-based inclusive, float[M, 4]) of a ``width x height`` image -> int64[M, 4] in the
    stretched ``size x size`` frame: ``x - 1`` (0-based), then ``resize_bbox``'s ``int(x * size / width)``
    (same for y) on all four coordinates (step 3)."""
    zero_based = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) - 1.0
    scale = np.array([width, height, width, height], dtype=np.float64)
    return np.trunc(zero_based * float(size) / scale).astype(np.int64)


def exact_hits(
    maps: np.ndarray,
    geometry: Geometry,
    gt_boxes: Sequence[np.ndarray],
    *,
    ious: Sequence[float] = IOUS_V2,
    grid: Sequence[float] = EXACT_GRID,
    size: int = SIZE,
) -> np.ndarray:
    """Correctness of every (pair, τ, δ) of one image under wsolevaluation's exact protocol (steps 1-4).

    Args:
        maps: float[K, h, w] raw maps at feature resolution (the cache entry's ``maps`` of the image's GT classes).
        geometry: the cache entry's geometry (original size and where the image sits in the canvas).
        gt_boxes: K arrays float64[M_k, 4], the VOC boxes (1-based inclusive) of each map's class, M_k >= 1.
        ious: IoU thresholds δ in (0, 1).
        grid: τ values in [0, 1] (default ``np.arange(0, 1, 0.01)``).
        size: side of the stretched frame (wsolevaluation: 224).

    Returns:
        bool[K, T, D]: ``hits[k, t, d]`` when some box of map k at ``grid[t]`` has IoU >= ``ious[d]`` with some
        box of ``gt_boxes[k]``.

    Raises:
        ValueError: maps not [K, h, w] or infinite, K mismatch, a class without GT boxes, a bad grid.
        ModuleNotFoundError: OpenCV is not installed (see :func:`opencv`).
    """
    ious = np.asarray(check_ious(ious))
    taus = np.asarray(grid, dtype=np.float64)
    if taus.ndim != 1 or taus.size == 0 or not np.all((taus >= 0) & (taus <= 1)):
        raise ValueError(f"exact_hits: the grid must be a non-empty 1-D list of τ in [0, 1], got {grid!r}")
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim == 3 and np.isinf(maps).any():
        raise ValueError("exact_hits: maps hold infinite values; check the CAM engine output")
    if len(gt_boxes) != len(maps):
        raise ValueError(f"exact_hits: {len(maps)} maps but {len(gt_boxes)} GT box arrays; give one per map")
    gts = [resize_gt_boxes(g, geometry.width, geometry.height, size) for g in gt_boxes]
    if any(g.shape[0] == 0 for g in gts):
        raise ValueError("exact_hits: every map needs >= 1 GT box of its class (GT-known protocol)")
    hits = np.zeros((len(maps), taus.size, ious.size), dtype=bool)
    for k, scoremap in enumerate(scoremaps(maps, geometry, size)):
        boxes, owner = scoremap_boxes(normalize_scoremap(scoremap), taus)
        best = box_iou(boxes[:, None, :], gts[k][None, :, :]).max(axis=1)  # the box's best GT
        best = np.maximum.reduceat(best, np.searchsorted(owner, np.arange(taus.size)))  # per τ: the best box
        hits[k] = best[:, None] >= ious[None, :]
    return hits


def exact_max_box_acc(hits: np.ndarray, grid: Sequence[float] = EXACT_GRID,
                      ious: Sequence[float] = IOUS_V2) -> pd.DataFrame:
    """MaxBoxAcc per δ and their mean (step 5) from :func:`exact_hits` of all pairs (bool[P, T, D], concatenated).

    Returns:
        The columns of :func:`gradloc.scoring.wsol.max_box_acc_from_hits`, the metric named
        ``MaxBoxAccV2@δ (wsolevaluation exact, tau step 0.01)`` and ``MaxBoxAccV2 (wsolevaluation exact, tau
        step 0.01)`` (with the grid's own step), convention ``wsolevaluation exact``.
    """
    frame = max_box_acc_from_hits(hits, ious=ious, grid=grid, box_mode="all", convention="wsolevaluation")
    suffix = f" ({LABEL}, {grid_label(grid)})"
    names = [f"MaxBoxAccV2@{delta}{suffix}" for delta in check_ious(ious)]
    if len(frame) > len(names):
        names.append(f"MaxBoxAccV2{suffix}" if tuple(ious) == IOUS_V2 else f"MaxBoxAcc mean{suffix}")
    return frame.assign(metric=names, convention=LABEL)
