"""Issue 18, "Safe by construction": every hostile case of the issue, as a user would meet it (mostly through the
CLI), on the small demo data. Each test names its item and case; the mechanisms are tested in their own modules
(tests/core/test_names.py, test_folders.py, test_interrupts.py, test_files.py, test_formats.py,
tests/cams/test_cache.py, tests/run/test_config.py, test_folder.py)."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from gradloc.cli import main
from gradloc.core import files as io_module
from gradloc.datasets.demo import DEMO_CLASSES
from tests.conftest import ROOT


def _config(folder: Path, voc_root: Path, checkpoint: Path, **changes) -> Path:
    """A run config on a demo VOCdevkit and the 3-epoch demo CNN (outputs and cache under ``folder``)."""
    config = {
        "name": "k", "out": str(folder / "results"), "cache_dir": str(folder / "cache"),
        "data": {"voc_root": str(voc_root), "year": "demo", "split": "val", "classes": list(DEMO_CLASSES)},
        "model": {"name": "demo_cnn", "checkpoint": str(checkpoint), "input_size": 64},
        "cams": {"batch_size": 4, "workers": 0},
        "boxes": {"thresholds": [0.2, 0.4], "explain": "gt"},
        "score": {"iou": [0.3, 0.5]},
    }
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[last] = value
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _cli(*args: str):
    return CliRunner().invoke(main, [*args])


def _one_error_line(result, *parts: str) -> str:
    """The output is one line ``error: ...`` holding every part; exit status 1."""
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def made(tmp_path_factory, demo_data, demo_checkpoint):
    """A finished run ``results/k`` of the demo config (with its cache), made once; tests copy it."""
    folder = tmp_path_factory.mktemp("hostile")
    config = _config(folder, demo_data, demo_checkpoint)
    result = _cli("run", "--config", str(config), "-q")
    assert result.exit_code == 0, result.output
    return folder


@pytest.fixture
def run_copy(made, tmp_path) -> Path:
    """A private copy of the finished run folder (its manifest still names the shared cache)."""
    return Path(shutil.copytree(made / "results" / "k", tmp_path / "results" / "k"))


# --- item 1: a run replaces only a folder gradloc made -----------------------------------------------------


def test_item1_run_refuses_to_replace_a_user_folder(tmp_path, demo_data, demo_checkpoint):
    project = tmp_path / "results" / "k"
    project.mkdir(parents=True)
    (project / "thesis.tex").write_text("three years of work")
    result = _cli("run", "--config", str(_config(tmp_path, demo_data, demo_checkpoint)), "-q")
    _one_error_line(result, str(project), "gradloc did not make")
    assert (project / "thesis.tex").read_text() == "three years of work"
    assert not (tmp_path / "cache").exists()  # refused before any work


def test_item1_run_into_the_datasets_images_is_refused(tmp_path, demo_copy, demo_checkpoint):
    images = demo_copy / "VOCdemo" / "JPEGImages"
    before = _files(images)
    config = _config(tmp_path, demo_copy, demo_checkpoint)
    result = _cli("run", "--config", str(config), "--out", str(demo_copy / "VOCdemo"), "--name", "JPEGImages")
    _one_error_line(result, "--out", "inside the dataset")
    assert _files(images) == before


@pytest.mark.parametrize(("own_cache", "message"), [(True, "inside the heatmap cache"),
                                                     (False, "gradloc did not make")])
def test_item1_run_into_a_caches_map_folder_is_refused(own_cache, message, made, tmp_path, demo_data,
                                                       demo_checkpoint):
    """Into the run's own cache (refused by place) or another cache (refused as a folder gradloc did not make
    as a run)."""
    [maps] = list((made / "cache" / "cams").glob("*/maps"))
    before = _files(maps)
    config = _config(tmp_path, demo_data, demo_checkpoint, **({"cache_dir": str(made / "cache")} if own_cache
                                                              else {}))
    result = _cli("run", "--config", str(config), "--out", str(maps.parent), "--name", "maps")
    _one_error_line(result, message)
    assert _files(maps) == before


@pytest.mark.parametrize(("flags", "message"), [
    (lambda root, data: ["--out", str(data / "VOCdemo" / "results")], "the run folder (--out/--name)"),
    (lambda root, data: ["--cache-dir", str(data / "cache")], "the heatmap cache (--cache-dir)"),
    (lambda root, data: ["--cache-dir", str(root / "results" / "k" / "cache")], "inside the run folder"),
    (lambda root, data: ["--out", str(root / "cache" / "runs")], "inside the heatmap cache"),
], ids=["out inside the dataset", "cache inside the dataset", "cache inside the run folder",
        "run folder inside the cache"])
def test_item1_outputs_inside_each_other_are_refused_before_any_work(flags, message, tmp_path, demo_copy,
                                                                     demo_checkpoint):
    before = _files(demo_copy)
    result = _cli("run", "--config", str(_config(tmp_path, demo_copy, demo_checkpoint)), *flags(tmp_path, demo_copy))
    _one_error_line(result, message)
    assert _files(demo_copy) == before
    assert not (tmp_path / "results").exists() and not (tmp_path / "cache").exists()


def test_item1_an_output_file_replaces_only_a_file_it_could_have_written(run_copy, demo_copy, made):
    """The same promise for single files: ``show --png`` or ``train --checkpoint-out`` onto an annotation is
    refused (train before any work), the XML is intact."""
    annotation = demo_copy / "VOCdemo" / "Annotations" / "000025.xml"
    before = annotation.read_bytes()
    result = _cli("show", str(run_copy), "--threshold", "0.2", "--png", str(annotation))
    _one_error_line(result, str(annotation), "not a PNG image")
    result = _cli("train", "--config", str(made / "config.yaml"), "--checkpoint-out", str(annotation))
    _one_error_line(result, str(annotation), "not a torch checkpoint")
    assert annotation.read_bytes() == before


# --- item 2: staging names are reserved -------------------------------------------------------------------


@pytest.mark.parametrize("name", [".vr.ready", ".vr.old", ".vr.new", ".hidden"])
def test_item2_run_names_starting_with_a_dot_are_refused(name, tmp_path, demo_data, demo_checkpoint):
    result = _cli("run", "--config", str(_config(tmp_path, demo_data, demo_checkpoint)), "--name", name)
    _one_error_line(result, "--name", "starts with '.'")
    assert not (tmp_path / "results").exists()


def test_item2_a_read_only_score_never_swaps_in_a_foreign_staging_name(run_copy):
    """A folder someone put at ``.k.ready`` beside run ``k`` is neither rolled forward nor deleted by a reader."""
    foreign = run_copy.parent / ".k.ready"
    shutil.copytree(run_copy, foreign)
    (foreign / ".gradloc-run").unlink()
    (foreign / "mine.txt").write_text("keep")
    before = _files(run_copy)
    result = _cli("score", str(run_copy), "-q")
    _one_error_line(result, str(foreign), "gradloc did not make")
    assert _files(run_copy) == before and (foreign / "mine.txt").read_text() == "keep"


# --- item 3: another dataset's maps are never served ----------------------------------------------------


def _mirrored(demo_data: Path, folder: Path) -> Path:
    """A copy of the demo dataset with the same ids and annotations but every image mirrored left-right."""
    copy = Path(shutil.copytree(demo_data, folder / "VOCdevkit"))
    for path in (copy / "VOCdemo" / "JPEGImages").glob("*.jpg"):
        Image.open(path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(path, quality=95)
    return copy


def test_item3_a_run_is_scored_on_its_own_maps_while_another_dataset_fills_the_cache(
        tmp_path, demo_data, demo_checkpoint, monkeypatch):
    """Run A shares its cache with run B on a mirrored copy (same ids); B runs between A's cams and boxes
    stages. A's scores equal those of A alone."""
    from gradloc.run import pipeline
    from gradloc.run.folder import open_run

    (tmp_path / "alone").mkdir()
    alone = _config(tmp_path / "alone", demo_data, demo_checkpoint)
    assert _cli("run", "--config", str(alone), "-q").exit_code == 0
    mirror = _mirrored(demo_data, tmp_path / "mirror")
    config_b = _config(tmp_path / "mirror", mirror, demo_checkpoint, cache_dir=str(tmp_path / "shared"), name="b")
    config_a = _config(tmp_path, demo_data, demo_checkpoint, cache_dir=str(tmp_path / "shared"), name="a")
    real_boxes = pipeline.run_boxes

    def b_runs_meanwhile(*args, **kwargs):
        monkeypatch.setattr(pipeline, "run_boxes", real_boxes)
        assert _cli("run", "--config", str(config_b), "-q").exit_code == 0
        return real_boxes(*args, **kwargs)

    monkeypatch.setattr(pipeline, "run_boxes", b_runs_meanwhile)
    assert _cli("run", "--config", str(config_a), "-q").exit_code == 0
    a_scores = open_run(tmp_path / "results" / "a").scores
    b_scores = open_run(tmp_path / "mirror" / "results" / "b").scores
    alone_scores = open_run(tmp_path / "alone" / "results" / "k").scores
    assert a_scores["ap"].tolist() == alone_scores["ap"].tolist()
    assert a_scores["ap"].tolist() != b_scores["ap"].tolist()  # B's maps really differ


