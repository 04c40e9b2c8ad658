"""Run configuration: frozen dataclasses, YAML loading (safe), flag overrides, validation, hashing.

Loading a config has no side effects: it never creates folders, downloads or redirects output.
Unknown keys and values of the wrong type are errors that name the key (``boxes.thresholds[2]``); every
number must be finite and inside its range (:data:`LIMITS`, so ``--input-size 30000`` is refused before it
allocates gigabytes); the run name must be a usable folder name (:func:`gradloc.core.names.check_name`).
Config files are untrusted input: YAML aliases are refused (a few hundred bytes of nested aliases expand to
gigabytes), files are bounded in size, and errors quote at most a short excerpt of a bad value.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from gradloc.boxes.cut import BoxParams
from gradloc.boxes.explain import EXPLAIN
from gradloc.core.files import to_plain
from gradloc.core.folders import owner_of
from gradloc.core.geometry import RESIZE_MODES
from gradloc.core.names import check_name, excerpt
from gradloc.core.ranges import (
    CENTER_SIZE_RANGE,
    MAX_INPUT_SIZE,
    SCORE_CUT_RANGE,
    ValidRange,
    check_ious,
    check_thresholds,
)
from gradloc.datasets.voc import VOC_CLASSES, VOCDataset, year_folder

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range; ``key`` is the dotted
    config key it concerns (None for the file as a whole), so the CLI can name the flag that set it."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


MAX_CONFIG_BYTES = 1_000_000
"""Largest config file read (configs are a few KB of text)."""


# Valid ranges (inclusive; None: unbounded) of the numeric settings. The upper bounds keep a typo from
# allocating gigabytes or starting thousands of processes.
LIMITS: dict[str, tuple[float, float | None]] = {
    "seed": (0, 2**32 - 1),
    "data.limit": (1, None),
    "demo.n_train": (1, 100_000), "demo.n_val": (1, 100_000), "demo.n_test": (1, 100_000),
    "demo.train_seconds": (0, 86_400),
    "model.input_size": (8, MAX_INPUT_SIZE),
    "cams.batch_size": (1, 4096), "cams.masked_batch": (1, 4096), "cams.workers": (0, 64),
    "boxes.max_side": (1, 8192),
    "train.epochs": (1, 1_000_000), "train.batch_size": (1, 65_536), "train.limit": (1, None),
    "train.lr": (0, None), "train.weight_decay": (0, None), "train.l2": (0, None), "train.seed": (0, 2**32 - 1),
}


@dataclass(frozen=True)
class DataConfig:
    """Which images: a VOCdevkit folder, its year (``VOC<year>/``), an image set and the class list."""

    voc_root: str = "../shared/voc/VOCdevkit"
    year: str = "2007"
    split: str = "val"
    classes: tuple[str, ...] = VOC_CLASSES
    limit: int | None = None
    on_error: str = "raise"


@dataclass(frozen=True)
class DemoConfig:
    """The built-in offline demo: a synthetic VOC-layout dataset and a tiny CNN trained on its train split."""

    enabled: bool = False
    n_train: int = 240
    n_val: int = 80
    n_test: int = 80
    train_seconds: float = 90.0


@dataclass(frozen=True)
class ModelConfig:
    """The classifier: registry name, torchvision weights name or local checkpoint, and its VOC head.

    ``input_size`` / ``resize_mode`` None: the checkpoint's (else the weights' size, ``letterbox``); a
    gradloc checkpoint trained with other values is refused."""

    name: str = "efficientnet_lite0"
    weights: str | None = None
    checkpoint: str | None = None
    head: str = "voc"
    input_size: int | None = None
    resize_mode: str | None = None


@dataclass(frozen=True)
class TrainSettings:
    """How ``gradloc train --config`` trains the model's ``voc`` head (:class:`gradloc.run.train.TrainConfig`).

    The VOC folder, year, classes, model, weights, input size, resize mode and device come from the
    ``data``, ``model`` and ``cams`` sections, so the head is trained with exactly the run's preprocessing.
    ``mode``: ``linear``, ``finetune_last`` or ``lbfgs``; ``epochs`` / ``lr``: None = the mode's defaults;
    ``l2``: L2 penalty on the weights of the ``lbfgs`` head; ``weight_decay``: AdamW's (other modes).
    """

    mode: str = "linear"
    split: str = "train"
    val_split: str | None = "val"
    epochs: int | None = None
    lr: float | None = None
    batch_size: int = 64
    weight_decay: float = 1e-4
    l2: float = 1e-4
    seed: int = 0
    limit: int | None = None


@dataclass(frozen=True)
class CamConfig:
    """The CAM method, target layer (None = the model's default) and engine settings; ``flip``: average each
    raw map with the mirrored-back map of the mirrored image (test-time flip,
    :func:`gradloc.cams.methods.compute_cams`); ``aug_smooth``: pytorch-grad-cam's test-time augmentation (the
    image and its mirror at 0.9, 1, 1.1 times the input, each map scaled to max 1, averaged; not with ``flip``);
    ``eigen_smooth``: the gradient methods' maps from the first principal component of the weighted
    activations (pytorch-grad-cam's option);
    ``workers``: decode processes (None = :func:`gradloc.cams.loader.default_workers`: in-process on a CPU, from
    the CPU count for a GPU; 0 = in-process; results do not depend on it);
    ``amp``: autocast the network up to the target layer (bfloat16 on a CPU with native bfloat16, float16 on
    CUDA; :mod:`gradloc.models.execution`); ``channels_last``: the model and inputs in channels_last memory
    (None = the model family's registry fact); ``masked_batch``: Score-CAM's masked inputs per forward pass
    (None = :func:`gradloc.cams.methods.default_masked_batch` of the device; results do not depend on it)."""

    method: str = "gradcam"
    layer: str | None = None
    batch_size: int = 16
    device: str = "cpu"
    store_dtype: str = "float32"
    flip: bool = False
    aug_smooth: bool = False
    eigen_smooth: bool = False
    workers: int | None = None
    amp: bool = False
    channels_last: bool | None = None
    masked_batch: int | None = None


@dataclass(frozen=True)
class BoxConfig(BoxParams):
    """How heatmaps become boxes: the box parameters of :class:`gradloc.boxes.cut.BoxParams` (threshold_mode,
    box_mode, connectivity, min_area, confidence, nms_iou, max_side; validated there) plus the sweep of
    thresholds, which classes are explained (:data:`gradloc.boxes.explain.EXPLAIN`), the baselines
    (:mod:`gradloc.boxes.baselines`) and ``center_size``, the fraction of the image's width and height the
    ``center`` baseline box covers (0.5: the middle half; choose it on another split, like τ).
    ``selected_threshold``: the τ of the sweep recommended for this config, chosen on another split than the
    one reported (e.g. `train` for `val`); ``run``, ``score`` and ``info`` lead with its scores, ``show`` and
    ``export`` default to it; None = no recommendation. ``selected_on``: where it was chosen, a split name
    first (e.g. ``train (5-fold CV)``; ignored without ``selected_threshold``); a τ chosen on the split a run
    evaluates is labelled an oracle."""

    thresholds: tuple[float, ...] = (0.01, 0.02, 0.06, 0.15, 0.2)
    selected_threshold: float | None = None
    selected_on: str | None = None
    explain: str = "predicted"
    score_cut: float = 0.5
    baselines: tuple[str, ...] = ("center", "full", "shuffled", "blob")
    center_size: float = 0.5


@dataclass(frozen=True)
class ScoreConfig:
    """How detections are scored: IoU thresholds, the AP variant, and ``only``: the class names scored (empty:
    every class of ``data.classes``; the mAP is then over these classes, and says so)."""

    iou: tuple[float, ...] = (0.3, 0.4, 0.5)
    metric: str = "voc07"
    only: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunConfig:
    """A whole run. Outputs go to ``<out>/<name>/``; reusable heatmaps to ``<cache_dir>``."""

    name: str = "run"
    out: str = "results"
    cache_dir: str = ".gradloc-cache"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    cams: CamConfig = field(default_factory=CamConfig)
    boxes: BoxConfig = field(default_factory=BoxConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    train: TrainSettings = field(default_factory=TrainSettings)

    @property
    def run_dir(self) -> Path:
        return Path(self.out) / self.name

    def to_dict(self) -> dict[str, Any]:
        return to_plain(dataclasses.asdict(self))


def open_dataset(config: RunConfig, split: str | None = None) -> VOCDataset:
    """The VOC split of a run config (``split``: another image set of the same VOCdevkit)."""
    data = config.data
    return VOCDataset(data.voc_root, year=data.year, split=split or data.split, classes=data.classes,
                      on_error=data.on_error, limit=data.limit)


def packaged_config(name: str) -> Path:
    """A config shipped inside the package (``gradloc/data/<name>.yaml``, e.g. ``demo``), so that it is there
    after a plain ``pip install``.

    Raises:
        FileNotFoundError: no such packaged config.
    """

    path = Path(str(files("gradloc") / "data" / f"{name}.yaml"))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: packaged config {name!r} not found; reinstall gradloc")
    return path


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a type annotation (the small subset used above), converting lists to tuples."""
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(error)
        raise errors[0]
    if origin is tuple:
        (item_type, _) = typing.get_args(annotation)
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise ConfigError(f"config key {key!r}: expected a list, got {excerpt(value)}", key)
        return tuple(_coerce(item, item_type, f"{key}[{i}]") for i, item in enumerate(value))
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key!r}: expected a mapping of settings, got {excerpt(value)}", key)
        return _build(annotation, value, prefix=f"{key}.")
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"config key {key!r}: expected a number, got {excerpt(value)}", key)
        if not math.isfinite(value):
            raise ConfigError(f"config key {key!r}: expected a finite number, got {value}", key)
        return float(value) + 0.0  # -0 is 0
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r}: expected an integer, got {excerpt(value)}", key)
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected true or false, got {excerpt(value)}", key)
        return value
    if annotation is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected a string, got {excerpt(value)}", key)
        return str(value)
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")  # a bug in this module, not user input


