"""gradloc.run.folder: one run per folder (staged and swapped in whole), the lock, crash repair, and the defects of
issue 9 (stale thresholds, reruns, late validation, interruptions) reproduced on the small demo data."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from gradloc.cli import main
from gradloc.core import files as io_module
from gradloc.core.folders import LockedError, marker_name
from gradloc.core.formats import Detections, GroundTruth
from gradloc.run import folder as runs
from gradloc.run.folder import Run, new_run, open_run
from tests.conftest import ROOT


def _gt() -> GroundTruth:
    return GroundTruth(classes=["cat"], image_ids=["a"], image_sizes=np.array([[10, 10]], dtype=np.int64),
                       image_index=np.array([0], dtype=np.int64), labels=np.array([0], dtype=np.int64),
                       boxes=np.array([[1.0, 1, 5, 5]]), difficult=np.array([False]))


def _dets(tau: float, method: str = "gradcam") -> Detections:
    return Detections(threshold=tau, threshold_mode="max", box_mode="largest", classes=["cat"], image_ids=["a"],
                      image_index=np.array([0], dtype=np.int64), labels=np.array([0], dtype=np.int64),
                      scores=np.array([0.9]), boxes=np.array([[1.0, 1, 5, 5]]), meta={"method": method})


def _write(target: Path, taus, method: str = "gradcam") -> None:
    with new_run(target) as writer:
        writer.write_gt(_gt())
        for tau in taus:
            writer.write_detections(_dets(tau, method))


def _siblings(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name != target.name)


# --- one run per folder -----------------------------------------------------------------------------------


def test_second_run_replaces_the_whole_folder(tmp_path):
    target = tmp_path / "k"
    _write(target, [0.1, 0.2])
    _write(target, [0.3], method="gradcampp")
    run = open_run(target)
    assert run.thresholds == [0.3]
    assert run.detections_at(0.3).meta["method"] == "gradcampp"
    assert _siblings(target) == []  # no .k.new / .k.ready / .k.old / .k.lock left


def test_failed_run_keeps_previous_results(tmp_path):
    target = tmp_path / "k"
    _write(target, [0.1])
    before = (target / "detections" / "thr_0.100.pkl").read_bytes()
    with pytest.raises(ValueError, match="boom"), new_run(target) as writer:
        writer.write_gt(_gt())
        writer.write_detections(_dets(0.5))
        raise ValueError("boom")
    assert open_run(target).thresholds == [0.1]
    assert (target / "detections" / "thr_0.100.pkl").read_bytes() == before
    assert _siblings(target) == []


def test_full_disk_during_a_write_keeps_previous_results(tmp_path, monkeypatch):
    """ENOSPC (simulated in the fsync of the third file of the run; the lock file and the run's marker are
    the first writes) keeps the previous run; the error names the file."""
    target = tmp_path / "k"
    _write(target, [0.1])
    calls = []

    def full_disk(fd):
        calls.append(fd)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io_module.os, "fsync", full_disk)
    with pytest.raises(OSError, match=r"No space left on device: .*thr_0\.300\.pkl"):
        _write(target, [0.2, 0.3])
    monkeypatch.undo()
    assert open_run(target).thresholds == [0.1]
    assert _siblings(target) == []


def test_threshold_listing_and_missing_threshold(tmp_path):
    target = tmp_path / "k"
    _write(target, [0.2, 0.06, 0.1])
    (target / "detections" / "thr_junk.pkl").write_bytes(b"")
    (target / "detections" / "notes.txt").write_text("x")
    run = open_run(target)
    assert run.thresholds == [0.06, 0.1, 0.2]
    with pytest.raises(FileNotFoundError, match=r"no detections at threshold 0\.3; this run has thresholds "
                                                r"0\.060, 0\.100, 0\.200"):
        run.detections_at(0.3)


# --- crash windows of the swap ----------------------------------------------------------------------------


def _folder(path: Path, tau: float) -> None:
    """A run folder left by a crash: its marker and one detections file."""
    (path / "detections").mkdir(parents=True)
    (path / marker_name("run")).write_text("{}")
    (path / "detections" / runs.threshold_filename(tau)).write_bytes(b"x")


def test_crash_after_old_moved_aside_rolls_forward(tmp_path):
    target = tmp_path / "k"
    _folder(tmp_path / ".k.old", 0.1)
    _folder(tmp_path / ".k.ready", 0.2)  # the new run was complete
    assert open_run(target).thresholds == [0.2]
    assert _siblings(target) == []


def test_crash_before_new_moved_in_restores_previous(tmp_path):
    target = tmp_path / "k"
    _folder(tmp_path / ".k.old", 0.1)
    _folder(tmp_path / ".k.new", 0.2)  # incomplete: never renamed to .ready
    assert open_run(target).thresholds == [0.1]
    assert _siblings(target) == []


def test_crash_before_old_deleted_cleans_up(tmp_path):
    target = tmp_path / "k"
    _folder(target, 0.2)
    _folder(tmp_path / ".k.old", 0.1)
    assert open_run(target).thresholds == [0.2]
    assert _siblings(target) == []


def test_reader_does_not_repair_while_a_writer_holds_the_lock(tmp_path):
    target = tmp_path / "k"
    _folder(tmp_path / ".k.ready", 0.2)
    (tmp_path / ".k.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    with pytest.raises(FileNotFoundError, match="run folder not found"):
        open_run(target)
    assert (tmp_path / ".k.ready").is_dir()


# --- the lock -----------------------------------------------------------------------------------------------


@pytest.fixture
def live_pid():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process.pid
    process.kill()
    process.wait()


@pytest.fixture
def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _lock(tmp_path: Path, pid: int, host: str | None = None) -> Path:
    lock = tmp_path / ".k.lock"
    lock.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname()}))
    return lock


def test_second_concurrent_run_refuses(tmp_path, live_pid):
    target = tmp_path / "k"
    _write(target, [0.1])
    _lock(tmp_path, live_pid)
    with pytest.raises(LockedError, match=rf"another gradloc run is writing this folder \(pid {live_pid} on "
                                             rf"host {socket.gethostname()}, lock file .*\.k\.lock\)"):
        _write(target, [0.2])
    assert open_run(target).thresholds == [0.1]
    assert (tmp_path / ".k.lock").is_file()  # the holder's lock is not ours to remove


def test_lock_of_another_host_is_not_taken_over(tmp_path, dead_pid):
    _lock(tmp_path, dead_pid, host="some-other-host")
    with pytest.raises(LockedError, match="some-other-host"):
        _write(tmp_path / "k", [0.2])


def test_stale_lock_of_dead_process_is_taken_over(tmp_path, dead_pid, caplog):
    target = tmp_path / "k"
    _lock(tmp_path, dead_pid)
    with caplog.at_level(logging.WARNING, logger="gradloc.run.folder"):
        _write(target, [0.2])
    assert f"taking over the lock of pid {dead_pid}" in caplog.text
    assert open_run(target).thresholds == [0.2]
    assert _siblings(target) == []


def test_cli_refuses_locked_folder_in_one_line_before_any_work(tmp_path, live_pid):
    _lock(tmp_path, live_pid)
    result = CliRunner().invoke(main, ["run", "--config", str(ROOT / "configs" / "demo.yaml"), "--name", "k",
                                       "--out", str(tmp_path), "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "another gradloc run" in lines[0]
    assert not (tmp_path / "cache").exists()  # no demo generated, no model trained


def test_unwritable_out_is_found_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = CliRunner().invoke(main, ["run", "--config", str(ROOT / "configs" / "demo.yaml"),
                                       "--out", str(blocker / "results"), "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "output folder is not writable" in lines[0] and "--out" in lines[0]
    assert not (tmp_path / "cache").exists()


# --- one definition of each valid range -------------------------------------------------------------------


@pytest.mark.parametrize("iou", [0.0, 1e-9, 0.5, 1 - 1e-9, 1.0, 1.5, float("nan")])
def test_config_and_scorer_accept_the_same_ious(iou):
    from gradloc.run.config import ConfigError, load_config
    from gradloc.scoring.voc import evaluate

    try:
        load_config(None, {"score.iou": (iou,)})
        config_ok = True
    except ConfigError:
        config_ok = False
    try:
        evaluate(_dets(0.1), _gt(), iou_thresholds=(iou,))
        scorer_ok = True
    except ValueError:
        scorer_ok = False
    assert config_ok == scorer_ok


# --- the defects of issue 9 on the demo data --------------------------------------------------------------


def _write_config(folder: Path, demo_data: Path, demo_checkpoint: Path) -> Path:
    """A run config on the small demo data and the 3-epoch demo CNN (no demo preparation: fast)."""
    from gradloc.datasets.demo import DEMO_CLASSES

    config = {
        "name": "k", "out": str(folder / "results"), "cache_dir": str(folder / "cache"),
        "data": {"voc_root": str(demo_data), "year": "demo", "split": "val", "classes": list(DEMO_CLASSES)},
        "model": {"name": "demo_cnn", "checkpoint": str(demo_checkpoint), "input_size": 64},
        "cams": {"batch_size": 4},
        "boxes": {"thresholds": [0.2, 0.4], "explain": "gt"},
        "score": {"iou": [0.3, 0.5]},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def demo_config(tmp_path, demo_data, demo_checkpoint) -> Path:
    return _write_config(tmp_path, demo_data, demo_checkpoint)


def _run(config: Path, *args: str):
    return CliRunner().invoke(main, ["run", "--config", str(config), "--quiet", *args])


@pytest.mark.slow
def test_stale_thresholds_of_an_earlier_run_are_gone(demo_config, tmp_path):
    """Issue 9 item 1: the second run printed τ 0.1, 0.2, 0.3 under 'CAM: gradcam'."""
    first = _run(demo_config, "--thresholds", "0.1,0.2", "--method", "gradcam")
    assert first.exit_code == 0, first.output
    second = _run(demo_config, "--thresholds", "0.3", "--method", "gradcampp")
    assert second.exit_code == 0, second.output
    run = open_run(tmp_path / "results" / "k")
    assert run.thresholds == [0.3]
    assert set(run.scores["threshold"]) == {0.3}
    assert run.detections_at(0.3).meta["method"] == "gradcampp"
    assert run.manifest["config"]["cams"]["method"] == "gradcampp"
    assert "threshold = 0.1" not in second.output and "threshold = 0.3" in second.output


@pytest.mark.slow
def test_limit_rerun_of_the_same_name_works(demo_config, tmp_path):
    """Issue 9 item 1: a --limit 5 rerun failed with 'different image_ids (10 vs 5 entries)'."""
    assert _run(demo_config).exit_code == 0
    result = _run(demo_config, "--limit", "5")
    assert result.exit_code == 0, result.output
    run = open_run(tmp_path / "results" / "k")
    assert len(run.gt.image_ids) == 5
    assert all(run.detections_at(tau).image_ids == run.gt.image_ids for tau in run.thresholds)


def test_iou_1_is_refused_before_any_work(demo_config, tmp_path):
    """Issue 9 item 5: --iou 1 passed config validation and failed in the scorer after CAMs and boxes."""
    result = _run(demo_config, "--iou", "0.5,1")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "config key score.iou[1]: 1 is outside (0, 1)" in lines[0]
    assert not (tmp_path / "results").exists() and not (tmp_path / "cache").exists()


def _demo_copy(demo_data: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "demo_copy"
    shutil.copytree(demo_data, copy)
    return copy


def _with_root(config: Path, root: Path) -> None:
    data = yaml.safe_load(config.read_text())
    data["data"]["voc_root"] = str(root)
    config.write_text(yaml.safe_dump(data))


def _assert_nothing_written(result, tmp_path: Path, message: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "results" / "k").exists()
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == []


@pytest.mark.slow
def test_empty_split_is_an_error_and_writes_nothing(demo_config, demo_data, tmp_path):
    """Issue 9 item 5: an empty split exited 0 with a folder of NaN scores."""
    root = _demo_copy(demo_data, tmp_path)
    (root / "VOCdemo" / "ImageSets" / "Main" / "empty.txt").write_text("")
    _with_root(demo_config, root)
    _assert_nothing_written(_run(demo_config, "--split", "empty"), tmp_path, "no images to evaluate")


@pytest.mark.slow
def test_every_item_skipped_is_an_error_and_writes_nothing(demo_config, demo_data, tmp_path):
    root = _demo_copy(demo_data, tmp_path)
    ids = (root / "VOCdemo" / "ImageSets" / "Main" / "val.txt").read_text().split()
    for image_id in ids:
        (root / "VOCdemo" / "Annotations" / f"{image_id}.xml").write_text("<annotation>")
    _with_root(demo_config, root)
    result = _run(demo_config, "--on-error", "skip")
    _assert_nothing_written(result, tmp_path, f"all {len(ids)} item(s) were skipped")


@pytest.mark.slow
def test_failed_boxes_stage_leaves_no_orphan_gt_and_keeps_previous_run(demo_config, tmp_path, monkeypatch):
    """Issue 9 item 5: a failed boxes stage left an orphan gt.pkl (and, on a rerun, a mixed folder)."""
    from gradloc.run import boxes as pipeline

    def broken(*args, **kwargs):
        raise ValueError("broken box cutter")

    result = (monkeypatch.setattr(pipeline, "cut_heat", broken), _run(demo_config))[1]
    _assert_nothing_written(result, tmp_path, "broken box cutter")
    monkeypatch.undo()
    assert _run(demo_config).exit_code == 0
    before = {p: p.read_bytes() for p in (tmp_path / "results" / "k").rglob("*.pkl")}
    monkeypatch.setattr(pipeline, "cut_heat", broken)
    assert _run(demo_config, "--thresholds", "0.7").exit_code == 1
    assert {p: p.read_bytes() for p in (tmp_path / "results" / "k").rglob("*.pkl")} == before
    assert _siblings(tmp_path / "results" / "k") == []


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_says_how_to_resume(demo_config, tmp_path, monkeypatch):
    from gradloc.run import boxes as pipeline

    assert _run(demo_config).exit_code == 0
    before = {p: p.read_bytes() for p in (tmp_path / "results" / "k").rglob("*") if p.is_file()}

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "cut_heat", interrupt)
    result = CliRunner().invoke(main, ["run", "--config", str(demo_config), "--thresholds", "0.7"])
    assert result.exit_code == 130
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("interrupted:") and "rerun the same command to resume" in last
    assert "finished heatmaps stay cached" in last
    assert {p: p.read_bytes() for p in (tmp_path / "results" / "k").rglob("*") if p.is_file()} == before
    assert _siblings(tmp_path / "results" / "k") == []


@pytest.mark.slow
def test_full_disk_in_a_real_run_keeps_previous_results(demo_config, tmp_path, monkeypatch):
    assert _run(demo_config).exit_code == 0
    before = {p: p.read_bytes() for p in (tmp_path / "results" / "k").rglob("*") if p.is_file()}
    calls = []
    real_fsync = os.fsync

    def full_disk(fd):
        calls.append(fd)
        if len(calls) == 3:  # maps are cached: the third write is a detections file of the new run
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(io_module.os, "fsync", full_disk)
    result = _run(demo_config, "--thresholds", "0.7")
    monkeypatch.undo()
    assert result.exit_code == 1 and "No space left on device" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in (tmp_path / "results" / "k").rglob("*") if p.is_file()} == before
    assert _siblings(tmp_path / "results" / "k") == []


# --- SIGKILL in each stage, then a rerun: same bytes as an uninterrupted run ------------------------------

# Runs `python -m gradloc` in a subprocess that SIGKILLs itself at the (n+1)-th call of one stage's function.
KILLER = """
import os, runpy, signal, sys
stage, n = sys.argv[1], int(sys.argv[2])
sys.argv = ["gradloc", *sys.argv[3:]]
import gradloc.cams.cache, gradloc.run.boxes, gradloc.run.folder, gradloc.run.score
calls = []
def kill_after(function):
    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) > n:
            os.kill(os.getpid(), signal.SIGKILL)
        return function(*args, **kwargs)
    return wrapper
