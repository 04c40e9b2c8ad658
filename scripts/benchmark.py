"""The methods x models table (README "Results"): one sweep per row, τ chosen on `train`, reported on `val`.

    bash scripts/benchmark.sh            # trains the heads it needs, then runs this script

Every row is one (model, head, CAM method, box mode). For each, `gradloc.run.sweep.run_sweep` runs the pipeline
on the selection split (`train`) and the evaluation split (`val`); τ is the one with the best CAM mAP@0.5
on `train`. On `val` at that τ the script reports VOC07 11-point mAP at IoU 0.3 / 0.4 / 0.5, all-point
(VOC10) AP@0.5, recall@0.5, CorLoc@0.5 and 95 % bootstrap intervals (images resampled, 1,000 times, seed 0)
for mAP@0.5 and CorLoc; the oracle τ (best mAP@0.5 on `val` itself) is reported beside it, labelled. Two
τ-free numbers come from the heatmaps of the GT classes (GT-known; the run's localization.csv): MaxBoxAccV2
(wsolevaluation's protocol, 0.01 τ grid chosen on the evaluated split, as in that paper, on the 224-cell
working grid) and the pointing game under TorchRay's protocol
(every GT class of an image, point = map maximum, hit when within 15 px of a box of the class, pairs whose
boxes are all difficult skipped). The baselines (center, full image, random maps at the selected τ) are
scored on the same detections protocol. Seconds per image = the `cams` stage of both splits / images; a
row's `also` methods get their heatmaps from that row's single forward/backward pass
(`gradloc.cams.methods.compute_gradient_cams`), and say so.

Outputs in --out: `methods.csv` / `methods.md` (one row per model x head x method x box mode x τ choice,
plus baselines), `per_class.csv` / `per_class.md` (AP@0.5 of car, person, cat, train, bus), `samples/`
(a seeded grid per row: the same val images for every method) and `runs/` (every run folder; not
committed: large).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from gradloc.cams.methods import method_label
from gradloc.core.files import atomic_write_bytes
from gradloc.reports.draw import save_figure
from gradloc.reports.show import open_run_cache, show_run
from gradloc.run.cams import plan_cams
from gradloc.run.config import load_config
from gradloc.run.folder import open_run
from gradloc.run.sweep import run_sweep, split_config
from gradloc.scoring.bootstrap import corloc_interval, map_interval
from gradloc.scoring.classification import classification_map
from gradloc.scoring.voc import evaluate

logger = logging.getLogger("benchmark")

PER_CLASS = ("car", "person", "cat", "train", "bus")
SAMPLES, SAMPLE_SEED = 6, 0


def gt_known_metrics(run) -> dict[str, float]:
    """MaxBoxAccV2 (wsolevaluation, GT-known) and the TorchRay pointing game of the run (its localization.csv)."""
    rows = run.localization.set_index(["metric", "class"])["value"]
    return {"MaxBoxAccV2 (GT-known)": round(100 * float(rows[("MaxBoxAccV2", "mean")]), 2),
            "pointing (TorchRay, GT classes)": round(100 * float(rows[("pointing@15px (TorchRay, GT classes)",
                                                                         "mean")]), 2)}


def classification_map_of(run) -> float:
    """VOC07 classification mAP of the run's class scores (its heatmap cache) against the image labels."""
    cache = open_run_cache(run)
    scores = [cache.get(image_id).scores for image_id in run.gt.image_ids]
    return round(100 * classification_map(np.stack(scores), run.gt.image_labels())[0], 2)


def detection_metrics(dets, gt) -> dict[str, object]:
    """VOC07 mAP@0.3/0.4/0.5 (with the bootstrap interval at 0.5), VOC10 AP@0.5, recall@0.5, CorLoc@0.5."""
    voc07 = evaluate(dets, gt, (0.3, 0.4, 0.5), "voc07")
    voc10 = evaluate(dets, gt, (0.5,), "voc10")
    mean = voc07[voc07["class"] == "mAP"].set_index("iou")
    out: dict[str, object] = {f"mAP@{iou:g}": round(100 * float(mean.loc[iou, "ap"]), 2) for iou in (0.3, 0.4)}
    out["mAP@0.5 [95% CI]"] = map_interval(dets, gt, 0.5, "voc07").format()
    out["AP10@0.5"] = round(100 * float(voc10[voc10["class"] == "mAP"]["ap"].iloc[0]), 2)
    out["recall@0.5"] = round(100 * float(mean.loc[0.5, "recall"]), 2)
    out["CorLoc@0.5 [95% CI]"] = corloc_interval(dets, gt, 0.5).format()
    return out


