"""The pipeline stages, each runnable alone and chained by :func:`run`.

``cams``  : VOC split + classifier + CAM method -> heatmap cache (raw maps of all classes, per image)
``boxes`` : heatmap cache -> ``gt.pkl``, ``detections/thr_<τ>.pkl``, baselines, ``points.pkl``
``score`` : pickles -> flat score rows (pandas) -> tables and files (see gradloc.report)

Stages report progress through an optional ``progress(n_done_increment)`` callback (the CLI wraps tqdm
around it); the library itself never prints.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gradloc import __version__, runs
from gradloc.boxes import BASELINES, BoxRows, ThresholdDetections, image_boxes, peak_points, random_maps
from gradloc.cache import HeatmapCache
from gradloc.config import RunConfig, config_hash
from gradloc.detections import (
    Detections,
    GroundTruth,
    class_relabel,
    keep_classes,
    load_detections,
    load_ground_truth,
)
from gradloc.voc import VOCDataset

logger = logging.getLogger(__name__)

Progress = Callable[[int], None] | None


@dataclass
class StageTimes:
    """Wall-clock seconds per stage, for the run summary."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


# --- shared helpers -----------------------------------------------------------------------------------------


def prepare_demo(config: RunConfig, progress: Callable[[int, int, float], None] | None = None) -> RunConfig:
    """For a demo config: generate the synthetic dataset and train the tiny CNN (both reused when present),
    and return the config pointing at them. Other configs are returned unchanged."""
    if not config.demo.enabled:
        return config
    from gradloc.demo import DEMO_CLASSES, generate_demo, train_demo_model

    demo_root = Path(config.cache_dir) / "demo"
    voc_root = generate_demo(demo_root / "data", n_train=config.demo.n_train, n_val=config.demo.n_val,
                             n_test=config.demo.n_test, seed=config.seed)
    checkpoint = train_demo_model(voc_root, demo_root / "model" / f"demo_cnn_seed{config.seed}.pt",
                                  seed=config.seed, max_seconds=config.demo.train_seconds, progress=progress)
    data = dataclasses.replace(config.data, voc_root=str(voc_root), year="demo", classes=DEMO_CLASSES)
    model = dataclasses.replace(config.model, name="demo_cnn", checkpoint=str(checkpoint), head="voc")
    return dataclasses.replace(config, data=data, model=model)


def check_names(config: RunConfig) -> None:
    """Fail before any work on a name no registry knows: CAM method, baselines, AP metric, model, device.

    Raises:
        ValueError: naming the key and the valid choices.
    """
    from gradloc.cams import METHODS
    from gradloc.metrics import METRICS
    from gradloc.models import get_spec, resolve_device

    method = METHODS.get(config.cams.method)
    if method is None:
        raise ValueError(f"unknown CAM method {config.cams.method!r} (cams.method); choose one of "
                         f"{', '.join(METHODS)}")
    if method.input_resolution:
        raise ValueError(f"CAM method {config.cams.method!r} makes pixel-level pictures, not heatmaps for "
                         "boxes; use it with `gradloc show --guided`")
    for name in config.boxes.baselines:
        if name not in (*BASELINES, "random"):
            raise ValueError(f"unknown baseline {name!r} (boxes.baselines); choose from "
                             f"{', '.join([*BASELINES, 'random'])}")
    if config.score.metric not in METRICS:
        raise ValueError(f"unknown AP metric {config.score.metric!r} (score.metric); choose one of "
                         f"{', '.join(METRICS)}")
    if not config.demo.enabled:
        get_spec(config.model.name)
    resolve_device(config.cams.device)


def class_probabilities(scores: np.ndarray, score_kind: str) -> np.ndarray:
    """float64[C] class probabilities of cached model outputs (the CAM targets): ``sigmoid`` of logits or
    ``exp`` of log-probabilities (``gradloc.models.SCORE_KINDS``). They are the detection confidences and
    what the ``predicted`` cut compares with."""
    import torch

    from gradloc.models import SCORE_KINDS

    return SCORE_KINDS[score_kind](torch.from_numpy(np.asarray(scores, dtype=np.float64))).numpy()


