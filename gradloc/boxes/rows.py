"""The accumulator of detection rows over images and a threshold sweep."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from gradloc.boxes.cut import split_by_threshold


class ThresholdDetections(NamedTuple):
    """Detections of one threshold over many images, the arrays of ``gradloc.core.formats.Detections``."""

    image_index: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray


class BoxRows:
    """The one accumulator of detection rows over many images and a threshold sweep: per row an image index,
    a label, a score and a float64[width] value (a VOC box, width 4, or a point, width 2).

    Rows come out per threshold in the order they were added (image by image), e.g. for
    ``gradloc.core.formats.Detections``. Picklable, so worker processes can fill one each (``sweep_images``).
    """

    def __init__(self, n_thresholds: int = 1, width: int = 4) -> None:
        self.n_thresholds = n_thresholds
        self.width = width
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, image: int, labels: np.ndarray, scores: np.ndarray, values: np.ndarray,
            threshold_index: int = 0) -> None:
        """Rows of one image at one threshold: int64[n] labels, float64[n] scores, float64[n, width] values."""
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if labels.size:
            self._parts.append((np.full(labels.size, threshold_index, dtype=np.int64),
                                np.full(labels.size, image, dtype=np.int64), labels,
                                np.asarray(scores, dtype=np.float64).reshape(-1),
                                np.asarray(values, dtype=np.float64).reshape(-1, self.width)))

    def add_sweep(self, image: int, labels: np.ndarray,
                  sweep: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
        """The :func:`image_boxes` result of one image; ``labels`` int64[K] is the class of each of its maps."""
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        for t, (k, confidence, boxes) in enumerate(sweep):
            self.add(image, labels[k], confidence, boxes, t)

    def extend(self, other: BoxRows) -> None:
        """Append the rows of another accumulator (e.g. the next chunk of images)."""
        self._parts += other._parts

    def per_threshold(self) -> list[ThresholdDetections]:
        """Per threshold ``ThresholdDetections(image_index, labels, scores, boxes)`` (``boxes`` holds the
        values, float64[n, width]), rows in the order added."""
        if not self._parts:
            empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros((0, self.width)))
            return [ThresholdDetections(*empty) for _ in range(self.n_thresholds)]
        t, *columns = (np.concatenate(column) for column in zip(*self._parts, strict=True))
        order = np.argsort(t, kind="stable")
        split = split_by_threshold(t[order], self.n_thresholds, *(column[order] for column in columns))
        return [ThresholdDetections(*parts) for parts in split]
