"""The core commands through click's runner: help, a tiny demo run, scoring pickles, and error paths."""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from gradloc.cli import main
from tests.conftest import CONFIGS, ROOT


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    # paths relative to the working directory, as users type them (the manifest must not keep them so)
    args = ["--quiet", "run", "--config", str(CONFIGS / "demo.yaml"), "--out", "results",
            "--cache-dir", "cache", "--name", "tiny", "--thresholds", "0.1,0.2",
            "--iou", "0.3,0.5"]
    # a small demo: few images, short training (CLI behaviour, not localization quality, is tested here)
    overrides = root / "tiny.yaml"
    overrides.write_text((CONFIGS / "demo.yaml").read_text().replace("n_train: 240", "n_train: 48")
                         .replace("n_val: 80", "n_val: 8").replace("n_test: 80", "n_test: 12")
                         .replace("train_seconds: 90", "train_seconds: 5"))
    args[3] = str(overrides)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        result = CliRunner().invoke(main, args)
    finally:
        os.chdir(cwd)
    return root, result


@pytest.mark.parametrize("command", ["run", "demo", "cams", "merge", "boxes", "score", "info", "models", "layers",
                                     "train", "export"])
def test_help_has_an_example(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output


@pytest.mark.slow
def test_run_prints_owner_tables(tiny_run):
    root, result = tiny_run
    assert result.exit_code == 0, result.output
    block = result.output.split("threshold = 0.1\n", 1)[1].splitlines()
    assert re.fullmatch(r"\| +\| IoU 0\.3 +\| IoU 0\.5 +\|", block[0])
    assert re.fullmatch(r"\|-+\+-+\+-+\|", block[1])
    assert [line.split("|")[1].strip() for line in block[2:4]] == ["ap", "recall"]
    assert re.fullmatch(r"\| ap +\| \d+\.\d{2} +\| \d+\.\d{2} +\|", block[2])
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
    assert result.stdout.startswith("threshold,threshold_mode,iou,metric,class,ap,recall,n_gt,n_det")
    result = CliRunner().invoke(main, ["score", "--gt", str(run_dir / "gt.pkl"),
                                       str(run_dir / "detections" / "thr_0.200.pkl"), "--format", "json",
                                       "--metric", "voc10"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert {r["iou"] for r in rows} == {0.3, 0.4, 0.5}
    assert {r["metric"] for r in rows} == {"voc10"}
    assert any(r["class"] == "mAP" for r in rows)


@pytest.mark.slow
def test_info_describes_the_run(tiny_run):
    root, _ = tiny_run
    result = CliRunner().invoke(main, ["info", str(root / "results" / "tiny")])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "{" not in out and "None" not in out  # no raw dicts, no unresolved settings
    assert re.search(r"^model: +demo_cnn, voc head, input 128 px \(letterbox\), float32, from /", out, re.M)
    assert re.search(r"^CAM: +gradcam at layer block4$", out, re.M)
    assert re.search(r"^thresholds: +0\.1, 0\.2 \(max; boxes: largest", out, re.M)
    assert re.search(r"^data: +VOCdemo test, 12 images, 4 classes", out, re.M)
    assert re.search(r"^classes explained: predicted \(p >= 0\.5\)$", out, re.M)
    assert re.search(r"^seconds per stage: cams [\d.]+, boxes [\d.]+, score [\d.]+$", out, re.M)
    rows = json.loads(CliRunner().invoke(main, ["score", str(root / "results" / "tiny"), "--format", "json",
                                                "--iou", "0.5"]).stdout)["rows"]
    best = max(r["ap"] for r in rows if r["class"] == "mAP" and r["source"] == "cam")
    assert "Headline: no selected tau" in out  # --thresholds 0.1,0.2 left out the config's selected tau
    assert re.search(rf"^  mAP@0\.5 \(tau 0\.\d\) +{100 * best:.2f}  oracle: the best tau of the sweep on test",
                     out, re.M)


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
    (["--method", "guided_backprop"], "'guided_backprop' is not one of 'cam', 'gradcam', "),  # pixel-level only
    (["--method", "gradcam_plus"], "'gradcam_plus' is not one of 'cam', 'gradcam', "),
    (["--box-mode", "biggest"], "'biggest' is not one of 'largest', 'all', 'union'"),
    (["--threshold-mode", "mean"], "'mean' is not one of 'max', 'minmax', 'percentile'"),
])
def test_unknown_names_are_refused_before_any_work(tmp_path, flags, match):
    result = CliRunner().invoke(main, ["run", "--config", str(CONFIGS / "demo.yaml"), *flags,
                                       "--cache-dir", str(tmp_path), "--out", str(tmp_path)])
    assert result.exit_code == 2  # a usage error: the flag's choices are listed in --help
    assert match in result.output
    assert list(tmp_path.iterdir()) == []  # nothing generated, trained or written


def test_unknown_method_in_a_config_is_one_line(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("cams:\n  method: guided_backprop\n")
    result = CliRunner().invoke(main, ["run", "--config", str(config), "--out", str(tmp_path)])
    assert result.exit_code == 1 and "pixel-level pictures" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_unknown_model_is_refused_with_suggestions(tmp_path):
    result = CliRunner().invoke(main, ["run", "--model", "resnet5O", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "resnet5O" in result.output and "resnet50" in result.output


@pytest.mark.slow
def test_on_error_skip_runs_and_lists_skipped_items_in_the_manifest(demo_data, demo_checkpoint, tmp_path):
    import shutil

    from gradloc.datasets.demo import DEMO_CLASSES

    devkit = tmp_path / "VOCdevkit"
    shutil.copytree(demo_data, devkit)
    test_ids = (devkit / "VOCdemo" / "ImageSets" / "Main" / "test.txt").read_text().split()
    (devkit / "VOCdemo" / "Annotations" / f"{test_ids[0]}.xml").write_text("<annotation><object>")
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  year: demo\n  split: test\n  classes: {list(DEMO_CLASSES)}\n"
                      f"model:\n  name: demo_cnn\n  input_size: 64\n")
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
    assert "Per class, threshold = 0.2, IoU = 0.5" in result.output
    lines = result.output.split("Per class, threshold = 0.2, IoU = 0.5")[1].splitlines()
    assert any(line.startswith("| disc") for line in lines) and any(line.startswith("| mAP") for line in lines)


def test_quiet_and_debug_also_work_after_the_command(tmp_path):
    result = CliRunner().invoke(main, ["run", "--config", str(tmp_path / "nope.yaml"), "--debug"])
    assert result.exit_code == 1 and isinstance(result.exception, FileNotFoundError)
    result = CliRunner().invoke(main, ["run", "--config", str(tmp_path / "nope.yaml"), "-q"])
    assert result.exit_code == 1 and "config file not found" in result.output
    assert "--quiet" in CliRunner().invoke(main, ["score", "--help"]).output


# --- score: machine-readable output, --save, validation, broken pipe; export and --voc-results ---------------


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_score_json_and_csv_with_per_class_are_one_document(tiny_run):
    import csv
    import io

    root, _ = tiny_run
    run_dir = str(root / "results" / "tiny")
    result = CliRunner().invoke(main, ["score", run_dir, "--format", "json", "--per-class", "0.2"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]  # one document: no tables appended
    assert {r["threshold"] for r in rows} == {0.2}
    assert {"mAP", "disc"} <= {r["class"] for r in rows} and {"cam", "center"} <= {r["source"] for r in rows}
    result = CliRunner().invoke(main, ["score", run_dir, "--format", "csv", "--per-class", "0.2"])
    assert result.exit_code == 0, result.output
    records = list(csv.reader(io.StringIO(result.stdout)))
    assert records[0][:3] == ["threshold", "threshold_mode", "iou"]
    assert {len(r) for r in records} == {len(records[0])} and len(records) == len(rows) + 1


@pytest.mark.slow
def test_score_writes_nothing_unless_save(tiny_run):
    root, _ = tiny_run
    run_dir = root / "results" / "tiny"
    before = _files(run_dir)
    result = CliRunner().invoke(main, ["score", str(run_dir), "--iou", "0.5"])
    assert result.exit_code == 0, result.output
    assert _files(run_dir) == before
    assert "tau=nan" not in result.stdout and re.search(r"pointing game@15px[^\n]*\) +\d+\.\d\d %", result.stdout)
    # every option is checked before anything is printed or written
    bad = CliRunner().invoke(main, ["score", str(run_dir), "--iou", "0.5", "--save", "--per-class", "0.33"])
    assert bad.exit_code == 1 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == ["error: --per-class: no threshold 0.33; available: 0.1, 0.2"]
    assert _files(run_dir) == before
    saved = CliRunner().invoke(main, ["score", str(run_dir), "--iou", "0.5", "--save", "--metric", "voc10"])
    assert saved.exit_code == 0, saved.output
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert manifest["rescored_scores"]["score"] == {"iou": [0.5], "metric": "voc10"}
        assert "scores.csv" in manifest["rescored_scores"]["files"]
        assert manifest["config"]["score"]["iou"] == [0.3, 0.5]  # what the run was made with stays
        assert {r["iou"] for r in json.loads((run_dir / "scores.json").read_text())["rows"]} == {0.5}
    finally:  # restore the shared run for the other tests
        for name, data in before.items():
            (run_dir / name).write_bytes(data)


@pytest.mark.slow
def test_score_layout_rows_and_digits(tiny_run):
    root, _ = tiny_run
    result = CliRunner().invoke(main, ["score", str(root / "results" / "tiny"), "--iou", "0.5", "--layout", "rows",
                                       "--digits", "3", "-q"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.startswith("|") and "---" not in line]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[:3] == ["tau", "ap@0.5", "recall@0.5"] and "ap@0.5 (center)" in header
    assert [line.split("|")[1].strip() for line in lines[1:3]] == ["0.1", "0.2"]
    assert re.fullmatch(r"\d+\.\d{3}", lines[1].split("|")[2].strip())


@pytest.mark.slow
def test_export_then_score_voc_results_reproduces_the_run(tiny_run, tmp_path):
    root, _ = tiny_run
    run_dir = root / "results" / "tiny"
    result = CliRunner().invoke(main, ["export", str(run_dir), "--threshold", "0.2", "--format", "voc",
                                       str(tmp_path / "voc")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "voc" / "comp4_det_test_disc.txt").is_file()
    assert (tmp_path / "voc" / "baselines" / "center" / "comp4_det_test_disc.txt").is_file()
    args = ["--iou", "0.3,0.5", "--format", "json"]
    run_rows = json.loads(CliRunner().invoke(main, ["score", str(run_dir), *args, "--per-class", "0.2"]).stdout
                          )["rows"]
    result = CliRunner().invoke(main, ["score", "--gt", str(run_dir / "gt.pkl"), "--voc-results",
                                       str(tmp_path / "voc"), *args])
    assert result.exit_code == 0, result.output
    voc_rows = json.loads(result.stdout)["rows"]

    def numbers(rows):
        return {(r["source"], r["class"], r["iou"]): (r["ap"], r["recall"], r["n_gt"], r["n_det"]) for r in rows}

    assert numbers(voc_rows) == numbers(run_rows)  # exactly, every source, class and IoU
    assert {r["threshold"] for r in voc_rows} == {None}


def test_voc_results_malformed_line_is_one_line_error(tmp_path):
    import numpy as np

    from gradloc.core.files import save_pickle
    from gradloc.core.formats import GroundTruth

    save_pickle(GroundTruth(classes=["cat"], image_ids=["a"], image_sizes=np.array([[10, 10]]),
                            image_index=np.array([0]), labels=np.array([0]), boxes=np.array([[1.0, 1, 5, 5]]),
                            difficult=np.array([False])), tmp_path / "gt.pkl")
    (tmp_path / "voc").mkdir()
    (tmp_path / "voc" / "comp4_det_val_cat.txt").write_text("a 0.5 1 1 5 5\na 0.4 1 1 5\n")
    result = CliRunner().invoke(main, ["score", "--gt", str(tmp_path / "gt.pkl"), "--voc-results",
                                       str(tmp_path / "voc")])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'voc' / 'comp4_det_val_cat.txt'}:2: expected 6 fields 'image_id score x1 y1 x2 y2', "
        "found 5: 'a 0.4 1 1 5'"]
    (tmp_path / "voc" / "comp4_det_val_cat.txt").write_text("a 0.5 1 1 5 5\n")
    result = CliRunner().invoke(main, ["score", "--gt", str(tmp_path / "gt.pkl"), "--voc-results",
                                       str(tmp_path / "voc"), "--format", "csv", "--iou", "0.5"])
    assert result.exit_code == 0, result.output
    assert "0.5,voc07,cat,1.0" in result.stdout.replace("1.0000000000000002", "1.0")


def test_score_save_needs_a_run_folder(tmp_path):
    result = CliRunner().invoke(main, ["score", "--gt", str(tmp_path / "gt.pkl"), "x.pkl", "--save"])
    assert result.exit_code == 2 and "--save writes into a run folder" in result.output


def test_broken_pipe_exits_quietly(tmp_path):
    import os
    import subprocess
    import sys

    import numpy as np

    from gradloc.core.files import save_pickle
    from gradloc.core.formats import Detections, GroundTruth

    n = 300
    classes = [f"c{i}" for i in range(n)]
    save_pickle(GroundTruth(classes=classes, image_ids=["a"], image_sizes=np.array([[10, 10]]),
                            image_index=np.zeros(n, np.int64), labels=np.arange(n),
                            boxes=np.tile([1.0, 1, 5, 5], (n, 1)), difficult=np.zeros(n, bool)), tmp_path / "gt.pkl")
    save_pickle(Detections(threshold=0.2, threshold_mode="max", box_mode="largest", classes=classes,
                           image_ids=["a"], image_index=np.zeros(0, np.int64), labels=np.zeros(0, np.int64),
                           scores=np.zeros(0),
                           boxes=np.zeros((0, 4))), tmp_path / "d.pkl")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gradloc", "score", "--gt", str(tmp_path / "gt.pkl"),
                             str(tmp_path / "d.pkl"), "--format", "csv"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # like `| head -1` gone before gradloc writes (it is still importing and scoring)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode in (0, 141)
    assert stderr.decode() == ""


def test_logging_goes_through_tqdm_while_a_bar_is_shown():
    import logging

    import click
    from tqdm.contrib.logging import _TqdmLoggingHandler

    from gradloc.cli.options import tqdm_bar

    ctx = click.Context(main, obj={"quiet": False})
    root = logging.getLogger()
    handler = logging.StreamHandler()
    root.addHandler(handler)
    try:
        with tqdm_bar(ctx, total=1):
            assert any(isinstance(h, _TqdmLoggingHandler) for h in root.handlers)
            assert handler not in root.handlers
        assert handler in root.handlers
    finally:
        root.removeHandler(handler)


@pytest.mark.slow
def test_a_copied_run_works_from_any_directory(tiny_run, tmp_path, monkeypatch):
    """Run folder and cache copied elsewhere, original cache moved away, cwd = /: every reader command works
    on the copy and uses the copy's cache and data."""
    root, result = tiny_run
    assert result.exit_code == 0, result.output
    copy = tmp_path / "elsewhere"
    shutil.copytree(root / "results" / "tiny", copy / "results" / "tiny")
    shutil.copytree(root / "cache", copy / "cache")
    run_dir = copy / "results" / "tiny"
    hidden = root / "cache.hidden"
    (root / "cache").rename(hidden)  # the run's original cache is gone: only the copy can be used
    try:
        monkeypatch.chdir("/")
        for args in (["info", str(run_dir)],
                     ["score", str(run_dir), "--iou", "0.5", "--format", "csv"],
                     ["compare", str(run_dir), str(run_dir), "--iou", "0.5"],
                     ["plot", str(run_dir), "--out", str(tmp_path / "plots")],
                     ["export", str(run_dir), str(tmp_path / "exported"), "--threshold", "0.2"],
                     ["show", str(run_dir), "--threshold", "0.2", "--n", "2", "--png", str(tmp_path / "s.png")]):
            result = CliRunner().invoke(main, args)
            assert result.exit_code == 0, (args, result.output)
        assert (tmp_path / "s.png").stat().st_size > 0
        assert any((tmp_path / "plots").glob("*.png")) and any((tmp_path / "exported").glob("*.txt"))
    finally:
        monkeypatch.chdir(root)
        hidden.rename(root / "cache")
    stored = json.loads((run_dir / "manifest.json").read_text())
    assert stored["paths"]["cache_dir"]["relative_to_run"].startswith("../../cache/cams/")
    assert Path(stored["config"]["data"]["voc_root"]).is_absolute()


def test_each_command_shows_its_own_flags_with_their_choices():
    cams_help = CliRunner().invoke(main, ["cams", "--help"]).output
    for absent in ("--thresholds", "--iou", "--metric", "--explain", "--out ", "--name"):
        assert absent not in cams_help, absent
    assert re.search(r"--method \[cam\|gradcam\|gradcampp\|", cams_help)
    assert "guided" not in cams_help  # pixel-level methods make no boxes: not offered
    assert "score tables" not in cams_help and "-q, --quiet" in cams_help
    run_help = CliRunner().invoke(main, ["run", "--help"]).output
    for choice in ("--threshold-mode [max|minmax|percentile]", "--box-mode [largest|all|union]",
                   "--explain [predicted|gt|all]", "--head [voc|imagenet|voc+imagenet]",
                   "--resize-mode [letterbox|stretch|shortside]", "--confidence [score|"):
        assert choice in run_help, choice
    assert "--classes" not in run_help.replace("was --classes", "")
    boxes_help = CliRunner().invoke(main, ["boxes", "--help"]).output
    assert "--thresholds" in boxes_help and "--iou" not in boxes_help
    result = CliRunner().invoke(main, ["run", "--box-mode", "biggest"])
    assert result.exit_code == 2 and "'biggest' is not one of 'largest', 'all', 'union'" in result.output


def test_out_is_a_folder_everywhere():
    train_help = CliRunner().invoke(main, ["train", "--help"]).output
    assert not re.search(r"^\s+--out\b", train_help, re.M) and "--checkpoint-out FILE" in train_help
    result = CliRunner().invoke(main, ["train", "--out", "x.pt"])
    assert result.exit_code == 2 and "No such option '--out'" in result.output
    assert "--out DIRECTORY" in CliRunner().invoke(main, ["plot", "--help"]).output
    assert not re.search(r"^\s+--out-dir", CliRunner().invoke(main, ["plot", "--help"]).output, re.M)
    assert "--png FILE" in CliRunner().invoke(main, ["show", "--help"]).output


def test_single_iou_commands_refuse_a_list(tmp_path):
    for command in (["plot", str(tmp_path)], ["compare", str(tmp_path), str(tmp_path)]):
        result = CliRunner().invoke(main, [*command, "--iou", "0.3,0.5"])
        assert result.exit_code == 2 and "shows one IoU" in result.output, command


def test_explain_is_a_config_key_and_a_flag(tmp_path):
    from gradloc.run.config import load_config

    old = tmp_path / "old.yaml"
    old.write_text("boxes:\n  classes: gt\n")  # the key's name before version 0.1
    result = CliRunner().invoke(main, ["run", "--config", str(old)])
    assert result.exit_code == 1 and "unknown config key boxes.classes" in result.output
    old.write_text("boxes:\n  explain: gt\n")
    assert load_config(old).boxes.explain == "gt"
    result = CliRunner().invoke(main, ["run", "--explain", "everything"])
    assert result.exit_code == 2


@pytest.mark.slow
def test_only_scores_a_subset_of_classes(tiny_run):
    root, _ = tiny_run
    run_dir = str(root / "results" / "tiny")
    every = json.loads(CliRunner().invoke(main, ["score", run_dir, "--iou", "0.5", "--format", "json"]).stdout
                       )["rows"]
    result = CliRunner().invoke(main, ["score", run_dir, "--iou", "0.5", "--format", "json", "--only",
                                       "disc,square"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert {r["class"] for r in rows} == {"disc", "square", "mAP"}
    cam = [r for r in rows if r["source"] == "cam" and r["threshold"] == 0.2]
    full = {r["class"]: r["ap"] for r in every if r["source"] == "cam" and r["threshold"] == 0.2}
    per_class = {r["class"]: r["ap"] for r in cam}
    assert per_class["disc"] == full["disc"] and per_class["square"] == full["square"]
    aps = [full[c] for c in ("disc", "square") if full[c] == full[c]]
    assert per_class["mAP"] == pytest.approx(sum(aps) / len(aps))
    table = CliRunner().invoke(main, ["score", run_dir, "--iou", "0.5", "--only", "disc,square"]).output
    assert "mAP over the 2 classes of disc, square (--only)" in table
    assert "Localization (mean over the classes disc, square (--only)" in table
    result = CliRunner().invoke(main, ["score", run_dir, "--only", "disc,nope"])
    assert result.exit_code == 1 and "'nope' is not one of disc, square, triangle, cross" in result.output


@pytest.mark.slow
def test_only_restricts_the_localization_rows(tiny_run):
    from gradloc.run.folder import open_run
    from gradloc.run.score import MEAN_ALL_CLASSES, localization_scores

    run = open_run(tiny_run[0] / "results" / "tiny")
    every, some = localization_scores(run), localization_scores(run, ["square", "disc"])
    means = ["mean", MEAN_ALL_CLASSES]
    per_class = ~every["class"].isin(means)
    assert set(every[per_class]["class"]) > {"square", "disc"}
    assert set(some[~some["class"].isin(means)]["class"]) <= {"square", "disc"}
    # per-class rows of the kept classes are unchanged: the restriction drops rows, it does not rescore them
    key = ["metric", "threshold", "class"]
    kept = every[every["class"].isin(["square", "disc"])].set_index(key).sort_index()
    pd.testing.assert_frame_equal(some[some["class"].isin(["square", "disc"])].set_index(key).sort_index(), kept)
    # the means are over the kept classes: CorLoc's mean is the mean of its two class rows
    corloc = some[some["metric"] == "corloc@0.5"]
    for tau, frame in corloc.groupby("threshold"):
        classes = frame[frame["class"].isin(["square", "disc"])]["value"].dropna()
        assert frame[frame["class"] == "mean"]["value"].item() == pytest.approx(classes.mean()), tau
    # pairs: n of the pointing game / MaxBoxAccV2 count only the kept classes' (image, class) pairs
    pairs = {label: int(label_rows["n"].iloc[0]) for label, label_rows in
             some[some["class"].isin(["mean"])].groupby("metric")}
    gt = run.gt
    n_pairs = len({(i, c) for i, c in zip(gt.image_index, gt.labels, strict=True)
                   if gt.classes[c] in ("square", "disc")})
    assert pairs["MaxBoxAccV2 (gradloc convention)"] == n_pairs
    assert pairs["MaxBoxAccV2 (wsolevaluation exact, tau step 0.01)"] == n_pairs


@pytest.mark.slow
def test_compare_refuses_different_ground_truth_unless_forced(tiny_run, tmp_path):
    import pickle

    root, _ = tiny_run
    run_a = root / "results" / "tiny"
    run_b = tmp_path / "other"
    shutil.copytree(run_a, run_b)
    manifest = json.loads((run_b / "manifest.json").read_text())
    manifest["config"]["cams"]["method"] = "gradcampp"
    (run_b / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["compare", str(run_a), str(run_b), "--iou", "0.5"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Config differences (A | B): 1\n  cams.method: gradcam | gradcampp\n")
    assert "Largest disagreements (AP, B - A): none" in result.stdout  # same scores: all ties, none listed
    gt = pickle.loads((run_b / "gt.pkl").read_bytes())
    gt["image_ids"][0] = "renamed"
    (run_b / "gt.pkl").write_bytes(pickle.dumps(gt))
    result = CliRunner().invoke(main, ["compare", str(run_a), str(run_b), "--iou", "0.5"])
    assert result.exit_code == 1 and result.stdout == ""
    assert "cams.method: gradcam | gradcampp" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: tiny and other are scored on different "
                                                             "ground truth (image ids: 12 | 12 images, 1 only in A")
    result = CliRunner().invoke(main, ["compare", str(run_a), str(run_b), "--iou", "0.5", "--force"])
    assert result.exit_code == 0 and "Different ground truth (A | B, compared with --force): image ids" in result.stdout


def test_layers_prints_names_layer_accepts_with_shapes():
    import torch

    from gradloc.cams.methods import compute_cams
    from gradloc.models.build import build_architecture

    result = CliRunner().invoke(main, ["layers", "resnet18", "--input-size", "64"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:2] == ["layer", "(--layer)"] and "output at 64x64" in lines[0]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert rows["layer4"] == ["512x2x2", "default"]
    assert "avgpool" not in rows
    for head in ("voc", "imagenet"):  # printed names run as --layer values whatever the head
        model = build_architecture("resnet18", head=head)
        for name in ("layer4", "layer3.1.bn2"):
            maps, _ = compute_cams(model, torch.zeros(1, 3, 64, 64), [0], layer=name)
            assert maps.shape[-2:] == ((2, 2) if name == "layer4" else (4, 4))
    result = CliRunner().invoke(main, ["layers", "resnet18", "--input-size", "64", "--all"])
    assert re.search(r"^avgpool +512x1x1 +not for CAMs: adaptive pooling", result.output, re.M)


def test_demo_runs_the_packaged_config_from_any_directory(tmp_path, monkeypatch):
    from gradloc.run.config import load_config, packaged_config

    packaged = packaged_config("demo")
    assert packaged.parent == Path(__import__("gradloc").__file__).parent / "data"  # package data, not configs/
    assert load_config(packaged).demo.enabled
    assert (CONFIGS / "demo.yaml").resolve() == packaged.resolve()  # configs/demo.yaml is the same file
    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    # the packaged config loads and validates from here; the unwritable --out stops it before any work
    result = CliRunner().invoke(main, ["demo", "--out", str(blocker / "results")])
    assert result.exit_code == 1 and "output folder is not writable" in result.output, result.output
    assert not (tmp_path / ".gradloc-cache").exists()
    result = CliRunner().invoke(main, ["demo", "--config", "x.yaml"])
    assert result.exit_code == 2 and "packaged demo config" in result.output


def test_reading_commands_never_import_torch(tiny_run, tmp_path):
    """score, info, plot, show, export, compare only read a run folder and models lists the registry: they must
    not pay torch's start-up (seconds)."""
    import subprocess
    import sys

    root, _ = tiny_run
    run_dir = str(root / "results" / "tiny")
    commands = [["score", run_dir], ["info", run_dir], ["plot", run_dir, "--out", str(tmp_path / "p")],
                ["show", run_dir, "--threshold", "0.2", "--n", "2", "--png", str(tmp_path / "s.png")],
                ["export", run_dir, str(tmp_path / "e"), "--threshold", "0.2"], ["compare", run_dir, run_dir],
                ["models"]]
    code = ("import sys\nfrom click.testing import CliRunner\nfrom gradloc.cli import main\n"
            f"for args in {commands!r}:\n"
            "    result = CliRunner().invoke(main, args)\n"
            "    assert result.exit_code == 0, (args, result.output)\n"
            "print(sorted(m for m in ('torch', 'torchvision', 'timm') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_compare_prints_paired_intervals_of_the_differences(tiny_run, tmp_path):
    """B = A with its τ = 0.2 boxes moved: the paired mAP difference is B - A exactly, with a BCa interval; A
    against itself differs by 0 in every resample."""
    from gradloc.core.files import save_pickle
    from gradloc.core.formats import load_detections, load_ground_truth
    from gradloc.scoring.voc import evaluate

    root, _ = tiny_run
    a = root / "results" / "tiny"
    b = tmp_path / "moved"
    shutil.copytree(a, b)
    dets = load_detections(b / "detections" / "thr_0.200.pkl")
    save_pickle(dataclasses.replace(dets, boxes=dets.boxes + np.array([6.0, 6.0, 6.0, 6.0])),
                b / "detections" / "thr_0.200.pkl")
    assert CliRunner().invoke(main, ["score", str(b), "--iou", "0.3,0.5", "--save", "-q"]).exit_code == 0
    result = CliRunner().invoke(main, ["compare", str(a), str(b), "--threshold", "0.2", "--iou", "0.5"])
    assert result.exit_code == 0, result.output
    gt = load_ground_truth(a / "gt.pkl")
    maps = [evaluate(load_detections(run / "detections" / "thr_0.200.pkl"), gt, [0.5]).query(
        "`class` == 'mAP'")["ap"].iloc[0] for run in (a, b)]
    line = next(row for row in result.output.splitlines() if row.startswith("| mAP@0.5 (tau 0.2"))
    assert f"{100 * (maps[1] - maps[0]):+.2f} [" in line
    assert "Paired differences" in result.output and "P(B - A <= 0)" in result.output
    assert "CorLoc@0.5" in result.output and "MaxBoxAccV2" in result.output and "TorchRay" in result.output
    same = CliRunner().invoke(main, ["compare", str(a), str(a), "--threshold", "0.2", "--iou", "0.5"])
    rows = [row for row in same.output.splitlines() if row.startswith("| mAP@0.5 (tau 0.2")]
    assert rows and "+0.00 [+0.00, +0.00]" in rows[0] and rows[0].rstrip(" |").endswith("1.000")



def test_paired_differences_score_each_run_at_its_own_tau(tiny_run):
    """threshold_b: A at τ 0.1, B (the same run) at τ 0.2; the mAP row is labelled with both τ and its
    difference is the mAP at 0.2 minus the mAP at 0.1, computed independently with evaluate."""
    from gradloc.reports.compare import paired_differences
    from gradloc.run.folder import open_run
    from gradloc.scoring.voc import evaluate

    root, _ = tiny_run
    run = open_run(root / "results" / "tiny")
    table = paired_differences(run, run, 0.1, 0.5, "voc07", threshold_b=0.2)
    row = table[table["metric"] == "mAP@0.5 (tau 0.1 | 0.2, voc07)"].iloc[0]
    maps = [evaluate(run.detections_at(tau), run.gt, [0.5]).query("`class` == 'mAP'")["ap"].iloc[0]
            for tau in (0.1, 0.2)]
    assert maps[0] != maps[1]
    assert (row["a"], row["b"]) == pytest.approx(tuple(maps)) and row["diff"] == pytest.approx(maps[1] - maps[0])
    assert table["metric"].str.startswith("CorLoc@0.5 (tau 0.1 | 0.2)").any()

def test_score_ci_adds_bca_intervals_of_the_means(tiny_run):
    from gradloc.core.formats import load_detections, load_ground_truth
    from gradloc.scoring.bootstrap import corloc_interval, map_interval

    root, _ = tiny_run
    run_dir = root / "results" / "tiny"
    result = CliRunner().invoke(main, ["score", str(run_dir), "--iou", "0.5", "--ci", "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["rows"]
    cam = next(r for r in rows if r["class"] == "mAP" and r["source"] == "cam" and r["threshold"] == 0.2)
    expected = map_interval(load_detections(run_dir / "detections" / "thr_0.200.pkl"),
                            load_ground_truth(run_dir / "gt.pkl"), 0.5)
    assert (cam["ci_low"], cam["ci_high"], cam["ci_method"]) == (expected.low, expected.high, expected.method)
    assert all(r["ci_low"] is None for r in rows if r["class"] != "mAP")
    table = CliRunner().invoke(main, ["score", str(run_dir), "--iou", "0.5", "--ci"]).output
    corloc = corloc_interval(load_detections(run_dir / "detections" / "thr_0.200.pkl"),
                             load_ground_truth(run_dir / "gt.pkl"))
    line = next(row for row in table.splitlines() if row.startswith("| 0.2 ") and "| cam " in row)
    assert f"{100 * corloc.estimate:.2f} [{100 * corloc.low:.2f}, {100 * corloc.high:.2f}]" in line
    assert "| any   | center" in table and "bootstrap over images (1,000 resamples, seed 0" in table
    pickles = [str(run_dir / "gt.pkl"), str(run_dir / "detections" / "thr_0.200.pkl")]
    assert CliRunner().invoke(main, ["score", "--gt", *pickles, "--ci"]).exit_code == 2


@pytest.mark.slow
def test_printed_tables_and_info_end_with_one_newline(tiny_run):
    run_dir = str(tiny_run[0] / "results" / "tiny")
    for args in (["score", run_dir], ["score", run_dir, "-q", "--per-class", "0.2"],
                 ["score", run_dir, "--layout", "rows"], ["score", run_dir, "--format", "markdown"],
                 ["info", run_dir], ["compare", run_dir, run_dir]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0 and result.stdout.endswith("\n") and not result.stdout.endswith("\n\n"), args
# --- the program's exit: Ctrl-C at any moment is exit 130 with one line (issue 18 item 4) ----------------------

PROGRAM = """
import os, runpy, signal, sys, time
when = sys.argv[1]
sys.argv = ["gradloc", *sys.argv[2:]]
import gradloc.cli.app as app
import gradloc.run.boxes as boxes
if when == "after":  # the command has returned; Python is about to shut down
    invoke = app.GradlocGroup.invoke
    def late(self, ctx):
        result = invoke(self, ctx)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
        return result
    app.GradlocGroup.invoke = late
else:  # inside a __del__, where Python swallows the KeyboardInterrupt, while the boxes stage runs
    class Swallows:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    cut = boxes.cut_heat
    def swallowing(*args, **kwargs):
        Swallows()
        return cut(*args, **kwargs)
    boxes.cut_heat = swallowing
runpy.run_module("gradloc", run_name="__main__")
"""


def _program(when: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROGRAM, when, *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300, check=False,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_ctrl_c_after_the_command_finished_exits_130_with_one_line(tiny_run):
    root, _ = tiny_run
    done = _program("after", "info", str(root / "results" / "tiny"))
    assert done.returncode == 130, done.stderr
    assert done.stderr == "interrupted: the command had already finished (what it wrote is complete); exit status 130\n"
    assert "Headline" in done.stdout and "oracle" in done.stdout


def test_a_swallowed_ctrl_c_exits_130_with_one_line_and_no_traceback(tiny_run, tmp_path):
    root, _ = tiny_run
    run_dir = root / "results" / "tiny"
    config = json.loads((run_dir / "manifest.json").read_text())["config"]
    config["out"] = str(tmp_path)
    (tmp_path / "c.yaml").write_text(json.dumps(config))
    done = _program("inside", "run", "--config", str(tmp_path / "c.yaml"), "-q")
    assert done.returncode == 130, done.stderr
    assert done.stderr.startswith("interrupted: the run folder keeps") and done.stderr.count("\n") == 1, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def _with_selected_tau(run_dir: Path, copy: Path, tau: float, chosen_on: str) -> Path:
    """A copy of a run whose detections record a selected τ (as a config with boxes.selected_threshold makes)."""
    from gradloc.core.files import save_pickle
    from gradloc.core.formats import load_detections

    shutil.copytree(run_dir, copy)
    for path in (copy / "detections").glob("thr_*.pkl"):
        dets = load_detections(path)
        save_pickle(dataclasses.replace(dets, meta={**dets.meta, "selected_threshold": tau,
                                                    "selected_on": chosen_on}), path)
    return copy


@pytest.mark.slow
def test_score_and_info_lead_with_the_selected_tau_and_json_carries_the_headline(tiny_run, tmp_path):
    from gradloc.core.formats import load_detections, load_ground_truth
    from gradloc.scoring.voc import evaluate

    root, result = tiny_run
    # the config's selected tau (0.5) is not among --thresholds 0.1,0.2: the run has none, and says so
    assert "--thresholds leaves out the config's selected tau 0.5" in result.output
    plain = CliRunner().invoke(main, ["score", str(root / "results" / "tiny"), "--iou", "0.5"]).stdout
    assert plain.startswith("Headline: no selected tau") and "oracle: the best tau of the sweep on test" in plain
    run_dir = _with_selected_tau(root / "results" / "tiny", tmp_path / "selected", 0.2, "val")
    text = CliRunner().invoke(main, ["score", str(run_dir), "--iou", "0.3,0.5"]).stdout
    assert text.startswith("Headline at the selected tau = 0.2 (chosen on val, scored on test), in %:\n")
    assert "threshold = 0.2  <- the selected tau" in text
    document = json.loads(CliRunner().invoke(main, ["score", str(run_dir), "--iou", "0.5", "--format",
                                                    "json"]).stdout)
    assert (document["selected_threshold"], document["selected_on"], document["split"]) == (0.2, "val", "test")
    head = {(row["metric"], row["threshold"]): row for row in document["headline"]}
    dets, gt = load_detections(run_dir / "detections" / "thr_0.200.pkl"), load_ground_truth(run_dir / "gt.pkl")
    for metric, key in (("voc07", "mAP@0.5"), ("voc10", "AP10 mAP@0.5")):
        frame = evaluate(dets, gt, [0.5], metric)
        assert head[(key, 0.2)]["value"] == pytest.approx(frame.loc[frame["class"] == "mAP", "ap"].item())
    assert 0 <= head[("classification mAP", None)]["value"] <= 1
    assert any(row["note"].startswith("oracle") for row in document["headline"])
    info = CliRunner().invoke(main, ["info", str(run_dir)]).stdout
    assert "Headline at the selected tau = 0.2 (chosen on val, scored on test)" in info
    oracle = _with_selected_tau(root / "results" / "tiny", tmp_path / "oracle", 0.2, "test")
    text = CliRunner().invoke(main, ["score", str(oracle)]).stdout
    assert "chosen on test, the split scored here: an oracle choice, not a held-out result" in text.splitlines()[0]


@pytest.mark.slow
def test_quiet_keeps_all_of_stdout(tiny_run):
    run_dir = str(tiny_run[0] / "results" / "tiny")
    for args in (["score", run_dir], ["score", run_dir, "--format", "markdown"], ["info", run_dir]):
        loud, quiet = (CliRunner().invoke(main, [*args, *extra]) for extra in ([], ["-q"]))
        assert loud.exit_code == quiet.exit_code == 0 and quiet.stdout == loud.stdout, args
    text = CliRunner().invoke(main, ["score", run_dir, "-q"]).stdout
    assert "Localization (mean over classes" in text and "COCO-style AP" in text and "Headline" in text
