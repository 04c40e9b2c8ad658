"""k-fold cross-validation folds of a split, stratified by class, for choosing settings on held-out images.

Multi-label iterative stratification (Sechidis, Tsoumakas & Vlahavas, "On the Stratification of Multi-Label
Data", ECML PKDD 2011): the label with the fewest images left is placed first, each of its images going to the
fold that most lacks that label (ties: the fold that most lacks images, then a seeded draw), so even a class
with a handful of images is spread over the folds. Every image belongs to exactly one fold.
"""

from __future__ import annotations

import numpy as np


def stratified_folds(labels: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Fold of each image.

    Args:
        labels: int8[N, C] devkit image labels (1 present, 0 difficult only, -1 absent); a class counts for an
            image when it is 1.
        k: number of folds, 2 <= k <= N.
        seed: of the tie-breaking draws.

    Returns:
        int64[N] fold ids in ``range(k)``.

    Raises:
        ValueError: ``k`` outside [2, N].
    """
    present = np.asarray(labels) == 1
    n = present.shape[0]
    if not 2 <= k <= n:
        raise ValueError(f"{k} folds of {n} images: give between 2 and {n} folds")
    rng = np.random.default_rng(seed)
    fold = np.full(n, -1, dtype=np.int64)
    images_wanted = np.full(k, n / k)
    labels_wanted = np.outer(np.full(k, 1 / k), present.sum(axis=0))  # [k, C]
    left = np.ones(n, dtype=bool)
    while left.any():
        counts = present[left].sum(axis=0)
        if not counts.any():  # images without any label: to the folds that most lack images
            for i in rng.permutation(np.flatnonzero(left)):
                f = int(np.argmax(images_wanted + rng.random(k) * 1e-9))
                fold[i], images_wanted[f], left[i] = f, images_wanted[f] - 1, False
            break
        c = int(np.argmin(np.where(counts > 0, counts, np.iinfo(np.int64).max)))
        for i in rng.permutation(np.flatnonzero(left & present[:, c])):
            need = labels_wanted[:, c]
            best = np.flatnonzero(need == need.max())
            best = best[images_wanted[best] == images_wanted[best].max()]
            f = int(rng.choice(best))
            fold[i], left[i] = f, False
            images_wanted[f] -= 1
            labels_wanted[f] -= present[i]
    return fold
