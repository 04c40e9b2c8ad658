"""Localization metrics beyond AP: CorLoc, box accuracy over a run's thresholds, the pointing game."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from gradloc.core.formats import Detections, GroundTruth
from gradloc.core.ranges import IOU_RANGE, check_ious
from gradloc.scoring.voc import (
    _best_gt,
    _check_compatible,
    _check_gt,
    _pair_key,
    _pairs,
    _rank,
)


def _gt_pairs(gt: GroundTruth) -> np.ndarray:
    """Sorted unique (class, image) keys of the pairs that have >= 1 GT box (difficult included)."""
    return np.unique(_pair_key(gt.labels, gt.image_index, len(gt.image_ids)))


def _keys_with_hit(dets: Detections, gt: GroundTruth, best_iou: np.ndarray, iou: float) -> np.ndarray:
    hit = best_iou >= iou
    return np.unique(_pair_key(dets.labels[hit], dets.image_index[hit], len(gt.image_ids)))


def corloc_hits(dets: Detections, gt: GroundTruth, iou: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per (class, image) pair with GT of the class: whether its top-scoring detection localizes it.

    See :func:`corloc` for the rule. Returns ``(labels int64[P], image_index int64[P], hit bool[P])`` over the
    pairs with >= 1 GT box (difficult included), sorted by (class, image).
    """
    iou = IOU_RANGE.check(iou, "IoU threshold")
    _check_compatible(dets, gt)
    _check_gt(gt)
    n_images = len(gt.image_ids)
    keys = _pair_key(dets.labels, dets.image_index, n_images)
    order = _rank(keys, dets.scores)
    ranked_keys = keys[order]
    top = order[np.r_[True, ranked_keys[1:] != ranked_keys[:-1]]] if order.size else order
    best_iou, _ = _best_gt(dets.image_index[top], dets.labels[top], dets.boxes[top], gt)
    pair_keys = _gt_pairs(gt)
    hit = np.isin(pair_keys, keys[top][best_iou >= iou])
    return pair_keys // n_images, pair_keys % n_images, hit


