"""Stage 3, score: a run folder's pickles -> flat score rows and localization rows (tables: gradloc.scoring.tables)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gradloc import __version__
from gradloc.core.formats import (
    Detections,
    GroundTruth,
    class_relabel,
    keep_classes,
    load_detections,
    load_ground_truth,
)
from gradloc.core.provenance import git_commit
from gradloc.run.folder import Run, open_run, update_run
from gradloc.scoring.bootstrap import N_RESAMPLES, corloc_interval, map_interval
from gradloc.scoring.classification import classification_map
from gradloc.scoring.coco import coco_evaluate
from gradloc.scoring.localization import best_box_acc, corloc, pointing_game
from gradloc.scoring.tables import METRIC_NAMES, is_close, select_threshold
from gradloc.scoring.voc import evaluate, score_detections
from gradloc.scoring.wsol import max_box_acc_from_hits
from gradloc.scoring.wsol_exact import INSTALL_HINT, exact_max_box_acc
from gradloc.scoring.wsol_exact import LABEL as EXACT_LABEL

logger = logging.getLogger(__name__)


def _score_file(path: Path, dets: Detections, gt: GroundTruth, ious: Sequence[float], metric: str,
                source: str, only: Sequence[str] = ()) -> pd.DataFrame:
    """:func:`score_detections` with a content error (class lists, image ids, NaN scores) naming the file."""
    try:
        return score_detections(dets, gt, ious, metric, source, only)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def score_files(gt_path: str | Path, paths: Sequence[str | Path], ious: Sequence[float], metric: str,
                only: Sequence[str] = ()) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Score detection pickles from anywhere against one gt.pkl (``gradloc score --gt``).

    Returns:
        (score rows, source ``cam``; the protocol of the first file's detections, with ``only``).
    """
    gt = load_ground_truth(gt_path)
    frames = [_score_file(Path(path), load_detections(path), gt, ious, metric, "cam", only) for path in paths]
    return pd.concat(frames, ignore_index=True), _with_only(load_detections(paths[0]).meta, only)


def _with_only(meta: dict[str, Any], only: Sequence[str]) -> dict[str, Any]:
    """The protocol of score rows restricted to ``only`` (``score.only``) says so."""
    return {**meta, "only": list(only)} if only else meta


def score_run(run_dir: str | Path | Run, ious: Sequence[float], metric: str, only: Sequence[str] = ()
              ) -> pd.DataFrame:
    """Score every detections file of a run folder (CAM boxes and baselines) against its gt.pkl (``only``:
    just these classes, see :func:`score_detections`)."""
    run = run_dir if isinstance(run_dir, Run) else open_run(run_dir)
    gt = run.gt
    thresholds = run.thresholds
    if not thresholds:
        raise FileNotFoundError(f"{run.path}: no CAM detections files; run `gradloc boxes`")
    frames = []
    for tau in thresholds:
        dets = run.detections_at(tau)
        frames.append(_score_file(run.detections_path(tau), dets, gt, ious, metric, dets.meta.get("source", "cam"),
                                  only))
    for name, taus in run.map_baselines().items():
        for tau in taus:
            frames.append(_score_file(run.path, run.map_baseline_at(name, tau), gt, ious, metric, name, only))
    for name, dets in run.baselines.items():
        for tau in thresholds:  # threshold-free boxes: repeat under every threshold so tables line up
            frames.append(_score_file(run.path, dataclasses.replace(dets, threshold=tau), gt, ious, metric, name,
                                      only))
    return pd.concat(frames, ignore_index=True)


POINTING_GT = "pointing game@15px, GT classes (TorchRay protocol)"
POINTING_CENTRE = "pointing game@15px, the image centre as the point (TorchRay's centre baseline)"
POINTING_EXPLAINED = "peak on an object of its class@15px, every explained class (absent class = miss)"
MEAN_ALL_CLASSES = "mean over all classes (absent = 0)"
GRADLOC_V2 = "gradloc convention"
"""The suffix of the MaxBoxAccV2 rows in gradloc's convention (:mod:`gradloc.scoring.wsol`)."""
CLASSIFICATION = "classification AP (VOC07 11-point, image labels; the run's class probabilities)"


