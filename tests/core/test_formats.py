"""Tests for gradloc.core.formats: containers, validation, pickle round trips (safe loading: test_io.py)."""

from __future__ import annotations

import pickle
import re

import numpy as np
import pytest

from gradloc.core.files import safe_load_pickle, save_pickle
from gradloc.core.formats import (
    DETECTIONS_FORMAT,
    GT_FORMAT,
    Detections,
    GroundTruth,
    load_detections,
    load_ground_truth,
)
from gradloc.run.folder import threshold_filename


def gt_fields(**overrides) -> dict:
    fields = {
        "classes": ["cat", "dog"],
        "image_ids": ["000001", "000002"],
        "image_sizes": np.array([[500, 375], [353, 500]], dtype=np.int64),
        "image_index": np.array([0, 1, 1], dtype=np.int64),
        "labels": np.array([0, 1, 0], dtype=np.int64),
        "boxes": np.array([[1.0, 1, 10, 10], [5, 5, 353, 500], [20, 30, 40, 50]]),
        "difficult": np.array([False, True, False]),
    }
    fields.update(overrides)
    return fields


def det_fields(**overrides) -> dict:
    fields = {
        "threshold": 0.2,
        "threshold_mode": "max",
        "box_mode": "largest",
        "classes": ["cat", "dog"],
        "image_ids": ["000001", "000002"],
        "image_index": np.array([0, 1], dtype=np.int64),
        "labels": np.array([1, 0], dtype=np.int64),
        "scores": np.array([0.9, 0.25]),
        "boxes": np.array([[2.0, 3, 4, 5], [1, 1, 353, 500]]),
        "meta": {"method": "gradcam", "layer": "features.7"},
    }
    fields.update(overrides)
    return fields


# --- file names ---------------------------------------------------------------------------------------------


def test_threshold_filename():
    assert threshold_filename(0.02) == "thr_0.020.pkl"
    assert threshold_filename(0.0) == "thr_0.000.pkl"
    assert threshold_filename(1.0) == "thr_1.000.pkl"
    assert threshold_filename(0.1 + 0.2) == "thr_0.300.pkl"  # 0.30000000000000004 is still 0.3
    with pytest.raises(ValueError, match="more than 3 decimals"):
        threshold_filename(0.0125)
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        threshold_filename(1.5)


# --- round trips --------------------------------------------------------------------------------------------


def test_ground_truth_round_trip(tmp_path):
    gt = GroundTruth(**gt_fields())
    save_pickle(gt, tmp_path / "gt.pkl")
    loaded = load_ground_truth(tmp_path / "gt.pkl")
    assert loaded.classes == ["cat", "dog"] and loaded.image_ids == ["000001", "000002"]
    for name in ("image_sizes", "image_index", "labels", "boxes", "difficult"):
        expected = gt_fields()[name]
        assert np.array_equal(getattr(loaded, name), expected), name
        assert getattr(loaded, name).dtype == expected.dtype, name
    assert safe_load_pickle(tmp_path / "gt.pkl")["format"] == GT_FORMAT


def test_detections_round_trip_and_identical_bytes(tmp_path):
    dets = Detections(**det_fields())
    save_pickle(dets, tmp_path / "one" / "thr_0.200.pkl")  # creates the folder
    save_pickle(Detections(**det_fields()), tmp_path / "two.pkl")
    assert (tmp_path / "one" / "thr_0.200.pkl").read_bytes() == (tmp_path / "two.pkl").read_bytes()
    loaded = load_detections(tmp_path / "two.pkl")
    assert (loaded.threshold, loaded.threshold_mode, loaded.box_mode) == (0.2, "max", "largest")
    assert loaded.meta == {"method": "gradcam", "layer": "features.7"}
    assert len(loaded) == 2
    for name in ("image_index", "labels", "scores", "boxes"):
        assert np.array_equal(getattr(loaded, name), det_fields()[name]), name
        assert getattr(loaded, name).dtype == det_fields()[name].dtype, name
    assert safe_load_pickle(tmp_path / "two.pkl")["format"] == DETECTIONS_FORMAT