if stage == "cams":
    gradloc.cams.cache.HeatmapCache.put = kill_after(gradloc.cams.cache.HeatmapCache.put)
elif stage == "boxes":
    gradloc.run.boxes.cut_heat = kill_after(gradloc.run.boxes.cut_heat)
elif stage == "scores":
    gradloc.run.score.score_detections = kill_after(gradloc.run.score.score_detections)
elif stage == "swap":
    gradloc.run.folder.os.rename = kill_after(gradloc.run.folder.os.rename)
runpy.run_module("gradloc", run_name="__main__", alter_sys=True)
"""


def _cli(config: Path, out: Path, cache: Path, stage: str | None = None, n: int = 0):
    args = ["run", "--config", str(config), "--out", str(out), "--cache-dir", str(cache), "--quiet"]
    command = [sys.executable, "-c", KILLER, stage, str(n), *args] if stage else [sys.executable, "-m", "gradloc",
                                                                                 *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)


def _result_bytes(run_dir: Path) -> dict[str, bytes]:
    names = [p for p in run_dir.rglob("*") if p.is_file() and (p.suffix == ".pkl" or p.name.startswith(
        ("scores.", "localization.")))]
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in names}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, demo_data, demo_checkpoint) -> tuple[Path, dict[str, bytes]]:
    """The config of the SIGKILL tests and the result files of an uninterrupted run (its own cache)."""
    folder = tmp_path_factory.mktemp("sigkill")
    config = _write_config(folder, demo_data, demo_checkpoint)
    done = _cli(config, folder / "ref_out", folder / "ref_cache")
    assert done.returncode == 0, done.stderr
    return config, _result_bytes(folder / "ref_out" / "k")


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "n"), [("cams", 5), ("boxes", 7), ("scores", 3), ("swap", 1)])
def test_sigkill_in_each_stage_then_rerun_gives_identical_results(tmp_path, reference_run, stage, n):
    """Killed after n calls of the stage's function (cams: cache writes, mid-batch; boxes: images; scores:
    detections files scored; swap: the rename that moves the finished run in), then rerun with the same
    command: the stale lock is taken over and the files are byte-identical to an uninterrupted run's."""
    config, reference = reference_run
    out, cache = tmp_path / "out", tmp_path / "cache"
    killed = _cli(config, out, cache, stage, n)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    rerun = _cli(config, out, cache)
    assert rerun.returncode == 0, rerun.stderr
    assert "taking over the lock" in rerun.stderr
    got = _result_bytes(out / "k")
    assert sorted(got) == sorted(reference)
    assert {name for name in got if got[name] != reference[name]} == set()
    assert _siblings(out / "k") == []


