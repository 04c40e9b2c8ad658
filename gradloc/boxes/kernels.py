"""numba kernels of the box stage: the one-pass union-find sweep over all thresholds, integral images, NMS."""

from __future__ import annotations

import numba
import numpy as np

# Columns of the per-level component table built by the sweep kernel (:func:`_component_sweep`).
COL_K, COL_T, COL_C0, COL_R0, COL_C1, COL_R1, COL_AREA, COL_PEAK, COL_SUM, COL_FIRST = range(10)

@numba.njit(cache=True, nogil=True)
def _find(parent: np.ndarray, x: int) -> int:
    """Root of ``x`` in the union-find forest ``parent`` (with path halving)."""
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


@numba.njit(cache=True, nogil=True)
def _component_sweep(heat: np.ndarray, levels: np.ndarray, connectivity: int, min_area: float) -> np.ndarray:
    """Connected components of ``heat[k] >= levels[k, t]`` for every map k and level t, in one pass per map.

    Each cell gets the index (in descending level order) of the highest level it passes; a counting sort
    groups cells by that index; a union-find (union by size, path halving) adds the groups from the highest
    level down, merging per-component statistics, and after each group records the components of that
    level whose area is at least ``min_area`` (their roots are kept in a swap-remove list).

    Args:
        heat: float32[K, H, W].
        levels: float64[K, T]; a cell is foreground at level t when ``heat >= levels[k, t]`` (never if inf).
        connectivity: 1 (4 neighbours) or 2 (8 neighbours).
        min_area: components with fewer cells are not recorded.
    Returns:
        float64[M, 10] rows ``[k, t, c0, r0, c1, r1, area, peak, heat_sum, first]`` (0-based half-open
        cell box, ``first`` = raster index of the component's first cell), unordered.
    """
    n_maps, height, width = heat.shape
    n_levels = levels.shape[1]
    n = height * width
    # Cells live in a grid padded by one never-foreground cell on each side: no bounds checks.
    padded_w = width + 2
    n_padded = (height + 2) * padded_w
    if connectivity == 1:
        offsets = np.array([-padded_w, -1, 1, padded_w], dtype=np.int64)
    else:
        offsets = np.array(
            [-padded_w - 1, -padded_w, -padded_w + 1, -1, 1, padded_w - 1, padded_w, padded_w + 1],
            dtype=np.int64,
        )
    parent = np.empty(n_padded, dtype=np.int64)  # -1: not (yet) foreground
    # Per-root statistics in one 64-byte row (one cache line): [c0, r0, c1, r1, area, peak, heat_sum, first].
    stats = np.empty((n_padded, 8), dtype=np.float64)
    kept = np.empty(n_padded, dtype=np.int64)  # roots of recorded (area >= min_area) components
    kept_pos = np.empty(n_padded, dtype=np.int64)  # position of a root in `kept`, -1 if absent
    bucket = np.empty(n, dtype=np.int64)
    order = np.empty(n, dtype=np.int64)
    starts = np.empty(n_levels + 2, dtype=np.int64)
    n_bins = 4 * n_levels + 16
    bin_first = np.empty(n_bins, dtype=np.int64)
    bin_stop = np.empty(n_bins, dtype=np.int64)
    capacity = max(64, 2 * n_maps * n_levels)
    out = np.empty((capacity, 10), dtype=np.float64)
    n_out = 0
    for k in range(n_maps):
        flat = heat[k].ravel()
        level_order = np.argsort(-levels[k], kind="mergesort")  # descending
        sorted_levels = levels[k][level_order]
        starts[:] = 0
        n_finite = 0
        while n_finite < n_levels and sorted_levels[n_levels - 1 - n_finite] < np.inf:
            n_finite += 1
        if n_finite == 0:
            continue  # no level can be reached (an all-zero map)
        # Bucket of a cell = smallest b with sorted_levels[b] <= value (n_levels if none), i.e. the highest
        # level it passes. A monotone binning `bin(v)` of values and levels narrows the search: levels in
        # higher bins are > value, levels in lower bins are <= value, only the value's own bin is compared.
        low = sorted_levels[n_levels - 1]
        high = sorted_levels[n_levels - n_finite]
        scale = n_bins / (high - low) if high > low else 0.0
        if not scale < np.inf:  # levels closer than n_bins / max-float (subnormal thresholds): one bin
            scale = 0.0
        bin_first[:] = 0  # number of levels in higher bins
        bin_stop[:] = 0  # number of levels in this or higher bins
        for b in range(n_levels):
            t = (sorted_levels[b] - low) * scale
            bin_stop[n_bins - 1 if t >= n_bins - 1 else (int(t) if t > 0.0 else 0)] += 1
        for b in range(n_bins - 2, -1, -1):
            bin_stop[b] += bin_stop[b + 1]
        bin_first[: n_bins - 1] = bin_stop[1:]
        for p in range(n):
            value = np.float64(flat[p])
            t = (value - low) * scale
            i = n_bins - 1 if t >= n_bins - 1 else (int(t) if t > 0.0 else 0)  # NaN-safe: NaN -> 0
            b = bin_first[i]
            stop = bin_stop[i]
            while b < stop and sorted_levels[b] > value:
                b += 1
            bucket[p] = b
            starts[b + 1] += 1
        for b in range(n_levels + 1):
            starts[b + 1] += starts[b]
        fill = starts[: n_levels + 1].copy()
        for p in range(n):
            order[fill[bucket[p]]] = p
            fill[bucket[p]] += 1
        parent[:] = -1
        n_kept = 0
        for level in range(n_levels):
            for j in range(starts[level], starts[level + 1]):
                p = order[j]
                r = p // width
                c = p - r * width
                x = p + padded_w + 1 + 2 * r  # padded index of cell (r, c)
                root = -1
                for d in range(offsets.size):
                    q = x + offsets[d]
                    up = parent[q]
                    if up < 0 or up == root:
                        continue
                    other = _find(parent, q)
                    if root < 0:
                        root = other
                        continue
                    if other == root:
                        continue
                    if stats[other, 4] > stats[root, 4]:
                        root, other = other, root
                    parent[other] = root  # union by size; `other` is absorbed
                    # (element indexing only: array views in this loop would cost reference counting)
                    stats[root, 0] = min(stats[root, 0], stats[other, 0])
                    stats[root, 1] = min(stats[root, 1], stats[other, 1])
                    stats[root, 2] = max(stats[root, 2], stats[other, 2])
                    stats[root, 3] = max(stats[root, 3], stats[other, 3])
                    stats[root, 4] += stats[other, 4]
                    stats[root, 5] = max(stats[root, 5], stats[other, 5])
                    stats[root, 6] += stats[other, 6]
                    stats[root, 7] = min(stats[root, 7], stats[other, 7])
                    pos = kept_pos[other]
                    if pos >= 0:  # swap-remove the absorbed root from the recorded components
                        n_kept -= 1
                        kept[pos] = kept[n_kept]
                        kept_pos[kept[pos]] = pos
                value = np.float64(flat[p])
                fc = np.float64(c)
                fr = np.float64(r)
                if root < 0:  # a new component
                    parent[x] = x
                    stats[x, 0] = fc
                    stats[x, 1] = fr
                    stats[x, 2] = fc + 1.0
                    stats[x, 3] = fr + 1.0
                    stats[x, 4] = 1.0
                    stats[x, 5] = value
                    stats[x, 6] = value
                    stats[x, 7] = np.float64(p)
                    kept_pos[x] = -1
                    root = x
                else:
                    parent[x] = root
                    stats[root, 0] = min(stats[root, 0], fc)
                    stats[root, 1] = min(stats[root, 1], fr)
                    stats[root, 2] = max(stats[root, 2], fc + 1.0)
                    stats[root, 3] = max(stats[root, 3], fr + 1.0)
                    stats[root, 4] += 1.0
                    stats[root, 5] = max(stats[root, 5], value)
                    stats[root, 6] += value
                    stats[root, 7] = min(stats[root, 7], np.float64(p))
                if kept_pos[root] < 0 and stats[root, 4] >= min_area:
                    kept[n_kept] = root
                    kept_pos[root] = n_kept
                    n_kept += 1
            if n_out + n_kept > capacity:
                capacity = max(2 * capacity, n_out + n_kept)
                grown = np.empty((capacity, 10), dtype=np.float64)
                grown[:n_out] = out[:n_out]
                out = grown
            t_index = level_order[level]
            for i in range(n_kept):
                out[n_out, 0] = k
                out[n_out, 1] = t_index
                for column in range(8):
                    out[n_out, 2 + column] = stats[kept[i], column]
                n_out += 1
    return out[:n_out]


