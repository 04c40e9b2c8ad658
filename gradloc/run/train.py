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

from gradloc.core.provenance import git_commit
from gradloc.datasets.voc import VOC_CLASSES, VOCDataset
from gradloc.models.checkpoints import save_checkpoint
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
        batch_size, weight_decay: AdamW settings (batch_size also batches the feature extraction).
        l2: L2 penalty on the weights of the ``lbfgs`` head.
        seed: shuffling / augmentation seed.
        input_size: network input side (None: the weights'); resize_mode: ``letterbox``, ``stretch`` or
            ``shortside`` (None: the weights', letterbox).
        limit: use only the first ``limit`` images of each split (quick runs and tests).
        ids: train only on these image ids of ``split`` (the other folds of a cross-validation); None: all.
        device: torch device for feature extraction and training.
        out: checkpoint file to write.
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

    def __post_init__(self) -> None:
        if self.mode not in TRAIN_MODES:
            raise ValueError(f"training mode {self.mode!r}; choose one of {', '.join(TRAIN_MODES)}")
        for name, value in (("epochs", self.epochs), ("batch_size", self.batch_size), ("limit", self.limit)):
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
        mode and device of the run (the head then fits the run's preprocessing); ``overrides`` win."""
        section = dataclasses.asdict(config.train)
        data, model = config.data, config.model
        values = {**section, "voc_root": data.voc_root, "year": data.year, "classes": data.classes,
                  "model": model.name, "weights": model.weights, "input_size": model.input_size,
                  "resize_mode": model.resize_mode, "device": config.cams.device, "out": out, **overrides}
        return cls(**values)


def _batches(dataset: VOCDataset, preprocessing: Preprocessing, rows: Sequence[int], batch_size: int
             ) -> Iterator[tuple[np.ndarray, Tensor]]:
    """Preprocessed images of ``rows`` in batches of one input shape (``Preprocessing.batches``; in the
    order of ``rows`` for the square resize modes): (int64[b] rows, float32[b, 3, H, W])."""
    rows = np.asarray(rows, dtype=np.int64)
    annotations = [dataset.annotation(dataset.image_ids[row]) for row in rows]
    for indices in preprocessing.batches([(a.width, a.height) for a in annotations], batch_size):
        chunk = rows[indices]
        inputs, _ = preprocessing.batch([dataset.load_image(dataset.image_ids[row]) for row in chunk])
        yield chunk, inputs


def _n_batches(dataset: VOCDataset, preprocessing: Preprocessing, batch_size: int) -> int:
    """Number of batches :func:`_batches` makes of the whole dataset."""
    annotations = [dataset.annotation(image_id) for image_id in dataset.image_ids]
    return len(preprocessing.batches([(a.width, a.height) for a in annotations], batch_size))


class _ClassifierInput:
    """Context manager recording the input of a module (the pooled features entering the final linear)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.value: Tensor | None = None

    def _hook(self, _module: nn.Module, args: tuple[Tensor, ...]) -> None:
        self.value = args[0]

    def __enter__(self) -> _ClassifierInput:
        self._handle = self.module.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


def pooled_features(model: nn.Module, classifier: str, dataset: VOCDataset, preprocessing: Preprocessing,
                    batch_size: int, device: torch.device, step: Callable[[], None] | None = None) -> Tensor:
    """Inputs of the final linear layer for every image of ``dataset`` (eval mode, no gradients).

    Returns:
        float32[n_images, n_features] on the CPU.
    """
    features: Tensor | None = None
    was_training = model.training
    model.eval()
    try:
        with _ClassifierInput(model.get_submodule(classifier)) as record, torch.no_grad():
            for rows, inputs in _batches(dataset, preprocessing, range(len(dataset)), batch_size):
                model(inputs.to(device))
                values = record.value.detach().flatten(1).float().cpu()
                if features is None:
                    features = torch.empty(len(dataset), values.shape[1])
                features[torch.from_numpy(rows)] = values
                if step is not None:
                    step()
    finally:
        model.train(was_training)
    if features is None:
        raise ValueError(f"{dataset!r} holds no images")
    return features


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
    device: torch.device
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
            for rows, inputs in _batches(job.train, job.preprocessing, order, job.cfg.batch_size):
                flip = torch.rand(len(rows), generator=job.generator) < 0.5
                inputs = torch.where(flip[:, None, None, None], inputs.flip(3), inputs).to(job.device)
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
        (None for classes without positives in the held-out split), ``val_map``, ``metric``, ``seconds``
        and ``checkpoint``. The checkpoint's ``train`` field holds the same minus ``seconds``.

    Raises:
        FileNotFoundError: missing VOC files or ImageNet weights.
        ValueError: bad configuration or data.
    """
    start = time.perf_counter()
    mode = TRAIN_MODES[cfg.mode]
    epochs = cfg.epochs or mode.epochs
    lr = cfg.lr or mode.lr
    spec = get_spec(cfg.model)
    device = torch.device(cfg.device)
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
    head = replace_linear(model, spec.classifier, len(cfg.classes))
    model.to(device)
    labels = train.image_labels()
    absent = [name for name, column in zip(cfg.classes, labels.T, strict=True) if not np.any(column == 1)]
    if absent:
        logger.warning("no positive training image for %s: their head only learns 'absent'",
                       ", ".join(absent))

    n_batches = _n_batches(train, preprocessing, cfg.batch_size)
    n_val_batches = _n_batches(val, preprocessing, cfg.batch_size) if val is not None else 0
    total = n_batches + n_val_batches + epochs + (TRAIN_MODES["linear"].epochs if cfg.mode != "linear" else 0)
    done = 0

    def step(loss: float = math.nan) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, loss)

    job = _Job(cfg, spec, model, head, preprocessing, train, labels, device,
               torch.Generator().manual_seed(cfg.seed), step)
    job.features = pooled_features(model, spec.classifier, train, preprocessing, cfg.batch_size, device, step)
    logger.info("%s: %d training images, %d pooled features each", cfg.model, len(train),
                job.features.shape[1])
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
    if val is not None:
        features = pooled_features(model, spec.classifier, val, preprocessing, cfg.batch_size, device, step)
        with torch.no_grad():
            scores = head(features.to(device)).cpu().numpy()
        val_map, aps = classification_map(scores, val.image_labels())
        report.update(val_ap=_ap_dict(cfg.classes, aps), val_map=round(val_map, 6), metric=METRIC)
        logger.info("%s %s head: %s mAP %.3f (%s)", cfg.model, cfg.mode, cfg.val_split, val_map, METRIC)
    meta = {
        "arch": cfg.model, "arch_kwargs": resolved.arch_kwargs, "weights": resolved.name, "head": "voc",
        "classes": list(cfg.classes), "train": dict(report), "git_commit": git_commit(),
        **preprocessing.to_dict(),
    }
    save_checkpoint(cfg.out, model.cpu(), meta)
    report.update(seconds=round(time.perf_counter() - start, 1), checkpoint=str(cfg.out))
    return report