def open_dataset(config: RunConfig, split: str | None = None) -> VOCDataset:
    data = config.data
    return VOCDataset(data.voc_root, year=data.year, split=split or data.split, classes=data.classes,
                      on_error=data.on_error, limit=data.limit)


def load_classifier(config: RunConfig):  # -> gradloc.models.LoadedModel
    from gradloc.models import load_model

    m = config.model
    return load_model(m.name, weights=m.weights, checkpoint=m.checkpoint, head=m.head,
                      classes=config.data.classes, input_size=m.input_size, resize_mode=m.resize_mode)


# --- stage 1: CAMs ------------------------------------------------------------------------------------------


def cams_cache(config: RunConfig, loaded: Any, dataset: VOCDataset) -> HeatmapCache:
    """The cache folder for this (model, method, layer, preprocessing, classes) -- named by their hash. The
    images are not in the key: each cached file records its image's fingerprint (see gradloc.cache)."""
    from gradloc.cams import default_layer, resolve_layer

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
        **({"amp": "float16"} if config.cams.amp else {}),
        "gradloc": __version__,
    }
    return HeatmapCache(config.cache_dir, key)


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
        device: where the model runs.
    """

    config: RunConfig
    dataset: VOCDataset
    loaded: Any
    caches: dict[str, HeatmapCache]
    pending: set[str]
    batches: list[list[str]]
    shard: tuple[int, int] | None
    device: Any

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
        import torch

        from gradloc.cams import compute_cams, compute_gradient_cams, default_masked_batch
        from gradloc.loader import default_workers, stream_batches

        config, dataset, caches, pending = self.config, self.dataset, self.caches, self.pending
        logger.info("%s: %d of %d images to compute (%d batches) into %s", self.description, self.n_images,
                    len(dataset), len(self.batches), ", ".join(str(c.root) for c in caches.values()))
        model = self.loaded.model.to(self.device)
        all_classes = list(range(len(self.loaded.classes)))
        layer = self.cache.key_data["layer"]
        workers = default_workers() if config.cams.workers is None else config.cams.workers
        masked_batch = config.cams.masked_batch or default_masked_batch(self.device)
        autocast = (torch.autocast(self.device.type, dtype=torch.float16) if config.cams.amp else nullcontext())
        for batch in stream_batches(dataset, self.loaded.preprocessing, self.batches, workers,
                                    pin_memory=self.device.type == "cuda"):
            for image_id, error in batch.errors:
                if config.data.on_error == "raise":
                    raise error
                dataset.skip(image_id, dataset.image_path(image_id), error)
            if batch.inputs is not None:
                inputs = batch.inputs.to(self.device, non_blocking=True)
                with autocast:
                    if len(caches) > 1:
                        maps, scores = compute_gradient_cams(model, inputs, all_classes, list(caches), layer,
                                                             flip=config.cams.flip)
                    else:
                        one, scores = compute_cams(model, inputs, all_classes, method=config.cams.method,
                                                   layer=layer, flip=config.cams.flip, batch_size=masked_batch)
                        maps = {config.cams.method: one}
                scores_np = scores.detach().float().cpu().numpy()
                for method, method_cache in caches.items():
                    maps_np = maps[method].float().cpu().numpy()
                    for i, (image_id, source) in enumerate(zip(batch.image_ids, batch.sources, strict=True)):
                        if image_id in pending:  # batch-mates already cached are computed, not rewritten
                            method_cache.put(image_id, maps_np[i], scores_np[i], batch.geometries[i],
                                             config.cams.store_dtype, source)
            if progress:
                progress(len(pending.intersection(batch.image_ids)) + len(batch.errors))
        return self.cache, dataset


def plan_cams(config: RunConfig, *, dataset: VOCDataset | None = None, loaded: Any = None,
              also: Sequence[str] = (), shard: tuple[int, int] | None = None) -> CamsPlan:
    """Open the split, the classifier and the heatmap cache(s) and plan the cams stage: every image of the
    split not validly cached yet (:meth:`HeatmapCache.todo`).

    ``dataset`` and ``loaded`` (the classifier) are opened from the config unless given. ``also`` names more
    gradient methods (:data:`gradloc.cams.GRADIENT_MAPS`) whose caches are filled in the same pass (one
    forward/backward per batch for all of them), as if each had its own run. Batches are planned over the
    whole split (:func:`gradloc.loader.plan_batches`) and decoded by ``cams.workers`` DataLoader workers; a
    batch holding an image to compute is computed whole (only the images to compute are stored), so an
    image's maps never depend on what was cached before or on ``shard`` = (i, n), which computes only every
    n-th planned batch from batch i.

    Raises:
        ValueError: an unknown name, ``cams.amp`` off CUDA, an empty split, or ``also`` with a method that is
            not a gradient method.
    """
    from gradloc.cams import GRADIENT_MAPS
    from gradloc.loader import plan_batches, shard_batches
    from gradloc.models import resolve_device

    check_names(config)
    device = resolve_device(config.cams.device)
    if config.cams.amp and device.type != "cuda":
        raise ValueError(f"--amp (cams.amp) autocasts on a CUDA device, not on {device}; pass --device cuda on "
                         "a machine with a GPU, or drop --amp")
    for method in also:
        if method not in GRADIENT_MAPS or config.cams.method not in GRADIENT_MAPS:
            raise ValueError(f"cams for {config.cams.method} and {method} in one pass: both must be gradient "
                             f"methods ({', '.join(GRADIENT_MAPS)})")
    dataset = dataset or open_dataset(config)
    require_images(dataset)
    loaded = loaded or load_classifier(config)
    caches = {method: cams_cache(_with_method(config, method), loaded, dataset)
              for method in (config.cams.method, *also)}
    pending = set().union(*(c.todo(dataset, config.data.on_error) for c in caches.values()))
    batches = [batch for batch in shard_batches(plan_batches(dataset, loaded.preprocessing, config.cams.batch_size),
                                                shard) if pending.intersection(batch)]
    return CamsPlan(config, dataset, loaded, caches, pending, batches, shard, device)


def run_cams(config: RunConfig, progress: Progress = None, *, dataset: VOCDataset | None = None,
             loaded: Any = None, also: Sequence[str] = (), shard: tuple[int, int] | None = None
             ) -> tuple[HeatmapCache, VOCDataset]:
    """Plan (:func:`plan_cams`, same arguments) and compute the cams stage; returns (cache, dataset)."""
    return plan_cams(config, dataset=dataset, loaded=loaded, also=also, shard=shard).run(progress)


def _with_method(config: RunConfig, method: str) -> RunConfig:
    return dataclasses.replace(config, cams=dataclasses.replace(config.cams, method=method))


# --- stage 2: boxes -----------------------------------------------------------------------------------------


class _GtKnown:
    """Per (image, GT class) pair, from the raw map of that class (GT-known, whatever the run explains): the
    map's peak (TorchRay's pointing game) and the wsolevaluation box hits (MaxBoxAccV2: min-max map, τ grid
    0.01, one box per region, IoU 0.3 / 0.5 / 0.7) on the run's working grid (``boxes.max_side``)."""

    def __init__(self, max_side: int | None) -> None:
        self.max_side = max_side
        self.points = BoxRows(width=2)
        self.hits: list[np.ndarray] = []

    def add(self, index: int, entry: Any, labels: np.ndarray, boxes: np.ndarray) -> None:
        from gradloc.geometry import upsample, working_size
        from gradloc.wsol import box_hits

        classes = np.unique(labels).astype(np.int64)
        if not len(classes):
            return
        maps = entry.maps[classes]
        self.points.add(index, classes, np.zeros(len(classes)), peak_points(maps, entry.geometry))
        size = (entry.geometry.width, entry.geometry.height)
        heat = upsample(maps, entry.geometry, *working_size(*size, self.max_side))
        self.hits.append(box_hits(heat, [boxes[labels == c] for c in classes], image_size=size))

    def record(self) -> dict[str, Any]:
        from gradloc.wsol import GRID, IOUS_V2

        hits = np.concatenate(self.hits) if self.hits else np.zeros((0, len(GRID), len(IOUS_V2)), dtype=bool)
        [(image_index, labels, _, points)] = self.points.per_threshold()
        return {"image_index": image_index, "labels": labels, "points": points, "hits": hits, "grid": GRID,
                "ious": np.asarray(IOUS_V2),
                "max_side": self.max_side}


