"""The README's results on the VOC2007 subset: the ablation that chooses the recommended configuration, then
the methods table, every choice made on held-out folds of `train` and `val` only reported.

    bash scripts/benchmark.sh            # the same, after installing

1. Ablation (``--ablations``, scripts/ablations.yaml): every variant of ``--config`` is cross-validated on
   ``--folds`` held-out folds of `train` (``gradloc sweep --folds``: a trained head refitted on the other folds
   for each, τ and the centre box's size chosen on the held-out detections) and reported on `val` at its own
   choice; the best held-out mAP@0.5 wins. Writes ``ablations.csv`` / ``ablations.md`` and ``chosen.yaml``.
2. Methods (``--rows``, scripts/benchmark_rows.yaml): each row is the chosen configuration with its overrides
   (another CAM method, ...), cross-validated the same way; on `val`, at the held-out τ, the headline numbers
   of :func:`gradloc.reports.headline.headline` (BCa intervals over images, 1,000 resamples, seed 0; paired
   differences to every baseline) and per-class AP@0.5 with each class's image count. Writes ``methods.csv``
   / ``methods.md``, ``baselines.csv`` / ``baselines.md`` (the first row's baselines), ``per_class.csv`` /
   ``per_class.md``, ``paired.csv`` / ``paired.md`` (the first row minus each other row, each at its own held-out
   τ, paired BCa intervals), ``rows.jsonl`` (everything, with provenance: commit, config hash, checkpoint digest,
   package versions, seed) and ``samples/<row>.png`` (the same seeded val images for every row).

Finished rows are kept in ``rows.jsonl`` and skipped on a rerun (heatmaps and heads are cached too).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import time
from pathlib import Path

import pandas as pd
import yaml
from PIL import Image

from gradloc.core.files import atomic_write_bytes
from gradloc.core.provenance import provenance
from gradloc.reports.compare import paired_differences
from gradloc.reports.draw import save_figure
from gradloc.reports.headline import MIN_IMAGES, headline
from gradloc.reports.show import show_run
from gradloc.run.config import load_config, with_overrides
from gradloc.run.cv import Variant, load_variants
from gradloc.run.folder import open_run
from gradloc.run.sweep import run_sweep, sweep_dir
from gradloc.scoring.voc import evaluate

logger = logging.getLogger("benchmark")

SAMPLES, SAMPLE_SEED = 6, 0


def ablation(config_path: str, variants_path: str, out: Path, folds: int) -> dict:
    """Run the ablation sweep; returns the chosen variant's overrides (copying its tables into ``out``)."""
    config = load_config(config_path, {"name": "ablation", "out": str(out / "runs")})
    variants = load_variants(variants_path)
    result = run_sweep(config, "train", "val", folds=folds, variants=variants)
    table = pd.read_csv(sweep_dir(config) / "ablations.csv")
    for name in ("ablations.csv", "ablations.md", "chosen.yaml"):
        atomic_write_bytes(out / name, (sweep_dir(config) / name).read_bytes())
    chosen = table.loc[table["chosen"], "variant"].iloc[0]
    logger.info("ablation: %s chosen; %s", chosen, ", ".join(str(f) for f in result.files))
    return next(v for v in variants if v.name == chosen).overrides


def compact_png(path: Path) -> None:
    """Rewrite a sample figure as a 256-colour palette PNG, dithered (a quarter of the bytes of the RGB file; the
    heat gradients stay smooth), so the committed samples stay small."""
    image = Image.open(path).convert("RGB")
    palette = image.quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    buffer = io.BytesIO()
    image.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG).save(buffer, format="PNG", optimize=True)
    atomic_write_bytes(path, buffer.getvalue())


def methods_row(spec: dict, config_path: str, chosen: dict, out: Path, folds: int) -> dict:
    """Cross-validate one row and measure it on val at its held-out τ."""
    base = load_config(config_path, {"out": str(out / "runs"), "name": spec["name"]})
    config = with_overrides(base, {**chosen, **spec.get("overrides", {})})
    start = time.perf_counter()
    result = run_sweep(config, "train", "val", folds=folds, variants=[Variant(spec["name"])])
    cam = result.table[(result.table["source"] == "cam") & (result.table["choice"] == "selected")]
    tau = float(cam["threshold"].iloc[0])
    oracle = result.table[(result.table["source"] == "cam") & (result.table["choice"] == "oracle")
                          & ((result.table["iou"] - 0.5).abs() < 1e-9)]
    run = open_run(result.run_dirs["val"])
    numbers = headline(run, tau)
    frame = evaluate(run.detections_at(tau), run.gt, [0.5])
    images = dict(zip(run.gt.classes, (run.gt.image_labels() == 1).sum(axis=0).tolist(), strict=True))
    per_class = {name: (float(ap), images[name]) for name, ap in frame[frame["class"] != "mAP"][["class", "ap"]]
                 .itertuples(index=False)}
    figure = show_run(run.path, tau, n=SAMPLES, seed=SAMPLE_SEED, sample="gt")
    save_figure(figure, out / "samples" / f"{spec['name']}.png")
    compact_png(out / "samples" / f"{spec['name']}.png")
    resolved = run.manifest["config"]
    return {"name": spec["name"], "what": spec.get("what", ""), "tau": tau, "tau chosen on": f"train ({folds} "
            "held-out folds)", "oracle tau on val": float(oracle["threshold"].iloc[0]),
            "val mAP@0.5 at the oracle tau": float(oracle["ap"].iloc[0]),
            "model": resolved["model"]["name"], "head": resolved["model"]["head"], "method": resolved["cams"]["method"],
            "box mode": resolved["boxes"]["box_mode"], "input": f"{resolved['model']['input_size']} "
            f"{resolved['model']['resize_mode']}", "headline": numbers.to_dict("records"), "per_class": per_class,
            "seconds": round(time.perf_counter() - start, 1), **provenance(resolved)}


