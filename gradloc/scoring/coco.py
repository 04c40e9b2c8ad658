"""COCO-style detection AP beside VOC's: AP@[.50:.95], AP@0.5, AP@0.75 and AP by object size, and the COCO JSON
files (ground truth and results) that a COCO evaluator reads.

The numbers are those of pycocotools' ``COCOeval`` (Lin et al., "Microsoft COCO: Common Objects in Context",
ECCV 2014; ``iouType="bbox"``, default parameters), computed from gradloc's own detections and ground truth;
``tests/scoring/test_coco.py`` scores the files of :func:`coco_ground_truth` / :func:`coco_results` with
pycocotools itself and finds the same values. The protocol (:data:`COCO_PROTOCOL`):

* **Boxes** are converted from VOC (1-based inclusive pixels ``[x1, y1, x2, y2]``) to COCO (continuous
  ``[x, y, w, h]``) once, by :func:`voc_to_coco_boxes`: ``[x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1]``, so a
  box covers the same pixels (detectron2's conversion); areas are ``w * h`` of these boxes (for the ground
  truth too, as there are no masks), so a VOC box of 32 x 32 pixels has area 1024.
* **Difficult** boxes become crowd regions (``iscrowd = 1``, as mmdetection's VOC converter does; COCOeval
  has no other way to ignore a box): a detection matched to one is ignored (neither TP nor FP) and crowd
  regions are not counted in the positives. Unlike VOC, a crowd's IoU is ``|D ∩ G| / |D|`` and a crowd can
  absorb several detections.
* **Matching** per image and class: detections by descending score (stable), at most 100 per image and
  class; each takes the not yet matched GT box of highest ``IoU >= t`` (IoU without VOC's +1 pixel, capped at
  ``1 - 1e-10``; equal IoUs go to the later box), preferring non-crowd boxes.
* **AP** at one t is the 101-point interpolated precision (recall levels 0, 0.01, ..., 1; precision made
  monotone from the right; recall levels never reached count 0), averaged over the classes with at least
  one GT box in the size range. ``AP@[.50:.95]`` averages t = 0.50, 0.55, ..., 0.95.
* **Sizes**: small = area <= 32², medium = 32² to 96², large >= 96² (both ends inclusive, as COCOeval);
  GT boxes outside the range are ignored, as are unmatched detections outside it.

These are not VOC numbers (IoU > t with +1 areas, 11-point or all-point AP, difficult handled by the best
overlap); the rows say ``COCO-style``. Image and category ids of the JSON files are 1-based positions in
``gt.image_ids`` and ``gt.classes``; each image entry keeps its VOC id as ``voc_id``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numba
import numpy as np
import pandas as pd

from gradloc.core.files import atomic_write_bytes
from gradloc.core.formats import Detections, GroundTruth, keep_classes
from gradloc.scoring.voc import _check_compatible

# COCOeval's parameters (pycocotools/cocoeval.py Params.setDetParams), written as it writes them so that the
# floats are the same (0.75 is exactly linspace's sixth value).
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_LEVELS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
AREA_RANGES: dict[str, tuple[float, float]] = {
    "all": (0.0, 1e5**2), "small": (0.0, 32.0**2), "medium": (32.0**2, 96.0**2), "large": (96.0**2, 1e5**2),
}
MAX_DETECTIONS = 100
"""Detections kept per image and class (the largest of COCOeval's ``maxDets``, the one its AP uses)."""

# metric name -> (IoU thresholds it averages: None = all ten, area range)
COCO_METRICS: dict[str, tuple[float | None, str]] = {
    "AP@[.50:.95]": (None, "all"),
    "AP@0.50": (0.5, "all"),
    "AP@0.75": (0.75, "all"),
    "AP small": (None, "small"),
    "AP medium": (None, "medium"),
    "AP large": (None, "large"),
}
"""The six AP numbers of COCOeval's summary (``stats[0:6]``), by name."""

COCO_PROTOCOL = (
    "COCO-style AP (pycocotools COCOeval, bbox): 101-point interpolated precision, match when IoU >= t (no +1 "
    "in areas), AP@[.50:.95] = mean over t = 0.50:0.05:0.95; boxes converted from VOC as [x1-1, y1-1, x2-x1+1, "
    "y2-y1+1]; areas from VOC boxes w*h (small <= 32^2, medium 32^2-96^2, large >= 96^2 px); difficult GT = "
    "crowd (iscrowd=1: detections on it ignored); <= 100 detections per image and class; mean over classes "
    "with GT in the size range; not comparable with VOC AP"
)


def voc_to_coco_boxes(boxes: np.ndarray) -> np.ndarray:
    """VOC boxes to COCO boxes: the one conversion of gradloc's COCO files and COCO-style scores.

    VOC boxes are 1-based inclusive pixel ranges (pixel ``x1`` to pixel ``x2``, width ``x2 - x1 + 1``); COCO
    boxes are continuous ``[x, y, w, h]`` with pixel ``i`` (0-based) covering ``[i, i + 1)``. The VOC pixel
    ``x1`` is the 0-based pixel ``x1 - 1``, which starts at ``x1 - 1``; pixel ``x2`` ends at ``x2``.

    Args:
        boxes: float64[N, 4] ``[x1, y1, x2, y2]``, VOC convention.

    Returns:
        float64[N, 4] ``[x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1]``.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack([boxes[:, 0] - 1.0, boxes[:, 1] - 1.0, boxes[:, 2] - boxes[:, 0] + 1.0,
                     boxes[:, 3] - boxes[:, 1] + 1.0], axis=1)


def coco_ground_truth(gt: GroundTruth, description: str = "") -> dict[str, Any]:
    """The COCO ground-truth document (``instances`` JSON) of a :class:`GroundTruth`.

    Returns:
        ``{"info", "images": [{id, file_name, width, height, voc_id}], "categories": [{id, name}],
        "annotations": [{id, image_id, category_id, bbox, area, iscrowd}]}`` with 1-based ids (COCOeval reads
        id 0 as "unmatched"), ``bbox`` from :func:`voc_to_coco_boxes`, ``area = w * h`` and ``iscrowd`` = the
        VOC difficult flag.
    """
    coco = voc_to_coco_boxes(gt.boxes)
    return {
        "info": {"description": description or "gradloc ground truth (VOC boxes converted to COCO)",
                 "conversion": "bbox = [x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1] of the VOC box; area = w * h; "
                               "iscrowd = VOC difficult"},
        "images": [{"id": i + 1, "file_name": f"{image_id}.jpg", "width": int(size[0]), "height": int(size[1]),
                    "voc_id": image_id}
                   for i, (image_id, size) in enumerate(zip(gt.image_ids, gt.image_sizes, strict=True))],
        "categories": [{"id": k + 1, "name": name} for k, name in enumerate(gt.classes)],
        "annotations": [{"id": j + 1, "image_id": int(gt.image_index[j]) + 1, "category_id": int(gt.labels[j]) + 1,
                         "bbox": [float(v) for v in coco[j]], "area": float(coco[j, 2] * coco[j, 3]),
                         "iscrowd": int(gt.difficult[j])}
                        for j in range(len(gt.boxes))],
    }


def coco_results(dets: Detections) -> list[dict[str, Any]]:
    """The COCO results document of :class:`Detections`, in their order: ``[{image_id, category_id, bbox,
    score}]`` with the ids of :func:`coco_ground_truth` (1-based positions in ``image_ids`` / ``classes``)."""
    coco = voc_to_coco_boxes(dets.boxes)
    return [{"image_id": int(dets.image_index[i]) + 1, "category_id": int(dets.labels[i]) + 1,
             "bbox": [float(v) for v in coco[i]], "score": float(dets.scores[i])} for i in range(len(dets.scores))]


@numba.njit(cache=True, nogil=True)
def _crowd_iou(det: np.ndarray, gt: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """COCO box IoU (pycocotools ``maskApi.c`` ``bbIou``, same operations in the same order): float64[D, G]
    of ``[x, y, w, h]`` boxes; a crowd GT divides by the detection's area instead of the union."""
    out = np.zeros((det.shape[0], gt.shape[0]))
    for g in range(gt.shape[0]):
        ga = gt[g, 2] * gt[g, 3]
        for d in range(det.shape[0]):
            da = det[d, 2] * det[d, 3]
            w = min(det[d, 2] + det[d, 0], gt[g, 2] + gt[g, 0]) - max(det[d, 0], gt[g, 0])
            if w <= 0:
                continue
            h = min(det[d, 3] + det[d, 1], gt[g, 3] + gt[g, 1]) - max(det[d, 1], gt[g, 1])
            if h <= 0:
                continue
            inter = w * h
            out[d, g] = inter / (da if crowd[g] else da + ga - inter)
    return out


@numba.njit(cache=True, nogil=True)
def _match(det_start: np.ndarray, gt_start: np.ndarray, det_boxes: np.ndarray, gt_boxes: np.ndarray,
           gt_crowd: np.ndarray, ious: np.ndarray, area_low: np.ndarray, area_high: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """COCOeval's ``evaluateImg`` for every (image, class) group, size range and IoU threshold.

    Args:
        det_start: int64[G + 1], detections of group g are rows ``det_start[g]:det_start[g + 1]`` of
            ``det_boxes``, already in COCOeval's order (descending score, stable) and truncated.
        gt_start: int64[G + 1], the same for the GT rows (in file order).
        det_boxes, gt_boxes: float64[., 4] COCO boxes. gt_crowd: bool[M].
        ious: float64[T] IoU thresholds. area_low, area_high: float64[A] size ranges.

    Returns:
        matched bool[A, T, N] (the detection matched a GT box), ignored bool[A, T, N] (it is neither TP nor
        FP), gt_ignored bool[A, M] (not counted in the positives).
    """
    n_areas, n_ious = area_low.shape[0], ious.shape[0]
    matched = np.zeros((n_areas, n_ious, det_boxes.shape[0]), dtype=np.bool_)
    ignored = np.zeros((n_areas, n_ious, det_boxes.shape[0]), dtype=np.bool_)
    gt_ignored = np.zeros((n_areas, gt_boxes.shape[0]), dtype=np.bool_)
    for g in range(det_start.shape[0] - 1):
        d0, d1, g0, g1 = det_start[g], det_start[g + 1], gt_start[g], gt_start[g + 1]
        dets, gts = det_boxes[d0:d1], gt_boxes[g0:g1]
        crowd = gt_crowd[g0:g1]
        overlap = _crowd_iou(dets, gts, crowd)
        det_area = dets[:, 2] * dets[:, 3]
        gt_area = gts[:, 2] * gts[:, 3]
        for a in range(n_areas):
            gt_ig = crowd | (gt_area < area_low[a]) | (gt_area > area_high[a])
            gt_ignored[a, g0:g1] = gt_ig
            order = np.argsort(gt_ig, kind="mergesort")  # non-ignored GT first, stable
            for t in range(n_ious):
                taken = np.zeros(g1 - g0, dtype=np.bool_)
                for d in range(d1 - d0):
                    best = min(ious[t], 1 - 1e-10)
                    m = -1
                    for j in order:
                        if taken[j] and not crowd[j]:
                            continue
                        if m > -1 and not gt_ig[m] and gt_ig[j]:
                            break
                        if overlap[d, j] < best:
                            continue
                        best = overlap[d, j]
                        m = j
                    if m == -1:
                        ignored[a, t, d0 + d] = (det_area[d] < area_low[a]) | (det_area[d] > area_high[a])
                        continue
                    ignored[a, t, d0 + d] = gt_ig[m]
                    matched[a, t, d0 + d] = True
                    taken[m] = True
    return matched, ignored, gt_ignored


def _precision(matched: np.ndarray, ignored: np.ndarray, scores: np.ndarray, n_positive: int) -> np.ndarray:
    """COCOeval's ``accumulate`` for one class and size range: float64[T, R] interpolated precision at the
    recall levels (-1 when the class has no positive), from the class's detections in image order."""
    if n_positive == 0:
        return np.full((matched.shape[0], len(RECALL_LEVELS)), -1.0)
    order = np.argsort(-scores, kind="mergesort")
    matched, ignored = matched[:, order], ignored[:, order]
    tp = np.cumsum(matched & ~ignored, axis=1).astype(float)
    fp = np.cumsum(~matched & ~ignored, axis=1).astype(float)
    out = np.zeros((matched.shape[0], len(RECALL_LEVELS)))
    for t in range(matched.shape[0]):
        recall = tp[t] / n_positive
        precision = tp[t] / (fp[t] + tp[t] + np.spacing(1))
        precision = np.maximum.accumulate(precision[::-1])[::-1]
        at = np.searchsorted(recall, RECALL_LEVELS, side="left")
        reached = at < len(precision)
        out[t, reached] = precision[at[reached]]
    return out


def coco_evaluate(dets: Detections, gt: GroundTruth, only: tuple[str, ...] | list[str] = ()) -> pd.DataFrame:
    """COCO-style AP of detections (the module docstring gives the protocol, :data:`COCO_PROTOCOL`).

    Args:
        dets: detections on the same classes and image ids as ``gt`` (VOC boxes).
        gt: ground truth (VOC boxes, difficult flags).
        only: score just these classes (the means are then over them).

    Returns:
        Rows ``metric`` (a key of :data:`COCO_METRICS`), ``class`` (a class name, or ``mean``), ``ap`` (a
        fraction; NaN for a class without GT in the size range, and for a mean without any such class),
        ``n_gt`` (GT boxes counted, i.e. non-crowd in the size range), ``n_det`` (detections of the class, or
        all), in the order metrics x (classes, mean).

    Raises:
        ValueError: detections and GT on different classes or images; an unknown class in ``only``.
    """
    _check_compatible(dets, gt)
    if only:
        dets, gt = keep_classes(dets, only), keep_classes(gt, only)
    n_classes, n_areas = len(gt.classes), len(AREA_RANGES)
    # detections per (class, image), each group by descending score (stable), at most MAX_DETECTIONS
    order = np.lexsort((-dets.scores, dets.image_index, dets.labels))
    group = dets.labels[order] * len(gt.image_ids) + dets.image_index[order]
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]]) if len(order) else np.zeros(0, dtype=np.int64)
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    order = order[rank < MAX_DETECTIONS]
    det_group = dets.labels[order] * len(gt.image_ids) + dets.image_index[order]
    gt_order = np.lexsort((np.arange(len(gt.labels)), gt.image_index, gt.labels))
    gt_group = gt.labels[gt_order] * len(gt.image_ids) + gt.image_index[gt_order]
    groups = np.union1d(det_group, gt_group)
    det_start = np.searchsorted(det_group, np.r_[groups, np.iinfo(np.int64).max]).astype(np.int64)
    gt_start = np.searchsorted(gt_group, np.r_[groups, np.iinfo(np.int64).max]).astype(np.int64)
    low = np.array([r[0] for r in AREA_RANGES.values()])
    high = np.array([r[1] for r in AREA_RANGES.values()])
    matched, ignored, gt_ignored = _match(det_start, gt_start, voc_to_coco_boxes(dets.boxes[order]),
                                          voc_to_coco_boxes(gt.boxes[gt_order]),
                                          gt.difficult[gt_order].astype(np.bool_), IOU_THRESHOLDS, low, high)
    det_class, scores = dets.labels[order], dets.scores[order]
    gt_class = gt.labels[gt_order]
    precision = np.empty((n_areas, len(IOU_THRESHOLDS), len(RECALL_LEVELS), n_classes))  # as COCOeval's [T,R,K]
    counts = np.zeros((n_areas, n_classes), dtype=np.int64)
    for a in range(n_areas):
        for k in range(n_classes):
            mine = det_class == k
            counts[a, k] = int(np.count_nonzero(~gt_ignored[a, gt_class == k]))
            precision[a, :, :, k] = _precision(matched[a][:, mine], ignored[a][:, mine], scores[mine], counts[a, k])
    areas = list(AREA_RANGES)
    n_det = np.bincount(dets.labels, minlength=n_classes)
    rows = []
    for metric, (iou, area) in COCO_METRICS.items():
        a = areas.index(area)
        part = precision[a] if iou is None else precision[a, np.flatnonzero(iou == IOU_THRESHOLDS)]
        for k, name in enumerate(gt.classes):
            values = part[:, :, k]
            rows.append({"metric": metric, "class": name,
                         "ap": float(np.mean(values)) if counts[a, k] else float("nan"),
                         "n_gt": int(counts[a, k]), "n_det": int(n_det[k])})
        valid = part[part > -1]  # COCOeval's summarize: the mean of every valid entry in [T, R, K] order
        rows.append({"metric": metric, "class": "mean", "ap": float(np.mean(valid)) if valid.size else float("nan"),
                     "n_gt": int(counts[a].sum()), "n_det": len(dets.scores)})
    return pd.DataFrame(rows)


