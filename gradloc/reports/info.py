"""``gradloc info``: a readable summary of a run folder."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from gradloc.run.folder import Run
from gradloc.run.score import headline_rows
from gradloc.scoring.tables import is_close, selected_tau


def describe_run(run: Run) -> list[tuple[str, str]]:
    """A readable summary of a run folder as (label, text) pairs: the values the run actually used (the
    protocol stored with its detections: layer, input size and resize mode after the checkpoint's defaults),
    its data, cache, times and skipped items (the scores: :func:`run_headline`)."""

    manifest = run.manifest_or_none() or {}
    config = manifest.get("config", {})
    meta = run.detections_at(run.thresholds[0]).meta if run.thresholds else {}
    data, boxes = config.get("data", {}), config.get("boxes", {})
    explained = meta.get("classes_explained") or boxes.get("explain") or boxes.get("classes")
    model = (f"{meta.get('model', config.get('model', {}).get('name'))}, {meta.get('head')} head, input "
             f"{meta.get('input_size')} px ({meta.get('resize_mode')})"
             + (f", {meta['precision']}" if "precision" in meta else ""))
    checkpoint = config.get("model", {}).get("checkpoint") or config.get("model", {}).get("weights")
    lines = [
        ("run", str(run.path)),
        ("model", model + (f", from {checkpoint}" if checkpoint else "")),
        ("CAM", f"{meta.get('method')} at layer {meta.get('layer')}"
                + (" (test-time flip)" if config.get("cams", {}).get("flip") else "")),
        ("data", f"{meta.get('dataset') or data.get('split')}, {len(run.gt.image_ids)} images, "
                 f"{len(run.gt.classes)} classes, images from {data.get('voc_root', '?')}"),
        ("classes explained", str(explained)),
        ("thresholds", f"{', '.join(f'{t:g}' for t in run.thresholds)} ({meta.get('threshold_mode')}; boxes: "
                       f"{meta.get('box_mode')}, confidence {meta.get('confidence')})"),
    ]
    if manifest:
        seconds = manifest.get("seconds_per_stage", {})
        skipped = manifest.get("skipped", [])
        lines += [
            ("heatmap cache", f"{manifest.get('cache_dir')}"
                              + ("" if Path(str(manifest.get("cache_dir"))).is_dir() else " (not found)")),
            ("seconds per stage", ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()) or "-"),
            ("skipped", f"{len(skipped)}" + "".join(f"\n  {i.get('image_id')}: {i.get('reason')}" for i in skipped[:10])
                        + ("\n  ..." if len(skipped) > 10 else "")),
            ("made by", f"gradloc {manifest.get('versions', {}).get('gradloc')}, git "
                        f"{manifest.get('git_commit') or 'unknown'}, config hash {manifest.get('config_hash')}"),
        ]
    if not run.scores_path.is_file():
        lines.append(("scores", f"none saved; `gradloc score {run.path} --save`"))
    return lines


def run_headline(run: Run) -> tuple[pd.DataFrame, dict] | None:
    """The headline rows of a run's saved scores (:func:`gradloc.run.score.headline_rows`) and the protocol
    they are printed under, with the baselines' mAP at the same τ and IoU added; None without saved scores."""
    if not run.scores_path.is_file() or not run.thresholds:
        return None
    rows, meta = run.scores, run.detections_at(run.thresholds[0]).meta
    headline = headline_rows(run, rows, run.localization, meta)
    iou = float(headline["metric"].iloc[-1].split("@")[1])  # the oracle row's IoU
    tau = selected_tau(meta)
    oracle = tau is None
    tau = float(headline["threshold"].iloc[-1]) if oracle else tau
    at = rows[(rows["class"] == "mAP") & is_close(rows["iou"], iou) & is_close(rows["threshold"], tau)
              & (rows["source"] != "cam")]
    extra = pd.DataFrame([{"metric": f"mAP@{iou:g}, {b.source} baseline", "threshold": tau, "value": b.ap,
                           "note": "the CAM's classes and confidences, other boxes"
                                   + ("; at the oracle tau" if oracle else "")} for b in at.itertuples()])
    return pd.concat([headline, extra], ignore_index=True), meta
