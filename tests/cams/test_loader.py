"""The streaming input of the cams stage (gradloc.cams.loader): DataLoader workers, batch plan, shards."""

import dataclasses

import numpy as np
import pytest

from gradloc.cams.loader import default_workers, parse_shard, plan_batches, shard_batches, shard_of
from gradloc.cams.methods import compute_cams
from gradloc.datasets.voc import DatasetError
from gradloc.run.cams import execution_of, plan_cams
from gradloc.run.setup import load_classifier


def with_cams(config, **changes):
    return dataclasses.replace(config, cams=dataclasses.replace(config.cams, **changes))


def map_bytes(cache):
    return {p.name: p.read_bytes() for p in sorted((cache.root / "maps").glob("*.pkl"))}


def test_workers_give_the_bytes_of_the_in_process_path(demo_data, cams_config, tmp_path):
    base = with_cams(cams_config(demo_data), batch_size=5)
    inline, dataset = plan_cams(with_cams(base, workers=0)).run()
    streamed, _ = plan_cams(dataclasses.replace(with_cams(base, workers=2), cache_dir=str(tmp_path / "w2"))).run()
    assert streamed.root != inline.root
    assert len(map_bytes(inline)) == len(dataset) == 12
    assert map_bytes(streamed) == map_bytes(inline)
    # the maps are those of the engine on the planned batches, read in the main process, run as the stage runs
    loaded = load_classifier(base)
    execution = execution_of(base, loaded)
    assert execution.channels_last  # the demo family's registry fact
    first = plan_batches(dataset, loaded.preprocessing, 5)[0]
    assert first == dataset.image_ids[:5]
    inputs, _ = loaded.preprocessing.batch([dataset.load_image(image_id) for image_id in first])
    maps, _ = compute_cams(execution.model(loaded.model), execution.inputs(inputs), list(range(len(loaded.classes))),
                           method="gradcam", layer=inline.key_data["layer"])
    for row, image_id in enumerate(first):
        np.testing.assert_array_equal(inline.get(image_id).maps, maps[row].numpy())


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_image_is_skipped_or_raised_from_a_worker(workers, demo_copy, cams_config):
    jpeg = demo_copy / "VOCdemo" / "JPEGImages" / "000026.jpg"
    jpeg.write_bytes(b"not a jpeg")
    config = with_cams(cams_config(demo_copy), workers=workers, batch_size=4)
    with pytest.raises(DatasetError, match=r"000026\.jpg: unreadable image"):
        plan_cams(config).run()
    skip = dataclasses.replace(config, data=dataclasses.replace(config.data, on_error="skip"))
    cache, dataset = plan_cams(skip).run()
    assert [item["image_id"] for item in dataset.skipped] == ["000026"]
    assert "000026" not in dataset.image_ids
    assert sorted(p.name.split(".")[0] for p in (cache.root / "maps").glob("*.pkl")) == sorted(dataset.image_ids)


def test_shards_partition_the_plan_round_robin():
    batches = [["a", "b"], ["c", "d"], ["e", "f"], ["g"]]
    assert shard_batches(batches, (0, 2)) == [["a", "b"], ["e", "f"]]
    assert shard_batches(batches, (1, 2)) == [["c", "d"], ["g"]]
    assert shard_batches(batches, None) == batches
    assert shard_of(batches, 3) == {"a": 0, "b": 0, "c": 1, "d": 1, "e": 2, "f": 2, "g": 0}


@pytest.mark.parametrize(("text", "message"), [("2/2", "need 0 <= i < n"), ("1", "expected i/n"),
                                                ("a/3", "expected i/n"), ("0/0", "need 0 <= i < n")])
def test_bad_shard_is_named(text, message):
    with pytest.raises(ValueError, match=rf"--shard '{text}': {message}"):
        parse_shard(text)


def test_two_shards_fill_the_cache_with_the_bytes_of_one_pass(demo_data, cams_config, tmp_path):
    base = with_cams(cams_config(demo_data), batch_size=5, workers=0)
    whole, dataset = plan_cams(base).run()
    sharded = dataclasses.replace(base, cache_dir=str(tmp_path / "sharded"))
    first, _ = plan_cams(sharded, shard=(0, 2)).run()
    assert sorted(name.split(".")[0] for name in map_bytes(first)) == sorted(dataset.image_ids[:5]
                                                                              + dataset.image_ids[10:])
    plan_cams(sharded, shard=(1, 2)).run()
    assert map_bytes(first) == map_bytes(whole)


def test_resumed_run_recomputes_whole_planned_batches(demo_data, cams_config, tmp_path):
    base = with_cams(cams_config(demo_data), batch_size=5, workers=0)
    whole, dataset = plan_cams(base).run()
    other = dataclasses.replace(base, cache_dir=str(tmp_path / "other"))
    partial, _ = plan_cams(other).run()
    next((partial.root / "maps").glob(f"{dataset.image_ids[6]}.*.pkl")).unlink()
    resumed, _ = plan_cams(other).run()
    assert map_bytes(resumed) == map_bytes(whole)


def test_default_workers_decode_in_process_on_a_cpu_and_share_the_node_for_a_gpu(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(4)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_workers("cpu") == 0
    assert default_workers("cuda") == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert default_workers("cuda") == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_workers("cuda") == 0
