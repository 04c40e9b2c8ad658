"""Localization metrics: VOC detection AP (exactly as the devkit), CorLoc, MaxBoxAcc and the pointing game.

Boxes are ``float64 [x1, y1, x2, y2]`` in VOC convention (1-based, inclusive pixel coordinates of the original
image, width = x2 - x1 + 1). Every function takes :class:`~gradloc.core.formats.Detections` and
:class:`~gradloc.core.formats.GroundTruth` built on the *same* ``classes`` and ``image_ids`` lists (same
order); anything else is refused with a ``ValueError``, because a detection file made on another split
would silently score every missing image as a miss.

VOC AP follows the Python port of the devkit (py-faster-rcnn ``voc_eval.py``) to the last bit; the loop
version in ``tests/voc_reference.py`` is the executable specification and the tests compare with ``==``.
Speed comes from two observations:

* The GT a detection is matched against (highest IoU in its image among *all* GT of its class, difficult
  and already-used boxes included) does not depend on the matching state, so it is computed once for all
  detections, fully vectorized over (detection, GT-of-same-class-and-image) pairs.
* Given those best GTs, the devkit's sequential greedy loop reduces to "among the detections whose best GT
  is ``j`` with IoU > thr, the highest-ranked one is the TP, the others are FP" (``j`` non-difficult), or
  "ignored" (``j`` difficult). That is a first-occurrence query, one stable sort per IoU threshold.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from gradloc.core.formats import Detections, GroundTruth, keep_classes
from gradloc.core.ranges import check_ious

logger = logging.getLogger(__name__)


_EPS = np.finfo(np.float64).eps


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """VOC IoU of broadcastable box arrays ``a[..., 4]`` and ``b[..., 4]``.

    The operations and their order are those of the devkit's ``voc_eval`` (so results are bit-identical):
    ``iw = max(min(x2) - max(x1) + 1, 0)``, same for ``ih``; ``union = area_a + area_b - iw * ih`` with
    ``area = (x2 - x1 + 1) * (y2 - y1 + 1)``.
    """
    iw = np.maximum(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1.0, 0.0)
    ih = np.maximum(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1.0, 0.0)
    inters = iw * ih
    union = (
        (a[..., 2] - a[..., 0] + 1.0) * (a[..., 3] - a[..., 1] + 1.0)
        + (b[..., 2] - b[..., 0] + 1.0) * (b[..., 3] - b[..., 1] + 1.0)
        - inters
    )
    return inters / union


def _check_boxes(what: str, boxes: np.ndarray) -> np.ndarray:
    """Return ``boxes`` as float64[N, 4]; refuse wrong shapes, non-finite values and x2 < x1 or y2 < y1."""
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{what}: boxes have shape {boxes.shape}, expected (N, 4) as [x1, y1, x2, y2]")
    if not np.all(np.isfinite(boxes)):
        raise ValueError(f"{what}: boxes hold non-finite values")
    bad = np.flatnonzero((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]))
    if bad.size:
        raise ValueError(
            f"{what}: box {bad[0]} is {boxes[bad[0]].tolist()} with x2 < x1 or y2 < y1 "
            f"({bad.size} such boxes); VOC boxes are [x1, y1, x2, y2] with x1 <= x2, y1 <= y2"
        )
    return boxes


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise VOC intersection over union.

    VOC boxes are inclusive pixel ranges, so a box covers ``(x2 - x1 + 1) * (y2 - y1 + 1)`` pixels (a box
    with ``x1 == x2`` is one pixel wide) and the intersection width is ``min(x2) - max(x1) + 1`` clipped at
    0 (Everingham et al., IJCV 2010; devkit ``voc_eval``):
    ``IoU = |A ∩ B| / (|A| + |B| - |A ∩ B|)``.

    Args:
        a: float64[N, 4] boxes ``[x1, y1, x2, y2]``, VOC convention.
        b: float64[M, 4] boxes, VOC convention.

    Returns:
        float64[N, M], ``out[i, j] = IoU(a[i], b[j])``, in [0, 1]; bit-identical to the devkit's values.

    Raises:
        ValueError: a box array has the wrong shape, non-finite values, or x2 < x1 / y2 < y1.
    """
    a = _check_boxes("iou_matrix: a", a)
    b = _check_boxes("iou_matrix: b", b)
    return box_iou(a[:, None, :], b[None, :, :])


