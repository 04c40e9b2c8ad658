"""gradloc.run.sweep and `gradloc sweep`: τ selection on hand-made score rows, oracle labelling, the command."""

from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from gradloc.cli import main
from gradloc.run.config import load_config
from gradloc.run.sweep import parse_select_metric, render_sweep, split_config, sweep_dir, sweep_table
from gradloc.scoring.tables import select_threshold
from tests.conftest import CONFIGS

NAN = float("nan")


def _rows(means):
    """Score rows from {(threshold, iou): (cam mAP, cam recall)}; decoys that must never be selected: a
    center baseline and a class row with higher values."""
    rows = []
    for (tau, iou), (ap, recall) in means.items():
        base = {"threshold": tau, "threshold_mode": "max", "iou": iou, "metric": "voc07", "n_gt": 9,
                "n_det": 5, "box_mode": "largest"}
        rows.append({**base, "class": "mAP", "ap": ap, "recall": recall, "source": "cam"})
        rows.append({**base, "class": "mAP", "ap": 0.99, "recall": 0.99, "source": "center"})
        rows.append({**base, "class": "cat", "ap": 0.98, "recall": 0.98, "source": "cam"})
    return pd.DataFrame(rows)


# selection split: ap@0.5 is best at 0.2 and 0.3 (tie -> 0.2), recall@0.5 at 0.4 (where ap is NaN)
TRAIN = _rows({(0.1, 0.3): (0.60, 0.1), (0.1, 0.5): (0.20, 0.1), (0.2, 0.3): (0.10, 0.1),
               (0.2, 0.5): (0.35, 0.2), (0.3, 0.3): (0.10, 0.1), (0.3, 0.5): (0.35, 0.3),
               (0.4, 0.3): (0.10, 0.1), (0.4, 0.5): (NAN, 0.9)})
# evaluation split: ap@0.5 is best at 0.1
VAL = _rows({(0.1, 0.3): (0.70, 0.8), (0.1, 0.5): (0.40, 0.5), (0.2, 0.3): (0.50, 0.6),
             (0.2, 0.5): (0.30, 0.4), (0.3, 0.3): (0.45, 0.5), (0.3, 0.5): (0.25, 0.3),
             (0.4, 0.3): (0.05, 0.1), (0.4, 0.5): (0.01, 0.1)})


def test_parse_select_metric():
    assert parse_select_metric("ap@0.5") == ("ap", 0.5)
    assert parse_select_metric("recall@0.3") == ("recall", 0.3)
    for bad in ("ap", "map@0.5", "ap@1.5", "ap@x", "@0.5"):
        with pytest.raises(ValueError, match="is not <name>@<iou>"):
            parse_select_metric(bad)


def test_select_threshold_by_hand():
    assert select_threshold(TRAIN, "ap", 0.5) == (0.2, 0.35)  # tie with 0.3 -> smallest; NaN never wins
    assert select_threshold(TRAIN, "ap", 0.3) == (0.1, 0.60)
    assert select_threshold(TRAIN, "recall", 0.5) == (0.4, 0.9)
    assert select_threshold(VAL, "ap", 0.5) == (0.1, 0.40)
    with pytest.raises(ValueError, match=r"no CAM mAP ap at IoU 0.7 .* \(IoUs scored: 0.3, 0.5\)"):
        select_threshold(TRAIN, "ap", 0.7)


def test_table_on_another_split_and_oracle_labels():
    table = sweep_table(TRAIN, VAL, "ap@0.5", "train", "val")
    cam = table[table["source"] == "cam"].set_index(["choice", "iou"])
    # tau chosen on train (0.2), reported with val's numbers at 0.2
    assert cam.loc[("selected", 0.5), "threshold"] == 0.2
    assert cam.loc[("selected", 0.5), "ap"] == 0.30 and cam.loc[("selected", 0.3), "ap"] == 0.50
    assert cam.loc[("selected", 0.5), "select_value"] == 0.35  # measured on train
    assert not cam.loc[("selected", 0.5), "oracle"] and cam.loc[("selected", 0.5), "chosen_on"] == "train"
    # the oracle row: best on val itself
    assert cam.loc[("oracle", 0.5), "threshold"] == 0.1 and cam.loc[("oracle", 0.5), "ap"] == 0.40
    assert cam.loc[("oracle", 0.5), "oracle"] and cam.loc[("oracle", 0.5), "label"].startswith("oracle")
    assert set(table["evaluated_on"]) == {"val"}
    assert set(table["source"]) == {"cam", "center"} and table["source"].iloc[0] == "cam"


