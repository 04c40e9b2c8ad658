"""gradloc.reports.compare and `gradloc compare`: differences computed by hand on tiny score files, error paths."""

import pandas as pd
import pytest
from click.testing import CliRunner

from gradloc.cli import main
from gradloc.reports.compare import compare_scores, render_comparison
from gradloc.run.folder import open_run

# (threshold, iou) -> (mAP, mean recall)
MEANS_A = {(0.1, 0.3): (0.40, 0.60), (0.1, 0.5): (0.20, 0.30),
           (0.2, 0.3): (0.50, 0.70), (0.2, 0.5): (0.30, 0.40)}
MEANS_B = {(0.1, 0.3): (0.45, 0.50), (0.1, 0.5): (0.10, 0.35),
           (0.2, 0.3): (0.55, 0.75), (0.2, 0.5): (0.25, 0.45),
           (0.3, 0.3): (0.90, 0.90), (0.3, 0.5): (0.90, 0.90)}
# per-class AP at every (threshold, iou)
CLASS_AP_A = {"cat": 0.40, "dog": 0.20, "bird": 0.30}
CLASS_AP_B = {"cat": 0.10, "dog": 0.30, "bird": 0.35}


def _rows(means, class_ap, metric="voc07", mode="max"):
    rows = []
    for (tau, iou), (ap, recall) in means.items():
        base = {"threshold": tau, "threshold_mode": mode, "iou": iou, "metric": metric, "n_det": 5,
                "box_mode": "largest"}
        rows.append({**base, "class": "mAP", "ap": ap, "recall": recall, "n_gt": 9, "source": "cam"})
        rows.append({**base, "class": "mAP", "ap": 0.99, "recall": 0.99, "n_gt": 9, "source": "center"})
        for name, value in class_ap.items():
            rows.append({**base, "class": name, "ap": value, "recall": 0.5, "n_gt": 3, "source": "cam"})
    return pd.DataFrame(rows)


def _write(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    rows.to_csv(folder / "scores.csv", index=False)
    return folder


def test_mean_differences_by_hand():
    c = compare_scores(_rows(MEANS_A, CLASS_AP_A), _rows(MEANS_B, CLASS_AP_B), iou=0.5, names=("A", "B"))
    s = c.summary.set_index(["threshold", "iou"])
    assert list(s.index) == [(0.1, 0.3), (0.1, 0.5), (0.2, 0.3), (0.2, 0.5)]  # 0.3 is only in B
    assert s.loc[(0.1, 0.3), "ap_diff"] == pytest.approx(0.05)
    assert s.loc[(0.1, 0.5), "ap_diff"] == pytest.approx(-0.10)
    assert s.loc[(0.2, 0.5), "ap_diff"] == pytest.approx(-0.05)
    assert s.loc[(0.1, 0.3), "recall_diff"] == pytest.approx(-0.10)
    assert s.loc[(0.2, 0.5), "ap_a"] == 0.30 and s.loc[(0.2, 0.5), "ap_b"] == 0.25  # cam rows, not center
    assert c.notes == ["thresholds only in B left out: 0.3"]


def test_per_class_differences_and_largest_disagreements():
    c = compare_scores(_rows(MEANS_A, CLASS_AP_A), _rows(MEANS_B, CLASS_AP_B), iou=0.5, top=2)
    # default tau: best mAP@0.5 of A is 0.30 at tau 0.2 (0.20 at 0.1), an oracle choice
    assert c.threshold == 0.2 and "oracle" in c.threshold_choice
    p = c.per_class.set_index("class")
    assert list(p.index) == ["cat", "dog", "bird", "mAP"]
    assert p.loc["cat", "ap_diff"] == pytest.approx(-0.30)
    assert p.loc["dog", "ap_diff"] == pytest.approx(0.10)
    assert p.loc["bird", "ap_diff"] == pytest.approx(0.05)
    assert p.loc["mAP", "ap_diff"] == pytest.approx(-0.05)
    assert list(c.top["class"]) == ["cat", "dog"]


def test_given_threshold_must_be_common():
    c = compare_scores(_rows(MEANS_A, CLASS_AP_A), _rows(MEANS_B, CLASS_AP_B), iou=0.3, threshold=0.1)
    assert c.threshold == 0.1 and c.threshold_choice == "given"
    assert c.per_class.set_index("class").loc["mAP", "ap_diff"] == pytest.approx(0.05)
    with pytest.raises(ValueError, match=r"no threshold common to both runs 0\.3; available: 0\.1, 0\.2"):
        compare_scores(_rows(MEANS_A, CLASS_AP_A), _rows(MEANS_B, CLASS_AP_B), threshold=0.3)


def test_render_names_runs_signs_and_protocol():
    c = compare_scores(_rows(MEANS_A, CLASS_AP_A), _rows(MEANS_B, CLASS_AP_B), iou=0.5, top=2,
                       names=("gradcam", "layercam"))
    text = render_comparison(c)
    assert "mAP gradcam" in text and "mAP layercam" in text
    assert "|         0.1 |   0.3 |         40.00 |          45.00 |  +5.00 |            60.00 |" in text
    assert "Largest disagreements (AP, B - A): cat (-30.00), dog (+10.00)" in text
    assert "VOC07 11-point AP" in text and "Note: thresholds only in layercam left out: 0.3." in text


def test_protocol_differences_are_noted():
    c = compare_scores(_rows(MEANS_A, CLASS_AP_A), _rows(MEANS_A, {"cat": 0.4}, mode="percentile"))
    assert any("different threshold semantics: A max, B percentile" in note for note in c.notes)
    assert pd.isna(c.per_class.set_index("class").loc["dog", "ap_b"])  # dog is not in B
    assert "different ground truth" in c.notes[-1]


@pytest.mark.parametrize(("rows_b", "message"), [
    (_rows(MEANS_A, CLASS_AP_A, metric="voc10"), r"different AP variants \(A: voc07, B: voc10\)"),
    (_rows({(0.1, 0.4): (0.1, 0.1)}, CLASS_AP_A), r"different IoUs \(A: 0\.3, 0\.5; B: 0\.4\)"),
    (_rows({(0.5, 0.3): (0.1, 0.1), (0.5, 0.5): (0.1, 0.1)}, CLASS_AP_A), "share no threshold"),
])
def test_incompatible_runs_are_refused(rows_b, message):
    with pytest.raises(ValueError, match=message):
        compare_scores(_rows(MEANS_A, CLASS_AP_A), rows_b)


def test_load_scores_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="run folder not found"):
        _ = open_run(tmp_path / "nope").scores
    with pytest.raises(FileNotFoundError, match=r"scores\.csv: not found; score the run first"):
        _ = open_run(tmp_path).scores
    (tmp_path / "scores.csv").write_text("threshold,iou\n0.1,0.5\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) threshold_mode, metric, class"):
        _ = open_run(tmp_path).scores


