"""Rewrite gradloc/data/torchvision_models.json from the installed torchvision.

``gradloc models`` lists torchvision's models from this snapshot so it does not import torch (a few seconds);
the snapshot records the torchvision version it was read from and is used only with that version
(tests/test_registry.py checks it against torchvision). Run after upgrading torchvision::

    python scripts/torchvision_table.py
"""

from __future__ import annotations

import json
from importlib import resources

from gradloc.core.files import atomic_write_bytes
from gradloc.models.registry import TORCHVISION_TABLE, read_torchvision_table


def main() -> None:
    table = read_torchvision_table()
    path = resources.files("gradloc").joinpath(TORCHVISION_TABLE)
    atomic_write_bytes(path, (json.dumps(table, indent=1) + "\n").encode())
    print(f"{path}: {len(table['models'])} models of torchvision {table['torchvision']}")


if __name__ == "__main__":
    main()
