"""Tests of gradloc.scoring.localization: CorLoc, box accuracy over a run's thresholds, the pointing game (both
protocols)."""

from __future__ import annotations

import numpy as np
import pytest

from gradloc.core.formats import Detections, GroundTruth
from gradloc.scoring.localization import best_box_acc, box_acc_table, corloc, pointing_game, pointing_hits
from tests.scoring.cases import CLASSES, FAR, IMAGES, box, make_dets, make_gt


def test_corloc_by_hand():
    classes = ["cat", "dog", "bird"]
    gt = make_gt([("a", "cat", box(1, 1), False), ("b", "cat", box(1, 1), False),
                  ("c", "cat", box(1, 1, 10, 20), True), ("c", "dog", box(21, 21), False)], classes=classes)
    dets = make_dets([
        ("a", "cat", 0.9, box(1, 1)), ("a", "cat", 0.5, FAR),  # top box hits
        ("b", "cat", 0.9, FAR), ("b", "cat", 0.8, box(1, 1)),  # top box misses; the second does not count
        ("c", "cat", 0.7, box(1, 1)),  # IoU exactly 0.5 with a difficult box: a hit (>=, difficult counts)
        ("d", "cat", 0.9, box(1, 1)),  # image without cat: ignored
        ("a", "dog", 0.9, box(21, 21)),  # dog in image c has no detection: miss
    ], classes=classes)
    df = corloc(dets, gt, iou=0.5)
    assert list(df.columns) == ["class", "iou", "hits", "n_images", "corloc"]
    rows = df.set_index("class")
    assert (rows.loc["cat", "hits"], rows.loc["cat", "n_images"]) == (2, 3)
    assert rows.loc["cat", "corloc"] == pytest.approx(2 / 3)
    assert (rows.loc["dog", "hits"], rows.loc["dog", "n_images"], rows.loc["dog", "corloc"]) == (0, 1, 0.0)
    assert np.isnan(rows.loc["bird", "corloc"]) and rows.loc["bird", "n_images"] == 0
    assert rows.loc["mean", "corloc"] == pytest.approx((2 / 3 + 0.0) / 2)
    assert corloc(dets, gt, iou=0.55).set_index("class").loc["cat", "hits"] == 1


def test_corloc_counts_images_once_and_breaks_ties_by_input_order():
    gt = make_gt([("a", "cat", box(1, 1), False), ("a", "cat", box(30, 30), False)])
    hit_first = make_dets([("a", "cat", 0.5, box(30, 30)), ("a", "cat", 0.5, FAR)])
    miss_first = make_dets([("a", "cat", 0.5, FAR), ("a", "cat", 0.5, box(30, 30))])
    assert corloc(hit_first, gt).set_index("class").loc["cat", ["hits", "n_images"]].tolist() == [1, 1]
    assert corloc(miss_first, gt).set_index("class").loc["cat", "hits"] == 0
    with pytest.raises(ValueError, match=r"outside \(0, 1\)"):
        corloc(hit_first, gt, iou=0.0)
    with pytest.raises(ValueError, match="image_ids"):
        corloc(make_dets([], image_ids=["a"]), gt)


def _box_acc_case() -> tuple[dict[float, Detections], GroundTruth]:
    gt = make_gt([("a", "cat", box(1, 1), False), ("b", "cat", box(1, 1), False),
                  ("b", "dog", box(21, 21), False)])
    low = make_dets([("a", "cat", 1.0, box(1, 1)), ("b", "cat", 1.0, FAR), ("b", "dog", 1.0, box(21, 21))],
                    threshold=0.1)
    high = make_dets([
        ("a", "cat", 1.0, box(1, 1, 10, 20)),  # IoU 0.5
        ("b", "cat", 1.0, FAR), ("b", "cat", 0.1, box(1, 1)),  # any detection of the pair may hit
        ("b", "dog", 1.0, box(21, 21, 10, 16)),  # IoU 100 / 160 = 0.625
        ("c", "dog", 1.0, box(1, 1)),  # no dog in c: not a pair
    ], threshold=0.2)
    return {0.2: high, 0.1: low}, gt


