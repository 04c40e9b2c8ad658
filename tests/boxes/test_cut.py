"""Tests for gradloc.boxes: hand-built heatmaps with known boxes, and the one-pass sweep against skimage."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from skimage.measure import label

from gradloc.boxes.cut import (
    BOX_MODES,
    CONFIDENCES,
    THRESHOLD_MODES,
    BoxParams,
    heatmap_to_boxes,
    image_boxes,
    peak_points,
)
from gradloc.boxes.rows import BoxRows
from gradloc.core.geometry import Geometry, plan

# Blob B (rows 1-2, cols 1-2, heat 4/4/4/8) and a vertical pair R (rows 3-4, col 4, heat 2). Total heat 24.
A = np.array(
    [
        [0, 0, 0, 0, 0],
        [0, 4, 4, 0, 0],
        [0, 4, 8, 0, 0],
        [0, 0, 0, 0, 2],
        [0, 0, 0, 0, 2],
    ],
    dtype=np.float32,
)
ROW_B = [1, 1, 3, 3, 4, 8, 5, 20 / 24]  # [c0, r0, c1, r1, area, peak, mean, mass]
ROW_R = [4, 3, 5, 5, 2, 2, 2, 4 / 24]
ROW_PEAK = [2, 2, 3, 3, 1, 8, 8, 8 / 24]
ROW_ALL = [0, 0, 5, 5, 25, 8, 24 / 25, 1.0]


def identity_geometry(width: int, height: int) -> Geometry:
    """Feature map = network input = original image: back-projection is the identity."""
    return Geometry(width, height, width, height, width, height, 0, 0)


def boxes_of(heat: np.ndarray, thresholds: list[float], **params: object) -> list[np.ndarray]:
    return heatmap_to_boxes(heat, thresholds, BoxParams(**params))


def assert_rows(got: np.ndarray, expected: list[list[float]]) -> None:
    np.testing.assert_allclose(got, np.asarray(expected, dtype=np.float64).reshape(-1, 8), rtol=1e-12, atol=0)


# --- BoxParams ----------------------------------------------------------------------------------------------


def test_registries_hold_the_documented_names() -> None:
    assert set(THRESHOLD_MODES) == {"max", "minmax", "percentile"}
    assert set(BOX_MODES) == {"largest", "all", "union"}
    assert set(CONFIDENCES) == {"score", "score_x_peak", "score_x_mean", "mass", "score_x_mass"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold_mode": "mean"}, "threshold_mode 'mean'; choose one of max, minmax, percentile"),
        ({"box_mode": "biggest"}, "box_mode 'biggest'; choose one of largest, all, union"),
        ({"confidence": "peak"}, "confidence 'peak'; choose one of score, score_x_peak, score_x_mean, mass"),
        ({"connectivity": 4}, "connectivity 4 must be 1"),
        ({"min_area": -1.0}, "min_area -1.0"),
        ({"min_area": float("nan")}, "min_area nan"),
        ({"nms_iou": 1.5}, "nms_iou 1.5"),
        ({"max_side": 0}, "max_side 0"),
        ({"max_side": 22.5}, "max_side 22.5"),
    ],
)
def test_box_params_reject_bad_values(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        BoxParams(**kwargs)


def test_thresholds_outside_unit_interval_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"threshold: 1\.5 is outside \[0, 1\]"):
        boxes_of(A, [0.5, 1.5])
    with pytest.raises(ValueError, match="threshold: nan is outside"):
        boxes_of(A, [float("nan")])


def test_bad_maps_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"one map of shape \(H, W\)"):
        boxes_of(A[None], [0.5])
    with pytest.raises(ValueError, match="NaN or infinite"):
        boxes_of(np.where(A > 5, np.nan, A), [0.5])
    with pytest.raises(ValueError, match="2 class scores for 1 maps"):
        image_boxes(A[None], np.array([1.0, 2.0]), identity_geometry(5, 5), [0.5], BoxParams())


# --- threshold semantics ------------------------------------------------------------------------------------


def test_max_threshold_keeps_pixels_at_or_above_tau_times_max() -> None:
    got = boxes_of(A, [1.0, 0.5, 0.25, 0.2, 0.0], box_mode="all")
    assert_rows(got[0], [ROW_PEAK])  # level 8: the peak only
    assert_rows(got[1], [ROW_B])  # level 4: pixels equal to the level are in
    assert_rows(got[2], [ROW_B, ROW_R])  # level 2
    assert_rows(got[3], [ROW_B, ROW_R])  # level 1.6
    assert_rows(got[4], [ROW_ALL])  # level 0: every pixel


def test_minmax_threshold_is_relative_to_the_range() -> None:
    shifted = A + 1  # min 1, max 9, total 49
    row_b = [1, 1, 3, 3, 4, 9, 6, 24 / 49]
    row_r = [4, 3, 5, 5, 2, 3, 3, 6 / 49]
    got = boxes_of(shifted, [0.5, 0.25, 0.1], threshold_mode="minmax", box_mode="all")
    assert_rows(got[0], [row_b])  # level 1 + 0.5 * 8 = 5
    assert_rows(got[1], [row_b, row_r])  # level 3
    assert_rows(got[2], [row_b, row_r])  # level 1.8: the background (1) stays out
    # ... whereas `max` at 0.1 cuts at 0.9 and takes the whole grid.
    assert_rows(boxes_of(shifted, [0.1], box_mode="all")[0], [[0, 0, 5, 5, 25, 9, 49 / 25, 1.0]])


def test_percentile_threshold_uses_numpy_linear_quantile() -> None:
    # Sorted values of A: 19 zeros, 2, 2, 4, 4, 4, 8 (indices 0..24); level = v[h] interpolated, h = τ·24.
    got = boxes_of(A, [1.0, 0.9, 0.8, 0.78, 0.75], threshold_mode="percentile", box_mode="all")
    assert_rows(got[0], [ROW_PEAK])  # h = 24: level 8
    assert_rows(got[1], [ROW_B])  # h = 21.6: level 4
    assert_rows(got[2], [ROW_B, ROW_R])  # h = 19.2: level 2
    assert_rows(got[3], [ROW_B, ROW_R])  # h = 18.72: level 0 + 0.72 · 2 = 1.44
    assert_rows(got[4], [ROW_ALL])  # h = 18: level 0


@pytest.mark.parametrize("threshold_mode", sorted(THRESHOLD_MODES))
@pytest.mark.parametrize("box_mode", sorted(BOX_MODES))
def test_all_zero_map_gives_no_boxes(threshold_mode: str, box_mode: str) -> None:
    got = boxes_of(np.zeros((4, 6), np.float32), [0.0, 0.5, 1.0], threshold_mode=threshold_mode, box_mode=box_mode)
    assert [rows.shape for rows in got] == [(0, 8)] * 3
    t_boxes = image_boxes(
        np.zeros((2, 3, 3), np.float32),
        np.ones(2),
        identity_geometry(3, 3),
        [0.0, 0.5],
        BoxParams(box_mode=box_mode),
    )
    assert [(k.size, c.size, b.shape) for k, c, b in t_boxes] == [(0, 0, (0, 4))] * 2


def test_thresholds_keep_their_order_and_duplicates() -> None:
    got = boxes_of(A, [0.25, 1.0, 0.25, 0.5], box_mode="all")
    assert_rows(got[0], [ROW_B, ROW_R])
    assert_rows(got[1], [ROW_PEAK])
    assert_rows(got[2], [ROW_B, ROW_R])
    assert_rows(got[3], [ROW_B])
    assert boxes_of(A, []) == []


# --- box modes ----------------------------------------------------------------------------------------------


def test_box_modes_on_two_components() -> None:
    assert_rows(boxes_of(A, [0.25], box_mode="largest")[0], [ROW_B])
    assert_rows(boxes_of(A, [0.25], box_mode="all")[0], [ROW_B, ROW_R])
    # union: box of both components, area 6, heat 24 -> mean 4, the box holds all the heat
    assert_rows(boxes_of(A, [0.25], box_mode="union")[0], [[1, 1, 5, 5, 6, 8, 4, 1.0]])


def test_largest_prefers_larger_area_over_raster_order() -> None:
    heat = np.zeros((5, 5), np.float32)
    heat[0, 4] = 1  # first in raster order, area 1
    heat[3, 0:3] = 1  # area 3
    assert_rows(boxes_of(heat, [0.5], box_mode="largest")[0], [[0, 3, 3, 4, 3, 1, 1, 0.75]])


def test_largest_breaks_area_ties_by_raster_order_of_first_pixel() -> None:
    heat = np.zeros((5, 5), np.float32)
    heat[0, 3:5] = 1  # first pixel (0, 3), peak 1
    heat[2:4, 0] = 3  # first pixel (2, 0), peak 3: same area, later in raster order
    assert_rows(boxes_of(heat, [0.2], box_mode="largest")[0], [[3, 0, 5, 1, 2, 1, 1, 2 / 8]])
    flipped = heat[::-1].copy()  # now the peak-3 pair comes first: (1, 0) before (4, 3)
    assert_rows(boxes_of(flipped, [0.2], box_mode="largest")[0], [[0, 1, 1, 3, 2, 3, 3, 6 / 8]])


def test_connectivity_joins_diagonal_pixels_only_at_2() -> None:
    heat = np.zeros((4, 4), np.float32)
    heat[1, 1] = heat[2, 2] = 1
    assert_rows(boxes_of(heat, [0.5], box_mode="all", connectivity=2)[0], [[1, 1, 3, 3, 2, 1, 1, 1.0]])
    assert_rows(
        boxes_of(heat, [0.5], box_mode="all", connectivity=1)[0],
        [[1, 1, 2, 2, 1, 1, 1, 0.5], [2, 2, 3, 3, 1, 1, 1, 0.5]],
    )
    assert_rows(boxes_of(heat, [0.5], box_mode="largest", connectivity=1)[0], [[1, 1, 2, 2, 1, 1, 1, 0.5]])


def test_min_area_drops_small_components_in_every_mode() -> None:
    assert_rows(boxes_of(A, [0.25], box_mode="all", min_area=3)[0], [ROW_B])
    assert_rows(boxes_of(A, [0.25], box_mode="all", min_area=2)[0], [ROW_B, ROW_R])  # area 2 >= 2 stays
    assert_rows(boxes_of(A, [0.25], box_mode="union", min_area=3)[0], [ROW_B])
    assert boxes_of(A, [0.25], box_mode="largest", min_area=5)[0].shape == (0, 8)
    # min_area is in original pixels: 12 pixels at 4 pixels per cell = 3 cells
    assert_rows(heatmap_to_boxes(A, [0.25], BoxParams(box_mode="all", min_area=12), cell_area=4.0)[0], [ROW_B])


def test_a_component_that_grows_past_min_area_is_recorded_from_then_on() -> None:
    heat = np.array([[3, 2, 1, 0]], dtype=np.float32)  # levels 3, 2, 1: areas 1, 2, 3
    got = boxes_of(heat, [1.0, 2 / 3, 1 / 3], box_mode="all", min_area=2)
    assert got[0].shape == (0, 8)
    assert_rows(got[1], [[0, 0, 2, 1, 2, 3, 2.5, 5 / 6]])
    assert_rows(got[2], [[0, 0, 3, 1, 3, 3, 2, 1.0]])


# --- confidences, NMS and VOC boxes through image_boxes -----------------------------------------------------


@pytest.mark.parametrize(
    ("confidence", "expected"),
    [
        ("score", [0.5, 0.5]),
        ("score_x_peak", [0.5 * 8 / 8, 0.5 * 2 / 8]),
        ("score_x_mean", [0.5 * 5 / 8, 0.5 * 2 / 8]),
        ("mass", [20 / 24, 4 / 24]),
        ("score_x_mass", [0.5 * 20 / 24, 0.5 * 4 / 24]),
    ],
)
def test_confidences(confidence: str, expected: list[float]) -> None:
    [(k, conf, boxes)] = image_boxes(
        A[None],
        np.array([0.5]),
        identity_geometry(5, 5),
        [0.25],
        BoxParams(box_mode="all", confidence=confidence, max_side=None),
    )
    np.testing.assert_array_equal(k, [0, 0])
    np.testing.assert_allclose(conf, expected, rtol=1e-12)
    np.testing.assert_array_equal(boxes, [[2, 2, 3, 3], [5, 4, 5, 5]])  # VOC: 1-based inclusive
    assert k.dtype == np.int64 and conf.dtype == np.float64 and boxes.dtype == np.float64


# An L (VOC box [1, 1, 4, 4], 16 px) and a 2x2 block inside its box ([3, 3, 4, 4], 4 px): IoU = 4 / 16.
L_AND_BLOCK = np.array(
    [
        [5, 5, 5, 5, 0],
        [5, 0, 0, 0, 0],
        [5, 0, 2, 2, 0],
        [5, 0, 2, 2, 0],
        [0, 0, 0, 0, 0],
    ],
    dtype=np.float32,
)


@pytest.mark.parametrize(
    ("nms_iou", "confidence", "expected_boxes"),
    [
        (None, "score", [[1, 1, 4, 4], [3, 3, 4, 4]]),
        (0.25, "score_x_peak", [[1, 1, 4, 4], [3, 3, 4, 4]]),  # IoU 0.25 is not > 0.25
        (0.2, "score_x_peak", [[1, 1, 4, 4]]),
        (0.2, "score", [[1, 1, 4, 4]]),  # equal confidences: the earlier (raster order) box wins
        (0.2, "mass", [[1, 1, 4, 4]]),  # the L's box holds all the heat, the block's 8 / 43
    ],
)
def test_nms(nms_iou: float | None, confidence: str, expected_boxes: list[list[int]]) -> None:
    [(k, _, boxes)] = image_boxes(
        L_AND_BLOCK[None],
        np.array([1.0]),
        identity_geometry(5, 5),
        [0.2],
        BoxParams(box_mode="all", confidence=confidence, nms_iou=nms_iou, max_side=None),
    )
    np.testing.assert_array_equal(boxes, expected_boxes)
    np.testing.assert_array_equal(k, np.zeros(len(expected_boxes)))


def test_nms_keeps_the_higher_confidence_box_and_works_per_class() -> None:
    inverted = np.where(L_AND_BLOCK == 2, 9, L_AND_BLOCK).astype(np.float32)  # the block is now the peak
    [(k, conf, boxes)] = image_boxes(
        np.stack([inverted, L_AND_BLOCK]),
        np.array([1.0, 2.0]),
        identity_geometry(5, 5),
        [0.2],
        BoxParams(box_mode="all", confidence="score_x_peak", nms_iou=0.2, max_side=None),
    )
    np.testing.assert_array_equal(k, [0, 1])  # one survivor per class: NMS never crosses classes
    np.testing.assert_array_equal(boxes, [[3, 3, 4, 4], [1, 1, 4, 4]])
    np.testing.assert_allclose(conf, [1.0, 2.0])


def test_full_resolution_blob_gives_its_pixels_as_voc_box() -> None:
    maps = np.zeros((1, 30, 40), np.float32)
    maps[0, 4:10, 10:20] = 1.0  # original pixels x = 11..20, y = 5..10 (1-based)
    for max_side in (None, 20):  # 20: a 20x15 grid of 2x2-pixel cells, aligned with the blob
        [(_, _, boxes)] = image_boxes(maps, np.ones(1), identity_geometry(40, 30), [0.75], BoxParams(max_side=max_side))
        np.testing.assert_array_equal(boxes, [[11, 5, 20, 10]])


def test_letterbox_column_lands_on_original_pixels() -> None:
    # 100x50 image in a 20x20 input: scale 0.2, pad_y 5. Feature column 4 (stride 1) covers canvas x in
    # [4, 5), i.e. original x in [20, 25): heat >= 0.5 where the pixel centre is within 0.5 of its centre.
    geometry = plan(100, 50, 20)
    maps = np.zeros((1, 20, 20), np.float32)
    maps[0, :, 4] = 1.0
    [(_, _, boxes)] = image_boxes(maps, np.ones(1), geometry, [0.5], BoxParams(max_side=None))
    np.testing.assert_array_equal(boxes, [[21, 1, 25, 50]])


def test_min_area_is_converted_to_working_grid_cells() -> None:
    maps = np.zeros((1, 30, 40), np.float32)
    maps[0, 4:10, 10:20] = 1.0  # 60 original pixels = 15 cells of the 20x15 grid
    for min_area, n_boxes in ((60.0, 1), (61.0, 0)):
        for max_side in (None, 20):
            [(k, _, _)] = image_boxes(
                maps,
                np.ones(1),
                identity_geometry(40, 30),
                [0.75],
                BoxParams(min_area=min_area, max_side=max_side),
            )
            assert k.size == n_boxes, (min_area, max_side)


# --- the one-pass sweep against skimage.measure.label -------------------------------------------------------


def reference_boxes(
    heat: np.ndarray,
    thresholds: list[float],
    threshold_mode: str,
    box_mode: str,
    connectivity: int,
    min_area: float,
) -> list[np.ndarray]:
    """The slow definition: label ``heat >= level`` with skimage at every threshold, then pick boxes."""
    h = heat.astype(np.float64)
    out = []
    for tau in thresholds:
        level = {
            "max": tau * h.max(),
            "minmax": h.min() + tau * (h.max() - h.min()),
            "percentile": np.quantile(h, tau),
        }[threshold_mode]
        labels = label(h >= level, connectivity=connectivity) if h.max() > 0 else np.zeros(h.shape, int)
        comps = []
        for i in range(1, labels.max() + 1):  # labels follow raster order of first pixels
            rr, cc = np.nonzero(labels == i)
            if rr.size >= min_area:
                comps.append((rr, cc))
        if box_mode == "largest" and comps:
            comps = [comps[int(np.argmax([rr.size for rr, _ in comps]))]]
        if box_mode == "union" and comps:
            comps = [(np.concatenate([rr for rr, _ in comps]), np.concatenate([cc for _, cc in comps]))]
        rows = []
        for rr, cc in comps:
            r0, r1, c0, c1 = rr.min(), rr.max() + 1, cc.min(), cc.max() + 1
            values = h[rr, cc]
            rows.append([c0, r0, c1, r1, rr.size, values.max(), values.mean(), h[r0:r1, c0:c1].sum() / h.sum()])
        out.append(np.asarray(rows, dtype=np.float64).reshape(-1, 8))
    return out


def assert_same_boxes(got: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape
        np.testing.assert_array_equal(g[:, :6], e[:, :6])  # boxes, areas and peaks exactly
        np.testing.assert_allclose(g[:, 6:], e[:, 6:], rtol=1e-9, atol=1e-12)  # means and masses


TIED_VALUES = st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 3.0])
ANY_VALUES = st.floats(0, 10, width=32)
THRESHOLDS = st.lists(
    st.one_of(st.sampled_from([0.0, 0.1, 0.25, 1 / 3, 0.5, 0.75, 1.0]), st.floats(0, 1)),
    min_size=1,
    max_size=8,
)


@settings(max_examples=150, deadline=None)
@given(
    heat=st.tuples(st.integers(1, 9), st.integers(1, 9)).flatmap(
        lambda shape: arrays(np.float32, shape, elements=st.one_of(TIED_VALUES, ANY_VALUES))
    ),
    thresholds=THRESHOLDS,
    threshold_mode=st.sampled_from(sorted(THRESHOLD_MODES)),
    connectivity=st.sampled_from([1, 2]),
    min_area=st.sampled_from([0.0, 2.0, 3.5]),
)
def test_sweep_matches_skimage_label_at_every_threshold(
    heat: np.ndarray, thresholds: list[float], threshold_mode: str, connectivity: int, min_area: float
) -> None:
    for box_mode in BOX_MODES:
        params = BoxParams(
            threshold_mode=threshold_mode, box_mode=box_mode, connectivity=connectivity, min_area=min_area
        )
        assert_same_boxes(
            heatmap_to_boxes(heat, thresholds, params),
            reference_boxes(heat, thresholds, threshold_mode, box_mode, connectivity, min_area),
        )


@pytest.mark.parametrize("seed", [0, 1])
def test_sweep_matches_skimage_on_back_projected_noise(seed: int) -> None:
    """100 thresholds on a 60x80 smooth multi-peak map (noise back-projected from 7x7), every mode."""
    from gradloc.core.geometry import upsample

    heat = upsample(np.random.default_rng(seed).random((7, 7), dtype=np.float32), plan(80, 60, 56), 80, 60)
    thresholds = [round(t, 3) for t in np.linspace(0.0, 1.0, 101)]
    for threshold_mode in THRESHOLD_MODES:
        for box_mode in BOX_MODES:
            params = BoxParams(threshold_mode=threshold_mode, box_mode=box_mode)
            assert_same_boxes(
                heatmap_to_boxes(heat, thresholds, params),
                reference_boxes(heat, thresholds, threshold_mode, box_mode, 2, 0.0),
            )



@pytest.mark.parametrize("threads", [2, 3, 7, 40])
def test_component_table_does_not_depend_on_how_the_maps_are_split(threads: int) -> None:
    """The sweep split across threads gives the single-thread table row for row (maps of every kind: noise,
    an all-zero map whose levels are inf, a constant map), including more threads than maps."""
    from gradloc.boxes.cut import component_table
    from gradloc.core.geometry import upsample

    rng = np.random.default_rng(0)
    heat = np.stack([upsample(rng.random((7, 7), dtype=np.float32), plan(80, 60, 56), 80, 60) for _ in range(20)])
    heat[5] = 0.0
    heat[11] = 0.5
    levels = np.outer(heat.reshape(20, -1).max(axis=1), np.linspace(0.05, 0.95, 10))
    levels[5] = np.inf
    one = component_table(heat, levels, 2, 3.0, threads=1)
    split = component_table(heat, levels, 2, 3.0, threads=threads)
    assert one.shape[0] > 20 * 10 and set(np.unique(one[:, 0]).astype(int)) == set(range(20)) - {5}
    np.testing.assert_array_equal(split, one)


# --- pointing game, baselines, random maps ------------------------------------------------------------------


def test_peak_points() -> None:
    tie = np.zeros((5, 5), np.float32)
    tie[2:4, 0] = 3  # tie between (row 2, col 0) and (row 3, col 0): the first in raster order
    np.testing.assert_array_equal(peak_points(np.stack([A, tie]), identity_geometry(5, 5)), [[3, 3], [1, 3]])
    # letterbox 100x50 -> 20x20 (pad_y 5): feature cell (7, 4) has its centre at canvas (4.5, 7.5),
    # original (22.5, 12.5): the centre of 0-based pixel (22, 12), VOC (23, 13).
    maps = np.zeros((1, 20, 20), np.float32)
    maps[0, 7, 4] = 1.0
    np.testing.assert_array_equal(peak_points(maps, plan(100, 50, 20)), [[23, 13]])



@pytest.mark.parametrize("thresholds", [[0.0, 5e-324], [5e-324, 1e-320, 1.0], [1.0, 1.0 - 2**-53]])
def test_thresholds_closer_than_float_resolution_do_not_break_the_sweep(thresholds: list[float]) -> None:
    """Levels that differ by a subnormal amount once overflowed the sweep's binning (0 * inf = NaN index)
    and crashed the process; they must give skimage's boxes like any other thresholds."""
    heat = np.array([[0.0, 1.0, 0.0], [0.5, 0.0, 0.25], [0.0, 0.0, 1.0]], dtype=np.float32)
    for box_mode in BOX_MODES:
        params = BoxParams(box_mode=box_mode, connectivity=1)
        assert_same_boxes(heatmap_to_boxes(heat, thresholds, params),
                          reference_boxes(heat, thresholds, "max", box_mode, 1, 0.0))


