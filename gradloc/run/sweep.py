"""Threshold selection on one split, evaluation on another (``gradloc sweep``).

Reporting the best τ of a sweep on the split it is evaluated on is an *oracle* choice: it uses the
evaluation labels to pick a hyper-parameter (Choe et al., "Evaluating Weakly Supervised Object Localization
Methods Right", CVPR 2020, Sec. 4). ``gradloc sweep`` runs the pipeline on a selection split and on an
evaluation split (``<out>/<name>-<split>/``, ordinary run folders beside each other, never inside a run
folder; the tables go to ``<out>/<name>-sweep/``), picks τ on the selection split by a
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
import yaml
from tabulate import tabulate

from gradloc.core.files import atomic_write_bytes
from gradloc.core.names import excerpt
from gradloc.core.ranges import IOU_RANGE
from gradloc.run.cv import Variant, best_center_size, cross_validate, refit_config
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
                eval_split: str, eval_localization: pd.DataFrame | None = None) -> pd.DataFrame:
    """The evaluation split's scores at the τ chosen on the selection split, and at its oracle τ.

    Args:
        select_rows, eval_rows: flat score rows of the selection and the evaluation split (the same rows
            when the splits are equal).
        select_metric: e.g. ``ap@0.5`` (see :func:`parse_select_metric`).
        select_split, eval_split: split names, for the labels.
        eval_localization: the evaluation run's ``localization.csv`` rows, for the CAM's CorLoc@0.5 at τ.

    Returns:
        Flat rows ``choice`` (``selected`` / ``oracle``), ``label``, ``oracle`` (bool: τ chosen on the
        evaluated split), ``chosen_on``, ``evaluated_on``, ``select_metric``, ``select_value`` (on
        ``chosen_on``), ``threshold``, ``source``, ``iou``, ``ap``, ``recall``, ``corloc`` (CAM rows: CorLoc@0.5
        at that τ, the mean over classes; NaN for baselines or without ``eval_localization``): every source
        (CAM and baselines) and IoU of the evaluation rows at that τ. When the splits are equal there is one
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
    corloc = pd.Series(dtype=float)
    if eval_localization is not None:
        means = eval_localization[(eval_localization["metric"] == "corloc@0.5")
                                  & (eval_localization["class"] == "mean")]
        corloc = means.set_index("threshold")["value"]
    out = []
    for choice, label, oracle, chosen_on, tau, value in choices:
        found = corloc[is_close(corloc.index, tau)] if len(corloc) else corloc
        part = eval_rows[(eval_rows["class"] == "mAP") & is_close(eval_rows["threshold"], tau)]
        if part.empty:
            raise ValueError(f"threshold {tau:g} chosen on {chosen_on} was not scored on {eval_split}; "
                             "use the same boxes.thresholds for both splits")
        for r in part.sort_values(["source", "iou"], key=_source_order, kind="stable").itertuples():
            out.append({"choice": choice, "label": label, "oracle": oracle, "chosen_on": chosen_on,
                        "evaluated_on": eval_split, "select_metric": select_metric, "select_value": value,
                        "threshold": tau, "source": r.source, "iou": r.iou, "ap": r.ap, "recall": r.recall,
                        "corloc": float(found.iloc[0]) if r.source == "cam" and len(found) else float("nan")})
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
        corloc = 100 * float(first["corloc"]) if "corloc" in part else float("nan")
        lines.append([label, float(first["threshold"]), value, source, *ap, *recall,
                      None if corloc != corloc else corloc])
    first = table.iloc[0]
    headers = ["tau chosen", "tau", f"{first['select_metric']} on chosen split", "boxes",
               *[f"ap@{v:g}" for v in ious], *[f"recall@{v:g}" for v in ious], "CorLoc@0.5"]
    formats = ("", "g", f".{digits}f", "", *[f".{digits}f"] * (2 * len(ious) + 1))
    text = tabulate(lines, headers=headers, tablefmt=tablefmt, floatfmt=formats, numalign="right",
                    missingval="-")
    name = METRIC_NAMES.get(metric or "", metric or "AP")
    protocol = (f"Scores on {first['evaluated_on']} ({name}, mAP over classes with non-difficult GT, match "
                f"when IoU > the column, values in %); tau picked by the best CAM {first['select_metric']} "
                "(mean over classes) on the split named in the first column, ties -> smallest tau; rows "
                "labelled oracle picked tau on the evaluated split itself; baselines are shown at the same "
                "tau (center and full do not depend on it); CorLoc@0.5: per class, the share of its images whose top-"
                "scoring CAM box of it has IoU >= 0.5 with a GT box of it, mean over classes, CAM rows only.")
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
    ``<out>/<name>-<split>/``: a sibling of the run folder ``<out>/<name>/`` of ``gradloc run --name <name>``,
    so neither replaces the other (a run folder is swapped in whole)."""
    return dataclasses.replace(config, name=f"{config.name}-{split}",
                               data=dataclasses.replace(config.data, split=split))


def sweep_dir(config: Any) -> Path:
    """The folder of the sweep's table (``sweep.csv``, ``sweep.md``): ``<out>/<name>-sweep/``."""
    return Path(config.out) / f"{config.name}-sweep"