def test_manifest_paths_resolve_beside_the_run_else_absolute(tmp_path):
    from gradloc.run.folder import manifest_record

    (tmp_path / "a" / "cache").mkdir(parents=True)
    (tmp_path / "a" / "results").mkdir()
    config = {"cache_dir": str(tmp_path / "a" / "cache"), "data": {"voc_root": "/nowhere/VOCdevkit"},
              "model": {"checkpoint": None}}
    stored = manifest_record(tmp_path / "a" / "results" / "r", config, config, "h", "k",
                             str(tmp_path / "a" / "cache" / "cams" / "k"), {})
    assert stored["paths"]["config.cache_dir"] == {"relative_to_run": "../../cache",
                                                  "absolute": str(tmp_path / "a" / "cache")}
    assert "config.model.checkpoint" not in stored["paths"]
    run = tmp_path / "b" / "results" / "r"
    run.mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps(stored))
    # no cache beside the copy: the absolute path, which exists
    assert Run(run).manifest["config"]["cache_dir"] == str(tmp_path / "a" / "cache")
    (tmp_path / "b" / "cache").mkdir()
    # a cache beside the copy wins; a path that exists nowhere is named beside the run
    resolved = Run(run).manifest
    assert resolved["config"]["cache_dir"] == str(tmp_path / "b" / "cache")
    assert resolved["config"]["data"]["voc_root"] == "/nowhere/VOCdevkit"
    assert Run(run).stored_manifest["config"]["cache_dir"] == str(tmp_path / "a" / "cache")


