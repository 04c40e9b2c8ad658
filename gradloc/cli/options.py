"""Flag machinery shared by the commands: run flags by group, registry choices, progress bars, printing."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import click


def import_torch() -> None:
    """Import torch with Ctrl-C held back (:func:`gradloc.core.interrupts.deferred`): its import runs Python
    callbacks from C++ (pybind11), where a KeyboardInterrupt aborts the process (SIGABRT) instead of exiting
    130. Commands that compute call it first."""
    from gradloc.core.interrupts import deferred

    with deferred():
        import torch  # noqa: F401


def parse_floats(value: str | None, name: str) -> tuple[float, ...] | None:
    """A comma-separated list of numbers and ranges ``start:stop:step`` (stop included, e.g. ``0.5:0.95:0.05``
    = 0.5, 0.55, ..., 0.95), as the explicit list of floats. Only the syntax is checked here; which values
    are valid (IoU in (0, 1), τ in [0, 1], ...) is checked once, by :mod:`gradloc.core.ranges`."""
    if value is None:
        return None
    values: list[float] = []
    for item in (part.strip() for part in value.split(",")):
        if item:
            values += _expand_range(item, name) if ":" in item else [_number(item, value, name)]
    return tuple(values)


def _number(text: str, value: str, name: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers or ranges start:stop:step such as "
                                 f"0.01,0.02 or 0.5:0.95:0.05, got {value[:60]!r}", param_hint=name) from None


def _expand_range(item: str, name: str) -> list[float]:
    """``start:stop:step`` -> [start, start + step, ..., stop], in decimal arithmetic so that every value is
    the float of its decimal (0.5:0.95:0.05 gives 0.55, not 0.5 + 0.05 = 0.55000000000000004)."""
    from decimal import Decimal, InvalidOperation

    parts = item.split(":")
    try:
        start, stop, step = (Decimal(part.strip()) for part in parts)
        if not all(v.is_finite() for v in (start, stop, step)):
            raise InvalidOperation
    except (ValueError, InvalidOperation):
        raise click.BadParameter(f"range {item[:60]!r} is not start:stop:step with three numbers, e.g. "
                                 "0.5:0.95:0.05",
                                 param_hint=name) from None
    if step <= 0 or stop < start:
        raise click.BadParameter(f"range {item!r} needs start <= stop and a step > 0, e.g. 0.5:0.95:0.05",
                                 param_hint=name)
    steps = (stop - start) / step
    if steps != steps.to_integral_value():
        raise click.BadParameter(f"range {item!r}: {stop} is not reached from {start} in whole steps of {step}; "
                                 "make stop - start a multiple of step", param_hint=name)
    return [float(start + i * step) for i in range(int(steps) + 1)]


class RegistryChoice(click.Choice):
    """A ``click.Choice`` whose choices are read from a library registry when first needed (``--help`` or
    parsing a value), so that merely starting the CLI imports neither torch nor the models."""

    def __init__(self, load: Callable[[], Any]) -> None:  # no super().__init__: the choices are lazy
        self._load = load
        self._choices: tuple[str, ...] | None = None
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        if self._choices is None:
            self._choices = tuple(self._load())
        return self._choices

    @choices.setter
    def choices(self, value: Any) -> None:
        self._choices = tuple(value)


def registry_choice(module: str, name: str, keep: Callable[[Any], bool] | None = None) -> RegistryChoice:
    """The names of registry ``module.name`` (those whose entry ``keep`` accepts) as a lazy click choice."""

    def load() -> list[str]:
        from importlib import import_module

        registry = getattr(import_module(module), name)
        return [key for key in registry if keep is None or keep(registry[key])]

    return RegistryChoice(load)


def parse_names(value: str | None, name: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = tuple(item.strip() for item in value.split(",") if item.strip())
    if not names:
        raise click.BadParameter(f"expected comma-separated class names such as car,cat,bus, got {value[:60]!r}",
                                 param_hint=name)
    return names


# Flags that set a config key, in groups: a command shows the groups it uses (``cams --help`` has no --iou).
# group -> flag name -> (dotted config key, click option kwargs)
FLAG_GROUPS: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {
    "data": {
        "voc_root": ("data.voc_root", {"help": "VOCdevkit folder (holding VOC<year>/)."}),
        "year": ("data.year", {"help": "VOC year: 2007, 2012 (folder VOC<year>)."}),
        "split": ("data.split", {"help": "Image set of ImageSets/Main (train, val, trainval, test)."}),
        "limit": ("data.limit", {"type": int, "help": "Use only the first N images of the split."}),
        "on_error": ("data.on_error", {"type": registry_choice("gradloc.datasets.voc", "ON_ERROR_CHOICES"),
                                       "help": "Bad image/annotation: stop (raise) or skip and list it."}),
    },
    "model": {
        "model": ("model.name", {"help": "Model name (see `gradloc models`)."}),
        "weights": ("model.weights", {"help": "torchvision weights name, e.g. IMAGENET1K_V1."}),
        "checkpoint": ("model.checkpoint", {"help": "Local checkpoint file to read (gradloc checkpoint or "
                                                    "state dict)."}),
        "head": ("model.head", {"type": registry_choice("gradloc.models.build", "HEADS"),
                                "help": "voc: trained head; imagenet: ImageNet classes mapped to VOC; "
                                        "voc+imagenet: both (product of probabilities)."}),
        "input_size": ("model.input_size", {"type": int,
                                            "help": "Network input size (pixels): the square's side, or the "
                                                    "short side for --resize-mode shortside."}),
        "resize_mode": ("model.resize_mode", {"type": registry_choice("gradloc.core.geometry", "RESIZE_MODES"),
                                              "help": "letterbox (square, aspect kept), stretch, or shortside "
                                                      "(short side = input size, aspect kept)."}),
    },
    "cams": {
        "method": ("cams.method", {"type": registry_choice("gradloc.cams.methods", "METHODS",
                                                     lambda method: not method.input_resolution),
                                   "help": "CAM method (see the README's method table)."}),
        "layer": ("cams.layer", {"help": "Target layer name (see `gradloc layers MODEL`)."}),
        "batch_size": ("cams.batch_size", {"type": int, "help": "Images per batch."}),
        "masked_batch": ("cams.masked_batch", {"type": int, "help": "Score-CAM: masked inputs per forward pass "
                                                                    "(default 2 on CPU, 32 on CUDA). Results do "
                                                                    "not depend on it."}),
        "flip": ("cams.flip", {"type": bool, "help": "Test-time horizontal flip: average each map with the "
                                                      "mirrored-back map of the mirrored image (--flip / --no-flip)."}),
        "aug_smooth": ("cams.aug_smooth", {"type": bool, "help": "pytorch-grad-cam's aug_smooth: average the maps "
                                                                  "of the image and its mirror at 0.9, 1, 1.1 times "
                                                                  "the input (6 passes; --aug-smooth / "
                                                                  "--no-aug-smooth)."}),
        "eigen_smooth": ("cams.eigen_smooth", {"type": bool, "help": "pytorch-grad-cam's eigen_smooth (gradient "
                                                                      "methods): the first principal component of "
                                                                      "the weighted activations instead of their "
                                                                      "sum."}),
        "device": ("cams.device", {"help": "torch device, e.g. cpu or cuda."}),
        "workers": ("cams.workers", {"type": int, "help": "Image decoding processes (default: 0 = in-process on a "
                                                         "CPU, from the CPU count for a GPU). Results do not "
                                                         "depend on it."}),
        "amp": ("cams.amp", {"type": bool,
                             "help": "Autocast the network up to the CAM layer: bfloat16 on a CPU with native "
                                     "bfloat16 (AVX512-BF16/AMX; else float32 and a note), float16 on CUDA "
                                     "(--amp / --no-amp)."}),
        "channels_last": ("cams.channels_last", {"type": bool,
                                                 "help": "Model and inputs in channels_last memory (default: "
                                                         "per model family, where measured faster)."}),
        "cache_dir": ("cache_dir", {"help": "Heatmap cache and demo data folder (default .gradloc-cache)."}),
        "seed": ("seed", {"type": int, "help": "Random seed (baselines, demo)."}),
    },
    "boxes": {
        "thresholds": ("boxes.thresholds", {"help": "Comma-separated τ in [0, 1] or ranges start:stop:step, e.g. "
                                                    "0.01,0.02,0.06 or 0.1:0.5:0.05."}),
        "threshold_mode": ("boxes.threshold_mode", {"type": registry_choice("gradloc.boxes.cut", "THRESHOLD_MODES"),
                                                    "help": "τ semantics: max (heat >= τ·max), minmax, percentile."}),
        "box_mode": ("boxes.box_mode", {"type": registry_choice("gradloc.boxes.cut", "BOX_MODES"),
                                        "help": "Boxes per class and τ: the largest component, all components, "
                                                "or their union."}),
        "confidence": ("boxes.confidence", {"type": registry_choice("gradloc.boxes.cut", "CONFIDENCES"),
                                            "help": "Detection score of a box (README: confidences)."}),
        "explain": ("boxes.explain", {"type": registry_choice("gradloc.boxes.explain", "EXPLAIN"),
                                      "help": "Classes that get boxes: predicted (p >= --score-cut), gt (GT-known) "
                                              "or all classes [config boxes.explain; was --classes]."}),
        "score_cut": ("boxes.score_cut", {"type": float, "help": "Probability cut for --explain predicted."}),
        "name": ("name", {"help": "Run name: the run folder is <out>/<name>/."}),
        "out": ("out", {"help": "Folder holding run folders (default results); --out is always a folder."}),
    },
    "score": {
        "iou": ("score.iou", {"help": "Comma-separated IoU thresholds or ranges start:stop:step (stop included), "
                                      "e.g. 0.3,0.4,0.5 or 0.5:0.95:0.05."}),
        "metric": ("score.metric", {"type": registry_choice("gradloc.scoring.voc", "METRICS"),
                                    "help": "voc07 = 11-point AP, voc10 = all-point AP."}),
        "only": ("score.only", {"help": "Score only these classes, e.g. car,cat,bus (mAP, CorLoc, pointing "
                                        "game and MaxBoxAccV2 are over them and say so); default all."}),
    },
}


RUN_FLAGS = {flag: spec for group in FLAG_GROUPS.values() for flag, spec in group.items()}


LIST_FLAGS = {"thresholds": parse_floats, "iou": parse_floats, "only": parse_names}


UNSET = "none"
"""A flag given as ``none`` unsets an optional config value (``--checkpoint none``, ``--layer none``,
``--limit none``): the key becomes null, as if the config did not set it."""


class _IntOrUnset(click.ParamType):
    """An integer flag that also takes :data:`UNSET`."""

    name = "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and value.strip().lower() == UNSET:
            return UNSET
        return click.INT.convert(value, param, ctx)


def run_options(*groups: str, config: bool = True) -> Callable[[Callable], Callable]:
    """Add ``--config`` (unless ``config`` is False) and the flags of ``groups`` (:data:`FLAG_GROUPS`, default
    all) to a command. Integer flags also take ``none`` (:data:`UNSET`)."""

    def decorate(command: Callable) -> Callable:
        flags = [item for group in (groups or FLAG_GROUPS) for item in FLAG_GROUPS[group].items()]
        for flag, (_, kwargs) in reversed(flags):
            name = flag.replace("_", "-")
            names = [f"--{name}/--no-{name}"] if kwargs.get("type") is bool else [f"--{name}"]
            options = {key: value for key, value in kwargs.items() if not (key == "type" and value is bool)}
            if options.get("type") is int:
                options["type"] = _IntOrUnset()
            command = click.option(*names, flag, default=None, **options)(command)
        if not config:
            return command
        return click.option("--config", "config_path", type=click.Path(dir_okay=False),
                            help="YAML config (configs/*.yaml); flags override it; a flag given as `none` "
                                 "unsets an optional value (e.g. --checkpoint none).")(command)

    return decorate


def build_config(config_path: str | None, flags: dict[str, Any], writes_run: bool = True):
    """The config file with the run flags (:data:`RUN_FLAGS`) applied, validated before any work starts (see
    :func:`checked_config`). A flag given as ``none`` (:data:`UNSET`) sets its config key to null when the key
    may be null, else is a usage error."""
    from gradloc.run.config import is_nullable

    overrides, given = {}, {}
    for flag, value in flags.items():
        if value is None or flag not in RUN_FLAGS:
            continue
        key, option = RUN_FLAGS[flag][0], f"--{flag.replace('_', '-')}"
        given[key] = option
        if isinstance(value, str) and value.strip().lower() == UNSET:
            if not is_nullable(key):
                raise click.BadParameter(f"{key} has no unset value; give one", param_hint=option)
            overrides[key] = None
            continue
        parse = LIST_FLAGS.get(flag)
        overrides[key] = parse(value, option) if parse else value
    if "boxes.thresholds" in overrides:
        _drop_unswept_selection(config_path, overrides)
    return checked_config(config_path, overrides, given, writes_run)


def _drop_unswept_selection(config_path: str | None, overrides: dict[str, Any]) -> None:
    """``--thresholds`` without the config's selected τ: the run has no selected τ (said once, on stderr)."""
    from gradloc.run.config import load_config

    if config_path is None or "boxes.selected_threshold" in overrides:
        return
    selected = load_config(config_path).boxes.selected_threshold
    if selected is not None and not any(abs(selected - tau) <= 1e-9 for tau in overrides["boxes.thresholds"]):
        click.echo(f"warning: --thresholds leaves out the config's selected tau {selected:g} "
                   "(boxes.selected_threshold): this run has no selected tau; its tables show every tau, the best "
                   "of them being an oracle choice", err=True)
        overrides["boxes.selected_threshold"] = None


