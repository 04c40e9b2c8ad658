"""Tests of gradloc.run.folds: every image in exactly one fold, folds balanced in size and in each class."""

from __future__ import annotations

import numpy as np
import pytest

from gradloc.run.folds import stratified_folds


def _labels(seed: int, n: int = 200, c: int = 8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rates = np.linspace(0.02, 0.5, c)  # from rare to common classes
    labels = np.where(rng.random((n, c)) < rates, 1, -1).astype(np.int8)
    labels[rng.random((n, c)) < 0.05] = 0  # difficult-only: not a positive
    return labels


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [2, 5])
def test_every_image_is_in_one_fold_and_folds_are_balanced(seed: int, k: int) -> None:
    labels = _labels(seed)
    fold = stratified_folds(labels, k, seed)
    assert fold.shape == (len(labels),) and fold.dtype == np.int64 and set(fold) == set(range(k))
    sizes = np.bincount(fold, minlength=k)
    assert sizes.max() - sizes.min() <= 0.1 * len(labels) / k + 2
    present = labels == 1
    for c in range(labels.shape[1]):
        per_fold = np.bincount(fold[present[:, c]], minlength=k)
        assert per_fold.max() - per_fold.min() <= 1 + 0.2 * present[:, c].sum() / k  # the class spread evenly


def test_a_rare_class_lands_in_as_many_folds_as_it_has_images() -> None:
    labels = np.full((50, 2), -1, np.int8)
    labels[:, 1] = 1
    labels[[3, 17, 40], 0] = 1  # three images of a rare class
    fold = stratified_folds(labels, 5, seed=0)
    assert len(set(fold[[3, 17, 40]])) == 3


def test_seeded_and_checked() -> None:
    labels = _labels(1, n=40)
    np.testing.assert_array_equal(stratified_folds(labels, 4, 3), stratified_folds(labels, 4, 3))
    assert not np.array_equal(stratified_folds(labels, 4, 3), stratified_folds(labels, 4, 4))
    with pytest.raises(ValueError, match="give between 2 and 40 folds"):
        stratified_folds(labels, 1)
    with pytest.raises(ValueError, match="give between 2 and 40 folds"):
        stratified_folds(labels, 41)
