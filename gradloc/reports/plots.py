"""Figures of a run's scores: AP and recall versus threshold, per-class precision-recall curves (matplotlib).

``gradloc plot RUN_DIR`` writes two PNGs into ``RUN_DIR/plots`` (or ``--out-dir``):

* ``ap_recall_vs_threshold.png``: mAP and mean recall (from ``scores.csv``) versus τ, one colour per IoU,
  one line style and hollow marker per source (``SOURCE_STYLES``: CAM solid with dots, ``center`` dashed with
  squares, ``full`` dotted with triangles, ``shuffled`` dash-dot with crosses, ``blob`` with pluses); the legend
  sits below the axes and names the sources whose curves are identical (drawn over each other, told apart by
  their markers).
* ``pr_thr_<τ>_iou_<iou>.png``: one precision-recall curve per class with non-difficult GT and at least one
  detection from some source, computed from the detection pickles with the VOC matching of
  :mod:`gradloc.scoring.voc`, in the same styles; the figure names the classes skipped for lack of detections.
  Each panel's title gives the AP of its curves by :func:`gradloc.voc_ap`, which is the AP of
  ``scores.csv``, and the sources with identical curves.

Figures are :class:`matplotlib.figure.Figure` objects made without pyplot (no global state, Agg backend).
"""

from __future__ import annotations

import logging
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from gradloc.core.formats import Detections, GroundTruth
from gradloc.reports.draw import save_figure
from gradloc.run.folder import open_run, threshold_filename
from gradloc.scoring.tables import METRIC_NAMES, match_value, select_threshold
from gradloc.scoring.voc import match_detections, voc_ap

logger = logging.getLogger(__name__)


DPI = 100


# source -> (line style, marker, words for the legend); an unknown source gets OTHER_STYLE
SOURCE_STYLES: dict[str, tuple[str, str, str]] = {
    "cam": ("-", "o", "solid, dots"),
    "center": ("--", "s", "dashed, squares"),
    "full": (":", "^", "dotted, triangles"),
    "shuffled": ("-.", "x", "dash-dot, crosses"),
    "blob": ((0, (1, 1, 4, 1)), "+", "dash-dotted, pluses"),
}


OTHER_STYLE = ("--", "d", "dashed, diamonds")


PR_COLUMNS = 5


@dataclass(frozen=True)
class PRCurve:
    """Precision-recall curve of one class, in rank order (descending score, stable).

    Attributes:
        recall: float64[n] cumulative TP / n_gt.
        precision: float64[n] cumulative TP / max(cumulative TP + FP, eps).
        scores: float64[n] the ranked detections' scores.
        n_gt: number of non-difficult GT boxes.
    """

    recall: np.ndarray
    precision: np.ndarray
    scores: np.ndarray
    n_gt: int


def precision_recall_curves(dets: Detections, gt: GroundTruth, iou: float) -> dict[int, PRCurve]:
    """Per-class precision-recall curves with the devkit's matching (Everingham et al., IJCV 2010).

    Built on :func:`gradloc.match_detections` (the devkit's ranking and matching rules live there
    only); ``voc_ap(recall, precision)`` of a curve is the AP of ``evaluate``.

    Args:
        dets, gt: detections and ground truth on the same classes and image lists.
        iou: IoU threshold in (0, 1).

    Returns:
        class index -> curve, for every class with at least one non-difficult GT box.

    Raises:
        ValueError: as :func:`gradloc.evaluate`.
    """
    matches = match_detections(dets, gt, iou_thresholds=(iou,))
    curves = {}
    for c in np.flatnonzero(matches.n_gt > 0):
        recall, precision = matches.curve(int(c))
        ranked = matches.order[matches.bounds[c] : matches.bounds[c + 1]]
        curves[int(c)] = PRCurve(recall=recall, precision=precision, scores=dets.scores[ranked],
                                 n_gt=int(matches.n_gt[c]))
    return curves


def style_legend(sources: list[str]) -> str:
    """The line styles actually used, e.g. ``cam solid, dots; center dashed, squares``."""
    return "; ".join(f"{source} {SOURCE_STYLES.get(source, OTHER_STYLE)[2]}" for source in sources)


def tied_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[list[str]]:
    """Groups of two or more sources whose curves are identical (same x and y, NaN equal to NaN).

    Args:
        curves: source -> (x float64[n], y float64[n]).

    Returns:
        The groups, each in the order of ``curves``.
    """
    groups: list[list[str]] = []
    for source, (x, y) in curves.items():
        for group in groups:
            gx, gy = curves[group[0]]
            if (np.array_equal(gx, x, equal_nan=True) and np.array_equal(gy, y, equal_nan=True)):
                group.append(source)
                break
        else:
            groups.append([source])
    return [group for group in groups if len(group) > 1]


