import json

import pandas as pd
import pytest

from gradloc.scoring.tables import (
    is_close,
    match_value,
    per_class_table,
    render,
    save_scores,
    threshold_rows,
    threshold_tables,
)


def _rows():
    rows = []
    for tau in (0.02, 0.2):
        for iou, ap, rec in ((0.3, 0.46853608, 0.61132075), (0.5, 0.17796862, 0.36792453)):
            for source, shift in (("cam", 0.0), ("center", -0.1)):
                rows.append({"threshold": tau, "threshold_mode": "max", "iou": iou, "metric": "voc07",
                             "class": "mAP", "ap": ap + shift, "recall": rec + shift, "n_gt": 10,
                             "n_det": 12, "source": source, "box_mode": "largest"})
                rows.append({"threshold": tau, "threshold_mode": "max", "iou": iou, "metric": "voc07",
                             "class": "cat", "ap": ap + shift, "recall": rec + shift, "n_gt": 10, "n_det": 12,
                             "source": source, "box_mode": "largest"})
                rows.append({"threshold": tau, "threshold_mode": "max", "iou": iou, "metric": "voc07",
                             "class": "cow", "ap": float("nan"), "recall": float("nan"), "n_gt": 0,
                             "n_det": 0, "source": source, "box_mode": "largest"})
    return pd.DataFrame(rows)


def test_owner_layout_block():
    text = threshold_tables(_rows()[lambda f: f["source"] == "cam"])
    expected = (
        "threshold = 0.02\n"
        "|        | IoU 0.3   | IoU 0.5   |\n"
        "|--------+-----------+-----------|\n"
        "| ap     | 46.85     | 17.80     |\n"
        "| recall | 61.13     | 36.79     |\n"
    )
    assert text.startswith(expected)
    assert "threshold = 0.2\n" in text


def test_digits_change_every_percentage():
    text = threshold_tables(_rows()[lambda f: f["source"] == "cam"], digits=4)
    assert "| ap     | 46.8536   | 17.7969   |" in text
    lines = per_class_table(_rows(), 0.02, 0.3, digits=4).splitlines()
    assert [cell.strip() for cell in lines[2].strip("|").split("|")] == [
        "cat", "10", "12", "46.8536", "36.8536", "61.1321", "51.1321"]
    assert [cell.strip() for cell in lines[3].strip("|").split("|")] == ["cow", "0", "0", "-", "-", "-", "-"]


def test_baselines_are_rows_of_the_same_block():
    text = threshold_tables(_rows())
    assert "| ap (center)     | 36.85     |" in text


def test_rows_layout_is_one_row_per_threshold():
    text = threshold_rows(_rows())
    lines = [line for line in text.splitlines() if line.startswith("|") and "---" not in line]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == ["tau", "ap@0.3", "ap@0.5", "recall@0.3", "recall@0.5", "ap@0.3 (center)", "ap@0.5 (center)",
                      "recall@0.3 (center)", "recall@0.5 (center)"]
    assert len(lines) == 3  # header + two thresholds
    cells = [cell.strip() for cell in lines[1].strip("|").split("|")]
    assert cells == ["0.02", "46.85", "17.80", "61.13", "36.79", "36.85", "7.80", "51.13", "26.79"]


def test_thresholdless_rows_print_none_not_nan():
    rows = _rows()[lambda f: f["threshold"] == 0.2].assign(threshold=float("nan"), threshold_mode="none")
    text = render(rows, "table")
    assert "threshold = none" in text and "nan" not in text
    assert "oracle" not in text  # one set of detections: no choice of tau to warn about
    assert "| none " in threshold_rows(rows)


def test_protocol_line_names_metric_iou_and_oracle():
    text = render(_rows(), "table", {"method": "gradcam", "layer": "layer4", "model": "resnet50"})
    assert "VOC07 11-point AP" in text
    assert "mAP over the 1 classes with non-difficult GT" in text
    assert "heat >= tau * max(heat)" in text
    assert "gradcam at layer layer4 of resnet50" in text
    assert "oracle" in text


@pytest.mark.parametrize(("box_mode", "words"), [("largest", "boxes: the largest component ("),
                                                ("all", "boxes: all components ("),
                                                ("union", "boxes: the union of all components (")])
def test_protocol_line_names_the_box_mode_in_words(box_mode, words):
    text = render(_rows(), "table", {"method": "gradcam", "box_mode": box_mode})
    assert words in text and "component component" not in text and text.endswith("\n")


def test_json_rows_have_the_documented_keys_and_null_for_nan():
    rows = json.loads(render(_rows(), "json"))["rows"]
    assert set(rows[0]) >= {"threshold", "threshold_mode", "iou", "metric", "class", "ap", "recall", "n_gt",
                            "n_det"}
    cow = [r for r in rows if r["class"] == "cow"]
    assert cow and all(r["ap"] is None for r in cow)


def test_csv_round_trips():
    import io

    frame = pd.read_csv(io.StringIO(render(_rows(), "csv")))
    assert len(frame) == len(_rows())