def test_box_acc_table_by_hand():
    dets_by_threshold, gt = _box_acc_case()
    table = box_acc_table(dets_by_threshold, gt, (0.3, 0.5, 0.7))
    assert list(table.columns) == ["threshold", "iou", "hits", "n_pairs", "box_acc"]
    assert table["threshold"].tolist() == [0.1] * 3 + [0.2] * 3
    assert table["hits"].tolist() == [2, 2, 2, 3, 3, 1]
    assert set(table["n_pairs"]) == {3}
    assert table["box_acc"].tolist() == pytest.approx([2 / 3, 2 / 3, 2 / 3, 1.0, 1.0, 1 / 3])


def test_max_box_acc_by_hand():
    dets_by_threshold, gt = _box_acc_case()
    df = best_box_acc(dets_by_threshold, gt, (0.3, 0.5, 0.7))
    assert list(df.columns) == ["iou", "best_threshold", "max_box_acc", "n_pairs"]
    assert df["iou"].tolist() == [0.3, 0.5, 0.7, "mean"]
    assert df["best_threshold"].tolist()[:3] == [0.2, 0.2, 0.1]
    assert np.isnan(df["best_threshold"].iloc[3])
    assert df["max_box_acc"].tolist() == pytest.approx([1.0, 1.0, 2 / 3, (1 + 1 + 2 / 3) / 3])
    single = best_box_acc(dets_by_threshold, gt)
    assert len(single) == 1 and single["iou"].tolist() == [0.5] and single["max_box_acc"].iloc[0] == 1.0


def test_max_box_acc_ties_pick_smallest_threshold_and_errors():
    dets_by_threshold, gt = _box_acc_case()
    same = {0.3: dets_by_threshold[0.1], 0.1: dets_by_threshold[0.1]}
    assert best_box_acc(same, gt)["best_threshold"].iloc[0] == 0.1
    with pytest.raises(ValueError, match="no detections"):
        best_box_acc({}, gt)
    with pytest.raises(ValueError, match=r"outside \(0, 1\)"):
        best_box_acc(dets_by_threshold, gt, (0.5, 1.2))
    with pytest.raises(ValueError, match=r"threshold 0\.4 .*classes"):
        best_box_acc({0.4: make_dets([], classes=["cat"])}, gt)


def test_pointing_game_by_hand():
    gt = make_gt([("a", "cat", box(11, 11), False), ("a", "dog", box(31, 31), True)])  # cat x, y in 11..20
    pairs = [
        ("a", "cat", (15, 15)),  # inside: distance 0
        ("a", "cat", (35, 15)),  # 15 px right of x2 = 20: hit (<= 15)
        ("a", "cat", (36, 15)),  # 16 px: miss
        ("a", "cat", (31, 32)),  # diagonal: sqrt(11^2 + 12^2) = 16.3 px: miss
        ("a", "dog", (20, 20)),  # difficult dog box counts: sqrt(11^2 + 11^2) = 15.6 px: miss
        ("a", "dog", (31.5, 25)),  # 6 px above the difficult dog box: hit
        ("b", "dog", (5, 5)),  # no dog in b: miss
    ]
    image_index = np.array([IMAGES.index(p[0]) for p in pairs])
    labels = np.array([CLASSES.index(p[1]) for p in pairs])
    points = np.array([p[2] for p in pairs], dtype=float)
    df = pointing_game(image_index, labels, points, gt, tolerance=15.0)
    assert list(df.columns) == ["class", "hits", "n", "accuracy", "protocol"]
    assert df["protocol"].unique().tolist() == ["gradloc (15 px)"]
    rows = df.set_index("class")
    assert rows.loc["cat", ["hits", "n"]].tolist() == [2, 4] and rows.loc["cat", "accuracy"] == 0.5
    assert rows.loc["dog", ["hits", "n"]].tolist() == [1, 3]
    assert rows.loc["mean", "accuracy"] == pytest.approx((0.5 + 1 / 3) / 2)
    strict = pointing_game(image_index, labels, points, gt, tolerance=0.0).set_index("class")
    assert strict.loc["cat", "hits"] == 1 and strict.loc["dog", "hits"] == 0


