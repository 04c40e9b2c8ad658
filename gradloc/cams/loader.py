"""Streaming input for the cams stage: a ``torch.utils.data.DataLoader`` whose workers read, fingerprint and
preprocess whole batches while the CAM engine computes the previous one.

The batches are planned once over the whole split (:func:`plan_batches`: split order, grouped by input shape,
``batch_size`` images each), so an image always shares its batch with the same images, whatever was cached
before, however the split is sharded (:func:`shard_batches`) and however many processes or workers run. A
worker reports an unreadable image instead of raising; the main process then raises it or, with
``data.on_error: skip``, records the skip exactly as :meth:`gradloc.datasets.voc.VOCDataset.read_images` does.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from gradloc.core.geometry import Geometry
from gradloc.core.interrupts import deferred
from gradloc.datasets.voc import DatasetError, VOCDataset
from gradloc.models.preprocessing import Preprocessing


@dataclass
class Batch:
    """One decoded batch: ``inputs`` float32[B, 3, H, W] (None when every image failed; channels_last memory
    when asked), the ids, geometries and file fingerprints of its B readable images, and the (image id, error)
    of the unreadable ones."""

    image_ids: list[str]
    inputs: torch.Tensor | None
    geometries: list[Geometry]
    sources: list[dict[str, Any]]
    errors: list[tuple[str, DatasetError]] = field(default_factory=list)

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pinning thread (``pin_memory=True``)."""
        if self.inputs is not None:
            self.inputs = self.inputs.pin_memory()
        return self


def plan_batches(dataset: VOCDataset, pre: Preprocessing, batch_size: int) -> list[list[str]]:
    """Every image of ``dataset`` in batches of one input shape (:meth:`Preprocessing.batches` over the
    annotated sizes, split order), as image ids. Depends only on the split, the preprocessing and the batch
    size, so an image's batch-mates are the same in every layout of the work."""
    ids = list(dataset.image_ids)
    sizes = [(dataset.annotation(i).width, dataset.annotation(i).height) for i in ids]
    return [[ids[row] for row in rows] for rows in pre.batches(sizes, batch_size)]


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n.

    Raises:
        ValueError: naming the value and the expected form.
    """
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected i/n with whole numbers, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard {text!r}: need 0 <= i < n (shards are numbered from 0), e.g. 0/{max(count, 2)}")
    return index, count


def shard_batches(batches: Sequence[list[str]], shard: tuple[int, int] | None) -> list[list[str]]:
    """The batches shard ``(i, n)`` computes: every n-th planned batch starting at batch i (round robin over
    the plan of :func:`plan_batches`, so shards get equal work up to one batch); all batches for None."""
    if shard is None:
        return list(batches)
    index, count = shard
    return [batch for k, batch in enumerate(batches) if k % count == index]


def shard_of(batches: Sequence[list[str]], count: int) -> dict[str, int]:
    """Image id -> the shard of ``count`` that computes it (:func:`shard_batches`)."""
    return {image_id: k % count for k, batch in enumerate(batches) for image_id in batch}


class _BatchReader(Dataset):
    """Item k = batch k read and preprocessed (runs in a DataLoader worker)."""

    def __init__(self, dataset: VOCDataset, pre: Preprocessing, batches: Sequence[list[str]],
                 channels_last: bool) -> None:
        self.dataset, self.pre, self.batches, self.channels_last = dataset, pre, list(batches), channels_last

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> Batch:
        read, errors = [], []
        for image_id in self.batches[index]:
            try:
                read.append((image_id, *self.dataset.read_image(image_id)))
            except DatasetError as error:
                errors.append((image_id, error))
        if not read:
            return Batch([], None, [], [], errors)
        inputs, geometries = self.pre.batch([image for _, image, _ in read], self.channels_last)
        return Batch([i for i, _, _ in read], inputs, geometries, [s for _, _, s in read], errors)


def _identity(batch: Batch) -> Batch:
    return batch


def default_workers(device_type: str) -> int:
    """Decode workers per process for a model on ``device_type``.

    On a CPU none: a worker process competes with torch's threads for the same cores, and decoding is a few
    percent of the work. Measured on 2 cores (EfficientNet-Lite0 at a 320-px short side, cams stage, 64 VOC07
    val images, 3 rounds; ``python scripts/bench_pipeline.py --workers 0,1,2 --no-stage``): 2.94 img/s with 0
    workers, 2.04 with 1, 1.86 with 2. On a GPU the CPUs this process may use, shared by the processes of the
    node (``LOCAL_WORLD_SIZE`` under torchrun), minus the one feeding the GPU, at most 8; 0 when that leaves
    none.
    """
    if device_type == "cpu":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        processes = 1
    return max(0, min(8, cpus // processes - 1))


def stream_batches(dataset: VOCDataset, pre: Preprocessing, batches: Sequence[list[str]], workers: int,
                   pin_memory: bool = False, channels_last: bool = False) -> Iterator[Batch]:
    """The ``batches`` (lists of image ids) read and preprocessed, in order, ``workers`` processes ahead of
    the consumer (0 = in the calling process); inputs in channels_last memory when asked (made so by the
    preprocessing, no copy). Unreadable images are reported in :attr:`Batch.errors`."""
    if workers < 0:
        raise ValueError(f"--workers {workers}: give 0 (decode in-process) or more worker processes")
    loader = DataLoader(_BatchReader(dataset, pre, batches, channels_last), batch_size=None, shuffle=False,
                        num_workers=workers, collate_fn=_identity, pin_memory=pin_memory,
                        prefetch_factor=2 if workers else None, persistent_workers=False)
    # Workers start and stop inside fork hooks and __del__, where a KeyboardInterrupt would be swallowed:
    # a Ctrl-C there is held back and raised right after (gradloc.core.interrupts).
    with deferred():
        reader = iter(loader)
    try:
        yield from reader
    finally:
        with deferred():
            del reader
