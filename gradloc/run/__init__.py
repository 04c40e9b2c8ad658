"""A run: its config (``config``), its folder (``folder``: layout, lock, atomic swap), what every stage opens
(``setup``), one module per stage (``cams``, ``boxes``, ``score``), the whole run (``pipeline``), head training
(``train``), shards and torchrun (``distributed``) and the threshold sweep across splits (``sweep``).

May import every lower subpackage (core, datasets, boxes, scoring, models, cams); ``config``, ``folder`` and
``score`` never import torch, so the reading commands stay light.
"""