def localization_scores(run_dir: str | Path | Run, only: Sequence[str] = ()) -> pd.DataFrame:
    """WSOL metrics of a run (``only``: over just these classes), each row naming its protocol (column
    ``metric``):

    * ``corloc@0.5`` per threshold (the run's explained classes);
    * the pointing game (:func:`gradloc.scoring.localization.pointing_game`; τ-free, 15 px): ``POINTING_GT`` --
      TorchRay's protocol on every GT class of every image, class rows, their ``mean`` over classes with a
      counted pair and TorchRay's own mean over all classes, an absent class counting 0
      (``MEAN_ALL_CLASSES``, what its published tables report); ``POINTING_CENTRE`` -- the same for the image
      centre as the point (TorchRay's centre baseline); ``POINTING_EXPLAINED`` -- the explained classes'
      peaks, a class without GT in the image counting as a miss (with every class explained this measures how
      often a peak is on an object of its class, not how well present objects are found);
    * ``MaxBoxAccV2@δ (gradloc convention)`` and ``MaxBoxAccV2 (gradloc convention)``, the mean over δ 0.3 /
      0.5 / 0.7 (GT-known, min-max maps on the run's working grid against the exact VOC boxes, 0.01 τ grid
      chosen on this split, all boxes; :mod:`gradloc.scoring.wsol`), from ``gt_known.pkl``;
    * ``MaxBoxAccV2@δ (wsolevaluation exact, tau step 0.01)`` and ``MaxBoxAccV2 (wsolevaluation exact, tau step
      0.01)``: the same metric computed step for step as wsolevaluation's code does it (224 x 224 stretched
      frame, bicubic upsampling, uint8 thresholds, OpenCV contours with holes, its box and GT-resize
      conventions; :mod:`gradloc.scoring.wsol_exact`), for runs whose boxes stage had OpenCV (otherwise
      left out, with a logged note);
    * for runs that explain the GT classes, ``boxacc@δ, best of the run's τ``: the same idea restricted to
      the run's own τ list and box mode (not comparable with wsolevaluation's numbers).

    * ``CLASSIFICATION``: the classifier's image-classification AP per class and its mean (the devkit's
      classification task on the class probabilities behind the confidences; n = positive images).

    Rows: metric, threshold, class (a class name, or ``mean`` for the mean over classes / all pairs of every
    metric), value, n."""

    run = run_dir if isinstance(run_dir, Run) else open_run(run_dir)
    gt, points, known = run.gt, run.points, run.gt_known
    if only:
        gt = keep_classes(run.gt, only)
        points, known = (_keep_pairs(record, run.gt.classes, only) for record in (points, known))
    rows = []
    dets_by_tau = {}
    for tau in run.thresholds:
        dets = keep_classes(run.detections_at(tau), only) if only else run.detections_at(tau)
        dets_by_tau[dets.threshold] = dets
        frame = corloc(dets, gt, iou=0.5)
        rows += [{"metric": "corloc@0.5", "threshold": dets.threshold, "class": r["class"], "value": r["corloc"],
                  "n": r["n_images"]} for r in frame.to_dict("records")]
    centre = gt.image_sizes[known["image_index"]] / 2.0 + 1.0  # TorchRay's (w/2, h/2), 0-based -> VOC pixels
    for metric, record, protocol in ((POINTING_EXPLAINED, points["points"], "gradloc"),
                                     (POINTING_GT, known["points"], "torchray"),
                                     (POINTING_CENTRE, centre, "torchray")):
        owner = points if protocol == "gradloc" else known
        frame = pointing_game(owner["image_index"], owner["labels"], record, gt, tolerance=15.0, protocol=protocol)
        rows += [{"metric": metric, "threshold": float("nan"), "class": r["class"], "value": r["accuracy"],
                  "n": r["n"]} for r in frame.to_dict("records")]
        if protocol == "torchray":  # TorchRay's tables average all classes, an absent class counting 0
            per_class = frame[frame["class"] != "mean"]
            rows.append({"metric": metric, "threshold": float("nan"), "class": MEAN_ALL_CLASSES,
                         "value": float(per_class["accuracy"].fillna(0.0).mean()), "n": int(per_class["n"].sum())})
    scores = run.image_scores
    labels = gt.image_labels()
    columns = [run.gt.classes.index(name) for name in gt.classes]  # the kept classes' (all without --only)
    value, aps = classification_map(scores["probabilities"][:, columns], labels)
    rows += [{"metric": CLASSIFICATION, "threshold": float("nan"), "class": name, "value": float(ap),
              "n": int((labels[:, c] == 1).sum())} for c, (name, ap) in enumerate(zip(gt.classes, aps, strict=True))]
    rows.append({"metric": CLASSIFICATION, "threshold": float("nan"), "class": "mean", "value": value,
                 "n": int(np.isfinite(aps).sum())})
    if len(known["hits"]):
        frame = max_box_acc_from_hits(known["hits"])
        rows += [{"metric": f"{r['metric'].replace('MaxBoxAcc (all boxes)', 'MaxBoxAccV2')} ({GRADLOC_V2})",
                  "threshold": r["best_threshold"], "class": "mean", "value": r["max_box_acc"], "n": r["n_pairs"]}
                 for r in frame.to_dict("records")]
    if "hits_exact" not in known:
        logger.info("%s: gt_known.pkl has no wsolevaluation-exact hits (boxes stage without OpenCV, or an older "
                    "gradloc); %s", run.path, INSTALL_HINT)
    elif len(known["hits_exact"]):
        frame = exact_max_box_acc(known["hits_exact"], known["grid_exact"], known["ious"])
        rows += [{"metric": r["metric"], "threshold": r["best_threshold"], "class": "mean", "value": r["max_box_acc"],
                  "n": r["n_pairs"]} for r in frame.to_dict("records")]
    if dets_by_tau and next(iter(dets_by_tau.values())).meta.get("classes_explained") == "gt":
        frame = best_box_acc(dets_by_tau, gt, ious=(0.3, 0.5, 0.7))
        rows += [{"metric": f"boxacc@{r['iou']}, best of the run's tau", "threshold": r["best_threshold"],
                  "class": "mean", "value": r["max_box_acc"], "n": r["n_pairs"]} for r in frame.to_dict("records")]
    return pd.DataFrame(rows)


