"""The headline of a run at one τ: the numbers a paper would quote, each with how it was obtained.

:func:`headline` scores the run's CAM boxes at τ with the devkit's AP at every IoU of the run (VOC07 11-point)
and all-point AP at ``iou``, with BCa bootstrap intervals over images (:mod:`gradloc.scoring.bootstrap`) for the
mAP over all classes, the mAP over the classes with at least ``min_images`` positive images (rare classes make
the all-class mean swing with a handful of boxes), and CorLoc; every baseline of the run at τ as a *paired*
difference ``CAM - baseline`` with its interval and the share of resamples where the CAM does not win; and the
τ-free numbers of ``localization.csv`` (classification mAP, pointing game, MaxBoxAccV2).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from gradloc.run.folder import Run
from gradloc.run.score import MEAN_ALL_CLASSES
from gradloc.scoring.bootstrap import (
    N_RESAMPLES,
    corloc_statistic,
    interval,
    map_statistic,
    paired_interval,
)
from gradloc.scoring.voc import evaluate

MIN_IMAGES = 10
"""Classes with fewer positive images than this are left out of the second mAP (documented in the README)."""

COLUMNS = ["metric", "value", "low", "high", "method", "share_at_most_zero", "note"]


def well_populated(run: Run, min_images: int = MIN_IMAGES) -> np.ndarray:
    """Indices of the classes with at least ``min_images`` images holding a non-difficult box of them."""
    return np.flatnonzero((run.gt.image_labels() == 1).sum(axis=0) >= min_images)


def headline(run: Run, threshold: float, iou: float = 0.5, metric: str = "voc07", min_images: int = MIN_IMAGES,
             *, n_resamples: int = N_RESAMPLES, seed: int = 0) -> pd.DataFrame:
    """The headline numbers of a run's CAM boxes at ``threshold`` (rows of :data:`COLUMNS`, fractions).

    Raises:
        FileNotFoundError: the run has no detections at ``threshold``.
    """
    gt, dets = run.gt, run.detections_at(threshold)
    n = len(gt.image_ids)
    ious = sorted({*run.scores["iou"].tolist(), iou}) if run.scores_path.is_file() else [iou]
    frame = evaluate(dets, gt, ious, metric)
    means = frame[frame["class"] == "mAP"].set_index("iou")
    rows = [{"metric": f"mAP@{value:g} ({metric})", "value": float(means.loc[value, "ap"])} for value in ious]
    options = {"n_resamples": n_resamples, "seed": seed}
    cam = map_statistic(dets, gt, iou, metric)
    found = interval(cam, n, **options)
    per_class = frame[(frame["class"] != "mAP") & np.isclose(frame["iou"], iou)]
    rows.append({"metric": f"mAP@{iou:g} ({metric}), all classes with GT", **_interval_row(found),
                 "note": f"mean over {int((per_class['n_gt'] > 0).sum())} classes"})
    kept = well_populated(run, min_images)
    if len(kept):
        found = interval(map_statistic(dets, gt, iou, metric, kept), n, **options)
        rows.append({"metric": f"mAP@{iou:g} ({metric}), classes with >= {min_images} images", **_interval_row(found),
                     "note": ", ".join(gt.classes[c] for c in kept)})
    all_point = evaluate(dets, gt, [iou], "voc10")
    rows.append({"metric": f"mAP@{iou:g} (voc10, all-point)",
                 "value": float(all_point.loc[all_point["class"] == "mAP", "ap"].iloc[0])})
    rows.append({"metric": f"recall@{iou:g}", "value": float(means.loc[iou, "recall"])})
    rows.append({"metric": "CorLoc@0.5", **_interval_row(interval(corloc_statistic(dets, gt), n, **options))})
    for name, baseline in run.baselines_at(threshold).items():
        difference = paired_interval(cam, map_statistic(baseline, gt, iou, metric), n, **options)
        rows.append({"metric": f"mAP@{iou:g}: CAM - {name}", **_interval_row(difference),
                     "share_at_most_zero": difference.share_at_most_zero,
                     "note": f"paired; {name} confidence: {baseline.meta.get('confidence', 'score')}"})
    localization = run.localization
    free = localization[localization["class"].isin(["mean", MEAN_ALL_CLASSES])
                        & localization["threshold"].isna()]
    for metric_name, name, value, count in free[["metric", "class", "value", "n"]].itertuples(index=False):
        rows.append({"metric": metric_name if name != MEAN_ALL_CLASSES else f"{metric_name}, {name}",
                     "value": float(value), "note": f"n = {count}"})
    table = pd.DataFrame(rows).reindex(columns=COLUMNS)
    table["threshold"] = threshold
    return table


def _interval_row(found) -> dict[str, object]:
    return {"value": found.estimate, "low": found.low, "high": found.high, "method": found.method}
