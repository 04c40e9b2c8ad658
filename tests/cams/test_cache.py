"""Tests of gradloc.cams.cache: the per-image heatmap files, their verification on read (content fingerprint,
record checks) through the cams stage, temporary-file litter, and the device check before any work."""

import hashlib
import logging
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from gradloc.cams.cache import CacheError, HeatmapCache, clean_tmp
from gradloc.cli import main
from gradloc.core.formats import load_detections
from gradloc.core.geometry import plan
from gradloc.datasets.demo import DEMO_CLASSES
from gradloc.models.build import resolve_device
from gradloc.run.boxes import run_boxes
from gradloc.run.cams import plan_cams
from tests.conftest import ROOT


def _entry(seed):
    rng = np.random.default_rng(seed)
    return rng.random((3, 7, 7)).astype(np.float32), rng.standard_normal(3).astype(np.float32)


def _source(content: bytes = b"image") -> dict:
    """The fingerprint of image bytes ``content`` (gradloc.datasets.voc.fingerprint)."""
    return {"size": len(content), "mtime_ns": 0, "blake2b": hashlib.blake2b(content, digest_size=16).hexdigest()}


def test_round_trip_and_hit_miss(tmp_path):
    cache = HeatmapCache(tmp_path, {"method": "gradcam", "layer": "layer4"})
    maps, scores = _entry(0)
    geometry = plan(500, 375, 224)
    assert not cache.has("a", _source())
    cache.put("a", maps, scores, geometry, "float32", _source())
    assert cache.has("a", _source()) and not cache.has("b", _source())
    entry = cache.get("a")
    np.testing.assert_array_equal(entry.maps, maps)
    np.testing.assert_array_equal(entry.scores, scores)
    assert entry.geometry == geometry
    assert cache.path("a", _source()).name == f"a.{_source()['blake2b']}.pkl"


def test_key_changes_invalidate(tmp_path):
    maps, scores = _entry(1)
    first = HeatmapCache(tmp_path, {"method": "gradcam", "layer": "layer4"})
    first.put("a", maps, scores, plan(10, 10, 8), "float16", _source())
    other = HeatmapCache(tmp_path, {"method": "gradcam", "layer": "layer3"})
    assert other.root != first.root
    assert not other.has("a", _source())
    assert HeatmapCache(tmp_path, {"layer": "layer4", "method": "gradcam"}).has("a", _source())


def test_float16_storage_is_close_and_same_bytes_for_same_work(tmp_path):
    maps, scores = _entry(2)
    for root in ("x", "y"):
        HeatmapCache(tmp_path / root, {"k": 1}).put("img", maps, scores, plan(20, 10, 16), "float16", _source())
    a = next((tmp_path / "x").rglob("img.*.pkl")).read_bytes()
    b = next((tmp_path / "y").rglob("img.*.pkl")).read_bytes()
    assert a == b
    np.testing.assert_allclose(HeatmapCache(tmp_path / "x", {"k": 1}).get("img", _source()).maps, maps, rtol=1e-3)


def test_entries_of_two_contents_under_one_id_live_side_by_side(tmp_path):
    """Issue 18 item 3, the mechanism: an entry is named by id and content, so a second dataset with the same
    ids never overwrites the first one's maps, and a reader is served the maps of the content it names."""
    first, second = _entry(5), _entry(6)
    writer = HeatmapCache(tmp_path, {"k": 5})
    writer.put("a", *first, plan(8, 8, 8), "float32", _source(b"A"))
    writer.put("a", *second, plan(8, 8, 8), "float32", _source(b"B"))
    reader = HeatmapCache(tmp_path, {"k": 5})
    reader.serve({"a": _source(b"A")})
    np.testing.assert_array_equal(reader.get("a").maps, first[0])
    np.testing.assert_array_equal(reader.get("a", _source(b"B")).maps, second[0])
    with pytest.raises(CacheError, match="no verified maps of image 'a'"):
        HeatmapCache(tmp_path, {"k": 5}).get("a")