def coco_scores(run_dir: str | Path | Run, only: Sequence[str] = ()) -> pd.DataFrame:
    """COCO-style AP (:func:`gradloc.scoring.coco.coco_evaluate`: AP@[.50:.95], AP@0.50, AP@0.75, AP by size)
    of every detections file of a run: the CAM boxes and the map baselines per τ, the τ-free baselines once
    (``threshold`` NaN). ``only``: just these classes.

    Rows: threshold, source, metric, class (a class or ``mean``), ap, n_gt, n_det.
    """
    run = run_dir if isinstance(run_dir, Run) else open_run(run_dir)
    sources = [("cam", tau, run.detections_at(tau)) for tau in run.thresholds]
    sources += [(name, tau, run.map_baseline_at(name, tau)) for name, taus in run.map_baselines().items()
                for tau in taus]
    sources += [(name, float("nan"), dets) for name, dets in run.baselines.items()]
    frames = []
    for source, tau, dets in sources:
        try:
            frame = coco_evaluate(dets, run.gt, only)
        except ValueError as error:
            raise ValueError(f"{run.path} ({source}, tau {tau:g}): {error}") from None
        frames.append(frame.assign(threshold=tau, source=source))
    columns = ["threshold", "source", "metric", "class", "ap", "n_gt", "n_det"]
    return pd.concat(frames, ignore_index=True)[columns]


def _keep_pairs(record: dict[str, Any], classes: Sequence[str], only: Sequence[str]) -> dict[str, Any]:
    """A points / gt_known record restricted to the (image, class) pairs of the classes ``only``, relabelled
    to their order in ``only``."""
    labels = class_relabel(classes, only)[record["labels"]]
    keep = labels >= 0
    return {**record, "labels": labels[keep],
            **{key: np.asarray(record[key])[keep] for key in ("image_index", "points", "hits", "hits_exact")
                if key in record}}


def score_run_folder(run_dir: str | Path | Run, ious: Sequence[float], metric: str, only: Sequence[str] = ()
                     ) -> tuple[pd.DataFrame, dict[str, Any], pd.DataFrame]:
    """Score a run folder without writing anything (``only``: just these classes, WSOL rows too).

    Returns:
        (score rows, the protocol of its CAM detections (with ``only``; ``selected_threshold``,
        ``selected_on`` and ``split`` say which τ the run leads with), WSOL rows).
    """
    run = run_dir if isinstance(run_dir, Run) else open_run(run_dir)
    rows = score_run(run, ious, metric, only)
    return rows, _with_only(run.detections_at(run.thresholds[0]).meta, only), localization_scores(run, only)


