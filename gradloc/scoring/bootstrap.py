"""95 % bootstrap intervals over images for the headline numbers (mAP, CorLoc, pointing game, MaxBoxAcc).

Images are the resampling unit (Efron & Tibshirani, "An Introduction to the Bootstrap", 1993): a resample
draws ``n`` of the ``n`` images with replacement (seeded ``numpy.random.default_rng(seed)``,
``rng.integers(0, n, (B, n))``), and the statistic is recomputed on the resampled set as if the drawn
images were a new dataset (an image drawn twice counts twice: its GT boxes and its detections). The interval
is the percentile interval ``[q_{(1-level)/2}, q_{(1+level)/2}]`` of the B resampled statistics (numpy's
``"linear"`` quantile); resamples where the statistic is undefined (no class present) are left out.

Vectorised: nothing is re-matched. Matching is per image, so an image's TP/FP flags (VOC), top-detection
hits (CorLoc), pointing hits and box hits (MaxBoxAcc) are the same in every copy of it; a resample is a
vector of image counts ``w`` and every statistic is a weighted sum. For VOC AP the ranked detections of a
class get cumulative weighted TP/FP (``cumsum(w[image] * tp)``) and weighted positives
``sum_images w * n_gt``; copies of one detection sit next to each other in the rank order of the slow
version, and the points in between never change an 11-point or all-point AP, so the result equals
rescoring the resampled dataset (``tests/test_bootstrap.py`` compares with that slow loop). Detections
with equal scores in *different* images are ranked in their input order (stable sort), which a
concatenated resample may order differently.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import numpy as np

from gradloc.core.formats import Detections, GroundTruth
from gradloc.scoring.localization import corloc, corloc_hits, pointing_hits
from gradloc.scoring.voc import ap_kernel, evaluate, match_detections

logger = logging.getLogger(__name__)


N_RESAMPLES = 1000


LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A statistic with its bootstrap percentile interval.

    Attributes:
        estimate: the statistic on the evaluated images.
        low, high: the interval bounds.
        level: coverage (0.95).
        n_resamples: B.
        seed: the resampling seed.
        samples: float64[B] the resampled statistics (NaN where undefined).
    """

    estimate: float
    low: float
    high: float
    level: float
    n_resamples: int
    seed: int
    samples: np.ndarray = field(repr=False, compare=False)

    def format(self, scale: float = 100.0, digits: int = 1) -> str:
        """``"18.3 [16.1, 20.4]"``: estimate and interval, times ``scale`` (percent by default)."""
        return (f"{self.estimate * scale:.{digits}f} [{self.low * scale:.{digits}f}, "
                f"{self.high * scale:.{digits}f}]")


def resample_indices(n_images: int, n_resamples: int = N_RESAMPLES, seed: int = 0) -> np.ndarray:
    """Image indices of every resample: int64[B, n] from ``default_rng(seed).integers(0, n, (B, n))``."""
    if n_images < 1:
        raise ValueError("bootstrap: no images to resample")
    if n_resamples < 1:
        raise ValueError(f"bootstrap: n_resamples {n_resamples!r} must be >= 1 (use >= 1000 for a 95 % interval)")
    return np.random.default_rng(seed).integers(0, n_images, (n_resamples, n_images))


def resample_weights(n_images: int, n_resamples: int = N_RESAMPLES, seed: int = 0) -> np.ndarray:
    """How often each image is drawn in each resample: float64[B, n] (rows sum to n)."""
    index = resample_indices(n_images, n_resamples, seed)
    flat = index + n_images * np.arange(n_resamples)[:, None]
    return np.bincount(flat.ravel(), minlength=n_resamples * n_images).reshape(n_resamples, n_images).astype(
        np.float64)


def _interval(estimate: float, samples: np.ndarray, level: float, seed: int) -> Interval:
    if not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap: level {level!r} must be in (0, 1), e.g. 0.95")
    defined = samples[np.isfinite(samples)]
    if defined.size:
        low, high = np.quantile(defined, [(1 - level) / 2, (1 + level) / 2])
    else:
        low = high = float("nan")
    return Interval(float(estimate), float(low), float(high), level, samples.size, seed, samples)


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample without any class present: NaN
        return np.nanmean(values, axis=1)


def map_samples(dets: Detections, gt: GroundTruth, weights: np.ndarray, iou: float = 0.5,
                metric: str = "voc07") -> np.ndarray:
    """mAP of every resample given as image weights.

    Args:
        dets, gt: as for ``gradloc.scoring.voc.evaluate``.
        weights: float64[B, n_images] image counts (:func:`resample_weights`).
        iou: IoU threshold. metric: ``voc07`` (11-point) or ``voc10`` (all-point).

    Returns:
        float64[B] mAP over the classes with >= 1 weighted non-difficult GT box (NaN if none).
    """
    batched_ap = ap_kernel(metric)
    matches = match_detections(dets, gt, [iou])
    n_classes, n_images = len(gt.classes), len(gt.image_ids)
    easy = ~gt.difficult
    positives = np.zeros((n_images, n_classes))
    np.add.at(positives, (gt.image_index[easy], gt.labels[easy]), 1.0)
    weighted_positives = weights @ positives  # [B, C]
    aps = np.full(weighted_positives.shape, np.nan)
    ranked_images = dets.image_index[matches.order]
    eps = np.finfo(np.float64).eps
    for c in range(n_classes):
        lo, hi = matches.bounds[c], matches.bounds[c + 1]
        w = weights[:, ranked_images[lo:hi]]
        tp = np.cumsum(w * matches.tp[0, lo:hi], axis=1)
        fp = np.cumsum(w * matches.fp[0, lo:hi], axis=1)
        npos = weighted_positives[:, c]
        present = npos > 0
        recall = tp[present] / npos[present, None]
        precision = tp[present] / np.maximum(tp[present] + fp[present], eps)
        aps[present, c] = batched_ap(recall, precision)
    return _nanmean_rows(aps)


