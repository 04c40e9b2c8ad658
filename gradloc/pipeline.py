"""The pipeline stages, each runnable alone and chained by :func:`run`.

``cams``  : VOC split + classifier + CAM method -> heatmap cache (raw maps of all classes, per image)
``boxes`` : heatmap cache -> ``gt.pkl``, ``detections/thr_<τ>.pkl``, baselines, ``points.pkl``
``score`` : pickles -> flat score rows (pandas) -> tables and files (see gradloc.report)

Stages report progress through an optional ``progress(n_done_increment)`` callback (the CLI wraps tqdm
around it); the library itself never prints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import platform
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gradloc import __version__
from gradloc.boxes import BASELINES, image_boxes, peak_points, random_maps
from gradloc.cache import HeatmapCache
from gradloc.config import RunConfig, config_hash
from gradloc.detections import (
    Detections,
    GroundTruth,
    atomic_write_bytes,
    load_detections,
    load_ground_truth,
    safe_load_pickle,
    save_pickle,
    threshold_filename,
)
from gradloc.voc import VOCDataset

logger = logging.getLogger(__name__)

Progress = Callable[[int], None] | None

POINTS_FORMAT = "gradloc.points/1"


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


def git_commit() -> str | None:
    """``git rev-parse HEAD`` of the source tree holding gradloc, or None (not a checkout, no git)."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and len(commit) == 40 else None


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "gradloc": __version__}
    for name in ("torch", "torchvision", "numpy", "scikit-image", "pandas", "numba"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


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
    """Fail before any work on a name no registry knows: CAM method, box settings, model.

    Raises:
        ValueError: naming the key and the valid choices.
    """
    from gradloc.cams import METHODS
    from gradloc.models import get_spec

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
    if not config.demo.enabled:
        get_spec(config.model.name)


def class_probabilities(scores: np.ndarray, score_kind: str) -> np.ndarray:
    """float64[C] class probabilities of cached model outputs (the CAM targets): ``sigmoid`` of logits or
    ``exp`` of log-probabilities (``gradloc.models.SCORE_KINDS``). They are the detection confidences and
    what the ``predicted`` cut compares with."""
    import torch

    from gradloc.models import SCORE_KINDS

    return SCORE_KINDS[score_kind](torch.from_numpy(np.asarray(scores, dtype=np.float64))).numpy()


def read_manifest(run_dir: str | Path, hint: str = "") -> dict[str, Any]:
    """The ``manifest.json`` of a run folder, checked; ``hint`` is appended to the missing-manifest error.

    Raises:
        FileNotFoundError: no such folder or no manifest. ValueError: not JSON or no ``config`` mapping.
    """
    run_dir = Path(run_dir)
    path = run_dir / "manifest.json"
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: run folder not found; give a folder made by `gradloc run`")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; is {run_dir} a folder made by `gradloc run`?{hint}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("config"), dict):
        raise ValueError(f"{path}: has no 'config' mapping; rerun `gradloc run` to rewrite it")
    return manifest


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
    """The cache folder for this (model, method, layer, preprocessing, dataset) -- named by their hash."""
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
        **({"flip": True} if config.cams.flip else {}),  # absent when off: caches made before the option stay valid
        "dataset": {"root": str(Path(dataset.root).resolve()), "year": dataset.year, "split": dataset.split,
                    "classes": list(dataset.classes)},
        "gradloc": __version__,
    }
    return HeatmapCache(config.cache_dir, key)


def run_cams(config: RunConfig, progress: Progress = None, *, dataset: VOCDataset | None = None,
             loaded: Any = None) -> tuple[HeatmapCache, VOCDataset]:
    """Compute raw CAM maps of all classes for every image of the split that is not cached yet.

    ``dataset`` and ``loaded`` (the classifier) are opened from the config unless given."""
    import torch

    from gradloc.cams import compute_cams

    check_names(config)
    dataset = dataset or open_dataset(config)
    loaded = loaded or load_classifier(config)
    cache = cams_cache(config, loaded, dataset)
    todo = cache.missing(dataset.image_ids)
    logger.info("cams: %d of %d images to compute into %s", len(todo), len(dataset), cache.root)
    pre = loaded.preprocessing
    device = torch.device(config.cams.device)
    model = loaded.model.to(device)
    all_classes = list(range(len(loaded.classes)))
    sizes = [(dataset.annotation(image_id).width, dataset.annotation(image_id).height) for image_id in todo]
    for rows in pre.batches(sizes, config.cams.batch_size):
        batch = [todo[row] for row in rows]
        inputs, geometries = pre.batch([dataset.load_image(image_id) for image_id in batch])
        inputs = inputs.to(device)
        maps, scores = compute_cams(model, inputs, all_classes, method=config.cams.method,
                                    layer=cache.key_data["layer"], flip=config.cams.flip)
        maps_np, scores_np = maps.cpu().numpy(), scores.detach().cpu().numpy()
        for i, image_id in enumerate(batch):
            cache.put(image_id, maps_np[i], scores_np[i], geometries[i], config.cams.store_dtype)
        if progress:
            progress(len(batch))
    return cache, dataset