def _draw_source(ax: Any, x: np.ndarray, y: np.ndarray, source: str, color: str, **kwargs: Any) -> None:
    """One curve in its source's line style and hollow marker (tied curves stay visible: the markers differ)."""
    linestyle, marker, _ = SOURCE_STYLES.get(source, OTHER_STYLE)
    ax.plot(x, y, linestyle=linestyle, marker=marker, markersize=4, fillstyle="none", color=color, **kwargs)


def plot_threshold_curves(rows: pd.DataFrame, title: str = "") -> Figure:
    """mAP and mean recall (%) versus τ: one colour per IoU, one line style and marker per source.

    The legend sits below the axes (colours = IoU, styles = sources); sources whose curves coincide are
    listed under it as ties.

    Args:
        rows: flat score rows (see :mod:`gradloc.scoring.tables`); only ``class == "mAP"`` rows are used.
        title: figure title.

    Returns:
        A 12-inch-wide figure with two axes (AP, recall) and the legend band below them.
    """
    means = rows[rows["class"] == "mAP"]
    if means.empty:
        raise ValueError("score rows have no mAP rows (class == 'mAP'); rescore the run with `gradloc score`")
    fig = Figure(figsize=(12, 6.0), dpi=DPI)
    axes = fig.subplots(1, 2)
    ious = sorted(means["iou"].unique())
    sources = [str(s) for s in dict.fromkeys(["cam", *sorted(means["source"].unique())]) if s in
               set(means["source"])]
    colors = {iou: f"C{i}" for i, iou in enumerate(ious)}
    ties = []
    for ax, column, label in ((axes[0], "ap", "mAP (%)"), (axes[1], "recall", "mean recall (%)")):
        for iou in ious:
            curves = {}
            for source in sources:
                part = means[(means["source"] == source) & (means["iou"] == iou)].sort_values("threshold")
                curves[source] = (part["threshold"].to_numpy(float), 100 * part[column].to_numpy(float))
                _draw_source(ax, *curves[source], source, colors[iou])
            ties += [f"{label.split(' (')[0]} at IoU {iou:g}: {' = '.join(g)}" for g in tied_curves(curves)]
        ax.set_xlabel("threshold tau")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=colors[iou], label=f"IoU {iou:g}") for iou in ious]
    handles += [Line2D([], [], color="0.3", linestyle=SOURCE_STYLES.get(s, OTHER_STYLE)[0],
                       marker=SOURCE_STYLES.get(s, OTHER_STYLE)[1], fillstyle="none", label=s) for s in sources]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0.06))
    note = ("identical curves (drawn over each other, told apart by their markers): " + "; ".join(ties)
            if ties else "no two sources have identical curves")
    fig.text(0.5, 0.01, textwrap.fill(note, 170), ha="center", va="bottom", fontsize=7)
    fig.suptitle(textwrap.fill(title, 150), fontsize=9)
    fig.tight_layout(rect=(0, 0.14, 1, 0.93))
    return fig


