"""95 % bootstrap intervals over images for the headline numbers (mAP, CorLoc, pointing game, MaxBoxAcc).

Images are the resampling unit (Efron & Tibshirani, "An Introduction to the Bootstrap", 1993): a resample
draws ``n`` of the ``n`` images with replacement (seeded ``numpy.random.default_rng(seed)``,
``rng.integers(0, n, (B, n))``), and the statistic is recomputed on the resampled set as if the drawn
images were a new dataset (an image drawn twice counts twice: its GT boxes and its detections). The interval
is bias-corrected and accelerated (BCa; Efron, "Better Bootstrap Confidence Intervals", JASA 1987): with
``z0 = Φ⁻¹((#{θ_b < θ̂} + #{θ_b ≤ θ̂}) / 2B)`` (ties count half) and the acceleration ``a`` of the
leave-one-image-out jackknife, the bounds are the quantiles ``Φ(z0 + (z0 + z_α) / (1 - a (z0 + z_α)))`` of the
B resampled statistics, ``z_α`` = the normal quantiles of ``(1 ∓ level) / 2`` -- scipy.stats.bootstrap's
``method="BCa"`` exactly (``tests/scoring/test_bootstrap.py`` compares with it on the same resamples). Where
BCa is undefined (every resample on one side of the estimate, or a constant jackknife) the percentile interval
``[q_{(1-level)/2}, q_{(1+level)/2}]`` is used and the interval says so (``method``). Resamples where the
statistic is undefined (no class present) are left out.

Differences are paired (:func:`paired_interval`): both statistics are computed on the same resamples of the
same images, so the interval of ``A - B`` reflects how the two methods differ image by image, not the sum of
their separate uncertainties; the share of resamples with ``A - B <= 0`` is reported beside it.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

from gradloc.core.formats import Detections, GroundTruth
from gradloc.scoring.localization import corloc_hits, pointing_hits
from gradloc.scoring.voc import ap_kernel, match_detections

logger = logging.getLogger(__name__)


N_RESAMPLES = 1000


LEVEL = 0.95


# image weights float64[B, n_images] (how often each image is drawn in each of B resamples) -> float64[B]
Statistic = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Interval:
    """A statistic with its bootstrap interval.

    Attributes:
        estimate: the statistic on the evaluated images.
        low, high: the interval bounds.
        level: coverage (0.95).
        n_resamples: B.
        seed: the resampling seed.
        method: ``BCa`` or ``percentile`` (where BCa is undefined).
        samples: float64[B] the resampled statistics (NaN where undefined).
        paired: True for the paired difference of two statistics (:func:`paired_interval`).
    """

    estimate: float
    low: float
    high: float
    level: float
    n_resamples: int
    seed: int
    method: str
    samples: np.ndarray = field(repr=False, compare=False)
    paired: bool = False

    @property
    def share_at_most_zero(self) -> float:
        """The share of resamples whose statistic is <= 0 (for a difference A - B: how often A does not win)."""
        defined = self.samples[np.isfinite(self.samples)]
        return float(np.mean(defined <= 0)) if defined.size else float("nan")

    def format(self, scale: float = 100.0, digits: int = 1) -> str:
        """``"18.3 [16.1, 20.4]"``: estimate and interval, times ``scale`` (percent by default); a paired
        difference is signed and followed by the share of resamples <= 0: ``"+7.1 [-2.7, +16.5], P(<=0) 0.09"``."""
        sign = "+" if self.paired else ""
        text = (f"{self.estimate * scale:{sign}.{digits}f} [{self.low * scale:{sign}.{digits}f}, "
                f"{self.high * scale:{sign}.{digits}f}]")
        return f"{text}, P(<=0) {self.share_at_most_zero:.2f}" if self.paired else text


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


def _bca_levels(estimate: float, samples: np.ndarray, jackknife: np.ndarray, level: float) -> np.ndarray | None:
    """The two BCa quantile levels, or None where BCa is undefined (scipy.stats.bootstrap's formulas)."""
    normal = NormalDist()
    below = (np.sum(samples < estimate) + np.sum(samples <= estimate)) / (2 * samples.size)
    jackknife = jackknife[np.isfinite(jackknife)]
    if not 0.0 < below < 1.0 or jackknife.size < 2:
        return None
    z0 = normal.inv_cdf(float(below))
    u = (jackknife.size - 1) * (jackknife.mean() - jackknife)
    spread = np.sum(u**2) / jackknife.size**2
    if spread == 0:
        return None
    acceleration = np.sum(u**3) / jackknife.size**3 / (6 * spread**1.5)
    z = np.array([normal.inv_cdf((1 - level) / 2), normal.inv_cdf((1 + level) / 2)])
    return np.array([normal.cdf(v) for v in z0 + (z0 + z) / (1 - acceleration * (z0 + z))])


def interval(statistic: Statistic, n_images: int, *, n_resamples: int = N_RESAMPLES, seed: int = 0,
             level: float = LEVEL, paired: bool = False) -> Interval:
    """The BCa bootstrap interval of a statistic of image weights (module docstring).

    Args:
        statistic: image weights float64[B, n_images] -> float64[B] (NaN where undefined).
        n_images: n. n_resamples: B. seed: of the resampling. level: coverage.
        paired: the statistic is a difference of two (recorded for formatting).

    Raises:
        ValueError: no images, bad ``n_resamples`` or ``level``.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap: level {level!r} must be in (0, 1), e.g. 0.95")
    estimate = float(statistic(np.ones((1, n_images)))[0])
    samples = statistic(resample_weights(n_images, n_resamples, seed))
    defined = samples[np.isfinite(samples)]
    levels = None
    if defined.size and np.isfinite(estimate):
        levels = _bca_levels(estimate, defined, statistic(1.0 - np.eye(n_images)), level)
    method = "BCa" if levels is not None else "percentile"
    if levels is None:
        levels = np.array([(1 - level) / 2, (1 + level) / 2])
    low, high = np.quantile(defined, levels) if defined.size else (float("nan"), float("nan"))
    return Interval(estimate, float(low), float(high), level, samples.size, seed, method, samples, paired)


def paired_interval(statistic_a: Statistic, statistic_b: Statistic, n_images: int, **options) -> Interval:
    """BCa interval of the difference ``A - B`` of two statistics of the same images, both computed on the
    same resamples (and the same jackknife), with the share of resamples ``<= 0`` (:attr:`Interval.share_at_most_zero`).
    ``options``: those of :func:`interval`."""
    return interval(lambda weights: statistic_a(weights) - statistic_b(weights), n_images, paired=True, **options)


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample without any class present: NaN
        return np.nanmean(values, axis=1)


def map_statistic(dets: Detections, gt: GroundTruth, iou: float = 0.5, metric: str = "voc07",
                  classes: np.ndarray | None = None) -> Statistic:
    """The VOC mAP as a statistic of image weights (matching is done once, here).

    Args:
        dets, gt: as for ``gradloc.scoring.voc.evaluate``.
        iou: IoU threshold. metric: ``voc07`` (11-point) or ``voc10`` (all-point).
        classes: int64 indices of the classes the mean runs over (e.g. those with enough images); None: all.

    Returns:
        weights float64[B, n_images] -> float64[B] mAP over those classes with >= 1 weighted non-difficult GT
        box (NaN if none). With unit weights it is ``evaluate``'s mAP.
    """
    batched_ap = ap_kernel(metric)
    matches = match_detections(dets, gt, [iou])
    n_classes, n_images = len(gt.classes), len(gt.image_ids)
    easy = ~gt.difficult
    positives = np.zeros((n_images, n_classes))
    np.add.at(positives, (gt.image_index[easy], gt.labels[easy]), 1.0)
    ranked_images = dets.image_index[matches.order]
    eps = np.finfo(np.float64).eps
    kept = np.arange(n_classes) if classes is None else np.asarray(classes, dtype=np.int64)

    def statistic(weights: np.ndarray) -> np.ndarray:
        weighted_positives = weights @ positives  # [B, C]
        aps = np.full(weighted_positives.shape, np.nan)
        for c in kept:
            lo, hi = matches.bounds[c], matches.bounds[c + 1]
            w = weights[:, ranked_images[lo:hi]]
            tp = np.cumsum(w * matches.tp[0, lo:hi], axis=1)
            fp = np.cumsum(w * matches.fp[0, lo:hi], axis=1)
            npos = weighted_positives[:, c]
            present = npos > 0
            recall = tp[present] / npos[present, None]
            precision = tp[present] / np.maximum(tp[present] + fp[present], eps)
            aps[present, c] = batched_ap(recall, precision)
        return _nanmean_rows(aps[:, kept])

    return statistic


def map_samples(dets: Detections, gt: GroundTruth, weights: np.ndarray, iou: float = 0.5,
                metric: str = "voc07") -> np.ndarray:
    """mAP of every resample given as image weights float64[B, n_images] (:func:`map_statistic`)."""
    return map_statistic(dets, gt, iou, metric)(weights)


def map_interval(dets: Detections, gt: GroundTruth, iou: float = 0.5, metric: str = "voc07",
                 classes: np.ndarray | None = None, **options) -> Interval:
    """BCa interval of the VOC mAP at one IoU (``metric`` ``voc07`` = 11-point, ``voc10`` = all-point; ``classes``
    as for :func:`map_statistic`; ``options``: those of :func:`interval`)."""
    return interval(map_statistic(dets, gt, iou, metric, classes), len(gt.image_ids), **options)


def class_rate_statistic(labels: np.ndarray, image_index: np.ndarray, hit: np.ndarray, counted: np.ndarray,
                         n_classes: int, absent_as_zero: bool = False) -> Statistic:
    """The mean over classes of ``hits_c / pairs_c`` as a statistic of image weights.

    Args:
        labels, image_index: int64[P] class and image of each pair. hit, counted: bool[P].
        n_classes: C.
        absent_as_zero: average over all C classes with a class without counted pairs as 0 (TorchRay's
            pointing-game mean); False: over the classes with >= 1 weighted counted pair.

    Returns:
        weights float64[B, n_images] -> float64[B] (NaN where no class has a pair).
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    image_index = np.asarray(image_index, dtype=np.int64).reshape(-1)
    hit, counted = np.asarray(hit, dtype=bool), np.asarray(counted, dtype=bool)

    def statistic(weights: np.ndarray) -> np.ndarray:
        n_images = weights.shape[1]
        hits = np.zeros((n_images, n_classes))
        pairs = np.zeros((n_images, n_classes))
        np.add.at(hits, (image_index[hit & counted], labels[hit & counted]), 1.0)
        np.add.at(pairs, (image_index[counted], labels[counted]), 1.0)
        num, den = weights @ hits, weights @ pairs
        with np.errstate(invalid="ignore", divide="ignore"):
            rates = np.where(den > 0, num / den, 0.0 if absent_as_zero else np.nan)
        return rates.mean(axis=1) if absent_as_zero else _nanmean_rows(rates)

    return statistic


def class_rate_samples(labels: np.ndarray, image_index: np.ndarray, hit: np.ndarray, counted: np.ndarray,
                       n_classes: int, weights: np.ndarray) -> np.ndarray:
    """:func:`class_rate_statistic` (present classes) of image weights float64[B, n_images]."""
    return class_rate_statistic(labels, image_index, hit, counted, n_classes)(weights)


def corloc_statistic(dets: Detections, gt: GroundTruth, iou: float = 0.5) -> Statistic:
    """The mean CorLoc (``gradloc.scoring.localization.corloc``) at one IoU as a statistic of image weights."""
    labels, images, hit = corloc_hits(dets, gt, iou)
    return class_rate_statistic(labels, images, hit, np.ones_like(hit), len(gt.classes))


def corloc_interval(dets: Detections, gt: GroundTruth, iou: float = 0.5, **options) -> Interval:
    """BCa interval of the mean CorLoc at one IoU (``options``: those of :func:`interval`)."""
    return interval(corloc_statistic(dets, gt, iou), len(gt.image_ids), **options)


def pointing_statistic(image_index: np.ndarray, labels: np.ndarray, points: np.ndarray, gt: GroundTruth,
                       tolerance: float = 15.0, protocol: str = "gradloc", absent_as_zero: bool = False) -> Statistic:
    """The mean pointing-game accuracy (``gradloc.scoring.localization.pointing_game``) as a statistic of image
    weights; ``absent_as_zero``: TorchRay's mean over all classes (see :func:`class_rate_statistic`)."""
    hit, counted = pointing_hits(image_index, labels, points, gt, tolerance, protocol)
    return class_rate_statistic(labels, image_index, hit, counted, len(gt.classes), absent_as_zero)


def pointing_interval(image_index: np.ndarray, labels: np.ndarray, points: np.ndarray, gt: GroundTruth,
                      tolerance: float = 15.0, protocol: str = "gradloc", absent_as_zero: bool = False,
                      **options) -> Interval:
    """BCa interval of the mean pointing-game accuracy (``options``: those of :func:`interval`)."""
    statistic = pointing_statistic(image_index, labels, points, gt, tolerance, protocol, absent_as_zero)
    return interval(statistic, len(gt.image_ids), **options)


def max_box_acc_statistic(hits: np.ndarray, pair_image: np.ndarray) -> Statistic:
    """Mean over δ of ``max_τ BoxAcc(τ, δ)`` (MaxBoxAccV2 for δ = 0.3/0.5/0.7, MaxBoxAcc for δ = 0.5 alone) as a
    statistic of image weights.

    Args:
        hits: bool[P, T, D] from ``gradloc.scoring.wsol.box_hits`` (concatenated over images).
        pair_image: int64[P] image of each pair.

    Returns:
        weights float64[B, n_images] -> float64[B] (NaN where a resample holds no pair).
    """
    hits = np.asarray(hits, dtype=np.float64)
    pair_image = np.asarray(pair_image, dtype=np.int64)
    if hits.ndim != 3 or pair_image.shape != (hits.shape[0],):
        raise ValueError(f"bootstrap: hits {hits.shape} must be (P, T, D) with one image per pair "
                         f"(pair_image {pair_image.shape})")
    flat = hits.reshape(hits.shape[0], -1)

    def statistic(weights: np.ndarray) -> np.ndarray:
        pair_weights = weights[:, pair_image]  # [B, P]
        correct = (pair_weights @ flat).reshape(-1, *hits.shape[1:])
        n = pair_weights.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            accuracy = correct / n[:, None, None]
        return accuracy.max(axis=1).mean(axis=1)

    return statistic


def max_box_acc_samples(hits: np.ndarray, pair_image: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """:func:`max_box_acc_statistic` of image weights float64[B, n_images]."""
    return max_box_acc_statistic(hits, pair_image)(weights)


def max_box_acc_interval(hits: np.ndarray, pair_image: np.ndarray, n_images: int, **options) -> Interval:
    """BCa interval of MaxBoxAcc / MaxBoxAccV2 from pair hits (``options``: those of :func:`interval`)."""
    return interval(max_box_acc_statistic(hits, pair_image), n_images, **options)
