"""The demo CNN (conv blocks, GAP, linear) and its training on the synthetic demo dataset."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradloc.datasets.demo import DEMO_CLASSES, DEMO_YEAR
from gradloc.datasets.voc import VOCDataset
from gradloc.models.checkpoints import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from gradloc.models.preprocessing import Preprocessing
from gradloc.scoring.classification import classification_map

logger = logging.getLogger(__name__)

def _conv_bn_relu(channels_in: int, channels_out: int, stride: int = 1, kernel: int = 3) -> list[nn.Module]:
    return [nn.Conv2d(channels_in, channels_out, kernel, stride=stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(channels_out), nn.ReLU(inplace=True)]


class DemoNet(nn.Module):
    """Small multi-label CNN: conv blocks -> global average pooling -> linear (a CAM-compatible layout).

    With ``n = len(widths)`` blocks, each ``conv -> BN -> ReLU`` with ``widths[i - 1]`` output channels:
    ``block1`` is a stride-2 3x3 stem, ``block2`` max-pools 2x2 then applies a 3x3 conv, later blocks are
    3x3 convs, and when ``n >= 3`` the last block is a 1x1 conv (it mixes channels without widening the
    receptive field). The default ``(16, 32, 48, 64)`` turns a 128 px input into a 32 x 32 map whose cells
    see 21 input pixels. Logits: ``fc(mean_{h,w} A)`` where ``A`` is the last block's output.

    The small receptive field is deliberate: with global average pooling every cell that sees part of an
    object raises the score, so heatmaps spread over the receptive field around the object. On the demo
    data a 16 x 16 map with a 57 px receptive field gave Grad-CAM boxes with CorLoc@0.5 ~0.01; this layout
    ~0.5 (test split, GT classes, largest component at tau = 0.6 x max; a centred box: <= 0.04).

    Args:
        n_classes: number of outputs (default: the 4 classes of :data:`gradloc.datasets.demo.DEMO_CLASSES`).
        widths: output channels of ``block1`` ... ``block<n>`` (at least two blocks).

    Attributes:
        gradloc_layer: name of the last conv block, the default layer to explain.
        gradloc_gap_linear: ``(feature layer, linear layer)`` names for CAM (Zhou et al., 2016).
    """

    def __init__(self, n_classes: int = 4, widths: Sequence[int] = (16, 32, 48, 64)) -> None:
        super().__init__()
        if n_classes < 1 or len(widths) < 2 or min(widths) < 1:
            raise ValueError(f"DemoNet needs n_classes >= 1 and at least 2 positive widths, got {n_classes}, "
                             f"{list(widths)}")
        n = len(widths)
        channels = [3, *widths]
        for index in range(1, n + 1):
            layers: list[nn.Module] = [nn.MaxPool2d(2)] if index == 2 else []
            kernel = 1 if index == n >= 3 else 3
            layers += _conv_bn_relu(channels[index - 1], channels[index], stride=2 if index == 1 else 1,
                                    kernel=kernel)
            self.add_module(f"block{index}", nn.Sequential(*layers))
        self.blocks = [f"block{index}" for index in range(1, n + 1)]
        self.fc = nn.Linear(widths[-1], n_classes)
        self.gradloc_layer = self.blocks[-1]
        self.gradloc_gap_linear = (self.gradloc_layer, "fc")

    def forward(self, x: Tensor) -> Tensor:
        """float32[B, 3, S, S] normalized images -> float32[B, n_classes] logits."""
        for name in self.blocks:
            x = self.get_submodule(name)(x)
        return self.fc(x.mean(dim=(2, 3)))


DEMO_ARCH = "demo_cnn"


DEMO_MEAN = (0.5, 0.5, 0.5)


DEMO_STD = (0.25, 0.25, 0.25)


_BATCH_SIZE = 32


_LEARNING_RATE = 3e-3


_WEIGHT_DECAY = 1e-4


_ARCH_KWARGS: dict[str, Any] = {"n_classes": len(DEMO_CLASSES), "widths": [16, 32, 48, 64]}


def _load_split(voc_root: Path, split: str, input_size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Preprocessed images float32[N, 3, S, S], devkit labels int8[N, C] (1 / 0 / -1) and image ids."""
    dataset = VOCDataset(voc_root, year=DEMO_YEAR, split=split, classes=DEMO_CLASSES)
    preprocessing = Preprocessing(input_size, "letterbox", DEMO_MEAN, DEMO_STD)
    images, _ = preprocessing.batch([dataset.load_image(image_id) for image_id in dataset.image_ids])
    return images, torch.from_numpy(dataset.image_labels()), dataset.image_ids


