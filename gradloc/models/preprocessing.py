"""How an image becomes a network input (:class:`Preprocessing`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from gradloc.core.geometry import RESIZE_MODES, Geometry, group_by_shape, plan, preprocess_image, preprocess_into

IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the network input: :func:`gradloc.core.geometry.plan` + ``preprocess_image``.

    Attributes:
        input_size: side of the square network input (``letterbox``, ``stretch``) or the resized shorter side
            (``shortside``), pixels.
        resize_mode: ``letterbox`` (keep aspect ratio, pad with the mean colour), ``stretch`` or ``shortside``
            (keep aspect ratio, pad right/bottom to a multiple of 32: inputs differ in shape).
        mean, std: per-channel RGB normalization of pixel values scaled to [0, 1].
    """

    input_size: int
    resize_mode: str = "letterbox"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        size = self.input_size
        if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
            raise ValueError(f"input_size={size!r}; pass a positive whole number of pixels (e.g. 224)")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode={self.resize_mode!r}; choose one of {', '.join(RESIZE_MODES)}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean={self.mean!r}, std={self.std!r}: need 3 values each, std > 0")
        object.__setattr__(self, "input_size", int(self.input_size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def geometry(self, width: int, height: int) -> Geometry:
        """Where a ``width x height`` image lands in the network input."""
        return plan(width, height, self.input_size, self.resize_mode)

    def __call__(self, image: Image.Image) -> tuple[np.ndarray, Geometry]:
        """Preprocess one RGB image.

        Returns:
            (float32[3, input_h, input_w] normalized input, its geometry).
        """
        geometry = self.geometry(image.width, image.height)
        return preprocess_image(image, geometry, self.mean, self.std), geometry

    def batches(self, sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
        """Indices of images of sizes ``(width, height)`` in batches of one input shape
        (:func:`gradloc.core.geometry.group_by_shape`); consecutive batches for the square modes."""
        return group_by_shape([self.geometry(width, height) for width, height in sizes], batch_size)

    def batch(self, images: Sequence[Image.Image], channels_last: bool = False) -> tuple[Tensor, list[Geometry]]:
        """Preprocess images of one input shape into float32[B, 3, H, W] (and their geometries).

        Each image is written straight into one [B, H, W, 3] buffer (:func:`preprocess_into`); with
        ``channels_last`` the returned tensor is that buffer seen as [B, 3, H, W] (``torch.channels_last``
        memory, no copy), otherwise a contiguous copy. The values are the same either way.

        Raises:
            ValueError: the images' inputs differ in shape (``shortside``); group them with :meth:`batches`.
        """
        geometries = [self.geometry(image.width, image.height) for image in images]
        shapes = sorted({(g.input_h, g.input_w) for g in geometries})
        if len(shapes) > 1:
            raise ValueError(f"resize_mode={self.resize_mode} gives inputs of shapes {shapes} in one batch; "
                             "group images with Preprocessing.batches first")
        buffer = np.zeros((len(images), *shapes[0], 3), dtype=np.float32)
        for image, geometry, out in zip(images, geometries, buffer, strict=True):
            preprocess_into(image, geometry, self.mean, self.std, out)
        inputs = torch.from_numpy(buffer).permute(0, 3, 1, 2)
        return (inputs if channels_last else inputs.contiguous()), geometries

    def to_dict(self) -> dict[str, Any]:
        return {"input_size": self.input_size, "resize_mode": self.resize_mode, "mean": list(self.mean),
                "std": list(self.std)}
