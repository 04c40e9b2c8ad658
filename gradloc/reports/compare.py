"""Two runs side by side: mAP per (threshold, IoU) with differences, per-class AP differences at one (τ, IoU).

``gradloc compare RUN_A RUN_B`` reads both runs' ``scores.csv`` (CAM boxes, ``source == "cam"``). Differences
are ``B - A``. Both runs must use the same AP variant and the same IoU thresholds; thresholds present in
only one run are left out (and said so). The per-class table is at one (τ, IoU): τ given by the user, or
the τ of run A's best mAP at that IoU, an oracle choice that the output names.

Runs on different ground truth (class lists, image ids, year or split) are refused unless ``force``: their AP
differences would mix data and method. The settings in which the runs' configs differ come first in the output.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tabulate import tabulate

from gradloc.run.folder import GT_FILE, Run, open_run
from gradloc.scoring.bootstrap import (
    N_RESAMPLES,
    corloc_statistic,
    map_statistic,
    max_box_acc_statistic,
    paired_interval,
    pointing_statistic,
)
from gradloc.scoring.tables import DIGITS, METRIC_NAMES, match_value, select_threshold

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Comparison:
    """The comparison of runs A and B (fractions in frames; differences are B - A).

    Attributes:
        names: labels of runs A and B.
        metric: AP variant (``voc07`` / ``voc10``).
        iou, threshold: the (IoU, τ) of the per-class table; ``threshold_choice`` says how τ was chosen.
        summary: CAM mAP rows per (threshold, iou): ``ap_a, ap_b, ap_diff, recall_a, recall_b, recall_diff``.
        per_class: per class at (τ, IoU), in class order then ``mAP``:
            ``n_gt_a, n_gt_b, ap_a, ap_b, ap_diff``.
        top: the ``per_class`` rows (mAP excluded) with the largest ``|ap_diff|``, largest first.
        notes: differences of protocol worth knowing (threshold semantics, box mode, GT, dropped τ).
        differences: the settings in which the runs' configs differ (see :func:`run_differences`).
        paired: the paired bootstrap differences B - A (:func:`paired_differences`), None for runs on
            different images.
    """

    names: tuple[str, str]
    metric: str
    iou: float
    threshold: float
    threshold_choice: str
    summary: pd.DataFrame
    per_class: pd.DataFrame
    top: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    differences: RunDifferences | None = None
    paired: pd.DataFrame | None = None


@dataclass(frozen=True)
class RunDifferences:
    """How two runs differ. ``config``: ``"cams.method: gradcam | gradcampp"`` per differing setting (A | B;
    run name, output and cache folders left out); ``ground_truth``: what makes their GT differ (class list, image
    ids, dataset), empty when the scores are comparable."""

    config: list[str]
    ground_truth: list[str]


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix.rstrip("."): data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


# config keys that name where a run went, not what it measured
_IGNORED_KEYS = ("name", "out", "cache_dir")


def _listing(values: list[str], shown: int = 4) -> str:
    head = ", ".join(values[:shown])
    return f"{len(values)} ({head}{', ...' if len(values) > shown else ''})"


def run_differences(run_a: Run, run_b: Run) -> RunDifferences:
    """The config settings (manifests; none when a run has no manifest) and ground truth (``gt.pkl``: class
    list, image ids; not compared when a folder has none) in which two runs differ."""
    manifest_a, manifest_b = run_a.manifest_or_none(), run_b.manifest_or_none()
    config = []
    if manifest_a is not None and manifest_b is not None:
        flat_a, flat_b = _flatten(manifest_a["config"]), _flatten(manifest_b["config"])
        for key in sorted(set(flat_a) | set(flat_b)):
            if key not in _IGNORED_KEYS and flat_a.get(key) != flat_b.get(key):
                config.append(f"{key}: {flat_a.get(key)} | {flat_b.get(key)}")
    ground_truth = []
    has_gt = all((run.path / GT_FILE).is_file() for run in (run_a, run_b))  # folders of scores only have none
    gt_a, gt_b = (run_a.gt, run_b.gt) if has_gt else (None, None)
    if has_gt and list(gt_a.classes) != list(gt_b.classes):
        ground_truth.append(f"classes {_listing(list(gt_a.classes))} | {_listing(list(gt_b.classes))}")
    if has_gt and list(gt_a.image_ids) != list(gt_b.image_ids):
        only_a = sorted(set(gt_a.image_ids) - set(gt_b.image_ids))
        only_b = sorted(set(gt_b.image_ids) - set(gt_a.image_ids))
        ground_truth.append(f"image ids: {len(gt_a.image_ids)} | {len(gt_b.image_ids)} images, "
                            f"{len(only_a)} only in A, {len(only_b)} only in B")
    if manifest_a is not None and manifest_b is not None:
        for key in ("data.year", "data.split"):
            a, b = _flatten(manifest_a["config"]).get(key), _flatten(manifest_b["config"]).get(key)
            if a != b:
                ground_truth.append(f"{key} {a} | {b}")
    return RunDifferences(config=config, ground_truth=ground_truth)


def _single(rows: pd.DataFrame, column: str, name: str) -> str:
    values = sorted({str(v) for v in rows[column]})
    if len(values) != 1:
        raise ValueError(f"run {name}: scores.csv mixes several {column} values ({', '.join(values)})")
    return values[0]


def compare_scores(rows_a: pd.DataFrame, rows_b: pd.DataFrame, iou: float = 0.5,
                   threshold: float | None = None, names: tuple[str, str] = ("A", "B"),
                   top: int = 5) -> Comparison:
    """Compare the CAM score rows of two runs.

    Args:
        rows_a, rows_b: flat score rows (``scores.csv``) of runs A and B.
        iou: IoU of the per-class table; must be one of the runs' IoUs.
        threshold: τ of the per-class table (must be in both runs); None = τ of A's best mAP at ``iou``
            (ties -> smallest τ), an oracle choice.
        names: labels of the runs in messages and tables.
        top: how many classes to list as the largest disagreements.

    Returns:
        The :class:`Comparison`.

    Raises:
        ValueError: different AP variants or IoU sets, IoU or τ not in both runs, no common τ, no CAM rows.
    """
    name_a, name_b = names
    cam_a, cam_b = rows_a[rows_a["source"] == "cam"], rows_b[rows_b["source"] == "cam"]
    for rows, name in ((cam_a, name_a), (cam_b, name_b)):
        if rows.empty:
            raise ValueError(f"run {name}: scores.csv has no CAM rows (source == 'cam')")
    metric_a, metric_b = _single(cam_a, "metric", name_a), _single(cam_b, "metric", name_b)
    if metric_a != metric_b:
        raise ValueError(f"the runs use different AP variants ({name_a}: {metric_a}, {name_b}: {metric_b}); "
                         f"rescore one with `gradloc score RUN --metric {metric_a}`")
    ious_a, ious_b = sorted(set(cam_a["iou"])), sorted(set(cam_b["iou"]))
    if ious_a != ious_b:
        raise ValueError(f"the runs are scored at different IoUs ({name_a}: {_numbers(ious_a)}; "
                         f"{name_b}: {_numbers(ious_b)}); rescore one with the other's --iou")
    iou = match_value(cam_a["iou"], iou, "IoU", f"run {name_a}")
    taus_a, taus_b = set(cam_a["threshold"]), set(cam_b["threshold"])
    common = sorted(taus_a & taus_b)
    if not common:
        raise ValueError(f"the runs share no threshold ({name_a}: {_numbers(taus_a)}; "
                         f"{name_b}: {_numbers(taus_b)})")
    notes = []
    for name, only in ((name_a, taus_a - taus_b), (name_b, taus_b - taus_a)):
        if only:
            notes.append(f"thresholds only in {name} left out: {_numbers(only)}")
    for column, what in (("threshold_mode", "threshold semantics"), ("box_mode", "box modes")):
        if column in cam_a.columns and column in cam_b.columns:
            mode_a = ", ".join(sorted(set(map(str, cam_a[column]))))
            mode_b = ", ".join(sorted(set(map(str, cam_b[column]))))
            if mode_a != mode_b:
                notes.append(f"different {what}: {name_a} {mode_a}, {name_b} {mode_b} "
                             "(same tau, different boxes)")
    cam_a = cam_a[cam_a["threshold"].isin(common)]
    cam_b = cam_b[cam_b["threshold"].isin(common)]
    if threshold is None:
        threshold, _ = select_threshold(cam_a, "ap", iou)
        choice = f"best mAP@{iou:g} of {name_a} on its own split: an oracle choice"
    else:
        threshold = match_value(pd.Series(common), threshold, "threshold common to both runs",
                                f"runs {name_a} and {name_b}")
        choice = "given"

    keys = ["threshold", "iou"]
    mean_a = cam_a[cam_a["class"] == "mAP"].set_index(keys)[["ap", "recall"]]
    mean_b = cam_b[cam_b["class"] == "mAP"].set_index(keys)[["ap", "recall"]]
    summary = mean_a.merge(mean_b, left_index=True, right_index=True, suffixes=("_a", "_b")).reset_index()
    summary["ap_diff"] = summary["ap_b"] - summary["ap_a"]
    summary["recall_diff"] = summary["recall_b"] - summary["recall_a"]
    summary = summary[[*keys, "ap_a", "ap_b", "ap_diff", "recall_a", "recall_b", "recall_diff"]]
    summary = summary.sort_values(keys, kind="stable").reset_index(drop=True)

    def at(rows: pd.DataFrame) -> pd.DataFrame:
        part = rows[(rows["threshold"] == threshold) & (rows["iou"] == iou)]
        return part.set_index("class")[["n_gt", "ap"]]

    part_a, part_b = at(cam_a), at(cam_b)
    order = [c for c in dict.fromkeys([*part_a.index, *part_b.index]) if c != "mAP"]
    per_class = part_a.merge(part_b, how="outer", left_index=True, right_index=True, suffixes=("_a", "_b"))
    per_class = per_class.reindex([*order, "mAP"])
    per_class["ap_diff"] = per_class["ap_b"] - per_class["ap_a"]
    per_class = per_class[["n_gt_a", "n_gt_b", "ap_a", "ap_b", "ap_diff"]].rename_axis("class").reset_index()
    # ties (no difference) are no disagreement
    classes = per_class[(per_class["class"] != "mAP") & per_class["ap_diff"].notna() & (per_class["ap_diff"] != 0)]
    top_rows = classes.iloc[np.argsort(-classes["ap_diff"].abs().to_numpy(), kind="stable")].head(top)
    gt_a = per_class.loc[per_class["class"] != "mAP", "n_gt_a"].fillna(-1).tolist()
    gt_b = per_class.loc[per_class["class"] != "mAP", "n_gt_b"].fillna(-1).tolist()
    if gt_a != gt_b:
        notes.append("the runs have different ground truth (n_gt differs): per-class differences mix data "
                     "and method")
    return Comparison(names=(name_a, name_b), metric=metric_a, iou=iou, threshold=float(threshold),
                      threshold_choice=choice, summary=summary, per_class=per_class,
                      top=top_rows.reset_index(drop=True), notes=notes)


def compare_runs(run_a: str | Path, run_b: str | Path, iou: float = 0.5, threshold: float | None = None,
                 top: int = 5, force: bool = False) -> Comparison:
    """:func:`compare_scores` on the ``scores.csv`` of two run folders (labelled by their folder names, or
    their paths when the names are equal), with their :func:`run_differences`.

    Raises:
        GroundTruthMismatch: the runs are on different ground truth and ``force`` is False.
    """
    path_a, path_b = Path(run_a), Path(run_b)
    names = (path_a.name, path_b.name) if path_a.name != path_b.name else (str(path_a), str(path_b))
    run_a, run_b = open_run(path_a), open_run(path_b)
    differences = run_differences(run_a, run_b)
    if differences.ground_truth and not force:
        raise GroundTruthMismatch(differences, names)
    selected, chosen_on = run_a.selection if threshold is None else (None, None)
    comparison = compare_scores(run_a.scores, run_b.scores, iou=iou, names=names, top=top,
                                threshold=selected if threshold is None else threshold)
    if selected is not None:
        where = f", chosen on {chosen_on}" if chosen_on else ""
        comparison = dataclasses.replace(comparison, threshold_choice=f"the selected tau of {names[0]}{where}")
    paired, notes = None, list(comparison.notes)
    if differences.ground_truth:
        notes.append("no paired intervals: the runs are on different images")
    elif all((run.path / GT_FILE).is_file() for run in (run_a, run_b)):
        paired = paired_differences(run_a, run_b, comparison.threshold, comparison.iou, comparison.metric)
    else:
        notes.append("no paired intervals: a run folder has scores but no gt.pkl and detections")
    return dataclasses.replace(comparison, differences=differences, paired=paired, notes=notes)


def paired_differences(run_a: Run, run_b: Run, threshold: float, iou: float, metric: str, *,
                       threshold_b: float | None = None, n_resamples: int = N_RESAMPLES,
                       seed: int = 0) -> pd.DataFrame:
    """B - A of the headline metrics of two runs on the same images, each with its paired BCa bootstrap
    interval (both runs scored on the same resamples of the images) and the share of resamples <= 0.

    Rows ``metric, a, b, diff, low, high, share_at_most_zero``: mAP@``iou`` and CorLoc@0.5 of the CAM boxes at
    τ (``threshold`` for A, ``threshold_b`` for B; None = the same τ), the TorchRay pointing game (GT
    classes, mean over present classes), MaxBoxAccV2 (gradloc convention).
    """
    gt = run_a.gt
    n = len(gt.image_ids)
    threshold_b = threshold if threshold_b is None else threshold_b
    dets_a, dets_b = run_a.detections_at(threshold), run_b.detections_at(threshold_b)
    taus = f"tau {threshold:g}" + ("" if threshold_b == threshold else f" | {threshold_b:g}")
    known_a, known_b = run_a.gt_known, run_b.gt_known
    statistics = {
        f"mAP@{iou:g} ({taus}, {metric})": (map_statistic(dets_a, gt, iou, metric),
                                            map_statistic(dets_b, gt, iou, metric)),
        f"CorLoc@0.5 ({taus})": (corloc_statistic(dets_a, gt), corloc_statistic(dets_b, gt)),
        "pointing game@15px (TorchRay protocol, GT classes, mean over present classes)": tuple(
            pointing_statistic(k["image_index"], k["labels"], k["points"], gt, protocol="torchray")
            for k in (known_a, known_b)),
        "MaxBoxAccV2 (gradloc convention, GT-known)": tuple(max_box_acc_statistic(k["hits"], k["image_index"])
                                                           for k in (known_a, known_b)),
    }
    rows = []
    for name, (stat_a, stat_b) in statistics.items():
        one = np.ones((1, n))
        difference = paired_interval(stat_b, stat_a, n, n_resamples=n_resamples, seed=seed)
        rows.append({"metric": name, "a": float(stat_a(one)[0]), "b": float(stat_b(one)[0]),
                     "diff": difference.estimate, "low": difference.low, "high": difference.high,
                     "share_at_most_zero": difference.share_at_most_zero, "method": difference.method})
    return pd.DataFrame(rows)


class GroundTruthMismatch(ValueError):
    """Two runs scored on different ground truth (their AP differences mix data and method)."""

    def __init__(self, differences: RunDifferences, names: tuple[str, str]) -> None:
        self.differences = differences
        super().__init__(f"{names[0]} and {names[1]} are scored on different ground truth "
                         f"({'; '.join(differences.ground_truth)}, A | B): their AP differences would mix data "
                         "and method; compare runs on the same images and classes, or pass --force")


def _pct(value: float) -> float:
    return 100.0 * value


def render_comparison(comparison: Comparison, tablefmt: str = "orgtbl", digits: int = DIGITS) -> str:
    """The comparison as text: mAP table, per-class table, largest disagreements, protocol and notes.

    Values are percentages with ``digits`` decimals; differences are percentage points, ``B - A``.
    """
    pct, diff = f".{digits}f", f"+.{digits}f"
    a, b = comparison.names
    s = comparison.summary
    summary = tabulate(
        [[f"{r.threshold:g}", f"{r.iou:g}", _pct(r.ap_a), _pct(r.ap_b), _pct(r.ap_diff), _pct(r.recall_a),
          _pct(r.recall_b), _pct(r.recall_diff)] for r in s.itertuples()],
        headers=["threshold", "IoU", f"mAP {a}", f"mAP {b}", "diff", f"recall {a}", f"recall {b}", "diff"],
        tablefmt=tablefmt, floatfmt=("", "", pct, pct, diff, pct, pct, diff), numalign="right")
    p = comparison.per_class
    per_class = tabulate(
        [[r["class"], _int(r["n_gt_a"]), _int(r["n_gt_b"]), _pct(r["ap_a"]), _pct(r["ap_b"]),
          _pct(r["ap_diff"])] for _, r in p.iterrows()],
        headers=["class", f"n_gt {a}", f"n_gt {b}", f"AP {a}", f"AP {b}", "diff"], tablefmt=tablefmt,
        floatfmt=("", "", "", pct, pct, diff), numalign="right", missingval="-")
    top = ", ".join(f"{r['class']} ({_pct(r['ap_diff']):{diff}})" for _, r in comparison.top.iterrows())
    metric = METRIC_NAMES.get(comparison.metric, comparison.metric)
    lines = [
        f"A = {a}, B = {b}: CAM boxes, mAP and mean recall in %, diff = B - A in points",
        summary,
        "",
        f"Per class at tau = {comparison.threshold:g} ({comparison.threshold_choice}), "
        f"IoU > {comparison.iou:g}:",
        per_class,
        "",
        f"Largest disagreements (AP, B - A): {top or 'none'}",
        f"Protocol: {metric}, match when IoU > the IoU column (devkit rule), mAP over classes with "
        "non-difficult GT.",
    ]
    if comparison.paired is not None:
        paired = tabulate(
            [[r.metric, f"{_pct(r.a):{pct}}", f"{_pct(r.b):{pct}}",
              f"{_pct(r.diff):{diff}} [{_pct(r.low):{diff}}, {_pct(r.high):{diff}}]", f"{r.share_at_most_zero:.3f}"]
             for r in comparison.paired.itertuples()],
            headers=["metric", a, b, "B - A [95 % CI]", "P(B - A <= 0)"], tablefmt=tablefmt, disable_numparse=True,
            colalign=("left", "right", "right", "right", "right"))
        lines += ["", "Paired differences (the same bootstrap resamples of the images for A and B; BCa 95 % "
                  f"intervals, {N_RESAMPLES} resamples, seed 0; P = share of resamples with B - A <= 0):", paired]
    lines += [f"Note: {note}." for note in comparison.notes]
    return differences_text(comparison.differences) + "\n".join(lines) + "\n"


def differences_text(differences: RunDifferences | None) -> str:
    """The config differences (and ground-truth differences) as lines, empty when there are none."""
    if differences is None or not (differences.config or differences.ground_truth):
        return ""
    lines = [f"Config differences (A | B): {len(differences.config)}", *(f"  {d}" for d in differences.config)]
    lines += [f"Different ground truth (A | B, compared with --force): {d}" for d in differences.ground_truth]
    return "\n".join(lines) + "\n\n"


def _numbers(values: Iterable[float]) -> str:
    return ", ".join(f"{v:g}" for v in sorted(values))


def _int(value: float) -> int | None:
    return None if pd.isna(value) else int(value)
