"""Threshold selection on one split, evaluation on another (``gradloc sweep``).

Reporting the best τ of a sweep on the split it is evaluated on is an *oracle* choice: it uses the
evaluation labels to pick a hyper-parameter (Choe et al., "Evaluating Weakly Supervised Object Localization
Methods Right", CVPR 2020, Sec. 4). ``gradloc sweep`` runs the pipeline on a selection split and on an
evaluation split (``<out>/<name>/<split>/``, ordinary run folders), picks τ on the selection split by a
selection metric, and reports the evaluation split's scores at that τ next to the oracle τ of the evaluation
split. Every row says where its τ was chosen; a τ chosen on the evaluated split is labelled ``oracle``.

Selection metrics (``SELECT_METRICS``, written ``<name>@<iou>``): ``ap@0.5`` = CAM mAP at IoU 0.5,
``recall@0.5`` = CAM mean recall at IoU 0.5. The highest value wins; ties go to the smallest τ; NaN values
(no class with GT) never win.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from tabulate import tabulate

from gradloc.core.files import atomic_write_bytes
from gradloc.core.names import excerpt
from gradloc.core.ranges import IOU_RANGE
from gradloc.run.pipeline import StageProgress, run
from gradloc.scoring.tables import DIGITS, METRIC_NAMES, is_close, select_threshold

logger = logging.getLogger(__name__)


# selection metric name -> score column of the CAM mAP row it maximizes
SELECT_METRICS: dict[str, str] = {"ap": "ap", "recall": "recall"}


def parse_select_metric(text: str) -> tuple[str, float]:
    """``"ap@0.5"`` -> ``("ap", 0.5)``.

    Raises:
        ValueError: not ``<name>@<iou>`` with a name of ``SELECT_METRICS`` and an IoU in (0, 1).
    """
    name, at, iou_text = text.partition("@")
    try:
        iou = float(iou_text)
    except ValueError:
        iou = float("nan")
    if not at or name not in SELECT_METRICS or iou not in IOU_RANGE:
        raise ValueError(f"selection metric {excerpt(text)} is not <name>@<iou> with a name of "
                         f"{', '.join(SELECT_METRICS)} and an IoU in {IOU_RANGE}, e.g. ap@0.5")
    return name, iou


def sweep_table(select_rows: pd.DataFrame, eval_rows: pd.DataFrame, select_metric: str, select_split: str,
                eval_split: str) -> pd.DataFrame:
    """The evaluation split's scores at the τ chosen on the selection split, and at its oracle τ.

    Args:
        select_rows, eval_rows: flat score rows of the selection and the evaluation split (the same rows
            when the splits are equal).
        select_metric: e.g. ``ap@0.5`` (see :func:`parse_select_metric`).
        select_split, eval_split: split names, for the labels.

    Returns:
        Flat rows ``choice`` (``selected`` / ``oracle``), ``label``, ``oracle`` (bool: τ chosen on the
        evaluated split), ``chosen_on``, ``evaluated_on``, ``select_metric``, ``select_value`` (on
        ``chosen_on``), ``threshold``, ``source``, ``iou``, ``ap``, ``recall``: every source (CAM and
        baselines) and IoU of the evaluation rows at that τ. When the splits are equal there is one
        choice, labelled oracle.
    """
    name, iou = parse_select_metric(select_metric)
    column = SELECT_METRICS[name]
    choices = []
    if select_split != eval_split:
        tau, value = select_threshold(select_rows, column, iou)
        choices.append(("selected", f"tau chosen on {select_split}", False, select_split, tau, value))
    tau, value = select_threshold(eval_rows, column, iou)
    choices.append(("oracle", f"oracle: tau chosen on {eval_split} (the evaluated split)", True, eval_split,
                    tau, value))
    out = []
    for choice, label, oracle, chosen_on, tau, value in choices:
        part = eval_rows[(eval_rows["class"] == "mAP") & is_close(eval_rows["threshold"], tau)]
        if part.empty:
            raise ValueError(f"threshold {tau:g} chosen on {chosen_on} was not scored on {eval_split}; "
                             "use the same boxes.thresholds for both splits")
        for r in part.sort_values(["source", "iou"], key=_source_order, kind="stable").itertuples():
            out.append({"choice": choice, "label": label, "oracle": oracle, "chosen_on": chosen_on,
                        "evaluated_on": eval_split, "select_metric": select_metric, "select_value": value,
                        "threshold": tau, "source": r.source, "iou": r.iou, "ap": r.ap, "recall": r.recall})
    return pd.DataFrame(out)


def _source_order(column: pd.Series) -> pd.Series:
    """Sort key: CAM first, then baselines by name; other columns unchanged."""
    if column.name != "source":
        return column
    return column.map(lambda s: (s != "cam", s))


def render_sweep(table: pd.DataFrame, metric: str | None = None, tablefmt: str = "orgtbl",
                 digits: int = DIGITS) -> str:
    """The sweep table as text: one row per (choice, source), AP and recall (%) per IoU, and the protocol.

    Args:
        table: from :func:`sweep_table`.
        metric: AP variant name for the protocol line (``voc07`` / ``voc10``).
        tablefmt: tabulate format.
        digits: decimals of the percentages.
    """
    ious = sorted(set(table["iou"]))
    lines = []
    for (label, source), part in table.groupby(["label", "source"], sort=False):
        by_iou = part.set_index("iou")
        first = part.iloc[0]
        ap = (100 * by_iou["ap"].reindex(ious)).tolist()
        recall = (100 * by_iou["recall"].reindex(ious)).tolist()
        value = 100 * float(first["select_value"])
        lines.append([label, float(first["threshold"]), value, source, *ap, *recall])
    first = table.iloc[0]
    headers = ["tau chosen", "tau", f"{first['select_metric']} on chosen split", "boxes",
               *[f"ap@{v:g}" for v in ious], *[f"recall@{v:g}" for v in ious]]
    formats = ("", "g", f".{digits}f", "", *[f".{digits}f"] * (2 * len(ious)))
    text = tabulate(lines, headers=headers, tablefmt=tablefmt, floatfmt=formats, numalign="right")
    name = METRIC_NAMES.get(metric or "", metric or "AP")
    protocol = (f"Scores on {first['evaluated_on']} ({name}, mAP over classes with non-difficult GT, match "
                f"when IoU > the column, values in %); tau picked by the best CAM {first['select_metric']} "
                "(mean over classes) on the split named in the first column, ties -> smallest tau; rows "
                "labelled oracle picked tau on the evaluated split itself; baselines are shown at the same "
                "tau (center and full do not depend on it).")
    return f"{text}\n{protocol}\n"


@dataclass(frozen=True)
class SweepResult:
    """What :func:`run_sweep` made: the table, the run folder of each split and the written files."""

    table: pd.DataFrame
    run_dirs: dict[str, Path]
    files: list[Path]
    text: str


def split_config(config: Any, split: str) -> Any:
    """The run config of one split of a sweep: same settings, ``data.split = split``, run folder
    ``<out>/<name>/<split>/``."""
    return dataclasses.replace(config, out=str(config.run_dir), name=split,
                               data=dataclasses.replace(config.data, split=split))


def run_split(config: Any, stage: StageProgress | None = None) -> tuple[Path, pd.DataFrame]:
    """CAMs, boxes and scores of one config (an ordinary run folder with manifest.json and scores files).

    Args:
        config: a prepared :class:`gradloc.run.config.RunConfig` (demo configs through
        ``gradloc.run.setup.prepare_demo``).
        stage: optional progress factory ``(description, total) -> context manager yielding update(n)``.

    Returns:
        ``(run_dir, score rows)``.
    """

    result = run(config, stage=stage)
    return result.run_dir, result.rows


def run_sweep(config: Any, select_split: str, eval_split: str, select_metric: str = "ap@0.5",
              stage: StageProgress | None = None, digits: int = DIGITS) -> SweepResult:
    """Run the pipeline on the selection and evaluation splits, choose τ, write ``sweep.csv`` / ``sweep.md``.

    Args:
        config: a prepared run config; its ``data.split`` is replaced by each split.
        select_split: split τ is chosen on; eval_split: split the scores are reported on (may be equal:
            then the only choice is labelled oracle).
        select_metric: e.g. ``ap@0.5``; its IoU must be among ``config.score.iou``.
        stage: optional progress factory (see :func:`run_split`).
        digits: decimals of the percentages in the returned text.

    Returns:
        The :class:`SweepResult`; files go to ``<out>/<name>/`` (runs in ``<out>/<name>/<split>/``).

    Raises:
        ValueError: bad selection metric or IoU not scored (checked before any work), pipeline errors.
    """
    _, iou = parse_select_metric(select_metric)
    if not is_close(config.score.iou, iou).any():
        raise ValueError(f"selection metric {select_metric}: IoU {iou:g} is not scored "
                         f"(score.iou = {', '.join(f'{v:g}' for v in config.score.iou)}); add it with --iou")
    run_dirs, rows = {}, {}
    for split in dict.fromkeys((select_split, eval_split)):
        run_dirs[split], rows[split] = run_split(split_config(config, split), stage)
    table = sweep_table(rows[select_split], rows[eval_split], select_metric, select_split, eval_split)
    text = render_sweep(table, config.score.metric, digits=digits)
    out_dir = config.run_dir
    files = [out_dir / "sweep.csv", out_dir / "sweep.md"]
    atomic_write_bytes(files[0], table.to_csv(index=False).encode())
    atomic_write_bytes(files[1], (render_sweep(table, config.score.metric, tablefmt="github")).encode())
    logger.info("sweep: tau chosen by %s on %s, reported on %s; wrote %s", select_metric, select_split,
                eval_split, out_dir)
    return SweepResult(table=table, run_dirs=run_dirs, files=files, text=text)
