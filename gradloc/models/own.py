"""Your own model, explained like the built-in ones: ``timm:NAME`` and ``package.module:function``.

``--model`` (config ``model.name``) takes, besides the registry names of ``gradloc models``:

* ``torchvision:NAME`` -- the torchvision model NAME; the same as the registry name NAME (its wiring, weights
  from the torch hub cache), e.g. ``--model torchvision:resnet50 --checkpoint my.pt`` with the state dict of a
  fine-tuned ResNet-50 (:func:`gradloc.models.zoo.get_spec`).
* ``timm:NAME`` -- ``timm.create_model(NAME)``: with ``--checkpoint`` (a state dict of that architecture; its
  classifier's size gives the number of outputs) or with timm's ImageNet weights already on this machine (the
  Hugging Face hub cache or the torch hub cache; never downloaded). Preprocessing: the model's
  ``pretrained_cfg`` (input size, mean, std).
* ``package.module:function`` -- an entry point: ``function()`` (no arguments) returns the ``nn.Module``; the
  module must be importable (on ``PYTHONPATH``). With ``--checkpoint`` a state dict is loaded into it
  (strictly), else it is used with whatever weights ``function`` gave it. Preprocessing: ImageNet's mean and
  std at 224 px (letterbox), or the module's timm-style ``pretrained_cfg`` when it has one; ``--input-size``
  and ``--resize-mode`` override. The cache key holds the sha256 of the module's source file.

The CAM layer and the head are resolved as for the built-in models: the default layer is the module's
``gradloc_layer`` attribute if it sets one, else found by probing (the last module with a spatial map before
pooling, :func:`gradloc.cams.layers.default_layer`); ``gradloc_gap_linear`` is kept when the module declares it
(CAM then applies), else None (the gradient methods work through autograd). Heads (:data:`OWN_HEADS`):

* ``voc`` -- the model's outputs are the multi-label logits of the run's classes (probability = sigmoid), so
  it must have exactly one output per class of ``data.classes``, in that order;
* ``imagenet`` -- the model has the 1000 ImageNet-1k outputs; its final ``nn.Linear`` (timm's
  ``pretrained_cfg["classifier"]``, else the last linear layer producing the output) is followed by the
  ImageNet -> VOC mapping in its place (:func:`gradloc.models.heads.attach_imagenet_mapping`);
* ``voc+imagenet`` needs a head trained by ``gradloc train`` and is refused.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradloc.datasets.voc import VOC_CLASSES
from gradloc.models.checkpoints import _file_record, _is_state_dict, _read_torch_file
from gradloc.models.heads import N_IMAGENET_CLASSES, attach_imagenet_mapping
from gradloc.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from gradloc.models.registry import hub_file

TORCHVISION_PREFIX = "torchvision:"
"""``torchvision:NAME`` is the registry name NAME (see :func:`gradloc.models.zoo.get_spec`)."""


@dataclass
class OwnModel:
    """A user model before its head: the module, its preprocessing, the classifier's module name when it is
    known (None: found by probing), and the JSON-able record of where it came from (for the cache key)."""

    module: nn.Module
    preprocessing: Preprocessing
    classifier: str | None
    record: dict[str, Any] = field(default_factory=dict)


def is_own_model(name: str) -> bool:
    """Whether ``name`` is a ``timm:NAME`` or ``package.module:function`` model (not a registry name, not
    ``torchvision:NAME``)."""
    return ":" in name and not name.startswith(TORCHVISION_PREFIX)


def _timm_preprocessing(config: dict[str, Any]) -> Preprocessing:
    return Preprocessing(int(config.get("input_size", (3, 224, 224))[-1]), "letterbox",
                         tuple(config.get("mean", IMAGENET_MEAN)), tuple(config.get("std", IMAGENET_STD)))


def _timm_weights(name: str, config: dict[str, Any]) -> Path:
    """The local file of timm's pretrained weights of ``name``: the Hugging Face hub cache (``hf_hub_id``) or
    the torch hub cache (``url``), never downloaded.

    Raises:
        FileNotFoundError: naming every place looked at.
    """
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.constants import HF_HUB_CACHE

    looked = []
    repo = config.get("hf_hub_id")
    if repo:
        for file_name in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(repo, file_name)
            if isinstance(found, str):
                return Path(found)
        looked.append(f"{HF_HUB_CACHE}/models--{repo.replace('/', '--')}/snapshots/*/model.safetensors")
    if config.get("url"):
        path = hub_file(config["url"])
        if path.is_file():
            return path
        looked.append(str(path))
    raise FileNotFoundError(f"timm:{name} has no ImageNet weights on this machine (gradloc never downloads); looked "
                            f"for {' and '.join(looked) or 'a weights source in its pretrained_cfg'}; copy the "
                            f"file there, or pass --checkpoint FILE with a state dict of timm's {name}")


def _timm(name: str, state: dict[str, Tensor] | None, pretrained: bool) -> OwnModel:
    """``timm:NAME``: the architecture sized for ``state`` (its classifier's outputs), or, without a state dict,
    with timm's ImageNet weights from a local file when ``pretrained`` (random weights otherwise)."""
    try:
        import timm
    except ImportError:
        raise ValueError(f"--model timm:{name} needs the timm package (pip install timm)") from None
    if not timm.is_model(name):
        raise ValueError(f"timm has no model {name!r} (timm.list_models() lists them); --model timm:NAME")
    probe = timm.create_model(name, pretrained=False)
    config = dict(probe.pretrained_cfg)
    classifier = config.get("classifier")
    if state is None and not pretrained:
        return OwnModel(probe, _timm_preprocessing(config), classifier)
    if state is None:
        path = _timm_weights(name, config)
        module = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
        return OwnModel(module, _timm_preprocessing(config), classifier,
                        {"weights": config.get("hf_hub_id") or config.get("url"), "weights_file": _file_record(path)})
    key = f"{classifier}.weight"
    n_out = int(state[key].shape[0]) if isinstance(classifier, str) and key in state else None
    module = timm.create_model(name, pretrained=False, **({"num_classes": n_out} if n_out is not None else {}))
    return OwnModel(module, _timm_preprocessing(config), classifier)


def _entry_function(name: str) -> tuple[Any, str, str]:
    """(the module, its name, the function name) of an entry point ``package.module:function``, imported.

    Raises:
        ValueError: a malformed name, a module that cannot be imported, no such function.
    """
    module_name, _, function_name = name.rpartition(":")
    if not module_name or not function_name.isidentifier():
        raise ValueError(f"--model {name!r}: write an entry point as package.module:function, timm:NAME or "
                         "torchvision:NAME, or use a name of `gradloc models`")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"--model {name}: cannot import {module_name!r} ({error}); put its folder on PYTHONPATH, "
                         f"e.g. PYTHONPATH=. gradloc ...") from None
    if not callable(getattr(module, function_name, None)):
        raise ValueError(f"--model {name}: {module_name} has no function {function_name!r}")
    return module, module_name, function_name


