"""Figures of a run's scores: AP and recall versus threshold, per-class precision-recall curves (matplotlib).

``gradloc plot RUN_DIR`` writes two PNGs into ``RUN_DIR/plots`` (or ``--out-dir``):

* ``ap_recall_vs_threshold.png``: mAP and mean recall (from ``scores.csv``) versus τ, one line per IoU,
  CAM boxes solid, baselines dashed (``center`` ``--``, ``full`` ``:``, ``random`` ``-.``).
* ``pr_thr_<τ>_iou_<iou>.png``: one precision-recall curve per class with non-difficult GT, computed from the
  detection pickles with the VOC matching of :mod:`gradloc.metrics` (CAM boxes solid, baselines dashed);
  each panel's title gives the AP of its curves by :func:`gradloc.metrics.voc_ap`, which is the AP of
  ``scores.csv``.

Figures are :class:`matplotlib.figure.Figure` objects made without pyplot (no global state, Agg backend).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from gradloc import metrics
from gradloc.detections import Detections, GroundTruth
from gradloc.report import METRIC_NAMES, match_value, select_threshold
from gradloc.runs import Run, open_run, threshold_filename

logger = logging.getLogger(__name__)

DPI = 100
SOURCE_STYLES: dict[str, str] = {"cam": "-", "center": "--", "full": ":", "random": "-."}
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

    Built on :func:`gradloc.metrics.match_detections` (the devkit's ranking and matching rules live there
    only); ``metrics.voc_ap(recall, precision)`` of a curve is the AP of ``metrics.evaluate``.

    Args:
        dets, gt: detections and ground truth on the same classes and image lists.
        iou: IoU threshold in (0, 1).

    Returns:
        class index -> curve, for every class with at least one non-difficult GT box.

    Raises:
        ValueError: as :func:`gradloc.metrics.evaluate`.
    """
    matches = metrics.match_detections(dets, gt, iou_thresholds=(iou,))
    curves = {}
    for c in np.flatnonzero(matches.n_gt > 0):
        recall, precision = matches.curve(int(c))
        ranked = matches.order[matches.bounds[c] : matches.bounds[c + 1]]
        curves[int(c)] = PRCurve(recall=recall, precision=precision, scores=dets.scores[ranked],
                                 n_gt=int(matches.n_gt[c]))
    return curves


# --- figures ------------------------------------------------------------------------------------------------


def plot_threshold_curves(rows: pd.DataFrame, title: str = "") -> Figure:
    """mAP and mean recall (%) versus τ: one colour per IoU, one line style per source (CAM solid).

    Args:
        rows: flat score rows (see :mod:`gradloc.report`); only ``class == "mAP"`` rows are used.
        title: figure title.

    Returns:
        A 12 x 4.8 inch figure with two axes (AP, recall).
    """
    means = rows[rows["class"] == "mAP"]
    if means.empty:
        raise ValueError("score rows have no mAP rows (class == 'mAP'); rescore the run with `gradloc score`")
    fig = Figure(figsize=(12, 4.8), dpi=DPI)
    axes = fig.subplots(1, 2)
    ious = sorted(means["iou"].unique())
    colors = {iou: f"C{i}" for i, iou in enumerate(ious)}
    for ax, column, label in ((axes[0], "ap", "mAP (%)"), (axes[1], "recall", "mean recall (%)")):
        for (source, iou), part in means.groupby(["source", "iou"], sort=True):
            part = part.sort_values("threshold")
            ax.plot(part["threshold"], 100 * part[column], SOURCE_STYLES.get(str(source), "--"),
                    color=colors[iou], marker="o" if source == "cam" else None, markersize=3,
                    label=f"{source}, IoU {iou:g}")
        ax.set_xlabel("threshold tau")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2, loc="best")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_pr_curves(curves: dict[str, dict[int, PRCurve]], classes: list[str], metric: str, title: str = "",
                   columns: int = PR_COLUMNS) -> Figure:
    """One precision-recall panel per class; each source's curve in its line style, AP in the title.

    Args:
        curves: source (``cam``, ``center``, ...) -> class index -> curve
            (from :func:`precision_recall_curves`).
        classes: class names.
        metric: AP variant for the titles (a key of ``gradloc.metrics.METRICS``).
        title: figure title.
        columns: panels per row (at most; fewer when there are fewer classes).

    Returns:
        A figure of ``min(columns, n_classes) * 2.8`` by ``rows * 2.5 + 0.6`` inches.
    """
    shown = sorted(set().union(*(set(c) for c in curves.values()))) if curves else []
    if not shown:
        raise ValueError("no class has non-difficult ground truth; nothing to plot")
    columns = min(columns, len(shown))
    n_rows = -(-len(shown) // columns)
    fig = Figure(figsize=(columns * 2.8, n_rows * 2.5 + 0.6), dpi=DPI)
    axes = np.asarray(fig.subplots(n_rows, columns, squeeze=False))
    for ax in axes.flat[len(shown):]:
        ax.set_axis_off()
    for ax, c in zip(axes.flat, shown, strict=False):
        aps = []
        for i, (source, per_class) in enumerate(curves.items()):
            curve = per_class.get(c)
            if curve is None:
                continue
            ap = metrics.voc_ap(curve.recall, curve.precision, metric)
            aps.append(f"{source} {100 * ap:.1f}")
            ax.plot(curve.recall, curve.precision, SOURCE_STYLES.get(source, "--"), color=f"C{i}",
                    linewidth=1.2, marker="." if curve.recall.size < 3 else None, label=source)
        ax.set_title(f"{classes[c]} (n_gt {next(iter(curves.values()))[c].n_gt})\nAP: " + ", ".join(aps),
                     fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
    axes.flat[0].set_xlabel("recall", fontsize=7)
    axes.flat[0].set_ylabel("precision", fontsize=7)
    axes.flat[0].legend(fontsize=6, loc="lower left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


# --- a run folder -------------------------------------------------------------------------------------------


def _baseline_detections(run: Run, threshold: float) -> dict[str, Detections]:
    found = dict(run.baselines)
    random = run.random_at(threshold)
    if random is not None:
        found["random"] = random
    return found


def plot_run(run_dir: str | Path, threshold: float | None = None, iou: float = 0.5,
             out_dir: str | Path | None = None) -> list[Path]:
    """Write the threshold curves and the per-class PR curves of a run folder as PNGs.

    Args:
        run_dir: a folder made by ``gradloc run`` (scores.csv, gt.pkl, detections/, baselines/).
        threshold: τ of the PR curves; None = the τ of best CAM mAP at ``iou`` on this split (an oracle
            choice, said in the figure title).
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
    if threshold is None:
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
                                      f"({mode} semantics); CAM solid, baselines dashed; every tau shown "
                                      "(best-of-sweep on this split is an oracle choice)")
    written.append(out_dir / "ap_recall_vs_threshold.png")
    fig.savefig(written[-1], dpi=DPI, format="png")

    gt = run.gt
    dets = {"cam": run.detections_at(threshold), **_baseline_detections(run, threshold)}
    curves = {source: precision_recall_curves(d, gt, iou) for source, d in dets.items()}
    fig = plot_pr_curves(curves, gt.classes, metric,
                         f"{run_dir.name}: precision-recall at {choice} ({mode}), IoU > {iou:g}; "
                         f"AP = {METRIC_NAMES.get(metric, metric)} in %")
    written.append(out_dir / f"pr_{threshold_filename(threshold)[:-4]}_iou_{iou:g}.png")
    fig.savefig(written[-1], dpi=DPI, format="png")
    logger.info("wrote %s", ", ".join(str(p) for p in written))
    return written
