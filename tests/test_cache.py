import numpy as np
import pytest

from gradloc.cache import HeatmapCache
from gradloc.geometry import plan


def _entry(seed):
    rng = np.random.default_rng(seed)
    return rng.random((3, 7, 7)).astype(np.float32), rng.standard_normal(3).astype(np.float32)


def test_round_trip_and_hit_miss(tmp_path):
    cache = HeatmapCache(tmp_path, {"method": "gradcam", "layer": "layer4"})
    maps, scores = _entry(0)
    geometry = plan(500, 375, 224)
    assert cache.missing(["a", "b"]) == ["a", "b"]
    cache.put("a", maps, scores, geometry, "float32")
    assert cache.missing(["a", "b"]) == ["b"]
    entry = cache.get("a")
    np.testing.assert_array_equal(entry.maps, maps)
    np.testing.assert_array_equal(entry.scores, scores)
    assert entry.geometry == geometry


def test_key_changes_invalidate(tmp_path):
    maps, scores = _entry(1)
    first = HeatmapCache(tmp_path, {"method": "gradcam", "layer": "layer4"})
    first.put("a", maps, scores, plan(10, 10, 8), "float16")
    other = HeatmapCache(tmp_path, {"method": "gradcam", "layer": "layer3"})
    assert other.root != first.root
    assert other.missing(["a"]) == ["a"]
    assert HeatmapCache(tmp_path, {"layer": "layer4", "method": "gradcam"}).missing(["a"]) == []


def test_float16_storage_is_close_and_same_bytes_for_same_work(tmp_path):
    maps, scores = _entry(2)
    for root in ("x", "y"):
        HeatmapCache(tmp_path / root, {"k": 1}).put("img", maps, scores, plan(20, 10, 16), "float16")
    a = next((tmp_path / "x").rglob("img.pkl")).read_bytes()
    b = next((tmp_path / "y").rglob("img.pkl")).read_bytes()
    assert a == b
    np.testing.assert_allclose(HeatmapCache(tmp_path / "x", {"k": 1}).get("img").maps, maps, rtol=1e-3)


def test_interrupted_write_leaves_no_entry(tmp_path, monkeypatch):
    import gradloc.detections as detections

    cache = HeatmapCache(tmp_path, {"k": 2})
    maps, scores = _entry(3)
    cache.put("done", maps, scores, plan(8, 8, 8), "float32")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(detections.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        cache.put("half", maps, scores, plan(8, 8, 8), "float32")
    monkeypatch.undo()
    assert cache.missing(["done", "half"]) == ["half"]
    assert not [p for p in cache.root.rglob("*") if p.name.endswith(".tmp")]


def test_bad_image_id_and_foreign_file(tmp_path):
    cache = HeatmapCache(tmp_path, {"k": 3})
    with pytest.raises(ValueError, match="cannot be used"):
        cache.has("../etc")
    (cache.root / "maps").mkdir(parents=True)
    import pickle

    (cache.root / "maps" / "x.pkl").write_bytes(pickle.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a gradloc heatmap cache file"):
        cache.get("x")