def run_split(config: Any, stage: StageProgress | None = None) -> tuple[Path, pd.DataFrame, pd.DataFrame]:
    """CAMs, boxes and scores of one config (an ordinary run folder with manifest.json and scores files).

    Args:
        config: a prepared :class:`gradloc.run.config.RunConfig` (demo configs through
        ``gradloc.run.setup.prepare_demo``).
        stage: optional progress factory ``(description, total) -> context manager yielding update(n)``.

    Returns:
        ``(run_dir, score rows, localization rows)``.
    """

    result = run(config, stage=stage)
    return result.run_dir, result.rows, result.localization


def run_sweep(config: Any, select_split: str, eval_split: str, select_metric: str = "ap@0.5",
              stage: StageProgress | None = None, digits: int = DIGITS, folds: int | None = None, seed: int = 0,
              variants: list[Variant] | None = None) -> SweepResult:
    """Choose τ (and, with ``folds``, a variant and the centre box's size) on the selection split, report the
    evaluation split at that choice; write ``sweep.csv`` / ``sweep.md`` (and, with ``folds``, ``cv.csv``,
    ``ablations.csv`` / ``ablations.md`` and ``chosen.yaml``).

    Args:
        config: a prepared run config; its ``data.split`` is replaced by each split.
        select_split: split the choices are made on; eval_split: split the scores are reported on (may be
            equal: then the only choice is labelled oracle).
        select_metric: e.g. ``ap@0.5``; its IoU must be among ``config.score.iou``.
        stage: optional progress factory (see :func:`run_split`).
        digits: decimals of the percentages in the returned text.
        folds: choose on ``folds`` held-out folds of the selection split (:mod:`gradloc.run.cv`: the head is
            refitted per fold, then on the whole selection split for the evaluation run); None: on the
            selection split's own run, with the config's head as it is (in-sample if that head was fitted
            on the selection split; the table says so).
        seed: of the fold assignment.
        variants: alternatives cross-validated alike (needs ``folds``); the best held-out score wins.

    Returns:
        The :class:`SweepResult`; the tables go to ``<out>/<name>-sweep/`` (:func:`sweep_dir`), the runs to
        ``<out>/<name>-<split>/`` (:func:`split_config`; with several variants ``<out>/<name>-<variant>-<split>/``).

    Raises:
        ValueError: bad selection metric, IoU not scored or variants without folds (checked before any work),
            pipeline errors.
    """
    name, iou = parse_select_metric(select_metric)
    if not is_close(config.score.iou, iou).any():
        raise ValueError(f"selection metric {select_metric}: IoU {iou:g} is not scored "
                         f"(score.iou = {', '.join(f'{v:g}' for v in config.score.iou)}); add it with --iou")
    if variants and folds is None:
        raise ValueError("variants are chosen on held-out folds of the selection split: give --folds K")
    if folds is not None and select_split == eval_split:
        raise ValueError(f"--folds chooses on {select_split} and reports {eval_split}: give two different splits")
    out_dir = sweep_dir(config)
    files = [out_dir / "sweep.csv", out_dir / "sweep.md"]
    if folds is None:
        run_dirs, rows, localization = {}, {}, {}
        for split in dict.fromkeys((select_split, eval_split)):
            run_dirs[split], rows[split], localization[split] = run_split(split_config(config, split), stage)
        table = sweep_table(rows[select_split], rows[eval_split], select_metric, select_split, eval_split,
                            localization[eval_split])
    else:
        selection = select_by_cv(config, select_split, eval_split, SELECT_METRICS[name], iou, folds, seed,
                                 variants or [Variant(config.name)], stage)
        table = sweep_table(selection.cv_rows, selection.eval_rows, select_metric,
                            f"{select_split} ({folds} held-out folds)", eval_split, selection.eval_localization)
        run_dirs = {eval_split: selection.run_dir}
        files += selection.write(out_dir, digits)
    atomic_write_bytes(files[0], table.to_csv(index=False).encode())
    atomic_write_bytes(files[1], (render_sweep(table, config.score.metric, tablefmt="github")).encode())
    logger.info("sweep: chosen by %s on %s, reported on %s; wrote %s", select_metric, select_split, eval_split,
                out_dir)
    return SweepResult(table=table, run_dirs=run_dirs, files=files, text=render_sweep(table, config.score.metric,
                                                                                     digits=digits))