def test_pointing_game_errors_and_empty():
    gt = make_gt([("a", "cat", box(11, 11), False)])
    df = pointing_game(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 2)), gt)
    assert df["n"].tolist() == [0, 0, 0] and df["accuracy"].isna().all()
    with pytest.raises(ValueError, match="same N pairs"):
        pointing_game(np.array([0]), np.array([0, 1]), np.zeros((2, 2)), gt)
    with pytest.raises(ValueError, match=r"labels holds values outside \[0, 2\)"):
        pointing_game(np.array([0]), np.array([2]), np.zeros((1, 2)), gt)
    with pytest.raises(ValueError, match="tolerance"):
        pointing_game(np.array([0]), np.array([0]), np.zeros((1, 2)), gt, tolerance=-1.0)


def _torchray_outcome(gt: GroundTruth, image: int, label: int, point: np.ndarray, tolerance: float) -> int:
    """TorchRay's rule (benchmark/pointing_game.py, re-written for the test): 0 = skipped (the class's boxes in
    the image are all difficult, or there are none), +1 hit, -1 miss; the class mask is the union of all its
    boxes (difficult included), a hit needs a mask pixel with squared distance < tolerance^2 from the point."""
    rows = np.flatnonzero((gt.image_index == image) & (gt.labels == label))
    if all(gt.difficult[rows]):
        return 0
    width, height = gt.image_sizes[image]
    mask = np.zeros((height, width), dtype=bool)
    for x1, y1, x2, y2 in gt.boxes[rows].astype(int):
        mask[y1 - 1 : y2, x1 - 1 : x2] = True
    u, v = point[0] - 1, point[1] - 1  # VOC 1-based -> 0-based pixel coordinates
    dv, du = np.meshgrid((np.arange(height) - v) ** 2, (np.arange(width) - u) ** 2, indexing="ij")
    return 1 if (mask & (dv + du < tolerance**2)).any() else -1