@numba.njit(cache=True, nogil=True)
def _integral_images(heat: np.ndarray) -> np.ndarray:
    """Integral images: float32[K, H, W] -> float64[K, H + 1, W + 1], ``S[k, r, c] = Σ heat[k, :r, :c]``."""
    n_maps, height, width = heat.shape
    out = np.zeros((n_maps, height + 1, width + 1), dtype=np.float64)
    for k in range(n_maps):
        for r in range(height):
            row_sum = 0.0
            for c in range(width):
                row_sum += heat[k, r, c]
                out[k, r + 1, c + 1] = out[k, r, c + 1] + row_sum
    return out


@numba.njit(cache=True, nogil=True)
def _nms_keep(boxes: np.ndarray, conf: np.ndarray, starts: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS within each group ``[starts[g], starts[g + 1])`` of VOC boxes; bool[N] keep mask.

    Boxes are visited by descending confidence (stable: equal confidences keep their order); a box is
    suppressed when its IoU with a kept box is ``> iou_threshold``, IoU with VOC +1 areas.
    """
    keep = np.ones(boxes.shape[0], dtype=np.bool_)
    for g in range(starts.size - 1):
        lo, hi = starts[g], starts[g + 1]
        if hi - lo < 2:
            continue
        order = lo + np.argsort(-conf[lo:hi], kind="mergesort")
        for i in range(order.size):
            a = order[i]
            if not keep[a]:
                continue
            area_a = (boxes[a, 2] - boxes[a, 0] + 1.0) * (boxes[a, 3] - boxes[a, 1] + 1.0)
            for j in range(i + 1, order.size):
                b = order[j]
                if not keep[b]:
                    continue
                iw = min(boxes[a, 2], boxes[b, 2]) - max(boxes[a, 0], boxes[b, 0]) + 1.0
                ih = min(boxes[a, 3], boxes[b, 3]) - max(boxes[a, 1], boxes[b, 1]) + 1.0
                if iw <= 0.0 or ih <= 0.0:
                    continue
                inter = iw * ih
                area_b = (boxes[b, 2] - boxes[b, 0] + 1.0) * (boxes[b, 3] - boxes[b, 1] + 1.0)
                if inter / (area_a + area_b - inter) > iou_threshold:
                    keep[b] = False
    return keep
