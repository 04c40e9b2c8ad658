"""The same results whatever the layout: one process, --shard i/n + merge, torchrun (gloo, CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from gradloc.cli import main
from gradloc.run.distributed import world_from_env
from tests.conftest import ROOT

COMPARED = ("gt.pkl", "detections/*.pkl", "baselines/*.pkl", "baselines/random/*.pkl", "points.pkl", "scores.csv")


@pytest.fixture
def config_file(demo_data, cams_config, tmp_path):
    """A demo-data config (12 val images, batches of 5: shard 0/2 gets batches 0 and 2, shard 1/2 batch 1)."""
    config = cams_config(demo_data, **{"cams.batch_size": 5, "cams.workers": 0, "boxes.thresholds": (0.2, 0.4)})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    return path


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def outputs(run_dir: Path) -> dict[str, bytes]:
    files = {str(p.relative_to(run_dir)): p.read_bytes() for pattern in COMPARED for p in run_dir.glob(pattern)}
    assert "scores.csv" in files and any(name.startswith("detections/") for name in files)
    return files


def one_process(config_file, tmp_path) -> dict[str, bytes]:
    code, output = cli("run", "--config", config_file, "--cache-dir", tmp_path / "c1", "--name", "one", "-q")
    assert code == 0, output
    return outputs(tmp_path / "results" / "one")


def test_shards_then_merge_give_the_bytes_of_one_process(config_file, tmp_path):
    reference = one_process(config_file, tmp_path)
    shared = ("--config", config_file, "--cache-dir", tmp_path / "c2", "--name", "merged")
    code, output = cli("cams", *shared[:4], "--shard", "0/2")  # cams takes no --name (it writes no run folder)
    assert code == 0, output
    code, output = cli("merge", *shared)
    assert code == 1
    line = output.strip().splitlines()[-1]
    assert line.startswith("error: ") and "5 of 12 images have no valid cached maps: shard 1/2 should have made " \
        "000030, 000031, 000032, 000033, 000034;" in line, output
    assert not (tmp_path / "results" / "merged").exists()
    code, output = cli("run", *shared, "--shard", "1/2")
    assert code == 0, output
    assert not (tmp_path / "results" / "merged").exists()  # a shard computes maps only
    code, output = cli("merge", *shared, "-q")
    assert code == 0, output
    assert outputs(tmp_path / "results" / "merged") == reference


def test_merge_before_any_shard_says_so(config_file, tmp_path):
    code, output = cli("merge", "--config", config_file, "--cache-dir", tmp_path / "empty")
    assert code == 1
    assert "12 of 12 images" in output and "no shard has run for this config" in output


@pytest.mark.parametrize("record", ["[1, 2]", '{"of": "two"}', '{"of": 2, "skipped": [3]}', "{"])
def test_a_damaged_shard_record_is_one_line(record, config_file, tmp_path):
    code, output = cli("cams", "--config", config_file, "--cache-dir", tmp_path / "c", "--shard", "0/2", "-q")
    assert code == 0, output
    [path] = list((tmp_path / "c").rglob("shards/2/0.json"))
    path.write_text(record)
    code, output = cli("merge", "--config", config_file, "--cache-dir", tmp_path / "c")
    assert code == 1 and output.strip().splitlines()[-1].startswith(f"error: {path}: "), output
    assert "delete it and rerun that shard" in output


def test_bad_shard_flag_is_one_line(config_file):
    code, output = cli("cams", "--config", config_file, "--shard", "2/2")
    assert code == 1
    assert output.strip() == "error: --shard '2/2': need 0 <= i < n (shards are numbered from 0), e.g. 0/2"


def test_world_from_env():
    assert world_from_env({}) is None
    world = world_from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (world.rank, world.size, world.local_rank, world.local_size) == (1, 2, 1, 2)
    with pytest.raises(ValueError, match="environment variable RANK='x': expected a whole number"):
        world_from_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="RANK=2, WORLD_SIZE=2: need 0 <= RANK < WORLD_SIZE"):
        world_from_env({"RANK": "2", "WORLD_SIZE": "2"})


@pytest.mark.slow
def test_torchrun_two_processes_give_the_bytes_of_one_process(config_file, tmp_path):
    reference = one_process(config_file, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "gradloc", "run", "--config", str(config_file), "--cache-dir", str(tmp_path / "c3"),
                             "--name", "torchrun"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "results" / "torchrun"
    assert outputs(run_dir) == reference
    split = json.loads((run_dir / "manifest.json").read_text())["distributed"]
    assert split["world_size"] == 2 and split["images_per_rank"] == [7, 5]
    assert result.stdout.count("threshold = 0.2") == 1  # tables printed once, by rank 0
    assert "[rank 1/2]" in result.stderr