def test_empty_detections_round_trip(tmp_path):
    empty = det_fields(image_index=np.zeros(0, np.int64), labels=np.zeros(0, np.int64), scores=np.zeros(0),
                       boxes=np.zeros((0, 4)))
    save_pickle(Detections(**empty), tmp_path / "empty.pkl")
    loaded = load_detections(tmp_path / "empty.pkl")
    assert len(loaded) == 0 and loaded.boxes.shape == (0, 4)


# --- validation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"labels": np.array([0, 1, 0], dtype=np.int32)}, "'labels' has dtype int32"),
        ({"difficult": np.array([0, 1, 0])}, "'difficult' has dtype int64"),
        ({"labels": np.array([0, 1], dtype=np.int64)}, "differ in length"),
        ({"labels": np.array([0, 2, 0], dtype=np.int64)}, r"'labels' holds values outside \[0, 2\)"),
        ({"image_index": np.array([0, -1, 0], dtype=np.int64)}, r"'image_index' holds values outside"),
        ({"boxes": np.zeros((3, 3))}, r"shape \(3, 3\), expected \(N, 4\)"),
        ({"boxes": np.array([[1.0, 1, np.inf, 10], [1, 1, 2, 2], [1, 1, 2, 2]])}, "non-finite"),
        ({"image_sizes": np.array([[500, 375]], dtype=np.int64)}, "image_sizes has shape"),
    ],
)
def test_ground_truth_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        GroundTruth(**gt_fields(**overrides))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"scores": np.array([0.9, 0.25], dtype=np.float32)}, "'scores' has dtype float32"),
        ({"scores": np.array([0.9])}, "differ in length"),
        ({"image_index": np.array([0, 2], dtype=np.int64)}, r"'image_index' holds values outside \[0, 2\)"),
        ({"boxes": np.array([[2.0, 3, 4, np.nan], [1, 1, 2, 2]])}, "non-finite"),
    ],
)
def test_detections_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        Detections(**det_fields(**overrides))


def test_from_dict_checks_format_and_fields():
    data = Detections(**det_fields()).to_dict()
    expected = r"run\.pkl: format is 'gradloc\.gt/1', expected 'gradloc\.detections/1'"
    with pytest.raises(ValueError, match=expected):
        Detections.from_dict({**data, "format": GT_FORMAT}, source="run.pkl")
    with pytest.raises(ValueError, match=r"missing field.*scores"):
        Detections.from_dict({k: v for k, v in data.items() if k != "scores"})
    with pytest.raises(ValueError, match="expected a dict"):
        GroundTruth.from_dict([1, 2, 3])
    assert Detections.from_dict({k: v for k, v in data.items() if k != "meta"}).meta == {}


def test_loaders_validate_content(tmp_path):
    path = tmp_path / "gt_as_dets.pkl"
    save_pickle(GroundTruth(**gt_fields()), path)
    with pytest.raises(ValueError, match=r"gt_as_dets\.pkl: format is 'gradloc\.gt/1'"):
        load_detections(path)


@pytest.mark.parametrize("change, message", [
    ({"boxes": np.array([[np.nan, 1, 10, 10], [5, 5, 353, 500], [20, 30, 40, 50]])}, "non-finite"),
    ({"labels": np.array([0, 1], dtype=np.int64)}, "differ in length"),
    ({"labels": np.array([0, 1, 5], dtype=np.int64)}, "outside"),
], ids=["nan box", "array lengths", "class index"])
def test_content_errors_name_the_file(tmp_path, change, message):
    """Issue 9 item 5: validation errors of a loaded pickle name the file (before: 'ground truth: ...')."""
    data = GroundTruth(**gt_fields()).to_dict() | change
    path = tmp_path / "broken_gt.pkl"
    path.write_bytes(pickle.dumps(data))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: .*{message}"):
        load_ground_truth(path)


