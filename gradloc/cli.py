"""The ``gradloc`` command line: a thin click shell. Each command builds a config and calls the library.

Errors in the input are printed as one line (``error: ...``) with exit status 1; usage errors exit 2 (click);
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import yaml

from gradloc import __version__

# Box extraction does many tiny matrix products (back-projection); OpenBLAS's thread pool makes each of them
# 10-100x slower than one thread. Set before numpy is first imported (torch keeps its own thread pool).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

logger = logging.getLogger("gradloc")

# Errors that come from what the user gave us (files, values, names) or from the file system: one line,
# exit 1. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError)

QUIET_HELP = ("No progress bars, notes or INFO logs on stderr: only the command's output (tables, documents, "
              "file names), warnings and errors.")


def _output_flag(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    """``--quiet`` / ``--debug`` given after the command name: same effect as before it."""
    if value:
        ctx.ensure_object(dict)[param.name] = True
        logging.getLogger().setLevel(logging.DEBUG if param.name == "debug" else logging.WARNING)
    return value


class GradlocGroup(click.Group):
    """Runs a command and turns input errors into one line on stderr (traceback only with --debug).

    Every command also accepts ``--quiet``/``-q`` and ``--debug`` after its name."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        cmd.params += [
            click.Option(["--quiet", "-q"], is_flag=True, expose_value=False, callback=_output_flag,
                         help=QUIET_HELP),
            click.Option(["--debug"], is_flag=True, expose_value=False, callback=_output_flag,
                         help="Show full tracebacks and debug logging."),
        ]
        super().add_command(cmd, name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            _quiet_broken_pipe()
            sys.exit(141)  # 128 + SIGPIPE, what a shell pipeline expects from `cmd | head`
        except USER_ERRORS as error:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {error}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted: the run folder keeps its previous results and finished heatmaps stay "
                       "cached; rerun the same command to resume", err=True)
            sys.exit(130)


