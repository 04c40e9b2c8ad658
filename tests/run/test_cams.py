"""Tests of gradloc.run.cams: how the stage runs the network (memory format, --amp) and its place in the cache
key, the maps it gives on real VOC photographs against float32 NCHW, and the pooled features it caches."""

from __future__ import annotations

import dataclasses
import logging
import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from gradloc.cams.hooks import ModuleInput
from gradloc.models import execution as ex
from gradloc.run.boxes import run_protocol
from gradloc.run.cams import execution_of, plan_cams
from gradloc.run.config import load_config
from gradloc.run.setup import load_classifier
from gradloc.scoring.tables import protocol_line

# Documented tolerances (README "Speed"). Normalized maps: each map divided by its maximum.
# channels_last against NCHW, float32: largest difference of a normalized map 1e-3 (measured 4.2e-5 on 32
# VOC07 val images, EfficientNet-Lite0 at a 320-px short side, all 20 classes), of a score 1e-4 (measured 7.6e-6).
CHANNELS_LAST_MAP_TOL = 1e-3
CHANNELS_LAST_SCORE_TOL = 1e-4
# --amp (bfloat16 up to the target layer) against float32, on the maps of the classes present in the image:
# every map correlates >= 0.9 with the float32 map (measured minimum 0.947 on 64 images) and the median of their
# largest normalized differences is <= 0.1 (measured 0.032); every class probability within 0.05 (measured
# 0.011). Maps of absent classes are mostly cancellation noise and move more (README: the --amp measurement).
AMP_MIN_CORRELATION = 0.9
AMP_MEDIAN_MAP_TOL = 0.1
AMP_PROBABILITY_TOL = 0.05


def with_cams(config, **changes):
    return dataclasses.replace(config, cams=dataclasses.replace(config.cams, **changes))


@pytest.fixture
def simulate_bfloat16(monkeypatch):
    """``simulate_bfloat16(flag)``: this CPU has (or lacks) native bfloat16, as torch reports it."""
    ex._note_float32.cache_clear()

    def simulate(flag: bool) -> None:
        for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
            monkeypatch.setattr(torch.cpu, name, lambda: flag, raising=False)

    yield simulate
    ex._note_float32.cache_clear()


def test_amp_and_memory_format_are_in_the_cache_key(demo_data, cams_config, simulate_bfloat16):
    simulate_bfloat16(True)
    config = cams_config(demo_data)
    default = plan_cams(config)
    amp = plan_cams(with_cams(config, amp=True))
    nchw = plan_cams(with_cams(config, channels_last=False))
    assert default.cache.key_data["memory_format"] == "channels_last"  # the demo family's registry fact
    assert "precision" not in default.cache.key_data
    assert amp.cache.key_data["precision"] == "bfloat16" and amp.execution.precision == "bfloat16"
    assert "memory_format" not in nchw.cache.key_data
    assert len({default.cache.root, amp.cache.root, nchw.cache.root}) == 3
    assert len({default.features.root, amp.features.root, nchw.features.root}) == 3


def test_amp_on_a_cpu_without_bfloat16_is_the_float32_run(demo_data, cams_config, simulate_bfloat16, caplog):
    simulate_bfloat16(False)
    config = cams_config(demo_data)
    with caplog.at_level(logging.WARNING, logger="gradloc.models.execution"):
        amp = plan_cams(with_cams(config, amp=True))
    assert amp.execution.precision == "float32"
    assert amp.cache.root == plan_cams(config).cache.root
    assert [r.getMessage() for r in caplog.records] == [
        "--amp: this CPU has no native bfloat16 arithmetic (AVX512-BF16 or AMX); running float32"]


def test_amp_on_an_unsupported_device_is_one_line(demo_data, cams_config, monkeypatch):
    monkeypatch.setattr("gradloc.run.cams.resolve_device", lambda name: torch.device("mps"))
    with pytest.raises(ValueError, match=r"^--amp \(cams.amp\) autocasts on cpu or cuda, not on mps; drop --amp$"):
        plan_cams(with_cams(cams_config(demo_data), amp=True))


def test_cams_stage_caches_the_classifier_input(demo_data, cams_config):
    config = with_cams(cams_config(demo_data), batch_size=5, workers=0)
    plan = plan_cams(config)
    cache, dataset = plan.run()
    loaded = load_classifier(config)
    execution = execution_of(config, loaded)
    model = execution.model(loaded.model)
    batch = dataset.image_ids[5:10]  # the second planned batch
    inputs, _ = loaded.preprocessing.batch([dataset.load_image(i) for i in batch], channels_last=True)
    with ModuleInput(model.fc) as record, torch.no_grad():
        model(execution.inputs(inputs))
    expected = record.take().numpy()
    for row, image_id in enumerate(batch):
        stored = pickle.loads((plan.features.root / f"{image_id}.pkl").read_bytes())
        assert stored["batch"] == batch and stored["source"] == cache.get(image_id).source
        np.testing.assert_array_equal(stored["features"], expected[row])


