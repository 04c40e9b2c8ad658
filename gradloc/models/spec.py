"""What a registered model is (:class:`ModelSpec`) and how its ImageNet weights are found (:class:`ResolvedWeights`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from gradloc.models.preprocessing import Preprocessing


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
