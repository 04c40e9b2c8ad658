"""The devkit results format: hand-written lines, exact round trips, and one-line errors naming file:line."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gradloc.core.files import save_pickle
from gradloc.core.formats import Detections, GroundTruth
from gradloc.reports.export import export_run
from gradloc.scoring.devkit import format_lines, read_voc_results, score_voc_results, write_voc_results
from gradloc.scoring.voc import evaluate

CLASSES = ["cat", "dog", "pottedplant"]


def _gt() -> GroundTruth:
    return GroundTruth(
        classes=CLASSES, image_ids=["000005", "000007"], image_sizes=np.array([[50, 40], [60, 30]]),
        image_index=np.array([0, 0, 1]), labels=np.array([0, 1, 0]),
        boxes=np.array([[1.0, 1.0, 10.0, 10.0], [20.0, 5.0, 40.0, 30.0], [3.0, 3.0, 30.0, 20.0]]),
        difficult=np.array([False, False, False]),
    )


def _dets() -> Detections:
    # scores with many digits, a tie (0.5 twice in class cat), non-integer coordinates
    return Detections(
        threshold=0.2, threshold_mode="max", box_mode="largest", classes=CLASSES, image_ids=["000005", "000007"],
        image_index=np.array([1, 0, 0, 1]), labels=np.array([0, 1, 0, 0]),
        scores=np.array([0.5, 0.1 + 0.2, 0.5, 1 / 3]),
        boxes=np.array([[3.0, 3.0, 30.0, 20.0], [20.5, 5.25, 40.0, 30.0], [2.0, 1.0, 11.0, 9.0],
                        [1.0, 1.0, 2.0, 2.0]]),
        meta={"dataset": "VOC2007 val"},
    )


def test_lines_are_the_devkit_layout_in_detection_order():
    assert format_lines(_dets(), 0) == ("000007 0.5 3.0 3.0 30.0 20.0\n"
                                        "000005 0.5 2.0 1.0 11.0 9.0\n"
                                        "000007 0.3333333333333333 1.0 1.0 2.0 2.0\n")
    assert format_lines(_dets(), 1) == "000005 0.30000000000000004 20.5 5.25 40.0 30.0\n"


def test_one_file_per_class_named_like_the_devkit(tmp_path):
    written = write_voc_results(_dets(), tmp_path, "val")
    assert [p.name for p in written] == ["comp4_det_val_cat.txt", "comp4_det_val_dog.txt",
                                         "comp4_det_val_pottedplant.txt"]
    assert (tmp_path / "comp4_det_val_pottedplant.txt").read_text() == ""


def test_ids_with_whitespace_are_refused(tmp_path):
    import dataclasses

    dets = dataclasses.replace(_dets(), image_ids=["000005", "0000 07"])
    with pytest.raises(ValueError, match="image id '0000 07' is empty or holds whitespace"):
        write_voc_results(dets, tmp_path, "val")
    assert list(tmp_path.iterdir()) == []


def test_write_read_round_trip_is_bit_exact_and_scores_the_same(tmp_path):
    dets, gt = _dets(), _gt()
    write_voc_results(dets, tmp_path, "val")
    back = read_voc_results(tmp_path, gt)
    # read back class by class; within a class the order (hence tie ranking) is the file's
    order = np.argsort(dets.labels, kind="stable")
    np.testing.assert_array_equal(back.scores, dets.scores[order])
    np.testing.assert_array_equal(back.boxes, dets.boxes[order])
    np.testing.assert_array_equal(back.labels, dets.labels[order])
    np.testing.assert_array_equal(back.image_index, dets.image_index[order])
    for metric in ("voc07", "voc10"):
        pd.testing.assert_frame_equal(evaluate(back, gt, (0.3, 0.5), metric), evaluate(dets, gt, (0.3, 0.5), metric))


def test_any_detector_whitespace_and_missing_classes(tmp_path):
    # a hand-written file of another detector: tabs, several spaces, comp3, no file for dog / pottedplant
    (tmp_path / "comp3_det_test_cat.txt").write_text("000005\t0.9  1 1 10 10\n\n000007 0.8 3 3 30 20\n")
    rows = score_voc_results(tmp_path, _gt(), (0.5,), "voc07")
    cat = rows[rows["class"] == "cat"].iloc[0]
    assert (cat["ap"], cat["recall"], cat["n_det"]) == (pytest.approx(1.0), 1.0, 2)  # 11 x 1/11
    dog = rows[rows["class"] == "dog"].iloc[0]
    assert (dog["ap"], dog["n_det"]) == (0.0, 0)
    assert rows["threshold"].isna().all() and set(rows["source"]) == {"cam"}


@pytest.mark.parametrize(("line", "message"), [
    ("000005 0.9 1 1 10", "expected 6 fields 'image_id score x1 y1 x2 y2', found 5"),
    ("000005 high 1 1 10 10", "expected numbers after the image id"),
    ("000005 nan 1 1 10 10", "must be finite numbers"),
    ("000005 0.9 10 1 1 10", "x2 < x1 or y2 < y1"),
    ("009999 0.9 1 1 10 10", "image id '009999' is not an image of the ground truth"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "comp4_det_val_cat.txt"
    path.write_text(f"000005 0.5 1 1 10 10\n{line}\n")
    with pytest.raises(ValueError, match=f"^{path}:2: .*{message.replace('(', '.').replace(')', '.')}"):
        read_voc_results(tmp_path, _gt())


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="results folder not found"):
        read_voc_results(tmp_path / "nope", _gt())
    with pytest.raises(FileNotFoundError, match="no devkit results files"):
        read_voc_results(tmp_path, _gt())
    (tmp_path / "comp4_det_val_horse.txt").write_text("")
    with pytest.raises(ValueError, match=r"comp4_det_val_horse\.txt: the file name names no class"):
        read_voc_results(tmp_path, _gt())
    (tmp_path / "comp4_det_val_horse.txt").unlink()
    (tmp_path / "comp4_det_val_cat.txt").write_text("")
    (tmp_path / "comp4_det_test_cat.txt").write_text("")
    with pytest.raises(ValueError, match="a second results file of class 'cat'"):
        read_voc_results(tmp_path, _gt())


def _run_folder(root):
    """A hand-made run folder: gt.pkl, detections at two τ, a random baseline and a center baseline."""
    import dataclasses

    dets = _dets()
    save_pickle(_gt(), root / "gt.pkl")
    save_pickle(dets, root / "detections" / "thr_0.200.pkl")
    save_pickle(dataclasses.replace(dets, threshold=0.3, scores=dets.scores / 2), root / "detections" / "thr_0.300.pkl")
    save_pickle(dataclasses.replace(dets, boxes=dets.boxes + 1), root / "baselines" / "random" / "thr_0.200.pkl")
    save_pickle(dataclasses.replace(dets, threshold=0.0, threshold_mode="none", box_mode="center",
                                    boxes=np.tile([[5.0, 5.0, 25.0, 15.0]], (4, 1))), root / "baselines" / "center.pkl")
    return root


def test_export_run_writes_cam_and_baselines_with_the_run_split(tmp_path):
    run = _run_folder(tmp_path / "run")
    written = export_run(run, 0.2 + 1e-12, tmp_path / "out")
    names = sorted(str(p.relative_to(tmp_path / "out")) for p in written)
    assert names == sorted([f"{sub}comp4_det_val_{c}.txt" for sub in ("", "baselines/random/", "baselines/center/")
                            for c in CLASSES])
    assert (tmp_path / "out" / "comp4_det_val_dog.txt").read_text() == format_lines(_dets(), 1)
    rows = score_voc_results(tmp_path / "out", _gt(), (0.3, 0.5), "voc07")
    assert list(dict.fromkeys(rows["source"])) == ["cam", "center", "random"]


def test_export_run_defaults_to_the_selected_tau_and_names_the_thresholds_without_one(tmp_path):
    import dataclasses

    run = _run_folder(tmp_path / "run")
    with pytest.raises(ValueError, match=r"no selected tau .* give --threshold, one of 0.2, 0.3"):
        export_run(run, None, tmp_path / "out")
    for tau in (0.2, 0.3):  # every detections file of a run carries the selected tau in its meta
        dets = dataclasses.replace(_dets(), threshold=tau, scores=_dets().scores / (1 if tau == 0.2 else 2),
                                   meta={"dataset": "VOC2007 val", "selected_threshold": 0.3})
        save_pickle(dets, run / "detections" / f"thr_{tau:.3f}.pkl")
    export_run(run, None, tmp_path / "out")
    assert (tmp_path / "out" / "comp4_det_val_dog.txt").read_text() == format_lines(
        dataclasses.replace(_dets(), scores=_dets().scores / 2), 1)


def test_export_run_errors(tmp_path):
    run = _run_folder(tmp_path / "run")
    with pytest.raises(ValueError, match=r"no threshold 0.25; available: 0.2, 0.3"):
        export_run(run, 0.25, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="run folder not found"):
        export_run(tmp_path / "nope", 0.2, tmp_path / "out")
