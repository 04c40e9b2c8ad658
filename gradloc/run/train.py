"""Training of the multi-label ``voc`` head on a VOC split (``gradloc train``).

Two modes (:data:`TRAIN_MODES`):

* ``linear`` -- a linear probe: the ImageNet backbone is frozen, the pooled features (the input of the
  network's final linear layer, eval mode) are computed once per image, and a new
  ``Linear(n_features, n_classes)`` replacing that layer is trained on them. Fast: one forward pass per
  image, then seconds of training.
* ``finetune_last`` -- linear probe first, then the head *and* the network's last stage
  (``ModelSpec.last_stage``, e.g. ResNet ``layer4``) are trained together on the images, with random
  horizontal flips (LP-FT: Kumar et al., "Fine-Tuning can Distort Pretrained Features and Underperform
  Out-of-Distribution", ICLR 2022). Batch-norm statistics stay frozen (eval mode throughout).

* ``lbfgs`` -- multi-label logistic regression on the same frozen pooled features, fitted full-batch by
  ``torch.optim.LBFGS`` (strong-Wolfe line search, ``epochs`` = iterations, default 200) to the balanced loss
  below plus ``l2 * ||W||_F^2`` on the head's weights (bias not penalised; default ``l2`` 1e-4). Convex, so
  the result does not depend on batching or shuffling.

Loss: class-balanced binary cross-entropy on logits ``z``,

    L = sum_{n,c} m_nc [ -w_c y_nc log sigmoid(z_nc) - (1 - y_nc) log(1 - sigmoid(z_nc)) ] / sum_{n,c} m_nc,

with ``y = 1`` for images holding a non-difficult instance of class ``c``, ``w_c = n_neg / n_pos`` (1 when
the class has no positive), and mask ``m = 0`` where the class is present only as difficult (devkit label
0), 1 elsewhere. AdamW, the head initialized to zero, mini-batches shuffled by a seeded generator: the
result is deterministic given the seed (on one device and thread count). The linear defaults (100 epochs,
lr 1e-3, batches of 64) were chosen by 4-fold cross-validation on VOC2007 ``train`` alone (EfficientNet-Lite0
features; 10 / 30 / 100 / 300 epochs: mAP 0.633 / 0.646 / 0.649 / 0.645), never on the held-out split.

The report gives the VOC07 11-point classification AP of every class on the held-out split (image labels,
difficult-only images ignored) and their mean over classes with at least one positive image.

Images go through the cams stage's fast path: the streaming loader (:func:`gradloc.cams.loader.stream_batches`,
``workers`` decode processes, batches planned as :func:`gradloc.cams.loader.plan_batches` plans them with
``feature_batch_size`` images), the model family's memory format (:mod:`gradloc.models.execution`), float32.
With ``cache_dir`` the pooled features are read from and written to the features cache
(:mod:`gradloc.cams.features`), which the cams stage also fills: an image whose features exist (same backbone
weights, preprocessing, execution, image bytes and batch-mates) is not run through the network again, and the
head is the same file either way.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gradloc.cams.features import FeatureCache, features_key
from gradloc.cams.hooks import ModuleInput
from gradloc.cams.loader import default_workers, plan_batches, stream_batches
from gradloc.core.provenance import git_commit
from gradloc.datasets.voc import VOC_CLASSES, VOCDataset, file_fingerprint
from gradloc.models.build import FROZEN_BACKBONE_MODES
from gradloc.models.checkpoints import backbone_digest, save_checkpoint
from gradloc.models.execution import Execution, keep_freed_memory, resolve_execution
from gradloc.models.heads import ImageNetClassifier, VocImageNetHead
from gradloc.models.imagenet_voc import IMAGENET_VOC_GROUPS, imagenet_groups
from gradloc.models.preprocessing import Preprocessing
from gradloc.models.spec import ModelSpec
from gradloc.models.zoo import build_pretrained, get_spec, replace_linear
from gradloc.run.config import RunConfig
from gradloc.scoring.classification import classification_map

logger = logging.getLogger(__name__)


Progress = Callable[[int, int, float], None] | None  # (steps done, steps in total, current loss)


METRIC = "VOC07 11-point classification AP on image labels (difficult-only images ignored); mAP over " \
         "classes with a positive image"


@dataclass(frozen=True)
class _Mode:
    """A training mode: its function and its default epochs / learning rate."""

    train: Callable[..., float]
    epochs: int
    lr: float


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """What ``gradloc train`` trains.

    Attributes:
        voc_root: VOCdevkit folder. year: ``VOC<year>`` folder name suffix.
        split: training image set. val_split: held-out image set for the report (None: no evaluation).
        classes: class names of the head.
        model: registry name (:data:`gradloc.models.zoo.MODELS`); weights: its ImageNet weights name (None:
            default).
        mode: ``linear``, ``finetune_last`` or ``lbfgs`` (module docstring).
        epochs, lr: None means the mode's default (linear: 100 epochs, lr 1e-3; finetune_last: 5 epochs of
            fine-tuning at lr 1e-4 after the linear probe's defaults; lbfgs: 200 iterations, step 1).
        batch_size, weight_decay: AdamW settings (batch_size also batches ``finetune_last``'s images).
        l2: L2 penalty on the weights of the ``lbfgs`` head.
        seed: shuffling / augmentation seed.
        input_size: network input side (None: the weights'); resize_mode: ``letterbox``, ``stretch`` or
            ``shortside`` (None: the weights', letterbox).
        limit: use only the first ``limit`` images of each split (quick runs and tests).
        ids: train only on these image ids of ``split`` (the other folds of a cross-validation); None: all.
        device: torch device for feature extraction and training.
        out: checkpoint file to write.
        cache_dir: folder of the features cache shared with the cams stage (None: no cache).
        feature_batch_size: images per planned batch of the feature pass (the cams stage's ``batch_size``, so
            that the two stages compute an image with the same batch-mates).
        workers: decode processes (None: :func:`gradloc.cams.loader.default_workers`).
        channels_last: memory format of the network (None: the model family's registry fact).
    """

    voc_root: str | Path
    out: str | Path
    year: str = "2007"
    split: str = "train"
    val_split: str | None = "val"
    classes: tuple[str, ...] = VOC_CLASSES
    model: str = "efficientnet_lite0"
    weights: str | None = None
    mode: str = "linear"
    epochs: int | None = None
    batch_size: int = 64
    lr: float | None = None
    weight_decay: float = 1e-4
    l2: float = 1e-4
    seed: int = 0
    input_size: int | None = None
    resize_mode: str | None = None
    limit: int | None = None
    ids: tuple[str, ...] | None = None
    device: str = "cpu"
    cache_dir: str | Path | None = None
    feature_batch_size: int = 16
    workers: int | None = None
    channels_last: bool | None = None

    def __post_init__(self) -> None:
        if self.mode not in TRAIN_MODES:
            raise ValueError(f"training mode {self.mode!r}; choose one of {', '.join(TRAIN_MODES)}")
        for name, value in (("epochs", self.epochs), ("batch_size", self.batch_size), ("limit", self.limit),
                            ("feature_batch_size", self.feature_batch_size)):
            if value is not None and value < 1:
                raise ValueError(f"{name}={value}; pass a positive whole number")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr={self.lr}; pass a positive learning rate")
        for name, value in (("weight_decay", self.weight_decay), ("l2", self.l2)):
            if not value >= 0:
                raise ValueError(f"{name}={value}; pass a number >= 0")
        if self.val_split is not None and self.val_split == self.split:
            raise ValueError(f"val_split={self.val_split!r} is the training split; hold out another "
                             "image set")

    @classmethod
    def from_run(cls, config: RunConfig, out: str | Path, **overrides: Any) -> TrainConfig:
        """The training job of a run config: its ``train`` section, with the data, model, input size, resize
        mode, device, cache folder, batch size, workers and memory format of the run (the head then fits the
        run's preprocessing, and the features its cams stage cached are reused); ``overrides`` win."""
        section = dataclasses.asdict(config.train)
        data, model, cams = config.data, config.model, config.cams
        values = {**section, "voc_root": data.voc_root, "year": data.year, "classes": data.classes,
                  "model": model.name, "weights": model.weights, "input_size": model.input_size,
                  "resize_mode": model.resize_mode, "device": cams.device, "out": out,
                  "cache_dir": config.cache_dir, "feature_batch_size": cams.batch_size, "workers": cams.workers,
                  "channels_last": cams.channels_last, **overrides}
        return cls(**values)


def _image_batches(job: _Job, rows: Sequence[int]) -> Iterator[tuple[np.ndarray, Tensor]]:
    """Images of ``job.train`` at ``rows`` in batches of one input shape (``Preprocessing.batches``; in the
    order of ``rows`` for the square resize modes), through the streaming loader: (int64[b] rows,
    float32[b, 3, H, W] on the job's device and memory format)."""
    dataset, rows = job.train, np.asarray(rows, dtype=np.int64)
    annotations = [dataset.annotation(dataset.image_ids[row]) for row in rows]
    shapes = job.preprocessing.batches([(a.width, a.height) for a in annotations], job.cfg.batch_size)
    plan = [[dataset.image_ids[row] for row in rows[indices]] for indices in shapes]
    index = {image_id: row for row, image_id in enumerate(dataset.image_ids)}
    for batch in stream_batches(dataset, job.preprocessing, plan, job.workers,
                                channels_last=job.execution.channels_last):
        for _, error in batch.errors:
            raise error
        yield np.array([index[i] for i in batch.image_ids], dtype=np.int64), job.execution.inputs(batch.inputs)


@dataclass
class _FeaturePass:
    """How pooled features are extracted: the network (architecture ``arch``) and the name of its final linear
    layer, the preprocessing, the execution, the planned batch size, the decode workers and the folder of the
    features cache (None: no cache)."""

    model: nn.Module
    arch: str
    classifier: str
    preprocessing: Preprocessing
    execution: Execution
    batch_size: int
    workers: int
    cache_dir: str | Path | None

    def cache(self) -> FeatureCache | None:
        """The features cache of the network's current weights (None without ``cache_dir``)."""
        if self.cache_dir is None:
            return None
        key = features_key(self.arch, backbone_digest(self.model, self.classifier), self.preprocessing.to_dict(),
                           self.execution.key())
        return FeatureCache(self.cache_dir, key)

    def n_batches(self, dataset: VOCDataset) -> int:
        return len(plan_batches(dataset, self.preprocessing, self.batch_size))

    def __call__(self, dataset: VOCDataset, step: Callable[[], None] | None = None) -> tuple[Tensor, int]:
        """Inputs of the final linear layer for every image of ``dataset`` (eval mode, no gradients): from the
        cache where valid, else computed in whole planned batches (and cached).

        Returns:
            (float32[n_images, n_features] on the CPU, number of images read from the cache).
        """
        module, cache = self.model.get_submodule(self.classifier), self.cache()
        if cache is not None:
            cache.clean()
        n_features = module.in_features
        features = torch.empty(len(dataset), n_features)
        row_of = {image_id: row for row, image_id in enumerate(dataset.image_ids)}
        todo, cached = [], 0
        for batch in plan_batches(dataset, self.preprocessing, self.batch_size):
            found = [cache.get(i, file_fingerprint(dataset.image_path(i)), n_features, batch)
                     if cache is not None else None for i in batch]
            if any(value is None for value in found):
                todo.append(batch)
                continue
            for image_id, value in zip(batch, found, strict=True):
                features[row_of[image_id]] = torch.from_numpy(value)
            cached += len(batch)
            if step is not None:
                step()
        was_training = self.model.training
        self.model.eval()
        try:
            with ModuleInput(module) as record, torch.no_grad():
                for batch in stream_batches(dataset, self.preprocessing, todo, self.workers,
                                            channels_last=self.execution.channels_last):
                    for _, error in batch.errors:
                        raise error
                    self.model(self.execution.inputs(batch.inputs))
                    values = record.take().flatten(1).float().cpu()
                    for i, image_id in enumerate(batch.image_ids):
                        features[row_of[image_id]] = values[i]
                        if cache is not None:
                            cache.put(image_id, values[i].numpy(), batch.sources[i], batch.image_ids)
                    if step is not None:
                        step()
        finally:
            self.model.train(was_training)
        return features, cached


def balanced_bce(labels: np.ndarray) -> Callable[[Tensor, Tensor], Tensor]:
    """Class-balanced masked BCE (module docstring) for devkit labels int8[N, C] in {1, 0, -1}.

    Returns:
        ``loss(logits float[b, C], rows int64[b]) -> scalar``.
    """
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.int8)
    targets = (labels_t == 1).float()
    mask = (labels_t != 0).float()
    positives = targets.sum(0)
    negatives = (labels_t == -1).float().sum(0)
    pos_weight = torch.where(positives > 0, negatives / positives.clamp(min=1), torch.ones_like(positives))
    criterion = nn.BCEWithLogitsLoss(reduction="none", pos_weight=pos_weight)

    def loss(logits: Tensor, rows: Tensor) -> Tensor:
        weights = mask[rows].to(logits.device)
        per_entry = criterion(logits, targets[rows].to(logits.device)) * weights
        return per_entry.sum() / weights.sum().clamp(min=1.0)

    return loss


def fit_linear(head: nn.Linear, features: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor], *,
                epochs: int, lr: float, batch_size: int, weight_decay: float, generator: torch.Generator,
                step: Callable[[float], None]) -> float:
    """Train a linear head on fixed features, from zero weights, with AdamW and shuffled mini-batches.

    Args:
        head: the ``nn.Linear`` to train (its weights are reset to zero first).
        features: float32[N, n_features] inputs of the head.
        loss_fn: ``loss(logits[b, C], rows int64[b])``, e.g. :func:`balanced_bce`.
        generator: seeded generator for the shuffling.
        step: called with each epoch's mean loss.

    Returns:
        The last epoch's mean loss.
    """
    device = head.weight.device
    with torch.no_grad():
        head.weight.zero_()
        if head.bias is not None:
            head.bias.zero_()
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    features = features.to(device)
    mean_loss = math.nan
    for _ in range(epochs):
        total = 0.0
        for rows in torch.randperm(len(features), generator=generator).split(batch_size):
            loss = loss_fn(head(features[rows.to(device)]), rows)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(rows)
        mean_loss = total / len(features)
        step(mean_loss)
    return mean_loss


def fit_lbfgs(head: nn.Linear, features: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor], *,
              iterations: int, lr: float, l2: float, step: Callable[[float], None]) -> float:
    """Fit a linear head on fixed features, from zero weights, by full-batch L-BFGS.

    Minimises ``loss_fn(head(features), all rows) + l2 * ||head.weight||_F^2`` (bias not penalised) with
    ``torch.optim.LBFGS`` (strong-Wolfe line search, history 20, step size ``lr``), one iteration per
    ``step`` call; an iteration after convergence changes nothing.

    Args:
        head: the ``nn.Linear`` to fit (reset to zero first).
        features: float32[N, n_features] inputs of the head.
        loss_fn: ``loss(logits[N, C], rows int64[N])``, e.g. :func:`balanced_bce`.
        iterations: L-BFGS iterations.
        step: called with the objective after each iteration.

    Returns:
        The final objective (loss + penalty).
    """
    device = head.weight.device
    with torch.no_grad():
        head.weight.zero_()
        if head.bias is not None:
            head.bias.zero_()
    features = features.to(device)
    rows = torch.arange(len(features))
    optimizer = torch.optim.LBFGS(head.parameters(), lr=lr, max_iter=1, history_size=20,
                                  line_search_fn="strong_wolfe")

    def objective() -> Tensor:
        return loss_fn(head(features), rows) + l2 * head.weight.square().sum()

    def closure() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        value = objective()
        value.backward()
        return value

    value = math.nan
    for _ in range(iterations):
        optimizer.step(closure)
        with torch.no_grad():
            value = float(objective())
        step(value)
    return value


@dataclass
class _Job:
    """Everything a training mode needs."""

    cfg: TrainConfig
    spec: ModelSpec
    model: nn.Module
    head: nn.Linear
    preprocessing: Preprocessing
    train: VOCDataset
    labels: np.ndarray
    execution: Execution
    workers: int
    generator: torch.Generator
    step: Callable[[float], None]
    features: Tensor | None = None


def _train_linear(job: _Job, epochs: int, lr: float) -> float:
    """Linear probe on the frozen backbone's pooled features."""
    return fit_linear(job.head, job.features, balanced_bce(job.labels), epochs=epochs, lr=lr,
                       batch_size=job.cfg.batch_size, weight_decay=job.cfg.weight_decay,
                       generator=job.generator, step=job.step)


def _train_lbfgs(job: _Job, epochs: int, lr: float) -> float:
    """Logistic regression on the frozen backbone's pooled features, by L-BFGS."""
    return fit_lbfgs(job.head, job.features, balanced_bce(job.labels), iterations=epochs, lr=lr,
                     l2=job.cfg.l2, step=job.step)


def _train_finetune_last(job: _Job, epochs: int, lr: float) -> float:
    """Linear probe, then head + last stage on images (random horizontal flips), BN statistics frozen."""
    linear = TRAIN_MODES["linear"]
    _train_linear(job, linear.epochs, linear.lr)
    model, loss_fn = job.model, balanced_bce(job.labels)
    names = (*job.spec.last_stage, job.spec.classifier)
    trainable = {id(p): p for name in names for p in model.get_submodule(name).parameters()}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in trainable)
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=lr, weight_decay=job.cfg.weight_decay)
    model.eval()
    mean_loss = math.nan
    try:
        for _ in range(epochs):
            total = 0.0
            order = torch.randperm(len(job.train), generator=job.generator).numpy()
            for rows, inputs in _image_batches(job, order):
                flip = (torch.rand(len(rows), generator=job.generator) < 0.5).to(inputs.device)
                inputs = torch.where(flip[:, None, None, None], inputs.flip(3), inputs)
                loss = loss_fn(model(inputs), torch.from_numpy(rows))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(rows)
            mean_loss = total / len(job.train)
            job.step(mean_loss)
    finally:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
    return mean_loss


