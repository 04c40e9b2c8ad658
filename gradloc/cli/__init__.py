"""The ``gradloc`` command line: a thin click shell, parsing and printing only. Each command builds a config and
calls one library function; every command module imports the library it needs when the command runs, so light
commands (``score``, ``info``, ``show``, ...) never import torch.

Modules: ``app`` (the group, global flags, error policy), ``options`` (flag machinery shared by commands),
``stages`` (run, demo, cams, merge, boxes, train), ``reading`` (score, info, models, layers), ``reports`` (show,
plot, compare, sweep, export). May import every other subpackage.
"""

import os

# Box extraction does many tiny matrix products (back-projection); OpenBLAS's thread pool makes each of them
# 10-100x slower than one thread. Set before numpy is first imported (torch keeps its own thread pool).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from gradloc.cli import reading, reports, stages
from gradloc.cli.app import main

for _module in (stages, reading, reports):
    for _command in _module.COMMANDS:
        main.add_command(_command)

__all__ = ["main"]