def _data_fingerprint(voc_root: Path, splits: Sequence[str]) -> str:
    """sha256 over the ids, annotation and image bytes of the given splits."""
    digest = hashlib.sha256()
    for split in splits:
        dataset = VOCDataset(voc_root, year=DEMO_YEAR, split=split, classes=DEMO_CLASSES)
        for image_id in dataset.image_ids:
            digest.update(f"{split}/{image_id}\n".encode())
            digest.update(dataset.annotation(image_id).path.read_bytes())
            digest.update(dataset.image_path(image_id).read_bytes())
    return digest.hexdigest()


def _reusable(out: Path, expected: dict[str, Any]) -> bool:
    if not out.is_file():
        return False
    try:
        checkpoint = load_checkpoint(out)
    except ValueError as error:  # an unreadable or foreign file is simply trained over
        logger.warning("retraining: cannot use existing checkpoint %s (%s)", out, error)
        return False
    found = {key: checkpoint.get(key) for key in expected if key != "train"}
    found["train"] = {key: checkpoint.get("train", {}).get(key) for key in expected["train"]}
    return found == expected


def train_demo_model(
    voc_root: Path,
    out: Path,
    *,
    input_size: int = 128,
    epochs: int = 30,
    seed: int = 0,
    max_seconds: float = 90.0,
    progress: Callable[[int, int, float], None] | None = None,
) -> Path:
    """Train :class:`DemoNet` on the demo ``train`` split and save a ``gradloc.checkpoint/1`` file.

    Multi-label classification with binary cross-entropy on logits, weighting each class's positives by
    ``n_negative / n_positive`` (images whose only instances are difficult are left out of that class's
    loss); AdamW with a cosine learning-rate schedule, batches of 32, random horizontal and vertical flips.
    Images are letterboxed to ``input_size`` with :func:`gradloc.core.geometry.plan` and normalized with
    ``DEMO_MEAN`` / ``DEMO_STD``. Training stops early after ``max_seconds`` (so the number of epochs
    actually run is then time-dependent); otherwise it is deterministic given the seed. The classification
    mAP (VOC07 11-point) on ``val`` is logged and stored.

    An existing checkpoint at ``out`` made from the same data and arguments is reused.

    Args:
        voc_root: the demo VOCdevkit folder (from :func:`generate_demo`).
        out: checkpoint path (written atomically).
        progress: called after each epoch with ``(epoch, epochs, mean training loss)``.

    Returns:
        ``out``.
    """
    if input_size < 16 or epochs < 1 or max_seconds <= 0:
        raise ValueError(f"input_size={input_size} (>= 16), epochs={epochs} (>= 1) and "
                         f"max_seconds={max_seconds} (> 0) are out of range")
    out = Path(out)
    voc_root = Path(voc_root)
    expected = {
        "format": CHECKPOINT_FORMAT, "arch": DEMO_ARCH, "arch_kwargs": _ARCH_KWARGS,
        "classes": list(DEMO_CLASSES),
        "input_size": input_size, "resize_mode": "letterbox", "mean": list(DEMO_MEAN), "std": list(DEMO_STD),
        "train": {"split": "train", "seed": seed, "epochs_requested": epochs, "max_seconds": max_seconds,
                  "data_sha256": _data_fingerprint(voc_root, ("train", "val"))},
    }
    if _reusable(out, expected):
        logger.info("reusing demo checkpoint %s", out)
        return out
    start = time.perf_counter()
    x_train, y_train, _ = _load_split(voc_root, "train", input_size)
    x_val, y_val, _ = _load_split(voc_root, "val", input_size)
    with _reproducible(seed):
        model, epochs_done = _fit(x_train, y_train, epochs, seed, start, max_seconds, progress)
        model.eval()
        with torch.no_grad():
            val_scores = torch.cat([model(batch) for batch in x_val.split(64)]).numpy()
    val_map, aps = classification_map(val_scores, y_val.numpy())
    seconds = time.perf_counter() - start
    logger.info("demo CNN: %d/%d epochs in %.1f s; val classification mAP (VOC07 11-point) %.3f (%s)",
                epochs_done, epochs, seconds, val_map,
                ", ".join(f"{n} {ap:.3f}" for n, ap in zip(DEMO_CLASSES, aps, strict=True)))
    save_checkpoint(out, model, {
        **{key: value for key, value in expected.items() if key not in ("format", "train")},
        "weights": None, "head": "voc",
        "train": {**expected["train"], "epochs": epochs_done, "seconds": round(seconds, 1),
                  "val_map": val_map},
        "git_commit": None,
    })
    return out