# --- BoxRows ------------------------------------------------------------------------------------------------


def test_box_rows_keep_insertion_order_per_threshold() -> None:
    rows = BoxRows(n_thresholds=2)
    rows.add(3, [1, 0], [0.5, 0.25], [[1, 1, 2, 2], [3, 3, 4, 4]], threshold_index=1)
    rows.add(0, [2], [0.75], [[5, 5, 6, 6]], threshold_index=0)
    rows.add(1, [], [], np.zeros((0, 4)), threshold_index=1)  # nothing to add
    rows.add(4, [0], [1.0], [[7, 7, 8, 8]], threshold_index=1)
    first, second = rows.per_threshold()
    assert first.image_index.tolist() == [0] and first.labels.tolist() == [2]
    assert second.image_index.tolist() == [3, 3, 4] and second.labels.tolist() == [1, 0, 0]
    assert second.scores.tolist() == [0.5, 0.25, 1.0]
    assert second.boxes[:, 0].tolist() == [1, 3, 7] and second.boxes.dtype == np.float64
    assert first.image_index.dtype == np.int64 and first.labels.dtype == np.int64


def test_box_rows_empty_and_points() -> None:
    (points,) = BoxRows(width=2).per_threshold()
    assert points.boxes.shape == (0, 2) and points.image_index.dtype == np.int64
    rows = BoxRows(width=2)
    rows.add(0, [1], [0.5], [[10, 20]])
    other = BoxRows(width=2)
    other.add(1, [0], [0.25], [[30, 40]])
    rows.extend(other)
    (points,) = rows.per_threshold()
    assert points.boxes.tolist() == [[10, 20], [30, 40]] and points.image_index.tolist() == [0, 1]
