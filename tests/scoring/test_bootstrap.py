"""Bootstrap intervals: the vectorised resampling equals a slow loop that rebuilds and rescores each resample."""

from __future__ import annotations

import numpy as np
import pytest

from gradloc.core.formats import Detections, GroundTruth
from gradloc.scoring.bootstrap import (
    Interval,
    class_rate_samples,
    class_rate_statistic,
    corloc_interval,
    corloc_statistic,
    interval,
    map_interval,
    map_samples,
    map_statistic,
    max_box_acc_interval,
    max_box_acc_samples,
    paired_interval,
    pointing_interval,
    resample_indices,
    resample_weights,
)
from gradloc.scoring.localization import corloc, pointing_game, pointing_hits
from gradloc.scoring.voc import evaluate
from gradloc.scoring.wsol import max_box_acc_from_hits

CLASSES = ["cat", "dog", "bird"]


def _random_case(seed: int, n_images: int = 12) -> tuple[Detections, GroundTruth]:
    """Seeded GT (some difficult) and detections near or away from it, with distinct continuous scores."""
    rng = np.random.default_rng(seed)
    image_ids = [f"im{i}" for i in range(n_images)]
    gt_rows, det_rows = [], []
    for i in range(n_images):
        for _ in range(int(rng.integers(0, 3))):
            c = int(rng.integers(0, len(CLASSES)))
            x, y = rng.integers(1, 60, 2)
            w, h = rng.integers(5, 40, 2)
            gt_box = [x, y, x + w, y + h]
            gt_rows.append((i, c, gt_box, bool(rng.random() < 0.2)))
            for _ in range(int(rng.integers(0, 3))):  # detections near the GT box (some TP, some duplicates)
                jitter = rng.integers(-6, 7, 4)
                det = np.array(gt_box) + jitter
                det[2:] = np.maximum(det[2:], det[:2])
                det_rows.append((i, c, det))
        for _ in range(int(rng.integers(0, 3))):  # false positives anywhere
            x, y = rng.integers(1, 80, 2)
            det_rows.append((i, int(rng.integers(0, len(CLASSES))), np.array([x, y, x + 10, y + 10])))
    gt = GroundTruth(CLASSES, image_ids, np.full((n_images, 2), 100), np.array([r[0] for r in gt_rows]),
                     np.array([r[1] for r in gt_rows]), np.array([r[2] for r in gt_rows], float).reshape(-1, 4),
                     np.array([r[3] for r in gt_rows], bool))
    dets = Detections(0.1, "max", "all", CLASSES, image_ids, np.array([r[0] for r in det_rows]),
                      np.array([r[1] for r in det_rows]), rng.permutation(len(det_rows)) / len(det_rows) + 0.01,
                      np.array([r[2] for r in det_rows], float).reshape(-1, 4))
    return dets, gt


def _resample(dets: Detections, gt: GroundTruth, drawn: np.ndarray) -> tuple[Detections, GroundTruth]:
    """The resampled dataset: the drawn images, in draw order, as new images (copies of a drawn-twice image)."""
    gt_parts = [np.flatnonzero(gt.image_index == i) for i in drawn]
    det_parts = [np.flatnonzero(dets.image_index == i) for i in drawn]
    gt_rows = np.concatenate(gt_parts).astype(np.int64)
    det_rows = np.concatenate(det_parts).astype(np.int64)
    new_gt_image = np.repeat(np.arange(drawn.size), [p.size for p in gt_parts])
    new_det_image = np.repeat(np.arange(drawn.size), [p.size for p in det_parts])
    ids = [f"copy{k}" for k in range(drawn.size)]
    new_gt = GroundTruth(gt.classes, ids, gt.image_sizes[drawn], new_gt_image, gt.labels[gt_rows],
                         gt.boxes[gt_rows], gt.difficult[gt_rows])
    new_dets = Detections(dets.threshold, dets.threshold_mode, dets.box_mode, dets.classes, ids, new_det_image,
                          dets.labels[det_rows], dets.scores[det_rows], dets.boxes[det_rows])
    return new_dets, new_gt


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("metric", ["voc07", "voc10"])
def test_map_samples_equal_slow_loop(seed: int, metric: str) -> None:
    dets, gt = _random_case(seed)
    n_resamples = 40
    slow = []
    for drawn in resample_indices(len(gt.image_ids), n_resamples, seed):
        frame = evaluate(*_resample(dets, gt, drawn), iou_thresholds=[0.5], metric=metric)
        slow.append(frame.loc[frame["class"] == "mAP", "ap"].iloc[0])
    fast = map_samples(dets, gt, resample_weights(len(gt.image_ids), n_resamples, seed), 0.5, metric)
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12, equal_nan=True)
    assert np.unique(np.round(fast, 9)).size > 5  # the resamples really differ


