"""Stage 1, cams: VOC split + classifier + CAM method -> the heatmap cache (raw maps of all classes, per image)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from gradloc import __version__
from gradloc.cams.cache import HeatmapCache
from gradloc.cams.features import FeatureCache, features_key
from gradloc.cams.gradient import GRADIENT_MAPS
from gradloc.cams.hooks import ModuleInput
from gradloc.cams.layers import default_layer, resolve_layer
from gradloc.cams.loader import default_workers, plan_batches, shard_batches, stream_batches
from gradloc.cams.methods import compute_cams, compute_gradient_cams, default_masked_batch
from gradloc.datasets.voc import VOCDataset
from gradloc.models.build import resolve_device
from gradloc.models.checkpoints import backbone_digest
from gradloc.models.execution import Execution, keep_freed_memory, resolve_execution
from gradloc.run.config import RunConfig, check_places, open_dataset
from gradloc.run.setup import Progress, check_names, load_classifier, require_images, with_method

logger = logging.getLogger(__name__)


def execution_of(config: RunConfig, loaded: Any) -> Execution:
    """How the classifier of ``config`` runs: ``cams.device``, ``cams.channels_last`` (None: the model family's
    registry fact) and ``cams.amp`` (:func:`gradloc.models.execution.resolve_execution`)."""
    return resolve_execution(resolve_device(config.cams.device), loaded.description["family"],
                             config.cams.channels_last, config.cams.amp)


def cams_cache(config: RunConfig, loaded: Any, dataset: VOCDataset) -> HeatmapCache:
    """The cache folder for this (model, method, layer, preprocessing, classes, execution) -- named by their
    hash. The images are not in the key: each cached file records its image's fingerprint (see
    gradloc.cams.cache)."""

    layer, _ = resolve_layer(loaded.model, config.cams.layer or default_layer(loaded.model))
    pre = loaded.preprocessing
    key = {
        "model": loaded.description,
        "score_kind": loaded.score_kind,
        "method": config.cams.method,
        "layer": layer,
        "input_size": pre.input_size,
        "resize_mode": pre.resize_mode,
        "mean": list(pre.mean),
        "std": list(pre.std),
        "store_dtype": config.cams.store_dtype,
        "classes": list(loaded.classes),
        "dataset": {"year": dataset.year, "classes": list(dataset.classes)},
        **({"flip": True} if config.cams.flip else {}),  # absent when off: caches made before the option stay valid
        **({"aug_smooth": True} if config.cams.aug_smooth else {}),
        **({"eigen_smooth": True} if config.cams.eigen_smooth else {}),
        **execution_of(config, loaded).key(),  # memory format and precision, absent at contiguous float32
        "gradloc": __version__,
    }
    return HeatmapCache(config.cache_dir, key)


def features_cache(config: RunConfig, loaded: Any, execution: Execution) -> FeatureCache | None:
    """The pooled-features cache the cams stage fills for ``gradloc train`` (:mod:`gradloc.cams.features`):
    the input of the model's classifier (``model.gradloc_classifier``; None when the model names none)."""
    classifier = getattr(loaded.model, "gradloc_classifier", None)
    if classifier is None:
        return None
    key = features_key(loaded.description["arch"], backbone_digest(loaded.model, classifier),
                       loaded.preprocessing.to_dict(), execution.key())
    cache = FeatureCache(config.cache_dir, key)
    cache.clean()
    return cache