def _quiet_broken_pipe() -> None:
    """The reader of stdout went away (``| head``): point stdout at /dev/null so that the final flush at exit
    raises nothing either."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (click's test runner)
        pass


@click.group(cls=GradlocGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gradloc")
@click.option("--debug", is_flag=True, help="Show full tracebacks and debug logging.")
@click.option("--quiet", "-q", is_flag=True, help=QUIET_HELP)
@click.pass_context
def main(ctx: click.Context, debug: bool, quiet: bool) -> None:
    """gradloc: how well do Grad-CAM-family heatmaps localize objects in Pascal VOC?

    \b
    Example (offline demo, about two minutes on a laptop CPU):
      gradloc demo
    """
    ctx.ensure_object(dict).update(debug=debug, quiet=quiet)
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")


# --- shared options -----------------------------------------------------------------------------------------


def _floats(value: str | None, name: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return tuple(float(item) for item in value.split(",") if item.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers such as 0.01,0.02, got {value!r}",
                                 param_hint=name) from None


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


def _registry(module: str, name: str, keep: Callable[[Any], bool] | None = None) -> RegistryChoice:
    """The names of registry ``module.name`` (those whose entry ``keep`` accepts) as a lazy click choice."""

    def load() -> list[str]:
        from importlib import import_module

        registry = getattr(import_module(module), name)
        return [key for key in registry if keep is None or keep(registry[key])]

    return RegistryChoice(load)


def _names(value: str | None, name: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = tuple(item.strip() for item in value.split(",") if item.strip())
    if not names:
        raise click.BadParameter(f"expected comma-separated class names such as car,cat,bus, got {value!r}",
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
        "on_error": ("data.on_error", {"type": click.Choice(["raise", "skip"]),
                                       "help": "Bad image/annotation: stop (raise) or skip and list it."}),
    },
    "model": {
        "model": ("model.name", {"help": "Model name (see `gradloc models`)."}),
        "weights": ("model.weights", {"help": "torchvision weights name, e.g. IMAGENET1K_V1."}),
        "checkpoint": ("model.checkpoint", {"help": "Local checkpoint file to read (gradloc checkpoint or "
                                                    "state dict)."}),
        "head": ("model.head", {"type": _registry("gradloc.models", "HEADS"),
                                "help": "voc: trained head; imagenet: ImageNet classes mapped to VOC; "
                                        "voc+imagenet: both (product of probabilities)."}),
        "input_size": ("model.input_size", {"type": int,
                                            "help": "Network input size (pixels): the square's side, or the "
                                                    "short side for --resize-mode shortside."}),
        "resize_mode": ("model.resize_mode", {"type": _registry("gradloc.geometry", "RESIZE_MODES"),
                                              "help": "letterbox (square, aspect kept), stretch, or shortside "
                                                      "(short side = input size, aspect kept)."}),
    },
    "cams": {
        "method": ("cams.method", {"type": _registry("gradloc.cams", "METHODS",
                                                     lambda method: not method.input_resolution),
                                   "help": "CAM method (see the README's method table)."}),
        "layer": ("cams.layer", {"help": "Target layer name (see `gradloc layers MODEL`)."}),
        "batch_size": ("cams.batch_size", {"type": int, "help": "Images per batch."}),
        "masked_batch": ("cams.masked_batch", {"type": int, "help": "Score-CAM: masked inputs per forward pass "
                                                                    "(default 2 on CPU, 32 on CUDA). Results do "
                                                                    "not depend on it."}),
        "flip": ("cams.flip", {"type": bool, "help": "Test-time horizontal flip: average each map with the "
                                                      "mirrored-back map of the mirrored image (--flip / --no-flip)."}),
        "device": ("cams.device", {"help": "torch device, e.g. cpu or cuda."}),
        "workers": ("cams.workers", {"type": int, "help": "Image decoding processes (default: from the CPU count; "
                                                         "0 = in-process). Results do not depend on it."}),
        "amp": ("cams.amp", {"type": bool,
                             "help": "Autocast the CAM engine to float16 (CUDA only; --amp / --no-amp)."}),
        "cache_dir": ("cache_dir", {"help": "Heatmap cache and demo data folder (default .gradloc-cache)."}),
        "seed": ("seed", {"type": int, "help": "Random seed (baselines, demo)."}),
    },
    "boxes": {
        "thresholds": ("boxes.thresholds", {"help": "Comma-separated τ in [0, 1], e.g. 0.01,0.02,0.06."}),
        "threshold_mode": ("boxes.threshold_mode", {"type": _registry("gradloc.boxes", "THRESHOLD_MODES"),
                                                    "help": "τ semantics: max (heat >= τ·max), minmax, percentile."}),
        "box_mode": ("boxes.box_mode", {"type": _registry("gradloc.boxes", "BOX_MODES"),
                                        "help": "Boxes per class and τ: the largest component, all components, "
                                                "or their union."}),
        "confidence": ("boxes.confidence", {"type": _registry("gradloc.boxes", "CONFIDENCES"),
                                            "help": "Detection score of a box (README: confidences)."}),
        "explain": ("boxes.explain", {"type": _registry("gradloc.config", "EXPLAIN_CHOICES"),
                                      "help": "Classes that get boxes: predicted (p >= --score-cut), gt (GT-known) "
                                              "or all classes [config boxes.explain; was --classes]."}),
        "score_cut": ("boxes.score_cut", {"type": float, "help": "Probability cut for --explain predicted."}),
        "name": ("name", {"help": "Run name: the run folder is <out>/<name>/."}),
        "out": ("out", {"help": "Folder holding run folders (default results); --out is always a folder."}),
    },
    "score": {
        "iou": ("score.iou", {"help": "Comma-separated IoU thresholds, e.g. 0.3,0.4,0.5."}),
        "metric": ("score.metric", {"type": click.Choice(["voc07", "voc10"]),
                                    "help": "voc07 = 11-point AP, voc10 = all-point AP."}),
        "only": ("score.only", {"help": "Score only these classes, e.g. car,cat,bus (mAP, CorLoc, pointing "
                                        "game and MaxBoxAccV2 are over them and say so); default all."}),
    },
}
RUN_FLAGS = {flag: spec for group in FLAG_GROUPS.values() for flag, spec in group.items()}
LIST_FLAGS = {"thresholds": _floats, "iou": _floats, "only": _names}


def run_options(*groups: str) -> Callable[[Callable], Callable]:
    """Add ``--config`` and the flags of ``groups`` (:data:`FLAG_GROUPS`, default all) to a command."""

    def decorate(command: Callable) -> Callable:
        flags = [item for group in (groups or FLAG_GROUPS) for item in FLAG_GROUPS[group].items()]
        for flag, (_, kwargs) in reversed(flags):
            name = flag.replace("_", "-")
            names = [f"--{name}/--no-{name}"] if kwargs.get("type") is bool else [f"--{name}"]
            options = {key: value for key, value in kwargs.items() if not (key == "type" and value is bool)}
            command = click.option(*names, flag, default=None, **options)(command)
        return click.option("--config", "config_path", type=click.Path(dir_okay=False),
                            help="YAML config (configs/*.yaml); flags override it.")(command)

    return decorate


def build_config(config_path: str | None, flags: dict[str, Any]):
    """The config file with flags applied, validated (names included) before any work starts."""
    from gradloc.config import load_config
    from gradloc.pipeline import check_names

    overrides = {}
    for flag, value in flags.items():
        if value is None or flag not in RUN_FLAGS:
            continue
        parse = LIST_FLAGS.get(flag)
        overrides[RUN_FLAGS[flag][0]] = parse(value, f"--{flag.replace('_', '-')}") if parse else value
    config = load_config(config_path, overrides)
    check_names(config)
    return config


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


# --- stages -------------------------------------------------------------------------------------------------


def _prepare(ctx: click.Context, config):
    from gradloc.pipeline import prepare_demo

    if not config.demo.enabled:
        return config
    say(ctx, "demo: synthetic VOC-layout dataset and tiny CNN (generated once, then reused)")
    with tqdm_bar(ctx, desc="train demo CNN", unit="epoch") as bar:

        def report(epoch: int, epochs: int, loss: float) -> None:
            bar.total = epochs
            bar.set_postfix(loss=f"{loss:.3f}")
            bar.update(epoch - bar.n)

        return prepare_demo(config, progress=report)


def _stage(ctx: click.Context):
    """The progress factory the pipeline expects: ``(description, total) -> tqdm's update``."""
    return lambda description, total: progress_bar(ctx, total, description)


