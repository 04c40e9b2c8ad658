"""Run configuration: frozen dataclasses, YAML loading (safe), flag overrides, validation, hashing.

Loading a config has no side effects: it never creates folders, downloads or redirects output.
Unknown keys and values of the wrong type are errors that name the key (``boxes.thresholds[2]``).
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from gradloc.boxes.cut import BoxParams
from gradloc.boxes.explain import EXPLAIN
from gradloc.core.files import to_plain
from gradloc.core.geometry import RESIZE_MODES
from gradloc.core.ranges import SCORE_CUT_RANGE, ValidRange, check_ious, check_thresholds
from gradloc.datasets.voc import VOC_CLASSES, VOCDataset

logger = logging.getLogger(__name__)




class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


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
    :func:`gradloc.cams.methods.compute_cams`);
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
    workers: int | None = None
    amp: bool = False
    channels_last: bool | None = None
    masked_batch: int | None = None


@dataclass(frozen=True)
class BoxConfig(BoxParams):
    """How heatmaps become boxes: the box parameters of :class:`gradloc.boxes.cut.BoxParams` (threshold_mode,
    box_mode, connectivity, min_area, confidence, nms_iou, max_side; validated there) plus the sweep of
    thresholds, which classes are explained (:data:`gradloc.boxes.explain.EXPLAIN`), and the baselines.
    ``selected_threshold``: the τ of the sweep recommended for this config, chosen on another split than the
    one reported (e.g. `train` for `val`); ``gradloc show`` and ``gradloc export`` default to it; None = no
    recommendation."""

    thresholds: tuple[float, ...] = (0.01, 0.02, 0.06, 0.15, 0.2)
    selected_threshold: float | None = None
    explain: str = "predicted"
    score_cut: float = 0.5
    baselines: tuple[str, ...] = ("center", "full", "random")


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
                errors.append(str(error))
        raise ConfigError(errors[0])
    if origin is tuple:
        (item_type, _) = typing.get_args(annotation)
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise ConfigError(f"config key {key!r}: expected a list, got {value!r}")
        return tuple(_coerce(item, item_type, f"{key}[{i}]") for i, item in enumerate(value))
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key!r}: expected a mapping of settings, got {value!r}")
        return _build(annotation, value, prefix=f"{key}.")
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected true or false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")  # a bug in this module, not user input


def _build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; valid keys here: {', '.join(sorted(names))}"
        )
    values = {name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**values)
    except ValueError as error:  # a dataclass's own validation (e.g. BoxParams)
        raise ConfigError(f"config: {error}") from None


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


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
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
        if loaded is not None and not isinstance(loaded, Mapping):
            raise ConfigError(f"{path}: expected a mapping of settings at the top level")
        data = dict(loaded or {})
    for dotted, value in (overrides or {}).items():
        nested: Any = value
        for part in reversed(dotted.split(".")):
            nested = {part: nested}
        data = _merge(data, nested)
    config = _build(RunConfig, data)
    validate(config)
    return config


def _check_range(key: str, value: float, valid: ValidRange) -> None:
    if value not in valid:
        raise ConfigError(f"config key {key!r}: {value} is outside {valid}")


def _checked(check, values, key: str) -> None:
    """A core.ranges check of a config key, as a ConfigError."""
    try:
        check(values, f"config key {key}")
    except ValueError as error:
        raise ConfigError(str(error)) from None


def validate(config: RunConfig) -> None:
    """Value checks that types alone cannot express. Registries are checked by the stages themselves."""
    _checked(check_thresholds, config.boxes.thresholds, "boxes.thresholds")
    selected = config.boxes.selected_threshold
    if selected is not None and not any(abs(selected - tau) <= 1e-9 for tau in config.boxes.thresholds):
        raise ConfigError(f"config key 'boxes.selected_threshold': {selected} is not one of boxes.thresholds "
                          f"({', '.join(f'{t:g}' for t in config.boxes.thresholds)})")
    _checked(check_ious, config.score.iou, "score.iou")
    if config.boxes.explain not in EXPLAIN:
        raise ConfigError(f"config key 'boxes.explain': {config.boxes.explain!r} is not one of "
                          f"{', '.join(EXPLAIN)}")
    unknown = [name for name in config.score.only if name not in config.data.classes]
    if unknown and not config.demo.enabled:
        raise ConfigError(f"config key 'score.only': {unknown[0]!r} is not a class of data.classes "
                          f"({', '.join(config.data.classes)})")
    if len(set(config.score.only)) != len(config.score.only):
        raise ConfigError(f"config key 'score.only': a class is listed twice ({', '.join(config.score.only)})")
    _check_range("boxes.score_cut", config.boxes.score_cut, SCORE_CUT_RANGE)
    if config.data.on_error not in ("raise", "skip"):
        raise ConfigError(f"config key 'data.on_error': {config.data.on_error!r} is not one of raise, skip")
    if config.model.resize_mode is not None and config.model.resize_mode not in RESIZE_MODES:
        raise ConfigError(f"config key 'model.resize_mode': {config.model.resize_mode!r} is not one of "
                          f"{', '.join(RESIZE_MODES)}")
    if config.cams.store_dtype not in ("float16", "float32"):
        raise ConfigError(f"config key 'cams.store_dtype': {config.cams.store_dtype!r} is not float16 or float32")
    for key, value in (("train.l2", config.train.l2), ("train.weight_decay", config.train.weight_decay)):
        if value < 0:
            raise ConfigError(f"config key {key!r}: {value} must be >= 0")
    for key, value in (("cams.batch_size", config.cams.batch_size), ("cams.masked_batch", config.cams.masked_batch),
                       ("data.limit", config.data.limit),
                       ("train.epochs", config.train.epochs), ("train.batch_size", config.train.batch_size),
                       ("train.limit", config.train.limit),
                       ("model.input_size", config.model.input_size), ("boxes.max_side", config.boxes.max_side)):
        if value is not None and value < 1:
            raise ConfigError(f"config key {key!r}: {value} must be at least 1")
    if config.cams.workers is not None and config.cams.workers < 0:
        raise ConfigError(f"config key 'cams.workers': {config.cams.workers} must be 0 (decode in-process) or more")
    if not config.name or "/" in config.name or config.name in (".", ".."):
        raise ConfigError(f"config key 'name': {config.name!r} is not a usable folder name")
