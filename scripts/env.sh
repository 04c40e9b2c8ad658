#!/usr/bin/env bash
# Create (once) the project's virtual environment in .venv and install gradloc with its test extras.
# Reinstalls when pyproject.toml changes. Offline-friendly: pip takes torch/torchvision from PyPI or the
# machine's local wheels; nothing else is downloaded at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.gradloc-installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e '.[test]'
  rm -f .venv/.gradloc-installed-*
  touch "$stamp"
fi