def explained_classes(config: RunConfig, probabilities: np.ndarray, gt_labels: np.ndarray) -> np.ndarray:
    """Which classes of an image get boxes (``boxes.explain``): ``predicted`` (probability >= score_cut), ``gt``
    (GT-known: every class with a GT box in the image, difficult included) or ``all``. Returns sorted class
    indices."""
    if config.boxes.explain == "gt":
        return np.unique(gt_labels).astype(np.int64)
    if config.boxes.explain == "all":
        return np.arange(len(probabilities), dtype=np.int64)
    return np.flatnonzero(probabilities >= config.boxes.score_cut).astype(np.int64)


def run_protocol(config: RunConfig, cache: HeatmapCache) -> dict[str, Any]:
    """The protocol description stored in every detections file and printed under every table."""
    b = config.boxes
    model = cache.key_data["model"]
    return {
        "method": config.cams.method,
        "layer": cache.key_data["layer"],
        "model": model.get("arch", config.model.name) if isinstance(model, dict) else str(model),
        "head": config.model.head,
        "checkpoint": config.model.checkpoint,
        "input_size": cache.key_data["input_size"],
        "resize_mode": cache.key_data["resize_mode"],
        "dataset": f"VOC{config.data.year} {config.data.split}",
        "classes_explained": f"predicted (p >= {b.score_cut})" if b.explain == "predicted" else b.explain,
        "threshold_mode": b.threshold_mode,
        "box_mode": b.box_mode,
        "connectivity": b.connectivity,
        "min_area": b.min_area,
        "confidence": b.confidence,
        "nms_iou": b.nms_iou,
        "max_side": b.max_side,
        "cache_key": cache.key,
    }