# --- stage 2: boxes -----------------------------------------------------------------------------------------


class _Rows:
    """Growing per-row arrays of one output file: image index, label, score and a float64[n, width] value
    (a box, width 4, or a point, width 2)."""

    def __init__(self, width: int = 4) -> None:
        self.width = width
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, image: int, labels: np.ndarray, scores: np.ndarray, values: np.ndarray) -> None:
        if len(labels):
            self.parts.append((np.full(len(labels), image, np.int64), np.asarray(labels, np.int64),
                               np.asarray(scores, np.float64),
                               np.asarray(values, np.float64).reshape(-1, self.width)))

    def arrays(self, value_name: str = "boxes") -> dict[str, np.ndarray]:
        names = ("image_index", "labels", "scores", value_name)
        if not self.parts:
            empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros((0, self.width)))
            return dict(zip(names, empty, strict=True))
        return {name: np.concatenate(column) for name, column in zip(names, zip(*self.parts, strict=True),
                                                                      strict=True)}


def explained_classes(config: RunConfig, probabilities: np.ndarray, gt_labels: np.ndarray) -> np.ndarray:
    """Which classes of an image get boxes: ``predicted`` (probability >= score_cut) or ``gt`` (GT-known:
    every class with a GT box in the image, difficult included). Returns sorted class indices."""
    if config.boxes.classes == "gt":
        return np.unique(gt_labels).astype(np.int64)
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
        "classes_explained": "gt" if b.classes == "gt" else f"predicted (p >= {b.score_cut})",
        "threshold_mode": b.threshold_mode,
        "box_mode": b.box_mode,
        "connectivity": b.connectivity,
        "min_area": b.min_area,
        "confidence": b.confidence,
        "nms_iou": b.nms_iou,
        "max_side": b.max_side,
        "cache_key": cache.key,
    }


def run_boxes(config: RunConfig, cache: HeatmapCache, dataset: VOCDataset, progress: Progress = None) -> Path:
    """Cut boxes from the cached maps at every threshold; write gt.pkl, detections, baselines, points."""
    run_dir = config.run_dir
    gt = dataset.ground_truth()
    save_pickle(gt, run_dir / "gt.pkl")
    params = config.boxes
    thresholds = list(config.boxes.thresholds)
    score_kind = cache.key_data["score_kind"]
    check_names(config)
    cam_rows = [_Rows() for _ in thresholds]
    random_rows = [_Rows() for _ in thresholds]
    fixed_rows = {name: _Rows() for name in config.boxes.baselines if name in BASELINES}
    points = _Rows(width=2)
    order = np.argsort(gt.image_index, kind="stable")
    bounds = np.searchsorted(gt.image_index[order], np.arange(len(gt.image_ids) + 1))
    rng = np.random.default_rng(config.seed)
    for index, image_id in enumerate(dataset.image_ids):
        entry = cache.get(image_id)
        probs = class_probabilities(entry.scores, score_kind)
        classes = explained_classes(config, probs, gt.labels[order[bounds[index] : bounds[index + 1]]])
        maps = entry.maps[classes]
        if len(classes):
            for rows, (k, conf, boxes) in zip(cam_rows, image_boxes(maps, probs[classes], entry.geometry,
                                                                    thresholds, params), strict=True):
                rows.add(index, classes[k], conf, boxes)
            if "random" in config.boxes.baselines:
                noise = random_maps(maps.shape, int(rng.integers(2**31)))
                for rows, (k, conf, boxes) in zip(random_rows, image_boxes(
                        noise, probs[classes], entry.geometry, thresholds, params), strict=True):
                    rows.add(index, classes[k], conf, boxes)
            for name, rows in fixed_rows.items():
                box = BASELINES[name](entry.geometry)
                rows.add(index, classes, probs[classes], np.repeat(box[None], len(classes), axis=0))
            points.add(index, classes, probs[classes], peak_points(maps, entry.geometry))
        if progress:
            progress(1)

    protocol = run_protocol(config, cache)
    common = {"classes": list(gt.classes), "image_ids": list(gt.image_ids)}

    def write(rows: _Rows, path: Path, threshold: float, threshold_mode: str, box_mode: str,
              meta: dict[str, Any]) -> None:
        save_pickle(Detections(threshold=threshold, threshold_mode=threshold_mode, box_mode=box_mode,
                               meta=meta, **common, **rows.arrays()), path)

    for tau, rows, noise_rows in zip(thresholds, cam_rows, random_rows, strict=True):
        write(rows, run_dir / "detections" / threshold_filename(tau), tau, params.threshold_mode,
              params.box_mode, {**protocol, "source": "cam"})
        if "random" in config.boxes.baselines:
            write(noise_rows, run_dir / "baselines" / "random" / threshold_filename(tau), tau,
                  params.threshold_mode, params.box_mode, {**protocol, "source": "random"})
    for name, rows in fixed_rows.items():
        write(rows, run_dir / "baselines" / f"{name}.pkl", 0.0, "none", name, {**protocol, "source": name})
    record = {"format": POINTS_FORMAT, **common, **points.arrays("points"), "meta": protocol}
    atomic_write_bytes(run_dir / "points.pkl", pickle.dumps(record, protocol=4))
    return run_dir