TRAIN_MODES: dict[str, _Mode] = {
    "linear": _Mode(_train_linear, epochs=100, lr=1e-3),
    "finetune_last": _Mode(_train_finetune_last, epochs=5, lr=1e-4),
    "lbfgs": _Mode(_train_lbfgs, epochs=200, lr=1.0),
}


def _val_map_by_head(cfg: TrainConfig, voc: nn.Linear, imagenet: nn.Module, features: Tensor, labels: np.ndarray,
                     positives: dict[str, int]) -> dict[str, float]:
    """Held-out classification mAP (:data:`METRIC`) of every head a run can build from this checkpoint: ``voc``,
    and, when the backbone stayed at its ImageNet weights and every class has an ImageNet mapping, ``imagenet``
    and ``voc+imagenet`` (built exactly as :func:`gradloc.models.build.load_model` builds them: the voc term
    dropped for classes without a positive training image)."""
    heads: dict[str, nn.Module] = {"voc": voc}
    frozen = cfg.mode in FROZEN_BACKBONE_MODES
    if frozen and isinstance(imagenet, nn.Linear) and all(name in IMAGENET_VOC_GROUPS for name in cfg.classes):
        groups = imagenet_groups(list(cfg.classes))
        heads["imagenet"] = ImageNetClassifier(imagenet, groups)
        heads["voc+imagenet"] = VocImageNetHead(voc, imagenet, groups, [positives[n] > 0 for n in cfg.classes])
    with torch.no_grad():
        return {name: round(classification_map(module.to(features.device)(features).cpu().numpy(), labels)[0], 6)
                for name, module in heads.items()}


