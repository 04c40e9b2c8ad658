"""Target layers: listing the layers a CAM can use, the default one, and resolving a name."""

from __future__ import annotations

import difflib
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gradloc.cams.hooks import eval_mode, forward_hooks

logger = logging.getLogger(__name__)

PROBE_SIZE = 64
"""Side (pixels) of the zero image used by the probe forward of ``list_layers`` / ``default_layer``."""


_ADAPTIVE_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


_MAX_LISTED = 12


@dataclass
class _ProbeRecord:
    calls: int = 0
    order: int = -1
    shape: tuple[int, ...] | None = None


def _probe(model: nn.Module, input_size: int) -> dict[str, _ProbeRecord]:
    """Run the model in eval mode on a zero image and record, per named module, its calls and output shape.

    ``order`` is the module's last completion index in the forward pass (a container completes after its
    children). ``shape`` is None when the output is not a tensor.
    """
    first_param = next(model.parameters(), None)
    dtype = first_param.dtype if first_param is not None else torch.float32
    device = first_param.device if first_param is not None else torch.device("cpu")
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = first_conv.in_channels if first_conv is not None else 3
    records = {name: _ProbeRecord() for name, _ in model.named_modules() if name}
    counter = itertools.count()

    def make_hook(name: str) -> Callable[[nn.Module, object, object], None]:
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            record = records[name]
            record.calls += 1
            record.order = next(counter)
            record.shape = tuple(output.shape) if isinstance(output, Tensor) else None

        return hook

    modules = dict(model.named_modules())
    with eval_mode(model), forward_hooks([(modules[name], make_hook(name)) for name in records]), \
            torch.no_grad():
        model(torch.zeros(1, channels, input_size, input_size, dtype=dtype, device=device))
    return records


def list_layers(model: nn.Module, *, input_size: int = PROBE_SIZE) -> list[str]:
    """Names of the modules usable as target layers, in ``named_modules`` order.

    A module qualifies when, in a probe forward on a zero image of ``input_size x input_size`` pixels (eval
    mode, no grad), it returns a 4-D tensor and runs exactly once (modules reused within one forward, such
    as the shared ReLU of a torchvision Bottleneck, cannot be hooked unambiguously).
    """
    records = _probe(model, input_size)
    return [name for name, rec in records.items() if rec.calls == 1 and rec.shape is not None
            and len(rec.shape) == 4]


@dataclass(frozen=True)
class LayerInfo:
    """A module with a 4-D output: its full name (what ``--layer`` accepts), its output shape [1, C, h, w] on the
    probe, and ``unusable``: why a CAM cannot use it ("" when it can)."""

    name: str
    shape: tuple[int, ...]
    unusable: str


def layer_table(model: nn.Module, *, input_size: int = PROBE_SIZE) -> list[LayerInfo]:
    """Every module of :func:`list_layers` with its probe output shape; adaptive pooling layers (they only
    resample) and 1x1 outputs (nothing to localize at this input size) are marked unusable."""
    records = _probe(model, input_size)
    modules = dict(model.named_modules())
    table = []
    for name in list_layers(model, input_size=input_size):
        shape = records[name].shape
        unusable = ("adaptive pooling (resamples only)" if isinstance(modules[name], _ADAPTIVE_POOLS)
                    else f"1x1 output at {input_size} px" if shape[2] * shape[3] == 1 else "")
        table.append(LayerInfo(name, shape, unusable))
    return table


def default_layer(model: nn.Module, *, input_size: int = PROBE_SIZE) -> str:
    """Default target layer of a model.

    ``model.gradloc_layer`` when the model defines it (the model registry sets it). Otherwise the module
    that completes last in a probe forward (zero image, ``input_size`` pixels, eval mode) among those of
    ``list_layers``, skipping adaptive pooling layers (they only resample) and preferring outputs with more
    than one spatial cell: for torchvision ResNets this is ``layer4``, for VGG and EfficientNet ``features``.

    Raises:
        ValueError: no module of the model returns a 4-D tensor.
    """
    declared = getattr(model, "gradloc_layer", None)
    if declared is not None:
        return str(declared)
    records = _probe(model, input_size)
    modules = dict(model.named_modules())
    candidates = [
        (rec.shape[2] * rec.shape[3] > 1, rec.order, name)
        for name, rec in records.items()
        if rec.calls == 1 and rec.shape is not None and len(rec.shape) == 4
        and not isinstance(modules[name], _ADAPTIVE_POOLS)
    ]
    if not candidates:
        raise ValueError(f"{type(model).__name__} has no module with a 4-D output on a "
                         f"{input_size}x{input_size} probe; pass the target layer name explicitly")
    name = max(candidates)[2]
    logger.debug("default layer of %s: %s", type(model).__name__, name)
    return name


def resolve_layer(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    """Find a target layer by exact module name, else by a unique dotted suffix.

    An exact name always wins: ``"bn2"`` is EfficientNet's last BatchNorm even though ``blocks.6.0.bn2`` ends
    with it too. A suffix helps with wrappers of your own: ``"layer4"`` resolves to ``"backbone.layer4"`` when a
    module nests a torchvision model as ``backbone`` (gradloc's heads never wrap: a layer's name is the same for
    every head). The returned full name is the canonical one (heatmap cache keys and protocol lines hold it).

    Returns:
        (full module name, module).

    Raises:
        ValueError: no module or several modules match; the message lists valid candidates.
    """
    modules = dict(model.named_modules())
    if name and name in modules:
        return name, modules[name]
    matches = [full for full in modules if name and full.endswith("." + name)]
    if len(matches) == 1:
        return matches[0], modules[matches[0]]
    if len(matches) > 1:
        raise ValueError(f"layer {name!r} is ambiguous in {type(model).__name__}: it matches "
                         f"{', '.join(matches[:_MAX_LISTED])}; give the full module name")
    candidates = list_layers(model)
    close = _close_matches(name, candidates)
    shortlist = sorted(candidates, key=lambda full: full.count("."))[:_MAX_LISTED]
    more = len(candidates) - len(shortlist)
    raise ValueError(
        f"{type(model).__name__} has no layer {name!r}"
        + (f" (did you mean {', '.join(close)}?)" if close else "")
        + f"; valid layers include {', '.join(shortlist)}"
        + (f" and {more} more (gradloc.cams.layers.list_layers(model))" if more > 0 else "")
    )


def _close_matches(name: str, candidates: list[str], n: int = 3) -> list[str]:
    """Candidates whose trailing dotted parts (as many as ``name`` has) look like ``name``."""
    depth = name.count(".") + 1
    ratios = [(difflib.SequenceMatcher(None, name, ".".join(full.split(".")[-depth:])).ratio(), full)
              for full in candidates]
    return [full for ratio, full in sorted(ratios, key=lambda pair: -pair[0]) if ratio >= 0.6][:n]