def _print_scores(ctx: click.Context, rows, meta, wsol, fmt: str = "table", **options: Any) -> None:
    """Score rows as one document on stdout (``options``: digits, layout, per_class of ``report.render``);
    human formats add the WSOL lines unless --quiet."""
    from gradloc.report import render

    click.echo(render(rows, fmt, meta, **options), nl=False)
    if fmt == "table" and wsol is not None and not ctx.obj["quiet"]:
        click.echo("\n" + localization_lines(wsol, options.get("digits", 2), meta.get("only")))


def localization_lines(wsol, digits: int, only: Sequence[str] | None = None) -> str:
    """The mean WSOL rows as text (over the classes ``only`` when given); τ-free metrics (pointing game) name
    no τ."""
    means = wsol[wsol["class"].isin(["mean", "all"])]
    width = max((len(str(metric)) for metric in means["metric"]), default=0)
    lines = [f"  {r.metric:<{width}} {'' if r.threshold != r.threshold else f'tau={r.threshold:g}':<10} "
             f"{100 * r.value:6.{digits}f} %  (n={r.n})" for r in means.itertuples()]
    classes = f"the classes {', '.join(only)} (--only)" if only else "classes"
    return (f"Localization (mean over {classes}, in %; CorLoc per tau, pointing game tau-free):\n"
            + "\n".join(lines))


def shard_option(command: Callable) -> Callable:
    """``--shard i/n``: compute one shard of the heatmap cache (job arrays); see gradloc.distributed."""
    return click.option("--shard", default=None, metavar="I/N",
                        help="Compute only shard I of N of the heatmap cache (every N-th planned batch from "
                             "batch I), then stop; `gradloc merge` uses the filled cache.")(command)


def _join_world(ctx: click.Context, shard: str | None, config):
    """Under torchrun: join the process group; ranks other than 0 print nothing but rank-tagged logs on
    stderr. Returns the :class:`gradloc.distributed.World` (None outside torchrun)."""
    from gradloc.distributed import init_process_group, world_from_env

    world = world_from_env()
    if world is None:
        return None
    if shard is not None:
        raise click.UsageError("--shard is for job arrays; under torchrun the ranks split the images themselves")
    backend = init_process_group(world, config.cams.device)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(f"[rank {world.rank}/{world.size}] %(levelname)s %(name)s: "
                                               "%(message)s"))
    if world.rank != 0:
        ctx.obj["quiet"] = True
    logger.info("torchrun: rank %d of %d (local rank %d, backend %s)", world.rank, world.size, world.local_rank,
                backend)
    return world


def _split_cams(ctx: click.Context, config, shard: str | None, world) -> dict[str, Any] | None:
    """The cams stage of one shard (``--shard``) or one torchrun rank. Returns None when this process is done
    (a shard, or a rank other than 0); on rank 0, the record of the split for manifest.json."""
    from gradloc.distributed import barrier, compute_shard, gather
    from gradloc.loader import parse_shard
    from gradloc.pipeline import plan_cams

    part = parse_shard(shard) if shard is not None else (world.rank, world.size)
    plan = plan_cams(config, shard=part)
    with progress_bar(ctx, plan.n_images, plan.description) as update:
        cache, _, computed = compute_shard(plan, update)
    if world is None:
        say(ctx, f"shard {part[0]}/{part[1]}: computed {computed} images into {cache.root}; once every shard has "
                 "run, `gradloc merge` (or `gradloc run`) with the same config cuts boxes and scores")
        return None
    counts = gather(computed)
    barrier()
    if world.rank != 0:
        logger.info("computed %d images; rank 0 cuts boxes and scores", computed)
        return None
    return {"world_size": world.size, "images_per_rank": counts,
            "split": "round robin over planned batches (gradloc.loader.shard_batches)"}