def require_images(dataset: VOCDataset) -> None:
    """Refuse a split with no images left (empty image set, or every item skipped) before any work.

    Raises:
        ValueError: naming the split and, when items were skipped, the first reason.
    """
    if len(dataset):
        return
    first = dataset.skipped[0] if dataset.skipped else None
    why = (f"all {len(dataset.skipped)} item(s) were skipped (first: {first['file']}: {first['reason']})"
           if first else "its image set lists no images")
    raise ValueError(f"{dataset.base / 'ImageSets' / 'Main' / (dataset.split + '.txt')}: no images to evaluate, "
                     f"{why}; nothing was written")


def open_cached(config: RunConfig) -> tuple[HeatmapCache, VOCDataset]:
    """The heatmap cache and dataset of ``gradloc boxes`` (maps computed earlier by ``gradloc cams``), with the
    cached maps verified: an image without valid maps is an error (``data.on_error: raise``) or leaves the
    dataset as a skipped item (``skip``).

    Raises:
        FileNotFoundError: images without valid cached maps (raise mode); names the cache and what to run.
    """
    dataset = open_dataset(config)
    cache = cams_cache(config, load_classifier(config), dataset)
    missing = cache.todo(dataset, config.data.on_error)
    if missing and config.data.on_error == "raise":
        raise FileNotFoundError(f"{cache.root}: {len(missing)} of {len(dataset)} images (e.g. {missing[0]}) have "
                                "no valid cached maps for this model/method/layer; run `gradloc cams` with the "
                                "same options first")
    for image_id in missing:
        dataset.skip(image_id, dataset.image_path(image_id), ValueError("no valid cached maps (unreadable, or "
                                                                        "edited since `gradloc cams` ran)"))
    return cache, dataset