def test_image_labels_follow_the_devkit_convention():
    gt = GroundTruth(classes=["cat", "dog", "car"], image_ids=["a", "b"], image_sizes=np.array([[10, 10], [10, 10]]),
                     image_index=np.array([0, 0, 1, 1]), labels=np.array([0, 1, 1, 1]),
                     boxes=np.tile([1.0, 1.0, 5.0, 5.0], (4, 1)), difficult=np.array([False, True, True, False]))
    # a: cat present, dog difficult only; b: one difficult and one normal dog -> present; car nowhere
    assert gt.image_labels().tolist() == [[1, 0, -1], [-1, 1, -1]]


# --- read_array: every array of a file is checked for dtype and values (issue 18 item 6) ---------------------


@pytest.mark.parametrize(("value", "kind", "expected"), [
    (np.array([0, 3], dtype=np.int32), "index", np.array([0, 3])),
    ([0.0, 3.0], "index", np.array([0, 3])),
    (np.array([True, False]), "flag", np.array([True, False])),
    (np.array([0, 1], dtype=np.uint8), "flag", np.array([False, True])),
    ([0.0, 1.0], "flag", np.array([False, True])),
    ([], "index", np.zeros(0)),
    (np.array([1, 2], dtype=np.int16), "number", np.array([1.0, 2.0])),
])
def test_read_array_accepts_exact_values(value, kind, expected):
    from gradloc.core.formats import read_array

    array = read_array({"x": value}, "x", kind, "f.pkl")
    np.testing.assert_array_equal(array, expected)
    assert array.dtype == {"index": np.int64, "flag": np.bool_, "number": np.float64}[kind]


@pytest.mark.parametrize(("value", "kind", "message"), [
    (np.array(["0", "1"]), "flag", r"holds <U1 values \(first '0'\), expected bool or 0/1 values"),
    ([0, 2], "flag", "holds 2, expected bool or 0/1 values"),
    ([0.5], "flag", "holds 0.5"),
    ([0.0, 1.5], "index", "holds 1.5, expected whole numbers"),
    ([float("nan")], "index", "holds nan"),
    (np.array([True]), "index", "holds bool values"),
    ([[0, 1]], "index", r"has shape \(1, 2\), expected \(N,\)"),
    ([[1, 2, 3]], "box", r"has shape \(1, 3\), expected \(N, 4\)"),
    ("01", "flag", "is a str"),
    ({"a": 1}, "number", "is a dict"),
    ([1, [2]], "number", "not a regular array"),
    (np.array([2**63 + 5], dtype=np.uint64), "index", "too large"),
], ids=["str flags", "flag 2", "flag 0.5", "fractional index", "nan index", "bool index", "2-D index",
        "3 columns", "a string", "a dict", "ragged", "uint64 overflow"])
def test_read_array_refuses_and_names_the_field(value, kind, message):
    from gradloc.core.formats import read_array

    columns = 4 if kind == "box" else None
    with pytest.raises(ValueError, match=rf"^f\.pkl: field 'x' .*{message}"):
        read_array({"x": value}, "x", kind, "f.pkl", columns=columns)


def test_names_are_distinct_strings(tmp_path):
    for classes, message in ((["cat", "cat"], "lists 'cat' twice"), (["cat", 3], "holds 3, a int"),
                             ("cat", "is a str")):
        path = tmp_path / "gt.pkl"
        path.write_bytes(pickle.dumps({"format": GT_FORMAT, **gt_fields(classes=classes)}))
        with pytest.raises(ValueError, match=rf"gt\.pkl: field 'classes' {message}"):
            load_ground_truth(path)


def test_an_inverted_gt_box_is_blamed_on_the_gt_file(tmp_path):
    boxes = np.array([[10.0, 1, 1, 10], [5, 5, 353, 500], [20, 30, 40, 50]])
    path = tmp_path / "gt.pkl"
    path.write_bytes(pickle.dumps({"format": GT_FORMAT, **gt_fields(boxes=boxes)}))
    with pytest.raises(ValueError, match=r"gt\.pkl: ground truth: field 'boxes' row 0 is \[10\.0, 1\.0, 1\.0, 10\.0\], "
                                         r"with x2 < x1"):
        load_ground_truth(path)