def _run_and_report(ctx: click.Context, config, original, prepare_seconds: float,
                    split: dict[str, Any] | None = None) -> None:
    """The whole pipeline on a prepared config, its tables and summary (``split``: recorded in manifest.json
    under ``distributed``)."""
    from gradloc.pipeline import run as run_pipeline
    from gradloc.runs import update_manifest

    result = run_pipeline(config, original, stage=_stage(ctx))
    if split is not None:
        update_manifest(result.run_dir, "distributed", split)
    _print_scores(ctx, result.rows, result.meta, result.localization)
    if result.dataset.skipped:
        say(ctx, f"skipped {len(result.dataset.skipped)} item(s): "
                 + "; ".join(f"{item['image_id']}: {item['reason']}" for item in result.dataset.skipped))
    say(ctx, f"run folder: {result.run_dir}  (heatmap cache: {result.cache.root})")
    times = {"prepare": prepare_seconds, **result.times.seconds}
    say(ctx, "time per stage: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))


@main.command()
@run_options()
@shard_option
@click.pass_context
def run(ctx: click.Context, config_path: str | None, shard: str | None, **flags: Any) -> None:
    """The whole pipeline: CAMs -> boxes at every threshold -> VOC scores.

    Under `torchrun --nproc-per-node N -m gradloc run ...` the ranks split the CAMs, then rank 0 cuts boxes
    and scores; with --shard I/N only that shard of the CAMs is computed.

    \b
    Examples:
      gradloc run --config configs/demo.yaml
      gradloc run --config configs/voc07_efficientnet_lite0.yaml --split val --thresholds 0.1,0.2
      torchrun --nproc-per-node 2 -m gradloc run --config configs/voc07_efficientnet_lite0.yaml
    """
    _run_and_print(ctx, config_path, flags, shard)


@main.command()
@run_options()
@click.pass_context
def demo(ctx: click.Context, config_path: str | None, **flags: Any) -> None:
    """The offline demo: `gradloc run` with the packaged demo config (a synthetic VOC-layout dataset and a tiny
    CNN trained on it, generated once under --cache-dir; no download). Flags override the demo config;
    --config is not taken.

    \b
    Examples:
      gradloc demo
      gradloc demo --out /tmp/results --cache-dir /tmp/gradloc-cache
    """
    from gradloc.config import packaged_config

    if config_path is not None:
        raise click.UsageError("demo runs the packaged demo config; use `gradloc run --config FILE` for yours")
    _run_and_print(ctx, str(packaged_config("demo")), flags)


def _run_and_print(ctx: click.Context, config_path: str | None, flags: dict[str, Any],
                   shard: str | None = None) -> None:
    from gradloc.distributed import finish, rank_zero_first
    from gradloc.runs import check_writable

    original = build_config(config_path, flags)
    world = _join_world(ctx, shard, original)
    try:
        if shard is None and (world is None or world.rank == 0):  # rank 0 alone writes (and locks) the folder
            check_writable(original.run_dir)  # before the demo is prepared: an unwritable --out costs no work
        start = time.perf_counter()
        with rank_zero_first(world):
            config = _prepare(ctx, original)
        prepare_seconds = time.perf_counter() - start
        split = None
        if shard is not None or world is not None:
            split = _split_cams(ctx, config, shard, world)
            if split is None:
                return
        _run_and_report(ctx, config, original, prepare_seconds, split)
    finally:
        if world is not None:
            finish()


@main.command()
@run_options()
@click.pass_context
def merge(ctx: click.Context, config_path: str | None, **flags: Any) -> None:
    """After `gradloc cams --shard I/N` for every I: check the cache is complete, then boxes and scores.

    A missing image is an error naming it and the shard that should have made it.

    \b
    Example:
      gradloc cams --config configs/voc07_efficientnet_lite0.yaml --shard 0/2   # job 0
      gradloc cams --config configs/voc07_efficientnet_lite0.yaml --shard 1/2   # job 1
      gradloc merge --config configs/voc07_efficientnet_lite0.yaml
    """
    from gradloc.distributed import check_filled
    from gradloc.runs import check_writable

    original = build_config(config_path, flags)
    check_writable(original.run_dir)
    start = time.perf_counter()
    config = _prepare(ctx, original)
    check_filled(config)
    _run_and_report(ctx, config, original, time.perf_counter() - start)


@main.command()
@run_options("data", "model", "cams")
@shard_option
@click.pass_context
def cams(ctx: click.Context, config_path: str | None, shard: str | None, **flags: Any) -> None:
    """Compute and cache raw CAM maps of all classes (resumable; reruns skip cached images).

    \b
    Examples:
      gradloc cams --config configs/voc07_resnet50.yaml --method gradcampp
      gradloc cams --config configs/voc07_resnet50.yaml --shard 3/8      # one job of an array of 8
      torchrun --nproc-per-node 4 -m gradloc cams --config configs/voc07_resnet50.yaml
    """
    from gradloc.distributed import finish, rank_zero_first
    from gradloc.pipeline import plan_cams

    original = build_config(config_path, flags)
    world = _join_world(ctx, shard, original)
    try:
        with rank_zero_first(world):
            config = _prepare(ctx, original)
        start = time.perf_counter()
        if (shard is not None or world is not None) and _split_cams(ctx, config, shard, world) is None:
            return
        plan = plan_cams(config)
        with progress_bar(ctx, plan.n_images, plan.description) as update:
            cache, dataset = plan.run(update)
        say(ctx, f"cache: {cache.root} ({len(dataset)} images, {cache.nbytes() / 1e6:.1f} MB, "
                 f"{time.perf_counter() - start:.1f} s)")
    finally:
        if world is not None:
            finish()


@main.command()
@run_options("data", "model", "cams", "boxes")
@click.pass_context
def boxes(ctx: click.Context, config_path: str | None, **flags: Any) -> None:
    """Cut boxes from cached maps at every threshold; write gt.pkl and detections/thr_<τ>.pkl.

    \b
    Example:
      gradloc boxes --config configs/demo.yaml --thresholds 0.1,0.2,0.3 --box-mode all
    """
    from gradloc.pipeline import open_cached, run_boxes
    from gradloc.runs import check_writable

    config = build_config(config_path, flags)
    check_writable(config.run_dir)
    config = _prepare(ctx, config)
    cache, dataset = open_cached(config)
    with progress_bar(ctx, len(dataset), f"boxes ({len(config.boxes.thresholds)} thresholds)") as update:
        run_dir = run_boxes(config, cache, dataset, progress=update)
    say(ctx, f"detections: {run_dir / 'detections'}")


SINGLE_IOU_HELP = ("IoU of {what}: one value (the flag is --iou everywhere; `run` and `score` take a "
                   "comma-separated list).")


def _one_iou(value: str) -> float:
    """``--iou`` of a command that shows one IoU: the same syntax as the list, exactly one value."""
    ious = _floats(value, "--iou")
    if len(ious) != 1:
        raise click.BadParameter(f"this command shows one IoU, got {value!r}; give one value such as 0.5",
                                 param_hint="--iou")
    return ious[0]


def _renamed(value: Any, message: str) -> None:
    """Callback of a hidden old flag name: a usage error that names the new one."""
    if value is not None:
        raise click.UsageError(message)


def digits_option(command: Callable) -> Callable:
    """``--digits N``: decimals of the printed percentages (score, compare, sweep)."""
    return click.option("--digits", type=click.IntRange(min=0, max=12), default=2, show_default=True,
                        help="Decimals of the percentages in tables.")(command)


@main.command()
@click.argument("run_dir", required=False, type=click.Path())
@click.option("--gt", "gt_path", type=click.Path(dir_okay=False), help="Ground-truth pickle (gradloc.gt/1).")
@click.option("--voc-results", "voc_results", type=click.Path(file_okay=False),
              help="With --gt: a folder of devkit files <comp>_det_<split>_<class>.txt (any detector; "
                   "baselines/<name>/ subfolders are scored as baselines).")
@click.option("--iou", default="0.3,0.4,0.5", show_default=True, help="Comma-separated IoU thresholds.")
@click.option("--metric", type=click.Choice(["voc07", "voc10"]), default="voc07", show_default=True,
              help="voc07 = 11-point AP, voc10 = all-point AP.")
@click.option("--only", default=None, help=FLAG_GROUPS["score"]["only"][1]["help"])
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "csv", "json"]), default="table",
              show_default=True, help="csv/json: stdout holds exactly one document of flat score rows.")
