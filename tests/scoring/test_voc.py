"""Tests of gradloc.scoring.voc: IoU, the AP kernel, evaluate by hand, properties, and exact agreement with the
devkit loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradloc.core.formats import Detections, GroundTruth
from gradloc.scoring.reference import reference_evaluate
from gradloc.scoring.voc import METRICS, evaluate, iou_matrix, match_detections, voc_ap
from tests.conftest import VOC_ROOT
from tests.scoring.cases import FAR, IMAGES, box, make_dets, make_gt, one


def test_iou_uses_inclusive_pixel_areas():
    # 10x10 boxes overlapping in a 5x5 block: 25 / (100 + 100 - 25)
    out = iou_matrix(np.array([[1.0, 1, 10, 10]]), np.array([[6.0, 6, 15, 15]]))
    assert out.shape == (1, 1)
    assert out[0, 0] == 25 / 175


def test_iou_zero_width_box_is_one_pixel_wide():
    a = np.array([[5.0, 5, 5, 5], [5.0, 1, 5, 10]])
    b = np.array([[5.0, 5, 5, 5], [1.0, 1, 10, 10]])
    out = iou_matrix(a, b)
    assert out[0, 0] == 1.0  # a single pixel equals itself
    assert out[1, 1] == 10 / 100  # a 1x10 column inside a 10x10 box
    assert out[0, 1] == 1 / 100


def test_iou_touching_disjoint_and_shape():
    a = np.array([[1.0, 1, 10, 10]])
    b = np.array([[11.0, 1, 20, 10], [10.0, 1, 19, 10], [50.0, 50, 60, 60]])
    out = iou_matrix(a, b)
    assert out.shape == (1, 3)
    assert out[0, 0] == 0.0  # adjacent: no shared pixel
    assert out[0, 1] == 10 / 190  # share the pixel column x = 10
    assert out[0, 2] == 0.0
    assert iou_matrix(np.zeros((0, 4)), b).shape == (0, 3)


def test_iou_rejects_bad_boxes():
    with pytest.raises(ValueError, match="x2 < x1"):
        iou_matrix(np.array([[5.0, 5, 4, 9]]), np.array([[1.0, 1, 2, 2]]))
    with pytest.raises(ValueError, match=r"expected \(N, 4\)"):
        iou_matrix(np.array([1.0, 1, 2, 2]), np.array([[1.0, 1, 2, 2]]))


# Ranked list T F T T F against 4 positives: recall .25 .25 .5 .75 .75, precision 1 .5 2/3 .75 .6.
REC = np.array([0.25, 0.25, 0.5, 0.75, 0.75])


PREC = np.array([1.0, 0.5, 2 / 3, 0.75, 0.6])


def test_voc_ap_11_point_by_hand():
    # t = 0, .1, .2 -> 1;  t = .3 ... .7 -> .75;  t = .8, .9, 1 -> 0
    assert voc_ap(REC, PREC, "voc07") == pytest.approx((3 * 1.0 + 5 * 0.75) / 11, abs=1e-15)


def test_voc_ap_all_point_by_hand():
    # envelope 1 on (0, .25], .75 on (.25, .75], nothing beyond
    assert voc_ap(REC, PREC, "voc10") == pytest.approx(0.25 * 1.0 + 0.5 * 0.75, abs=1e-15)


def test_voc_ap_recall_exactly_0_3_misses_grid_point_0_3():
    grid = np.arange(0, 1.1, 0.1)
    assert grid[3] == 0.30000000000000004 and grid[3] > 0.3
    recall = np.array([1, 2, 3]) / 10  # 3 of 10 positives found, all at precision 1
    precision = np.ones(3)
    assert recall[-1] == 0.3
    # only t = 0, .1, .2 are reached; a naive "recall >= 0.3" grid would give 4 / 11
    assert voc_ap(recall, precision, "voc07") == pytest.approx(3 / 11, abs=1e-15)


def test_voc_ap_empty_and_errors():
    assert voc_ap(np.zeros(0), np.zeros(0), "voc07") == 0.0
    assert voc_ap(np.zeros(0), np.zeros(0), "voc10") == 0.0
    with pytest.raises(ValueError, match="voc07, voc10"):
        voc_ap(REC, PREC, "coco")
    with pytest.raises(ValueError, match="equal length"):
        voc_ap(REC, PREC[:3])
    assert set(METRICS) == {"voc07", "voc10"}


def test_evaluate_ranked_list_by_hand():
    gt = make_gt([("a", "cat", box(1, 1), False), ("b", "cat", box(1, 1), False),
                  ("c", "cat", box(1, 1), False), ("d", "cat", box(1, 1), False)])
    dets = make_dets([  # T F T T F in score order, given shuffled
        ("c", "cat", 0.7, box(1, 1)), ("a", "cat", 0.9, box(1, 1)), ("a", "cat", 0.5, FAR),
        ("b", "cat", 0.6, box(1, 1)), ("b", "cat", 0.8, FAR),
    ])
    for metric, expected in (("voc07", (3 + 5 * 0.75) / 11), ("voc10", 0.625)):
        row = one(evaluate(dets, gt, (0.5,), metric), "cat")
        assert row["ap"] == pytest.approx(expected, abs=1e-15)
        assert row["recall"] == 0.75
        assert (row["n_gt"], row["n_det"], row["metric"]) == (4, 5, metric)


def test_evaluate_recall_exactly_0_3():
    gt = make_gt([(IMAGES[i % 4], "cat", box(1 + 12 * (i // 4), 1), False) for i in range(10)])
    dets = make_dets([(IMAGES[i % 4], "cat", 1.0 - i / 10, box(1 + 12 * (i // 4), 1)) for i in range(3)])
    row = one(evaluate(dets, gt, (0.5,), "voc07"), "cat")
    assert row["recall"] == 0.3
    assert row["ap"] == pytest.approx(3 / 11, abs=1e-15)


@pytest.mark.parametrize(("first_is_tp", "expected"), [(True, 1.0), (False, 0.5)])
def test_evaluate_tied_scores_keep_input_order(first_is_tp, expected):
    gt = make_gt([("a", "cat", box(1, 1), False)])
    tp, fp = ("a", "cat", 0.5, box(1, 1)), ("a", "cat", 0.5, FAR)
    dets = make_dets([tp, fp] if first_is_tp else [fp, tp])
    # TP first: precision 1 at recall 1; FP first: precision 1/2 at recall 1
    assert one(evaluate(dets, gt, (0.5,)), "cat")["ap"] == pytest.approx(expected, abs=1e-15)


def test_evaluate_many_tied_scores_keep_input_order():
    # 40 detections in two tied groups (large enough for numpy's default quicksort to reorder ties)
    gt = make_gt([("a", "cat", box(1, 1), False)])
    low = [("a", "cat", 0.5, FAR)] * 20
    tp_first = make_dets(low + [("a", "cat", 0.7, box(1, 1))] + [("a", "cat", 0.7, FAR)] * 19)
    tp_last = make_dets(low + [("a", "cat", 0.7, FAR)] * 19 + [("a", "cat", 0.7, box(1, 1))])
    assert one(evaluate(tp_first, gt, (0.5,)), "cat")["ap"] == pytest.approx(1.0, abs=1e-15)
    assert one(evaluate(tp_last, gt, (0.5,)), "cat")["ap"] == pytest.approx(1 / 20, abs=1e-15)


def test_evaluate_detection_on_difficult_gt_is_ignored():
    gt = make_gt([("a", "cat", box(1, 1), True), ("b", "cat", box(1, 1), False)])
    dets = make_dets([("a", "cat", 0.9, box(1, 1)), ("b", "cat", 0.8, box(1, 1))])
    row = one(evaluate(dets, gt, (0.5,)), "cat")
    # ignored, not FP: the TP that follows has precision 1 (it would be 1/2 after an FP)
    assert row["ap"] == pytest.approx(1.0, abs=1e-15)
    assert (row["recall"], row["n_gt"], row["n_det"]) == (1.0, 1, 2)


def test_evaluate_best_gt_is_difficult_even_if_a_normal_box_also_matches():
    # the detection overlaps a difficult box (IoU 0.8) and a normal box (IoU 2/3): devkit takes the
    # difficult one and ignores the detection, so the normal box is never found
    gt = make_gt([("a", "cat", box(1, 1, 10, 10), True), ("a", "cat", box(1, 1, 10, 12), False)])
    dets = make_dets([("a", "cat", 0.9, box(1, 1, 10, 8))])
    assert iou_matrix(dets.boxes, gt.boxes)[0].tolist() == [80 / 100, 80 / 120]
    row = one(evaluate(dets, gt, (0.5,)), "cat")
    assert (row["ap"], row["recall"]) == (0.0, 0.0)


@pytest.mark.parametrize(("difficult_first", "recall"), [(True, 0.0), (False, 1.0)])
def test_evaluate_iou_ties_go_to_the_first_gt_box(difficult_first, recall):
    # two identical GT boxes, one difficult: the devkit's argmax takes the first in GT order
    flags = [True, False] if difficult_first else [False, True]
    gt = make_gt([("a", "cat", box(1, 1), flags[0]), ("a", "cat", box(1, 1), flags[1])])
    row = one(evaluate(make_dets([("a", "cat", 0.9, box(1, 1))]), gt, (0.5,)), "cat")
    assert (row["recall"], row["n_gt"]) == (recall, 1)


def test_evaluate_used_best_gt_makes_fp_without_fallback():
    # two GT boxes; both detections match the left box best; the second also has IoU 80/130 > 0.5 with
    # the right box, but the devkit does not fall back to it: FP
    gt = make_gt([("a", "cat", box(1, 1, 10, 10), False), ("a", "cat", box(5, 1, 10, 10), False)])
    dets = make_dets([("a", "cat", 0.9, box(1, 1, 10, 10)), ("a", "cat", 0.8, box(2, 1, 11, 10))])
    ious = iou_matrix(dets.boxes[1:], gt.boxes)[0]
    assert ious[0] == 90 / 120 and ious[1] == 80 / 130
    row = one(evaluate(dets, gt, (0.5,)), "cat")
    assert row["recall"] == 0.5


def test_evaluate_duplicate_detection_is_fp():
    gt = make_gt([("a", "cat", box(1, 1), False), ("b", "cat", box(1, 1), False)])
    dets = make_dets([("a", "cat", 0.9, box(1, 1)), ("a", "cat", 0.8, box(1, 1)),
                      ("b", "cat", 0.7, box(1, 1))])
    # T F T: recall .5 .5 1, precision 1 .5 2/3
    df07, df10 = evaluate(dets, gt, (0.5,), "voc07"), evaluate(dets, gt, (0.5,), "voc10")
    assert one(df07, "cat")["ap"] == pytest.approx((6 * 1.0 + 5 * 2 / 3) / 11, abs=1e-15)
    assert one(df10, "cat")["ap"] == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3, abs=1e-15)
    assert one(df07, "cat")["recall"] == 1.0


def test_evaluate_iou_must_exceed_threshold_strictly():
    gt = make_gt([("a", "cat", box(1, 1, 10, 20), False)])
    dets = make_dets([("a", "cat", 0.9, box(1, 1, 10, 10))])  # IoU = 100 / 200 = 0.5 exactly
    df = evaluate(dets, gt, (0.4, 0.5))
    assert one(df, "cat", 0.4)["recall"] == 1.0
    assert one(df, "cat", 0.5)["recall"] == 0.0


def test_evaluate_detection_of_absent_class_is_fp():
    gt = make_gt([("a", "cat", box(1, 1), False)])
    dets = make_dets([("b", "cat", 0.9, box(1, 1)), ("a", "cat", 0.8, box(1, 1))])
    assert one(evaluate(dets, gt, (0.5,)), "cat")["ap"] == pytest.approx(0.5, abs=1e-15)


def test_evaluate_empty_detections():
    gt = make_gt([("a", "cat", box(1, 1), False), ("b", "dog", box(1, 1), True)])
    df = evaluate(make_dets([]), gt, (0.5,), "voc10")
    cat, dog, mean = one(df, "cat"), one(df, "dog"), one(df, "mAP")
    assert (cat["ap"], cat["recall"], cat["n_det"]) == (0.0, 0.0, 0)
    assert np.isnan(dog["ap"]) and np.isnan(dog["recall"])
    assert (mean["ap"], mean["recall"]) == (0.0, 0.0)


def test_evaluate_class_with_only_difficult_gt_is_excluded_from_map():
    gt = make_gt([("a", "cat", box(1, 1), False), ("b", "dog", box(1, 1), True)])
    dets = make_dets([("a", "cat", 0.9, box(1, 1)), ("b", "dog", 0.9, box(1, 1)), ("c", "dog", 0.8, FAR)])
    df = evaluate(dets, gt, (0.5,))
    dog = one(df, "dog")
    assert np.isnan(dog["ap"]) and np.isnan(dog["recall"]) and dog["n_gt"] == 0 and dog["n_det"] == 2
    mean = one(df, "mAP")
    # 11 points of 1/11 each sum to 1.0000000000000002 in floating point, as in the devkit
    assert mean["ap"] == pytest.approx(1.0, abs=1e-15)
    assert (mean["recall"], mean["n_gt"], mean["n_det"]) == (1.0, 1, 3)


def test_evaluate_class_with_gt_but_no_detections_counts_as_zero():
    gt = make_gt([("a", "cat", box(1, 1), False), ("b", "dog", box(1, 1), False)])
    df = evaluate(make_dets([("a", "cat", 0.9, box(1, 1))]), gt, (0.5,))
    assert (one(df, "dog")["ap"], one(df, "dog")["recall"]) == (0.0, 0.0)
    assert one(df, "mAP")["ap"] == pytest.approx(0.5, abs=1e-15)


def test_evaluate_table_layout():
    gt = make_gt([("a", "cat", box(1, 1), False)])
    df = evaluate(make_dets([("a", "cat", 0.9, box(1, 1))]), gt, (0.3, 0.7), "voc10")
    assert list(df.columns) == ["iou", "metric", "class", "ap", "recall", "n_gt", "n_det"]
    assert df["iou"].tolist() == [0.3, 0.3, 0.3, 0.7, 0.7, 0.7]
    assert df["class"].tolist() == ["cat", "dog", "mAP"] * 2
    assert set(df["metric"]) == {"voc10"}


def test_match_detections_flags_and_curves():
    gt = make_gt([("a", "cat", box(1, 1), True), ("b", "cat", box(1, 1), False),
                  ("c", "dog", box(1, 1), True)])
    dets = make_dets([("b", "cat", 0.2, box(1, 1)), ("c", "dog", 0.9, box(1, 1)),
                      ("a", "cat", 0.8, box(1, 1)), ("b", "cat", 0.3, box(1, 1))])
    m = match_detections(dets, gt, (0.5, 0.3))
    assert m.order.tolist() == [2, 3, 0, 1]  # cat by descending score, then dog
    assert m.bounds.tolist() == [0, 3, 4] and m.n_gt.tolist() == [1, 0]
    # cat: ignored (difficult), TP, duplicate FP; dog: ignored
    assert m.tp.tolist() == [[0, 1, 0, 0]] * 2 and m.fp.tolist() == [[0, 0, 1, 0]] * 2
    recall, precision = m.curve(0, 1)
    assert recall.tolist() == [0.0, 1.0, 1.0] and precision.tolist() == [0.0, 1.0, 0.5]
    with pytest.raises(ValueError, match="class 1 has no non-difficult GT"):
        m.curve(1)


def test_evaluate_errors():
    gt = make_gt([("a", "cat", box(1, 1), False)])
    dets = make_dets([("a", "cat", 0.9, box(1, 1))])
    with pytest.raises(ValueError, match="different classes"):
        evaluate(make_dets([], classes=["cat", "bird"]), gt)
    with pytest.raises(ValueError, match=r"different image_ids .*position 3: 'd' vs 'e'"):
        evaluate(dets, make_gt([], image_ids=["a", "b", "c", "e"]))
    with pytest.raises(ValueError, match="different image_ids"):
        evaluate(make_dets([], image_ids=["a", "b"]), gt)
    with pytest.raises(ValueError, match="voc07, voc10"):
        evaluate(dets, gt, metric="voc12")
    for bad in (0.0, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"outside \(0, 1\)"):
            evaluate(dets, gt, (0.5, bad))
    with pytest.raises(ValueError, match="give at least one IoU threshold"):
        evaluate(dets, gt, ())
    with pytest.raises(ValueError, match="NaN"):
        evaluate(make_dets([("a", "cat", float("nan"), box(1, 1))]), gt)
    with pytest.raises(ValueError, match="x2 < x1"):
        evaluate(make_dets([("a", "cat", 0.5, [5.0, 5, 4, 9])]), gt)


THRESHOLDS = (0.1, 0.3, 0.5, 0.7)


@st.composite
def scenes(draw, distinct_scores: bool = False):
    """Small random VOC scenes with coincident boxes, tied scores and difficult flags."""
    n_images = draw(st.integers(1, 4))
    n_classes = draw(st.integers(1, 3))
    classes, image_ids = [f"c{i}" for i in range(n_classes)], [f"im{i}" for i in range(n_images)]
    coord = st.integers(1, 12)
    size = st.integers(0, 6)

    def pairs(values, n):
        drawn = draw(st.lists(st.tuples(values, values), min_size=n, max_size=n))
        return np.array(drawn, dtype=float).reshape(-1, 2)

    def boxes(n):
        xy = pairs(coord, n)
        return np.concatenate([xy, xy + pairs(size, n)], axis=1)

    def indices(limit, n):
        return np.array(draw(st.lists(st.integers(0, limit - 1), min_size=n, max_size=n)), dtype=np.int64)

    n_gt = draw(st.integers(0, 10))
    gt_boxes, gt_images, gt_labels = boxes(n_gt), indices(n_images, n_gt), indices(n_classes, n_gt)
    if n_gt > 1 and draw(st.booleans()):  # identical GT boxes in one image: IoU ties between GT boxes
        i, j = draw(st.integers(0, n_gt - 1)), draw(st.integers(0, n_gt - 1))
        gt_boxes[j], gt_images[j], gt_labels[j] = gt_boxes[i], gt_images[i], gt_labels[i]
    gt = GroundTruth(
        classes, image_ids, np.full((n_images, 2), 30, dtype=np.int64), gt_images, gt_labels, gt_boxes,
        np.array(draw(st.lists(st.booleans(), min_size=n_gt, max_size=n_gt)), dtype=bool),
    )
    n_det = draw(st.integers(0, 16))
    if distinct_scores:
        scores = draw(st.lists(st.integers(0, 10**6), min_size=n_det, max_size=n_det, unique=True))
    else:
        scores = draw(st.lists(st.integers(0, 4), min_size=n_det, max_size=n_det))
    det_boxes = boxes(n_det)
    image_index, labels = indices(n_images, n_det), indices(n_classes, n_det)
    if n_gt:  # copy some GT boxes (with their image and class) so that matches, duplicates and ties happen
        copies = draw(st.lists(st.integers(0, n_gt - 1), min_size=n_det, max_size=n_det))
        use = np.array(draw(st.lists(st.booleans(), min_size=n_det, max_size=n_det)), dtype=bool)
        src = np.array(copies, dtype=np.int64)[use]
        det_boxes[use], image_index[use], labels[use] = gt.boxes[src], gt.image_index[src], gt.labels[src]
    dets = Detections(0.5, "max", "all", classes, image_ids, image_index, labels,
                      np.array(scores, dtype=np.float64) / 4, det_boxes)
    return dets, gt


def with_rows(dets: Detections, keep: np.ndarray | None = None, **fields) -> Detections:
    """Copy of ``dets`` with rows ``keep`` (all by default) and some fields replaced."""
    keep = np.arange(len(dets)) if keep is None else keep
    data = {name: getattr(dets, name)[keep] for name in ("image_index", "labels", "scores", "boxes")}
    data.update(fields)
    return Detections(dets.threshold, dets.threshold_mode, dets.box_mode, dets.classes, dets.image_ids,
                      **data)


def assert_same_numbers(a: pd.DataFrame, b: pd.DataFrame) -> None:
    """Exact equality (NaN == NaN) of two evaluate tables."""
    pd.testing.assert_frame_equal(a, b, check_exact=True)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenes())
def test_evaluate_equals_devkit_loop_exactly(scene):
    dets, gt = scene
    for metric, use_07 in (("voc07", True), ("voc10", False)):
        df = evaluate(dets, gt, THRESHOLDS, metric)
        for thr in THRESHOLDS:
            expected = reference_evaluate(dets, gt, thr, use_07)
            for name, (ap, recall) in expected.items():
                row = one(df, name, thr)
                assert row["ap"] == ap or (np.isnan(ap) and np.isnan(row["ap"]))
                assert row["recall"] == recall or (np.isnan(recall) and np.isnan(row["recall"]))


@pytest.mark.parametrize("seed", range(10))
def test_evaluate_equals_devkit_loop_on_larger_random_scenes(seed):
    rng = np.random.default_rng(seed)
    n_images, n_classes, n_gt, n_det = 30, 5, 120, 800
    xy = rng.integers(1, 60, (n_gt, 2))
    gt = GroundTruth(
        [f"c{i}" for i in range(n_classes)], [f"im{i}" for i in range(n_images)],
        np.full((n_images, 2), 100, dtype=np.int64), rng.integers(0, n_images, n_gt),
        rng.integers(0, n_classes, n_gt), np.c_[xy, xy + rng.integers(0, 30, (n_gt, 2))].astype(float),
        rng.random(n_gt) < 0.15,
    )
    src = rng.integers(0, n_gt, n_det)
    boxes = gt.boxes[src] + rng.integers(-6, 7, (n_det, 4))
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2])
    dets = Detections(
        0.5, "max", "all", gt.classes, gt.image_ids,
        np.where(rng.random(n_det) < 0.9, gt.image_index[src], rng.integers(0, n_images, n_det)),
        np.where(rng.random(n_det) < 0.9, gt.labels[src], rng.integers(0, n_classes, n_det)),
        rng.integers(0, 50, n_det) / 50.0, boxes,
    )
    for metric, use_07 in (("voc07", True), ("voc10", False)):
        df = evaluate(dets, gt, THRESHOLDS, metric)
        for thr in THRESHOLDS:
            expected = reference_evaluate(dets, gt, thr, use_07)
            got = {row["class"]: (row["ap"], row["recall"]) for _, row in df[df["iou"] == thr].iterrows()}
            assert all(got[name] == value for name, value in expected.items())


@settings(max_examples=80, deadline=None)
@given(scenes(distinct_scores=True), st.randoms(use_true_random=False))
def test_permuting_detections_with_distinct_scores_changes_nothing(scene, random):
    dets, gt = scene
    perm = np.array(random.sample(range(len(dets)), len(dets)), dtype=np.int64)
    for metric in METRICS:
        permuted = evaluate(with_rows(dets, perm), gt, THRESHOLDS, metric)
        assert_same_numbers(evaluate(dets, gt, THRESHOLDS, metric), permuted)


@settings(max_examples=80, deadline=None)
@given(scenes(), st.randoms(use_true_random=False))
def test_permuting_images_consistently_changes_nothing(scene, random):
    dets, gt = scene
    n = len(gt.image_ids)
    perm = random.sample(range(n), n)  # new position p holds old image perm[p]
    new_position = np.argsort(perm)
    gt2 = GroundTruth(gt.classes, [gt.image_ids[i] for i in perm], gt.image_sizes[perm],
                      new_position[gt.image_index], gt.labels, gt.boxes, gt.difficult)
    dets2 = Detections(dets.threshold, dets.threshold_mode, dets.box_mode, dets.classes, gt2.image_ids,
                       new_position[dets.image_index], dets.labels, dets.scores, dets.boxes)
    for metric in METRICS:
        assert_same_numbers(evaluate(dets, gt, THRESHOLDS, metric), evaluate(dets2, gt2, THRESHOLDS, metric))


@settings(max_examples=80, deadline=None)
@given(scenes(), st.data())
def test_adding_a_lowest_scored_detection_never_lowers_recall(scene, data):
    dets, gt = scene
    image = data.draw(st.integers(0, len(gt.image_ids) - 1))
    label = data.draw(st.integers(0, len(gt.classes) - 1))
    x, y, w, h = (data.draw(st.integers(1, 12)) for _ in range(4))
    low = (dets.scores.min() if len(dets) else 1.0) - 1.0
    more = with_rows(
        dets,
        image_index=np.r_[dets.image_index, image], labels=np.r_[dets.labels, label],
        scores=np.r_[dets.scores, low], boxes=np.r_[dets.boxes, [[x, y, x + w, y + h]]],
    )
    before, after = evaluate(dets, gt, THRESHOLDS), evaluate(more, gt, THRESHOLDS)
    valid = ~before["recall"].isna()
    assert (after["recall"][valid] >= before["recall"][valid]).all()
    assert after["recall"][~valid].isna().all()


@settings(max_examples=80, deadline=None)
@given(scenes())
def test_ap_and_recall_are_fractions(scene):
    dets, gt = scene
    for metric in METRICS:
        df = evaluate(dets, gt, THRESHOLDS, metric).dropna()
        # the devkit's 11 sums of p / 11 may end at 1.0000000000000002 (kept: exact devkit values)
        assert df["ap"].between(0.0, 1.0 + 1e-15).all() and df["recall"].between(0.0, 1.0).all()
        if metric == "voc10":  # area under a curve bounded by 1 that ends at the final recall
            assert (df["ap"] <= df["recall"] + 1e-12).all()


def _parse_voc_gt(root: Path) -> GroundTruth:
    from defusedxml import ElementTree

    ids = sorted(p.stem for p in (root / "VOC2007" / "Annotations").glob("*.xml"))
    classes: list[str] = []
    image_index, labels, boxes, difficult, sizes = [], [], [], [], []
    for i, image_id in enumerate(ids):
        tree = ElementTree.parse(root / "VOC2007" / "Annotations" / f"{image_id}.xml")
        sizes.append([int(tree.findtext("size/width")), int(tree.findtext("size/height"))])
        for obj in tree.findall("object"):
            name = obj.findtext("name").strip()
            if name not in classes:
                classes.append(name)
            image_index.append(i)
            labels.append(classes.index(name))
            boxes.append([float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")])
            difficult.append(int(obj.findtext("difficult") or 0) == 1)
    return GroundTruth(classes, ids, np.array(sizes, dtype=np.int64), np.array(image_index, dtype=np.int64),
                       np.array(labels, dtype=np.int64), np.array(boxes), np.array(difficult, dtype=bool))


@pytest.mark.slow
@pytest.mark.skipif(not VOC_ROOT.is_dir(), reason=f"real VOC subset not found at {VOC_ROOT}")
def test_evaluate_equals_devkit_loop_on_real_voc_ground_truth():
    gt = _parse_voc_gt(VOC_ROOT)
    assert gt.difficult.any()
    rng = np.random.default_rng(0)
    n_det = 5000
    src = rng.integers(0, len(gt.labels), n_det)
    sizes = gt.image_sizes[gt.image_index[src]]
    boxes = np.round(gt.boxes[src] * rng.uniform(0.8, 1.2, (n_det, 4)))
    boxes[:, :2] = np.clip(boxes[:, :2], 1, sizes)
    boxes[:, 2:] = np.clip(np.maximum(boxes[:, 2:], boxes[:, :2]), 1, sizes)
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2])
    labels = np.where(rng.random(n_det) < 0.9, gt.labels[src], rng.integers(0, len(gt.classes), n_det))
    dets = Detections(0.5, "max", "all", gt.classes, gt.image_ids, gt.image_index[src], labels,
                      np.round(rng.random(n_det), 2), boxes)
    for metric, use_07 in (("voc07", True), ("voc10", False)):
        df = evaluate(dets, gt, (0.3, 0.5), metric)
        for thr in (0.3, 0.5):
            expected = reference_evaluate(dets, gt, thr, use_07)
            got = {row["class"]: (row["ap"], row["recall"]) for _, row in df[df["iou"] == thr].iterrows()}
            assert all(got[name] == value for name, value in expected.items())
            assert 0.0 < one(df, "mAP", thr)["ap"] < 1.0