def run_boxes(config: RunConfig, cache: HeatmapCache, dataset: VOCDataset, progress: Progress = None,
              writer: runs.RunWriter | None = None) -> Path:
    """Cut boxes from the cached maps at every threshold; write gt.pkl, detections, baselines, points.

    With ``writer`` (a run being staged by :func:`gradloc.runs.new_run`) the files go to its staging folder;
    without, they replace ``config.run_dir`` as a whole (with ``config.yaml``). Returns ``config.run_dir``."""
    if writer is None:
        with runs.new_run(config.run_dir) as staged:
            run_boxes(config, cache, dataset, progress, staged)
            staged.write_config(config.to_dict())
        return config.run_dir
    require_images(dataset)
    gt = dataset.ground_truth()
    params = config.boxes
    thresholds = list(config.boxes.thresholds)
    score_kind = cache.key_data["score_kind"]
    check_names(config)
    cam_rows, random_rows = BoxRows(len(thresholds)), BoxRows(len(thresholds))
    fixed_rows = {name: BoxRows() for name in config.boxes.baselines if name in BASELINES}
    points = BoxRows(width=2)
    gt_known = _GtKnown(params.max_side)
    order = np.argsort(gt.image_index, kind="stable")
    bounds = np.searchsorted(gt.image_index[order], np.arange(len(gt.image_ids) + 1))
    rng = np.random.default_rng(config.seed)
    for index, image_id in enumerate(dataset.image_ids):
        entry = cache.get(image_id)
        probs = class_probabilities(entry.scores, score_kind)
        in_image = order[bounds[index] : bounds[index + 1]]
        gt_known.add(index, entry, gt.labels[in_image], gt.boxes[in_image])
        classes = explained_classes(config, probs, gt.labels[in_image])
        maps = entry.maps[classes]
        if len(classes):
            cam_rows.add_sweep(index, classes, image_boxes(maps, probs[classes], entry.geometry, thresholds,
                                                           params))
            if "random" in config.boxes.baselines:
                noise = random_maps(maps.shape, int(rng.integers(2**31)))
                random_rows.add_sweep(index, classes, image_boxes(noise, probs[classes], entry.geometry,
                                                                  thresholds, params))
            for name, rows in fixed_rows.items():
                box = BASELINES[name](entry.geometry)
                rows.add(index, classes, probs[classes], np.repeat(box[None], len(classes), axis=0))
            points.add(index, classes, probs[classes], peak_points(maps, entry.geometry))
        if progress:
            progress(1)

    protocol = run_protocol(config, cache)
    common = {"classes": list(gt.classes), "image_ids": list(gt.image_ids)}

    def detections(rows: ThresholdDetections, threshold: float, threshold_mode: str, box_mode: str,
                   source: str) -> Detections:
        return Detections(threshold=threshold, threshold_mode=threshold_mode, box_mode=box_mode,
                          meta={**protocol, "source": source}, **common, **rows._asdict())

    writer.write_gt(gt)
    for tau, rows, noise_rows in zip(thresholds, cam_rows.per_threshold(), random_rows.per_threshold(),
                                     strict=True):
        writer.write_detections(detections(rows, tau, params.threshold_mode, params.box_mode, "cam"))
        if "random" in config.boxes.baselines:
            writer.write_random(detections(noise_rows, tau, params.threshold_mode, params.box_mode, "random"))
    for name, rows in fixed_rows.items():
        writer.write_baseline(name, detections(rows.per_threshold()[0], 0.0, "none", name, name))
    [(image_index, labels, scores, values)] = points.per_threshold()
    writer.write_points({**common, "image_index": image_index, "labels": labels, "scores": scores,
                         "points": values, "meta": protocol})
    writer.write_gt_known({**common, **gt_known.record(), "meta": protocol})
    return config.run_dir


