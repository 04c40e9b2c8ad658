"""Preprocessing geometry: original image <-> network input <-> feature map, and exact back-projection.

Conventions (continuous coordinates, pixel *edges*): pixel ``u`` (0-based) of an image covers ``[u, u + 1)``
and its centre is ``u + 0.5``. An image of width ``W`` resized to ``w'`` maps a continuous coordinate ``x``
to ``x * w' / W`` (what PIL's and torch's ``align_corners=False`` resizing do). The network input is an
``input_w x input_h`` canvas holding the resized image at offset ``(pad_x, pad_y)``; the rest is padding.
A feature map of width ``w_f`` covers the whole canvas, so canvas coordinate ``X`` is feature coordinate
``X * w_f / input_w``, and feature cell ``j`` has its centre at ``j + 0.5``.

Back-projection samples the feature map bilinearly at the centres of an output grid laid over the
*original image* (full resolution or a coarser working resolution), clamping at the borders as
``align_corners=False`` does. It is separable, so it is two small matrix products.

Resize modes (:data:`RESIZE_MODES`): ``letterbox`` (longer side = input size, centred on a square canvas),
``stretch`` (both sides = input size) and ``shortside`` (shorter side = input size, aspect kept, canvas
padded right/bottom to a multiple of :data:`SHORTSIDE_STRIDE`, so inputs differ in shape between images;
batch them with :func:`group_by_shape`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from gradloc.core.names import excerpt

RESIZE_MODES = ("letterbox", "stretch", "shortside")


# ``shortside`` canvases are padded to a multiple of this: the total stride of the CNN backbones gradloc
# registers, so every feature cell covers exactly 32 x 32 canvas pixels and no border cell is partial.
SHORTSIDE_STRIDE = 32


@dataclass(frozen=True)
class Geometry:
    """Where the original image sits inside the network input.

    Attributes:
        width, height: original image size in pixels.
        input_w, input_h: network input size.
        resized_w, resized_h: size of the resized image inside the input.
        pad_x, pad_y: offset (pixels) of the resized image inside the input canvas.
    """

    width: int
    height: int
    input_w: int
    input_h: int
    resized_w: int
    resized_h: int
    pad_x: int
    pad_y: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Geometry:
        """A geometry from its dict (a cache file): every field a whole number (never a truncated float).

        Raises:
            KeyError: a missing field. ValueError: a field that is not an int.
        """
        values = {key: data[key] for key in cls.__dataclass_fields__}
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"geometry field {key!r} is {excerpt(value)}, expected a whole number")
        return cls(**values)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def plan(width: int, height: int, input_size: int, mode: str = "letterbox") -> Geometry:
    """Geometry of resizing a ``width x height`` image for an ``input_size`` network input.

    ``letterbox`` keeps the aspect ratio (longer side = ``input_size``) and pads the shorter side
    symmetrically to a square; ``stretch`` resizes both sides to ``input_size``; ``shortside`` keeps the
    aspect ratio with the shorter side = ``input_size`` and pads right/bottom to a multiple of
    :data:`SHORTSIDE_STRIDE` (500x375 at 320 -> 427x320 resized on a 448x320 canvas).
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size {width}x{height} is empty")
    if input_size < 1:
        raise ValueError(f"input size {input_size} must be a positive number of pixels")
    if mode == "stretch":
        return Geometry(width, height, input_size, input_size, input_size, input_size, 0, 0)
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; choose one of {', '.join(RESIZE_MODES)}")
    scale = input_size / (max(width, height) if mode == "letterbox" else min(width, height))
    resized_w = max(1, round(width * scale))
    resized_h = max(1, round(height * scale))
    if mode == "shortside":
        return Geometry(width, height, _round_up(resized_w, SHORTSIDE_STRIDE),
                        _round_up(resized_h, SHORTSIDE_STRIDE), resized_w, resized_h, 0, 0)
    return Geometry(
        width, height, input_size, input_size, resized_w, resized_h,
        (input_size - resized_w) // 2, (input_size - resized_h) // 2,
    )


def group_by_shape(geometries: Sequence[Geometry], batch_size: int) -> list[list[int]]:
    """Batches of indices into ``geometries`` whose network inputs have the same shape.

    Images are grouped by ``(input_h, input_w)`` in order of each shape's first appearance, keeping their
    order inside a group, and each group is cut into batches of at most ``batch_size``. With a square mode
    (every input the same shape) this is plain consecutive batching.

    Returns:
        list of non-empty int lists; together they hold every index exactly once.
    """
    if batch_size < 1:
        raise ValueError(f"batch size {batch_size} must be at least 1")
    groups: dict[tuple[int, int], list[int]] = {}
    for index, geometry in enumerate(geometries):
        groups.setdefault((geometry.input_h, geometry.input_w), []).append(index)
    return [group[start : start + batch_size] for group in groups.values()
            for start in range(0, len(group), batch_size)]


