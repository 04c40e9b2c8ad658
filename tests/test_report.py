import json

import pandas as pd
import pytest

from gradloc.report import per_class_table, render, save_scores, threshold_tables


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
        "|        | 0.3       | 0.5       |\n"
        "|--------+-----------+-----------|\n"
        "| ap     | 46.853608 | 17.796862 |\n"
        "| recall | 61.132075 | 36.792453 |\n"
    )
    assert text.startswith(expected)
    assert "threshold = 0.2\n" in text


def test_baselines_are_rows_of_the_same_block():
    text = threshold_tables(_rows())
    assert "| ap (center)     | 36.853608 |" in text


def test_protocol_line_names_metric_iou_and_oracle():
    text = render(_rows(), "table", {"method": "gradcam", "layer": "layer4", "model": "resnet50"})
    assert "VOC07 11-point AP" in text
    assert "mAP over the 1 classes with non-difficult GT" in text
    assert "heat >= tau * max(heat)" in text
    assert "gradcam at layer layer4 of resnet50" in text
    assert "oracle" in text


def test_json_rows_have_the_documented_keys_and_null_for_nan():
    rows = json.loads(render(_rows(), "json"))
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


def test_unknown_format():
    with pytest.raises(ValueError, match="unknown format 'xml'"):
        render(_rows(), "xml")


def test_save_scores_writes_all_files(tmp_path):
    written = save_scores(_rows(), tmp_path)
    assert sorted(p.name for p in written) == ["scores.csv", "scores.json", "scores.md"]
    assert "Per class, threshold = 0.02, IoU = 0.3" in (tmp_path / "scores.md").read_text()