def per_class_ap(dets, gt) -> dict[str, float]:
    frame = evaluate(dets, gt, (0.5,), "voc07").set_index("class")
    return {name: round(100 * float(frame.loc[name, "ap"]), 2) for name in PER_CLASS}


def chosen_thresholds(table: pd.DataFrame) -> dict[str, float]:
    """τ of the CAM boxes chosen on train (``selected``) and on val itself (``oracle``) by mAP@0.5."""
    cam = table[(table["source"] == "cam") & ((table["iou"] - 0.5).abs() < 1e-9)]
    return {choice: float(cam[cam["choice"] == choice]["threshold"].iloc[0]) for choice in ("selected", "oracle")}


def shared_pass(config, methods: list[str]) -> dict[str, float]:
    """Fill the heatmap caches of ``config``'s method and ``methods`` in one pass per split.

    Returns:
        ``{"seconds": wall time, "images": maps computed}`` (images already cached cost nothing and are not
        counted, so a resumed pass still gives the time per computed image).
    """
    start, computed = time.perf_counter(), 0
    for split in ("train", "val"):
        began = time.time()
        cache, _ = plan_cams(split_config(config, split), also=methods).run()
        computed += sum(1 for path in (cache.root / "maps").glob("*.pkl") if path.stat().st_mtime >= began)
    return {"seconds": time.perf_counter() - start, "images": computed}


def method_of(config, method: str | None = None) -> str:
    """The row's method with its engine options (``gradcam (eigen_smooth, aug_smooth)``)."""
    return method_label(method or config.cams.method, aug_smooth=config.cams.aug_smooth,
                        eigen_smooth=config.cams.eigen_smooth)


def shared_passes(specs: list[dict], config_path: str) -> dict[tuple[str, str, str], str]:
    """(model, head, method) -> the row whose single pass computes those heatmaps (rows with ``also``)."""
    shared = {}
    for spec in specs:
        if spec.get("also"):
            config = load_config(config_path, spec.get("overrides", {}))
            for method in (config.cams.method, *spec["also"]):
                shared[(config.model.name, config.model.head, method_of(config, method))] = spec["name"]
    return shared


def benchmark_row(spec: dict, config_path: str, out: Path, shared: dict[str, str], timing: dict | None
                  ) -> tuple[list[dict], list[dict]]:
    """Sweep one row's config; return its table rows and per-class rows. ``shared`` maps a method's cache
    filled by an earlier row's shared pass to that row's name; ``timing``: the heatmap time of this row
    measured by an earlier ``--cams-only`` run (its maps are then cached here), see :func:`shared_pass`."""
    overrides = {"name": spec["name"], "out": str(out / "runs"), **spec.get("overrides", {})}
    config = load_config(config_path, overrides)
    start = time.perf_counter()
    if spec.get("also"):
        done = shared_pass(config, spec["also"])
        timing = done if done["images"] else timing
    result = run_sweep(config, "train", "val")
    taus = chosen_thresholds(result.table)
    val = open_run(result.run_dirs["val"])
    if timing is None:  # heatmaps computed by the sweep's own runs
        manifests = [open_run(d).manifest for d in result.run_dirs.values()]
        timing = {"seconds": sum(m["seconds_per_stage"].get("cams", 0.0) for m in manifests),
                  "images": sum(len(open_run(d).gt.image_ids) for d in result.run_dirs.values())}
    key = (config.model.name, config.model.head, method_of(config))
    per_image = (f"shared pass of {shared[key]}" if key in shared and shared[key] != spec["name"]
                 else round(timing["seconds"] / max(timing["images"], 1), 3))
    protocol = {"model": config.model.name, "head": config.model.head, "method": method_of(config),
                "layer": val.manifest["config"]["cams"]["layer"] or "default", "box mode": config.boxes.box_mode,
                "images (val)": len(val.gt.image_ids), "subset": spec.get("subset", "all val")}
    gt_known = {**gt_known_metrics(val), "cls mAP (val)": classification_map_of(val)}
    rows, classes = [], []
    for choice, label in (("selected", "train"), ("oracle", "val (oracle)")):
        dets = val.detections_at(taus[choice])
        rows.append({**protocol, "source": "cam", "tau chosen on": label, "tau": taus[choice],
                     **detection_metrics(dets, val.gt), **gt_known,
                     "s/img (cams)": per_image})
        classes.append({**protocol, "source": "cam", "tau chosen on": label, "tau": taus[choice],
                        **per_class_ap(dets, val.gt)})
    if spec.get("baselines"):
        for name, dets in val.baselines.items():
            rows.append({**protocol, "method": "-", "box mode": name, "source": name, "tau chosen on": "-", "tau": None,
                         **detection_metrics(dets, val.gt)})
        random = val.random_at(taus["selected"])
        if random is not None:
            rows.append({**protocol, "method": "-", "box mode": config.boxes.box_mode, "source": "random",
                         "tau chosen on": "train",
                         "tau": taus["selected"], **detection_metrics(random, val.gt)})
    figure = show_run(val.path, taus["selected"], n=SAMPLES, seed=SAMPLE_SEED, sample="gt")
    save_figure(figure, out / "samples" / f"{spec['name']}.png")
    logger.info("%s: %.0f s", spec["name"], time.perf_counter() - start)
    return rows, classes


