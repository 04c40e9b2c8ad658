"""The core commands through click's runner: help, a tiny demo run, scoring pickles, and error paths."""

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from gradloc.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    args = ["--quiet", "run", "--config", str(CONFIGS / "demo.yaml"), "--out", str(root / "results"),
            "--cache-dir", str(root / "cache"), "--name", "tiny", "--thresholds", "0.1,0.2",
            "--iou", "0.3,0.5"]
    # a small demo: few images, short training (CLI behaviour, not localization quality, is tested here)
    overrides = root / "tiny.yaml"
    overrides.write_text((CONFIGS / "demo.yaml").read_text().replace("n_train: 240", "n_train: 48")
                         .replace("n_val: 80", "n_val: 8").replace("n_test: 80", "n_test: 12")
                         .replace("train_seconds: 90", "train_seconds: 5"))
    args[3] = str(overrides)
    result = CliRunner().invoke(main, args)
    return root, result


@pytest.mark.parametrize("command", ["run", "cams", "boxes", "score", "info", "models", "layers", "train"])
def test_help_has_an_example(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output


@pytest.mark.slow
def test_run_prints_owner_tables(tiny_run):
    root, result = tiny_run
    assert result.exit_code == 0, result.output
    block = result.output.split("threshold = 0.1\n", 1)[1].splitlines()
    assert re.fullmatch(r"\| +\| 0\.3 +\| 0\.5 +\|", block[0])
    assert re.fullmatch(r"\|-+\+-+\+-+\|", block[1])
    assert [line.split("|")[1].strip() for line in block[2:4]] == ["ap", "recall"]
    assert re.fullmatch(r"\| ap +\| \d+\.\d{6} +\| \d+\.\d{6} +\|", block[2])
    assert "| ap (center)" in result.output
    assert "VOC07 11-point AP" in result.output
    run_dir = root / "results" / "tiny"
    for name in ("scores.csv", "scores.md", "scores.json", "manifest.json", "config.yaml", "gt.pkl"):
        assert (run_dir / name).is_file(), name


@pytest.mark.slow
def test_score_run_folder_and_pickles_as_json(tiny_run):
    root, _ = tiny_run
    run_dir = root / "results" / "tiny"
    result = CliRunner().invoke(main, ["score", str(run_dir), "--format", "csv", "--iou", "0.5"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("threshold,threshold_mode,iou,metric,class,ap,recall,n_gt,n_det")
    result = CliRunner().invoke(main, ["score", "--gt", str(run_dir / "gt.pkl"),
                                       str(run_dir / "detections" / "thr_0.200.pkl"), "--format", "json",
                                       "--metric", "voc10"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert {r["iou"] for r in rows} == {0.3, 0.4, 0.5}
    assert {r["metric"] for r in rows} == {"voc10"}
    assert any(r["class"] == "mAP" for r in rows)


@pytest.mark.slow
def test_info_describes_the_run(tiny_run):
    root, _ = tiny_run
    result = CliRunner().invoke(main, ["info", str(root / "results" / "tiny")])
    assert result.exit_code == 0, result.output
    assert "config hash:" in result.output and "detections/thr_0.100.pkl" in result.output


def test_missing_config_is_one_line_exit_1(tmp_path):
    result = CliRunner().invoke(main, ["run", "--config", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"error: {tmp_path / 'nope.yaml'}: config file not found "
                                                  "(see configs/ for examples)"]
    assert "Traceback" not in result.output


def test_missing_voc_root_names_the_folder(tmp_path):
    result = CliRunner().invoke(main, ["run", "--voc-root", str(tmp_path / "VOCdevkit"), "--model", "resnet18"])
    assert result.exit_code == 1
    assert str(tmp_path / "VOCdevkit") in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_bad_threshold_list_is_a_usage_error():
    result = CliRunner().invoke(main, ["run", "--thresholds", "0.1,abc"])
    assert result.exit_code == 2
    assert "expected comma-separated numbers" in result.output


def test_threshold_out_of_range_names_the_key():
    result = CliRunner().invoke(main, ["run", "--thresholds", "0.1,1.5"])
    assert result.exit_code == 1
    assert "boxes.thresholds[1]" in result.output


def test_debug_shows_the_traceback(tmp_path):
    result = CliRunner().invoke(main, ["--debug", "run", "--config", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 1
    assert isinstance(result.exception, FileNotFoundError)


def test_score_without_inputs_is_a_usage_error():
    result = CliRunner().invoke(main, ["score"])
    assert result.exit_code == 2


def test_score_refuses_a_hostile_pickle(tmp_path):
    import os
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / "gt.pkl").write_bytes(pickle.dumps(Evil()))
    (tmp_path / "d.pkl").write_bytes(pickle.dumps(Evil()))
    result = CliRunner().invoke(main, ["score", "--gt", str(tmp_path / "gt.pkl"), str(tmp_path / "d.pkl")])
    assert result.exit_code == 1
    assert "refusing to load" in result.output and "pwned" not in result.output


@pytest.mark.parametrize(("flags", "match"), [
    (["--method", "guided_backprop"], "pixel-level pictures"),
    (["--method", "gradcam_plus"], "unknown CAM method 'gradcam_plus'"),
    (["--box-mode", "biggest"], "biggest"),
    (["--threshold-mode", "mean"], "mean"),
])
def test_unknown_names_are_refused_before_any_work(tmp_path, flags, match):
    result = CliRunner().invoke(main, ["run", "--config", str(CONFIGS / "demo.yaml"), *flags,
                                       "--cache-dir", str(tmp_path), "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert match in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # nothing generated, trained or written


def test_unknown_model_is_refused_with_suggestions(tmp_path):
    result = CliRunner().invoke(main, ["run", "--model", "resnet5O", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "resnet5O" in result.output and "resnet50" in result.output


@pytest.mark.slow
def test_on_error_skip_runs_and_lists_skipped_items_in_the_manifest(demo_data, demo_checkpoint, tmp_path):
    import shutil

    from gradloc.demo import DEMO_CLASSES

    devkit = tmp_path / "VOCdevkit"
    shutil.copytree(demo_data, devkit)
    test_ids = (devkit / "VOCdemo" / "ImageSets" / "Main" / "test.txt").read_text().split()
    (devkit / "VOCdemo" / "Annotations" / f"{test_ids[0]}.xml").write_text("<annotation><object>")
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  year: demo\n  split: test\n  classes: {list(DEMO_CLASSES)}\n"
                      f"model:\n  name: demo_cnn\n  input_size: 128\n")
    args = ["--quiet", "run", "--config", str(config), "--voc-root", str(devkit), "--checkpoint",
            str(demo_checkpoint), "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
            "--name", "skip", "--score-cut", "0.0"]
    failed = CliRunner().invoke(main, args)
    assert failed.exit_code == 1 and f"{test_ids[0]}.xml" in failed.output
    result = CliRunner().invoke(main, [*args, "--on-error", "skip"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "skip" / "manifest.json").read_text())
    assert [entry["image_id"] for entry in manifest["skipped"]] == [test_ids[0]]
    assert "malformed XML" in manifest["skipped"][0]["reason"]


@pytest.mark.slow
def test_score_per_class_tables(tiny_run):
    root, _ = tiny_run
    run_dir = str(root / "results" / "tiny")
    result = CliRunner().invoke(main, ["score", run_dir, "--iou", "0.5", "--per-class", "0.2"])
    assert result.exit_code == 0, result.output
    assert "per class, threshold = 0.2, IoU = 0.5" in result.output
    lines = result.output.split("per class, threshold = 0.2, IoU = 0.5")[1].splitlines()
    assert any(line.startswith("| disc") for line in lines) and any(line.startswith("| mAP") for line in lines)
    bad = CliRunner().invoke(main, ["score", run_dir, "--per-class", "0.7"])
    assert bad.exit_code == 1 and "not a threshold of these detections (0.1, 0.2)" in bad.output


def test_quiet_and_debug_also_work_after_the_command(tmp_path):
    result = CliRunner().invoke(main, ["run", "--config", str(tmp_path / "nope.yaml"), "--debug"])
    assert result.exit_code == 1 and isinstance(result.exception, FileNotFoundError)
    result = CliRunner().invoke(main, ["run", "--config", str(tmp_path / "nope.yaml"), "-q"])
    assert result.exit_code == 1 and "config file not found" in result.output
    assert "--quiet" in CliRunner().invoke(main, ["score", "--help"]).output
