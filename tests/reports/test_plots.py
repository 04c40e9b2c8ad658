"""gradloc.reports.plots and `gradloc plot`: hand-computed precision-recall curves, PNG files, error paths."""

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from gradloc.cli import main
from gradloc.core.files import save_pickle
from gradloc.core.formats import Detections, GroundTruth
from gradloc.reports.plots import plot_pr_curves, plot_run, plot_threshold_curves, precision_recall_curves, tied_curves
from gradloc.run.score import score_run
from gradloc.scoring.tables import save_scores
from gradloc.scoring.voc import evaluate, voc_ap

CLASSES = ["a", "b"]
IMAGE_IDS = ["i0", "i1", "i2"]


def _gt():
    # g0: a in i0; g1: a in i0, difficult; g2: b in i0; g3: a in i1; i2 has no GT
    return GroundTruth(classes=CLASSES, image_ids=IMAGE_IDS, image_sizes=np.full((3, 2), 100, np.int64),
                       image_index=np.array([0, 0, 0, 1], np.int64), labels=np.array([0, 0, 1, 0], np.int64),
                       boxes=np.array([[10, 10, 50, 50], [60, 60, 90, 90], [5, 5, 30, 30], [20, 20, 70, 70]],
                                      float),
                       difficult=np.array([False, True, False, False]))


def _dets(threshold, boxes=None, box_mode="largest", mode="max"):
    good = [[10, 10, 50, 50],  # 0.9: TP on g0
            [1, 1, 10, 10],  # 0.8: FP, no GT in i2
            [60, 60, 90, 90],  # 0.7: on the difficult g1 -> ignored
            [12, 12, 50, 50],  # 0.6: second detection of g0 -> FP
            [20, 20, 70, 70],  # 0.5: TP on g3
            [5, 5, 30, 30]]  # 0.3, class b: TP on g2
    return Detections(threshold=threshold, threshold_mode=mode, box_mode=box_mode, classes=CLASSES,
                      image_ids=IMAGE_IDS, image_index=np.array([0, 2, 0, 0, 1, 0], np.int64),
                      labels=np.array([0, 0, 0, 0, 0, 1], np.int64),
                      scores=np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.3]),
                      boxes=np.array(good if boxes is None else boxes, float), meta={"source": "cam"})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """gt.pkl, detections at 0.1 (whole-image boxes: no hit at IoU 0.5) and 0.2 (the hand-made list),
    center/full baselines, scores.csv."""
    run_dir = tmp_path_factory.mktemp("plots") / "tiny"
    save_pickle(_gt(), run_dir / "gt.pkl")
    save_pickle(_dets(0.1, [[1, 1, 100, 100]] * 6), run_dir / "detections" / "thr_0.100.pkl")
    save_pickle(_dets(0.2), run_dir / "detections" / "thr_0.200.pkl")
    save_pickle(_dets(0.0, [[1, 1, 100, 100]] * 6, "full", "none"), run_dir / "baselines" / "full.pkl")
    save_pickle(_dets(0.0, [[26, 26, 75, 75]] * 6, "center", "none"), run_dir / "baselines" / "center.pkl")
    save_scores(score_run(run_dir, (0.3, 0.5), "voc07"), run_dir)
    return run_dir


def test_precision_recall_by_hand():
    curves = precision_recall_curves(_dets(0.2), _gt(), 0.5)
    assert sorted(curves) == [0, 1]
    a = curves[0]
    # ranked: TP, FP, ignored, FP, TP over 2 non-difficult boxes
    np.testing.assert_allclose(a.recall, [0.5, 0.5, 0.5, 0.5, 1.0])
    np.testing.assert_allclose(a.precision, [1.0, 0.5, 0.5, 1 / 3, 0.5])
    np.testing.assert_array_equal(a.scores, [0.9, 0.8, 0.7, 0.6, 0.5])
    assert a.n_gt == 2
    # 11-point AP: p = 1 at t = 0..0.5 (6 points), 0.5 at t = 0.6..1 (5 points)
    assert voc_ap(a.recall, a.precision, "voc07") == pytest.approx(8.5 / 11, abs=1e-12)
    np.testing.assert_allclose(curves[1].recall, [1.0])
    np.testing.assert_allclose(curves[1].precision, [1.0])


