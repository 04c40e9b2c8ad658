#!/usr/bin/env bash
# The offline demo: install (once), then run the whole pipeline on the synthetic VOC-layout dataset.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
exec .venv/bin/gradloc run --config configs/demo.yaml "$@"
