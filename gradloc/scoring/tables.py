"""Score rows: the one place they are read (``scores.csv``) and queried (τ / IoU matching, τ selection), and
the tables in the formats users read: per-threshold blocks or one row per τ, per-class tables, CSV, JSON.

Score rows (one per threshold, IoU, class, source) are flat dicts in a pandas DataFrame with the columns
``threshold, threshold_mode, iou, metric, class, ap, recall, n_gt, n_det, source, box_mode``; ``class ==
"mAP"`` is the mean row. AP and recall are fractions in rows and files, percentages in printed tables.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tabulate import tabulate

from gradloc.core.files import atomic_write_bytes

METRIC_NAMES = {"voc07": "VOC07 11-point AP", "voc10": "all-point AP (VOC2010+)"}


FORMATS = ("table", "markdown", "csv", "json")
TABLE_FORMATS = {"table": "orgtbl", "markdown": "github"}  # human formats -> tabulate's table format


JSON_FORMAT = "gradloc.scores/1"
"""``format`` of the JSON document of scores (``--format json``, ``scores.json``)."""

JSON_KEYS = ["threshold", "threshold_mode", "iou", "metric", "class", "ap", "recall", "n_gt", "n_det",
             "source", "box_mode", "ci_low", "ci_high", "ci_method"]


DIGITS = 2  # decimals of printed percentages (``--digits``)


LAYOUTS = ("blocks", "rows")


# box mode (gradloc.boxes.cut.BOX_MODES) -> what the protocol line says
BOX_MODE_WORDS = {"largest": "the largest component", "all": "all components", "union": "the union of all components"}


MATCH_TOLERANCE = 1e-9  # thresholds and IoUs are the same when they differ by at most this


def is_close(values: pd.Series | np.ndarray, wanted: float) -> np.ndarray:
    """bool[N]: which ``values`` equal ``wanted`` within :data:`MATCH_TOLERANCE` (the one float comparison
    used for thresholds and IoUs)."""
    return np.isclose(np.asarray(values, dtype=np.float64), wanted, rtol=0.0, atol=MATCH_TOLERANCE)


def match_value(values: Iterable[float], wanted: float, what: str, source: str | Path) -> float:
    """The value among ``values`` equal to ``wanted`` (within :data:`MATCH_TOLERANCE`), as stored.

    Raises:
        ValueError: no such value; the message names ``source`` and lists the available values.
    """
    available = sorted({float(v) for v in values})
    hits = [v for v in available if abs(v - wanted) <= MATCH_TOLERANCE]
    if not hits:
        raise ValueError(f"{source}: no {what} {wanted:g}; available: {', '.join(f'{v:g}' for v in available)}")
    return hits[0]


def select_threshold(rows: pd.DataFrame, column: str, iou: float) -> tuple[float, float]:
    """τ maximizing a CAM mean score at one IoU.

    Args:
        rows: flat score rows; the ``class == "mAP"``, ``source == "cam"`` rows at ``iou`` are used.
        column: ``ap`` or ``recall``.
        iou: IoU threshold (compared with :func:`is_close`).

    Returns:
        ``(τ, value)``: the highest value; ties -> the smallest τ; NaN never wins.

    Raises:
        ValueError: no CAM mAP rows with a value at ``iou``; the message lists the IoUs available.
    """
    means = rows[(rows["class"] == "mAP") & (rows["source"] == "cam")]
    part = means[is_close(means["iou"], iou)].dropna(subset=[column])
    if part.empty:
        available = ", ".join(f"{v:g}" for v in sorted(set(means["iou"])))
        raise ValueError(f"no CAM mAP {column} at IoU {iou:g} to select a threshold from "
                         f"(IoUs scored: {available or 'none'}); add it to score.iou / --iou")
    part = part.sort_values("threshold", kind="stable")
    best = int(np.argmax(part[column].to_numpy(dtype=np.float64)))
    return float(part["threshold"].iloc[best]), float(part[column].iloc[best])


def _suffix(source: str) -> str:
    return "" if source == "cam" else f" ({source})"


def _block(frame: pd.DataFrame, tablefmt: str, digits: int) -> str:
    """One threshold: rows ap / recall (mAP over classes, in %), one column per IoU; baselines below."""
    means = frame[frame["class"] == "mAP"]
    ious = sorted(means["iou"].unique())
    lines = []
    for source, part in means.groupby("source", sort=False):
        by_iou = part.set_index("iou").reindex(ious)
        lines.append([f"ap{_suffix(source)}", *_blank_nan((100 * by_iou["ap"]).tolist())])
        lines.append([f"recall{_suffix(source)}", *_blank_nan((100 * by_iou["recall"]).tolist())])
    return tabulate(lines, headers=["", *[f"IoU {iou:g}" for iou in ious]], tablefmt=tablefmt,
                    floatfmt=f".{digits}f", numalign="left", missingval="-")


def _threshold_label(tau: float, mode: str, selected: float | None = None) -> str:
    if math.isnan(tau):
        return "threshold = none (detections without a threshold)"
    mark = "  <- the selected tau" if selected is not None and abs(tau - selected) <= MATCH_TOLERANCE else ""
    return f"threshold = {tau:g}" + ("" if mode in ("max", "none") else f" ({mode})") + mark


def selected_tau(meta: Mapping[str, Any] | None) -> float | None:
    """The τ a run leads with (its config's ``boxes.selected_threshold``, stored in the protocol), or None."""
    value = (meta or {}).get("selected_threshold")
    return None if value is None else float(value)


def chosen_on_scored_split(meta: Mapping[str, Any]) -> bool:
    """Whether the selected τ was chosen on the split the run scores (``selected_on`` starts with its name):
    then it is an oracle choice."""
    chosen_on = str(meta.get("selected_on") or "")
    return bool(meta.get("split")) and chosen_on.split(" ")[0] == meta.get("split")


def threshold_tables(rows: pd.DataFrame, tablefmt: str = "orgtbl", digits: int = DIGITS,
                     selected: float | None = None) -> str:
    """The owner's layout: for each threshold a ``threshold = τ`` line (``selected`` marked) and an ap / recall
    x IoU table (percentages with ``digits`` decimals)."""
    blocks = []
    for tau, frame in rows.groupby("threshold", sort=True, dropna=False):
        blocks.append(_threshold_label(float(tau), str(frame["threshold_mode"].iloc[0]), selected))
        blocks.append(_block(frame, tablefmt, digits))
        blocks.append("")
    return "\n".join(blocks).rstrip() + "\n"


def threshold_rows(rows: pd.DataFrame, tablefmt: str = "orgtbl", digits: int = DIGITS,
                   selected: float | None = None) -> str:
    """The compact layout for long sweeps: one row per τ, columns ``ap@<IoU>`` and ``recall@<IoU>`` (mAP
    and mean recall in %) per source (CAM first, baselines after, named in parentheses); the ``selected`` τ
    is starred."""
    means = rows[rows["class"] == "mAP"]
    wide = means.pivot_table(index="threshold", columns=["source", "iou"], values=["ap", "recall"],
                             sort=False, dropna=False) * 100
    sources = list(dict.fromkeys(means["source"]))
    ious = sorted(means["iou"].unique())
    columns = [(metric, source, iou) for source in sources for metric in ("ap", "recall") for iou in ious]
    wide = wide.reindex(columns=pd.MultiIndex.from_tuples(columns)).sort_index()
    headers = ["tau", *[f"{metric}@{iou:g}{_suffix(source)}" for metric, source, iou in columns]]
    def label(tau: float) -> str:
        if math.isnan(tau):
            return "none"
        return f"{tau:g}" + (" *" if selected is not None and abs(tau - selected) <= MATCH_TOLERANCE else "")

    lines = [[label(tau), *_blank_nan(values)] for tau, values in zip(wide.index, wide.to_numpy().tolist(),
                                                                          strict=True)]
    return (tabulate(lines, headers=headers, tablefmt=tablefmt, floatfmt=f".{digits}f", numalign="right",
                     missingval="-", disable_numparse=[0]) + "\n"
            + ("* the selected tau\n" if selected is not None else ""))


def _blank_nan(values: list[float]) -> list[float | None]:
    """NaN (a class without GT, a source without that column) -> None, printed as ``-``."""
    return [None if isinstance(v, float) and math.isnan(v) else v for v in values]


def per_class_table(rows: pd.DataFrame, threshold: float, iou: float, tablefmt: str = "orgtbl",
                    digits: int = DIGITS) -> str:
    """AP and recall (%) of every class at one (threshold, IoU), CAM boxes and baselines side by side."""
    same_tau = rows["threshold"].isna() if math.isnan(threshold) else is_close(rows["threshold"], threshold)
    part = rows[same_tau & is_close(rows["iou"], iou)]
    wide = part.pivot_table(index="class", columns="source", values=["ap", "recall"], sort=False,
                            dropna=False) * 100
    wide.columns = [f"{metric}{_suffix(source)}" for metric, source in wide.columns]
    counts = part[part["source"] == part["source"].iloc[0]].set_index("class")[["n_gt", "n_det"]]
    table = counts.join(wide)
    table[["n_gt", "n_det"]] = table[["n_gt", "n_det"]].astype(int)
    ordered = [c for c in table.index if c != "mAP"] + (["mAP"] if "mAP" in table.index else [])
    lines = [[name, *_blank_nan(values)] for name, values in zip(ordered, table.loc[ordered].astype(object)
                                                                  .to_numpy().tolist(), strict=True)]
    return tabulate(lines, headers=["class", *table.columns], tablefmt=tablefmt, floatfmt=f".{digits}f",
                    missingval="-")


def protocol_line(rows: pd.DataFrame, meta: Mapping[str, Any] | None = None, oracle: bool = True) -> str:
    """One sentence naming everything the numbers depend on."""
    metric = METRIC_NAMES.get(str(rows["metric"].iloc[0]), str(rows["metric"].iloc[0]))
    mode = rows["threshold_mode"][rows["source"] == "cam"].iloc[0] if (rows["source"] == "cam").any() else "max"
    semantics = {
        "max": "foreground = heat >= tau * max(heat)",
        "minmax": "foreground = heat - min >= tau * (max - min)",
        "percentile": "foreground = heat >= tau-quantile of the map",
        "none": "none (boxes read as given)",
    }.get(mode, mode)
    n_classes = int(rows[(rows["class"] != "mAP") & (rows["n_gt"] > 0)]["class"].nunique())
    only = f" of {', '.join(meta['only'])} (--only)" if meta and meta.get("only") else ""
    parts = [f"Protocol: {metric}, mAP over the {n_classes} classes{only} with non-difficult GT, "
             f"columns = IoU (match when IoU > column, devkit rule), values in %; tau: {semantics}"]
    if meta:
        parts.append(
            f"CAM: {meta.get('method')} at layer {meta.get('layer')} of {meta.get('model')} "
            f"({meta.get('head')} head, input {meta.get('input_size')} {meta.get('resize_mode')}"
            f"{', ' + meta['precision'] if 'precision' in meta else ''}) on "
            f"{meta.get('dataset')}; boxes: {BOX_MODE_WORDS.get(meta.get('box_mode'), meta.get('box_mode'))} "
            f"(connectivity {meta.get('connectivity')}, working grid <= {meta.get('max_side') or 'full'} px); "
            f"classes explained: {meta.get('classes_explained')}; confidence: {meta.get('confidence')}"
        )
    center = f"{meta.get('center_size', 0.5):g}" if meta else "a fraction"
    parts.append(
        "baselines: the CAM row's classes and class probabilities with other boxes: center = centred box covering "
        f"{center} of the width and height and full = whole image (confidence: class probability); shuffled = "
        "the same class's map of another image, blob = a Gaussian of the map's own spread at a random position "
        "(both cut like the CAMs, same confidence rule)"
    )
    selected = selected_tau(meta)
    if selected is not None:
        parts.append(f"the selected tau is {selected:g} ({_chosen_words(meta or {})}); the other taus are shown "
                     "for reference: picking the best of them on this split is an oracle choice")
    elif oracle:
        parts.append("every tau of the sweep is shown; picking the best of them on this split is an oracle choice")
    return ";\n".join(parts) + "."


def _chosen_words(meta: Mapping[str, Any]) -> str:
    """Where the selected τ was chosen, in words."""
    chosen_on = meta.get("selected_on")
    if chosen_on is None:
        return "config boxes.selected_threshold; where it was chosen is not recorded (boxes.selected_on)"
    if chosen_on_scored_split(meta):
        return f"chosen on {chosen_on}, the split scored here: an oracle choice, not a held-out result"
    return f"chosen on {chosen_on}, scored on {meta.get('split') or 'this split'}"


def headline_text(headline: pd.DataFrame, meta: Mapping[str, Any] | None, digits: int = DIGITS) -> str:
    """The headline block printed first (rows of ``gradloc.run.score.headline_rows``): the numbers at the
    selected τ, the τ-free ones, and the oracle τ, each with its note."""
    meta = meta or {}
    selected = selected_tau(meta)
    if selected is None:
        title = ("Headline: no selected tau (set boxes.selected_threshold, chosen on another split, e.g. with "
                 "`gradloc sweep`); tau-free numbers and the oracle only, in %:")
    else:
        title = f"Headline at the selected tau = {selected:g} ({_chosen_words(meta)}), in %:"
    labels = [f"{r.metric}" + ("" if r.threshold != r.threshold or r.threshold == selected else
                               f" (tau {r.threshold:g})") for r in headline.itertuples()]
    values = [f"{100 * r.value:.{digits}f}" + (f" [{100 * r.low:.{digits}f}, {100 * r.high:.{digits}f}]"
                                               if r.low == r.low and r.high == r.high else "")
              for r in headline.itertuples()]
    width, value_width = max(map(len, labels)), max(map(len, values))
    lines = [title] + [f"  {label:<{width}}  {value:>{value_width}}  {r.note}"
                       for label, value, r in zip(labels, values, headline.itertuples(), strict=True)]
    return "\n".join(lines) + "\n"


def check_per_class(rows: pd.DataFrame, threshold: float) -> float:
    """The threshold of ``rows`` that ``--per-class`` names (as stored), checked before anything is printed.

    Raises:
        ValueError: ``threshold`` is not among the rows' thresholds; the message lists them.
    """
    return match_value(rows["threshold"].dropna(), threshold, "threshold", "--per-class")


def interval_table(rows: pd.DataFrame, corloc: pd.DataFrame | None = None, tablefmt: str = "orgtbl",
                   digits: int = DIGITS) -> str:
    """The mean rows with bootstrap intervals (columns ``ci_low``, ``ci_high``) as one row per (τ, source):
    ``mAP@IoU [low, high]`` per IoU, and the CAM's ``CorLoc@0.5 [low, high]`` when ``corloc`` is given."""
    means = rows[(rows["class"] == "mAP") & rows["ci_low"].notna()]
    fixed = means["threshold_mode"] == "none"  # threshold-free baselines: shown once
    means = pd.concat([means[~fixed], means[fixed & is_close(means["threshold"], means["threshold"].min())]])
    ious = sorted(means["iou"].unique())
    cell = f".{digits}f"
    by_tau = corloc.set_index("threshold") if corloc is not None and len(corloc) else None
    lines = []
    for (tau, source), part in means.groupby(["threshold", "source"], sort=False):
        at = part.set_index("iou")
        free = (part["threshold_mode"] == "none").all()
        line = ["any" if free else f"{tau:g}", source,
                *[f"{100 * at.at[iou, 'ap']:{cell}} [{100 * at.at[iou, 'ci_low']:{cell}}, "
                  f"{100 * at.at[iou, 'ci_high']:{cell}}]" if iou in at.index else "-" for iou in ious]]
        if by_tau is not None:
            found = by_tau.loc[tau] if source == "cam" and tau in by_tau.index else None
            line.append("-" if found is None else f"{100 * found['corloc']:{cell}} [{100 * found['ci_low']:{cell}}, "
                                                  f"{100 * found['ci_high']:{cell}}]")
        lines.append(line)
    headers = ["tau", "boxes", *[f"mAP@{iou:g} [95 % CI]" for iou in ious]]
    if by_tau is not None:
        headers.append("CorLoc@0.5 [95 % CI]")
    methods = ", ".join(sorted(set(means["ci_method"])))
    return (tabulate(lines, headers=headers, tablefmt=tablefmt, disable_numparse=True) + "\n"
            f"Intervals: {methods} bootstrap over images (1,000 resamples, seed 0; gradloc.scoring.bootstrap), "
            "95 %, in %.")


def render(rows: pd.DataFrame, fmt: str, meta: Mapping[str, Any] | None = None, *, digits: int = DIGITS,
           layout: str = "blocks", per_class: float | None = None, corloc: pd.DataFrame | None = None,
           headline: pd.DataFrame | None = None) -> str:
    """Score rows as one document in ``table`` / ``markdown`` (human) or ``csv`` / ``json`` (machine).

    Args:
        rows: flat score rows.
        fmt: a name of :data:`FORMATS`.
        meta: the protocol of the CAM detections, for the protocol line.
        digits: decimals of the percentages in tables (machine formats keep full precision fractions).
        layout: ``blocks`` (one ap/recall x IoU block per τ) or ``rows`` (one row per τ).
        per_class: a threshold of ``rows``: tables add per-class tables at it (one per IoU); machine formats
            keep only the rows of that threshold (every class and the mAP row, every source and IoU).
        corloc: CorLoc@0.5 intervals per τ (``gradloc.run.score.with_intervals``); tables add the intervals
            of the mean rows when ``rows`` has ``ci_low`` / ``ci_high`` columns.
        headline: the run's headline rows (``gradloc.run.score.headline_rows``): tables start with them, JSON
            carries them under ``headline``.

    JSON is one object: ``format`` (:data:`JSON_FORMAT`), ``protocol`` (the protocol line), ``selected_threshold``,
    ``selected_on``, ``split``, ``headline`` (rows, or null) and ``rows`` (the score rows, NaN as null).

    Raises:
        ValueError: unknown format or layout, negative digits, ``per_class`` not a threshold of ``rows``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if digits < 0:
        raise ValueError(f"digits {digits} is negative; give 0 or more decimals")
    tau = None if per_class is None else check_per_class(rows, per_class)
    oracle = rows["threshold"].nunique() > 1
    if fmt in ("csv", "json"):
        part = rows if tau is None else rows[is_close(rows["threshold"], tau)]
        if fmt == "csv":
            return part.to_csv(index=False)
        document = {"format": JSON_FORMAT, "protocol": protocol_line(rows, meta, oracle),
                    **{key: (meta or {}).get(key) for key in ("selected_threshold", "selected_on", "split")},
                    "headline": None if headline is None else to_json_rows(headline, list(headline.columns)),
                    "rows": to_json_rows(part)}
        return json.dumps(document, indent=1) + "\n"
    tablefmt = TABLE_FORMATS.get(fmt, "github")
    tables = (threshold_tables if layout == "blocks" else threshold_rows)(rows, tablefmt, digits, selected_tau(meta))
    text = "" if headline is None else headline_text(headline, meta, digits) + "\n"
    text += tables + "\n" + protocol_line(rows, meta, oracle) + "\n"
    if "ci_low" in rows.columns:
        text += "\n" + interval_table(rows, corloc, tablefmt, digits) + "\n"
    if tau is not None:
        for iou in sorted(rows["iou"].unique()):
            text += (f"\nPer class, threshold = {tau:g}, IoU = {iou:g} (AP and recall in %)\n"
                     + per_class_table(rows, tau, iou, tablefmt, digits) + "\n")
    return text


def to_json_rows(rows: pd.DataFrame, keys: Sequence[str] = JSON_KEYS) -> list[dict[str, Any]]:
    """Flat JSON rows of the columns ``keys``; NaN (classes without GT) becomes null."""
    records = rows[[c for c in keys if c in rows.columns]].to_dict("records")
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in records]


def save_scores(rows: pd.DataFrame, out_dir: str | Path, meta: Mapping[str, Any] | None = None,
                headline: pd.DataFrame | None = None) -> list[Path]:
    """Write scores.csv, scores.json (with the headline), scores.md (headline + tables + per-class tables +
    protocol) atomically."""
    out_dir = Path(out_dir)
    written = []
    for name, fmt in (("scores.csv", "csv"), ("scores.json", "json")):
        atomic_write_bytes(out_dir / name, render(rows, fmt, meta, headline=headline).encode())
        written.append(out_dir / name)
    markdown = [render(rows, "markdown", meta, headline=headline)]
    for tau in sorted(rows["threshold"].unique()):
        for iou in sorted(rows["iou"].unique()):
            markdown.append(f"\n### Per class, threshold = {tau:g}, IoU = {iou:g} (AP and recall in %)\n")
            markdown.append(per_class_table(rows, tau, iou, tablefmt="github"))
    atomic_write_bytes(out_dir / "scores.md", ("\n".join(markdown) + "\n").encode())
    written.append(out_dir / "scores.md")
    return written
