"""COCO-style AP (gradloc.scoring.coco): the VOC -> COCO conversion by hand, hand-computed cases, and agreement
with pycocotools' COCOeval on the files gradloc exports (random detections and a real run of the demo)."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pandas as pd
import pytest

from gradloc.core.formats import Detections, GroundTruth
from gradloc.scoring.coco import (
    COCO_METRICS,
    IOU_THRESHOLDS,
    coco_evaluate,
    coco_ground_truth,
    coco_results,
    render_coco,
    voc_to_coco_boxes,
    write_coco_ground_truth,
    write_coco_results,
)


def _gt(boxes, labels, images, difficult=None, classes=("a", "b"), n_images=2) -> GroundTruth:
    n = len(boxes)
    return GroundTruth(list(classes), [f"{i:06d}" for i in range(n_images)],
                       np.full((n_images, 2), 500, dtype=np.int64), np.asarray(images, dtype=np.int64),
                       np.asarray(labels, dtype=np.int64), np.asarray(boxes, dtype=np.float64).reshape(n, 4),
                       np.zeros(n, bool) if difficult is None else np.asarray(difficult, bool))


def _dets(gt: GroundTruth, boxes, labels, images, scores) -> Detections:
    n = len(scores)
    return Detections(0.2, "max", "largest", gt.classes, gt.image_ids, np.asarray(images, dtype=np.int64),
                      np.asarray(labels, dtype=np.int64), np.asarray(scores, dtype=np.float64),
                      np.asarray(boxes, dtype=np.float64).reshape(n, 4))


def _pycocotools(gt: GroundTruth, dets: Detections, tmp_path) -> tuple[np.ndarray, np.ndarray]:
    """COCOeval on the files gradloc writes: (stats[0:6], precision [T, R, K, A, M])."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    (gt_file,) = write_coco_ground_truth(gt, tmp_path, "val")
    (results_file,) = write_coco_results(dets, tmp_path, "val")
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_file))
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(str(results_file)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats[:6], evaluator.eval["precision"]


def _means(rows: pd.DataFrame) -> np.ndarray:
    return rows[rows["class"] == "mean"].set_index("metric").loc[list(COCO_METRICS), "ap"].to_numpy()


def test_voc_boxes_become_coco_boxes_over_the_same_pixels():
    # one pixel (VOC 1..1) is [0, 1) in COCO; a 32 x 32 pixel box has area 1024
    assert voc_to_coco_boxes(np.array([[1.0, 1, 1, 1]])).tolist() == [[0.0, 0.0, 1.0, 1.0]]
    assert voc_to_coco_boxes(np.array([[10.0, 20, 41, 51]])).tolist() == [[9.0, 19.0, 32.0, 32.0]]
    gt = _gt([[10, 20, 41, 51]], [1], [1], difficult=[True])
    document = coco_ground_truth(gt)
    assert document["annotations"] == [{"id": 1, "image_id": 2, "category_id": 2, "bbox": [9.0, 19.0, 32.0, 32.0],
                                        "area": 1024.0, "iscrowd": 1}]
    assert [c["name"] for c in document["categories"]] == ["a", "b"]
    assert document["images"][1] == {"id": 2, "file_name": "000001.jpg", "width": 500, "height": 500,
                                     "voc_id": "000001"}
    dets = _dets(gt, [[10, 20, 41, 51]], [1], [1], [0.25])
    assert coco_results(dets) == [{"image_id": 2, "category_id": 2, "bbox": [9.0, 19.0, 32.0, 32.0], "score": 0.25}]


def test_hand_cases():
    # class a: two GT boxes; the best detection covers the first exactly, a second misses, a third covers the
    # second box at IoU 0.5 exactly (a COCO match, IoU >= t, where VOC needs IoU > t)
    gt = _gt([[1, 1, 100, 100], [201, 1, 300, 100]], [0, 0], [0, 0])
    half = [201, 1, 250, 100]  # 50 x 100 inside a 100 x 100 box: IoU 0.5
    dets = _dets(gt, [[1, 1, 100, 100], [401, 401, 450, 450], half], [0, 0, 0], [0, 0, 0], [0.9, 0.8, 0.7])
    rows = coco_evaluate(dets, gt).set_index(["metric", "class"])
    # IoU 0.5: ranks TP, FP, TP -> precision 1, 1/2, 2/3 at recall 0.5, 0.5, 1 -> envelope 1 up to 0.5, 2/3 after
    ap50 = (51 * 1.0 + 50 * 2 / 3) / 101
    assert rows.loc[("AP@0.50", "a"), "ap"] == pytest.approx(ap50, abs=1e-12)
    # from t = 0.55 on only the exact box matches: precision 1 up to recall 0.5
    assert rows.loc[("AP@0.75", "a"), "ap"] == pytest.approx(51 / 101, abs=1e-12)
    assert rows.loc[("AP@[.50:.95]", "a"), "ap"] == pytest.approx((ap50 + 9 * 51 / 101) / 10, abs=1e-12)
    assert np.isnan(rows.loc[("AP@0.50", "b"), "ap"])  # no GT of b: not in the mean
    assert rows.loc[("AP@0.50", "mean"), "ap"] == pytest.approx(ap50, abs=1e-12)
    assert rows.loc[("AP large", "a"), "n_gt"] == 2 and rows.loc[("AP small", "a"), "n_gt"] == 0


def test_difficult_boxes_are_crowds_and_size_ranges_are_inclusive():
    # a difficult 100 x 100 box: a small detection inside it is ignored (crowd IoU = |D ∩ G| / |D| = 1)
    gt = _gt([[1, 1, 32, 32], [101, 101, 200, 200]], [0, 0], [0, 0], difficult=[False, True])
    dets = _dets(gt, [[121, 121, 140, 140], [1, 1, 32, 32]], [0, 0], [0, 0], [0.9, 0.5])
    rows = coco_evaluate(dets, gt).set_index(["metric", "class"])
    assert rows.loc[("AP@[.50:.95]", "a"), "ap"] == pytest.approx(1.0)  # the first detection is not an FP
    assert rows.loc[("AP@[.50:.95]", "a"), "n_gt"] == 1  # the crowd is not a positive
    # the 32 x 32 pixel box has area 1024 = 32²: both small and medium (COCOeval's ranges include both ends)
    assert rows.loc[("AP small", "a"), "n_gt"] == rows.loc[("AP medium", "a"), "n_gt"] == 1


def test_no_detections_score_zero_and_no_gt_is_nan():
    gt = _gt([[1, 1, 10, 10]], [0], [0])
    rows = coco_evaluate(_dets(gt, np.zeros((0, 4)), [], [], []), gt).set_index(["metric", "class"])
    assert rows.loc[("AP@[.50:.95]", "a"), "ap"] == 0.0
    assert np.isnan(rows.loc[("AP@[.50:.95]", "b"), "ap"]) and np.isnan(rows.loc[("AP large", "mean"), "ap"])


def _random_case(seed: int = 0) -> tuple[GroundTruth, Detections]:
    """Detections near and far from GT, tied scores, difficult boxes, boxes of every size, and one (image,
    class) with more than 100 detections (COCOeval keeps the 100 best)."""
    rng = np.random.default_rng(seed)
    n_images, classes = 25, ("a", "b", "c")

    def boxes(n: int) -> np.ndarray:
        x1, y1 = rng.integers(1, 200, n), rng.integers(1, 200, n)
        w, h = rng.integers(0, 180, n), rng.integers(0, 180, n)
        return np.stack([x1, y1, x1 + w, y1 + h], 1).astype(np.float64)

    m = 90
    gt_images, gt_labels = rng.integers(0, n_images, m), rng.integers(0, 3, m)
    gt = GroundTruth(list(classes), [f"{i:06d}" for i in range(n_images)],
                     np.full((n_images, 2), 400, dtype=np.int64), gt_images, gt_labels, boxes(m),
                     rng.random(m) < 0.15)
    n = 400
    images, labels, det_boxes = rng.integers(0, n_images, n), rng.integers(0, 3, n), boxes(n)
    near = rng.integers(0, m, 200)
    det_boxes[:200] = gt.boxes[near] + rng.integers(-8, 9, (200, 4))
    det_boxes[:200, 2:] = np.maximum(det_boxes[:200, 2:], det_boxes[:200, :2])
    images[:200], labels[:200] = gt_images[near], gt_labels[near]
    images[-120:], labels[-120:] = 3, 1  # 120 detections of class b in image 3
    scores = np.round(rng.random(n), 2)  # many ties
    return gt, _dets(gt, det_boxes, labels, images, scores)


def test_agrees_with_pycocotools(tmp_path):
    gt, dets = _random_case()
    rows = coco_evaluate(dets, gt)
    stats, precision = _pycocotools(gt, dets, tmp_path)
    assert np.array_equal(_means(rows), stats)  # bit for bit
    per_class = rows[rows["class"] != "mean"].set_index(["metric", "class"])["ap"]
    for k, name in enumerate(gt.classes):
        reference = precision[:, :, k, 0, 2]  # area all, maxDets 100
        assert per_class[("AP@[.50:.95]", name)] == pytest.approx(reference.mean(), abs=1e-15)
        assert per_class[("AP@0.75", name)] == pytest.approx(reference[IOU_THRESHOLDS == 0.75].mean(), abs=1e-15)


def test_only_scores_a_subset_like_pycocotools_with_those_categories(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt, dets = _random_case(1)
    rows = coco_evaluate(dets, gt, only=["c", "a"])
    assert set(rows["class"]) == {"c", "a", "mean"}
    (gt_file,) = write_coco_ground_truth(gt, tmp_path, "val")
    (results_file,) = write_coco_results(dets, tmp_path, "val")
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_file))
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(str(results_file)), "bbox")
        evaluator.params.catIds = [1, 3]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert _means(rows) == pytest.approx(evaluator.stats[:6], abs=1e-15)