@dataclass
class CamsPlan:
    """What the cams stage will compute (:func:`plan_cams`); :meth:`run` computes it.

    Attributes:
        config: the run's config.
        dataset, loaded: the split and the classifier.
        caches: method -> heatmap cache; the first is ``config.cams.method``'s.
        pending: image ids without valid maps in at least one of the caches.
        batches: the planned batches (of this shard) holding a pending image; each is computed whole.
        shard: (i, n) or None.
        execution: where and how the model runs (device, memory format, precision).
        features: the pooled-features cache filled beside the maps, or None.
    """

    config: RunConfig
    dataset: VOCDataset
    loaded: Any
    caches: dict[str, HeatmapCache]
    pending: set[str]
    batches: list[list[str]]
    shard: tuple[int, int] | None
    execution: Execution
    features: FeatureCache | None

    @property
    def cache(self) -> HeatmapCache:
        return self.caches[self.config.cams.method]

    @property
    def n_images(self) -> int:
        """Images this plan computes and stores."""
        return sum(len(self.pending.intersection(batch)) for batch in self.batches)

    @property
    def description(self) -> str:
        shard = f", shard {self.shard[0]}/{self.shard[1]}" if self.shard else ""
        return f"cams {self.config.data.split} ({' + '.join(self.caches)}{shard})"

    def run(self, progress: Progress = None) -> tuple[HeatmapCache, VOCDataset]:
        """Compute and cache the maps; ``progress(n)`` after each batch (images stored or skipped). With
        ``data.on_error: skip`` unreadable images leave the dataset. Returns (cache, dataset)."""
        config, dataset, caches, pending = self.config, self.dataset, self.caches, self.pending
        execution = self.execution
        logger.info("%s: %d of %d images to compute (%d batches, %s) into %s", self.description, self.n_images,
                    len(dataset), len(self.batches), execution.describe(),
                    ", ".join(str(c.root) for c in caches.values()))
        keep_freed_memory()
        model = execution.model(self.loaded.model)
        all_classes = list(range(len(self.loaded.classes)))
        layer = self.cache.key_data["layer"]
        workers = default_workers(execution.device.type) if config.cams.workers is None else config.cams.workers
        masked_batch = config.cams.masked_batch or default_masked_batch(execution.device)
        record = (ModuleInput(model.get_submodule(model.gradloc_classifier)) if self.features is not None
                  else None)
        with record or nullcontext():
            for batch in stream_batches(dataset, self.loaded.preprocessing, self.batches, workers,
                                        pin_memory=execution.device.type == "cuda",
                                        channels_last=execution.channels_last):
                for image_id, error in batch.errors:
                    if config.data.on_error == "raise":
                        raise error
                    dataset.skip(image_id, dataset.image_path(image_id), error)
                if batch.inputs is not None:
                    self._compute(model, execution.inputs(batch.inputs), batch, all_classes, layer, masked_batch,
                                  record)
                if progress:
                    progress(len(pending.intersection(batch.image_ids)) + len(batch.errors))
        return self.cache, dataset

    def _compute(self, model: Any, inputs: Any, batch: Any, classes: list[int], layer: str, masked_batch: int,
                 record: ModuleInput | None) -> None:
        """Compute one batch and store the maps (and features) of its pending images."""
        config, caches = self.config, self.caches
        engine = {"flip": config.cams.flip, "aug_smooth": config.cams.aug_smooth,
                  "eigen_smooth": config.cams.eigen_smooth}
        with self.execution.autocast():
            if len(caches) > 1:
                maps, scores = compute_gradient_cams(model, inputs, classes, list(caches), layer, **engine)
            else:
                one, scores = compute_cams(model, inputs, classes, method=config.cams.method, layer=layer,
                                           batch_size=masked_batch, **engine)
                maps = {config.cams.method: one}
        scores_np = scores.detach().float().cpu().numpy()
        stored = [(i, image_id) for i, image_id in enumerate(batch.image_ids) if image_id in self.pending]
        for method, method_cache in caches.items():  # batch-mates already cached are computed, not rewritten
            maps_np = maps[method].float().cpu().numpy()
            for i, image_id in stored:
                method_cache.put(image_id, maps_np[i], scores_np[i], batch.geometries[i], config.cams.store_dtype,
                                 batch.sources[i])
        if record is not None:
            features = record.take().flatten(1).float().cpu().numpy()
            for i, image_id in stored:
                self.features.put(image_id, features[i], batch.sources[i], batch.image_ids)


def plan_cams(config: RunConfig, *, dataset: VOCDataset | None = None, loaded: Any = None,
              also: Sequence[str] = (), shard: tuple[int, int] | None = None) -> CamsPlan:
    """Open the split, the classifier and the heatmap cache(s) and plan the cams stage: every image of the
    split not validly cached yet (:meth:`HeatmapCache.todo`).

    ``dataset`` and ``loaded`` (the classifier) are opened from the config unless given. ``also`` names more
    gradient methods (:data:`gradloc.cams.gradient.GRADIENT_MAPS`) whose caches are filled in the same pass (one
    forward/backward per batch for all of them), as if each had its own run. Batches are planned over the
    whole split (:func:`gradloc.cams.loader.plan_batches`) and decoded by ``cams.workers`` DataLoader workers; a
    batch holding an image to compute is computed whole (only the images to compute are stored), so an
    image's maps never depend on what was cached before or on ``shard`` = (i, n), which computes only every
    n-th planned batch from batch i.

    Raises:
        ValueError: an unknown name, ``cams.amp`` on a device without autocast, an empty split, or ``also``
            with a method that is not a gradient method.
    """

    check_names(config)
    check_places(config, writes_run=False)
    for method in also:
        if method not in GRADIENT_MAPS or config.cams.method not in GRADIENT_MAPS:
            raise ValueError(f"cams for {config.cams.method} and {method} in one pass: both must be gradient "
                             f"methods ({', '.join(GRADIENT_MAPS)})")
    dataset = dataset or open_dataset(config)
    require_images(dataset)
    loaded = loaded or load_classifier(config)
    execution = execution_of(config, loaded)
    caches = {method: cams_cache(with_method(config, method), loaded, dataset)
              for method in (config.cams.method, *also)}
    pending = set().union(*(c.todo(dataset, config.data.on_error) for c in caches.values()))
    batches = [batch for batch in shard_batches(plan_batches(dataset, loaded.preprocessing, config.cams.batch_size),
                                                shard) if pending.intersection(batch)]
    return CamsPlan(config, dataset, loaded, caches, pending, batches, shard, execution,
                    features_cache(config, loaded, execution))