def checked_config(config_path: str | None, overrides: dict[str, Any], given: dict[str, str],
                   writes_run: bool = True):
    """A config file with ``overrides`` (dotted key -> value) applied, validated before any work starts:
    types, ranges, names, registries and places (:func:`gradloc.run.config.check_places`; ``writes_run``: the
    command writes a run folder). An error in a value a flag set names the flag first (``given``: dotted key
    -> flag, e.g. ``--seed: config key 'seed': ...``)."""
    from gradloc.run.config import ConfigError, check_places, load_config
    from gradloc.run.setup import check_names

    try:
        config = load_config(config_path, overrides)
        check_places(config, writes_run)
    except ConfigError as error:
        key = (error.key or "").split("[")[0]
        if key in given:
            raise ConfigError(f"{given[key]}: {error}", error.key) from None
        raise
    check_names(config)
    return config


class ThresholdType(click.ParamType):
    """A τ flag (``--threshold``, ``--per-class``): a number in [0, 1] with at most the file-name precision
    (:func:`gradloc.core.ranges.threshold_label`), ``-0`` read as 0. Not a number is a usage error (exit 2,
    as for any number flag); a number out of range is an input error (one line, exit 1) naming the flag, like
    every value checked against :mod:`gradloc.core.ranges`."""

    name = "tau"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        from gradloc.core.ranges import threshold_label

        flag = f"--{param.name.replace('_', '-')}" if param is not None and param.name else "threshold"
        try:
            tau = float(value)
        except ValueError:
            self.fail(f"expected a number in [0, 1] such as 0.2, got {str(value)[:40]!r}", param, ctx)
        threshold_label(tau, flag)
        return tau + 0.0


