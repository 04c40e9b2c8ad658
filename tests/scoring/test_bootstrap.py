"""Bootstrap intervals: the vectorised resampling equals a slow loop that rebuilds and rescores each resample."""

from __future__ import annotations

import numpy as np
import pytest

from gradloc.core.formats import Detections, GroundTruth
from gradloc.scoring.bootstrap import (
    Interval,
    class_rate_samples,
    corloc_interval,
    map_interval,
    map_samples,
    max_box_acc_interval,
    max_box_acc_samples,
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


def test_interval_format_and_quantiles() -> None:
    samples = np.arange(101) / 100  # 0.00 .. 1.00: 2.5 % and 97.5 % quantiles 0.025 and 0.975
    interval = Interval(0.183, 0.161, 0.204, 0.95, 101, 0, samples)
    assert interval.format() == "18.3 [16.1, 20.4]"
    assert interval.format(scale=1.0, digits=3) == "0.183 [0.161, 0.204]"
    from gradloc.scoring.bootstrap import _interval

    made = _interval(0.5, np.r_[samples, np.nan], 0.95, 0)
    assert (made.low, made.high) == pytest.approx((0.025, 0.975))


def test_errors() -> None:
    with pytest.raises(ValueError, match="no images"):
        resample_indices(0)
    with pytest.raises(ValueError, match="n_resamples"):
        resample_indices(3, 0)
    dets, gt = _random_case(0)
    with pytest.raises(ValueError, match="unknown AP metric"):
        map_interval(dets, gt, metric="coco", n_resamples=10)
