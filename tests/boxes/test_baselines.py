"""Tests of gradloc.boxes.baselines: box baselines by hand, the blob's spread and position, the derangement."""

from __future__ import annotations

import numpy as np
import pytest

from gradloc.boxes.baselines import BOX_BASELINES, MAP_BASELINES, blob_heat, center_box, derangement
from gradloc.core.geometry import Geometry, plan


def identity_geometry(width: int, height: int) -> Geometry:
    return Geometry(width, height, width, height, width, height, 0, 0)


def test_center_and_full_boxes_by_hand() -> None:
    g = plan(500, 375, 224)
    np.testing.assert_array_equal(center_box(g, 0.5), [126, 94, 375, 282])  # pixels [125, 375) x [93.75, ..)
    np.testing.assert_array_equal(center_box(identity_geometry(4, 4), 0.5), [2, 2, 3, 3])
    np.testing.assert_array_equal(center_box(identity_geometry(5, 3), 0.5), [2, 1, 4, 3])
    np.testing.assert_array_equal(center_box(identity_geometry(10, 10), 0.8), [2, 2, 9, 9])  # [1, 9) -> 2..9
    np.testing.assert_array_equal(BOX_BASELINES["full"](g, 0.5), [1, 1, 500, 375])
    np.testing.assert_array_equal(BOX_BASELINES["center"](g, 1.0), [1, 1, 500, 375])
    assert center_box(g, 0.3).dtype == np.float64
    with pytest.raises(ValueError, match=r"center box size 0 must be in \(0, 1\]"):
        center_box(g, 0)


def test_blob_has_the_spread_of_the_map_at_a_random_centre() -> None:
    heat = np.zeros((2, 60, 80), np.float32)
    yy, xx = np.mgrid[0:60, 0:80] + 0.5
    heat[0] = np.exp(-0.5 * (((xx - 20) / 6.0) ** 2 + ((yy - 30) / 3.0) ** 2))  # sigma 6 x 3
    blobs = blob_heat(heat, np.random.default_rng(0))
    assert blobs.dtype == np.float32 and blobs.shape == heat.shape
    assert not blobs[1].any()  # an all-zero map stays all-zero
    col = blobs[0].sum(axis=0) / blobs[0].sum()
    row = blobs[0].sum(axis=1) / blobs[0].sum()
    cx, cy = (col * xx[0]).sum(), (row * yy[:, 0]).sum()
    sx = np.sqrt((col * (xx[0] - cx) ** 2).sum())
    sy = np.sqrt((row * (yy[:, 0] - cy) ** 2).sum())
    if 3 * 6 < cx < 80 - 3 * 6 and 3 * 3 < cy < 60 - 3 * 3:  # away from the border the spread is kept
        assert sx == pytest.approx(6.0, rel=0.02) and sy == pytest.approx(3.0, rel=0.02)
    assert blobs[0].max() == pytest.approx(1.0, abs=0.05)
    centres = {tuple(np.unravel_index(blob_heat(heat, np.random.default_rng(s))[0].argmax(), (60, 80)))
               for s in range(5)}
    assert len(centres) == 5  # the position is random; the spread is the map's
    np.testing.assert_array_equal(blob_heat(heat, np.random.default_rng(3)), blob_heat(heat, np.random.default_rng(3)))


def test_shuffled_uses_the_partner_map_and_partners_are_other_images() -> None:
    own, partner = np.ones((1, 4, 4), np.float32), np.zeros((1, 4, 4), np.float32)
    assert MAP_BASELINES["shuffled"](own, partner, np.random.default_rng(0)) is partner
    for n in (2, 3, 10, 101):
        partners = derangement(n, seed=n)
        assert sorted(partners) == list(range(n)) and not np.any(partners == np.arange(n))
    np.testing.assert_array_equal(derangement(10, 1), derangement(10, 1))
    assert derangement(1, 0).tolist() == [0]


def test_registries_hold_the_documented_names() -> None:
    assert set(BOX_BASELINES) == {"center", "full"} and set(MAP_BASELINES) == {"shuffled", "blob"}
