"""Tests of gradloc.scoring.classification: the devkit's image-classification AP."""

from __future__ import annotations

import numpy as np
import pytest

from gradloc.scoring.classification import classification_map


def test_classification_map_hand_computed():
    # class 0: ranking (ignoring the label-0 image) is +, -, +: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1.
    # 11-point AP: t in 0..0.5 -> 1 (6 points), t in 0.6..1 -> 2/3 (5 points) = (6 + 10/3) / 11.
    # class 1 has no positive image: NaN, left out of the mean.
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.95, 0.4]])
    labels = np.array([[1, -1], [-1, -1], [1, -1], [0, 0]])
    mean_ap, aps = classification_map(scores, labels)
    assert aps[0] == pytest.approx((6 + 10 / 3) / 11) and np.isnan(aps[1])
    assert mean_ap == pytest.approx((6 + 10 / 3) / 11)


def test_classification_map_stable_ties():
    # tied scores keep image order: +, - gives AP 1; -, + gives precision 1/2 at recall 1 -> AP 1/2
    assert classification_map(np.array([[0.5], [0.5]]), np.array([[1], [-1]]))[0] == pytest.approx(1.0)
    assert classification_map(np.array([[0.5], [0.5]]), np.array([[-1], [1]]))[0] == pytest.approx(0.5)
