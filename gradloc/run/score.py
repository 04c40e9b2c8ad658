"""Stage 3, score: a run folder's pickles -> flat score rows and localization rows (tables: gradloc.scoring.tables)."""

from __future__ import annotations

import dataclasses
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
from gradloc.scoring.localization import best_box_acc, corloc, pointing_game
from gradloc.scoring.voc import score_detections
from gradloc.scoring.wsol import max_box_acc_from_hits


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
    for tau in run.random_thresholds:
        frames.append(_score_file(run.path, run.random_at(tau), gt, ious, metric, "random", only))
    for name, dets in run.baselines.items():
        for tau in thresholds:  # threshold-free boxes: repeat under every threshold so tables line up
            frames.append(_score_file(run.path, dataclasses.replace(dets, threshold=tau), gt, ious, metric, name,
                                      only))
    return pd.concat(frames, ignore_index=True)


def localization_scores(run_dir: str | Path | Run, only: Sequence[str] = ()) -> pd.DataFrame:
    """WSOL metrics of a run (``only``: over just these classes), each row naming its protocol (column
    ``metric``):

    * ``corloc@0.5`` per threshold (the run's explained classes);
    * ``pointing@15px (gradloc, explained classes)`` and ``pointing@15px (TorchRay, GT classes)``
      (:func:`gradloc.scoring.localization.pointing_game`; τ-free);
    * ``MaxBoxAccV2@δ`` and ``MaxBoxAccV2`` (wsolevaluation: GT-known, min-max maps, 0.01 τ grid chosen on this
      split, all boxes; :mod:`gradloc.scoring.wsol`), from ``gt_known.pkl``;
    * for runs that explain the GT classes, ``boxacc@δ, best of the run's τ``: the same idea restricted to
      the run's own τ list and box mode (not comparable with wsolevaluation's numbers).

    Rows: metric, threshold, class, value, n."""

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
    for label, record, protocol in (("gradloc, explained classes", points, "gradloc"),
                                    ("TorchRay, GT classes", known, "torchray")):
        frame = pointing_game(record["image_index"], record["labels"], record["points"], gt, tolerance=15.0,
                              protocol=protocol)
        rows += [{"metric": f"pointing@15px ({label})", "threshold": float("nan"), "class": r["class"],
                  "value": r["accuracy"], "n": r["n"]} for r in frame.to_dict("records")]
    if len(known["hits"]):
        frame = max_box_acc_from_hits(known["hits"])
        rows += [{"metric": r["metric"].replace("MaxBoxAcc (all boxes)", "MaxBoxAccV2"),
                  "threshold": r["best_threshold"], "class": "all", "value": r["max_box_acc"], "n": r["n_pairs"]}
                 for r in frame.to_dict("records")]
    if dets_by_tau and next(iter(dets_by_tau.values())).meta.get("classes_explained") == "gt":
        frame = best_box_acc(dets_by_tau, gt, ious=(0.3, 0.5, 0.7))
        rows += [{"metric": f"boxacc@{r['iou']}, best of the run's tau", "threshold": r["best_threshold"],
                  "class": "all", "value": r["max_box_acc"], "n": r["n_pairs"]} for r in frame.to_dict("records")]
    return pd.DataFrame(rows)


def _keep_pairs(record: dict[str, Any], classes: Sequence[str], only: Sequence[str]) -> dict[str, Any]:
    """A points / gt_known record restricted to the (image, class) pairs of the classes ``only``, relabelled
    to their order in ``only``."""
    labels = class_relabel(classes, only)[record["labels"]]
    keep = labels >= 0
    return {**record, "labels": labels[keep],
            **{key: np.asarray(record[key])[keep] for key in ("image_index", "points", "hits") if key in record}}


def score_run_folder(run_dir: str | Path | Run, ious: Sequence[float], metric: str, only: Sequence[str] = ()
                     ) -> tuple[pd.DataFrame, dict[str, Any], pd.DataFrame]:
    """Score a run folder without writing anything (``only``: just these classes, WSOL rows too).

    Returns:
        (score rows, the protocol of its CAM detections (with ``only``), WSOL rows).
    """
    run = run_dir if isinstance(run_dir, Run) else open_run(run_dir)
    rows = score_run(run, ious, metric, only)
    return rows, _with_only(run.detections_at(run.thresholds[0]).meta, only), localization_scores(run, only)


def save_run_scores(run_dir: str | Path, rows: pd.DataFrame, meta: dict[str, Any], wsol: pd.DataFrame,
                    ious: Sequence[float], metric: str, only: Sequence[str] = ()) -> tuple[list[Path], bool]:
    """``gradloc score RUN --save``: write scores.csv/json/md and localization.csv into a finished run folder
    and record in its ``manifest.json``, under ``rescored_scores``, the score settings the files now hold
    (``config.score`` keeps what the run was made with), as one update (:func:`gradloc.run.folder.update_run`):
    a full disk or Ctrl-C leaves the previous files and manifest, never a mix.

    Returns:
        (the written files in the run folder, whether manifest.json was updated: False for a folder made by
        ``gradloc boxes``, which has none).
    """
    run_dir = Path(run_dir)
    with update_run(run_dir) as writer:
        staged = writer.write_scores(rows, meta, wsol)
        files = [run_dir / path.relative_to(writer.path) for path in staged]
        recorded = writer.set_manifest("rescored_scores", {
            "score": {"iou": [float(v) for v in ious], "metric": metric, **({"only": list(only)} if only else {})},
            "files": sorted(str(path.relative_to(writer.path)) for path in staged),
            "gradloc": __version__,
            "git_commit": git_commit(),
        })
    return files, recorded
