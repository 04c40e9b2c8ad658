"""Score tables in the formats users read: the owner's per-threshold blocks, per-class tables, CSV, JSON.

Score rows (one per threshold, IoU, class, source) are flat dicts in a pandas DataFrame with the columns
``threshold, threshold_mode, iou, metric, class, ap, recall, n_gt, n_det, source, box_mode``; ``class ==
"mAP"`` is the mean row. AP and recall are fractions in rows and files, percentages in printed tables.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from tabulate import tabulate

from gradloc.io import atomic_write_bytes

METRIC_NAMES = {"voc07": "VOC07 11-point AP", "voc10": "all-point AP (VOC2010+)"}
FORMATS = ("table", "markdown", "csv", "json")
JSON_KEYS = ["threshold", "threshold_mode", "iou", "metric", "class", "ap", "recall", "n_gt", "n_det",
             "source", "box_mode"]


def _block(frame: pd.DataFrame, tablefmt: str) -> str:
    """One threshold: rows ap / recall (mAP over classes, in %), one column per IoU; baselines below."""
    means = frame[frame["class"] == "mAP"]
    lines = []
    for source, part in means.groupby("source", sort=False):
        suffix = "" if source == "cam" else f" ({source})"
        by_iou = part.set_index("iou")
        lines.append([f"ap{suffix}", *(100 * by_iou["ap"]).tolist()])
        lines.append([f"recall{suffix}", *(100 * by_iou["recall"]).tolist()])
    ious = sorted(means["iou"].unique())
    return tabulate(lines, headers=["", *[f"{iou:g}" for iou in ious]], tablefmt=tablefmt, floatfmt=".6f",
                    numalign="left")


def threshold_tables(rows: pd.DataFrame, tablefmt: str = "orgtbl") -> str:
    """The owner's layout: for each threshold a ``threshold = τ`` line and an ap / recall x IoU table."""
    blocks = []
    for tau, frame in rows.groupby("threshold", sort=True):
        mode = frame["threshold_mode"].iloc[0]
        blocks.append(f"threshold = {tau:g}" + ("" if mode in ("max", "none") else f" ({mode})"))
        blocks.append(_block(frame, tablefmt))
        blocks.append("")
    return "\n".join(blocks).rstrip() + "\n"


def per_class_table(rows: pd.DataFrame, threshold: float, iou: float, tablefmt: str = "orgtbl") -> str:
    """AP and recall (%) of every class at one (threshold, IoU), CAM boxes and baselines side by side."""
    part = rows[(rows["threshold"] == threshold) & (rows["iou"] == iou)]
    wide = part.pivot_table(index="class", columns="source", values=["ap", "recall"], sort=False) * 100
    wide.columns = [f"{metric} ({source})" if source != "cam" else metric for metric, source in wide.columns]
    counts = part[part["source"] == "cam"].set_index("class")[["n_gt", "n_det"]]
    table = counts.join(wide)
    table[["n_gt", "n_det"]] = table[["n_gt", "n_det"]].astype(int)
    ordered = [c for c in table.index if c != "mAP"] + (["mAP"] if "mAP" in table.index else [])
    return tabulate(table.loc[ordered].astype(object), headers="keys", tablefmt=tablefmt, floatfmt=".2f")


def protocol_line(rows: pd.DataFrame, meta: Mapping[str, Any] | None = None, oracle: bool = True) -> str:
    """One sentence naming everything the numbers depend on."""
    metric = METRIC_NAMES.get(str(rows["metric"].iloc[0]), str(rows["metric"].iloc[0]))
    mode = rows["threshold_mode"][rows["source"] == "cam"].iloc[0] if (rows["source"] == "cam").any() else "max"
    semantics = {
        "max": "foreground = heat >= tau * max(heat)",
        "minmax": "foreground = heat - min >= tau * (max - min)",
        "percentile": "foreground = heat >= tau-quantile of the map",
    }.get(mode, mode)
    n_classes = int(rows[(rows["class"] != "mAP") & (rows["n_gt"] > 0)]["class"].nunique())
    parts = [f"Protocol: {metric}, mAP over the {n_classes} classes with non-difficult GT, "
             f"columns = IoU (match when IoU > column, devkit rule), values in %; tau: {semantics}"]
    if meta:
        parts.append(
            f"CAM: {meta.get('method')} at layer {meta.get('layer')} of {meta.get('model')} "
            f"({meta.get('head')} head, input {meta.get('input_size')} {meta.get('resize_mode')}) on "
            f"{meta.get('dataset')}; boxes: {meta.get('box_mode')} component "
            f"(connectivity {meta.get('connectivity')}, working grid <= {meta.get('max_side') or 'full'} px); "
            f"classes explained: {meta.get('classes_explained')}; confidence: {meta.get('confidence')}"
        )
    parts.append(
        "baselines: same classes and confidences, only the boxes differ (center = middle half of the image, "
        "full = whole image, random = random heatmap cut like the CAMs)"
    )
    if oracle:
        parts.append("every tau of the sweep is shown; picking the best of them on this split is an oracle choice")
    return ";\n".join(parts) + "."


def render(rows: pd.DataFrame, fmt: str, meta: Mapping[str, Any] | None = None) -> str:
    """Score rows in one of ``table`` (owner's layout), ``markdown``, ``csv``, ``json``."""
    if fmt == "table":
        return threshold_tables(rows) + "\n" + protocol_line(rows, meta) + "\n"
    if fmt == "markdown":
        return threshold_tables(rows, tablefmt="github") + "\n" + protocol_line(rows, meta) + "\n"
    if fmt == "csv":
        return rows.to_csv(index=False)
    if fmt == "json":
        return json.dumps(to_json_rows(rows), indent=1) + "\n"
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def to_json_rows(rows: pd.DataFrame) -> list[dict[str, Any]]:
    """Flat JSON rows; NaN (classes without GT) becomes null."""
    records = rows[[c for c in JSON_KEYS if c in rows.columns]].to_dict("records")
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in records]


def save_scores(rows: pd.DataFrame, out_dir: str | Path, meta: Mapping[str, Any] | None = None) -> list[Path]:
    """Write scores.csv, scores.json, scores.md (tables + per-class tables + protocol) atomically."""
    out_dir = Path(out_dir)
    written = []
    for name, fmt in (("scores.csv", "csv"), ("scores.json", "json")):
        atomic_write_bytes(out_dir / name, render(rows, fmt, meta).encode())
        written.append(out_dir / name)
    markdown = [render(rows, "markdown", meta)]
    for tau in sorted(rows["threshold"].unique()):
        for iou in sorted(rows["iou"].unique()):
            markdown.append(f"\n### Per class, threshold = {tau:g}, IoU = {iou:g}\n")
            markdown.append(per_class_table(rows, tau, iou, tablefmt="github"))
    atomic_write_bytes(out_dir / "scores.md", ("\n".join(markdown) + "\n").encode())
    written.append(out_dir / "scores.md")
    return written