@contextlib.contextmanager
def _reproducible(seed: int) -> Iterator[None]:
    """Seed torch in a forked RNG state, run single-threaded with deterministic algorithms, restore all after.

    One thread makes the result independent of the core count (reduction order) and is also the fastest
    setting on a shared machine, where OpenMP threads compete for cores (measured: 0.11 s vs 0.76 s for one
    batch on 2 busy cores).
    """
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_num_threads(threads)


def _fit(x: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int, start: float, max_seconds: float,
         progress: Callable[[int, int, float], None] | None) -> tuple[DemoNet, int]:
    """The training loop (global torch RNG already seeded); returns the model and the epochs completed."""
    model = DemoNet(**_ARCH_KWARGS)
    generator = torch.Generator().manual_seed(seed)
    targets = (labels == 1).float()
    weights = (labels != 0).float()
    positives = targets.sum(0)
    negatives = weights.sum(0) - positives
    pos_weight = torch.where(negatives > 0, negatives / positives.clamp(min=1), 1.0)
    loss_fn = nn.BCEWithLogitsLoss(reduction="none", pos_weight=pos_weight)
    optimizer = torch.optim.AdamW(model.parameters(), lr=_LEARNING_RATE, weight_decay=_WEIGHT_DECAY)
    steps_per_epoch = math.ceil(len(x) / _BATCH_SIZE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    model.train()
    for epoch in range(1, epochs + 1):
        total, count = 0.0, 0
        for batch in torch.randperm(len(x), generator=generator).split(_BATCH_SIZE):
            inputs = x[batch]
            flip_h = torch.rand(len(batch), generator=generator) < 0.5
            flip_v = torch.rand(len(batch), generator=generator) < 0.5
            inputs = torch.where(flip_h[:, None, None, None], inputs.flip(3), inputs)
            inputs = torch.where(flip_v[:, None, None, None], inputs.flip(2), inputs)
            mask = weights[batch]
            loss = (loss_fn(model(inputs), targets[batch]) * mask).sum() / mask.sum().clamp(min=1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total, count = total + loss.item() * len(batch), count + len(batch)
            if time.perf_counter() - start > max_seconds:
                logger.warning("demo CNN: stopping in epoch %d/%d after max_seconds=%.0f", epoch, epochs,
                               max_seconds)
                return model, epoch - 1
        if progress is not None:
            progress(epoch, epochs, total / count)
        logger.debug("demo CNN epoch %d/%d: loss %.4f", epoch, epochs, total / count)
    return model, epochs
