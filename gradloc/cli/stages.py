"""Commands that compute: run, demo, cams, merge, boxes, train."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import click
import yaml

from gradloc.cli.app import logger
from gradloc.cli.options import (
    build_config,
    checked_config,
    import_torch,
    prepare,
    print_scores,
    progress_bar,
    registry_choice,
    run_options,
    say,
    shard_option,
    stage_progress,
    tqdm_bar,
)


def _join_world(ctx: click.Context, shard: str | None, config):
    """Under torchrun: join the process group; ranks other than 0 print nothing but rank-tagged logs on
    stderr. Returns the :class:`gradloc.run.distributed.World` (None outside torchrun)."""
    from gradloc.run.distributed import init_process_group, world_from_env

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
    from gradloc.cams.loader import parse_shard
    from gradloc.run.cams import plan_cams
    from gradloc.run.distributed import barrier, compute_shard, gather

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
            "split": "round robin over planned batches (gradloc.cams.loader.shard_batches)"}


def _run_and_report(ctx: click.Context, config, original, prepare_seconds: float,
                    split: dict[str, Any] | None = None) -> None:
    """The whole pipeline on a prepared config, its tables and summary (``split``: recorded in manifest.json
    under ``distributed``)."""
    from gradloc.run.pipeline import run as run_pipeline

    result = run_pipeline(config, original, stage=stage_progress(ctx),
                          record=None if split is None else {"distributed": split})
    print_scores(ctx, result.rows, result.meta, result.localization, coco=result.coco, headline=result.headline)
    if result.dataset.skipped:
        say(ctx, f"skipped {len(result.dataset.skipped)} item(s): "
                 + "; ".join(f"{item['image_id']}: {item['reason']}" for item in result.dataset.skipped))
    say(ctx, f"run folder: {result.run_dir}  (heatmap cache: {result.cache.root})")
    times = {"prepare": prepare_seconds, **result.times.seconds}
    say(ctx, "time per stage: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))


@click.command()
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


@click.command()
@run_options(config=False)
@click.option("--config", "config_path", hidden=True)  # refused with a pointer to `gradloc run --config`
@click.pass_context
def demo(ctx: click.Context, config_path: str | None, **flags: Any) -> None:
    """The offline demo: `gradloc run` with the packaged demo config (a synthetic VOC-layout dataset and a tiny
    CNN trained on it, generated once under --cache-dir; no download). Flags override the demo config; for a
    config of your own use `gradloc run --config FILE`.

    \b
    Examples:
      gradloc demo
      gradloc demo --out /tmp/results --cache-dir /tmp/gradloc-cache
    """
    from gradloc.run.config import packaged_config

    if config_path is not None:
        raise click.UsageError("demo runs the packaged demo config; use `gradloc run --config FILE` for yours")
    _run_and_print(ctx, str(packaged_config("demo")), flags)


def _run_and_print(ctx: click.Context, config_path: str | None, flags: dict[str, Any],
                   shard: str | None = None) -> None:
    import_torch()
    from gradloc.run.distributed import finish, rank_zero_first
    from gradloc.run.folder import check_writable

    original = build_config(config_path, flags)
    world = _join_world(ctx, shard, original)
    try:
        if shard is None and (world is None or world.rank == 0):  # rank 0 alone writes (and locks) the folder
            check_writable(original.run_dir)  # before the demo is prepared: an unwritable --out costs no work
        start = time.perf_counter()
        with rank_zero_first(world):
            config = prepare(ctx, original)
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


@click.command()
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
    import_torch()
    from gradloc.run.distributed import check_filled
    from gradloc.run.folder import check_writable

    original = build_config(config_path, flags)
    check_writable(original.run_dir)
    start = time.perf_counter()
    config = prepare(ctx, original)
    check_filled(config)
    _run_and_report(ctx, config, original, time.perf_counter() - start)


@click.command()
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
    import_torch()
    from gradloc.run.cams import plan_cams
    from gradloc.run.distributed import finish, rank_zero_first

    original = build_config(config_path, flags, writes_run=False)
    world = _join_world(ctx, shard, original)
    try:
        with rank_zero_first(world):
            config = prepare(ctx, original)
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


@click.command()
@run_options("data", "model", "cams", "boxes")
@click.pass_context
def boxes(ctx: click.Context, config_path: str | None, **flags: Any) -> None:
    """Cut boxes from cached maps at every threshold; write gt.pkl and detections/thr_<τ>.pkl.

    \b
    Example:
      gradloc boxes --config configs/demo.yaml --thresholds 0.1,0.2,0.3 --box-mode all
    """
    import_torch()
    from gradloc.run.boxes import open_cached, run_boxes
    from gradloc.run.folder import check_writable

    config = build_config(config_path, flags)
    check_writable(config.run_dir)
    config = prepare(ctx, config)
    cache, dataset = open_cached(config)
    with progress_bar(ctx, len(dataset), f"boxes ({len(config.boxes.thresholds)} thresholds)") as update:
        run_dir = run_boxes(config, cache, dataset, progress=update)
    say(ctx, f"detections: {run_dir / 'detections'}")


TORCH_ZIP = b"PK\x03\x04"  # the first bytes of a torch.save file (a zip archive)


# train flag -> the config key it sets (checked like every run setting: types, ranges, the flag named)
TRAIN_FLAGS = {"voc_root": "data.voc_root", "year": "data.year", "split": "train.split",
               "val_split": "train.val_split", "model_name": "model.name", "weights": "model.weights",
               "mode": "train.mode", "epochs": "train.epochs", "batch_size": "train.batch_size", "lr": "train.lr",
               "l2": "train.l2", "input_size": "model.input_size", "resize_mode": "model.resize_mode",
               "limit": "train.limit", "seed": "train.seed", "device": "cams.device"}


@click.command()
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
@click.option("--mode", type=registry_choice("gradloc.run.train", "TRAIN_MODES"), default=None,
              help="Training mode [config train.mode, default linear].")
@click.option("--epochs", type=int, default=None, help="Epochs (lbfgs: iterations); default: the mode's.")
@click.option("--batch-size", type=int, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--l2", type=float, default=None, help="L2 penalty on the lbfgs head's weights (default 1e-4).")
@click.option("--input-size", type=int, default=None, help="Network input size [config model.input_size].")
@click.option("--resize-mode", type=registry_choice("gradloc.core.geometry", "RESIZE_MODES"), default=None,
              help="[config model.resize_mode].")
@click.option("--limit", type=int, default=None, help="Use only the first N images of each split.")
@click.option("--seed", type=int, default=None)
@click.option("--device", default=None, help="torch device [config cams.device].")
@click.option("--checkpoint-out", "out", required=True, type=click.Path(dir_okay=False),
              help="Checkpoint file to write; `gradloc run --checkpoint "
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
    import_torch()
    from gradloc.core.files import check_own_file
    from gradloc.run.train import TrainConfig, train_head

    check_own_file(out, TORCH_ZIP, "a torch checkpoint")  # before any work: never over a file of yours

    overrides = {TRAIN_FLAGS[k]: v for k, v in options.items() if v is not None}
    if str(overrides.get("train.val_split", "")).lower() == "none":
        overrides["train.val_split"] = None
    given = {TRAIN_FLAGS[k]: f"--{k.removesuffix('_name').replace('_', '-')}" for k, v in options.items()
             if v is not None}
    config = checked_config(config_path, overrides, given, writes_run=False)
    cfg = TrainConfig.from_run(config, Path(out))
    with tqdm_bar(ctx, desc="train", unit="step") as bar:

        def progress(done: int, total: int, loss: float) -> None:
            bar.total = total
            if loss == loss:  # NaN while features are extracted
                bar.set_postfix(loss=f"{loss:.4f}")
            bar.update(done - bar.n)

        report = train_head(cfg, progress=progress)
    click.echo(yaml.safe_dump(report, sort_keys=False), nl=False)
    by_head = report.get("val_map_by_head")
    if by_head:
        used = config.model.head if config.model.head in by_head else "voc"
        others = "; ".join(f"{name} head {value:.2%}" for name, value in by_head.items() if name != used)
        click.echo(f"{cfg.val_split} classification mAP (VOC07 11-point, image labels) of the {used} head "
                   f"the run uses: {by_head[used]:.2%}" + (f" ({others})" if others else ""))


COMMANDS = (run, demo, cams, merge, boxes, train)