def map_interval(dets: Detections, gt: GroundTruth, iou: float = 0.5, metric: str = "voc07", *,
                 n_resamples: int = N_RESAMPLES, seed: int = 0, level: float = LEVEL) -> Interval:
    """Bootstrap interval of the VOC mAP at one IoU (``metric`` ``voc07`` = 11-point, ``voc10`` = all-point)."""
    frame = evaluate(dets, gt, [iou], metric)
    estimate = float(frame.loc[frame["class"] == "mAP", "ap"].iloc[0])
    samples = map_samples(dets, gt, resample_weights(len(gt.image_ids), n_resamples, seed), iou, metric)
    return _interval(estimate, samples, level, seed)


def class_rate_samples(labels: np.ndarray, image_index: np.ndarray, hit: np.ndarray, counted: np.ndarray,
                       n_classes: int, weights: np.ndarray) -> np.ndarray:
    """Mean over classes of ``hits_c / pairs_c`` for every resample.

    Args:
        labels, image_index: int64[P] class and image of each pair. hit, counted: bool[P].
        n_classes: C. weights: float64[B, n_images].

    Returns:
        float64[B], mean over classes with >= 1 weighted counted pair (NaN if none).
    """
    n_images = weights.shape[1]
    hits = np.zeros((n_images, n_classes))
    pairs = np.zeros((n_images, n_classes))
    np.add.at(hits, (image_index[hit & counted], labels[hit & counted]), 1.0)
    np.add.at(pairs, (image_index[counted], labels[counted]), 1.0)
    num, den = weights @ hits, weights @ pairs
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = np.where(den > 0, num / den, np.nan)
    return _nanmean_rows(rates)


def corloc_interval(dets: Detections, gt: GroundTruth, iou: float = 0.5, *, n_resamples: int = N_RESAMPLES,
                    seed: int = 0, level: float = LEVEL) -> Interval:
    """Bootstrap interval of the mean CorLoc (``gradloc.scoring.localization.corloc``) at one IoU."""
    estimate = float(corloc(dets, gt, iou).iloc[-1]["corloc"])
    labels, images, hit = corloc_hits(dets, gt, iou)
    weights = resample_weights(len(gt.image_ids), n_resamples, seed)
    samples = class_rate_samples(labels, images, hit, np.ones_like(hit), len(gt.classes), weights)
    return _interval(estimate, samples, level, seed)


def pointing_interval(image_index: np.ndarray, labels: np.ndarray, points: np.ndarray, gt: GroundTruth,
                      tolerance: float = 15.0, protocol: str = "gradloc", *, n_resamples: int = N_RESAMPLES,
                      seed: int = 0, level: float = LEVEL) -> Interval:
    """Bootstrap interval of the mean pointing-game accuracy (``gradloc.scoring.localization.pointing_game``)."""
    hit, counted = pointing_hits(image_index, labels, points, gt, tolerance, protocol)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    image_index = np.asarray(image_index, dtype=np.int64).reshape(-1)
    one = np.ones((1, len(gt.image_ids)))
    estimate = float(class_rate_samples(labels, image_index, hit, counted, len(gt.classes), one)[0])
    weights = resample_weights(len(gt.image_ids), n_resamples, seed)
    samples = class_rate_samples(labels, image_index, hit, counted, len(gt.classes), weights)
    return _interval(estimate, samples, level, seed)


def max_box_acc_samples(hits: np.ndarray, pair_image: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mean over δ of ``max_τ BoxAcc(τ, δ)`` for every resample (MaxBoxAccV2 for δ = 0.3/0.5/0.7, MaxBoxAcc
    for δ = 0.5 alone).

    Args:
        hits: bool[P, T, D] from ``gradloc.scoring.wsol.box_hits`` (concatenated over images).
        pair_image: int64[P] image of each pair. weights: float64[B, n_images].

    Returns:
        float64[B] (NaN where a resample holds no pair).
    """
    hits = np.asarray(hits, dtype=np.float64)
    pair_image = np.asarray(pair_image, dtype=np.int64)
    if hits.ndim != 3 or pair_image.shape != (hits.shape[0],):
        raise ValueError(f"bootstrap: hits {hits.shape} must be (P, T, D) with one image per pair "
                         f"(pair_image {pair_image.shape})")
    pair_weights = weights[:, pair_image]  # [B, P]
    correct = (pair_weights @ hits.reshape(hits.shape[0], -1)).reshape(-1, *hits.shape[1:])
    n = pair_weights.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = correct / n[:, None, None]
    return accuracy.max(axis=1).mean(axis=1)


def max_box_acc_interval(hits: np.ndarray, pair_image: np.ndarray, n_images: int, *,
                         n_resamples: int = N_RESAMPLES, seed: int = 0, level: float = LEVEL) -> Interval:
    """Bootstrap interval of MaxBoxAcc / MaxBoxAccV2 from ``gradloc.scoring.wsol.box_hits`` pair hits."""
    estimate = float(max_box_acc_samples(hits, pair_image, np.ones((1, n_images)))[0])
    samples = max_box_acc_samples(hits, pair_image, resample_weights(n_images, n_resamples, seed))
    return _interval(estimate, samples, level, seed)
