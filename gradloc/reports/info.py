"""``gradloc info``: a readable summary of a run folder."""

from __future__ import annotations

from pathlib import Path

from gradloc.run.folder import Run
from gradloc.scoring.tables import METRIC_NAMES, is_close, select_threshold


def describe_run(run: Run) -> list[tuple[str, str]]:
    """A readable summary of a run folder as (label, text) pairs: the values the run actually used (the
    protocol stored with its detections: layer, input size and resize mode after the checkpoint's defaults),
    its data, cache, times, skipped items, and the headline scores (best CAM mAP per IoU, an oracle choice of τ
    on the run's own split, and the baselines at that τ)."""

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
            ("skipped", f"{len(skipped)}" + "".join(f"\n  {i['image_id']}: {i['reason']}" for i in skipped[:10])
                        + ("\n  ..." if len(skipped) > 10 else "")),
            ("made by", f"gradloc {manifest.get('versions', {}).get('gradloc')}, git "
                        f"{manifest.get('git_commit') or 'unknown'}, config hash {manifest.get('config_hash')}"),
        ]
    if run.scores_path.is_file():
        rows = run.scores
        metric = METRIC_NAMES.get(str(rows["metric"].iloc[0]), str(rows["metric"].iloc[0]))
        for iou in sorted(set(rows["iou"])):
            tau, best = select_threshold(rows, "ap", iou)
            at = rows[(rows["class"] == "mAP") & is_close(rows["iou"], iou) & is_close(rows["threshold"], tau)]
            baselines = ", ".join(f"{r.source} {100 * r.ap:.2f}" for r in at.itertuples() if r.source != "cam")
            lines.append((f"mAP IoU {iou:g}", f"{100 * best:.2f} % at tau {tau:g} (best of the sweep on this "
                                              f"split: oracle)" + (f"; baselines {baselines}" if baselines else "")))
        lines.append(("metric", f"{metric}, match when IoU > the IoU shown (devkit rule)"))
    else:
        lines.append(("scores", f"none saved; `gradloc score {run.path} --save`"))
    return lines