HEADLINE_COLUMNS = ["metric", "threshold", "value", "low", "high", "note"]
ORACLE = "oracle"
"""The ``note`` that starts a headline row whose τ was chosen on the evaluated split (never a result)."""


def headline_rows(run_dir: str | Path | Run, rows: pd.DataFrame, localization: pd.DataFrame,
                  meta: dict[str, Any], only: Sequence[str] = (), corloc_ci: pd.DataFrame | None = None
                  ) -> pd.DataFrame:
    """The numbers a run leads with (rows of :data:`HEADLINE_COLUMNS`, fractions), each naming how it was
    obtained.

    At the run's selected τ (``meta["selected_threshold"]``: the config's ``boxes.selected_threshold``): the
    CAM mAP at every IoU of ``rows`` (their AP variant; with the ``ci_*`` columns of :func:`with_intervals`,
    their intervals), the all-point mAP (``AP10``, VOC2010+) of the same boxes at those IoUs, the mean recall
    and CorLoc@0.5 (``corloc_ci``: its intervals per τ). τ-free: the classification mAP, TorchRay's pointing
    game and MaxBoxAccV2. Last, the best CAM mAP of the sweep on this split at IoU 0.5 (or the highest IoU
    scored below it, else the lowest), its note starting with :data:`ORACLE`. Without a selected τ, only the
    τ-free rows and the oracle row.
    """
    run = run_dir if isinstance(run_dir, Run) else open_run(run_dir)
    cam = rows[(rows["class"] == "mAP") & (rows["source"] == "cam")]
    ious = sorted(cam["iou"].unique())
    metric = str(rows["metric"].iloc[0])
    out = []
    tau = meta.get("selected_threshold")
    if tau is not None:
        at = cam[is_close(cam["threshold"], tau)].set_index("iou")
        for iou in ious:
            out.append({"metric": f"mAP@{iou:g}", "threshold": tau, "value": at.at[iou, "ap"],
                        "low": at.at[iou, "ci_low"] if "ci_low" in at else np.nan,
                        "high": at.at[iou, "ci_high"] if "ci_high" in at else np.nan,
                        "note": f"{METRIC_NAMES.get(metric, metric)}, mean over classes"})
        if metric != "voc10":
            dets, gt = run.detections_at(tau), run.gt
            if only:
                dets, gt = keep_classes(dets, only), keep_classes(gt, only)
            all_point = evaluate(dets, gt, ious, "voc10")
            all_point = all_point[all_point["class"] == "mAP"].set_index("iou")
            out += [{"metric": f"AP10 mAP@{iou:g}", "threshold": tau, "value": all_point.at[iou, "ap"],
                     "note": f"{METRIC_NAMES['voc10']} of the same boxes"} for iou in ious]
        out += [{"metric": f"recall@{iou:g}", "threshold": tau, "value": at.at[iou, "recall"],
                 "note": "mean over classes"} for iou in ious]
        corloc_rows = localization[(localization["metric"] == "corloc@0.5") & (localization["class"] == "mean")
                                   & is_close(localization["threshold"], tau)]
        if len(corloc_rows):
            found = (corloc_ci[is_close(corloc_ci["threshold"], tau)] if corloc_ci is not None
                     else pd.DataFrame())
            out.append({"metric": "CorLoc@0.5", "threshold": tau, "value": corloc_rows["value"].iloc[0],
                        "low": found["ci_low"].iloc[0] if len(found) else np.nan,
                        "high": found["ci_high"].iloc[0] if len(found) else np.nan,
                        "note": "top box per class and image, IoU >= 0.5, mean over classes"})
    exact = localization["metric"].str.startswith(f"MaxBoxAccV2 ({EXACT_LABEL}")
    v2_name, v2_note = ((localization.loc[exact, "metric"].iloc[0], "wsolevaluation's code exactly (224 x 224 "
                         "frame, OpenCV contours), GT-known, its own tau grid chosen on this split; tau-free")
                        if exact.any() else
                        (f"MaxBoxAccV2 ({GRADLOC_V2})", "gradloc convention of wsolevaluation's metric, GT-known, "
                         "its own tau grid chosen on this split; tau-free"))
    for name, label, note in ((CLASSIFICATION, "classification mAP", "VOC07 11-point AP of the class "
                               "probabilities against image labels; tau-free"),
                              (POINTING_GT, "pointing game", "TorchRay protocol: every GT class, map peak within "
                               "15 px, mean over classes with GT; tau-free"),
                              (v2_name, "MaxBoxAccV2", v2_note)):
        found = localization[(localization["metric"] == name) & (localization["class"] == "mean")]
        if len(found):
            out.append({"metric": label, "threshold": np.nan, "value": float(found["value"].iloc[0]), "note": note})
    below = [iou for iou in ious if iou <= 0.5 + 1e-9]
    iou = below[-1] if below else ious[0]
    oracle_tau, oracle_value = select_threshold(rows, "ap", iou)
    out.append({"metric": f"mAP@{iou:g}", "threshold": oracle_tau, "value": oracle_value,
                "note": f"{ORACLE}: the best tau of the sweep on {meta.get('split') or 'this split'}, the split "
                        "scored here; not a result"})
    return pd.DataFrame(out).reindex(columns=HEADLINE_COLUMNS)


