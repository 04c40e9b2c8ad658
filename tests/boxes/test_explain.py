"""Tests of gradloc.boxes.explain: which classes of an image get boxes."""

from __future__ import annotations

import numpy as np
import pytest

from gradloc.boxes.explain import EXPLAIN, explained_classes


@pytest.mark.parametrize(("explain", "expected"), [("predicted", [1, 3]), ("gt", [0, 2]), ("all", [0, 1, 2, 3])])
def test_explained_classes_per_explain_setting(explain, expected):
    probabilities = np.array([0.1, 0.9, 0.4, 0.5])
    assert explained_classes(explain, probabilities, np.array([2, 0, 2]), 0.5).tolist() == expected


def test_every_rule_returns_sorted_int64_indices():
    probabilities = np.array([0.9, 0.1, 0.7])
    for explain in EXPLAIN:
        classes = explained_classes(explain, probabilities, np.array([2, 2, 0]), 0.5)
        assert classes.dtype == np.int64 and np.all(np.diff(classes) > 0)