@click.option("--per-class", "per_class", type=float, default=None, metavar="TAU",
              help="Tables: add per-class AP/recall (%) at this τ, one table per IoU. csv/json: keep only "
                   "the rows (every class, mAP, every source) of this τ.")
@click.option("--layout", type=click.Choice(["blocks", "rows"]), default="blocks", show_default=True,
              help="Tables: one block per τ, or one row per τ (columns metric@IoU per source).")
@digits_option
@click.option("--save", is_flag=True,
              help="Run folder: write scores.csv/json/md and localization.csv and record the rescoring in "
                   "manifest.json (without it, score only prints).")
@click.argument("detections", nargs=-1, type=click.Path(dir_okay=False))
@click.pass_context
def score(ctx: click.Context, run_dir: str | None, gt_path: str | None, voc_results: str | None, iou: str,
          metric: str, only: str | None, fmt: str, per_class: float | None, layout: str, digits: int, save: bool,
          detections: tuple[str, ...]) -> None:
    """Score detections with the VOC devkit's AP: a run folder, pickles, or devkit result files.

    A run folder is only read unless --save is given. Everything but the scores goes to stderr.

    \b
    Examples:
      gradloc score results/demo --iou 0.5 --per-class 0.4
      gradloc score results/demo --iou 0.5 --save
      gradloc score results/demo --format json > scores.json
      gradloc score --gt gt.pkl detections/thr_0.020.pkl detections/thr_0.060.pkl --format csv
      gradloc score --gt results/demo/gt.pkl --voc-results exported/
    """
    ious, classes = _floats(iou, "--iou"), _names(only, "--only") or ()
    options = {"digits": digits, "layout": layout, "per_class": per_class}
    if gt_path is None:
        if run_dir is None or detections or voc_results:
            raise click.UsageError("give a run folder, or --gt GT.pkl with detection pickles or --voc-results DIR")
        from gradloc.pipeline import record_rescoring, save_run_scores, score_run_folder
        from gradloc.report import check_per_class

        rows, meta, wsol = score_run_folder(run_dir, ious, metric, classes)
        if per_class is not None:
            check_per_class(rows, per_class)  # before anything is written or printed
        if save:
            files = save_run_scores(run_dir, rows, meta, wsol)
            recorded = record_rescoring(run_dir, ious, metric, files, classes)
            say(ctx, f"saved {', '.join(f.name for f in files)} in {run_dir}"
                     + ("; manifest.json records the rescoring" if recorded else " (no manifest.json to update)"))
        _print_scores(ctx, rows, meta, wsol, fmt, **options)
        return
    if save:
        raise click.UsageError("--save writes into a run folder; with --gt redirect stdout instead")
    files = ((run_dir,) if run_dir else ()) + detections  # with --gt, positional arguments are all pickles
    rows, meta = _score_with_gt(gt_path, voc_results, files, ious, metric, classes)
    _print_scores(ctx, rows, meta, None, fmt, **options)