# --- stage 3: scores ----------------------------------------------------------------------------------------


def score_detections(dets: Detections, gt: GroundTruth, ious: Sequence[float], metric: str,
                     source: str, only: Sequence[str] = ()) -> pd.DataFrame:
    """Flat score rows (JSON schema of the README) of one detections file; ``only``: score just these classes
    (the mAP row is then over them), empty = all."""
    from gradloc.metrics import evaluate

    if only:
        dets, gt = keep_classes(dets, only), keep_classes(gt, only)
    frame = evaluate(dets, gt, iou_thresholds=ious, metric=metric)
    frame.insert(0, "threshold_mode", dets.threshold_mode)
    frame.insert(0, "threshold", dets.threshold)
    frame["source"] = source
    frame["box_mode"] = dets.box_mode
    return frame


def _score_file(path: Path, dets: Detections, gt: GroundTruth, ious: Sequence[float], metric: str,
                source: str, only: Sequence[str] = ()) -> pd.DataFrame:
    """:func:`score_detections` with a content error (class lists, image ids, NaN scores) naming the file."""
    try:
        return score_detections(dets, gt, ious, metric, source, only)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def score_files(gt_path: str | Path, paths: Sequence[str | Path], ious: Sequence[float], metric: str,
                only: Sequence[str] = ()) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Score detection pickles from anywhere against one gt.pkl (``gradloc score --gt``).

    Returns:
        (score rows, source ``cam``; the protocol of the first file's detections, with ``only``).
    """
    gt = load_ground_truth(gt_path)
    frames = [_score_file(Path(path), load_detections(path), gt, ious, metric, "cam", only) for path in paths]
    return pd.concat(frames, ignore_index=True), _with_only(load_detections(paths[0]).meta, only)


def _with_only(meta: dict[str, Any], only: Sequence[str]) -> dict[str, Any]:
    """The protocol of score rows restricted to ``only`` (``score.only``) says so."""
    return {**meta, "only": list(only)} if only else meta


def score_run(run_dir: str | Path | runs.Run, ious: Sequence[float], metric: str, only: Sequence[str] = ()
              ) -> pd.DataFrame:
    """Score every detections file of a run folder (CAM boxes and baselines) against its gt.pkl (``only``:
    just these classes, see :func:`score_detections`)."""
    run = run_dir if isinstance(run_dir, runs.Run) else runs.open_run(run_dir)
    gt = run.gt
    thresholds = run.thresholds
    if not thresholds:
        raise FileNotFoundError(f"{run.path}: no CAM detections files; run `gradloc boxes`")
    frames = []
    for tau in thresholds:
        dets = run.detections_at(tau)
        frames.append(_score_file(run.detections_path(tau), dets, gt, ious, metric, dets.meta.get("source", "cam"),
                                  only))
    for tau in run.random_thresholds:
        frames.append(_score_file(run.path, run.random_at(tau), gt, ious, metric, "random", only))
    for name, dets in run.baselines.items():
        for tau in thresholds:  # threshold-free boxes: repeat under every threshold so tables line up
            frames.append(_score_file(run.path, dataclasses.replace(dets, threshold=tau), gt, ious, metric, name,
                                      only))
    return pd.concat(frames, ignore_index=True)


def localization_scores(run_dir: str | Path | runs.Run, only: Sequence[str] = ()) -> pd.DataFrame:
    """WSOL metrics of a run (``only``: over just these classes), each row naming its protocol (column
    ``metric``):

    * ``corloc@0.5`` per threshold (the run's explained classes);
    * ``pointing@15px (gradloc, explained classes)`` and ``pointing@15px (TorchRay, GT classes)``
      (:func:`gradloc.metrics.pointing_game`; τ-free);
    * ``MaxBoxAccV2@δ`` and ``MaxBoxAccV2`` (wsolevaluation: GT-known, min-max maps, 0.01 τ grid chosen on this
      split, all boxes; :mod:`gradloc.wsol`), from ``gt_known.pkl``;
    * for runs that explain the GT classes, ``boxacc@δ, best of the run's τ``: the same idea restricted to
      the run's own τ list and box mode (not comparable with wsolevaluation's numbers).

    Rows: metric, threshold, class, value, n."""
    from gradloc.metrics import corloc, max_box_acc, pointing_game
    from gradloc.wsol import max_box_acc_from_hits

    run = run_dir if isinstance(run_dir, runs.Run) else runs.open_run(run_dir)
    gt, points, known = run.gt, run.points, run.gt_known
    if only:
        gt = keep_classes(run.gt, only)
        points, known = (None if record is None else _keep_pairs(record, run.gt.classes, only)
                         for record in (points, known))
    rows = []
    dets_by_tau = {}
    for tau in run.thresholds:
        dets = keep_classes(run.detections_at(tau), only) if only else run.detections_at(tau)
        dets_by_tau[dets.threshold] = dets
        frame = corloc(dets, gt, iou=0.5)
        rows += [{"metric": "corloc@0.5", "threshold": dets.threshold, "class": r["class"], "value": r["corloc"],
                  "n": r["n_images"]} for r in frame.to_dict("records")]
    pairs = [("gradloc, explained classes", points, "gradloc")]
    if known is not None:
        pairs.append(("TorchRay, GT classes", known, "torchray"))
    for label, points, protocol in pairs:
        frame = pointing_game(points["image_index"], points["labels"], points["points"], gt, tolerance=15.0,
                              protocol=protocol)
        rows += [{"metric": f"pointing@15px ({label})", "threshold": float("nan"), "class": r["class"],
                  "value": r["accuracy"], "n": r["n"]} for r in frame.to_dict("records")]
    if known is not None and len(known["hits"]):
        frame = max_box_acc_from_hits(known["hits"])
        rows += [{"metric": r["metric"].replace("MaxBoxAcc (all boxes)", "MaxBoxAccV2"),
                  "threshold": r["best_threshold"], "class": "all", "value": r["max_box_acc"], "n": r["n_pairs"]}
                 for r in frame.to_dict("records")]
    if dets_by_tau and next(iter(dets_by_tau.values())).meta.get("classes_explained") == "gt":
        frame = max_box_acc(dets_by_tau, gt, ious=(0.3, 0.5, 0.7))
        rows += [{"metric": f"boxacc@{r['iou']}, best of the run's tau", "threshold": r["best_threshold"],
                  "class": "all", "value": r["max_box_acc"], "n": r["n_pairs"]} for r in frame.to_dict("records")]
    return pd.DataFrame(rows)


def _keep_pairs(record: dict[str, Any], classes: Sequence[str], only: Sequence[str]) -> dict[str, Any]:
    """A points / gt_known record restricted to the (image, class) pairs of the classes ``only``, relabelled
    to their order in ``only``."""
    labels = class_relabel(classes, only)[record["labels"]]
    keep = labels >= 0
    return {**record, "labels": labels[keep],
            **{key: np.asarray(record[key])[keep] for key in ("image_index", "points", "hits") if key in record}}


def score_run_folder(run_dir: str | Path | runs.Run, ious: Sequence[float], metric: str, only: Sequence[str] = ()
                     ) -> tuple[pd.DataFrame, dict[str, Any], pd.DataFrame]:
    """Score a run folder without writing anything (``only``: just these classes, WSOL rows too).

    Returns:
        (score rows, the protocol of its CAM detections (with ``only``), WSOL rows).
    """
    run = run_dir if isinstance(run_dir, runs.Run) else runs.open_run(run_dir)
    rows = score_run(run, ious, metric, only)
    return rows, _with_only(run.detections_at(run.thresholds[0]).meta, only), localization_scores(run, only)


def save_run_scores(run_dir: str | Path, rows: pd.DataFrame, meta: dict[str, Any], wsol: pd.DataFrame
                    ) -> list[Path]:
    """Write scores.csv/json/md and localization.csv into a finished run folder (holding its lock); returns
    the written files."""
    with runs.locked(run_dir):
        return runs.write_scores(run_dir, rows, meta, wsol)


def record_rescoring(run_dir: str | Path, ious: Sequence[float], metric: str, files: Sequence[Path],
                     only: Sequence[str] = ()) -> bool:
    """After ``gradloc score RUN --save``: record in ``manifest.json``, under ``rescored_scores``, the score
    settings the saved files now hold (``config.score`` keeps what the run was made with).

    Returns:
        False when the folder has no manifest (made by ``gradloc boxes``), True when it was updated.
    """
    run_dir = Path(run_dir)
    return runs.update_manifest(run_dir, "rescored_scores", {
        "score": {"iou": [float(v) for v in ious], "metric": metric, **({"only": list(only)} if only else {})},
        "files": sorted(str(Path(f).relative_to(run_dir)) for f in files),
        "gradloc": __version__,
        "git_commit": runs.git_commit(),
    })


# --- the whole run ------------------------------------------------------------------------------------------

# ``stage(description, total)`` -> context manager yielding a progress callback (or None); the CLI's tqdm.
StageProgress = Callable[[str, int], AbstractContextManager[Callable[[int], None] | None]]


@dataclass
class RunResult:
    """What :func:`run` made: the run folder, score rows and protocol, WSOL rows, cache, dataset, times, and
    the images left out with ``data.on_error: skip`` ({image_id, file, reason})."""

    run_dir: Path
    rows: pd.DataFrame
    meta: dict[str, Any]
    localization: pd.DataFrame
    cache: HeatmapCache
    dataset: VOCDataset
    times: StageTimes
    skipped: list[dict[str, str]] = field(default_factory=list)


def run(config: RunConfig, original: RunConfig | None = None, stage: StageProgress | None = None) -> RunResult:
    """The whole pipeline for a prepared config (see :func:`prepare_demo`): cams -> boxes -> scores, plus
    config.yaml and manifest.json (``original`` = the config as given, recorded beside the resolved one).

    The run is staged and swapped in whole (:func:`gradloc.runs.new_run`): on any error or interruption the
    run folder keeps the previous results; finished heatmaps stay in the cache for the rerun."""

    def quiet(description: str, total: int) -> AbstractContextManager[None]:
        return nullcontext(None)

    stage = stage or quiet
    times = StageTimes()
    with runs.new_run(config.run_dir) as writer:
        plan = plan_cams(config)
        with times.stage("cams"), stage(plan.description, plan.n_images) as update:
            cache, dataset = plan.run(update)
        n_thresholds = len(config.boxes.thresholds)
        with times.stage("boxes"), stage(f"boxes {config.data.split} ({n_thresholds} τ)", len(dataset)) as update:
            run_boxes(config, cache, dataset, progress=update, writer=writer)
        writer.write_config(config.to_dict())
        with times.stage("score"):
            rows, meta, wsol = score_run_folder(writer.run, config.score.iou, config.score.metric, config.score.only)
            runs.write_scores(writer.run.path, rows, meta, wsol)
        writer.write_manifest(run_manifest(config, original or config, cache, times, dataset.skipped))
    return RunResult(config.run_dir, rows, meta, wsol, cache, dataset, times, list(dataset.skipped))


def run_manifest(config: RunConfig, original: RunConfig, cache: HeatmapCache | None, times: StageTimes,
                 skipped: Sequence[dict[str, str]] = ()) -> dict[str, Any]:
    """The ``manifest.json`` record of a run (see :func:`gradloc.runs.manifest_record`)."""
    return runs.manifest_record(config.run_dir, config.to_dict(), original.to_dict(),
                                config_hash(config.to_dict()),
                                cache.key if cache else None, str(cache.root) if cache else None,
                                times.seconds, skipped)
