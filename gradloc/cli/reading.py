"""Commands that read: score, info, models, layers."""

from __future__ import annotations

import click

from gradloc.cli.options import (
    FLAG_GROUPS,
    THRESHOLD,
    digits_option,
    import_torch,
    parse_ious,
    parse_names,
    print_scores,
    registry_choice,
    say,
)
from gradloc.core.ranges import MAX_INPUT_SIZE


@click.command()
@click.argument("run_dir", required=False, type=click.Path())
@click.option("--gt", "gt_path", type=click.Path(dir_okay=False), help="Ground-truth pickle (gradloc.gt/1).")
@click.option("--voc-results", "voc_results", type=click.Path(file_okay=False),
              help="With --gt: a folder of devkit files <comp>_det_<split>_<class>.txt (any detector; "
                   "baselines/<name>/ subfolders are scored as baselines).")
@click.option("--iou", default="0.3,0.4,0.5", show_default=True, help=FLAG_GROUPS["score"]["iou"][1]["help"])
@click.option("--metric", type=registry_choice("gradloc.scoring.voc", "METRICS"), default="voc07", show_default=True,
              help="voc07 = 11-point AP, voc10 = all-point AP.")
@click.option("--only", default=None, help=FLAG_GROUPS["score"]["only"][1]["help"])
@click.option("--format", "fmt", type=registry_choice("gradloc.scoring.tables", "FORMATS"), default="table",
              show_default=True, help="csv/json: stdout holds exactly one document of flat score rows.")
@click.option("--per-class", "per_class", type=THRESHOLD, default=None, metavar="TAU",
              help="Tables: add per-class AP/recall (%) at this τ, one table per IoU. csv/json: keep only "
                   "the rows (every class, mAP, every source) of this τ.")
@click.option("--layout", type=registry_choice("gradloc.scoring.tables", "LAYOUTS"), default="blocks",
              show_default=True,
              help="Tables: one block per τ, or one row per τ (columns metric@IoU per source).")
@digits_option
@click.option("--ci", is_flag=True,
              help="Run folder: add 95 % BCa bootstrap intervals (images resampled, 1,000 times, seed 0) to every "
                   "mAP and to the CAM's CorLoc@0.5 (tables: an Intervals block; csv/json: ci_low, ci_high).")
@click.option("--save", is_flag=True,
              help="Run folder: write scores.csv/json/md and localization.csv and record the rescoring in "
                   "manifest.json (without it, score only prints).")
@click.argument("detections", nargs=-1, type=click.Path(dir_okay=False))
@click.pass_context
def score(ctx: click.Context, run_dir: str | None, gt_path: str | None, voc_results: str | None, iou: str,
          metric: str, only: str | None, fmt: str, per_class: float | None, layout: str, digits: int, ci: bool,
          save: bool, detections: tuple[str, ...]) -> None:
    """Score detections with the VOC devkit's AP: a run folder, pickles, or devkit result files.

    A run folder is only read unless --save is given. Everything but the scores goes to stderr.

    \b
    Examples:
      gradloc score results/demo --iou 0.5 --per-class 0.4
      gradloc score results/demo --iou 0.5 --save
      gradloc score results/demo --iou 0.5 --ci
      gradloc score results/demo --format json > scores.json
      gradloc score --gt gt.pkl detections/thr_0.020.pkl detections/thr_0.060.pkl --format csv
      gradloc score --gt results/demo/gt.pkl --voc-results exported/
    """
    ious, classes = parse_ious(iou), parse_names(only, "--only") or ()
    options = {"digits": digits, "layout": layout, "per_class": per_class}
    if gt_path is None:
        if run_dir is None or detections or voc_results:
            raise click.UsageError("give a run folder, or --gt GT.pkl with detection pickles or --voc-results DIR")
        from gradloc.run.folder import open_run
        from gradloc.run.score import coco_scores, headline_rows, save_run_scores, score_run_folder, with_intervals
        from gradloc.scoring.tables import TABLE_FORMATS, check_per_class

        run = open_run(run_dir)
        rows, meta, wsol = score_run_folder(run, ious, metric, classes)
        if per_class is not None:
            check_per_class(rows, per_class)  # before anything is written or printed
        coco = coco_scores(run, classes) if save or fmt in TABLE_FORMATS else None
        if save:
            files, recorded = save_run_scores(run_dir, rows, meta, wsol, ious, metric, classes, coco,
                                              headline_rows(run, rows, wsol, meta, classes))
            say(ctx, f"saved {', '.join(f.name for f in files)} in {run_dir}"
                     + ("; manifest.json records the rescoring" if recorded else " (no manifest.json to update)"))
        if ci:
            rows, options["corloc"] = with_intervals(run, rows, classes)
        options["headline"] = headline_rows(run, rows, wsol, meta, classes, options.get("corloc"))
        print_scores(ctx, rows, meta, wsol, fmt, coco, **options)
        return
    if ci:
        raise click.UsageError("--ci resamples the images of a run folder; give a run folder")
    if save:
        raise click.UsageError("--save writes into a run folder; with --gt redirect stdout instead")
    files = ((run_dir,) if run_dir else ()) + detections  # with --gt, positional arguments are all pickles
    rows, meta = _score_with_gt(gt_path, voc_results, files, ious, metric, classes)
    print_scores(ctx, rows, meta, None, fmt, **options)