def corloc(dets: Detections, gt: GroundTruth, iou: float = 0.5) -> pd.DataFrame:
    """Correct localization (CorLoc) per class.

    Deselaers, Alexe & Ferrari, "Localizing objects while learning their appearance" (ECCV 2010), as used
    in weakly-supervised detection (WSDDN, OICR): over the images that contain class ``c``,
    ``CorLoc_c = |{images whose top-scoring detection of c has IoU >= iou with a GT box of c}| / |images|``.

    Choices: an image contains ``c`` when it has >= 1 GT box of ``c``, difficult boxes included, and
    difficult boxes count as targets; an image without any detection of ``c`` is a miss; among equal top
    scores the detection that comes first in ``dets`` is the top one; the IoU is the VOC IoU (+1 areas) and
    the comparison is ``>=`` (not the devkit's ``>``).

    Args:
        dets: detections on the same ``classes`` and ``image_ids`` lists as ``gt``.
        gt: ground truth.
        iou: IoU threshold in (0, 1).

    Returns:
        Rows ``class``, ``iou``, ``hits``, ``n_images``, ``corloc`` (NaN for classes in no image), then a
        ``"mean"`` row: mean of the per-class CorLoc over classes present in >= 1 image, summed counts.

    Raises:
        ValueError: different classes/image_ids, invalid boxes, NaN scores, IoU outside (0, 1).
    """
    iou = IOU_RANGE.check(iou, "IoU threshold")
    pair_labels, _, pair_hits = corloc_hits(dets, gt, iou)
    n_classes = len(gt.classes)
    n_pairs = np.bincount(pair_labels, minlength=n_classes)
    hits = np.bincount(pair_labels[pair_hits], minlength=n_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = np.where(n_pairs > 0, hits / n_pairs, np.nan)
    rows = [
        {"class": name, "iou": iou, "hits": int(hits[c]), "n_images": int(n_pairs[c]),
         "corloc": float(rates[c])}
        for c, name in enumerate(gt.classes)
    ]
    present = n_pairs > 0
    rows.append({"class": "mean", "iou": iou, "hits": int(hits.sum()), "n_images": int(n_pairs.sum()),
                 "corloc": float(np.mean(rates[present])) if present.any() else float("nan")})
    return pd.DataFrame(rows, columns=["class", "iou", "hits", "n_images", "corloc"])


def box_acc_table(
    dets_by_threshold: Mapping[float, Detections], gt: GroundTruth, ious: Sequence[float] = (0.5,)
) -> pd.DataFrame:
    """GT-known BoxAcc(τ, δ) for every CAM threshold τ and IoU threshold δ (Choe et al., CVPR 2020).

    Choe, Oh, Lee, Chun, Akata & Shim, "Evaluating weakly supervised object localization methods right"
    (CVPR 2020): over the (image, class) pairs with GT of that class,
    ``BoxAcc(τ, δ) = |{pairs with some detection at τ of IoU >= δ with some GT box of the class}| / |pairs|``.
    Difficult boxes count as GT (pairs and targets); IoU is the VOC IoU (+1 areas).

    Args:
        dets_by_threshold: τ -> detections cut at τ, each on the same classes/image_ids lists as ``gt``.
        gt: ground truth.
        ious: IoU thresholds δ in (0, 1).

    Returns:
        Rows ``threshold``, ``iou``, ``hits``, ``n_pairs``, ``box_acc`` for each τ (ascending) and δ.

    Raises:
        ValueError: no thresholds, incompatible detections, invalid boxes, IoU outside (0, 1).
    """
    ious = check_ious(ious)
    if not dets_by_threshold:
        raise ValueError("no detections given; pass a mapping threshold -> Detections with >= 1 entry")
    _check_gt(gt)
    pair_keys = _gt_pairs(gt)
    rows = []
    for tau in sorted(dets_by_threshold):
        dets = dets_by_threshold[tau]
        _check_compatible(dets, gt, what=f"detections at threshold {tau}")
        best_iou, _ = _best_gt(dets.image_index, dets.labels, dets.boxes, gt)
        for delta in ious:
            hits = int(np.isin(pair_keys, _keys_with_hit(dets, gt, best_iou, delta)).sum())
            rows.append({"threshold": float(tau), "iou": delta, "hits": hits, "n_pairs": int(pair_keys.size),
                         "box_acc": hits / pair_keys.size if pair_keys.size else float("nan")})
    return pd.DataFrame(rows, columns=["threshold", "iou", "hits", "n_pairs", "box_acc"])


def best_box_acc(
    dets_by_threshold: Mapping[float, Detections], gt: GroundTruth, ious: Sequence[float] = (0.5,)
) -> pd.DataFrame:
    """The best GT-known box accuracy over a run's own τ list: ``max_τ BoxAcc(τ, δ)`` (the idea of MaxBoxAcc,
    Choe et al., CVPR 2020, on the run's thresholds and box mode; wsolevaluation's own grid and conventions are
    :func:`gradloc.scoring.wsol.max_box_acc`).

    See :func:`box_acc_table` for BoxAcc. MaxBoxAcc (V1) is δ = 0.5 on detections made with box mode
    ``largest``; MaxBoxAccV2 is the mean over δ in {0.3, 0.5, 0.7}, each δ with its own best τ, on detections
    made with box mode ``all``. This function only scores the detections it is given: the box mode, and
    therefore V1 vs V2, is the caller's choice. τ is chosen on the evaluated data (an oracle choice).

    Args:
        dets_by_threshold: τ -> detections cut at τ, each on the same classes/image_ids lists as ``gt``.
        gt: ground truth.
        ious: IoU thresholds δ in (0, 1).

    Returns:
        One row per δ: ``iou``, ``best_threshold`` (smallest τ reaching the maximum), ``max_box_acc``,
        ``n_pairs``; with several δ, a last row with ``iou == "mean"``, the mean ``max_box_acc`` and
        ``best_threshold`` NaN.

    Raises:
        ValueError: as :func:`box_acc_table`.
    """
    table = box_acc_table(dets_by_threshold, gt, ious)
    rows: list[dict[str, object]] = []
    for delta, group in table.groupby("iou", sort=False):
        best = group["box_acc"].to_numpy()
        i = int(np.argmax(best)) if not np.isnan(best).all() else 0
        rows.append({"iou": delta, "best_threshold": float(group["threshold"].iloc[i]),
                     "max_box_acc": float(best[i]), "n_pairs": int(group["n_pairs"].iloc[i])})
    if len(rows) > 1:
        rows.append({"iou": "mean", "best_threshold": float("nan"),
                     "max_box_acc": float(np.mean([row["max_box_acc"] for row in rows])),
                     "n_pairs": rows[0]["n_pairs"]})
    return pd.DataFrame(rows, columns=["iou", "best_threshold", "max_box_acc", "n_pairs"])


def _distance_continuous(point: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Euclidean distance from points to boxes spanning their pixel centres ``[x1, x2] x [y1, y2]`` (0 inside)."""
    dx = np.maximum(np.maximum(box[:, 0] - point[:, 0], point[:, 0] - box[:, 2]), 0.0)
    dy = np.maximum(np.maximum(box[:, 1] - point[:, 1], point[:, 1] - box[:, 3]), 0.0)
    return np.hypot(dx, dy)


def _distance_to_pixels(point: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Distance from points to the nearest whole pixel of boxes (TorchRay's mask of integer pixels); per axis the
    nearest pixel is ``clip(round(p), x1, x2)``, so for integer points this equals the continuous distance."""
    dx = np.clip(np.round(point[:, 0]), box[:, 0], box[:, 2]) - point[:, 0]
    dy = np.clip(np.round(point[:, 1]), box[:, 1], box[:, 3]) - point[:, 1]
    return np.hypot(dx, dy)


@dataclass(frozen=True)
class PointingProtocol:
    """A pointing-game protocol.

    Attributes:
        distance: (points float64[P, 2], boxes float64[P, 4]) -> float64[P] distance of each point to its box.
        hit: (distance, tolerance) -> bool, the hit rule.
        skip_without_easy_gt: skip pairs whose (image, class) has no non-difficult GT box; otherwise such pairs
            count (a pair without any GT box is a miss).
        description: the label printed beside the numbers.
    """

    distance: Callable[[np.ndarray, np.ndarray], np.ndarray]
    hit: Callable[[np.ndarray, float], np.ndarray]
    skip_without_easy_gt: bool
    description: str


POINTING_PROTOCOLS: dict[str, PointingProtocol] = {
    # gradloc's own variant: every given pair counts, distance <= tolerance to any box of the class
    "gradloc": PointingProtocol(_distance_continuous, np.less_equal, False,
                                "gradloc: every pair counts, hit if distance <= tolerance, difficult boxes count"),
    # TorchRay's benchmark/pointing_game.py (the published VOC07 tables): pairs whose boxes are all difficult
    # are skipped, hit if some pixel of the class mask (all its boxes) is at distance < tolerance
    "torchray": PointingProtocol(_distance_to_pixels, np.less, True,
                                 "TorchRay: all-difficult pairs skipped, hit if distance < tolerance"),
}


def pointing_hits(
    image_index: np.ndarray,
    labels: np.ndarray,
    points: np.ndarray,
    gt: GroundTruth,
    tolerance: float = 15.0,
    protocol: str = "gradloc",
) -> tuple[np.ndarray, np.ndarray]:
    """Per-pair outcome of the pointing game: ``(hit bool[N], counted bool[N])``; see :func:`pointing_game`."""
    if protocol not in POINTING_PROTOCOLS:
        raise ValueError(f"unknown pointing-game protocol {protocol!r}; choose one of {', '.join(POINTING_PROTOCOLS)}")
    rule = POINTING_PROTOCOLS[protocol]
    image_index = np.asarray(image_index, dtype=np.int64).reshape(-1)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    points = np.asarray(points, dtype=np.float64)
    if points.shape != (labels.size, 2) or image_index.size != labels.size:
        raise ValueError(
            f"pointing_game: image_index ({image_index.size}), labels ({labels.size}) and points "
            f"{points.shape} must describe the same N pairs, points as (N, 2) (x, y)"
        )
    if not np.all(np.isfinite(points)):
        raise ValueError("pointing_game: points hold non-finite values")
    if not tolerance >= 0.0:
        raise ValueError(f"pointing_game: tolerance {tolerance!r} must be >= 0 pixels (the paper uses 15)")
    for name, values, limit in (("labels", labels, len(gt.classes)), ("image_index", image_index,
                                                                      len(gt.image_ids))):
        if values.size and (values.min() < 0 or values.max() >= limit):
            raise ValueError(f"pointing_game: {name} holds values outside [0, {limit})")
    _check_gt(gt)

    hit = np.zeros(labels.size, dtype=bool)
    counted = np.ones(labels.size, dtype=bool)
    pairs = _pairs(image_index, labels, gt)
    if rule.skip_without_easy_gt:
        counted[:] = False
        if pairs.rows.size:
            easy = np.maximum.reduceat(~gt.difficult[pairs.gt_rows], pairs.seg)
            counted[pairs.rows] = easy
    if pairs.rows.size:
        distance = rule.distance(points[pairs.rows][pairs.owner], gt.boxes[pairs.gt_rows])
        hit[pairs.rows] = rule.hit(np.minimum.reduceat(distance, pairs.seg), tolerance)
    return hit & counted, counted


def pointing_game(
    image_index: np.ndarray,
    labels: np.ndarray,
    points: np.ndarray,
    gt: GroundTruth,
    tolerance: float = 15.0,
    protocol: str = "gradloc",
) -> pd.DataFrame:
    """Pointing game accuracy per class (Zhang et al., "Top-down neural attention by excitation backprop",
    ECCV 2016), under a named protocol (:data:`POINTING_PROTOCOLS`).

    A pair (image, class) with its point ``(x, y)`` (the map's maximum, see ``gradloc.boxes.cut.peak_points``) is a
    hit when the point lies within ``tolerance`` pixels of a GT box of that class in that image (difficult boxes
    count as targets under both protocols). ``accuracy_c = hits_c / n_c`` over the counted pairs; the mean row
    averages the per-class rates over classes with ``n_c >= 1``.

    * ``gradloc``: every given pair counts (a pair without GT of its class in its image is a miss); hit when
      ``d = sqrt(max(x1 - x, 0, x - x2)^2 + max(y1 - y, 0, y - y2)^2) <= tolerance`` (boxes spanning their pixel
      centres). This is NOT the reference rule: a point exactly ``tolerance`` pixels away is a hit here.
    * ``torchray``: TorchRay's ``PointingGameBenchmark`` (Fong et al.; the protocol of the published VOC07-test
      tables): pairs whose GT boxes of the class are all difficult (or that have none) are skipped; hit when
      a pixel of the union of the class's boxes is at distance strictly below ``tolerance`` from the point
      (``(u - x)^2 + (v - y)^2 < tolerance^2``). The published protocol evaluates every GT class of every image
      (GT-known): pass one point per GT class.

    Args:
        image_index: int64[N], image of each pair (index into ``gt.image_ids``).
        labels: int64[N], class of each pair (index into ``gt.classes``).
        points: float64[N, 2], ``(x, y)`` in VOC 1-based pixel coordinates of the original image.
        gt: ground truth.
        tolerance: hit distance in pixels, >= 0 (15 in the paper).
        protocol: a key of :data:`POINTING_PROTOCOLS`.

    Returns:
        Rows ``class``, ``hits``, ``n`` (counted pairs), ``accuracy`` (NaN for classes without counted pairs),
        ``protocol``, then ``"mean"``.

    Raises:
        ValueError: arrays of mismatched lengths/shapes, indices out of range, non-finite points, bad
            tolerance, unknown protocol.
    """
    hit, counted = pointing_hits(image_index, labels, points, gt, tolerance, protocol)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    n_classes = len(gt.classes)
    n = np.bincount(labels[counted], minlength=n_classes)
    hits = np.bincount(labels[hit], minlength=n_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = np.where(n > 0, hits / n, np.nan)
    label = f"{protocol} ({tolerance:g} px)"
    rows = [{"class": name, "hits": int(hits[c]), "n": int(n[c]), "accuracy": float(rates[c]), "protocol": label}
            for c, name in enumerate(gt.classes)]
    present = n > 0
    rows.append({"class": "mean", "hits": int(hits.sum()), "n": int(n.sum()),
                 "accuracy": float(np.mean(rates[present])) if present.any() else float("nan"), "protocol": label})
    return pd.DataFrame(rows, columns=["class", "hits", "n", "accuracy", "protocol"])
