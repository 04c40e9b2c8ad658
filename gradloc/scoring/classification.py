"""VOC image-classification AP (the devkit's classification task), used to report a head."""

from __future__ import annotations

import numpy as np

from gradloc.scoring.voc import voc_ap


def _average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """VOC07 11-point AP of a ranking (descending score, stable sort), via :func:`voc_ap`.

    Args:
        scores: float[N] scores of the images that count for the class (label 1 or -1).
        positive: bool[N] whether each image holds the class.
    """
    hits = positive[np.argsort(-scores, kind="stable")].astype(np.float64)
    tp, fp = np.cumsum(hits), np.cumsum(1.0 - hits)
    recall = tp / max(int(positive.sum()), 1)
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return voc_ap(recall, precision, "voc07")


def classification_map(scores: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """VOC classification mAP of image scores against devkit labels (Everingham et al., 2010).

    Per class, AP = (1/11) * sum over t in {0, 0.1, ..., 1} of max(precision[recall >= t]) (VOC07 11-point),
    ranking images by descending score with a stable sort.

    Images whose only instances of a class are difficult (label 0) are ignored for that class, as in the
    devkit; mAP averages over classes with at least one positive image.

    Args:
        scores: float[N, C] class scores. labels: int[N, C] in {1, 0, -1}.

    Returns:
        (mAP, float64[C] per-class AP with NaN for classes without positives).
    """
    aps = np.full(labels.shape[1], np.nan)
    for c in range(labels.shape[1]):
        counted = labels[:, c] != 0
        if np.any(labels[:, c] == 1):
            aps[c] = _average_precision(scores[counted, c], labels[counted, c] == 1)
    return (float(np.nanmean(aps)) if np.any(~np.isnan(aps)) else float("nan")), aps