def _pct(value: float) -> str:
    return "-" if value != value else f"{100 * value:.1f}"


def _with_interval(row: dict) -> str:
    text = f"{_pct(row['value'])} [{_pct(row['low'])}, {_pct(row['high'])}]"
    share = row.get("share_at_most_zero")
    return text if share is None or share != share else f"{text}, P(<=0) {share:.3f}"


def summary(entry: dict) -> dict:
    """One methods-table row of a finished row: the headline numbers, formatted, with protocol columns."""
    numbers = {r["metric"]: r for r in entry["headline"]}
    pick = {metric: row for metric, row in numbers.items()}
    out = {"row": entry["name"], "model": entry["model"], "head": entry["head"], "method": entry["method"],
           "box": entry["box mode"], "input": entry["input"], "tau (cv)": entry["tau"]}
    for metric, row in pick.items():
        if row.get("low") == row.get("low") and row.get("low") is not None:
            out[metric] = _with_interval(row)
        elif metric.startswith(("mAP@", "recall@", "pointing", "MaxBoxAccV2", "classification")):
            out[metric] = _pct(row["value"])
    out[f"val mAP@0.5 at the oracle tau {entry['oracle tau on val']:g} (oracle)"] = _pct(
        entry["val mAP@0.5 at the oracle tau"])
    return out


def paired_methods(out: Path, entries: list[dict]) -> list[dict]:
    """The first row minus each other row on `val`, each at its own held-out τ: mAP@0.5 and CorLoc@0.5 with
    paired BCa intervals (:func:`gradloc.reports.compare.paired_differences`: the same resamples of the images
    for both runs; 1,000 resamples, seed 0)."""
    runs = {e["name"]: open_run(out / "runs" / f"{e['name']}-val") for e in entries}
    first = entries[0]
    rows = []
    for other in entries[1:]:
        if runs[other["name"]].gt.image_ids != runs[first["name"]].gt.image_ids:
            raise ValueError(f"{other['name']}: scored on other images than {first['name']}")
        table = paired_differences(runs[other["name"]], runs[first["name"]], other["tau"], 0.5, "voc07",
                                   threshold_b=first["tau"])
        for metric in ("mAP@0.5", "CorLoc@0.5"):
            found = table[table["metric"].str.startswith(f"{metric} (")].iloc[0]
            rows.append({"difference": f"{first['name']} (tau {first['tau']:g}) - {other['name']} "
                                       f"(tau {other['tau']:g})", "metric": metric,
                         "value [95 % CI]": _with_interval({"value": found["diff"], "low": found["low"],
                                                            "high": found["high"],
                                                            "share_at_most_zero": found["share_at_most_zero"]}),
                         "method": found["method"]})
    return rows


def write_table(out: Path, name: str, rows: list[dict]) -> None:
    frame = pd.DataFrame(rows)
    atomic_write_bytes(out / f"{name}.csv", frame.to_csv(index=False).encode())
    atomic_write_bytes(out / f"{name}.md", frame.to_markdown(index=False).encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/voc07.yaml")
    parser.add_argument("--ablations", default="scripts/ablations.yaml")
    parser.add_argument("--rows", default="scripts/benchmark_rows.yaml", help="YAML list of {name, what, overrides}")
    parser.add_argument("--out", default="results/voc07-subset")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--skip-ablation", action="store_true", help="use the chosen.yaml of an earlier run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    if args.skip_ablation:
        chosen_name = pd.read_csv(out / "ablations.csv").query("chosen")["variant"].iloc[0]
        chosen = next(v for v in load_variants(args.ablations) if v.name == chosen_name).overrides
    else:
        chosen = ablation(args.config, args.ablations, out, args.folds)
    specs = yaml.safe_load(Path(args.rows).read_text())
    done_path = out / "rows.jsonl"
    done = {r["name"]: r for r in map(json.loads, done_path.read_text().splitlines())} if done_path.is_file() else {}
    for spec in specs:
        if spec["name"] in done and done[spec["name"]].get("chosen") == chosen:
            continue
        entry = {**methods_row(spec, args.config, chosen, out, args.folds), "chosen": chosen}
        done[spec["name"]] = entry
        atomic_write_bytes(done_path, "".join(json.dumps(r, default=str) + "\n" for r in done.values()).encode())
    ordered = [done[s["name"]] for s in specs]
    write_table(out, "methods", [summary(entry) for entry in ordered])
    first = ordered[0]
    write_table(out, "baselines", [{"row": first["name"], "metric": r["metric"], "value [95 % CI]":
                                    _with_interval(r), "note": r.get("note")} for r in first["headline"]
                                   if ": CAM - " in r["metric"]])
    write_table(out, "paired", paired_methods(out, ordered))
    classes = list(first["per_class"])
    write_table(out, "per_class", [{"row": e["name"], **{f"{c} ({e['per_class'][c][1]} img)": _pct(e["per_class"][c][0])
                                                         for c in classes}} for e in ordered])
    print((out / "methods.md").read_text())
    logger.info("classes with >= %d val images make the second mAP; see per_class.md for the counts", MIN_IMAGES)


if __name__ == "__main__":
    main()
