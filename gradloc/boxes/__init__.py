"""Heatmaps to boxes for a whole threshold sweep: threshold semantics, box modes and confidences (``cut``), the
numba kernels (``kernels``), the baselines (``baselines``) and the accumulator of detection rows (``rows``).

May import ``gradloc.core``; never imports torch.
"""