@dataclass
class Selection:
    """What :func:`select_by_cv` chose and measured.

    Attributes:
        ablations: one row per variant: its held-out (CV) choice of τ and centre size, the CV scores, and the
            evaluation split's scores at that choice (and at its own oracle τ, labelled).
        cv_rows, eval_rows: the score rows of the chosen variant (held-out folds; evaluation split).
        eval_localization: the chosen variant's localization rows on the evaluation split.
        all_cv_rows: every variant's held-out rows (column ``variant``).
        chosen: the chosen variant's evaluation config (refitted head, selected τ, centre size).
        run_dir: its evaluation run folder.
    """

    ablations: pd.DataFrame
    cv_rows: pd.DataFrame
    eval_rows: pd.DataFrame
    eval_localization: pd.DataFrame
    all_cv_rows: pd.DataFrame
    chosen: Any
    run_dir: Path

    def write(self, out_dir: Path, digits: int = DIGITS) -> list[Path]:
        """``cv.csv``, ``ablations.csv``, ``ablations.md``, ``chosen.yaml`` in ``out_dir``; returns them."""
        files = [out_dir / name for name in ("cv.csv", "ablations.csv", "ablations.md", "chosen.yaml")]
        atomic_write_bytes(files[0], self.all_cv_rows.to_csv(index=False).encode())
        atomic_write_bytes(files[1], self.ablations.to_csv(index=False).encode())
        atomic_write_bytes(files[2], render_ablations(self.ablations, "github", digits).encode())
        atomic_write_bytes(files[3], yaml.safe_dump(self.chosen.to_dict(), sort_keys=False).encode())
        return files


def select_by_cv(config: Any, select_split: str, eval_split: str, column: str, iou: float, folds: int, seed: int,
                 variants: list[Variant], stage: StageProgress | None = None) -> Selection:
    """Cross-validate every variant on ``select_split`` (:func:`gradloc.run.cv.cross_validate`), choose each
    one's τ and centre size on its held-out rows, run each at its choice on ``eval_split`` with the head
    refitted on the whole selection split, and pick the variant with the best held-out score (ties: the
    first listed). The evaluation split never enters a choice."""
    rows, results = [], []
    for variant in variants:
        variant_config = variant.apply(config)
        cv = cross_validate(variant_config, select_split, folds, seed, stage)
        tau, cv_value = select_threshold(cv.rows, column, iou)
        size, center_cv = best_center_size(cv.center, iou)
        chosen = refit_config(variant_config, select_split, None)
        boxes = dataclasses.replace(chosen.boxes, selected_threshold=tau, center_size=size,
                                    selected_on=f"{select_split} ({folds}-fold CV)")
        chosen = dataclasses.replace(chosen, name=f"{config.name}-{variant.name}" if len(variants) > 1 else
                                     config.name, boxes=boxes)
        run_dir, eval_rows, eval_localization = run_split(split_config(chosen, eval_split), stage)
        at = eval_rows[(eval_rows["class"] == "mAP") & is_close(eval_rows["iou"], iou)]
        cam = at[at["source"] == "cam"]
        oracle_tau, oracle = select_threshold(eval_rows, column, iou)
        rows.append({"variant": variant.name, "what": variant.what, "metric": column, "iou": iou, "tau": tau,
                     "cv": cv_value, "eval": float(cam.loc[is_close(cam["threshold"], tau), column].iloc[0]),
                     "center_size": size, "cv_center": center_cv,
                     "eval_center": float(at.loc[at["source"] == "center", column].iloc[0]),
                     "eval_oracle_tau": oracle_tau, "eval_at_oracle_tau": oracle, "select_split": select_split,
                     "folds": folds, "seed": seed, "eval_split": eval_split})
        results.append((cv, eval_rows, eval_localization, chosen, run_dir))
    table = pd.DataFrame(rows)
    best = int(table["cv"].to_numpy().argmax())
    table.insert(1, "chosen", [i == best for i in range(len(table))])
    cv, eval_rows, eval_localization, chosen, run_dir = results[best]
    all_cv = pd.concat([r[0].rows.assign(variant=v.name) for r, v in zip(results, variants, strict=True)],
                       ignore_index=True)
    return Selection(table, cv.rows, eval_rows, eval_localization, all_cv, chosen, run_dir)


def render_ablations(table: pd.DataFrame, tablefmt: str = "orgtbl", digits: int = DIGITS) -> str:
    """The ablation table (:func:`select_by_cv`) as text: every variant with its held-out choice, held-out
    score and evaluation score, and the protocol."""
    first = table.iloc[0]
    measure, split = f"{first['metric']}@{first['iou']:g}", first["eval_split"]
    lines = [[f"**{r.variant}**" if r.chosen else r.variant, r.what, r.tau, 100 * r.cv, 100 * r.eval,
              r.center_size, 100 * r.cv_center, 100 * r.eval_center] for r in table.itertuples()]
    headers = ["variant", "what changed", "tau (cv)", f"cv {measure}", f"{split} {measure}", "center size (cv)",
               f"center cv {measure}", f"center {split} {measure}"]
    floats = ("", "", "g", f".{digits}f", f".{digits}f", "g", f".{digits}f", f".{digits}f")
    text = tabulate(lines, headers=headers, tablefmt=tablefmt, floatfmt=floats)
    protocol = (f"Every choice on {first['folds']} held-out folds of {first['select_split']} (stratified by class, "
                f"seed {first['seed']}; a trained head refitted on the other folds for each); the bold variant "
                f"has the best held-out {measure} and is the one chosen; {split} is reported at each variant's "
                f"own held-out choice of tau and centre size, never used to choose; values in %.")
    return f"{text}\n{protocol}\n"