def test_same_split_is_only_oracle():
    table = sweep_table(VAL, VAL, "ap@0.5", "val", "val")
    assert set(table["choice"]) == {"oracle"} and table["oracle"].all()
    assert set(table["threshold"]) == {0.1}
    text = render_sweep(table, "voc07")
    assert "oracle: tau chosen on val (the evaluated split)" in text
    assert "tau chosen on val " not in text.replace("oracle: tau chosen on val", "")


def test_render_labels_where_tau_was_chosen():
    text = render_sweep(sweep_table(TRAIN, VAL, "recall@0.5", "train", "val"), "voc07")
    lines = text.splitlines()
    selected = next(line for line in lines if line.startswith("| tau chosen on train") and "| cam " in line)
    # tau 0.4 chosen by recall on train (90 %), then val's ap@0.3, ap@0.5, recall@0.3, recall@0.5 at 0.4
    cells = [cell.strip() for cell in selected.split("|")[2:-1]]
    assert cells == ["0.4", "90.00", "cam", "5.00", "1.00", "10.00", "10.00", "-"]  # no CorLoc without a run
    assert any(line.startswith("| oracle: tau chosen on val") for line in lines)
    assert "VOC07 11-point AP" in text and "recall@0.5 on chosen split" in text


def test_tau_missing_on_the_evaluated_split():
    with pytest.raises(ValueError, match=r"threshold 0\.2 chosen on train was not scored on val"):
        sweep_table(TRAIN, VAL[VAL["threshold"] != 0.2], "ap@0.5", "train", "val")


def test_split_config_puts_runs_beside_the_run_folder_of_the_same_name():
    config = load_config(None, {"out": "res", "name": "lite0"})
    other = split_config(config, "train")
    assert other.data.split == "train" and other.run_dir == Path("res") / "lite0-train"
    assert other.model == config.model and other.boxes == config.boxes
    assert sweep_dir(config) == Path("res") / "lite0-sweep"
    assert config.run_dir not in (other.run_dir, *other.run_dir.parents, sweep_dir(config))


# --- the command --------------------------------------------------------------------------------------------


def test_help_has_an_example():
    result = CliRunner().invoke(main, ["sweep", "--help"])
    assert result.exit_code == 0 and "Example" in result.output


def test_command_with_a_stub_pipeline(tmp_path, monkeypatch):
    calls = []

    def fake_run_split(config, stage=None):
        calls.append((config.data.split, config.run_dir))
        return config.run_dir, {"train": TRAIN, "val": VAL}[config.data.split], None

    monkeypatch.setattr("gradloc.run.sweep.run_split", fake_run_split)
    result = CliRunner().invoke(main, ["-q", "sweep", "--out", str(tmp_path), "--name", "s", "--iou",
                                       "0.3,0.5", "--select-split", "train", "--eval-split", "val"])
    assert result.exit_code == 0, result.output
    assert calls == [("train", tmp_path / "s-train"), ("val", tmp_path / "s-val")]
    assert "| tau chosen on train" in result.output and "| oracle: tau chosen on val" in result.output
    assert result.output.endswith("\n")
    saved = pd.read_csv(tmp_path / "s-sweep" / "sweep.csv")
    assert set(saved.loc[saved["choice"] == "selected", "threshold"]) == {0.2}
    assert "oracle" in (tmp_path / "s-sweep" / "sweep.md").read_text()
    assert not (tmp_path / "s").exists()  # a run folder `gradloc run --name s` would be left alone


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--select-metric", "best"], 1, "selection metric 'best' is not <name>@<iou>"),
    (["--select-metric", "ap@0.7", "--iou", "0.5"], 1, "IoU 0.7 is not scored (score.iou = 0.5)"),
    (["--split", "val"], 2, "not --split"),
])
def test_command_errors(tmp_path, monkeypatch, args, code, message):
    monkeypatch.setattr("gradloc.run.sweep.run_split", lambda *a, **k: pytest.fail("no work before the checks"))
    result = CliRunner().invoke(main, ["sweep", "--out", str(tmp_path), "--select-split", "train",
                                       "--eval-split", "val", *args])
    assert result.exit_code == code, result.output
    assert message in result.output and "Traceback" not in result.output