# --- owned run folders and checked reads (issue 18) ------------------------------------------------------------


def test_a_run_folder_carries_its_marker_and_a_legacy_run_is_adopted(tmp_path):
    target = tmp_path / "k"
    _write(target, [0.1])
    assert (target / ".gradloc-run").is_file()
    legacy = tmp_path / "old"
    (legacy / "detections").mkdir(parents=True)
    (legacy / "manifest.json").write_text(json.dumps({"config": {}, "config_hash": "abc"}))
    assert runs.is_legacy_run(legacy)
    _write(legacy, [0.2])  # a run made before markers is replaced like any run
    assert open_run(legacy).thresholds == [0.2] and _siblings(legacy) == ["k"]


def test_a_folder_with_a_foreign_manifest_is_not_a_run(tmp_path):
    web = tmp_path / "site"
    web.mkdir()
    (web / "manifest.json").write_text(json.dumps({"name": "my web app", "icons": []}))
    with pytest.raises(FileExistsError, match="gradloc did not make"):
        _write(web, [0.1])
    assert json.loads((web / "manifest.json").read_text())["name"] == "my web app"


def test_update_run_replaces_some_files_and_keeps_the_others(tmp_path):
    target = tmp_path / "k"
    with new_run(target) as writer:
        writer.write_gt(_gt())
        writer.write_detections(_dets(0.1))
        writer.write_manifest({"config": {}, "config_hash": "h"})
    gt_before = (target / "gt.pkl").read_bytes()
    with runs.update_run(target) as writer:
        assert writer.set_manifest("rescored_scores", {"score": {"iou": [0.5]}})
    assert (target / "gt.pkl").read_bytes() == gt_before
    assert open_run(target).stored_manifest["rescored_scores"] == {"score": {"iou": [0.5]}}
    with pytest.raises(FileNotFoundError, match="no run folder to update"), runs.update_run(tmp_path / "none"):
        pass