THRESHOLD = ThresholdType()


@contextmanager
def tqdm_bar(ctx: click.Context, **kwargs: Any) -> Iterator[Any]:
    """A tqdm bar on stderr (off with --quiet); while it is shown, log records go through ``tqdm.write``
    (tqdm's logging handler) so that they print above the bar instead of inside it."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    disable = kwargs.pop("disable", False) or ctx.obj["quiet"]
    with logging_redirect_tqdm(), tqdm(disable=disable, file=sys.stderr, dynamic_ncols=True, **kwargs) as bar:
        yield bar


@contextmanager
def progress_bar(ctx: click.Context, total: int, desc: str, unit: str = "img") -> Iterator[Callable[[int], None]]:
    with tqdm_bar(ctx, total=total, desc=desc, unit=unit, disable=total == 0) as bar:
        yield bar.update


def say(ctx: click.Context, message: str) -> None:
    """Informational output (suppressed by --quiet)."""
    if not ctx.obj["quiet"]:
        click.echo(message, err=True)


def prepare(ctx: click.Context, config):
    from gradloc.run.setup import prepare_demo

    if not config.demo.enabled:
        return config
    say(ctx, "demo: synthetic VOC-layout dataset and tiny CNN (generated once, then reused)")
    with tqdm_bar(ctx, desc="train demo CNN", unit="epoch") as bar:

        def report(epoch: int, epochs: int, loss: float) -> None:
            bar.total = epochs
            bar.set_postfix(loss=f"{loss:.3f}")
            bar.update(epoch - bar.n)

        return prepare_demo(config, progress=report)


def stage_progress(ctx: click.Context):
    """The progress factory the pipeline expects: ``(description, total) -> tqdm's update``."""
    return lambda description, total: progress_bar(ctx, total, description)