def _build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted((key for key in data if key not in names), key=str)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{str(unknown[0])[:60]}; valid keys here: "
                          f"{', '.join(sorted(names))}", f"{prefix}{unknown[0]}")
    values = {name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**values)
    except ValueError as error:  # a dataclass's own validation (e.g. BoxParams)
        raise ConfigError(f"config: {error}") from None


def is_nullable(key: str) -> bool:
    """Whether the dotted config key (``model.checkpoint``) may be null (``None``), i.e. unset.

    Raises:
        ConfigError: no such key.
    """
    annotation: Any = RunConfig
    for part in key.split("."):
        hints = typing.get_type_hints(annotation) if dataclasses.is_dataclass(annotation) else {}
        if part not in hints:
            raise ConfigError(f"unknown config key {key}")
        annotation = hints[part]
    return type(None) in typing.get_args(annotation)


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _with_dotted(data: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with each override (a dotted key such as ``boxes.box_mode``, or a nested dict) merged in."""
    for dotted, value in overrides.items():
        nested: Any = value
        for part in reversed(dotted.split(".")):
            nested = {part: nested}
        data = _merge(data, nested)
    return data


def with_overrides(config: RunConfig, overrides: Mapping[str, Any]) -> RunConfig:
    """``config`` with ``overrides`` (dotted keys, e.g. ``{"boxes.box_mode": "union"}``) applied and the result
    validated as a loaded config is.

    Raises:
        ConfigError: an unknown key, a wrong type or an invalid value, naming the key.
    """
    data = _with_dotted(config.to_dict(), overrides)
    merged = _build(RunConfig, data)
    validate(merged)
    return merged


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses aliases (``*name``): a few hundred bytes of nested aliases expand to
    gigabytes (the "billion laughs" of YAML), and a config never needs them."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(f"line {event.start_mark.line + 1}: alias *{str(event.anchor)[:40]} refused; "
                                 "configs may not use YAML aliases, write the value out")
        return super().compose_node(parent, index)


def read_yaml(path: Path) -> Any:
    """The plain data of a YAML config file, read as untrusted input: at most :data:`MAX_CONFIG_BYTES`, no
    aliases, no tags beyond the safe ones.

    Raises:
        ConfigError: naming the file and the problem (the first line of YAML's message).
    """
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {size:,} bytes; a config is a small text file (at most {MAX_CONFIG_BYTES:,})")
    try:
        return yaml.load(path.read_bytes(), Loader=_NoAliasLoader)  # a SafeLoader without aliases
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0][:200]})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML (nested too deeply)") from None


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Load a YAML config (or the defaults), apply ``overrides`` (nested dict or dotted keys), validate.

    Raises:
        FileNotFoundError: the config file does not exist.
        ConfigError: malformed YAML, unknown keys, wrong types or invalid values; the message names the key.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config file not found (see configs/ for examples)")
        loaded = read_yaml(path)
        if loaded is not None and not isinstance(loaded, Mapping):
            raise ConfigError(f"{path}: expected a mapping of settings at the top level, found "
                              f"{type(loaded).__name__}")
        data = dict(loaded or {})
    data = _with_dotted(data, overrides or {})
    config = _build(RunConfig, data)
    validate(config)
    return config


def _check_range(key: str, value: float, valid: ValidRange) -> None:
    if value not in valid:
        raise ConfigError(f"config key {key!r}: {value} is outside {valid}", key)


def _checked(check, values, key: str) -> None:
    """A core.ranges check of a config key, as a ConfigError."""
    try:
        check(values, f"config key {key}")
    except ValueError as error:
        raise ConfigError(str(error), key) from None


def _one_of(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"config key {key!r}: {excerpt(value)} is not one of {', '.join(choices)}", key)


def _setting(config: RunConfig, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def validate(config: RunConfig) -> None:
    """Value checks that types alone cannot express. Registries are checked by the stages themselves."""
    _checked(check_thresholds, config.boxes.thresholds, "boxes.thresholds")
    selected = config.boxes.selected_threshold
    if selected is not None and not any(abs(selected - tau) <= 1e-9 for tau in config.boxes.thresholds):
        raise ConfigError(f"config key 'boxes.selected_threshold': {selected} is not one of boxes.thresholds "
                          f"({', '.join(f'{t:g}' for t in config.boxes.thresholds)})", "boxes.selected_threshold")
    _checked(check_ious, config.score.iou, "score.iou")
    _one_of("boxes.explain", config.boxes.explain, list(EXPLAIN))
    unknown = [name for name in config.score.only if name not in config.data.classes]
    if unknown and not config.demo.enabled:
        raise ConfigError(f"config key 'score.only': {excerpt(unknown[0])} is not a class of data.classes "
                          f"({', '.join(config.data.classes)})", "score.only")
    if len(set(config.score.only)) != len(config.score.only):
        raise ConfigError(f"config key 'score.only': a class is listed twice ({', '.join(config.score.only)})",
                          "score.only")
    _check_range("boxes.score_cut", config.boxes.score_cut, SCORE_CUT_RANGE)
    _check_range("boxes.center_size", config.boxes.center_size, CENTER_SIZE_RANGE)
    _one_of("data.on_error", config.data.on_error, ("raise", "skip"))
    if config.model.resize_mode is not None:
        _one_of("model.resize_mode", config.model.resize_mode, RESIZE_MODES)
    _one_of("cams.store_dtype", config.cams.store_dtype, ("float16", "float32"))
    for key, (low, high) in LIMITS.items():
        value = _setting(config, key)
        if value is not None and (value < low or (high is not None and value > high)):
            valid = f"at least {low:,}" if high is None else f"between {low:,} and {high:,}"
            raise ConfigError(f"config key {key!r}: {value:,} must be {valid}", key)
    try:
        check_name(config.name, "config key 'name':")
    except ValueError as error:
        raise ConfigError(str(error), "name") from None


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def dataset_folder(config: RunConfig) -> Path | None:
    """The dataset a config reads, resolved: its VOCdevkit folder (the ``VOC<year>`` folder itself when
    ``data.voc_root`` names it); None when it cannot be found (opening the split then says why)."""
    try:
        year = year_folder(Path(config.data.voc_root).expanduser(), config.data.year)
    except FileNotFoundError:
        return None
    root = _real(config.data.voc_root)
    return _real(year) if _real(year) == root else _real(year).parent


def check_places(config: RunConfig, writes_run: bool = True) -> None:
    """Refuse outputs placed where one would be written into, or deleted with, another: the run folder
    (``<out>/<name>``, when ``writes_run``) or the heatmap cache (``cache_dir``) inside the dataset, the
    dataset inside the run folder, the cache inside the run folder (a rerun replaces the whole folder) or the
    run folder inside the cache; and the cache, the dataset or the run folder inside any other folder gradloc
    owns (a run or an export folder, :func:`gradloc.core.folders.owner_of`). Paths are compared after
    resolving symbolic links. A demo config's dataset is checked once it is prepared (it lives in the cache).

    Raises:
        ConfigError: naming the two places and the flag to change.
    """
    cache, run_dir = _real(config.cache_dir), _real(config.run_dir)
    prepared = not config.demo.enabled or Path(config.data.voc_root).is_relative_to(config.cache_dir)
    dataset = dataset_folder(config) if prepared else None
    rules = [(cache, dataset, "the heatmap cache (--cache-dir)", "inside the dataset", "cache_dir")]
    if writes_run:
        rules += [(run_dir, dataset, "the run folder (--out/--name)", "inside the dataset", "out"),
                  (dataset, run_dir, "the dataset (--voc-root)", "inside the run folder, which every rerun replaces",
                   "data.voc_root"),
                  (cache, run_dir, "the heatmap cache (--cache-dir)",
                   "inside the run folder, which every rerun replaces", "cache_dir"),
                  (run_dir, cache, "the run folder (--out/--name)", "inside the heatmap cache", "out")]
    for inner, outer, what, where, key in rules:
        if inner is not None and outer is not None and inner.is_relative_to(outer):
            raise ConfigError(f"{what} {inner} is {where} {outer}; put them side by side", key)
    held = [(cache, "the heatmap cache (--cache-dir)", "cache_dir"),
            (dataset, "the dataset (--voc-root)", "data.voc_root")]
    if writes_run:
        held.append((run_dir.parent, "the run folder (--out/--name)", "out"))
    for inner, what, key in held:
        owner = owner_of(inner) if inner is not None else None
        if owner is not None:
            raise ConfigError(f"{what} would be inside {owner}, a folder gradloc made and replaces whole (it holds "
                              "a .gradloc-* marker); put it elsewhere", key)