def test_an_entry_copied_under_another_content_is_refused(tmp_path):
    """Every entry proves its content: a file renamed (or written by a confused writer) under the name of
    other image bytes is refused, not served."""
    cache = HeatmapCache(tmp_path, {"k": 6})
    maps, scores = _entry(7)
    cache.put("a", maps, scores, plan(8, 8, 8), "float32", _source(b"A"))
    shutil.copy(cache.path("a", _source(b"A")), cache.path("a", _source(b"B")))
    with pytest.raises(CacheError, match=r"holds the maps of other image bytes \(1 bytes, blake2b"):
        cache.get("a", _source(b"B"))


def test_interrupted_write_leaves_no_entry(tmp_path, monkeypatch):
    import gradloc.core.formats as detections

    cache = HeatmapCache(tmp_path, {"k": 2})
    maps, scores = _entry(3)
    cache.put("done", maps, scores, plan(8, 8, 8), "float32", _source())

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(detections.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        cache.put("half", maps, scores, plan(8, 8, 8), "float32", _source())
    monkeypatch.undo()
    assert cache.has("done", _source()) and not cache.has("half", _source())
    assert not [p for p in cache.root.rglob("*") if p.name.endswith(".tmp")]


def test_bad_image_id_and_foreign_file(tmp_path):
    cache = HeatmapCache(tmp_path, {"k": 3})
    for bad in ("../etc", ".hidden", "a/b", "x" * 200):
        with pytest.raises(ValueError, match="cannot be used as a file or folder name"):
            cache.has(bad, _source())
    with pytest.raises(ValueError, match="is not an image fingerprint"):
        cache.has("x", {"size": 1, "blake2b": "../../etc"})
    cache.path("x", _source()).parent.mkdir(parents=True)
    cache.path("x", _source()).write_bytes(pickle.dumps({"format": "other"}))
    with pytest.raises(ValueError, match=r"x\.[0-9a-f]{32}\.pkl: not a gradloc\.cam/3 heatmap cache file"):
        cache.get("x", _source())


# --- the verified cache, through the cams stage on a copy of the small demo dataset -------------------------


def computed(config, **kwargs):
    """run_cams; returns (cache, dataset, number of images it computed)."""
    counts = []
    cache, dataset = plan_cams(config, **kwargs).run(counts.append)
    return cache, dataset, sum(counts)


def map_stamps(cache):
    return {p.name: p.stat().st_mtime_ns for p in (cache.root / "maps").glob("*.pkl")}


def test_editing_one_image_recomputes_that_image_alone(demo_copy, cams_config):
    config = cams_config(demo_copy)
    cache, dataset, n = computed(config)
    assert n == len(dataset) == 12
    stamps = map_stamps(cache)
    edited = dataset.image_path(dataset.image_ids[4])
    pixels = np.asarray(Image.open(edited)).copy()
    pixels[: pixels.shape[0] // 2] = 255 - pixels[: pixels.shape[0] // 2]
    Image.fromarray(pixels).save(edited, quality=95)
    cache2, _, n = computed(config)
    assert (cache2.root, n) == (cache.root, 1)
    after = map_stamps(cache2)
    assert {name: after[name] for name in stamps} == stamps  # no entry was rewritten
    [added] = set(after) - set(stamps)  # the edited content got its own entry
    assert added.startswith(f"{dataset.image_ids[4]}.")
    assert cache2.get(dataset.image_ids[4]).source["size"] == edited.stat().st_size


def test_cache_follows_content_not_dataset_path(demo_copy, cams_config, tmp_path):
    cache, dataset, _ = computed(cams_config(demo_copy))
    moved = Path(shutil.copytree(demo_copy, tmp_path / "moved" / "VOCdevkit"))  # new path and mtimes
    cache2, _, n = computed(cams_config(moved))
    assert (cache2.root, n) == (cache.root, 0)


def _rewrite(path, change):
    record = pickle.loads(path.read_bytes())
    change(record)
    path.write_bytes(pickle.dumps(record, protocol=4))


def _other_image(path):
    path.write_bytes(next(path.parent.glob("000026.*.pkl")).read_bytes())


def _fewer_classes(record):
    record["maps"], record["classes"] = record["maps"][:2], record["classes"][:2]
    record["map_shape"], record["scores"] = list(record["maps"].shape), record["scores"][:2]


def _other_shape(record):
    record["maps"] = np.ones((4, 3, 3), record["maps"].dtype)
    record["map_shape"] = [4, 3, 3]


BAD_RECORDS = {
    "junk bytes": (lambda path: path.write_bytes(b"junk"), "unreadable pickle"),
    "another image's record": (_other_image, "holds the maps of image '000026', not '000025'"),
    "fewer classes": (lambda path: _rewrite(path, _fewer_classes), "made for classes"),
    "other map shape": (lambda path: _rewrite(path, _other_shape), "maps are 3x3, this cache's are"),
    "impossible geometry": (lambda path: _rewrite(path, lambda r: r["geometry"].update(pad_x=-5)),
                            "geometry"),
    "NaN maps": (lambda path: _rewrite(path, lambda r: r["maps"].fill(np.nan)), "NaN or infinite"),
    "random signed values": (lambda path: _rewrite(path, lambda r: r.update(
        maps=np.random.default_rng(0).standard_normal(r["maps"].shape).astype(np.float16))), "negative"),
}


@pytest.mark.parametrize("kind", BAD_RECORDS)
def test_bad_cache_file_is_recomputed_with_a_warning_or_named_in_an_error(kind, demo_copy, cams_config, caplog):
    config = cams_config(demo_copy, **{"data.on_error": "skip"})
    cache, dataset, _ = computed(config)
    assert dataset.image_ids[0] == "000025"
    path = cache.path("000025", cache.sources(["000025"])["000025"])
    good = cache.get("000025")
    damage, message = BAD_RECORDS[kind]
    damage(path)
    with pytest.raises(CacheError, match=rf"000025\.[0-9a-f]{{32}}\.pkl: .*{re.escape(message)}") as error:
        computed(cams_config(demo_copy))
    assert "\n" not in str(error.value)
    with caplog.at_level(logging.WARNING, logger="gradloc.cams.cache"):
        cache2, _, n = computed(config)
    assert n == 1
    assert any(path.name in r.getMessage() and message in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(cache2.get("000025").maps, good.maps, rtol=1e-3, atol=1e-5)


def test_edited_annotation_size_is_not_served_from_the_cache(demo_copy, cams_config):
    config = cams_config(demo_copy)
    cache, dataset, _ = computed(config)
    xml = dataset.annotation("000025").path
    text = xml.read_text()
    width = dataset.annotation("000025").width
    xml.write_text(text.replace(f"<width>{width}</width>", f"<width>{width + 7}</width>"))
    with pytest.raises(ValueError, match=rf"000025\.jpg: image is {width}x\d+ but 000025\.xml <size> says"):
        computed(config)


def test_killed_write_litter_is_cleaned_on_the_next_run(tmp_path):
    cache = HeatmapCache(tmp_path, {"k": 4})
    maps, scores = _entry(4)
    cache.put("a", maps, scores, plan(8, 8, 8), "float32", _source())
    script = ("import os, sys; from gradloc.core.files import atomic_write_bytes\n"
              "os.replace = lambda *a: os._exit(9)\n"
              "atomic_write_bytes(sys.argv[1], b'half')\n")
    target = cache.path("b", _source())
    result = subprocess.run([sys.executable, "-c", script, str(target)], env={**os.environ,
                            "PYTHONPATH": str(ROOT)}, check=False)
    assert result.returncode == 9
    litter = list((cache.root / "maps").glob(".*.tmp"))
    assert len(litter) == 1 and litter[0].name.startswith(f".{target.name}.")
    assert HeatmapCache(tmp_path, {"k": 4}).todo(SimpleNamespace(image_ids=[])) == []
    assert not list((cache.root / "maps").glob(".*.tmp"))
    assert cache.has("a", _source()) and not cache.has("b", _source())


def test_tmp_of_a_live_writer_is_kept_until_an_hour_old(tmp_path):
    live = tmp_path / f".x.pkl.{os.getpid()}.abc.tmp"
    old = tmp_path / f".y.pkl.{os.getpid()}.abd.tmp"
    nameless = tmp_path / ".z.pkl.abcdefgh.tmp"  # written before names carried the pid
    for path in (live, old, nameless):
        path.write_bytes(b"partial")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    assert clean_tmp(tmp_path) == [old]
    assert live.exists() and nameless.exists()


def test_all_zero_cached_map_gives_no_box_and_no_crash(demo_copy, cams_config):
    config = cams_config(demo_copy, **{"boxes.explain": "gt", "boxes.baselines": ()})
    cache, dataset, _ = computed(config)
    entry = cache.get("000025")
    cache.put("000025", np.zeros_like(entry.maps), entry.scores, entry.geometry, "float32", entry.source)
    run_dir = run_boxes(config, cache, dataset)
    dets = load_detections(next((run_dir / "detections").glob("thr_*.pkl")))
    assert 0 not in dets.image_index and 1 in dets.image_index  # 000025 is image 0


# --- the device is checked before any work -----------------------------------------------------------------


@pytest.mark.parametrize("device", ["bogus", "cuda", "cuda:7"])
def test_bad_device_is_one_line_error_before_the_model_loads(device, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(main, ["cams", "--model", "demo_cnn", "--checkpoint", str(tmp_path / "none.pt"),
                                       "--voc-root", str(tmp_path), "--device", device,
                                       "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --device '{device}' (cams.device)"), result.output
    assert "use --device cpu" in lines[0] or "use cpu" in lines[0]


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match=r"'gpu0' .* is not a torch device"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match="runs on cpu, cuda or mps, not meta"):
        resolve_device("meta")


def test_boxes_command_needs_valid_cached_maps_or_skips_with_on_error_skip(demo_copy, demo_checkpoint, tmp_path):
    (demo_copy / "VOCdemo" / "JPEGImages" / "000027.jpg").write_bytes(b"")
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  year: demo\n  split: val\n  classes: {list(DEMO_CLASSES)}\n"
                      "model:\n  name: demo_cnn\n  input_size: 64\n")
    common = ["--config", str(config), "--voc-root", str(demo_copy), "--checkpoint", str(demo_checkpoint),
              "--cache-dir", str(tmp_path / "cache"), "-q"]
    assert CliRunner().invoke(main, ["cams", *common, "--on-error", "skip"]).exit_code == 0
    run_folder = ["--out", str(tmp_path / "out"), "--name", "b"]  # boxes writes a run folder, cams does not
    refused = CliRunner().invoke(main, ["boxes", *common, *run_folder])
    assert refused.exit_code == 1 and "e.g. 000027) have no valid cached maps" in refused.output
    done = CliRunner().invoke(main, ["boxes", *common, *run_folder, "--on-error", "skip"])
    assert done.exit_code == 0, done.output
    dets = load_detections(next((tmp_path / "out" / "b" / "detections").glob("thr_*.pkl")))
    assert "000027" not in dets.image_ids and len(dets.image_ids) == 11


def test_shortside_cache_holds_one_map_size_per_input_canvas(tmp_path):
    cache = HeatmapCache(tmp_path, {"method": "gradcam", "input_size": 320, "resize_mode": "shortside"})
    wide, tall = plan(500, 375, 320, "shortside"), plan(375, 500, 320, "shortside")
    assert (wide.input_h, wide.input_w) != (tall.input_h, tall.input_w)
    scores = np.zeros(2, np.float32)
    cache.put("wide", np.ones((2, 10, 14), np.float32), scores, wide, "float32", _source())
    cache.put("tall", np.ones((2, 14, 10), np.float32), scores, tall, "float32", _source())
    assert cache.get("wide").maps.shape == (2, 10, 14) and cache.get("tall").maps.shape == (2, 14, 10)
    cache.put("wide2", np.ones((2, 3, 3), np.float32), scores, wide, "float32", _source())
    with pytest.raises(CacheError, match=r"wide2\.\w+\.pkl: maps are 3x3, this cache's are 10x14 for a 320x448 input"):
        cache.get("wide2")


@pytest.mark.parametrize("key", ['[1]', '{"score_kind": "logit"}', '{"score_kind": 3, "layer": "x"}'])
def test_a_finished_runs_cache_key_is_checked(key, tmp_path):
    root = tmp_path / "cams" / "k"
    root.mkdir(parents=True)
    (root / "key.json").write_text(key)
    with pytest.raises(ValueError, match=r"key\.json: (expected a mapping|not a heatmap cache key)"):
        HeatmapCache.open(root)