def _score_with_gt(gt_path: str, voc_results: str | None, files: tuple[str, ...], ious, metric: str,
                   only: tuple[str, ...]):
    """Score rows and protocol of detection pickles or a devkit results folder against a gt.pkl."""
    if (voc_results is None) == (not files):
        raise click.UsageError("--gt needs detection pickles or --voc-results DIR (one of them)")
    if voc_results is not None:
        from gradloc.detections import load_ground_truth
        from gradloc.devkit import score_voc_results

        if only:
            raise click.UsageError("--only scores pickles or run folders; with --voc-results keep only those "
                                   "classes' files in the folder")
        return score_voc_results(voc_results, load_ground_truth(gt_path), ious, metric), {}
    from gradloc.pipeline import score_files

    return score_files(gt_path, files, ious, metric, only)


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
def info(run_dir: str) -> None:
    """What a run folder holds: the settings it actually used, data, cache, times, skipped items and the
    headline scores (`gradloc score RUN` for every number, `ls RUN` for the files).

    \b
    Example:
      gradloc info results/demo
    """
    from gradloc.runs import describe_run, open_run

    lines = describe_run(open_run(run_dir))
    width = max(len(label) for label, _ in lines)
    for label, text in lines:
        click.echo(f"{label + ':':<{width + 1}} {text}")


@main.command()
def models() -> None:
    """List the models gradloc can build, their default CAM layer and whether weights are available offline.

    Columns: cam = True when the model ends in global average pooling + one linear layer, so the original CAM
    method (Zhou et al.) applies; False models work with the gradient methods only. offline = the default
    weights file is on disk (no download is attempted).

    \b
    Example:
      gradloc models
    """
    from tabulate import tabulate

    from gradloc.registry import hub_checkpoints, list_models

    click.echo(tabulate(list_models(), headers="keys", tablefmt="simple"))
    click.echo("\ncam: True = the output is linear(GAP(layer)), so CAM (Zhou et al.) applies; False = gradient "
               "methods only (gradcam, gradcampp, ...).\noffline: the default weights file is on disk; gradloc "
               f"never downloads (torchvision weights go in {hub_checkpoints()}).")


@main.command()
@click.argument("model_name")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Checkpoint to build the model from.")
@click.option("--input-size", type=click.IntRange(min=8), default=224, show_default=True,
              help="Side of the square probe image the output shapes are measured on.")
@click.option("--head", type=_registry("gradloc.models", "HEADS"), default="voc", show_default=True,
              help="The head of the runs the names are for (imagenet heads wrap the model as backbone.*).")