@pytest.mark.parametrize("seed", range(3))
def test_corloc_and_pointing_samples_equal_slow_loop(seed: int) -> None:
    dets, gt = _random_case(10 + seed)
    rng = np.random.default_rng(seed)
    n = 40
    pair_image, pair_label = gt.image_index.copy(), gt.labels.copy()
    points = (gt.boxes[:, :2] + rng.integers(-20, 20, (gt.boxes.shape[0], 2))).astype(float)
    slow_corloc, slow_pointing = [], []
    for drawn in resample_indices(len(gt.image_ids), n, seed):
        new_dets, new_gt = _resample(dets, gt, drawn)
        slow_corloc.append(corloc(new_dets, new_gt).iloc[-1]["corloc"])
        rows = np.concatenate([np.flatnonzero(pair_image == i) for i in drawn]).astype(np.int64)
        images = np.repeat(np.arange(drawn.size), [np.sum(pair_image == i) for i in drawn])
        frame = pointing_game(images, pair_label[rows], points[rows], new_gt, protocol="torchray")
        slow_pointing.append(frame.iloc[-1]["accuracy"])
    weights = resample_weights(len(gt.image_ids), n, seed)
    interval = corloc_interval(dets, gt, n_resamples=n, seed=seed)
    np.testing.assert_allclose(interval.samples, slow_corloc, rtol=0, atol=1e-12, equal_nan=True)
    hit, counted = pointing_hits(pair_image, pair_label, points, gt, protocol="torchray")
    fast = class_rate_samples(pair_label, pair_image, hit, counted, len(CLASSES), weights)
    np.testing.assert_allclose(fast, slow_pointing, rtol=0, atol=1e-12, equal_nan=True)
    pointing = pointing_interval(pair_image, pair_label, points, gt, protocol="torchray", n_resamples=n, seed=seed)
    np.testing.assert_array_equal(pointing.samples, fast)
    assert pointing.estimate == pytest.approx(
        pointing_game(pair_image, pair_label, points, gt, protocol="torchray").iloc[-1]["accuracy"])


def test_max_box_acc_samples_equal_slow_loop() -> None:
    rng = np.random.default_rng(5)
    n_images, n_pairs = 15, 25
    pair_image = np.sort(rng.integers(0, n_images, n_pairs))
    hits = rng.random((n_pairs, 100, 3)) < np.linspace(0.1, 0.6, 100)[None, :, None]
    slow = []
    for drawn in resample_indices(n_images, 30, 3):
        rows = np.concatenate([np.flatnonzero(pair_image == i) for i in drawn]).astype(np.int64)
        slow.append(max_box_acc_from_hits(hits[rows]).iloc[-1]["max_box_acc"])
    fast = max_box_acc_samples(hits, pair_image, resample_weights(n_images, 30, 3))
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)
    full = max_box_acc_interval(hits, pair_image, n_images, n_resamples=30, seed=3)
    assert full.estimate == pytest.approx(max_box_acc_from_hits(hits).iloc[-1]["max_box_acc"])


def test_same_seed_same_numbers_and_interval_contains_estimate() -> None:
    dets, gt = _random_case(1, n_images=30)
    a = map_interval(dets, gt, n_resamples=1000, seed=7)
    b = map_interval(dets, gt, n_resamples=1000, seed=7)
    c = map_interval(dets, gt, n_resamples=1000, seed=8)
    assert (a.low, a.high) == (b.low, b.high) and (a.low, a.high) != (c.low, c.high)
    assert a.low <= a.estimate <= a.high and a.low < a.high
    assert a.n_resamples == 1000 and a.samples.shape == (1000,)


def test_weights_are_counts_of_the_indices() -> None:
    index = resample_indices(5, 4, 0)
    weights = resample_weights(5, 4, 0)
    assert weights.sum(axis=1).tolist() == [5, 5, 5, 5]
    for row, drawn in zip(weights, index, strict=True):
        assert row.tolist() == np.bincount(drawn, minlength=5).tolist()


def test_interval_format_and_percentile_fallback() -> None:
    samples = np.arange(101) / 100  # 0.00 .. 1.00: 2.5 % and 97.5 % quantiles 0.025 and 0.975
    made = Interval(0.183, 0.161, 0.204, 0.95, 101, 0, "BCa", samples)
    assert made.format() == "18.3 [16.1, 20.4]"
    assert made.format(scale=1.0, digits=3) == "0.183 [0.161, 0.204]"
    difference = Interval(0.071, -0.027, 0.165, 0.95, 4, 0, "BCa", np.array([-0.1, 0.0, 0.1, 0.2]), paired=True)
    assert difference.share_at_most_zero == 0.5
    assert difference.format() == "+7.1 [-2.7, +16.5], P(<=0) 0.50"
    # every resample above the estimate: BCa's bias correction is undefined, the percentile interval is used
    one_sided = interval(lambda w: np.where((w == 1).all(axis=1), 0.5, 0.6), 10, n_resamples=50)
    assert one_sided.method == "percentile" and one_sided.low == one_sided.high == 0.6


def _scipy_bca(statistic, n_images: int, n_resamples: int, seed: int, level: float = 0.95):
    """scipy.stats.bootstrap(method="BCa") of a statistic of image weights, resampling image indices."""
    scipy_stats = pytest.importorskip("scipy.stats")

    def of_indices(index: np.ndarray, axis: int = -1) -> np.ndarray:
        rows = np.atleast_2d(index)
        weights = np.zeros((rows.shape[0], n_images))
        np.add.at(weights, (np.arange(rows.shape[0])[:, None], rows), 1.0)
        values = statistic(weights)
        return values[0] if np.ndim(index) == 1 else values

    return scipy_stats.bootstrap((np.arange(n_images),), of_indices, vectorized=True, n_resamples=n_resamples,
                                 confidence_level=level, method="BCa", rng=np.random.default_rng(seed))