def _entry_point(name: str, state: dict[str, Tensor] | None, pretrained: bool) -> OwnModel:
    """``package.module:function``: what ``function()`` returns (its own weights; ``state`` is loaded by the
    caller)."""
    module, module_name, function_name = _entry_function(name)
    built = getattr(module, function_name)()
    if not isinstance(built, nn.Module):
        raise ValueError(f"--model {name}: {function_name}() returned a {type(built).__name__}, not a "
                         "torch.nn.Module")
    config = getattr(built, "pretrained_cfg", None)
    preprocessing = (_timm_preprocessing(dict(config)) if isinstance(config, dict)
                     else Preprocessing(224, "letterbox", IMAGENET_MEAN, IMAGENET_STD))
    source = inspect.getsourcefile(module)
    record = {"entry_point": {"module": module_name, "function": function_name,
                              "file": _file_record(Path(source)) if source else None}}
    classifier = config.get("classifier") if isinstance(config, dict) else None
    return OwnModel(built, preprocessing, classifier, record)


# Own models by prefix: (name after the prefix, state dict or None, pretrained) -> OwnModel; a name whose prefix
# is not here is an entry point.
OWN_SOURCES: dict[str, Callable[[str, dict[str, Tensor] | None, bool], OwnModel]] = {"timm": _timm}


def check_own_name(name: str) -> None:
    """Fail before any work on an own model that cannot be built: a timm name timm does not know, an entry
    point that cannot be imported or has no such function (the function is not called).

    Raises:
        ValueError: naming the model and what to do.
    """
    prefix, _, rest = name.partition(":")
    if prefix == "timm":
        import timm

        if not timm.is_model(rest):
            raise ValueError(f"timm has no model {rest!r} (timm.list_models() lists them); --model timm:NAME")
    else:
        _entry_function(name)


