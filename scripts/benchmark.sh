#!/usr/bin/env bash
# Rebuild results/voc07-subset/ (README "Results") from a fresh clone: the ablation that chooses the recommended
# configuration, then the methods table, every choice on 5 held-out folds of VOC2007 `train`, `val` only
# reported (scripts/benchmark.py). Heads and heatmaps are cached under .gradloc-cache, so a rerun costs minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
.venv/bin/python scripts/benchmark.py --config configs/voc07.yaml --ablations scripts/ablations.yaml \
  --rows scripts/benchmark_rows.yaml --out results/voc07-subset "$@"
