"""Cross-validation inside the selection split: every choice is made on held-out images, never on the images a
head was fitted on, and never on the split that is reported.

The selection split (``train``) is cut into ``k`` folds stratified by class (:mod:`gradloc.run.folds`). For
fold ``f`` the classifier's trained head (``voc`` or ``voc+imagenet``) is fitted on the other folds
(:func:`fold_config`: a ``gradloc train`` of the config's ``train`` section on those images, cached under
``<cache_dir>/heads/``), the fold's images get CAMs with that head and are cut into boxes; the held-out
detections of all folds are then scored as one set (:func:`cross_validate`). A head with nothing to fit
(``imagenet``) is the same for every fold. The reported split is touched only after every choice is made,
with the head refitted on the whole selection split (:func:`refit_config`).

Variants (:func:`load_variants`, a YAML list of ``{name, what, overrides}`` with dotted config keys) are whole
alternatives -- head, regularisation, model, input size, box mode, confidence rule, ... -- each cross-validated
the same way; τ and the centre box's size are chosen inside each variant, on the same held-out detections.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from gradloc.boxes.baselines import center_box
from gradloc.core.formats import Detections, concat
from gradloc.core.geometry import Geometry
from gradloc.core.provenance import config_hash
from gradloc.models.checkpoints import load_checkpoint
from gradloc.models.zoo import get_spec
from gradloc.run.boxes import BoxesOutput, cut_boxes
from gradloc.run.cams import plan_cams
from gradloc.run.config import ConfigError, RunConfig, open_dataset, with_overrides
from gradloc.run.folds import stratified_folds
from gradloc.run.pipeline import StageProgress
from gradloc.run.train import TrainConfig, train_head
from gradloc.scoring.voc import score_detections

logger = logging.getLogger(__name__)

TRAINED_HEADS = ("voc", "voc+imagenet")
"""Heads with weights fitted on the selection split (refitted per fold); ``imagenet`` has none."""

CENTER_SIZES = (*(round(float(s), 2) for s in np.arange(0.30, 0.96, 0.05)), 1.0)
"""The centre box sizes tried (fractions of width and height); 1.0 is the full image."""


@dataclass(frozen=True)
class Variant:
    """One alternative of an ablation: a name, one line on what changed, and config overrides (dotted keys)."""

    name: str
    what: str = ""
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)

    def apply(self, config: RunConfig) -> RunConfig:
        """``config`` with the overrides (validated like a loaded config)."""
        return with_overrides(config, self.overrides)


def load_variants(path: str | Path) -> list[Variant]:
    """The variants of a YAML file: a list of ``{name: str, what: str, overrides: {dotted.key: value}}``.

    Raises:
        FileNotFoundError: no such file. ConfigError: not such a list, duplicate names.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: variants file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{path}: expected a non-empty list of {{name, what, overrides}}")
    variants = []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or set(item) - {"name", "what",
                                                                                                 "overrides"}:
            raise ConfigError(f"{path}: item {i} must be a mapping with a string 'name' and optional 'what', "
                              "'overrides'")
        overrides = item.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise ConfigError(f"{path}: item {i} ({item['name']}): 'overrides' must map dotted config keys to values")
        variants.append(Variant(item["name"], str(item.get("what", "")), dict(overrides)))
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: variant names must be unique ({', '.join(names)})")
    return variants


def _head_checkpoint(config: RunConfig, split: str, ids: Sequence[str] | None) -> Path:
    """The checkpoint of the config's trained head fitted on ``ids`` of ``split`` (all of it when None),
    trained now unless an earlier run left it (named by a hash of everything the training depends on)."""
    job = TrainConfig.from_run(config, out="", split=split, val_split=None,
                               ids=tuple(ids) if ids is not None else None)
    key = config_hash({**dataclasses.asdict(job), "out": None, "voc_root": str(Path(job.voc_root).resolve())})
    path = Path(config.cache_dir) / "heads" / f"{config.model.name}-{split}-{key}.pt"
    try:
        load_checkpoint(path)
        logger.info("reusing head %s", path)
    except (FileNotFoundError, ValueError):
        logger.info("training the %s head on %d images of %s", config.model.head,
                    len(ids) if ids is not None else -1, split)
        train_head(dataclasses.replace(job, out=path))
    return path


def refits(config: RunConfig) -> bool:
    """Whether the config's head is refitted per fold: a trained head (:data:`TRAINED_HEADS`) on a backbone
    with ImageNet weights. A network trained whole (the demo CNN) keeps its checkpoint: choose on a split it
    was not trained on."""
    return config.model.head in TRAINED_HEADS and get_spec(config.model.name).resolve_weights is not None