def preprocess_into(
    image: Image.Image, geometry: Geometry, mean: tuple[float, float, float], std: tuple[float, float, float],
    out: np.ndarray,
) -> None:
    """Resize an RGB image into the network input and normalize it, writing into ``out``.

    ``out`` is float32[input_h, input_w, 3] (channels last, e.g. one image of a [B, H, W, 3] batch buffer) and
    must hold zeros in the padding. Pixels become ``(p / 255 - mean) / std`` with the same float32 operations,
    in the same order, as the element-wise numpy expression, so the values are identical to the bit.
    """
    if image.size != (geometry.width, geometry.height):
        raise ValueError(f"image is {image.size[0]}x{image.size[1]}, geometry expects "
                         f"{geometry.width}x{geometry.height}")
    if out.shape != (geometry.input_h, geometry.input_w, 3) or out.dtype != np.float32:
        raise ValueError(f"out is {out.dtype}{list(out.shape)}, expected float32[{geometry.input_h}, "
                         f"{geometry.input_w}, 3]")
    resized = image.convert("RGB").resize((geometry.resized_w, geometry.resized_h), Image.Resampling.BILINEAR)
    view = out[geometry.pad_y:geometry.pad_y + geometry.resized_h, geometry.pad_x:geometry.pad_x + geometry.resized_w]
    np.divide(np.asarray(resized), np.float32(255.0), out=view)
    np.subtract(view, np.asarray(mean, np.float32), out=view)
    np.divide(view, np.asarray(std, np.float32), out=view)


def preprocess_image(
    image: Image.Image, geometry: Geometry, mean: tuple[float, float, float], std: tuple[float, float, float]
) -> np.ndarray:
    """Resize and pad an RGB image into the network input, normalized (:func:`preprocess_into`).

    Returns:
        float32[3, input_h, input_w]; padding holds the mean colour (0 after normalization).
    """
    canvas = np.zeros((geometry.input_h, geometry.input_w, 3), dtype=np.float32)
    preprocess_into(image, geometry, mean, std, canvas)
    return np.ascontiguousarray(canvas.transpose(2, 0, 1))


def _interpolation_matrix(
    n_out: int, n_original: int, n_resized: int, pad: int, n_input: int, n_feat: int
) -> np.ndarray:
    """Bilinear weights float32[n_out, n_feat] from feature cells to output cells along one axis.

    Output cell ``i`` of a grid of ``n_out`` cells over the original axis of ``n_original`` pixels has its
    centre at original coordinate ``(i + 0.5) * n_original / n_out``; that is canvas coordinate
    ``pad + x * n_resized / n_original`` and feature index ``X * n_feat / n_input - 0.5``.
    """
    x = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_original / n_out)
    canvas = pad + x * (n_resized / n_original)
    f = canvas * (n_feat / n_input) - 0.5
    f = np.clip(f, 0.0, n_feat - 1)
    lo = np.floor(f).astype(np.int64)
    hi = np.minimum(lo + 1, n_feat - 1)
    frac = f - lo
    weights = np.zeros((n_out, n_feat), dtype=np.float64)
    rows = np.arange(n_out)
    np.add.at(weights, (rows, lo), 1.0 - frac)
    np.add.at(weights, (rows, hi), frac)
    return weights.astype(np.float32)


def upsample(heat: np.ndarray, geometry: Geometry, out_w: int | None = None, out_h: int | None = None) -> np.ndarray:
    """Back-project feature-resolution maps onto a grid over the original image.

    Args:
        heat: float[h, w] or float[K, h, w] raw maps at feature resolution (covering the whole input canvas).
        geometry: the preprocessing that produced the network input.
        out_w, out_h: output grid size; defaults to the original image size (exact inverse of preprocessing).

    Returns:
        float32[out_h, out_w] (or [K, out_h, out_w]) bilinear samples at the output cells' centres.
    """
    out_w = geometry.width if out_w is None else out_w
    out_h = geometry.height if out_h is None else out_h
    heat = np.asarray(heat, dtype=np.float32)
    n_feat_h, n_feat_w = heat.shape[-2:]
    wy = _interpolation_matrix(out_h, geometry.height, geometry.resized_h, geometry.pad_y, geometry.input_h, n_feat_h)
    wx = _interpolation_matrix(out_w, geometry.width, geometry.resized_w, geometry.pad_x, geometry.input_w, n_feat_w)
    return np.ascontiguousarray(wy @ heat @ wx.T)


def working_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """Size of the working grid over an original image: the image itself, or scaled so its longer side
    is at most ``max_side`` (never upscaled). Returns ``(out_w, out_h)``."""
    if max_side is None or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def grid_boxes_to_voc(boxes: np.ndarray, grid_w: int, grid_h: int, width: int, height: int) -> np.ndarray:
    """Convert boxes on a grid over the original image into VOC pixel boxes of that image.

    This is the one place where gradloc converts from 0-based half-open cell ranges (skimage's
    ``regionprops.bbox`` order is ``(min_row, min_col, max_row, max_col)``; here the input is already
    reordered to ``[col0, row0, col1, row1]``) to VOC's 1-based inclusive pixel coordinates.
    On the full-resolution grid, cells are pixels and ``[c0, r0, c1, r1] -> [c0 + 1, r0 + 1, c1, r1]``.
    On a coarser grid, a cell range covers original pixels ``[c0 * W / grid_w, c1 * W / grid_w)``; the box
    is the smallest set of whole pixels covering it.

    Args:
        boxes: float[N, 4] ``[col0, row0, col1, row1]`` half-open, 0-based, in grid cells.
    Returns:
        float64[N, 4] ``[x1, y1, x2, y2]`` 1-based inclusive, clipped to the image.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    sx, sy = width / grid_w, height / grid_h
    x0 = np.floor(boxes[:, 0] * sx + 1e-9)
    y0 = np.floor(boxes[:, 1] * sy + 1e-9)
    x1 = np.ceil(boxes[:, 2] * sx - 1e-9)
    y1 = np.ceil(boxes[:, 3] * sy - 1e-9)
    out = np.stack([x0 + 1, y0 + 1, x1, y1], axis=1)
    out[:, [0, 2]] = np.clip(out[:, [0, 2]], 1, width)
    out[:, [1, 3]] = np.clip(out[:, [1, 3]], 1, height)
    return out
