"""Commands that report: show, plot, compare, sweep, export."""

from __future__ import annotations

import dataclasses
from typing import Any

import click

from gradloc.cli.options import (
    SINGLE_IOU_HELP,
    THRESHOLD,
    build_config,
    digits_option,
    import_torch,
    one_iou,
    prepare,
    registry_choice,
    run_options,
    say,
    stage_progress,
)


@click.command()
@click.argument("run_dir", required=False, type=click.Path(file_okay=False))
@click.option("--threshold", type=THRESHOLD,
              help="τ of the detections to draw (a threshold of the run) [default: the run's selected τ, "
                   "boxes.selected_threshold of its config].")
@click.option("--n", "n", type=click.IntRange(1, 10_000), default=10, show_default=True,
              help="Number of images to show.")
@click.option("--min-score", type=click.FloatRange(0.0, 1.0), default=0.1, show_default=True,
              help="Draw the predicted boxes of a class absent from the image's GT when its best box has at least "
                   "this confidence (boxes of GT classes are always drawn).")
@click.option("--top", type=click.IntRange(0, 20), default=3, show_default=True,
              help="At most this many classes absent from the image's GT get their boxes drawn (most confident "
                   "first).")
@click.option("--panels", type=click.IntRange(0, 20), default=4, show_default=True,
              help="At most this many heatmap panels per image: the drawn classes, GT classes first, each group "
                   "by class probability.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True,
              help="Seed of the random sample.")
@click.option("--sample", type=registry_choice("gradloc.reports.show", "SAMPLE_MODES"), default="detected",
              show_default=True,
              help="Draw among images with detections at τ (detected), or with GT boxes whatever was detected "
                   "(gt: the same images for every method of a split).")
@click.option("--ids", help="Comma-separated image ids to draw instead of a sample, e.g. 000005,000012.")
@click.option("--class", "focus", metavar="NAME",
              help="Only this class: images where it is detected or in GT, only its boxes and heatmap.")
@click.option("--png", "out", default=None, type=click.Path(dir_okay=False),
              help="PNG file to write [default: samples.png].")
@click.option("--per-image", "per_image", type=click.Path(file_okay=False),
              help="Instead of the grid: one overlay PNG per image and class, <image_id>_<class>.png, in DIR.")
@click.option("--guided", is_flag=True, help="Add a Guided Grad-CAM panel per class (rebuilds the model).")
@click.option("--detections", "detections_path", type=click.Path(dir_okay=False),
              help="Boxes only: a detections pickle instead of a run folder (needs --voc-root).")
@click.option("--voc-root", help="With --detections: the VOCdevkit folder.")
@click.option("--year", default="2007", show_default=True, help="With --detections: VOC year.")
@click.option("--split", default="val", show_default=True, help="With --detections: the image set.")
@click.pass_context
def show(ctx: click.Context, run_dir: str | None, threshold: float | None, n: int, min_score: float, top: int,
         panels: int, seed: int, sample: str, ids: str | None, focus: str | None, out: str | None,
         per_image: str | None, guided: bool, detections_path: str | None, voc_root: str | None, year: str,
         split: str) -> None:
    """Draw images with heatmaps, GT boxes and predicted boxes as a PNG grid (or one PNG per image).

    By default a seeded random sample of --n images among those with drawn detections at the run's selected τ.
    Drawn in each image: every GT box, the predicted boxes of its GT classes, and those of at most --top other
    classes with confidence >= --min-score; a heatmap panel per drawn class (GT first), at most --panels.

    \b
    Examples:
      gradloc show results/demo --threshold 0.6 --n 8 --png samples.png
      gradloc show results/demo --threshold 0.6 --ids 000321,000322 --class disc
      gradloc show results/demo --threshold 0.6 --n 20 --per-image overlays/
      gradloc show results/voc07 --n 6 --top 1 --png voc07.png
      gradloc show --detections thr_0.200.pkl --voc-root ../shared/voc/VOCdevkit --year 2007 --split val
    """
    from gradloc.reports.draw import save_figure
    from gradloc.reports.show import Display, show_detections, show_run, write_overlays

    if (run_dir is None) == (detections_path is None):
        raise click.UsageError("give a run folder, or --detections PKL with --voc-root (not both)")
    pick = {"n": n, "seed": seed, "sample": sample, "ids": ids.split(",") if ids is not None else None,
            "focus": focus, "display": Display(min_score, top, panels)}
    if detections_path is not None:
        if voc_root is None or guided or threshold is not None or per_image is not None:
            raise click.UsageError("--detections needs --voc-root, draws boxes only (no --guided, no "
                                   "--per-image) and takes τ from the pickle (no --threshold)")
        fig = show_detections(detections_path, voc_root, year=year, split=split, **pick)
    else:
        if per_image is not None:
            if guided:
                raise click.UsageError("--per-image writes heatmap overlays only (no --guided)")
            written = write_overlays(run_dir, threshold, per_image, **pick)
            say(ctx, f"wrote {len(written)} PNGs into {per_image}")
            return
        fig = show_run(run_dir, threshold, guided=guided, **pick)
    say(ctx, f"wrote {save_figure(fig, out or 'samples.png')}")


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--threshold", type=THRESHOLD, default=None,
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
    from gradloc.reports.plots import plot_run

    for path in plot_run(run_dir, threshold=threshold, iou=one_iou(iou), out_dir=out_dir):
        click.echo(str(path))


@click.command()
@click.argument("run_a", type=click.Path(file_okay=False))
@click.argument("run_b", type=click.Path(file_okay=False))
@click.option("--iou", default="0.5", show_default=True, help=SINGLE_IOU_HELP.format(what="the per-class table"))
@click.option("--threshold", type=THRESHOLD, default=None,
              help="τ of the per-class table and the paired intervals (default: the selected τ of RUN_A; for a "
                   "run without one, RUN_A's best mAP, an oracle choice).")
