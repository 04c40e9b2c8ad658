"""The package as a whole: the public API of ``gradloc/__init__.py`` and the layering contract."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

import gradloc
from tests.conftest import ROOT


def test_importing_gradloc_loads_no_torch_and_every_public_name_resolves():
    code = ("import sys, gradloc\n"
            "assert 'torch' not in sys.modules, 'import gradloc imported torch'\n"
            "light = [gradloc.BoxParams, gradloc.evaluate, gradloc.open_run, gradloc.VOCDataset]\n"
            "assert 'torch' not in sys.modules, 'a torch-free public name imported torch'\n"
            "print(all(getattr(gradloc, name) is not None for name in gradloc.__all__))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"


def test_public_names_are_the_subpackages_objects():
    from gradloc.boxes.cut import image_boxes
    from gradloc.scoring.voc import evaluate

    assert gradloc.image_boxes is image_boxes and gradloc.evaluate is evaluate
    assert "load_model" in dir(gradloc)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        gradloc.nothing  # noqa: B018


def test_import_contract_holds():
    """pyproject.toml's [tool.importlinter] contracts: subpackages import only downward, light layers no torch."""
    lint = shutil.which("lint-imports", path=str(ROOT / ".venv" / "bin")) or shutil.which("lint-imports")
    if lint is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    done = subprocess.run([lint], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "2 kept, 0 broken" in done.stdout