# --- stage 3: scores ----------------------------------------------------------------------------------------


def score_detections(dets: Detections, gt: GroundTruth, ious: Sequence[float], metric: str,
                     source: str) -> pd.DataFrame:
    """Flat score rows (JSON schema of the README) of one detections file."""
    from gradloc.metrics import evaluate

    frame = evaluate(dets, gt, iou_thresholds=ious, metric=metric)
    frame.insert(0, "threshold_mode", dets.threshold_mode)
    frame.insert(0, "threshold", dets.threshold)
    frame["source"] = source
    frame["box_mode"] = dets.box_mode
    return frame


def score_run(run_dir: str | Path, ious: Sequence[float], metric: str) -> pd.DataFrame:
    """Score every detections file of a run folder (CAM boxes and baselines) against its gt.pkl."""
    run_dir = Path(run_dir)
    gt_path = run_dir / "gt.pkl"
    if not gt_path.is_file():
        raise FileNotFoundError(f"{gt_path}: no ground truth; is {run_dir} a gradloc run folder "
                                "(made by `gradloc run` or `gradloc boxes`)?")
    gt = load_ground_truth(gt_path)
    cam_files = sorted((run_dir / "detections").glob("thr_*.pkl"))
    if not cam_files:
        raise FileNotFoundError(f"{run_dir / 'detections'}: no thr_*.pkl detection files; run `gradloc boxes`")
    frames = []
    thresholds = []
    for path in cam_files:
        dets = load_detections(path)
        thresholds.append(dets.threshold)
        frames.append(score_detections(dets, gt, ious, metric, dets.meta.get("source", "cam")))
    for path in sorted((run_dir / "baselines" / "random").glob("thr_*.pkl")):
        frames.append(score_detections(load_detections(path), gt, ious, metric, "random"))
    for path in sorted((run_dir / "baselines").glob("*.pkl")):
        dets = load_detections(path)
        for tau in thresholds:  # threshold-free boxes: repeat under every threshold so tables line up
            frames.append(score_detections(dataclasses.replace(dets, threshold=tau), gt, ious, metric, path.stem))
    return pd.concat(frames, ignore_index=True)