def test_curves_give_the_ap_of_evaluate():
    dets, gt = _dets(0.2), _gt()
    table = evaluate(dets, gt, (0.3, 0.5), "voc10").set_index(["iou", "class"])
    for iou in (0.3, 0.5):
        for c, curve in precision_recall_curves(dets, gt, iou).items():
            assert voc_ap(curve.recall, curve.precision, "voc10") == table.loc[(iou, CLASSES[c]), "ap"]


def test_class_without_detections_has_an_empty_curve():
    dets = _dets(0.2)
    only_a = Detections(**{**dets.__dict__, "image_index": dets.image_index[:5], "labels": dets.labels[:5],
                           "scores": dets.scores[:5], "boxes": dets.boxes[:5]})
    curves = precision_recall_curves(only_a, _gt(), 0.5)
    assert curves[1].recall.size == 0 and curves[1].n_gt == 1


def _check_png(path, size):
    with Image.open(path) as image:
        assert image.size == size
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 0
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10


def test_help_has_an_example():
    result = CliRunner().invoke(main, ["plot", "--help"])
    assert result.exit_code == 0 and "Example" in result.output


def test_plot_writes_both_pngs(tiny_run, tmp_path):
    result = CliRunner().invoke(main, ["plot", str(tiny_run), "--threshold", "0.1", "--iou", "0.3",
                                       "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [str(tmp_path / "ap_recall_vs_threshold.png"),
                                          str(tmp_path / "pr_thr_0.100_iou_0.3.png")]
    _check_png(tmp_path / "ap_recall_vs_threshold.png", (1200, 600))
    _check_png(tmp_path / "pr_thr_0.100_iou_0.3.png", (600, 390))  # 2 classes: one row of 2 panels


def _rows(values):
    """mAP rows: source -> [(iou, threshold, ap, recall)]."""
    return pd.DataFrame([{"class": "mAP", "source": source, "iou": iou, "threshold": thr, "ap": ap, "recall": rec}
                         for source, points in values.items() for iou, thr, ap, rec in points])


def _inside(fig):
    """Every drawn text and legend lies inside the figure; the legends lie below every axes."""
    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    frame = fig.bbox.padded(1)
    shown = [t for ax in fig.axes for t in ax.get_xticklabels()  # ticks within the view are drawn
             if min(ax.get_xlim()) <= t.get_position()[0] <= max(ax.get_xlim())]
    texts = [*fig.texts, *(ax.title for ax in fig.axes), *shown]
    for artist in [*texts, *fig.legends]:
        e = artist.get_window_extent(renderer)
        assert frame.x0 <= e.x0 and e.x1 <= frame.x1 and frame.y0 <= e.y0 and e.y1 <= frame.y1, artist
    lowest = min(ax.get_tightbbox(renderer).y0 for ax in fig.axes if ax.axison)
    assert all(legend.get_window_extent(renderer).y1 <= lowest for legend in fig.legends)


def test_tied_curves_by_hand():
    x = np.array([0.1, 0.2])
    curves = {"cam": (x, np.array([1.0, 2.0])), "center": (x, np.array([3.0, np.nan])),
              "full": (x, np.array([3.0, np.nan])), "random": (x, np.array([3.0, 4.0]))}
    assert tied_curves(curves) == [["center", "full"]]
    assert tied_curves({"cam": curves["cam"], "random": curves["random"]}) == []


def test_threshold_curves_legend_below_and_ties_stated():
    rows = _rows({"cam": [(0.5, 0.1, 0.2, 0.3), (0.5, 0.2, 0.25, 0.3)],
                  "center": [(0.5, 0.1, 0.1, 0.2), (0.5, 0.2, 0.1, 0.2)],
                  "full": [(0.5, 0.1, 0.1, 0.2), (0.5, 0.2, 0.1, 0.2)]})
    fig = plot_threshold_curves(rows, "title")
    note = " ".join(" ".join(t.get_text().split()) for t in fig.texts)
    assert "mAP at IoU 0.5: center = full" in note and "mean recall at IoU 0.5: center = full" in note
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["IoU 0.5", "cam", "center", "full"]
    styles = [h.get_linestyle() for h in fig.legends[0].legend_handles[1:]]
    assert styles == ["-", "--", ":"]  # the styles drawn, as SOURCE_STYLES says
    assert [line.get_linestyle() for line in fig.axes[0].get_lines()] == styles
    _inside(fig)


def test_pr_panels_skip_classes_without_detections():
    only_a = _dets(0.2)
    keep = only_a.labels == 0
    only_a = Detections(**{**only_a.__dict__, "image_index": only_a.image_index[keep], "labels": only_a.labels[keep],
                           "scores": only_a.scores[keep], "boxes": only_a.boxes[keep]})
    curves = {"cam": precision_recall_curves(only_a, _gt(), 0.5), "full": precision_recall_curves(only_a, _gt(), 0.5)}
    fig = plot_pr_curves(curves, CLASSES, "voc07", "title")
    assert [ax.get_title().split(" ")[0] for ax in fig.axes] == ["a"]  # class b: GT, no detection
    note = " ".join(" ".join(t.get_text().split()) for t in fig.texts)
    assert "1 of 2 classes with GT have no detection from any source (not drawn): b" in note
    assert "identical: cam = full" in fig.axes[0].get_title()
    _inside(fig)


def test_default_threshold_is_the_runs_selected_tau_even_when_another_scores_better(tmp_path):
    import dataclasses

    run_dir = tmp_path / "selected"
    save_pickle(_gt(), run_dir / "gt.pkl")
    for tau, boxes in ((0.1, [[1, 1, 100, 100]] * 6), (0.2, None)):  # 0.2 scores best at IoU 0.5
        dets = _dets(tau, boxes)
        save_pickle(dataclasses.replace(dets, meta={**dets.meta, "selected_threshold": 0.1, "selected_on": "train"}),
                    run_dir / "detections" / f"thr_{tau:.3f}.pkl")
    save_scores(score_run(run_dir, (0.3, 0.5), "voc07"), run_dir)
    written = plot_run(run_dir, out_dir=tmp_path / "plots")
    assert [p.name for p in written] == ["ap_recall_vs_threshold.png", "pr_thr_0.100_iou_0.5.png"]


def test_default_threshold_without_a_selected_tau_is_the_best_one(tiny_run):
    # at IoU 0.5, tau = 0.1 (whole-image boxes) scores mAP 0, tau = 0.2 scores > 0
    result = CliRunner().invoke(main, ["plot", str(tiny_run)])
    assert result.exit_code == 0, result.output
    assert (tiny_run / "plots" / "pr_thr_0.200_iou_0.5.png").is_file()


@pytest.mark.parametrize(("args", "message"), [
    (["--threshold", "0.3"], "no threshold 0.3; available: 0.1, 0.2"),
    (["--iou", "0.7"], "no IoU 0.7; available: 0.3, 0.5"),
])
def test_bad_values_are_one_line_exit_1(tiny_run, tmp_path, args, message):
    result = CliRunner().invoke(main, ["plot", str(tiny_run), "--out", str(tmp_path), *args])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output


def test_missing_run_and_scores_are_one_line_exit_1(tmp_path):
    result = CliRunner().invoke(main, ["plot", str(tmp_path / "nope")])
    assert result.exit_code == 1 and "run folder not found" in result.output
    result = CliRunner().invoke(main, ["plot", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.strip() == (f"error: {tmp_path / 'scores.csv'}: not found; score the run first with "
                                     f"`gradloc score {tmp_path} --save`")


@pytest.mark.parametrize("args", [[], ["RUN", "--iou", "abc"], ["RUN", "--bogus"]])
def test_usage_errors_exit_2(args):
    assert CliRunner().invoke(main, ["plot", *args]).exit_code == 2
