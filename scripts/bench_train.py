"""Speed of ``gradloc train`` against a plain forward loop over the same images (README "Speed").

``gradloc train --config configs/voc07.yaml`` runs every image of its training and held-out splits through the
frozen backbone once (then fits the head on the pooled features). Each measurement runs in a fresh child
process, in rounds (every mode once per round, in turn):

  loop          read + PIL decode + gradloc's preprocessing + one float32 NCHW no-grad forward per planned batch
                of the same images (train's batches), glibc's default allocator: the network run the plain way
  train NCHW    ``train_head`` of the config with --no-channels-last and no features cache
  train         ``train_head`` as ``gradloc train --config`` runs it, into an empty features cache
  train warm    the same again, every pooled feature read from the cache the previous run (or the cams stage)
                left

Reported: seconds (median over rounds) and the median over rounds of (seconds / the round's loop seconds).

Usage::

    python scripts/bench_train.py --voc-root ../shared/voc/VOCdevkit                 # train + val, 2 rounds
    python scripts/bench_train.py --limit 48 --rounds 1                              # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gradloc.cams.loader import plan_batches
from gradloc.datasets.voc import VOCDataset
from gradloc.models.execution import Execution
from gradloc.models.zoo import build_pretrained
from gradloc.run.config import load_config
from gradloc.run.train import TrainConfig, train_head

ROOT = Path(__file__).resolve().parents[1]
MODES = {"loop": "plain float32 NCHW forward loop", "train_nchw": "train, --no-channels-last, no cache",
         "train": "train (default), empty features cache", "train_warm": "train, features cached"}


def train_config(voc_root: str, limit: int | None, out: Path, cache_dir: Path | None, **changes) -> TrainConfig:
    config = load_config(ROOT / "configs" / "voc07.yaml", {"data.voc_root": voc_root})
    return dataclasses.replace(TrainConfig.from_run(config, out, limit=limit, cache_dir=cache_dir), **changes)


def loop_seconds(cfg: TrainConfig) -> tuple[int, float]:
    """(images, seconds) of the plain loop over train's splits, batches planned as train plans them."""
    model, resolved = build_pretrained(cfg.model, cfg.weights)
    pre = dataclasses.replace(resolved.preprocessing, input_size=cfg.input_size, resize_mode=cfg.resize_mode)
    execution = Execution(torch.device(cfg.device))
    datasets = [VOCDataset(cfg.voc_root, cfg.year, split, cfg.classes, limit=cfg.limit)
                for split in (cfg.split, cfg.val_split) if split]
    start = time.perf_counter()
    with torch.no_grad():
        for dataset in datasets:
            for batch in plan_batches(dataset, pre, cfg.feature_batch_size):
                inputs, _ = pre.batch([dataset.read_image(i)[0] for i in batch])
                model(execution.inputs(inputs))
    return sum(len(d) for d in datasets), time.perf_counter() - start


def child(mode: str, voc_root: str, limit: int | None, folder: Path) -> dict:
    cache = folder / "cache"
    if mode == "loop":
        images, seconds = loop_seconds(train_config(voc_root, limit, folder / "head.pt", None))
        return {"mode": mode, "images": images, "seconds": seconds}
    changes = {"channels_last": False} if mode == "train_nchw" else {}
    cfg = train_config(voc_root, limit, folder / f"{mode}.pt", None if mode == "train_nchw" else cache, **changes)
    start = time.perf_counter()
    report = train_head(cfg)
    return {"mode": mode, "images": report["n_train"] + report["n_val"], "seconds": time.perf_counter() - start,
            "from_cache": report["features_from_cache"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--voc-root", default=str(ROOT.parent / "shared" / "voc" / "VOCdevkit"))
    parser.add_argument("--limit", type=int, help="first N images of each split")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.voc_root, args.limit, Path(args.child[1]))))
        return
    rows: dict[str, list[dict]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.rounds):
            folder = Path(tmp) / str(k)  # train and train_warm share this round's features cache
            for mode in MODES:
                command = [sys.executable, __file__, "--child", mode, str(folder), "--voc-root", args.voc_root]
                command += ["--limit", str(args.limit)] if args.limit else []
                out = subprocess.run(command, capture_output=True, text=True, check=False)
                if out.returncode != 0:
                    raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
                rows[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    loop = [r["seconds"] for r in rows["loop"]]
    print(f"configs/voc07.yaml (EfficientNet-Lite0, 320-px short side, lbfgs head), train + val = "
          f"{rows['loop'][0]['images']} images, {torch.get_num_threads()} torch threads, {args.rounds} rounds")
    print("| mode | seconds | x plain loop | features from the cache |\n|---|---|---|---|")
    for mode, label in MODES.items():
        seconds = [r["seconds"] for r in rows[mode]]
        ratio = statistics.median(s / base for s, base in zip(seconds, loop, strict=True))
        cached = rows[mode][-1].get("from_cache", "")
        print(f"| {label} | {statistics.median(seconds):.1f} | {ratio:.2f}x | {cached} |")


if __name__ == "__main__":
    main()
