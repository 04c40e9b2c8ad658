"""Splitting the cams stage over processes: job-array shards (``--shard i/n``) and torchrun ranks.

Both split the same way (:func:`gradloc.cams.loader.shard_batches`): the split's batches are planned once, in split
order and grouped by input shape, and shard / rank ``i`` of ``n`` computes every n-th planned batch from batch
``i``. An image's batch-mates are therefore the same in every layout and its maps are the same bytes. Every
shard leaves a record ``<cache>/shards/<n>/<i>.json`` (images computed, images skipped) so that
:func:`check_filled` can name the shard that should have made a missing image.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gradloc.cams.cache import HeatmapCache
from gradloc.cams.loader import plan_batches, shard_of
from gradloc.core.files import atomic_write_bytes
from gradloc.datasets.voc import VOCDataset
from gradloc.run.cams import CamsPlan, cams_cache
from gradloc.run.config import RunConfig, open_dataset
from gradloc.run.setup import Progress, load_classifier

logger = logging.getLogger(__name__)


SHARDS_DIR = "shards"


@dataclass(frozen=True)
class World:
    """This process's place under torchrun: global rank and size, rank and size on this node."""

    rank: int
    size: int
    local_rank: int
    local_size: int


def world_from_env(env: Mapping[str, str] = os.environ) -> World | None:
    """The torch.distributed environment set by ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE), or None outside torchrun.

    Raises:
        ValueError: a variable that is not a whole number, or a rank outside the world, naming it.
    """
    if "WORLD_SIZE" not in env:
        return None
    values = {}
    for name, default in (("RANK", None), ("WORLD_SIZE", None), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1")):
        text = env.get(name, default)
        try:
            values[name] = int(text)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ValueError(f"environment variable {name}={text!r}: expected a whole number (set by torchrun; "
                             "launch with `torchrun --nproc-per-node N -m gradloc ...`)") from None
    world = World(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"], values["LOCAL_WORLD_SIZE"])
    if world.size < 1 or not 0 <= world.rank < world.size:
        raise ValueError(f"environment variables RANK={world.rank}, WORLD_SIZE={world.size}: need "
                         "0 <= RANK < WORLD_SIZE")
    return world


def init_process_group(world: World, device: str) -> str:
    """Join the process group (``nccl`` on a CUDA device, which becomes ``cuda:<LOCAL_RANK>``; ``gloo``
    otherwise). Returns the backend name."""

    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(world.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=world.rank, world_size=world.size)
    return backend


def barrier() -> None:
    dist.barrier()


def gather(value: Any) -> list[Any]:
    """``value`` of every rank, in rank order (on every rank)."""

    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def rank_zero_first(world: World | None) -> Iterator[None]:
    """Rank 0 runs the block before the other ranks (which then reuse what it made, e.g. the demo data)."""
    if world is not None and world.rank != 0:
        barrier()
    yield
    if world is not None and world.rank == 0:
        barrier()


def _record_path(cache: HeatmapCache, shard: tuple[int, int]):
    return cache.root / SHARDS_DIR / str(shard[1]) / f"{shard[0]}.json"


def compute_shard(plan: CamsPlan, progress: Progress = None) -> tuple[HeatmapCache, VOCDataset, int]:
    """Compute a planned cams stage (:func:`gradloc.run.cams.plan_cams`, with its shard or all of it) and, for
    a shard, write its record.

    Returns:
        (cache, dataset, number of images this process computed).
    """
    counts: list[int] = []

    def count(n: int) -> None:
        counts.append(n)
        if progress:
            progress(n)

    cache, dataset = plan.run(count)
    if plan.shard is not None:
        record = {"shard": plan.shard[0], "of": plan.shard[1], "batch_size": plan.config.cams.batch_size,
                  "computed": sum(counts), "skipped": list(dataset.skipped)}
        atomic_write_bytes(_record_path(cache, plan.shard), json.dumps(record, indent=1).encode())
    return cache, dataset, sum(counts)


def check_filled(config: RunConfig) -> None:
    """Before ``gradloc merge``: every image of the split has valid cached maps, or was skipped by the shard
    that owned it (``data.on_error: skip``).

    Raises:
        FileNotFoundError: naming the missing images and, from the shard records in the cache, the shard
            ``i/n`` that should have made them (or that no shard has run).
    """

    dataset, loaded = open_dataset(config), load_classifier(config)
    cache = cams_cache(config, loaded, dataset)
    plan = plan_batches(dataset, loaded.preprocessing, config.cams.batch_size)
    records = [_read_record(path) for path in sorted((cache.root / SHARDS_DIR).glob("*/*.json"))]
    skipped = {item["image_id"] for record in records for item in record["skipped"]}
    missing = [i for i in cache.todo(dataset, config.data.on_error) if i not in skipped]
    if not missing:
        return
    counts = sorted({record["of"] for record in records})
    if not counts:
        raise FileNotFoundError(f"{cache.root}: {len(missing)} of {len(dataset)} images ({_some(missing)}) have no "
                                "valid cached maps and no shard has run for this config; run "
                                "`gradloc cams --shard i/n` for every i, or `gradloc run`")
    count = counts[-1]
    owners = shard_of(plan, count)
    by_shard: dict[int, list[str]] = {}
    for image_id in missing:
        by_shard.setdefault(owners[image_id], []).append(image_id)
    parts = "; ".join(f"shard {k}/{count} should have made {_some(ids)}" for k, ids in sorted(by_shard.items()))
    raise FileNotFoundError(f"{cache.root}: {len(missing)} of {len(dataset)} images have no valid cached maps: "
                            f"{parts}; run `gradloc cams --shard <i>/{count}` with the same config for those "
                            "shards (or `gradloc run` to compute them here)")


def _read_record(path: Path) -> dict[str, Any]:
    """A shard record (``{"of": n, "skipped": [{"image_id", ...}], ...}``), checked.

    Raises:
        ValueError: naming the file, when it is not such a record.
    """
    try:
        record = json.loads(path.read_text())
    except (ValueError, RecursionError) as error:
        raise ValueError(f"{path}: not valid JSON ({str(error)[:200]}); delete it and rerun that shard") from None
    if not (isinstance(record, dict) and isinstance(record.get("of"), int) and record["of"] >= 1
            and isinstance(record.get("skipped", []), list)
            and all(isinstance(item, dict) and isinstance(item.get("image_id"), str)
                    for item in record.get("skipped", []))):
        raise ValueError(f"{path}: not a shard record ({{of, computed, skipped: [{{image_id, ...}}]}}); delete it "
                         "and rerun that shard")
    return {**record, "skipped": record.get("skipped", [])}


def _some(ids: list[str], n: int = 5) -> str:
    return ", ".join(ids[:n]) + (f" and {len(ids) - n} more" if len(ids) > n else "")