def _score_with_gt(gt_path: str, voc_results: str | None, files: tuple[str, ...], ious, metric: str,
                   only: tuple[str, ...]):
    """Score rows and protocol of detection pickles or a devkit results folder against a gt.pkl."""
    if (voc_results is None) == (not files):
        raise click.UsageError("--gt needs detection pickles or --voc-results DIR (one of them)")
    if voc_results is not None:
        from gradloc.core.formats import load_ground_truth
        from gradloc.scoring.devkit import score_voc_results

        if only:
            raise click.UsageError("--only scores pickles or run folders; with --voc-results keep only those "
                                   "classes' files in the folder")
        return score_voc_results(voc_results, load_ground_truth(gt_path), ious, metric), {}
    from gradloc.run.score import score_files

    return score_files(gt_path, files, ious, metric, only)


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
def info(run_dir: str) -> None:
    """What a run folder holds: the settings it actually used, data, cache, times, skipped items and the
    headline: the scores at the selected τ, τ-free ones and the oracle τ, labelled (`gradloc score RUN` for
    every number, `ls RUN` for the files).

    \b
    Example:
      gradloc info results/demo
    """
    from gradloc.reports.info import describe_run, run_headline
    from gradloc.run.folder import open_run
    from gradloc.scoring.tables import headline_text

    run = open_run(run_dir)
    lines, found = describe_run(run), run_headline(run)  # every file read before anything is printed
    width = max(len(label) for label, _ in lines)
    for label, text in lines:
        click.echo(f"{label + ':':<{width + 1}} {text}")
    if found is not None:
        click.echo("\n" + headline_text(*found), nl=False)


@click.command()
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

    from gradloc.models.registry import hub_checkpoints, list_models

    click.echo(tabulate(list_models(), headers="keys", tablefmt="simple"))
    click.echo("\ncam: True = the output is linear(GAP(layer)), so CAM (Zhou et al.) applies; False = gradient "
               "methods only (gradcam, gradcampp, ...).\noffline: the default weights file is on disk; gradloc "
               f"never downloads (torchvision weights go in {hub_checkpoints()}).\nYour own model: --model "
               "timm:NAME or --model package.module:function (a function returning the nn.Module), with --checkpoint "
               "FILE (its state dict); --model torchvision:NAME is the name NAME above.")


@click.command()
@click.argument("model_name")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Checkpoint to build the model from.")
@click.option("--input-size", type=click.IntRange(min=8, max=MAX_INPUT_SIZE), default=224, show_default=True,
              help="Side of the square probe image the output shapes are measured on.")
@click.option("--all", "show_all", is_flag=True, help="Also list layers a CAM cannot use (pooling, 1x1 outputs).")
def layers(model_name: str, checkpoint: str | None, input_size: int, show_all: bool) -> None:
    """List the names `--layer` accepts for MODEL, with each layer's output shape [C, h, w] on a probe image.

    The names are the same for every head (voc, imagenet, voc+imagenet) and need no checkpoint or weights
    file (--checkpoint only for a checkpoint that changes the architecture). An exact name always wins over a
    unique dotted suffix (`--layer layer3.1.bn2`). Layers a CAM cannot use (adaptive pooling, 1x1 outputs) are
    hidden unless --all, which marks them.

    \b
    Examples:
      gradloc layers resnet50
      gradloc layers efficientnet_lite0
      gradloc layers timm:resnet18
    """
    import_torch()
    from gradloc.cams.layers import default_layer, layer_table, resolve_layer
    from gradloc.models.build import build_architecture

    model = build_architecture(model_name, checkpoint=checkpoint)
    default, _ = resolve_layer(model, default_layer(model))
    table = [row for row in layer_table(model, input_size=input_size) if show_all or not row.unusable]
    width = max(len(row.name) for row in table)
    click.echo(f"{'layer (--layer)':<{width}}  output at {input_size}x{input_size}")
    for row in table:
        note = "default" if row.name == default else f"not for CAMs: {row.unusable}" if row.unusable else ""
        shape = "x".join(str(v) for v in row.shape[1:])
        click.echo(f"{row.name:<{width}}  {shape:<14}{note}".rstrip())


COMMANDS = (score, info, models, layers)