def plot_pr_curves(curves: dict[str, dict[int, PRCurve]], classes: list[str], metric: str, title: str = "",
                   columns: int = PR_COLUMNS) -> Figure:
    """One precision-recall panel per class with a detection; each source in its line style, AP in the title.

    Classes with non-difficult GT but no detection from any source get no panel; the figure says which.

    Args:
        curves: source (``cam``, ``center``, ...) -> class index -> curve
            (from :func:`precision_recall_curves`).
        classes: class names.
        metric: AP variant for the titles (a key of ``gradloc.METRICS``).
        title: figure title.
        columns: panels per row (at most; fewer when there are fewer classes).

    Returns:
        A figure of ``min(columns, n_panels) * 2.8`` by ``rows * 2.5 + 1.4`` inches (legend band below).
    """
    with_gt = sorted(set().union(*(set(c) for c in curves.values()))) if curves else []
    if not with_gt:
        raise ValueError("no class has non-difficult ground truth; nothing to plot")
    shown = [c for c in with_gt if any(c in per and per[c].recall.size for per in curves.values())]
    skipped = [classes[c] for c in with_gt if c not in shown]
    note = (f"{len(skipped)} of {len(with_gt)} classes with GT have no detection from any source (not drawn): "
            f"{', '.join(skipped)}" if skipped else f"all {len(with_gt)} classes with GT drawn")
    if not shown:
        raise ValueError(f"no detection at all; nothing to plot ({note})")
    columns = min(columns, len(shown))
    n_rows = -(-len(shown) // columns)
    fig = Figure(figsize=(max(columns * 2.8, 6.0), n_rows * 2.5 + 1.4), dpi=DPI)
    axes = np.asarray(fig.subplots(n_rows, columns, squeeze=False))
    for ax in axes.flat[len(shown):]:
        ax.set_axis_off()
    for ax, c in zip(axes.flat, shown, strict=False):
        aps, drawn = [], {}
        for i, (source, per_class) in enumerate(curves.items()):
            curve = per_class.get(c)
            if curve is None:
                continue
            ap = voc_ap(curve.recall, curve.precision, metric)
            aps.append(f"{source} {100 * ap:.1f}")
            drawn[source] = (curve.recall, curve.precision)
            _draw_source(ax, curve.recall, curve.precision, source, f"C{i}", linewidth=1.2,
                         markevery=max(1, curve.recall.size // 8))
        ties = tied_curves(drawn)
        tie_text = "".join(f"\nidentical: {' = '.join(g)}" for g in ties)
        ax.set_title(f"{classes[c]} (n_gt {next(iter(curves.values()))[c].n_gt})\nAP: " + ", ".join(aps)
                     + tie_text, fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
    axes.flat[0].set_xlabel("recall", fontsize=7)
    axes.flat[0].set_ylabel("precision", fontsize=7)
    handles = [Line2D([], [], color=f"C{i}", linestyle=SOURCE_STYLES.get(s, OTHER_STYLE)[0],
                      marker=SOURCE_STYLES.get(s, OTHER_STYLE)[1], fillstyle="none", label=s)
               for i, s in enumerate(curves)]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False,
               bbox_to_anchor=(0.5, 0.35 / fig.get_figheight()))
    fig.text(0.5, 0.05 / fig.get_figheight(), textwrap.fill(note, int(fig.get_figwidth() * 14)), ha="center",
             va="bottom", fontsize=7)
    fig.suptitle(textwrap.fill(title, int(fig.get_figwidth() * 13)), fontsize=9)
    fig.tight_layout(rect=(0, 0.8 / fig.get_figheight(), 1, 1 - 0.6 / fig.get_figheight()))
    return fig


def plot_run(run_dir: str | Path, threshold: float | None = None, iou: float = 0.5,
             out_dir: str | Path | None = None) -> list[Path]:
    """Write the threshold curves and the per-class PR curves of a run folder as PNGs.

    Args:
        run_dir: a folder made by ``gradloc run`` (scores.csv, gt.pkl, detections/, baselines/).
        threshold: τ of the PR curves; None = the run's selected τ (``boxes.selected_threshold``), or, for a
            run without one, the τ of best CAM mAP at ``iou`` on this split (an oracle choice, said in the
            figure title).
        iou: IoU threshold of the PR curves; must be one of the run's scored IoUs.
        out_dir: output folder (default ``run_dir/plots``).

    Returns:
        The written files: ``ap_recall_vs_threshold.png``, ``pr_thr_<τ>_iou_<iou>.png``.

    Raises:
        FileNotFoundError: missing run folder, scores.csv, gt.pkl or detections file.
        ValueError: τ or IoU not in the run, malformed files.
    """
    run = open_run(run_dir)
    run_dir = run.path
    rows = run.scores
    scores_path = run.scores_path
    iou = match_value(rows["iou"], iou, "IoU", scores_path)
    selected, chosen_on = run.selection
    if threshold is None and selected is not None:
        threshold = match_value(rows["threshold"], selected, "threshold", scores_path)
        choice = f"tau = {threshold:g}: the run's selected tau" + (f" (chosen on {chosen_on})" if chosen_on else "")
    elif threshold is None:
        threshold, _ = select_threshold(rows, "ap", iou)
        choice = f"tau = {threshold:g}: best mAP@{iou:g} on this split (oracle choice)"
    else:
        threshold = match_value(rows["threshold"], threshold, "threshold", scores_path)
        choice = f"tau = {threshold:g}"
    metric = str(rows["metric"].iloc[0])
    cam_modes = rows.loc[rows["source"] == "cam", "threshold_mode"]
    mode = str(cam_modes.iloc[0]) if len(cam_modes) else "max"
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)

    written = []
    fig = plot_threshold_curves(rows, f"{run_dir.name}: {METRIC_NAMES.get(metric, metric)} versus threshold "
                                      f"({mode} semantics); line styles: "
                                      f"{style_legend(sorted(set(rows['source']), key=lambda s: s != 'cam'))}; "
                                      "every tau shown (best-of-sweep on this split is an oracle choice)")
    written.append(out_dir / "ap_recall_vs_threshold.png")
    save_figure(fig, written[-1])

    gt = run.gt
    dets = {"cam": run.detections_at(threshold), **run.baselines_at(threshold)}
    curves = {source: precision_recall_curves(d, gt, iou) for source, d in dets.items()}
    fig = plot_pr_curves(curves, gt.classes, metric,
                         f"{run_dir.name}: precision-recall at {choice} ({mode}), IoU > {iou:g}; "
                         f"AP = {METRIC_NAMES.get(metric, metric)} in %")
    written.append(out_dir / f"pr_{threshold_filename(threshold)[:-4]}_iou_{iou:g}.png")
    save_figure(fig, written[-1])
    logger.info("wrote %s", ", ".join(str(p) for p in written))
    return written