def test_item3_show_of_a_run_draws_its_own_heatmaps_after_another_dataset_ran(tmp_path, demo_data,
                                                                              demo_checkpoint):
    from gradloc.reports.show import run_samples

    config_a = _config(tmp_path, demo_data, demo_checkpoint, cache_dir=str(tmp_path / "shared"), name="a")
    assert _cli("run", "--config", str(config_a), "-q").exit_code == 0
    before = run_samples(tmp_path / "results" / "a", 0.2, n=4, sample="gt")
    mirror = _mirrored(demo_data, tmp_path / "mirror")
    config_b = _config(tmp_path / "mirror", mirror, demo_checkpoint, cache_dir=str(tmp_path / "shared"), name="b")
    assert _cli("run", "--config", str(config_b), "-q").exit_code == 0
    after = run_samples(tmp_path / "results" / "a", 0.2, n=4, sample="gt")
    heat = [[panel.heat for panel in item.panels] for item in before.samples]
    assert heat and all(item for item in heat)
    for old, new in zip(heat, [[panel.heat for panel in item.panels] for item in after.samples], strict=True):
        for a, b in zip(old, new, strict=True):
            np.testing.assert_array_equal(a, b)


def test_item3_show_refuses_an_image_edited_since_the_run(run_copy, demo_copy, made):
    """The run records the bytes of every image it used; show draws nothing of another content."""
    manifest = json.loads((run_copy / "manifest.json").read_text())
    manifest["config"]["data"]["voc_root"] = str(demo_copy)
    manifest.pop("paths")
    (run_copy / "manifest.json").write_text(json.dumps(manifest))
    for path in (demo_copy / "VOCdemo" / "JPEGImages").glob("*.jpg"):
        Image.open(path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(path, quality=95)
    result = _cli("show", str(run_copy), "--threshold", "0.2", "--png", str(run_copy.parent / "s.png"))
    _one_error_line(result, "the image changed since run")
    assert not (run_copy.parent / "s.png").exists()


# --- item 4: Ctrl-C is never lost -------------------------------------------------------------------------


class _SwallowsCtrlC:
    """Delivers a SIGINT where Python swallows the KeyboardInterrupt: inside ``__del__`` (as DataLoader workers
    start and stop in fork hooks and ``__del__``)."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs here; its KeyboardInterrupt is "ignored in __del__"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_item4_a_swallowed_ctrl_c_still_exits_130_and_replaces_nothing(run_copy, made, monkeypatch):
    from gradloc.run import boxes as stage

    before = _files(run_copy)
    real = stage.cut_heat

    def swallowed(*args, **kwargs):
        _SwallowsCtrlC()  # dropped at once: __del__ runs here
        return real(*args, **kwargs)

    monkeypatch.setattr(stage, "cut_heat", swallowed)
    config = json.loads((run_copy / "manifest.json").read_text())["config"]
    path = run_copy.parent / "c.yaml"
    path.write_text(yaml.safe_dump({**config, "out": str(run_copy.parent)}))
    result = _cli("run", "--config", str(path), "--thresholds", "0.7")
    assert result.exit_code == 130, result.output
    assert result.output.strip().splitlines()[-1].startswith("interrupted:")
    assert _files(run_copy) == before
    assert sorted(p.name for p in run_copy.parent.iterdir()) == ["c.yaml", "k"]


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # the process ended meanwhile
        return b""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc to see the worker processes")
@pytest.mark.parametrize("delay", [0.0, 0.02, 0.1])
def test_item4_ctrl_c_while_dataloader_workers_start_exits_130_and_replaces_nothing(delay, made, tmp_path):
    """A real SIGINT to the process group (what Ctrl-C sends) just as the first DataLoader worker appears."""
    config = yaml.safe_load((made / "config.yaml").read_text())
    config.update(out=str(tmp_path / "results"), cache_dir=str(tmp_path / "cache"))
    config["cams"]["workers"] = 2
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    shutil.copytree(made / "results" / "k", tmp_path / "results" / "k")
    before = _files(tmp_path / "results" / "k")
    command = [sys.executable, "-m", "gradloc", "run", "--config", str(path), "-q"]
    process = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    own = Path(f"/proc/{process.pid}/cmdline").read_bytes()
    deadline = time.time() + 120
    while process.poll() is None and time.time() < deadline:  # a worker: a fork with the parent's command line
        if any(_cmdline(child) == own for child in _children(process.pid)):
            break
        time.sleep(0.001)
    time.sleep(delay)
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert err.strip().startswith("interrupted:") and len(err.strip().splitlines()) == 1, err
    assert _files(tmp_path / "results" / "k") == before
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["k"]


# --- item 5: multi-file updates are staged and swapped whole ---------------------------------------------


def test_item5_score_save_stopped_by_a_full_disk_leaves_the_old_files_and_manifest(run_copy, monkeypatch):
    import errno

    before = _files(run_copy)
    calls = []
    real_fsync = io_module.os.fsync

    def full_disk(fd):  # the lock, the marker, scores.csv, scores.json, then scores.md fails
        calls.append(fd)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(io_module.os, "fsync", full_disk)
    result = _cli("score", str(run_copy), "--iou", "0.5", "--save", "-q")
    monkeypatch.undo()
    _one_error_line(result, "No space left on device", "scores.md")
    assert _files(run_copy) == before
    assert sorted(p.name for p in run_copy.parent.iterdir()) == ["k"]


def test_item5_score_save_replaces_the_four_files_and_the_manifest_together(run_copy):
    result = _cli("score", str(run_copy), "--iou", "0.5", "--save", "-q")
    assert result.exit_code == 0, result.output
    manifest = json.loads((run_copy / "manifest.json").read_text())
    assert manifest["rescored_scores"]["score"]["iou"] == [0.5]
    assert sorted(set(pd_read(run_copy / "scores.csv")["iou"])) == [0.5]
    assert json.loads((run_copy / "scores.json").read_text())["rows"][0]["iou"] == 0.5


def pd_read(path: Path):
    import pandas as pd

    return pd.read_csv(path)


def test_item5_an_export_folder_holds_one_export(run_copy, tmp_path):
    out = tmp_path / "exported"
    assert _cli("export", str(run_copy), str(out), "--threshold", "0.2", "-q").exit_code == 0
    assert (out / "baselines" / "shuffled").is_dir()
    shutil.rmtree(run_copy / "baselines" / "shuffled")  # a run without the shuffled baseline
    assert _cli("export", str(run_copy), str(out), "--threshold", "0.2", "-q").exit_code == 0
    assert not (out / "baselines" / "shuffled").exists()  # the earlier export's files are gone, not mixed in
    scored = _cli("score", "--gt", str(run_copy / "gt.pkl"), "--voc-results", str(out), "--format", "json")
    assert scored.exit_code == 0, scored.output
    sources = {row["source"] for row in json.loads(scored.output)["rows"]}
    assert "shuffled" not in sources and {"cam", "center", "full"} <= sources


def test_item5_export_refuses_a_folder_that_is_not_an_export(run_copy, tmp_path):
    out = tmp_path / "papers"
    out.mkdir()
    (out / "draft.txt").write_text("keep")
    result = _cli("export", str(run_copy), str(out), "--threshold", "0.2")
    _one_error_line(result, str(out), "gradloc did not make")
    assert _files(out) == {"draft.txt": b"keep"}


# --- item 6: types are checked, and the wrong file is named ----------------------------------------------


def _gt_dict(**changes) -> dict:
    gt = {"format": "gradloc.gt/1", "classes": ["cat", "dog"], "image_ids": ["a", "b"],
          "image_sizes": np.array([[10, 10], [10, 10]]), "image_index": np.array([0, 1]),
          "labels": np.array([0, 1]), "boxes": np.array([[1.0, 1, 5, 5], [2, 2, 6, 6]]),
          "difficult": np.array([False, False])}
    return {**gt, **changes}


def _dets_dict(**changes) -> dict:
    dets = {"format": "gradloc.detections/1", "threshold": 0.2, "threshold_mode": "max", "box_mode": "largest",
            "classes": ["cat", "dog"], "image_ids": ["a", "b"], "image_index": np.array([0, 1]),
            "labels": np.array([0, 1]), "scores": np.array([0.9, 0.8]),
            "boxes": np.array([[1.0, 1, 5, 5], [2, 2, 6, 6]]), "meta": {}}
    return {**dets, **changes}


def _score_pickles(tmp_path: Path, gt: dict, dets: dict):
    (tmp_path / "gt.pkl").write_bytes(pickle.dumps(gt))
    (tmp_path / "dets.pkl").write_bytes(pickle.dumps(dets))
    return _cli("score", "--gt", str(tmp_path / "gt.pkl"), str(tmp_path / "dets.pkl"))


@pytest.mark.parametrize(("gt", "dets", "file", "message"), [
    (_gt_dict(difficult=np.array(["0", "0"])), _dets_dict(), "gt.pkl", "field 'difficult' holds <U1 values"),
    (_gt_dict(difficult=["0", "1"]), _dets_dict(), "gt.pkl", "field 'difficult'"),
    (_gt_dict(difficult=np.array([0, 2])), _dets_dict(), "gt.pkl", "field 'difficult' holds 2"),
    (_gt_dict(labels=np.array([0.0, 0.7])), _dets_dict(), "gt.pkl", "field 'labels' holds 0.7"),
    (_gt_dict(), _dets_dict(image_index=np.array([0.0, 1.5])), "dets.pkl", "field 'image_index' holds 1.5"),
    (_gt_dict(boxes=np.array([[5.0, 1, 1, 5], [2, 2, 6, 6]])), _dets_dict(), "gt.pkl", "x2 < x1"),
    (_gt_dict(), _dets_dict(boxes=np.array([[1.0, 1, 5, 5], [2, 9, 6, 6]])), "dets.pkl", "y2 < y1"),
    (_gt_dict(image_sizes=np.array([["10", "10"], ["10", "10"]])), _dets_dict(), "gt.pkl", "image_sizes"),
], ids=["difficult as str array", "difficult as list of str", "difficult 2", "float labels",
        "float image index", "inverted GT box", "inverted detection box", "sizes as str"])
def test_item6_wrong_types_and_values_name_the_file_that_holds_them(gt, dets, file, message, tmp_path):
    line = _one_error_line(_score_pickles(tmp_path, gt, dets), message)
    assert line.startswith(f"error: {tmp_path / file}: "), line


def test_item6_integral_floats_and_0_1_flags_are_read_exactly(tmp_path):
    gt = _gt_dict(labels=np.array([0.0, 1.0]), difficult=np.array([0, 1]))
    (tmp_path / "gt.pkl").write_bytes(pickle.dumps(gt))
    (tmp_path / "dets.pkl").write_bytes(pickle.dumps(_dets_dict()))
    result = _cli("score", "--gt", str(tmp_path / "gt.pkl"), str(tmp_path / "dets.pkl"), "--format", "json")
    assert result.exit_code == 0, result.output
    rows = {(row["iou"], row["class"]): row for row in json.loads(result.output)["rows"]}
    assert (rows[(0.5, "cat")]["n_gt"], rows[(0.5, "dog")]["n_gt"]) == (1, 0)  # dog's only box is difficult


# --- item 7: names that become paths ------------------------------------------------------------------------


def test_item7_a_class_name_with_a_path_cannot_escape_the_export_folder(run_copy, tmp_path):
    from gradloc.core.files import safe_load_pickle, save_pickle

    evil = "x/../../../../ESCAPED"
    for path in [run_copy / "gt.pkl", *run_copy.rglob("thr_*.pkl"), *(run_copy / "baselines").glob("*.pkl")]:
        data = safe_load_pickle(path)
        data["classes"] = [evil, *data["classes"][1:]]
        save_pickle(data, path)
    out = tmp_path / "deep" / "a" / "b" / "exported"
    result = _cli("export", str(run_copy), str(out), "--threshold", "0.2")
    _one_error_line(result, "class name", "path separator")
    assert not list(tmp_path.rglob("*ESCAPED*")) and not list(Path("/").glob("ESCAPED*"))
    assert not out.exists()


def test_item7_an_image_id_with_a_path_is_refused_where_it_is_read(tmp_path, demo_copy, demo_checkpoint):
    split = demo_copy / "VOCdemo" / "ImageSets" / "Main" / "val.txt"
    split.write_text("../../../../etc/passwd\n" + split.read_text())
    result = _cli("cams", "--config", str(_config(tmp_path, demo_copy, demo_checkpoint)))
    _one_error_line(result, str(split), "line 1", "path separator")


# --- items 8 to 10: bounded loads of untrusted input ----------------------------------------------------------

ALIAS_BOMB = """a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
name: *h
"""


def test_item8_yaml_alias_bomb_is_refused_at_once_in_one_short_line(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    start = time.perf_counter()
    result = _cli("run", "--config", str(path))
    assert time.perf_counter() - start < 5
    line = _one_error_line(result, "bomb.yaml", "alias")
    assert len(line) < 300


def test_item8_a_huge_bad_value_is_quoted_as_a_short_excerpt(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text("seed: [" + ", ".join(["123456789"] * 50_000) + "]\n")
    line = _one_error_line(_cli("run", "--config", str(path)), "config key 'seed'")
    assert len(line) < 300


def _nested_list_bomb(depth: int = 28) -> list:
    leaf: list = [0.0, 0.0, 0.0, 0.0]
    for _ in range(depth):
        leaf = [leaf, leaf]
    return leaf


def test_item9_pickle_bomb_is_refused_at_once(tmp_path):
    bomb = _dets_dict(boxes=_nested_list_bomb())
    (tmp_path / "bomb.pkl").write_bytes(pickle.dumps(bomb, protocol=4))
    (tmp_path / "gt.pkl").write_bytes(pickle.dumps(_gt_dict()))
    assert (tmp_path / "bomb.pkl").stat().st_size < 2000
    start = time.perf_counter()
    result = _cli("score", "--gt", str(tmp_path / "gt.pkl"), str(tmp_path / "bomb.pkl"))
    assert time.perf_counter() - start < 5
    _one_error_line(result, "bomb.pkl", "pickle bomb")


@pytest.mark.parametrize("size", ["30000", "2049", "0"])
def test_item10_input_size_is_bounded_by_a_one_line_error_naming_the_flag(size, tmp_path, demo_data,
                                                                         demo_checkpoint):
    result = _cli("run", "--config", str(_config(tmp_path, demo_data, demo_checkpoint)), "--input-size", size)
    _one_error_line(result, "--input-size", "model.input_size")
    assert not (tmp_path / "cache").exists()


# --- item 11: damaged run folders give one line ---------------------------------------------------------------


@pytest.mark.parametrize("damage", [
    lambda m: [m],
    lambda m: {**m, "paths": [1, 2]},
    lambda m: {**m, "config": {**m["config"], "data": ["VOC"]}},
    lambda m: {**m, "seconds_per_stage": ["fast"]},
    lambda m: {**m, "skipped": "none"},
], ids=["manifest is a list", "paths is a list", "config.data is a list", "seconds are a list",
        "skipped is a string"])
@pytest.mark.parametrize("command", ["info", "show"])
def test_item11_a_manifest_of_the_wrong_shape_is_one_line(damage, command, run_copy):
    manifest = json.loads((run_copy / "manifest.json").read_text())
    (run_copy / "manifest.json").write_text(json.dumps(damage(manifest)))
    args = [str(run_copy)] + (["--threshold", "0.2", "--png", str(run_copy.parent / "s.png")] if command == "show"
                              else [])
    _one_error_line(_cli(command, *args), "manifest.json")


def test_item11_a_header_only_scores_csv_is_one_line(run_copy):
    scores = run_copy / "scores.csv"
    scores.write_text(scores.read_text().splitlines()[0] + "\n")
    _one_error_line(_cli("info", str(run_copy)), "scores.csv", "no rows")


@pytest.mark.parametrize("command", ["run", "score"])
def test_item11_a_lock_with_an_absurd_pid_is_taken_over(command, run_copy, made):
    lock = run_copy.parent / ".k.lock"
    lock.write_text(json.dumps({"pid": 99999999999999999999, "host": socket.gethostname()}))
    if command == "score":
        result = _cli("score", str(run_copy), "--save", "-q")
    else:
        config = yaml.safe_load((made / "config.yaml").read_text())
        path = run_copy.parent / "c.yaml"
        path.write_text(yaml.safe_dump({**config, "out": str(run_copy.parent)}))
        result = _cli("run", "--config", str(path), "-q")
    assert result.exit_code == 0, result.output
    assert not lock.exists()


# --- item 12: validated before any work ----------------------------------------------------------------------


def test_item12_duplicate_ious_are_refused_before_any_file_is_read(run_copy, tmp_path, demo_data, demo_checkpoint):
    line = _one_error_line(_cli("score", str(run_copy), "--iou", "0.3,0.3"), "--iou", "0.3 and 0.3")
    assert "thr_" not in line
    result = _cli("run", "--config", str(_config(tmp_path, demo_data, demo_checkpoint)), "--iou", "0.3,0.3")
    _one_error_line(result, "--iou")
    assert not (tmp_path / "cache").exists()


def test_item12_minus_zero_is_zero(made, run_copy):
    line = _one_error_line(_cli("score", str(run_copy), "--per-class", "-0"), "no threshold 0")
    assert "-0" not in line
    config = yaml.safe_load((made / "config.yaml").read_text())
    path = run_copy.parent / "c.yaml"
    path.write_text(yaml.safe_dump({**config, "out": str(run_copy.parent)}))
    result = _cli("run", "--config", str(path), "--thresholds", "-0,0.2")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (run_copy / "detections").iterdir()) == ["thr_0.000.pkl", "thr_0.200.pkl"]
    assert "threshold = 0\n" in result.output and "-0" not in result.output


@pytest.mark.parametrize(("thresholds", "message"), [
    ("-0,0", "0 and 0 are the same threshold (0.000)"),
    ("0.2,0.2000000001", "0.2 and 0.2000000001 are the same threshold (0.200)"),
    ("0.2,0.2001", "0.2001 has more than 3 decimals"),
    ("0.2,0.2", "are the same threshold"),
])
def test_item12_thresholds_equal_at_file_name_precision_are_refused_before_any_work(thresholds, message, tmp_path,
                                                                                     demo_data, demo_checkpoint):
    result = _cli("run", "--config", str(_config(tmp_path, demo_data, demo_checkpoint)), "--thresholds", thresholds)
    _one_error_line(result, "--thresholds", message)
    assert not (tmp_path / "cache").exists()


def test_item12_negative_seed_names_the_flag_before_any_work(tmp_path, demo_data, demo_checkpoint):
    result = _cli("run", "--config", str(_config(tmp_path, demo_data, demo_checkpoint)), "--seed", "-5")
    _one_error_line(result, "--seed", "-5")
    assert not (tmp_path / "cache").exists()


# --- item 13: clear errors --------------------------------------------------------------------------------------


def test_item13_a_byte_order_mark_in_an_image_set_is_dropped(demo_copy):
    from gradloc.datasets.voc import VOCDataset

    split = demo_copy / "VOCdemo" / "ImageSets" / "Main" / "val.txt"
    split.write_bytes(b"\xef\xbb\xbf" + split.read_bytes())
    dataset = VOCDataset(demo_copy, year="demo", split="val", classes=DEMO_CLASSES)
    assert dataset.image_ids[0] == "000025"


def test_item13_an_invisible_character_in_an_id_names_the_line(demo_copy):
    from gradloc.datasets.voc import DatasetError, VOCDataset

    split = demo_copy / "VOCdemo" / "ImageSets" / "Main" / "val.txt"
    split.write_text("000025\n0000\u200b26\n")
    with pytest.raises(DatasetError, match=r"val\.txt: line 2: image id .* invisible or control character U\+200B"):
        VOCDataset(demo_copy, year="demo", split="val", classes=DEMO_CLASSES)


def test_item13_a_too_long_name_is_blamed_on_name(tmp_path, demo_data, demo_checkpoint):
    result = _cli("run", "--config", str(_config(tmp_path, demo_data, demo_checkpoint)), "--name", "n" * 250)
    line = _one_error_line(result, "--name", "250 bytes long")
    assert "--out" not in line and len(line) < 300


def test_item13_a_deleted_working_directory_is_one_line(tmp_path, made):
    gone = tmp_path / "gone"
    gone.mkdir()
    script = ("import os, runpy, sys; os.chdir(sys.argv[1]); os.rmdir(sys.argv[1]); "
              "sys.argv = ['gradloc', *sys.argv[2:]]; runpy.run_module('gradloc', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", script, str(gone), "run", "--config", str(made / "config.yaml")],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            timeout=120, check=False)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == ("error: the working directory no longer exists (deleted or unmounted); cd to "
                                     "an existing folder and rerun")


def _quoted_commands() -> list[tuple[str, str, str]]:
    """Every `gradloc <command> ...` quoted in the package's messages, docstrings and help, and in the README:
    (where, command, quoted text)."""
    found = []
    sources = [*sorted((ROOT / "gradloc").rglob("*.py")), ROOT / "README.md"]
    for path in sources:
        text = path.read_text()
        for match in re.finditer(r"`gradloc ([a-z]+)([^`]*)`", text.replace('"\n', "").replace('" "', "")):
            found.append((path.name, match.group(1), match.group(0)))
    return found


def test_item13_every_hint_names_a_command_and_options_that_exist():
    commands = {name: command for name, command in main.commands.items()}
    bad = []
    for where, name, quoted in _quoted_commands():
        if name not in commands:
            bad.append((where, quoted, "no such command"))
            continue
        accepted = {opt for param in commands[name].params for opt in (*param.opts, *param.secondary_opts)}
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", quoted):
            if flag not in accepted and flag not in ("--help",):
                bad.append((where, quoted, flag))
    assert len(_quoted_commands()) > 30
    assert bad == []


def test_item13_pngs_get_the_umask_mode(run_copy, tmp_path):
    """Like any file the user creates: 0644 under the usual umask 022, not mkstemp's 0600."""
    result = _cli("show", str(run_copy), "--threshold", "0.2", "--n", "2", "--png", str(tmp_path / "s.png"), "-q")
    assert result.exit_code == 0, result.output
    overlays = _cli("show", str(run_copy), "--threshold", "0.2", "--n", "1", "--per-image", str(tmp_path / "o"), "-q")
    assert overlays.exit_code == 0, overlays.output
    umask = io_module._umask()
    for path in [tmp_path / "s.png", *(tmp_path / "o").glob("*.png")]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    if umask == 0o022:
        assert stat.S_IMODE((tmp_path / "s.png").stat().st_mode) == 0o644
