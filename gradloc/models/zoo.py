"""The model registry :data:`MODELS`: torchvision CNNs, EfficientNet-Lite0/1/2 and the demo CNN."""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict
from functools import partial
from typing import Any

import torchvision
from torch import Tensor, nn
from torchvision.models import get_model, get_model_weights

from gradloc.models.demo_cnn import DemoNet
from gradloc.models.lite import build_lite, lite_preprocessing, lite_resolver, lite_state_dict_to_timm
from gradloc.models.own import TORCHVISION_PREFIX, is_own_model
from gradloc.models.preprocessing import Preprocessing
from gradloc.models.registry import (
    DEMO_INPUT_SIZE,
    EXTRA_WIRING,
    LITE_VARIANTS,
    UNSUPPORTED_FAMILIES,
    hub_file,
    torchvision_wiring,
)
from gradloc.models.spec import ModelSpec, ResolvedWeights

logger = logging.getLogger(__name__)


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
        path = hub_file(chosen.url)
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


def _extra_specs() -> dict[str, ModelSpec]:
    specs = {
        variant: ModelSpec(
            name=variant, build=partial(build_lite, variant), preprocessing=lite_preprocessing(variant),
            resolve_weights=lite_resolver(variant), convert_state_dict=partial(lite_state_dict_to_timm,
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
    """The registry entry of ``name`` (``torchvision:NAME`` is the registry name NAME).

    Raises:
        ValueError: unknown name (the message suggests close names) or an unsupported torchvision model.
    """
    spec = MODELS.get(name.removeprefix(TORCHVISION_PREFIX) if name.startswith(TORCHVISION_PREFIX) else name)
    if spec is not None:
        return spec
    if is_own_model(name):
        raise ValueError(f"--model {name} is your own model: `gradloc run`, `cams` and `layers` explain it as "
                         "given; `gradloc train` trains heads of the models `gradloc models` lists")
    reason = next((why for prefix, why in UNSUPPORTED_FAMILIES.items() if name.startswith(prefix)), None)
    if reason is not None:
        raise ValueError(f"model {name!r} is {reason}; gradloc needs a CNN with a spatial feature map "
                         "(see `gradloc models`)")
    close = difflib.get_close_matches(name, list(MODELS), n=4, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ValueError(f"unknown model {name!r}; {hint}`gradloc models` lists the {len(MODELS)} known models")


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


def replace_linear(model: nn.Module, name: str, n_out: int) -> nn.Linear:
    """Replace the ``nn.Linear`` called ``name`` by a fresh ``Linear(in_features, n_out)``; return it."""
    old = model.get_submodule(name)
    if not isinstance(old, nn.Linear):
        raise ValueError(f"{type(model).__name__}.{name} is a {type(old).__name__}, not the final nn.Linear")
    new = nn.Linear(old.in_features, n_out, bias=old.bias is not None)
    model.set_submodule(name, new)
    return new


def load_state(model: nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        summary = " ".join(lines[1:3]) if len(lines) > 1 else lines[0]
        raise ValueError(f"{what}: {summary[:400]}") from None