def render_coco(rows: pd.DataFrame, tablefmt: str = "orgtbl", digits: int = 2) -> str:
    """COCO-style mean APs (in %) as a table: one row per (τ, source), one column per metric of
    :data:`COCO_METRICS`, CAM rows first; then the protocol line. ``rows``: :func:`coco_evaluate` rows with
    ``threshold`` and ``source`` columns (threshold NaN for τ-free baselines)."""
    from tabulate import tabulate

    means = rows[rows["class"] == "mean"]
    groups = dict(list(means.groupby(["source", "threshold"], dropna=False, sort=False)))
    order = sorted(groups, key=lambda key: (key[0] != "cam", key[0], -1.0 if key[1] != key[1] else key[1]))
    lines = []
    for source, tau in order:
        values = 100 * groups[(source, tau)].set_index("metric")["ap"].reindex(list(COCO_METRICS))
        lines.append(["none" if tau != tau else f"{tau:g}", source,
                      *[None if value != value else value for value in values.tolist()]])
    table = tabulate(lines, headers=["tau", "boxes", *COCO_METRICS], tablefmt=tablefmt, floatfmt=f".{digits}f",
                     missingval="-", disable_numparse=[0])
    return f"{table}\n{COCO_PROTOCOL}; values in %.\n"


def coco_file_names(split: str) -> tuple[str, str]:
    """(ground-truth file, results file) names of a split, as COCO names its own: ``instances_<split>.json``,
    ``detections_<split>_results.json``."""
    return f"instances_{split}.json", f"detections_{split}_results.json"


def write_coco_results(dets: Detections, out_dir: str | Path, split: str) -> list[Path]:
    """The COCO results JSON of ``dets`` (:func:`coco_results`) as ``out_dir/detections_<split>_results.json``,
    atomically; floats are written with their shortest round-trip repr, so they read back bit for bit."""
    path = Path(out_dir) / coco_file_names(split)[1]
    atomic_write_bytes(path, json.dumps(coco_results(dets)).encode())
    return [path]


def write_coco_ground_truth(gt: GroundTruth, out_dir: str | Path, split: str) -> list[Path]:
    """The COCO ground-truth JSON of ``gt`` (:func:`coco_ground_truth`) as ``out_dir/instances_<split>.json``,
    atomically, so that ``pycocotools.coco.COCO(file).loadRes(results file)`` loads both."""
    path = Path(out_dir) / coco_file_names(split)[0]
    atomic_write_bytes(path, json.dumps(coco_ground_truth(gt, f"gradloc ground truth of {split}")).encode())
    return [path]
