"""Ablations: one `gradloc sweep` (τ chosen on one split, reported on another) per variant of a base config.

Each variant is a name, a sentence saying what changed, and dotted config overrides. The table row gives the
evaluation split's CAM mAP at IoU 0.3/0.4/0.5 with τ chosen on the selection split (VOC07 11-point, by AP@0.5),
the baselines at the same τ, the oracle τ of the evaluation split (labelled), and the CAM seconds per image.

    python scripts/ablate.py --config configs/voc07.yaml --variants scripts/ablations.yaml --out results/ablations

Heatmaps are cached, so variants that change only box settings cost seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import yaml

from gradloc.core.files import atomic_write_bytes
from gradloc.run.config import load_config
from gradloc.run.folder import open_run
from gradloc.run.sweep import run_sweep
from gradloc.scoring.tables import is_close


def row(name: str, what: str, table: pd.DataFrame, seconds_per_image: float) -> dict:
    out = {"variant": name, "what changed": what}
    sel = table[table["choice"] == "selected"]
    ora = table[table["choice"] == "oracle"]
    out["tau (train)"] = float(sel["threshold"].iloc[0])
    for iou in (0.3, 0.4, 0.5):
        for source in ("cam", "center", "full", "random"):
            part = sel[(sel["source"] == source) & is_close(sel["iou"], iou)]
            if len(part):
                key = f"mAP@{iou:g}" if source == "cam" else f"{source}@{iou:g}"
                out[key] = round(100 * float(part["ap"].iloc[0]), 2)
    cam = ora[(ora["source"] == "cam") & is_close(ora["iou"], 0.5)]
    out["oracle tau (val)"] = float(cam["threshold"].iloc[0])
    out["oracle mAP@0.5"] = round(100 * float(cam["ap"].iloc[0]), 2)
    out["s/img (cams)"] = round(seconds_per_image, 4) if seconds_per_image > 0.5e-4 else "cached"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--variants", required=True, help="YAML list of {name, what, overrides}")
    parser.add_argument("--only", default=None, help="comma-separated variant names")
    parser.add_argument("--out", default="results/ablations")
    parser.add_argument("--select-split", default="train")
    parser.add_argument("--eval-split", default="val")
    args = parser.parse_args()
    variants = yaml.safe_load(Path(args.variants).read_text())
    only = set(args.only.split(",")) if args.only else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "ablations.jsonl"
    done = {}
    if rows_path.is_file():
        done = {r["variant"]: r for r in map(json.loads, rows_path.read_text().splitlines())}
    for variant in variants:
        name = variant["name"]
        if (only and name not in only) or (name in done and not only):
            continue
        overrides = {"name": name, "out": str(out / "runs"), **variant.get("overrides", {})}
        config = load_config(args.config, overrides)
        start = time.perf_counter()
        result = run_sweep(config, args.select_split, args.eval_split)
        elapsed = time.perf_counter() - start
        n_images, cam_seconds = 0, 0.0
        for run_dir in result.run_dirs.values():
            run = open_run(run_dir)
            cam_seconds += run.manifest["seconds_per_stage"].get("cams", 0.0)
            n_images += len(run.gt.image_ids)
        # cams seconds are 0 when every map was cached by an earlier variant with the same maps
        done[name] = row(name, variant.get("what", ""), result.table, cam_seconds / n_images)
        print(json.dumps(done[name]), f"({elapsed:.0f} s)", flush=True)
        atomic_write_bytes(rows_path, "".join(json.dumps(r) + "\n" for r in done.values()).encode())
    frame = pd.DataFrame([done[v["name"]] for v in variants if v["name"] in done])
    atomic_write_bytes(out / "ablations.csv", frame.to_csv(index=False).encode())
    atomic_write_bytes(out / "ablations.md", frame.to_markdown(index=False).encode())
    print(frame.to_markdown(index=False))


if __name__ == "__main__":
    main()