@pytest.mark.parametrize(("manifest", "message"), [
    ([1, 2], "holds a list, expected a mapping"),
    ({"config": []}, "has no 'config' mapping"),
    ({"config": {}, "paths": [1]}, "field 'paths' is [1], expected a mapping"),
    ({"config": {"model": "resnet"}}, "field 'config.model' is 'resnet', expected a mapping"),
    ({"config": {"data": {"voc_root": 5}}}, "field 'config.data.voc_root' is 5, expected str or null"),
    ({"config": {}, "seconds_per_stage": {"cams": "slow"}}, "field 'seconds_per_stage' holds 'slow'"),
    ({"config": {}, "skipped": ["000005"]}, "field 'skipped' holds '000005'"),
    ({"config": {}, "cache_dir": {"a": 1}}, "field 'cache_dir' is {'a': 1}, expected str or null"),
])
def test_a_manifest_is_checked_against_its_schema(manifest, message, tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=re.escape(message)):
        _ = Run(tmp_path).manifest


@pytest.mark.parametrize(("text", "message"), [
    ("threshold,threshold_mode,iou,metric,class,ap,recall,n_gt,source\n", "has a header but no rows"),
    ("threshold,threshold_mode,iou,metric,class,ap,recall,n_gt,source\nhigh,max,0.5,voc07,mAP,0.1,0.2,3,cam\n",
     "column 'threshold' holds 'high', not a number"),
    ("a,b\n1,2\n", "missing column(s) threshold"),
])
def test_a_score_table_is_checked(text, message, tmp_path):
    (tmp_path / "scores.csv").write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)):
        _ = Run(tmp_path).scores