def test_help_has_an_example():
    result = CliRunner().invoke(main, ["compare", "--help"])
    assert result.exit_code == 0 and "Example" in result.output


def test_compare_command(tmp_path):
    a = _write(tmp_path / "gradcam", _rows(MEANS_A, CLASS_AP_A))
    b = _write(tmp_path / "layercam", _rows(MEANS_B, CLASS_AP_B))
    result = CliRunner().invoke(main, ["compare", str(a), str(b), "--iou", "0.5", "--threshold", "0.2",
                                       "--top", "1", "--format", "markdown"])
    assert result.exit_code == 0, result.output
    assert "Per class at tau = 0.2 (given), IoU > 0.5:" in result.output
    assert "Largest disagreements (AP, B - A): cat (-30.00)\n" in result.output
    assert "| cat     |" in result.output  # github table


def test_command_errors(tmp_path):
    a = _write(tmp_path / "a", _rows(MEANS_A, CLASS_AP_A))
    b = _write(tmp_path / "b", _rows(MEANS_A, CLASS_AP_A, metric="voc10"))
    result = CliRunner().invoke(main, ["compare", str(a), str(b)])
    assert result.exit_code == 1 and result.output.startswith("error: the runs use different AP variants")
    assert len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(main, ["compare", str(a), str(tmp_path / "missing")])
    assert result.exit_code == 1
    assert result.output.strip() == (f"error: {tmp_path / 'missing'}: run folder not found; give a folder "
                                     "made by `gradloc run`")
    result = CliRunner().invoke(main, ["compare", str(a), str(a), "--threshold", "0.7"])
    assert result.exit_code == 1 and "no threshold common to both runs 0.7" in result.output
    assert CliRunner().invoke(main, ["compare", str(a)]).exit_code == 2
    assert CliRunner().invoke(main, ["compare", str(a), str(a), "--iou", "x"]).exit_code == 2


def test_digits_option(tmp_path):
    a = _write(tmp_path / "gradcam", _rows(MEANS_A, CLASS_AP_A))
    b = _write(tmp_path / "layercam", _rows(MEANS_B, CLASS_AP_B))
    result = CliRunner().invoke(main, ["compare", str(a), str(b), "--iou", "0.5", "--threshold", "0.2",
                                       "--top", "1", "--digits", "1"])
    assert result.exit_code == 0, result.output
    assert "Largest disagreements (AP, B - A): cat (-30.0)\n" in result.output
    assert "|         0.1 |   0.3 |          40.0 |           45.0 |   +5.0 |" in result.output
