"""Heatmaps: target layers (``layers``), the batched all-class engine (``engine``), the method formulas
(``gradient``, ``activation``, ``guided``) and their registry (``methods``: ``compute_cams``), the per-image
heatmap cache (``cache``) and the streaming input loader (``loader``).

May import ``gradloc.core``, ``gradloc.datasets`` and ``gradloc.models``; ``cache`` never imports torch.
"""