def _ap_dict(classes: Sequence[str], aps: np.ndarray) -> dict[str, float | None]:
    return {name: (None if math.isnan(ap) else round(float(ap), 6))
            for name, ap in zip(classes, aps, strict=True)}


def train_head(cfg: TrainConfig, progress: Progress = None) -> dict[str, Any]:
    """Train a voc head (see the module docstring), save the checkpoint, and report held-out AP.

    Args:
        cfg: what to train.
        progress: called as ``progress(done, total, loss)`` after every feature batch (loss NaN) and every
            epoch; for the CLI's progress bar.

    Returns:
        The report (plain data): configuration, image counts, final training loss, ``val_ap`` per class
        (None for classes without positives in the held-out split), ``val_map`` (of the voc head),
        ``val_map_by_head`` (:func:`_val_map_by_head`), ``metric``, ``seconds``,
        ``checkpoint`` and ``features_from_cache`` (split -> images whose features came from the features
        cache). The checkpoint's ``train`` field holds the same minus the last three.

    Raises:
        FileNotFoundError: missing VOC files or ImageNet weights.
        ValueError: bad configuration or data.
    """
    start = time.perf_counter()
    mode = TRAIN_MODES[cfg.mode]
    epochs = cfg.epochs or mode.epochs
    lr = cfg.lr or mode.lr
    spec = get_spec(cfg.model)
    execution = resolve_execution(torch.device(cfg.device), spec.family, cfg.channels_last)
    workers = default_workers(execution.device.type) if cfg.workers is None else cfg.workers
    keep_freed_memory()
    model, resolved = build_pretrained(cfg.model, cfg.weights)  # first: a missing file fails fast
    train = VOCDataset(cfg.voc_root, year=cfg.year, split=cfg.split, classes=cfg.classes, limit=cfg.limit)
    if cfg.ids is not None:
        train = train.subset(cfg.ids)
    val = (VOCDataset(cfg.voc_root, year=cfg.year, split=cfg.val_split, classes=cfg.classes, limit=cfg.limit)
           if cfg.val_split else None)
    overlap = len(set(val.image_ids) & set(train.image_ids)) if val is not None else 0
    if overlap:
        logger.warning("no held-out report: %s shares %d images with the training split %s", cfg.val_split,
                       overlap, cfg.split)
        val = None
    default = resolved.preprocessing
    preprocessing = replace(default, resize_mode=cfg.resize_mode or default.resize_mode,
                            input_size=cfg.input_size or default.input_size)
    imagenet = model.get_submodule(spec.classifier)  # kept: the held-out report scores the heads built on it
    head = replace_linear(model, spec.classifier, len(cfg.classes))
    execution.model(model)
    features_of = _FeaturePass(model, cfg.model, spec.classifier, preprocessing, execution, cfg.feature_batch_size,
                              workers, cfg.cache_dir)
    labels = train.image_labels()
    absent = [name for name, column in zip(cfg.classes, labels.T, strict=True) if not np.any(column == 1)]
    if absent:
        logger.warning("no positive training image for %s: their head only learns 'absent'",
                       ", ".join(absent))

    n_batches = features_of.n_batches(train) + (features_of.n_batches(val) if val is not None else 0)
    total = n_batches + epochs + (TRAIN_MODES["linear"].epochs if cfg.mode != "linear" else 0)
    done = 0

    def step(loss: float = math.nan) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, loss)

    job = _Job(cfg, spec, model, head, preprocessing, train, labels, execution, workers,
               torch.Generator().manual_seed(cfg.seed), step)
    job.features, from_cache = features_of(train, step)
    logger.info("%s: %d training images, %d pooled features each (%d from the features cache)", cfg.model,
                len(train), job.features.shape[1], from_cache)
    train_loss = mode.train(job, epochs, lr)

    report: dict[str, Any] = {
        "model": cfg.model, "weights": resolved.name, "mode": cfg.mode, "split": cfg.split,
        "val_split": cfg.val_split, "year": cfg.year, "limit": cfg.limit, "n_train": len(train),
        "n_val": len(val) if val is not None else 0, "epochs": epochs, "lr": lr, "batch_size": cfg.batch_size,
        "weight_decay": cfg.weight_decay, "l2": cfg.l2, "seed": cfg.seed, "input_size": preprocessing.input_size,
        "resize_mode": preprocessing.resize_mode, "train_loss": round(train_loss, 6),
        "val_overlap": overlap,
        "train_positives": {name: int(n) for name, n in zip(cfg.classes, (labels == 1).sum(0), strict=True)},
    }
    cached = {cfg.split: from_cache}
    if val is not None:
        features, cached[cfg.val_split] = features_of(val, step)
        with torch.no_grad():
            scores = head(features.to(execution.device)).cpu().numpy()
        val_map, aps = classification_map(scores, val.image_labels())
        report.update(val_ap=_ap_dict(cfg.classes, aps), val_map=round(val_map, 6), metric=METRIC,
                      val_map_by_head=_val_map_by_head(cfg, head, imagenet, features.to(execution.device),
                                                       val.image_labels(), report["train_positives"]))
        logger.info("%s %s head: %s mAP %.3f (%s)", cfg.model, cfg.mode, cfg.val_split, val_map, METRIC)
    meta = {
        "arch": cfg.model, "arch_kwargs": resolved.arch_kwargs, "weights": resolved.name, "head": "voc",
        "classes": list(cfg.classes), "train": dict(report), "git_commit": git_commit(),
        **preprocessing.to_dict(),
    }
    save_checkpoint(cfg.out, model.cpu().to(memory_format=torch.contiguous_format), meta)
    report.update(seconds=round(time.perf_counter() - start, 1), checkpoint=str(cfg.out),
                  features_from_cache=cached)
    return report