def fold_config(config: RunConfig, split: str, ids: Sequence[str] | None) -> RunConfig:
    """``config`` with its trained head fitted on ``ids`` of ``split`` (None: all of it); unchanged when the
    head is not refitted (:func:`refits`)."""
    if not refits(config):
        return config
    checkpoint = _head_checkpoint(config, split, ids)
    return dataclasses.replace(config, model=dataclasses.replace(config.model, checkpoint=str(checkpoint)))


refit_config = fold_config  # the reported split's head: fitted on the whole selection split (ids None)


@dataclass
class CrossValidation:
    """Held-out scores of one config (:func:`cross_validate`).

    Attributes:
        rows: flat score rows (``gradloc.scoring.voc.score_detections`` schema) of the held-out detections of
            all folds scored as one set: CAM and map baselines at every τ, box baselines repeated per τ.
        center: rows ``size, iou, ap`` of the centre box at each size of :data:`CENTER_SIZES`.
        folds: int64[N] fold of each image of the split (in split order); image_ids: the split's ids.
    """

    rows: pd.DataFrame
    center: pd.DataFrame
    folds: np.ndarray
    image_ids: list[str]


def _center_detections(output: BoxesOutput, size: float) -> Detections:
    """The centre box of ``size`` for every explained (image, class) of a boxes output, scored by probability."""
    points, gt = output.points, output.gt
    sizes = gt.image_sizes[points["image_index"]]
    boxes = np.array([center_box(Geometry(w, h, w, h, w, h, 0, 0), size) for w, h in sizes.tolist()]).reshape(-1, 4)
    return Detections(threshold=0.0, threshold_mode="none", box_mode="center", classes=list(gt.classes),
                      image_ids=list(gt.image_ids), image_index=points["image_index"], labels=points["labels"],
                      scores=points["scores"], boxes=boxes, meta={"source": "center", "center_size": size})


def cross_validate(config: RunConfig, split: str, k: int = 5, seed: int = 0, stage: StageProgress | None = None
                   ) -> CrossValidation:
    """Score ``config`` on held-out folds of ``split`` (module docstring).

    Args:
        config: a prepared run config (its ``data.split`` is replaced by ``split``).
        split: the selection split. k: folds. seed: of the fold assignment.
        stage: optional progress factory ``(description, total) -> context manager yielding update(n)``.

    Raises:
        ValueError: bad ``k``, pipeline errors.
    """
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, split=split))
    dataset = open_dataset(config)
    folds = stratified_folds(dataset.image_labels(), k, seed)
    ids = np.array(dataset.image_ids)
    outputs = []
    if not refits(config):  # one head for every fold: its maps are those of the whole split's batches
        _compute(plan_cams(config, dataset=dataset), stage, "cv (one head for every fold)")
    for f in range(k):
        fold = fold_config(config, split, ids[folds != f].tolist())
        cache, held = _compute(plan_cams(fold, dataset=dataset.subset(ids[folds == f].tolist())), stage,
                               f"cv fold {f + 1}/{k}")
        outputs.append(cut_boxes(fold, cache, held))
    gt = concat([o.gt for o in outputs])
    ious, metric = config.score.iou, config.score.metric
    frames = [score_detections(concat([o.cam[t] for o in outputs]), gt, ious, metric, "cam")
              for t in range(len(config.boxes.thresholds))]
    for name in outputs[0].map_baselines:
        frames += [score_detections(concat([o.map_baselines[name][t] for o in outputs]), gt, ious, metric, name)
                   for t in range(len(config.boxes.thresholds))]
    for name in outputs[0].box_baselines:
        dets = concat([o.box_baselines[name] for o in outputs])
        frames += [score_detections(dataclasses.replace(dets, threshold=tau), gt, ious, metric, name)
                   for tau in config.boxes.thresholds]
    center = []
    for size in CENTER_SIZES:
        dets = concat([_center_detections(o, size) for o in outputs])
        frame = score_detections(dets, gt, ious, metric, "center")
        center += [{"size": size, "iou": r.iou, "ap": r.ap} for r in frame[frame["class"] == "mAP"].itertuples()]
    return CrossValidation(pd.concat(frames, ignore_index=True), pd.DataFrame(center), folds,
                           list(dataset.image_ids))


def _compute(plan: Any, stage: StageProgress | None, what: str) -> tuple[Any, Any]:
    """Run a planned cams stage, with a progress bar named ``what`` when ``stage`` is given."""
    if stage is None:
        return plan.run()
    with stage(f"{what}: {plan.description}", plan.n_images) as update:
        return plan.run(update)


def best_center_size(center: pd.DataFrame, iou: float) -> tuple[float, float]:
    """The centre size with the best held-out mAP at ``iou`` (ties: the smallest) and that mAP."""
    part = center[np.isclose(center["iou"], iou)].sort_values("size", kind="stable")
    best = part.loc[part["ap"].idxmax()]
    return float(best["size"]), float(best["ap"])
