"""Hand-made ground truth and detections shared by the scoring tests."""

from __future__ import annotations

import numpy as np
import pandas as pd

from gradloc.core.formats import Detections, GroundTruth

CLASSES = ["cat", "dog"]


IMAGES = ["a", "b", "c", "d"]


FAR = [40.0, 40.0, 45.0, 45.0]  # overlaps no GT box used below


def make_gt(rows, classes=CLASSES, image_ids=IMAGES) -> GroundTruth:
    """rows: (image id, class name, box, difficult)."""
    return GroundTruth(
        classes=list(classes),
        image_ids=list(image_ids),
        image_sizes=np.full((len(image_ids), 2), 100, dtype=np.int64),
        image_index=np.array([image_ids.index(r[0]) for r in rows], dtype=np.int64),
        labels=np.array([classes.index(r[1]) for r in rows], dtype=np.int64),
        boxes=np.array([r[2] for r in rows], dtype=np.float64).reshape(-1, 4),
        difficult=np.array([r[3] for r in rows], dtype=bool),
    )


def make_dets(rows, classes=CLASSES, image_ids=IMAGES, threshold=0.5) -> Detections:
    """rows: (image id, class name, score, box)."""
    return Detections(
        threshold=threshold,
        threshold_mode="max",
        box_mode="all",
        classes=list(classes),
        image_ids=list(image_ids),
        image_index=np.array([image_ids.index(r[0]) for r in rows], dtype=np.int64),
        labels=np.array([classes.index(r[1]) for r in rows], dtype=np.int64),
        scores=np.array([r[2] for r in rows], dtype=np.float64),
        boxes=np.array([r[3] for r in rows], dtype=np.float64).reshape(-1, 4),
    )


def one(df: pd.DataFrame, cls: str, iou: float = 0.5) -> pd.Series:
    rows = df[(df["class"] == cls) & (df["iou"] == iou)]
    assert len(rows) == 1
    return rows.iloc[0]


def box(x: float, y: float, w: float = 10, h: float = 10) -> list[float]:
    """VOC box of w x h pixels with top-left pixel (x, y)."""
    return [x, y, x + w - 1, y + h - 1]