@pytest.mark.parametrize("seed", range(3))
def test_bca_interval_equals_scipy_on_the_same_resamples(seed: int) -> None:
    """Same draws (default_rng(seed).integers(0, n, (B, n))), same z0 (ties count half), same jackknife
    acceleration: scipy's BCa bounds to rounding."""
    dets, gt = _random_case(seed, n_images=40)
    statistic = map_statistic(dets, gt, 0.5, "voc07")
    ours = interval(statistic, 40, n_resamples=400, seed=seed)
    reference = _scipy_bca(statistic, 40, 400, seed)
    assert ours.method == "BCa"
    np.testing.assert_allclose(ours.samples, reference.bootstrap_distribution, rtol=0, atol=1e-12)
    assert (ours.low, ours.high) == pytest.approx(tuple(reference.confidence_interval), abs=1e-12)
    assert ours.estimate == pytest.approx(evaluate(dets, gt, [0.5]).query("`class` == 'mAP'")["ap"].iloc[0])
    corloc = corloc_interval(dets, gt, n_resamples=400, seed=seed)
    reference = _scipy_bca(corloc_statistic(dets, gt), 40, 400, seed)
    assert (corloc.low, corloc.high) == pytest.approx(tuple(reference.confidence_interval), abs=1e-12)


def _shifted(dets: Detections, seed: int) -> Detections:
    """Another method's detections of the same images: the same boxes moved by a few pixels, rescored."""
    rng = np.random.default_rng(seed)
    boxes = dets.boxes + rng.integers(-8, 9, dets.boxes.shape)
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2])
    return Detections(dets.threshold, dets.threshold_mode, dets.box_mode, dets.classes, dets.image_ids,
                      dets.image_index, dets.labels, rng.random(len(dets)) + 0.01, boxes)


def test_paired_difference_equals_a_slow_loop_and_scipy() -> None:
    """The paired interval resamples images once for both methods: each resample's difference equals
    rescoring both methods on that resampled dataset; its BCa bounds are scipy's on the difference."""
    dets_a, gt = _random_case(4, n_images=30)
    dets_b = _shifted(dets_a, 1)
    n = 60
    slow = []
    for drawn in resample_indices(30, n, 2):
        scores = [evaluate(*_resample(dets, gt, drawn), iou_thresholds=[0.5]) for dets in (dets_a, dets_b)]
        a, b = (float(frame.loc[frame["class"] == "mAP", "ap"].iloc[0]) for frame in scores)
        slow.append(a - b)
    stat_a, stat_b = map_statistic(dets_a, gt), map_statistic(dets_b, gt)
    difference = paired_interval(stat_a, stat_b, 30, n_resamples=n, seed=2)
    np.testing.assert_allclose(difference.samples, slow, rtol=0, atol=1e-12)
    assert difference.paired and difference.share_at_most_zero == pytest.approx(np.mean(np.array(slow) <= 0))
    reference = _scipy_bca(lambda w: stat_a(w) - stat_b(w), 30, n, 2)
    assert (difference.low, difference.high) == pytest.approx(tuple(reference.confidence_interval), abs=1e-12)
    # paired is tighter than the two separate intervals' widths when the methods move together
    separate = [interval(stat, 30, n_resamples=n, seed=2) for stat in (stat_a, stat_b)]
    assert difference.high - difference.low < sum(s.high - s.low for s in separate)


def test_pointing_mean_over_all_classes_counts_absent_classes_as_zero() -> None:
    labels, images = np.array([0, 0, 1]), np.array([0, 1, 2])
    hit, counted = np.array([True, False, True]), np.ones(3, bool)
    one = np.ones((1, 3))
    present = class_rate_statistic(labels, images, hit, counted, 4)(one)[0]
    everything = class_rate_statistic(labels, images, hit, counted, 4, absent_as_zero=True)(one)[0]
    assert present == pytest.approx((0.5 + 1.0) / 2) and everything == pytest.approx((0.5 + 1.0) / 4)


def test_map_over_a_class_subset() -> None:
    dets, gt = _random_case(2, n_images=30)
    frame = evaluate(dets, gt, [0.5]).set_index("class")
    keep = np.array([0, 2])
    assert map_statistic(dets, gt, 0.5, "voc07", keep)(np.ones((1, 30)))[0] == pytest.approx(
        np.nanmean(frame.loc[[CLASSES[c] for c in keep], "ap"]))


def test_errors() -> None:
    with pytest.raises(ValueError, match="no images"):
        resample_indices(0)
    with pytest.raises(ValueError, match="n_resamples"):
        resample_indices(3, 0)
    dets, gt = _random_case(0)
    with pytest.raises(ValueError, match="unknown AP metric"):
        map_interval(dets, gt, metric="coco", n_resamples=10)