def build_own(name: str, checkpoint: str | Path | None = None, *, weights: bool = True) -> OwnModel:
    """Build ``timm:NAME`` or ``package.module:function`` (see the module docstring), with the state dict of
    ``checkpoint`` loaded strictly when given; without a checkpoint, timm models get their local ImageNet
    weights when ``weights`` is True (else random weights: for listing layers).

    Raises:
        ValueError: a malformed name, an unknown timm model, an entry point that cannot be imported or does not
            return a module, a checkpoint that is not a plain state dict of the model.
        FileNotFoundError: the checkpoint, or timm's weights (the message names the paths looked at).
    """
    prefix, _, rest = name.partition(":")
    state = None
    if checkpoint is not None:
        path = Path(checkpoint)
        data = _read_torch_file(path)
        if not _is_state_dict(data):
            raise ValueError(f"{path}: --model {name} takes a plain state dict (a dict of tensors, "
                             "torch.save(model.state_dict(), FILE)); gradloc checkpoints are for `gradloc models`")
        state = dict(data)
    if prefix in OWN_SOURCES:
        own = OWN_SOURCES[prefix](rest, state, weights)
    else:
        own = _entry_point(name, state, weights)
    if state is not None:
        try:
            own.module.load_state_dict(state, strict=True)
        except RuntimeError as error:
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            raise ValueError(f"{checkpoint}: the state dict does not fit --model {name}: "
                             f"{' '.join(lines[1:3])[:400]}") from None
        own.record["checkpoint"] = _file_record(Path(checkpoint))
    own.module.eval()
    return own


@dataclass(frozen=True)
class Outputs:
    """What a probe forward tells about a model's output: its number of scores, and the classifier, i.e. the
    last ``nn.Linear`` to run whose output has the model's output shape (None when there is none)."""

    n_outputs: int
    classifier: str | None


def probe_outputs(module: nn.Module, preprocessing: Preprocessing) -> Outputs:
    """:class:`Outputs` of ``module`` from one forward of a zero image of the preprocessing's input size.

    Raises:
        ValueError: the output is not ``[1, N]`` class scores.
    """
    finished: list[tuple[str, tuple[int, ...]]] = []
    handles = [layer.register_forward_hook(lambda _m, _i, out, name=name: finished.append((name, tuple(out.shape))))
               for name, layer in module.named_modules() if isinstance(layer, nn.Linear)]
    first = next(module.parameters(), None)
    size = preprocessing.input_size
    try:
        with torch.no_grad():
            out = module(torch.zeros(1, 3, size, size, dtype=first.dtype if first is not None else torch.float32))
    finally:
        for handle in handles:
            handle.remove()
    if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != 1:
        found = f"shape {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"{type(module).__name__} returns {found} for one image; gradloc explains classifiers "
                         "returning class scores [B, N]")
    classifier = next((name for name, shape in reversed(finished) if shape == tuple(out.shape)), None)
    return Outputs(int(out.shape[1]), classifier)


def _own_voc(name: str, own: OwnModel, classes: Sequence[str]) -> nn.Module:
    n_out = probe_outputs(own.module, own.preprocessing).n_outputs
    if n_out != len(classes):
        hint = ("; it looks like an ImageNet classifier: pass --head imagenet" if n_out == N_IMAGENET_CLASSES
                else "; give data.classes (config) in the order of its outputs")
        raise ValueError(f"--model {name} has {n_out} outputs; head voc reads one logit per class of the run "
                         f"({len(classes)}: {', '.join(classes)}){hint}")
    return own.module


def _own_imagenet(name: str, own: OwnModel, classes: Sequence[str]) -> nn.Module:
    outputs = probe_outputs(own.module, own.preprocessing)
    if outputs.n_outputs != N_IMAGENET_CLASSES:
        raise ValueError(f"--model {name} has {outputs.n_outputs} outputs; head imagenet needs the "
                         f"{N_IMAGENET_CLASSES} ImageNet-1k outputs (pass --head voc when there is one output per "
                         "class)")
    classifier = own.classifier or outputs.classifier
    if classifier is None:
        raise ValueError(f"--model {name}: head imagenet follows the final nn.Linear by the ImageNet -> VOC "
                         "mapping, and no nn.Linear produces the model's output")
    return attach_imagenet_mapping(own.module, classifier, classes)


def _own_voc_imagenet(name: str, own: OwnModel, classes: Sequence[str]) -> nn.Module:
    raise ValueError(f"head voc+imagenet needs a voc head trained by `gradloc train` on a model of `gradloc "
                     f"models`; --model {name} takes --head voc (one output per class) or imagenet (1000 outputs)")


OWN_HEADS: dict[str, Callable[[str, OwnModel, Sequence[str]], nn.Module]] = {
    "voc": _own_voc,
    "imagenet": _own_imagenet,
    "voc+imagenet": _own_voc_imagenet,
}
"""Head name -> how an own model gets it (module docstring); the score kinds are those of
:data:`gradloc.models.build.HEADS`."""


def attach_own_head(name: str, own: OwnModel, head: str, classes: Sequence[str] | None) -> tuple[nn.Module, list[str]]:
    """The own model with its head (:data:`OWN_HEADS`) and its score columns (``classes``, default the 20 VOC
    classes)."""
    wanted = list(classes) if classes is not None else list(VOC_CLASSES)
    return OWN_HEADS[head](name, own, wanted), wanted