def _ap_11_point(recall: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """VOC2007 11-point interpolated AP (Everingham et al., IJCV 2010, eq. 1) of B curves at once.

    ``AP = 1/11 * sum_{t in {0, 0.1, ..., 1}} max_{r >= t} p(r)`` (0 when no recall reaches ``t``), with the
    devkit's exact grid ``np.arange(0, 1.1, 0.1)`` and comparison ``rec >= t``: the grid point 0.3 is
    ``0.30000000000000004``, so a recall of exactly 0.3 does not reach it. Recall is non-decreasing along a
    curve, so ``max_{r >= t} p`` is the precision envelope at the first position reaching ``t``. The eleven
    ``p / 11`` terms are added in grid order, as the devkit's loop does (bit-identical).
    """
    total = np.zeros(recall.shape[0])
    envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    padded = np.concatenate([envelope, np.zeros((recall.shape[0], 1))], axis=1)  # no recall reaches t: 0
    for t in np.arange(0.0, 1.1, 0.1):
        first = (recall < t).sum(axis=1)  # first position with recall >= t (n if none)
        total = total + np.take_along_axis(padded, first[:, None], axis=1)[:, 0] / 11.0
    return total


def _ap_all_point(recall: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """VOC2010+ all-point AP of B curves: area under the monotone precision envelope (Everingham et al., IJCV
    2015).

    With ``r_0 = 0``, ``r_{n+1} = 1``, ``p_0 = p_{n+1} = 0`` and the envelope ``P_i = max_{k >= i} p_k``:
    ``AP = sum_{i: r_{i+1} != r_i} (r_{i+1} - r_i) * P_{i+1}``. The envelope is computed for all curves at
    once; the sum runs per curve over its own steps only, as the devkit's ``np.sum`` does (bit-identical: a
    sum that also added the zero terms would group the additions differently).
    """
    rows = recall.shape[0]
    mrec = np.concatenate([np.zeros((rows, 1)), recall, np.ones((rows, 1))], axis=1)
    mpre = np.concatenate([np.zeros((rows, 1)), precision, np.zeros((rows, 1))], axis=1)
    mpre = np.maximum.accumulate(mpre[:, ::-1], axis=1)[:, ::-1]
    out = np.empty(rows)
    for b in range(rows):
        steps = np.flatnonzero(mrec[b, 1:] != mrec[b, :-1])
        out[b] = np.sum((mrec[b, steps + 1] - mrec[b, steps]) * mpre[b, steps + 1])
    return out


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "voc07": _ap_11_point,
    "voc10": _ap_all_point,
}
"""AP variants by name (voc07 = 11-point interpolated AP, voc10 = all-point AP, VOC2010 onwards): each maps
recall and precision float64[B, n] (B curves, recall non-decreasing along each) to float64[B] AP. The one AP
kernel of gradloc: :func:`evaluate` calls it with one curve, the bootstrap with a curve per resample."""


def ap_kernel(metric: str) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """The batched AP function of ``metric`` (:data:`METRICS`).

    Raises:
        ValueError: unknown metric.
    """
    try:
        return METRICS[metric]
    except (KeyError, TypeError):
        raise ValueError(f"unknown AP metric {metric!r}; choose one of {', '.join(METRICS)}") from None


def voc_ap(recall: np.ndarray, precision: np.ndarray, metric: str = "voc07") -> float:
    """Average precision of a ranked list from its recall/precision curve (devkit ``voc_ap``).

    Args:
        recall: float64[n], cumulative TP / number of non-difficult GT boxes, in rank order.
        precision: float64[n], cumulative TP / max(cumulative TP + FP, eps), in rank order.
        metric: a name in :data:`METRICS` (``voc07`` 11-point, ``voc10`` all-point).

    Returns:
        AP in [0, 1] (0 for an empty list); like the devkit, ``voc07`` sums eleven ``p / 11`` terms, so a
        perfect list scores ``1.0000000000000002``, kept for bit-exact agreement.

    Raises:
        ValueError: unknown metric, or arrays that are not 1-D of equal length.
    """
    ap_function = ap_kernel(metric)
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    if recall.ndim != 1 or recall.shape != precision.shape:
        raise ValueError(
            f"voc_ap: recall {recall.shape} and precision {precision.shape} must be 1-D and of equal length"
        )
    return float(ap_function(recall[None], precision[None])[0])


def _first_difference(a: Sequence[str], b: Sequence[str]) -> str:
    for position, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"first difference at position {position}: {x!r} vs {y!r}"
    return f"{len(a)} vs {len(b)} entries"


def _check_compatible(dets: Detections, gt: GroundTruth, what: str = "detections") -> None:
    """Detections and GT must share ``classes`` and ``image_ids`` (same lists, same order)."""
    for field in ("classes", "image_ids"):
        mine, theirs = list(getattr(dets, field)), list(getattr(gt, field))
        if mine != theirs:
            raise ValueError(
                f"{what} and ground truth list different {field} ({_first_difference(mine, theirs)}); "
                f"score detections against the GT of the same split and class list"
            )
    _check_boxes(what, dets.boxes)
    if np.isnan(dets.scores).any():
        raise ValueError(f"{what}: scores hold NaN; every detection needs a comparable score")


def _check_gt(gt: GroundTruth) -> None:
    _check_boxes("ground truth", gt.boxes)




@dataclass(frozen=True)
class _Pairs:
    """Flat (query, GT box) pairs over queries whose (class, image) has >= 1 GT box.

    Attributes:
        rows: int64[Q] query rows that have GT; query ``rows[q]`` owns pairs ``seg[q] : seg[q] + count[q]``.
        seg: int64[Q] start of each query's block of pairs.
        owner: int64[P] index into ``rows`` of each pair.
        local: int64[P] rank of the pair's GT box within its (class, image) block, in GT row order.
        gt_rows: int64[P] GT row of each pair.
        block_start: int64[Q] position (in GT key order) of the first GT box of each query's block.
        gt_order: int64[M] GT rows sorted by (class, image), stable.
    """

    rows: np.ndarray
    seg: np.ndarray
    owner: np.ndarray
    local: np.ndarray
    gt_rows: np.ndarray
    block_start: np.ndarray
    gt_order: np.ndarray


def _pair_key(labels: np.ndarray, image_index: np.ndarray, n_images: int) -> np.ndarray:
    return labels * np.int64(n_images) + image_index


def _pairs(image_index: np.ndarray, labels: np.ndarray, gt: GroundTruth) -> _Pairs:
    """Pair every query (image, class) with all GT boxes of that class in that image."""
    n_images = len(gt.image_ids)
    gt_key = _pair_key(gt.labels, gt.image_index, n_images)
    gt_order = np.argsort(gt_key, kind="stable")
    sorted_keys = gt_key[gt_order]
    query_key = _pair_key(labels, image_index, n_images)
    start = np.searchsorted(sorted_keys, query_key, side="left")
    count = np.searchsorted(sorted_keys, query_key, side="right") - start
    rows = np.flatnonzero(count > 0)
    count = count[rows]
    seg = np.cumsum(count) - count
    owner = np.repeat(np.arange(rows.size), count)
    local = np.arange(int(count.sum())) - seg[owner]
    block_start = start[rows]
    return _Pairs(rows, seg, owner, local, gt_order[block_start[owner] + local], block_start, gt_order)


def _best_gt(image_index: np.ndarray, labels: np.ndarray, boxes: np.ndarray, gt: GroundTruth) -> tuple[
    np.ndarray, np.ndarray
]:
    """Best GT box of each detection, as in the devkit: highest IoU among all GT of its class in its image.

    Ties go to the first such GT box in GT row order (``np.argmax``). Difficult and (later) used boxes are
    candidates too; that is the devkit's rule.

    Args:
        image_index: int64[N]; labels: int64[N]; boxes: float64[N, 4].
        gt: the ground truth.

    Returns:
        ``(best_iou float64[N], best_gt int64[N])``: IoU with and GT row of the best box; ``-inf`` and ``-1``
        for detections with no GT of their class in their image.
    """
    n = labels.size
    best_iou = np.full(n, -np.inf)
    best_gt = np.full(n, -1, dtype=np.int64)
    pairs = _pairs(image_index, labels, gt)
    if pairs.rows.size == 0:
        return best_iou, best_gt
    # gather coordinates column-wise (float64[4, P]): contiguous operands for box_iou, faster than strided rows
    iou = box_iou(boxes.T[:, pairs.rows[pairs.owner]].T, gt.boxes.T[:, pairs.gt_rows].T)
    top = np.maximum.reduceat(iou, pairs.seg)
    first = np.minimum.reduceat(np.where(iou == top[pairs.owner], pairs.local, iou.size), pairs.seg)
    best_iou[pairs.rows] = top
    best_gt[pairs.rows] = pairs.gt_order[pairs.block_start + first]
    return best_iou, best_gt


def _rank(keys: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Order by ascending key, then descending score; stable, so equal scores keep input order."""
    order = np.argsort(-scores, kind="stable")
    return order[np.argsort(keys[order], kind="stable")]


def _match(best_iou: np.ndarray, best_gt: np.ndarray, best_is_difficult: np.ndarray, thr: float) -> tuple[
    np.ndarray, np.ndarray
]:
    """TP/FP flags of ranked detections at IoU threshold ``thr``, equal to the devkit's greedy loop.

    A detection with ``best_iou > thr`` (strictly) whose best GT is difficult is ignored (neither TP nor FP);
    among those whose best GT ``j`` is not difficult, the highest-ranked one per ``j`` is TP (it marks ``j``
    used) and the others are FP; every other detection is FP.

    Returns:
        ``(tp, fp)`` float64[N] of 0/1 in rank order.
    """
    over = best_iou > thr
    candidate = np.flatnonzero(over & ~best_is_difficult)
    targets = best_gt[candidate]
    by_target = np.argsort(targets, kind="stable")
    first = np.ones(by_target.size, dtype=bool)
    first[1:] = targets[by_target[1:]] != targets[by_target[:-1]]
    tp = np.zeros(best_iou.size)
    tp[candidate[by_target[first]]] = 1.0
    fp = np.where(over & best_is_difficult, 0.0, 1.0) - tp
    return tp, fp


@dataclass(frozen=True)
class Matches:
    """Devkit TP/FP flags of a detection set, ranked class by class, at one or more IoU thresholds.

    Attributes:
        order: int64[N] detection rows in rank order: by class, then by descending score (stable sort, so
            among equal scores the earlier row ranks first).
        bounds: int64[C + 1]; class ``c``'s ranked detections are ``order[bounds[c]:bounds[c + 1]]``.
        n_gt: int64[C] non-difficult GT boxes per class (the positives).
        iou_thresholds: the T thresholds, in the order given.
        tp, fp: float64[T, N] 0/1 flags in rank order; a detection ignored for matching a difficult box
            has 0 in both.
    """

    order: np.ndarray
    bounds: np.ndarray
    n_gt: np.ndarray
    iou_thresholds: tuple[float, ...]
    tp: np.ndarray
    fp: np.ndarray

    def curve(self, c: int, t: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Precision-recall curve of class ``c`` at threshold ``iou_thresholds[t]`` (devkit ``voc_eval``).

        ``recall = cumTP / n_gt``, ``precision = cumTP / max(cumTP + cumFP, eps)``.

        Returns:
            ``(recall, precision)``, float64[n_c] each, in rank order.

        Raises:
            ValueError: the class has no non-difficult GT box (recall undefined).
        """
        if self.n_gt[c] == 0:
            raise ValueError(f"class {c} has no non-difficult GT box; its recall is undefined")
        lo, hi = self.bounds[c], self.bounds[c + 1]
        tp = np.cumsum(self.tp[t, lo:hi])
        fp = np.cumsum(self.fp[t, lo:hi])
        return tp / float(self.n_gt[c]), tp / np.maximum(tp + fp, _EPS)


def match_detections(dets: Detections, gt: GroundTruth, iou_thresholds: Sequence[float] = (0.5,)) -> Matches:
    """Rank detections and mark TP/FP with the devkit's matching rules (see :func:`evaluate`).

    The best GT box and its IoU are computed once per detection; each threshold then costs one stable sort.

    Args:
        dets: detections on the same ``classes`` and ``image_ids`` lists as ``gt``.
        gt: ground truth.
        iou_thresholds: IoU thresholds in (0, 1).

    Returns:
        The ranked flags; ``curve(c, t)`` gives a class's precision-recall curve.

    Raises:
        ValueError: different classes/image_ids, invalid boxes, NaN scores, IoU outside (0, 1).
    """
    thresholds = tuple(check_ious(iou_thresholds))
    _check_compatible(dets, gt)
    _check_gt(gt)
    n_classes = len(gt.classes)
    order = _rank(dets.labels, dets.scores)
    labels = dets.labels[order]
    best_iou, best_gt = _best_gt(dets.image_index[order], labels, dets.boxes[order], gt)
    best_is_difficult = np.zeros(labels.size, dtype=bool)
    matched = best_gt >= 0
    best_is_difficult[matched] = gt.difficult[best_gt[matched]]
    flags = [_match(best_iou, best_gt, best_is_difficult, thr) for thr in thresholds]
    return Matches(
        order=order,
        bounds=np.searchsorted(labels, np.arange(n_classes + 1)),
        n_gt=np.bincount(gt.labels[~gt.difficult], minlength=n_classes),
        iou_thresholds=thresholds,
        tp=np.stack([tp for tp, _ in flags]).reshape(len(thresholds), labels.size),
        fp=np.stack([fp for _, fp in flags]).reshape(len(thresholds), labels.size),
    )


def evaluate(
    dets: Detections,
    gt: GroundTruth,
    iou_thresholds: Sequence[float] = (0.3, 0.4, 0.5),
    metric: str = "voc07",
) -> pd.DataFrame:
    """Per-class VOC AP and recall, plus mAP, exactly as the devkit's Python ``voc_eval``.

    Protocol (Everingham et al., IJCV 2010; py-faster-rcnn ``voc_eval.py``), per class:

    * Detections are ranked by descending score with a **stable** sort: among equal scores, the detection
      that comes first in ``dets`` ranks first.
    * In rank order, a detection takes the GT box of highest VOC IoU (areas with +1) among *all* GT boxes
      of its class in its image, difficult and already-used ones included (first box on ties). If that IoU
      is ``> thr`` (strictly): a difficult box makes the detection ignored (neither TP nor FP), an unused
      box makes it TP and marks the box used, a used box makes it FP (duplicate). Otherwise it is FP.
    * ``recall = cumTP / n_gt`` and ``precision = cumTP / max(cumTP + cumFP, eps)``, with ``n_gt`` the number
      of non-difficult GT boxes; AP by ``metric`` (see :data:`METRICS`); ``recall`` column = final recall.

    A class with GT but no detections scores ap = recall = 0; a class without non-difficult GT scores NaN
    and is left out of the mAP row, which averages ap and recall over the other classes.

    Args:
        dets: detections on the same ``classes`` and ``image_ids`` lists as ``gt`` (same order; a detection
            file must cover the GT's whole image list, images without detections simply have no rows).
        gt: ground truth.
        iou_thresholds: IoU thresholds in (0, 1); all are scored from one set of best-GT computations.
        metric: AP variant, a name in :data:`METRICS`.

    Returns:
        One flat row per (iou, class) and one per iou with ``class == "mAP"``; columns ``iou`` (float),
        ``metric`` (str), ``class`` (str), ``ap`` and ``recall`` (fractions in [0, 1] or NaN), ``n_gt``
        (non-difficult GT boxes) and ``n_det`` (detections of the class); the mAP row sums ``n_gt`` and
        ``n_det`` over all classes.

    Raises:
        ValueError: different classes/image_ids, invalid boxes, NaN scores, IoU outside (0, 1), unknown
            metric.
    """
    ap_kernel(metric)  # an unknown metric fails before any work
    matches = match_detections(dets, gt, iou_thresholds)
    n_gt, n_det = matches.n_gt, np.diff(matches.bounds)
    scored = np.flatnonzero(n_gt > 0)
    rows: list[dict[str, object]] = []
    for t, thr in enumerate(matches.iou_thresholds):
        aps, recalls = np.full(n_gt.size, np.nan), np.full(n_gt.size, np.nan)
        for c in scored:
            recall, precision = matches.curve(c, t)
            aps[c], recalls[c] = voc_ap(recall, precision, metric), recall[-1] if recall.size else 0.0
        rows.extend(
            {"iou": thr, "metric": metric, "class": name, "ap": float(aps[c]), "recall": float(recalls[c]),
             "n_gt": int(n_gt[c]), "n_det": int(n_det[c])}
            for c, name in enumerate(gt.classes)
        )
        rows.append(
            {"iou": thr, "metric": metric, "class": "mAP",
             "ap": float(np.mean(aps[scored])) if scored.size else float("nan"),
             "recall": float(np.mean(recalls[scored])) if scored.size else float("nan"),
             "n_gt": int(n_gt.sum()), "n_det": int(n_det.sum())}
        )
    logger.debug("scored %d detections against %d GT boxes at IoU %s (%s)", len(dets), len(gt.labels),
                 matches.iou_thresholds, metric)
    return pd.DataFrame(rows, columns=["iou", "metric", "class", "ap", "recall", "n_gt", "n_det"])


def score_detections(dets: Detections, gt: GroundTruth, ious: Sequence[float], metric: str,
                     source: str, only: Sequence[str] = ()) -> pd.DataFrame:
    """Flat score rows (JSON schema of the README) of one detections file; ``only``: score just these classes
    (the mAP row is then over them), empty = all."""
    if only:
        dets, gt = keep_classes(dets, only), keep_classes(gt, only)
    frame = evaluate(dets, gt, iou_thresholds=ious, metric=metric)
    frame.insert(0, "threshold_mode", dets.threshold_mode)
    frame.insert(0, "threshold", dets.threshold)
    frame["source"] = source
    frame["box_mode"] = dets.box_mode
    return frame
