#!/usr/bin/env bash
# The offline demo: install (once), then `gradloc demo` (the packaged demo config: synthetic VOC-layout dataset,
# tiny CNN). Flags are passed on, e.g. scripts/demo.sh --out /tmp/results.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
exec .venv/bin/gradloc demo "$@"
