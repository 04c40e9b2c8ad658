"""Which classes of an image get heatmaps cut into boxes (``boxes.explain``, ``--explain``).

* ``predicted``: the classes the model predicts, probability >= ``score_cut`` (``score_cut 0``: every class, so
  classification and localization are scored together, as a detector is);
* ``gt``: the image's GT classes, difficult included (GT-known, the WSOL protocol: classification is not scored);
* ``all``: every class of the model.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# name -> (probabilities float64[C], GT labels int64[M] of the image, score cut) -> explained class indices
EXPLAIN: dict[str, Callable[[np.ndarray, np.ndarray, float], np.ndarray]] = {
    "predicted": lambda probabilities, gt_labels, score_cut: np.flatnonzero(probabilities >= score_cut),
    "gt": lambda probabilities, gt_labels, score_cut: np.unique(gt_labels),
    "all": lambda probabilities, gt_labels, score_cut: np.arange(len(probabilities)),
}


def explained_classes(explain: str, probabilities: np.ndarray, gt_labels: np.ndarray, score_cut: float) -> np.ndarray:
    """Sorted int64 indices of the classes of one image that get boxes under rule ``explain`` (:data:`EXPLAIN`).

    Args:
        explain: a key of :data:`EXPLAIN`.
        probabilities: float64[C] class probabilities of the image.
        gt_labels: int64[M] classes of the image's GT boxes.
        score_cut: the probability cut of ``predicted``.
    """
    return np.asarray(EXPLAIN[explain](probabilities, gt_labels, score_cut), dtype=np.int64)