def test_render_names_the_protocol():
    gt, dets = _random_case()
    rows = coco_evaluate(dets, gt).assign(threshold=0.2, source="cam")
    text = render_coco(pd.concat([rows, rows.assign(threshold=float("nan"), source="center")]))
    lines = text.splitlines()
    assert "AP@[.50:.95]" in lines[0] and lines[2].split("|")[1:3] == [" 0.2   ", " cam     "]
    assert lines[3].split("|")[1].strip() == "none" and text.endswith("\n")
    assert "COCO-style" in text and "IoU >= t" in text and "iscrowd=1" in text and "w*h" in text


@pytest.mark.slow
def test_export_of_a_demo_run_scored_by_pycocotools_agrees(cams_config, demo_data, tmp_path):
    """`gradloc export --format coco` of a real run, read by pycocotools, gives the run's coco.csv numbers."""
    from click.testing import CliRunner
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from gradloc.cli import main
    from gradloc.run.pipeline import run

    config = cams_config(demo_data, **{"boxes.thresholds": [0.2, 0.4], "boxes.explain": "all",
                                       "boxes.box_mode": "all"})
    result = run(config)
    saved = pd.read_csv(result.run_dir / "coco.csv")
    pd.testing.assert_frame_equal(saved, result.coco, check_dtype=False)
    printed = CliRunner().invoke(main, ["score", str(result.run_dir), "--iou", "0.5"]).stdout
    assert "COCO-style AP (mean over classes, in %" in printed and "AP@[.50:.95]" in printed
    assert "| 0.4   | cam " in printed and printed.endswith("\n")
    out = tmp_path / "coco"
    done = CliRunner().invoke(main, ["export", str(result.run_dir), str(out), "--threshold", "0.4",
                                     "--format", "coco"])
    assert done.exit_code == 0, done.output
    for source, folder in (("cam", out), ("center", out / "baselines" / "center")):
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO(str(out / "instances_val.json"))
            evaluator = COCOeval(coco_gt, coco_gt.loadRes(str(folder / "detections_val_results.json")), "bbox")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        part = saved[(saved["source"] == source) & ((saved["threshold"] == 0.4) | saved["threshold"].isna())]
        assert len(part) == 6 * 5
        ours = _means(part)
        assert np.nanmax(np.abs(np.nan_to_num(ours, nan=-1.0) - evaluator.stats[:6])) <= 1e-12, (ours,
                                                                                                evaluator.stats)
        assert evaluator.stats[0] > 0 or source != "cam"