@click.option("--all", "show_all", is_flag=True, help="Also list layers a CAM cannot use (pooling, 1x1 outputs).")
def layers(model_name: str, checkpoint: str | None, input_size: int, head: str, show_all: bool) -> None:
    """List the names `--layer` accepts for MODEL, with each layer's output shape [C, h, w] on a probe image.

    Layers a CAM cannot use (adaptive pooling, 1x1 outputs) are hidden unless --all, which marks them.

    \b
    Example:
      gradloc layers resnet50
    """
    from gradloc.cams import default_layer, layer_table, resolve_layer
    from gradloc.models import build_architecture

    model = build_architecture(model_name, checkpoint=checkpoint, head=head)
    default, _ = resolve_layer(model, default_layer(model))
    table = [row for row in layer_table(model, input_size=input_size) if show_all or not row.unusable]
    width = max(len(row.name) for row in table)
    click.echo(f"{'layer (--layer)':<{width}}  output at {input_size}x{input_size}")
    for row in table:
        note = "default" if row.name == default else f"not for CAMs: {row.unusable}" if row.unusable else ""
        shape = "x".join(str(v) for v in row.shape[1:])
        click.echo(f"{row.name:<{width}}  {shape:<14}{note}".rstrip())


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Run config (configs/*.yaml): data, model, input size, resize mode and its train: section; "
                   "flags override it.")
@click.option("--voc-root", default=None, help="VOCdevkit folder [config data.voc_root].")
@click.option("--year", default=None, help="VOC year [config data.year].")
@click.option("--split", default=None, help="Training image set [config train.split, default train].")
@click.option("--val-split", default=None,
              help="Held-out image set for the report, or none [config train.val_split, default val].")
@click.option("--model", "model_name", default=None, help="Model name [config model.name].")
@click.option("--weights", default=None, help="torchvision weights name (backbone) [config model.weights].")
@click.option("--mode", type=click.Choice(["linear", "finetune_last", "lbfgs"]), default=None,
              help="Training mode [config train.mode, default linear].")
@click.option("--epochs", type=int, default=None, help="Epochs (lbfgs: iterations); default: the mode's.")
@click.option("--batch-size", type=int, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--l2", type=float, default=None, help="L2 penalty on the lbfgs head's weights (default 1e-4).")
@click.option("--input-size", type=int, default=None, help="Network input size [config model.input_size].")
@click.option("--resize-mode", type=click.Choice(["letterbox", "stretch", "shortside"]), default=None,
              help="[config model.resize_mode].")
@click.option("--limit", type=int, default=None, help="Use only the first N images of each split.")
@click.option("--seed", type=int, default=None)
@click.option("--device", default=None, help="torch device [config cams.device].")
@click.option("--out", "old_out", hidden=True, expose_value=False, callback=lambda ctx, param, value: _renamed(
    value, "train --out FILE is now --checkpoint-out FILE (--out is always a folder)"))
@click.option("--checkpoint-out", "out", required=True, type=click.Path(dir_okay=False),
              help="Checkpoint file to write (was --out; --out is always a folder); `gradloc run --checkpoint "
                   "FILE` reads it.")
@click.pass_context
def train(ctx: click.Context, config_path: str | None, out: str, **options: Any) -> None:
    """Train the multi-label `voc` head on a VOC split (linear probe by default).

    With --config the head is trained with exactly the run's preprocessing (input size, resize mode), so
    `gradloc run --config CONFIG --checkpoint FILE` accepts it.

    \b
    Examples:
      gradloc train --config configs/voc07.yaml --split trainval --checkpoint-out HEAD.pt
      gradloc train --model efficientnet_lite0 --split train --checkpoint-out checkpoints/lite0_voc.pt
    """
    from gradloc.config import load_config
    from gradloc.train import TrainConfig, train_head

    overrides = {("model" if k == "model_name" else k): v for k, v in options.items() if v is not None}
    if str(overrides.get("val_split", "")).lower() == "none":
        overrides["val_split"] = None
    cfg = TrainConfig.from_run(load_config(config_path), Path(out), **overrides)
    with tqdm_bar(ctx, desc="train", unit="step") as bar:

        def progress(done: int, total: int, loss: float) -> None:
            bar.total = total
            if loss == loss:  # NaN while features are extracted
                bar.set_postfix(loss=f"{loss:.4f}")
            bar.update(done - bar.n)

        report = train_head(cfg, progress=progress)
    click.echo(yaml.safe_dump(report, sort_keys=False))


# --- report commands: show, plot, compare, sweep ---


@main.command()
@click.argument("run_dir", required=False, type=click.Path(file_okay=False))
@click.option("--threshold", type=float, help="τ of the detections to draw (a threshold of the run).")
@click.option("--n", "n", type=int, default=10, show_default=True, help="Number of images to show.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random sample.")
@click.option("--sample", type=click.Choice(["detected", "gt"]), default="detected", show_default=True,
              help="Draw among images with detections at τ (detected), or with GT boxes whatever was detected "
                   "(gt: the same images for every method of a split).")
@click.option("--ids", help="Comma-separated image ids to draw instead of a sample, e.g. 000005,000012.")
@click.option("--class", "focus", metavar="NAME",
              help="Only this class: images where it is detected or in GT, only its boxes and heatmap.")
@click.option("--png", "out", default=None, type=click.Path(dir_okay=False),
              help="PNG file to write [default: samples.png] (was --out; --out is always a folder).")
@click.option("--out", "old_out", default=None, hidden=True, type=click.Path(dir_okay=False),
              help="Deprecated name of --png.")
@click.option("--per-image", "per_image", type=click.Path(file_okay=False),
              help="Instead of the grid: one overlay PNG per image and class, <image_id>_<class>.png, in DIR.")
@click.option("--guided", is_flag=True, help="Add a Guided Grad-CAM panel per class (rebuilds the model).")
@click.option("--detections", "detections_path", type=click.Path(dir_okay=False),
              help="Boxes only: a detections pickle instead of a run folder (needs --voc-root).")
@click.option("--voc-root", help="With --detections: the VOCdevkit folder.")
@click.option("--year", default="2007", show_default=True, help="With --detections: VOC year.")
@click.option("--split", default="val", show_default=True, help="With --detections: the image set.")
@click.pass_context
def show(ctx: click.Context, run_dir: str | None, threshold: float | None, n: int, seed: int, sample: str,
         ids: str | None, focus: str | None, out: str | None, old_out: str | None, per_image: str | None,
         guided: bool,
         detections_path: str | None, voc_root: str | None, year: str, split: str) -> None:
    """Draw images with heatmaps, GT boxes and predicted boxes as a PNG grid (or one PNG per image).

    By default a seeded random sample of --n images among those with detections at --threshold.

    \b
    Examples:
      gradloc show results/demo --threshold 0.2 --n 8 --png samples.png
      gradloc show results/demo --threshold 0.2 --ids 000005,000012 --class car
      gradloc show results/demo --threshold 0.2 --n 20 --per-image overlays/
      gradloc show --detections thr_0.200.pkl --voc-root ../shared/voc/VOCdevkit --year 2007 --split val
    """
    from gradloc.show import save_figure, show_detections, show_run, write_overlays

    if (run_dir is None) == (detections_path is None):
        raise click.UsageError("give a run folder, or --detections PKL with --voc-root (not both)")
    pick = {"n": n, "seed": seed, "sample": sample, "ids": ids.split(",") if ids is not None else None,
            "focus": focus}
    if detections_path is not None:
        if voc_root is None or guided or threshold is not None or per_image is not None:
            raise click.UsageError("--detections needs --voc-root, draws boxes only (no --guided, no "
                                   "--per-image) and takes τ from the pickle (no --threshold)")
        fig = show_detections(detections_path, voc_root, year=year, split=split, **pick)
    else:
        if threshold is None:
            raise click.UsageError("--threshold is required with a run folder (e.g. --threshold 0.2)")
        if per_image is not None:
            if guided:
                raise click.UsageError("--per-image writes heatmap overlays only (no --guided)")
            written = write_overlays(run_dir, threshold, per_image, **pick)
            say(ctx, f"wrote {len(written)} PNGs into {per_image}")
            return
        fig = show_run(run_dir, threshold, guided=guided, **pick)
    if old_out is not None:
        logger.warning("show --out FILE is deprecated (--out is always a folder): use --png FILE")
    say(ctx, f"wrote {save_figure(fig, out or old_out or 'samples.png')}")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--threshold", type=float, default=None,
              help="τ of the PR curves (default: best mAP at --iou on this run, an oracle choice).")
@click.option("--iou", default="0.5", show_default=True, help=SINGLE_IOU_HELP.format(what="the PR curves"))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for the PNGs (default RUN_DIR/plots; was --out-dir).")
def plot(run_dir: str, threshold: float | None, iou: str, out_dir: str | None) -> None:
    """Plot AP and recall versus threshold, and per-class precision-recall curves, as PNGs.

    \b
    Example:
      gradloc plot results/demo --threshold 0.2 --iou 0.5
    """
    from gradloc.plots import plot_run

    for path in plot_run(run_dir, threshold=threshold, iou=_one_iou(iou), out_dir=out_dir):
        click.echo(str(path))


@main.command()
@click.argument("run_a", type=click.Path(file_okay=False))
@click.argument("run_b", type=click.Path(file_okay=False))
@click.option("--iou", default="0.5", show_default=True, help=SINGLE_IOU_HELP.format(what="the per-class table"))
@click.option("--threshold", type=float, default=None,
              help="τ of the per-class table (default: best mAP of RUN_A, an oracle choice).")
@click.option("--top", type=int, default=5, show_default=True, help="How many largest disagreements to list.")
@click.option("--format", "fmt", type=click.Choice(["table", "markdown"]), default="table", show_default=True)
@click.option("--force", is_flag=True, help="Compare runs on different ground truth (classes, images, split) too.")
@digits_option
def compare(run_a: str, run_b: str, iou: str, threshold: float | None, top: int, fmt: str, force: bool,
            digits: int) -> None:
    """Compare two runs: their config differences, mAP per threshold x IoU side by side, per-class AP
    differences (B - A). Runs on different ground truth are refused unless --force.

    \b
    Example:
      gradloc compare results/gradcam results/gradcampp --iou 0.5 --threshold 0.2
    """
    from gradloc.compare import GroundTruthMismatch, compare_runs, differences_text, render_comparison

    try:
        comparison = compare_runs(run_a, run_b, iou=_one_iou(iou), threshold=threshold, top=top, force=force)
    except GroundTruthMismatch as error:
        click.echo(differences_text(dataclasses.replace(error.differences, ground_truth=[])), err=True, nl=False)
        raise
    click.echo(render_comparison(comparison, tablefmt="github" if fmt == "markdown" else "orgtbl", digits=digits),
               nl=False)


@main.command()
@run_options()
@click.option("--select-split", required=True, help="Split τ is chosen on, e.g. train.")
@click.option("--eval-split", required=True, help="Split the scores are reported on, e.g. val.")
@click.option("--select-metric", default="ap@0.5", show_default=True,
              help="What τ maximizes: ap@<iou> (mAP) or recall@<iou> (mean recall).")
@digits_option
@click.pass_context
def sweep(ctx: click.Context, config_path: str | None, select_split: str, eval_split: str, select_metric: str,
          digits: int, **flags: Any) -> None:
    """Choose τ on one split and report it on another (a τ chosen on the evaluated split is labelled oracle).

    Runs go to <out>/<name>/<split>/, the table to <out>/<name>/sweep.csv and sweep.md.

    \b
    Example:
      gradloc sweep --config configs/voc07_efficientnet_lite0.yaml --select-split train --eval-split val
    """
    from gradloc.runs import check_writable
    from gradloc.sweep import parse_select_metric, run_sweep

    if flags.get("split") is not None:
        raise click.UsageError("sweep takes --select-split and --eval-split, not --split")
    parse_select_metric(select_metric)  # fail before any work
    config = build_config(config_path, flags)
    check_writable(config.run_dir)
    config = _prepare(ctx, config)
    result = run_sweep(config, select_split, eval_split, select_metric, stage=_stage(ctx), digits=digits)
    click.echo(result.text, nl=False)
    say(ctx, "runs: " + ", ".join(str(p) for p in result.run_dirs.values()) + "; table: "
        + ", ".join(str(p) for p in result.files))


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--threshold", type=float, required=True, help="τ of the detections to export (a threshold of the run).")
@click.option("--format", "fmt", type=click.Choice(["voc"]), default="voc", show_default=True,
              help="voc = the official devkit's per-class files comp4_det_<split>_<class>.txt.")
@click.option("--split", default=None, help="Split in the file names (default: the run's split).")
@click.pass_context
def export(ctx: click.Context, run_dir: str, out_dir: str, threshold: float, fmt: str, split: str | None) -> None:
    """Write a run's detections at one τ in the devkit's results format (baselines in OUT_DIR/baselines/).

    Lines are `image_id score x1 y1 x2 y2`, VOC 1-based boxes, numbers that read back exactly.

    \b
    Example:
      gradloc export results/demo --threshold 0.2 --format voc exported/
      gradloc score --gt results/demo/gt.pkl --voc-results exported/
    """
    from gradloc.devkit import export_run

    written = export_run(run_dir, threshold, out_dir, split=split)
    say(ctx, f"wrote {len(written)} {fmt} results files to {out_dir}")


# --- end of report commands ---


if __name__ == "__main__":  # pragma: no cover
    main()