def print_scores(ctx: click.Context, rows, meta, wsol, fmt: str = "table", coco=None, **options: Any) -> None:
    """Score rows as one document on stdout (``options``: digits, layout, per_class, corloc, headline of
    :func:`gradloc.scoring.tables.render`); human formats add the WSOL lines and the COCO-style table
    (``coco``: rows of :func:`gradloc.run.score.coco_scores`) when given. --quiet does not change stdout."""
    from gradloc.scoring.tables import TABLE_FORMATS, render

    click.echo(render(rows, fmt, meta, **options), nl=False)
    if fmt in TABLE_FORMATS and wsol is not None:
        click.echo("\n" + localization_lines(wsol, options.get("digits", 2), meta.get("only")))
    if fmt in TABLE_FORMATS and coco is not None:
        from gradloc.scoring.coco import render_coco

        classes = f"the classes {', '.join(meta['only'])} (--only)" if meta.get("only") else "classes"
        click.echo(f"\nCOCO-style AP (mean over {classes}, in %; beside the VOC numbers above, not comparable "
                   "with them):\n" + render_coco(coco, TABLE_FORMATS[fmt], options.get("digits", 2)), nl=False)


def localization_lines(wsol, digits: int, only: Sequence[str] | None = None) -> str:
    """The mean WSOL rows as text (over the classes ``only`` when given); τ-free metrics (pointing game) name
    no τ; a mean over all classes with absent ones as 0 (TorchRay's) says so."""
    from gradloc.run.score import MEAN_ALL_CLASSES

    means = wsol[wsol["class"].isin(["mean", MEAN_ALL_CLASSES])]
    labels = [f"{r.metric}{', ' + r._3 if r._3 == MEAN_ALL_CLASSES else ''}" for r in means.itertuples()]
    width = max((len(label) for label in labels), default=0)
    lines = [f"  {label:<{width}} {'' if r.threshold != r.threshold else f'tau={r.threshold:g}':<10} "
             f"{100 * r.value:6.{digits}f} %  (n={r.n})" for label, r in zip(labels, means.itertuples(), strict=True)]
    classes = f"the classes {', '.join(only)} (--only)" if only else "classes"
    return (f"Localization (mean over {classes} unless said, in %; CorLoc per tau, pointing game tau-free):\n"
            + "\n".join(lines))