def save_run_scores(run_dir: str | Path, rows: pd.DataFrame, meta: dict[str, Any], wsol: pd.DataFrame,
                    ious: Sequence[float], metric: str, only: Sequence[str] = (), coco: pd.DataFrame | None = None,
                    headline: pd.DataFrame | None = None) -> tuple[list[Path], bool]:
    """``gradloc score RUN --save``: write scores.csv/json/md (with ``headline``), localization.csv and, when
    given, coco.csv into a finished run folder and record in its ``manifest.json``, under ``rescored_scores``,
    the score settings the files now hold (``config.score`` keeps what the run was made with), as one update
    (:func:`gradloc.run.folder.update_run`): a full disk or Ctrl-C leaves the previous files and manifest,
    never a mix.

    Returns:
        (the written files in the run folder, whether manifest.json was updated: False for a folder made by
        ``gradloc boxes``, which has none).
    """
    run_dir = Path(run_dir)
    with update_run(run_dir) as writer:
        staged = writer.write_scores(rows, meta, wsol, coco, headline)
        files = [run_dir / path.relative_to(writer.path) for path in staged]
        recorded = writer.set_manifest("rescored_scores", {
            "score": {"iou": [float(v) for v in ious], "metric": metric, **({"only": list(only)} if only else {})},
            "files": sorted(str(path.relative_to(writer.path)) for path in staged),
            "gradloc": __version__,
            "git_commit": git_commit(),
        })
    return files, recorded


def with_intervals(run_dir: str | Path | Run, rows: pd.DataFrame, only: Sequence[str] = (), *,
                   n_resamples: int = N_RESAMPLES, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """BCa bootstrap intervals of a run's means (images resampled, :mod:`gradloc.scoring.bootstrap`).

    Returns:
        ``rows`` (of :func:`score_run`) with columns ``ci_low``, ``ci_high`` (fractions) and ``ci_method`` on
        the ``class == "mAP"`` rows of every source (NaN / empty elsewhere); and the CAM's CorLoc@0.5 per τ with
        its interval: rows ``threshold, corloc, ci_low, ci_high, ci_method``.
    """
    run = run_dir if isinstance(run_dir, Run) else open_run(run_dir)
    gt = keep_classes(run.gt, only) if only else run.gt
    rows = rows.assign(ci_low=np.nan, ci_high=np.nan, ci_method="")
    corloc_rows, fixed = [], {}  # fixed: the threshold-free baselines' intervals, the same at every τ
    for tau in run.thresholds:
        for source, dets in {"cam": run.detections_at(tau), **run.baselines_at(tau)}.items():
            dets = keep_classes(dets, only) if only else dets
            mask = (rows["class"] == "mAP") & (rows["source"] == source) & is_close(rows["threshold"], tau)
            for index in rows.index[mask]:
                iou, metric = float(rows.at[index, "iou"]), str(rows.at[index, "metric"])
                key = (source, iou) if source in run.baselines else None
                found = fixed.get(key) or map_interval(dets, gt, iou, metric, n_resamples=n_resamples, seed=seed)
                if key is not None:
                    fixed[key] = found
                rows.loc[index, ["ci_low", "ci_high", "ci_method"]] = [found.low, found.high, found.method]
            if source == "cam":
                found = corloc_interval(dets, gt, 0.5, n_resamples=n_resamples, seed=seed)
                corloc_rows.append({"threshold": tau, "corloc": found.estimate, "ci_low": found.low,
                                    "ci_high": found.high, "ci_method": found.method})
    return rows, pd.DataFrame(corloc_rows)