def test_points_and_gt_known_records_are_checked(tmp_path):
    target = tmp_path / "k"
    common = {"classes": ["cat"], "image_ids": ["a"], "image_index": np.array([0]), "labels": np.array([0])}
    with new_run(target) as writer:
        writer.write_points({**common, "scores": np.array([0.5]), "points": np.array([[1.0, 2.0]])})
        writer.write_gt_known({**common, "points": np.array([[1.0, 2.0]]), "hits": np.zeros((1, 100, 3), bool),
                               "grid": np.linspace(0, 0.99, 100), "ious": np.array([0.3, 0.5, 0.7])})
    run = open_run(target)
    assert run.points["labels"].tolist() == [0] and run.gt_known["hits"].shape == (1, 100, 3)
    io_module.save_pickle({"format": runs.POINTS_FORMAT, **common, "labels": np.array([3]),
                           "scores": np.array([0.5]), "points": np.array([[1.0, 2.0]])}, target / "points.pkl")
    with pytest.raises(ValueError, match=r"points\.pkl: field 'labels' has 1 values in \[3, 3\], expected 1 in"):
        _ = open_run(target).points
    io_module.save_pickle({"format": runs.GT_KNOWN_FORMAT, **common, "points": np.array([[1.0, 2.0]]),
                           "hits": np.zeros((1, 100, 3)), "grid": np.zeros(100), "ious": np.zeros(3)},
                          target / "gt_known.pkl")
    with pytest.raises(ValueError, match=r"gt_known\.pkl: field 'hits' is float64\[1, 100, 3\], expected bool"):
        _ = open_run(target).gt_known
    # the wsolevaluation-exact hits are optional (runs without OpenCV have none) but checked when present
    known = {"format": runs.GT_KNOWN_FORMAT, **common, "points": np.array([[1.0, 2.0]]),
             "hits": np.zeros((1, 100, 3), bool), "grid": np.zeros(100), "ious": np.zeros(3)}
    io_module.save_pickle(known, target / "gt_known.pkl")
    assert "hits_exact" not in open_run(target).gt_known
    io_module.save_pickle({**known, "hits_exact": np.zeros((1, 50, 3), bool), "grid_exact": np.zeros(50)},
                          target / "gt_known.pkl")
    assert open_run(target).gt_known["hits_exact"].shape == (1, 50, 3)
    io_module.save_pickle({**known, "hits_exact": np.zeros((1, 50, 3), bool), "grid_exact": np.zeros(100)},
                          target / "gt_known.pkl")
    with pytest.raises(ValueError, match=r"field 'hits_exact' is bool\[1, 50, 3\], expected bool\[1, 100, 3\]"):
        _ = open_run(target).gt_known
    io_module.save_pickle({**known, "hits_exact": np.zeros((1, 50, 3), bool)}, target / "gt_known.pkl")
    with pytest.raises(ValueError, match="without its 'grid_exact'"):
        _ = open_run(target).gt_known


def test_images_json_is_written_and_checked(tmp_path):
    target = tmp_path / "k"
    with new_run(target) as writer:
        writer.write_images({"a": {"size": 3, "blake2b": "0" * 32, "mtime_ns": 5}})
    assert open_run(target).images == {"a": {"size": 3, "blake2b": "0" * 32}}
    (target / "images.json").write_text(json.dumps({"format": "gradloc.images/1", "images": {"a": [1]}}))
    with pytest.raises(ValueError, match=r"images\.json: not a gradloc\.images/1 file"):
        _ = open_run(target).images
