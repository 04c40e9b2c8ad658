#!/usr/bin/env bash
# The whole test suite (real-data tests marked `slow` included), after installing (once).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
.venv/bin/ruff check gradloc tests scripts
exec .venv/bin/python -m pytest -q "$@"