@click.option("--top", type=click.IntRange(0, 10_000), default=5, show_default=True,
              help="How many largest disagreements to list.")
@click.option("--format", "fmt", type=registry_choice("gradloc.scoring.tables", "TABLE_FORMATS"), default="table",
              show_default=True)
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
    from gradloc.reports.compare import GroundTruthMismatch, compare_runs, differences_text, render_comparison
    from gradloc.scoring.tables import TABLE_FORMATS

    try:
        comparison = compare_runs(run_a, run_b, iou=one_iou(iou), threshold=threshold, top=top, force=force)
    except GroundTruthMismatch as error:
        click.echo(differences_text(dataclasses.replace(error.differences, ground_truth=[])), err=True, nl=False)
        raise
    click.echo(render_comparison(comparison, tablefmt=TABLE_FORMATS[fmt], digits=digits),
               nl=False)


@click.command()
@run_options()
@click.option("--select-split", required=True, help="Split τ is chosen on, e.g. train.")
@click.option("--eval-split", required=True, help="Split the scores are reported on, e.g. val.")
@click.option("--select-metric", default="ap@0.5", show_default=True,
              help="What τ maximizes: ap@<iou> (mAP) or recall@<iou> (mean recall).")
@click.option("--folds", type=click.IntRange(min=2), default=None,
              help="Choose on K held-out folds of the selection split (a trained head refitted per fold, then on "
                   "the whole split for the reported run); default: on the selection split's own run.")
@click.option("--fold-seed", type=int, default=0, show_default=True, help="Seed of the fold assignment.")
@click.option("--variants", "variants_path", type=click.Path(dir_okay=False),
              help="YAML list of {name, what, overrides}: alternatives cross-validated alike (needs --folds); "
                   "the best held-out score wins (see scripts/ablations.yaml).")
@digits_option
@click.pass_context
def sweep(ctx: click.Context, config_path: str | None, select_split: str, eval_split: str, select_metric: str,
          folds: int | None, fold_seed: int, variants_path: str | None, digits: int, **flags: Any) -> None:
    """Choose τ (with --folds: also a variant and the centre box size) on one split, report it on another.

    A τ chosen on the evaluated split is labelled oracle. With --folds every choice is made on held-out folds
    of the selection split and the evaluation split is only reported. Runs go to <out>/<name>-<split>/ (beside,
    never inside, the run folder <out>/<name>/ of `gradloc run`), the tables to <out>/<name>-sweep/ (sweep.csv,
    sweep.md; with --folds also cv.csv, ablations.csv/md and chosen.yaml).

    \b
    Examples:
      gradloc sweep --config configs/voc07_efficientnet_lite0.yaml --select-split train --eval-split val
      gradloc sweep --config configs/voc07.yaml --select-split train --eval-split val --folds 5 \\
          --variants scripts/ablations.yaml
    """
    import_torch()
    from gradloc.run.cv import load_variants
    from gradloc.run.folder import check_writable
    from gradloc.run.sweep import parse_select_metric, run_sweep, split_config

    if flags.get("split") is not None:
        raise click.UsageError("sweep takes --select-split and --eval-split, not --split")
    parse_select_metric(select_metric)  # fail before any work
    config = build_config(config_path, flags)
    for split in (select_split, eval_split):
        check_writable(split_config(config, split).run_dir)
    config = prepare(ctx, config)
    variants = load_variants(variants_path) if variants_path is not None else None
    if variants is not None and folds is None:
        raise click.UsageError("--variants are chosen on held-out folds: give --folds K")
    result = run_sweep(config, select_split, eval_split, select_metric, stage=stage_progress(ctx), digits=digits,
                       folds=folds, seed=fold_seed, variants=variants)
    click.echo(result.text, nl=False)
    say(ctx, "runs: " + ", ".join(str(p) for p in result.run_dirs.values()) + "; table: "
        + ", ".join(str(p) for p in result.files))


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--threshold", type=THRESHOLD, default=None,
              help="τ of the detections to export (a threshold of the run) [default: the run's selected τ, "
                   "boxes.selected_threshold of its config].")
@click.option("--format", "fmt", type=registry_choice("gradloc.reports.export", "EXPORT_FORMATS"), default="voc",
              show_default=True,
              help="voc = the official devkit's per-class files comp4_det_<split>_<class>.txt; coco = a COCO "
                   "results JSON and the matching ground-truth JSON (pycocotools reads both).")
@click.option("--split", default=None, help="Split in the file names (default: the run's split).")
@click.pass_context
def export(ctx: click.Context, run_dir: str, out_dir: str, threshold: float | None, fmt: str,
           split: str | None) -> None:
    """Write a run's detections at one τ in the devkit's or COCO's results format (baselines in
    OUT_DIR/baselines/).

    voc: lines `image_id score x1 y1 x2 y2`, VOC 1-based boxes, numbers that read back exactly. coco:
    detections_<split>_results.json with boxes [x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1] and
    instances_<split>.json (difficult boxes as iscrowd 1), ids = 1-based positions in the run's image and
    class lists.

    \b
    Examples:
      gradloc export results/demo exported/
      gradloc score --gt results/demo/gt.pkl --voc-results exported/
      gradloc export results/demo coco/ --threshold 0.6 --format coco
    """
    from gradloc.reports.export import export_run

    written = export_run(run_dir, threshold, out_dir, split=split, fmt=fmt)
    say(ctx, f"wrote {len(written)} {fmt} results files to {out_dir}")


COMMANDS = (show, plot, compare, sweep, export)