def _read_rows(path: Path) -> dict[str, dict]:
    """Finished rows (``rows.jsonl``) by name."""
    if not path.is_file():
        return {}
    return {r["name"]: r for r in map(json.loads, path.read_text().splitlines())}


def write_tables(out: Path, name: str, rows: list[dict]) -> None:
    frame = pd.DataFrame(rows)
    atomic_write_bytes(out / f"{name}.csv", frame.to_csv(index=False).encode())
    atomic_write_bytes(out / f"{name}.md", frame.to_markdown(index=False).encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/voc07.yaml")
    parser.add_argument("--rows", default="scripts/benchmark_rows.yaml", help="YAML list of {name, overrides}")
    parser.add_argument("--only", default=None, help="comma-separated row names (others are kept from the "
                                                        "last run's rows.jsonl)")
    parser.add_argument("--out", default="results/voc07-subset")
    parser.add_argument("--cams-only", action="store_true", help="only fill the heatmap caches of the rows")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    specs = yaml.safe_load(Path(args.rows).read_text())
    out = Path(args.out)
    done_path = out / "rows.jsonl"
    done = _read_rows(done_path)
    only = set(args.only.split(",")) if args.only else None
    shared = shared_passes(specs, args.config)
    timings_path = out / "cams_seconds.json"  # heatmap time per row, kept from a --cams-only run
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    for spec in specs:
        if only is not None and spec["name"] not in only:
            continue
        if args.cams_only:
            config = load_config(args.config, spec.get("overrides", {}))
            timing = shared_pass(config, spec.get("also", []))
            timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
            if timing["images"]:
                timings[spec["name"]] = timing
            atomic_write_bytes(timings_path, json.dumps(timings, indent=1).encode())
            logger.info("%s: %d heatmaps in %.0f s", spec["name"], timing["images"], timing["seconds"])
            continue
        timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
        rows, classes = benchmark_row(spec, args.config, out, shared, timings.get(spec["name"]))
        done = _read_rows(done_path)  # rows finished meanwhile by another benchmark process on the same --out
        done[spec["name"]] = {"name": spec["name"], "rows": rows, "per_class": classes}
        atomic_write_bytes(done_path, "".join(json.dumps(r, default=str) + "\n" for r in done.values()).encode())
    done = _read_rows(done_path)
    ordered = [done[s["name"]] for s in specs if s["name"] in done]
    write_tables(out, "methods", [row for entry in ordered for row in entry["rows"]])
    write_tables(out, "per_class", [row for entry in ordered for row in entry["per_class"]])
    print((out / "methods.md").read_text())


if __name__ == "__main__":
    main()