def shard_option(command: Callable) -> Callable:
    """``--shard i/n``: compute one shard of the heatmap cache (job arrays); see gradloc.run.distributed."""
    return click.option("--shard", default=None, metavar="I/N",
                        help="Compute only shard I of N of the heatmap cache (every N-th planned batch from "
                             "batch I), then stop; `gradloc merge` uses the filled cache.")(command)


SINGLE_IOU_HELP = ("IoU of {what}: one value (the flag is --iou everywhere; `run`, `score` and `sweep` take a "
                   "comma-separated list or ranges such as 0.5:0.95:0.05).")


def parse_ious(value: str) -> tuple[float, ...]:
    """``--iou`` of a command that scores: comma-separated IoU thresholds, each in (0, 1), none twice, checked
    before any file is read (:func:`gradloc.core.ranges.check_ious`)."""
    from gradloc.core.ranges import check_ious

    return check_ious(parse_floats(value, "--iou"), "--iou")


def one_iou(value: str) -> float:
    """``--iou`` of a command that shows one IoU: the same syntax as the list, exactly one value."""
    ious = parse_ious(value)
    if len(ious) != 1:
        raise click.BadParameter(f"this command shows one IoU, got {value[:60]!r}; give one value such as 0.5",
                                 param_hint="--iou")
    return ious[0]


def digits_option(command: Callable) -> Callable:
    """``--digits N``: decimals of the printed percentages (score, compare, sweep)."""
    return click.option("--digits", type=click.IntRange(min=0, max=12), default=2, show_default=True,
                        help="Decimals of the percentages in tables.")(command)