def test_missing_split_options_exit_2():
    assert CliRunner().invoke(main, ["sweep", "--select-split", "train"]).exit_code == 2


@pytest.mark.slow
def test_sweep_on_a_tiny_demo(tmp_path):
    """The real pipeline on both splits of a small offline demo (CNN trained for a few seconds)."""
    config = tmp_path / "tiny.yaml"
    config.write_text((CONFIGS / "demo.yaml").read_text().replace("n_train: 240", "n_train: 48")
                      .replace("n_val: 80", "n_val: 8").replace("n_test: 80", "n_test: 12")
                      .replace("train_seconds: 90", "train_seconds: 5"))
    result = CliRunner().invoke(main, ["-q", "sweep", "--config", str(config),
                                       "--out", str(tmp_path / "results"), "--cache-dir",
                                       str(tmp_path / "cache"), "--name", "demo",
                                       "--thresholds", "0.1,0.3", "--iou", "0.3,0.5", "--select-split", "val",
                                       "--eval-split", "test", "--select-metric", "recall@0.3"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "results"
    for split in ("val", "test"):
        assert (out / f"demo-{split}" / "scores.csv").is_file() and (out / f"demo-{split}" / "manifest.json").is_file()
    table = pd.read_csv(out / "demo-sweep" / "sweep.csv")
    assert set(table["choice"]) == {"selected", "oracle"}
    assert set(table.loc[table["choice"] == "selected", "chosen_on"]) == {"val"}
    scores = pd.read_csv(out / "demo-test" / "scores.csv")
    cam = table[(table["source"] == "cam") & (table["iou"] == 0.5)]
    selected = cam[cam["choice"] == "selected"].iloc[0]
    row = scores[(scores["class"] == "mAP") & (scores["source"] == "cam") & (scores["iou"] == 0.5)
                 & (scores["threshold"] == selected["threshold"])].iloc[0]
    assert selected["ap"] == row["ap"]  # the table reports the evaluated split's own score file
    corloc = pd.read_csv(out / "demo-test" / "localization.csv")
    corloc = corloc[(corloc["metric"] == "corloc@0.5") & (corloc["class"] == "mean")].set_index("threshold")
    assert selected["corloc"] == corloc.loc[selected["threshold"], "value"]  # CorLoc of the same run, CAM only
    assert table.loc[table["source"] != "cam", "corloc"].isna().all()
    assert "CorLoc@0.5" in result.stdout


def test_render_digits():
    text = render_sweep(sweep_table(TRAIN, VAL, "recall@0.5", "train", "val"), "voc07", digits=0)
    selected = next(line for line in text.splitlines() if line.startswith("| tau chosen on train") and "| cam " in line)
    assert [cell.strip() for cell in selected.split("|")[2:-1]] == ["0.4", "90", "cam", "5", "1", "10", "10", "-"]


def test_command_digits(tmp_path, monkeypatch):
    monkeypatch.setattr("gradloc.run.sweep.run_split",
                        lambda config, stage=None: (config.run_dir, {"train": TRAIN, "val": VAL}[config.data.split],
                                                    None))
    result = CliRunner().invoke(main, ["-q", "sweep", "--out", str(tmp_path), "--name", "s", "--iou", "0.3,0.5",
                                       "--select-split", "train", "--eval-split", "val", "--select-metric",
                                       "recall@0.5", "--digits", "0"])
    assert result.exit_code == 0, result.output
    selected = next(line for line in result.stdout.splitlines()
                    if line.startswith("| tau chosen on train") and "| cam " in line)
    assert [cell.strip() for cell in selected.split("|")[2:-1]] == ["0.4", "90", "cam", "5", "1", "10", "10", "-"]