def load_points(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "points.pkl"
    data = safe_load_pickle(path)
    if not isinstance(data, dict) or data.get("format") != POINTS_FORMAT:
        raise ValueError(f"{path}: not a {POINTS_FORMAT} file")
    return data


def localization_scores(run_dir: str | Path) -> pd.DataFrame:
    """WSOL metrics of a run: CorLoc per threshold (IoU 0.5), pointing game (15 px), and MaxBoxAcc when the
    classes explained are the GT classes (GT-known protocol). Rows: metric, threshold, class, value, n."""
    from gradloc.metrics import corloc, max_box_acc, pointing_game

    run_dir = Path(run_dir)
    gt = load_ground_truth(run_dir / "gt.pkl")
    rows = []
    dets_by_tau = {}
    for path in sorted((run_dir / "detections").glob("thr_*.pkl")):
        dets = load_detections(path)
        dets_by_tau[dets.threshold] = dets
        frame = corloc(dets, gt, iou=0.5)
        rows += [{"metric": "corloc@0.5", "threshold": dets.threshold, "class": r["class"], "value": r["corloc"],
                  "n": r["n_images"]} for r in frame.to_dict("records")]
    points = load_points(run_dir)
    frame = pointing_game(points["image_index"], points["labels"], points["points"], gt, tolerance=15.0)
    rows += [{"metric": "pointing@15px", "threshold": float("nan"), "class": r["class"], "value": r["accuracy"],
              "n": r["n"]} for r in frame.to_dict("records")]
    if dets_by_tau and next(iter(dets_by_tau.values())).meta.get("classes_explained") == "gt":
        frame = max_box_acc(dets_by_tau, gt, ious=(0.3, 0.5, 0.7))
        rows += [{"metric": f"maxboxacc@{r['iou']} (oracle tau)", "threshold": r["best_threshold"],
                  "class": "all", "value": r["max_box_acc"], "n": r["n_pairs"]} for r in frame.to_dict("records")]
    return pd.DataFrame(rows)


def score_and_save(run_dir: str | Path, ious: Sequence[float], metric: str
                   ) -> tuple[pd.DataFrame, dict[str, Any], pd.DataFrame]:
    """Score a run folder and save scores.csv/json/md and localization.csv in it.

    Returns:
        (score rows, the protocol of its CAM detections, WSOL rows).
    """
    from gradloc.report import save_scores

    run_dir = Path(run_dir)
    rows = score_run(run_dir, ious, metric)
    meta = load_detections(sorted((run_dir / "detections").glob("thr_*.pkl"))[0]).meta
    save_scores(rows, run_dir, meta)
    wsol = localization_scores(run_dir)
    atomic_write_bytes(run_dir / "localization.csv", wsol.to_csv(index=False).encode())
    return rows, meta, wsol


# --- the whole run ------------------------------------------------------------------------------------------

# ``stage(description, total)`` -> context manager yielding a progress callback (or None); the CLI's tqdm.
StageProgress = Callable[[str, int], AbstractContextManager[Callable[[int], None] | None]]


@dataclass
class RunResult:
    """What :func:`run` made: the run folder, score rows and protocol, WSOL rows, cache, dataset, times."""

    run_dir: Path
    rows: pd.DataFrame
    meta: dict[str, Any]
    localization: pd.DataFrame
    cache: HeatmapCache
    dataset: VOCDataset
    times: StageTimes


def run(config: RunConfig, original: RunConfig | None = None, stage: StageProgress | None = None) -> RunResult:
    """The whole pipeline for a prepared config (see :func:`prepare_demo`): cams -> boxes -> scores, plus
    config.yaml and manifest.json (``original`` = the config as given, recorded beside the resolved one)."""

    def quiet(description: str, total: int) -> AbstractContextManager[None]:
        return nullcontext(None)

    stage = stage or quiet
    times = StageTimes()
    dataset = open_dataset(config)
    loaded = load_classifier(config)
    todo = len(cams_cache(config, loaded, dataset).missing(dataset.image_ids))
    with times.stage("cams"), stage(f"cams {config.data.split} ({config.cams.method})", todo) as update:
        cache, dataset = run_cams(config, progress=update, dataset=dataset, loaded=loaded)
    n_thresholds = len(config.boxes.thresholds)
    with times.stage("boxes"), stage(f"boxes {config.data.split} ({n_thresholds} τ)", len(dataset)) as update:
        run_dir = run_boxes(config, cache, dataset, progress=update)
    write_resolved_config(config)
    with times.stage("score"):
        rows, meta, wsol = score_and_save(run_dir, config.score.iou, config.score.metric)
    write_manifest(config, original or config, cache, times, dataset.skipped)
    return RunResult(run_dir, rows, meta, wsol, cache, dataset, times)


def write_resolved_config(config: RunConfig) -> None:
    """``config.yaml`` in the run folder: the config after flags and demo preparation."""
    import yaml

    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    atomic_write_bytes(config.run_dir / "config.yaml", text.encode())



def write_manifest(config: RunConfig, original: RunConfig, cache: HeatmapCache | None,
                   times: StageTimes, skipped: Sequence[tuple[str, str]] = ()) -> None:
    """``manifest.json``: what the run was (configs, hash, cache, versions, commit), how long each stage
    took, and the items skipped with ``data.on_error: skip`` (with the reason)."""
    manifest = {
        "config": config.to_dict(),
        "config_as_given": original.to_dict(),
        "config_hash": config_hash(config.to_dict()),
        "cache_key": cache.key if cache else None,
        "cache_dir": str(cache.root) if cache else None,
        "versions": package_versions(),
        "git_commit": git_commit(),
        "seconds_per_stage": {k: round(v, 2) for k, v in times.seconds.items()},
        "skipped": [{"item": item, "reason": reason} for item, reason in skipped],
    }
    atomic_write_bytes(config.run_dir / "manifest.json", json.dumps(manifest, indent=2, default=str).encode())