@pytest.mark.parametrize("seed", range(6))
def test_pointing_game_torchray_protocol_equals_its_rule(seed: int):
    rng = np.random.default_rng(seed)
    images = [f"i{k}" for k in range(6)]
    rows = []
    for name in images:
        for _ in range(int(rng.integers(1, 4))):
            x1, y1 = (int(v) for v in rng.integers(1, 60, 2))
            w, h = (int(v) for v in rng.integers(1, 30, 2))
            rows.append((name, CLASSES[int(rng.integers(0, 2))], [x1, y1, min(x1 + w, 100), min(y1 + h, 100)],
                         bool(rng.random() < 0.3)))
    gt = make_gt(rows, image_ids=images)
    n = 200
    image_index = rng.integers(0, len(images), n)
    labels = rng.integers(0, 2, n)
    points = rng.integers(1, 101, (n, 2)).astype(float)
    points[::3] += rng.uniform(-0.5, 0.5, points[::3].shape)  # some non-integer points too
    # points exactly 15 px right of a box's last column: a hit for gradloc, a miss for TorchRay
    easy = int(np.flatnonzero(~gt.difficult)[0])
    first = gt.boxes[easy]
    points[:5] = [first[2] + 15, (first[1] + first[3]) // 2]
    image_index[:5], labels[:5] = gt.image_index[easy], gt.labels[easy]
    hits = pointing_game(image_index, labels, points, gt, protocol="torchray").set_index("class")
    outcome = np.array([_torchray_outcome(gt, i, c, p, 15.0) for i, c, p in zip(image_index, labels, points,
                                                                                strict=True)])
    assert set(outcome.tolist()) == {-1, 0, 1}
    for c, name in enumerate(CLASSES):
        assert hits.loc[name, "hits"] == np.sum((labels == c) & (outcome == 1))
        assert hits.loc[name, "n"] == np.sum((labels == c) & (outcome != 0))


@pytest.mark.filterwarnings("ignore:torch.meshgrid:UserWarning")
def test_pointing_game_torchray_protocol_equals_torchray_itself():
    """The installed TorchRay package (test extra): ``PointingGameBenchmark.evaluate`` on VOC-format labels."""
    pointing = pytest.importorskip("torchray.benchmark.pointing_game")
    from torchray.benchmark.datasets import VOC_CLASSES
    from torchvision import datasets

    benchmark = pointing.PointingGameBenchmark(object.__new__(datasets.VOCDetection), tolerance=15)
    rng = np.random.default_rng(3)
    rows = []
    for name in IMAGES:
        for _ in range(int(rng.integers(1, 4))):
            x1, y1 = (int(v) for v in rng.integers(1, 60, 2))
            w, h = (int(v) for v in rng.integers(1, 30, 2))
            rows.append((name, CLASSES[int(rng.integers(0, 2))], [x1, y1, min(x1 + w, 100), min(y1 + h, 100)],
                         bool(rng.random() < 0.3)))
    gt = make_gt(rows)
    n = 300
    image_index, labels = rng.integers(0, len(IMAGES), n), rng.integers(0, 2, n)
    points = rng.integers(1, 101, (n, 2)).astype(float)
    hit, counted = pointing_hits(image_index, labels, points, gt, protocol="torchray")
    outcomes = []
    for i, c, (x, y) in zip(image_index, labels, points, strict=True):
        objects = [{"name": CLASSES[gt.labels[r]], "difficult": str(int(gt.difficult[r])),
                    "bndbox": dict(zip(("xmin", "ymin", "xmax", "ymax"), (str(int(v)) for v in gt.boxes[r]),
                                       strict=True))}
                   for r in np.flatnonzero(gt.image_index == i)]
        label = {"annotation": {"filename": f"{IMAGES[i]}.jpg", "size": {"width": "100", "height": "100"},
                                "object": objects}}
        outcomes.append(benchmark.evaluate(label, VOC_CLASSES.index(CLASSES[c]), (x - 1, y - 1)))
    outcomes = np.array(outcomes)
    assert set(outcomes.tolist()) == {-1, 0, 1}
    np.testing.assert_array_equal(counted, outcomes != 0)
    np.testing.assert_array_equal(hit, outcomes == 1)


def test_pointing_game_protocols_differ_at_exactly_the_tolerance():
    gt = make_gt([("a", "cat", box(11, 11), False), ("b", "cat", box(11, 11), True)])  # x in 11..20
    image_index, labels = np.array([0, 0, 1]), np.array([0, 0, 0])
    points = np.array([[35.0, 15.0], [29.0, 32.0], [15.0, 15.0]])  # 15 px; sqrt(9^2 + 12^2) = 15 px; difficult
    ours = pointing_game(image_index, labels, points, gt, protocol="gradloc").set_index("class")
    torchray = pointing_game(image_index, labels, points, gt, protocol="torchray").set_index("class")
    assert ours.loc["cat", ["hits", "n"]].tolist() == [3, 3]
    assert torchray.loc["cat", ["hits", "n"]].tolist() == [0, 2]  # the all-difficult pair is skipped
    assert torchray["protocol"].iloc[0] == "torchray (15 px)"
    with pytest.raises(ValueError, match="unknown pointing-game protocol 'ebp'"):
        pointing_game(image_index, labels, points, gt, protocol="ebp")