def test_per_class_table_puts_map_last():
    text = per_class_table(_rows(), 0.02, 0.5)
    lines = [line for line in text.splitlines() if line.startswith("|") and "---" not in line]
    assert lines[-1].startswith("| mAP")
    assert "ap (center)" in lines[0]


def test_machine_formats_with_per_class_are_one_document():
    rows = json.loads(render(_rows(), "json", per_class=0.2))["rows"]
    assert {r["threshold"] for r in rows} == {0.2}
    assert {r["class"] for r in rows} == {"mAP", "cat", "cow"}
    assert len(rows) == 2 * 2 * 3  # IoU x source x (2 classes + mAP)
    import csv
    import io

    records = list(csv.reader(io.StringIO(render(_rows(), "csv", per_class=0.02))))
    assert len({len(r) for r in records}) == 1 and len(records) == 1 + 12


def test_per_class_tables_follow_the_summary():
    text = render(_rows(), "table", per_class=0.2)
    assert text.index("Protocol:") < text.index("Per class, threshold = 0.2, IoU = 0.3")
    assert "Per class, threshold = 0.2, IoU = 0.5" in text


def test_per_class_not_a_threshold_lists_the_thresholds():
    with pytest.raises(ValueError, match=r"--per-class: no threshold 0.33; available: 0.02, 0.2"):
        render(_rows(), "json", per_class=0.33)


def test_match_value_within_tolerance():
    values = pd.Series([0.3, 0.5])
    assert match_value(values, 0.1 + 0.2, "IoU", "x") == 0.3  # 0.30000000000000004
    assert match_value(values, 0.5 + 5e-10, "IoU", "x") == 0.5
    with pytest.raises(ValueError, match=r"scores.csv: no IoU 0.4; available: 0.3, 0.5"):
        match_value(values, 0.4, "IoU", "scores.csv")
    assert is_close([0.1, 0.3, 0.30000001], 0.1 + 0.2).tolist() == [False, True, False]


def test_unknown_format():
    with pytest.raises(ValueError, match="unknown format 'xml'"):
        render(_rows(), "xml")


def test_save_scores_writes_all_files(tmp_path):
    written = save_scores(_rows(), tmp_path)
    assert sorted(p.name for p in written) == ["scores.csv", "scores.json", "scores.md"]
    assert "Per class, threshold = 0.02, IoU = 0.3" in (tmp_path / "scores.md").read_text()


def test_the_selected_tau_is_marked_and_named_with_where_it_was_chosen():
    meta = {"method": "gradcam", "selected_threshold": 0.2, "selected_on": "train (5-fold CV)", "split": "val"}
    text = render(_rows(), "table", meta)
    assert "threshold = 0.2  <- the selected tau\n" in text and "threshold = 0.02\n" in text
    assert "the selected tau is 0.2 (chosen on train (5-fold CV), scored on val)" in text
    rows = render(_rows(), "table", meta, layout="rows")
    assert "| 0.2 * " in rows and "| 0.02  " in rows and "* the selected tau" in rows
    oracle = render(_rows(), "table", {**meta, "selected_on": "val"})
    assert "chosen on val, the split scored here: an oracle choice, not a held-out result" in oracle
    plain = render(_rows(), "table", {"method": "gradcam"})
    assert "<- the selected tau" not in plain and "picking the best of them on this split is an oracle" in plain


def test_headline_block_leads_the_tables_and_the_json_document():
    headline = pd.DataFrame([
        {"metric": "mAP@0.5", "threshold": 0.2, "value": 0.25, "low": 0.2, "high": 0.3, "note": "VOC07"},
        {"metric": "classification mAP", "threshold": float("nan"), "value": 0.5, "low": float("nan"),
         "high": float("nan"), "note": "tau-free"},
        {"metric": "mAP@0.5", "threshold": 0.02, "value": 0.3, "low": float("nan"), "high": float("nan"),
         "note": "oracle: best"}])
    meta = {"selected_threshold": 0.2, "selected_on": "train", "split": "val"}
    text = render(_rows(), "table", meta, headline=headline)
    lines = text.splitlines()
    assert lines[0] == "Headline at the selected tau = 0.2 (chosen on train, scored on val), in %:"
    assert lines[1].split() == ["mAP@0.5", "25.00", "[20.00,", "30.00]", "VOC07"]
    assert lines[2].split() == ["classification", "mAP", "50.00", "tau-free"]
    assert lines[3].split()[:4] == ["mAP@0.5", "(tau", "0.02)", "30.00"]  # another tau says which
    assert text.index("Headline") < text.index("threshold = 0.02")
    document = json.loads(render(_rows(), "json", meta, headline=headline))
    assert document["format"] == "gradloc.scores/1" and document["selected_threshold"] == 0.2
    assert document["selected_on"] == "train" and document["split"] == "val"
    assert document["headline"][1] == {"metric": "classification mAP", "threshold": None, "value": 0.5,
                                       "low": None, "high": None, "note": "tau-free"}
    assert "Protocol: VOC07 11-point AP" in document["protocol"] and len(document["rows"]) == len(_rows())
    none = render(_rows(), "table", {}, headline=headline.iloc[1:])
    assert none.startswith("Headline: no selected tau (set boxes.selected_threshold")
