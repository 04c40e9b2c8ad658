#!/usr/bin/env bash
# Rebuild results/voc07-subset/ (README "Results") from a fresh clone: train the voc heads it needs on VOC2007
# `train` (skipped when present), then one sweep per row of scripts/benchmark_rows.yaml (τ chosen on train,
# reported on val). About an hour on 2 CPU cores; heatmaps are cached, so a rerun costs minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
HEADS=.gradloc-cache/heads
for model in efficientnet_lite0 efficientnet_lite1 efficientnet_lite2; do
  if [ ! -f "$HEADS/${model}_train.pt" ]; then
    .venv/bin/gradloc train --config configs/voc07.yaml --model "$model" --split train --checkpoint-out "$HEADS/${model}_train.pt"
  fi
done
.venv/bin/python scripts/benchmark.py --config configs/voc07.yaml --rows scripts/benchmark_rows.yaml \
  --out results/voc07-subset "$@"