# --- real photographs ---------------------------------------------------------------------------------------------


def _maps(config):
    """(maps: [C, h, w] per image, scores float32[n, C], dataset); map sizes differ between images."""
    cache, dataset = plan_cams(config).run()
    entries = [cache.get(image_id) for image_id in dataset.image_ids]
    return [e.maps for e in entries], np.stack([e.scores for e in entries]), dataset


@pytest.fixture(scope="module")
def real_runs(voc_root, tmp_path_factory):
    """EfficientNet-Lite0 (real ImageNet weights, imagenet head: no training needed) at a 320-px short side, as
    the recommended config runs it, on the first 32 VOC07 val images: maps and scores of float32 NCHW,
    float32 channels_last and (on a CPU with native bfloat16) --amp."""
    config = load_config(None, {
        "data.voc_root": str(voc_root), "data.split": "val", "data.limit": 32, "model.name": "efficientnet_lite0",
        "model.head": "imagenet", "model.input_size": 320, "model.resize_mode": "shortside", "cams.workers": 0,
        "cache_dir": str(tmp_path_factory.mktemp("real_cams")), "out": str(tmp_path_factory.mktemp("out"))})
    runs = {"nchw": _maps(with_cams(config, channels_last=False)), "channels_last": _maps(config)}
    if ex.cpu_has_bfloat16():
        runs["amp"] = _maps(with_cams(config, amp=True))
    return runs


def _normalized(maps: np.ndarray) -> np.ndarray:
    """Each map [..., h, w] divided by its maximum (all-zero maps stay 0)."""
    peaks = maps.max(axis=(-2, -1), keepdims=True)
    return np.divide(maps, peaks, out=np.zeros_like(maps), where=peaks > 0)


@pytest.mark.slow
def test_channels_last_maps_equal_nchw_maps_within_tolerance(real_runs):
    (nchw, nchw_scores, _), (fast, fast_scores, _) = real_runs["nchw"], real_runs["channels_last"]
    assert any(not np.array_equal(a, b) for a, b in zip(nchw, fast, strict=True))  # other bits: a cache-key entry
    worst = max(np.abs(_normalized(a) - _normalized(b)).max() for a, b in zip(nchw, fast, strict=True))
    assert worst <= CHANNELS_LAST_MAP_TOL
    assert np.abs(nchw_scores - fast_scores).max() <= CHANNELS_LAST_SCORE_TOL


@pytest.mark.slow
def test_amp_maps_are_close_to_float32_maps(real_runs):
    if "amp" not in real_runs:
        pytest.skip("this CPU has no native bfloat16: --amp runs float32")
    (reference, ref_scores, dataset), (amp, amp_scores, _) = real_runs["channels_last"], real_runs["amp"]
    pairs = [(_normalized(a[c]), _normalized(b[c])) for a, b, present in
             zip(reference, amp, dataset.image_labels() == 1, strict=True) for c in np.flatnonzero(present)]
    assert len(pairs) >= 30
    correlation = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in pairs]
    assert min(correlation) >= AMP_MIN_CORRELATION
    assert np.median([np.abs(a - b).max() for a, b in pairs]) <= AMP_MEDIAN_MAP_TOL
    assert any(not np.array_equal(a, b) for a, b in pairs)
    assert np.abs(np.exp(ref_scores) - np.exp(amp_scores)).max() <= AMP_PROBABILITY_TOL  # log-probabilities


def test_tables_name_the_precision(demo_data, cams_config, simulate_bfloat16):
    simulate_bfloat16(True)
    config = with_cams(cams_config(demo_data), amp=True)
    protocol = run_protocol(config, plan_cams(config).cache)
    assert protocol["precision"] == "bfloat16"
    rows = pd.DataFrame({"metric": ["voc07"], "threshold_mode": ["max"], "source": ["cam"], "class": ["mAP"],
                         "n_gt": [1]})
    assert "(voc head, input 64 letterbox, bfloat16) on VOCdemo val" in protocol_line(rows, protocol)
    assert run_protocol(cams_config(demo_data), plan_cams(cams_config(demo_data)).cache)["precision"] == "float32"
