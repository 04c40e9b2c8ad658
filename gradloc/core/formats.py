"""Detection and ground-truth containers and their pickle formats (loaded through ``gradloc.core.files``).

Both formats hold flat arrays (one row per box) so that scoring is vectorized and files made by other tools
are easy to write. Boxes are ``float64 [x1, y1, x2, y2]`` in VOC convention: 1-based, inclusive pixel
coordinates of the original image (width = x2 - x1 + 1).

A detections file (format ``gradloc.detections/1``; where a run keeps them: ``gradloc.run.folder``)::

    {"format": "gradloc.detections/1", "threshold": float, "threshold_mode": str, "box_mode": str,
     "classes": list[str], "image_ids": list[str], "image_index": int64[N], "labels": int64[N],
     "scores": float64[N], "boxes": float64[N, 4], "meta": dict}

Ground truth (format ``gradloc.gt/1``)::

    {"format": "gradloc.gt/1", "classes": list[str], "image_ids": list[str],
     "image_sizes": int64[n_images, 2] (width, height), "image_index": int64[M], "labels": int64[M],
     "boxes": float64[M, 4], "difficult": bool[M]}
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradloc.core.files import safe_load_pickle

DETECTIONS_FORMAT = "gradloc.detections/1"


GT_FORMAT = "gradloc.gt/1"


@dataclass(frozen=True, eq=False)
class GroundTruth:
    """Ground-truth boxes of a set of images (``gradloc.gt/1``).

    Attributes:
        classes: class names; ``labels`` index into it.
        image_ids: image ids; ``image_index`` indexes into it.
        image_sizes: int64[n_images, 2], (width, height) of each original image.
        image_index: int64[M], image of each box.
        labels: int64[M], class of each box.
        boxes: float64[M, 4], VOC convention.
        difficult: bool[M], VOC ``difficult`` flag (a missing flag is False).
    """

    classes: list[str]
    image_ids: list[str]
    image_sizes: np.ndarray
    image_index: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray
    difficult: np.ndarray

    def __post_init__(self) -> None:
        _check_rows(
            "ground truth",
            {
                "image_index": (self.image_index, np.int64),
                "labels": (self.labels, np.int64),
                "boxes": (self.boxes, np.float64),
                "difficult": (self.difficult, np.bool_),
            },
            len(self.classes),
            len(self.image_ids),
        )
        sizes = np.asarray(self.image_sizes)
        if sizes.shape != (len(self.image_ids), 2):
            raise ValueError(
                f"ground truth: image_sizes has shape {sizes.shape}, expected ({len(self.image_ids)}, 2)"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": GT_FORMAT,
            "classes": list(self.classes),
            "image_ids": list(self.image_ids),
            "image_sizes": np.asarray(self.image_sizes, dtype=np.int64),
            "image_index": np.asarray(self.image_index, dtype=np.int64),
            "labels": np.asarray(self.labels, dtype=np.int64),
            "boxes": np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4),
            "difficult": np.asarray(self.difficult, dtype=bool),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "ground truth") -> GroundTruth:
        _check_format(data, GT_FORMAT, source)
        return _named(source, lambda: cls(
            classes=list(data["classes"]),
            image_ids=list(data["image_ids"]),
            image_sizes=np.asarray(data["image_sizes"], dtype=np.int64).reshape(-1, 2),
            image_index=np.asarray(data["image_index"], dtype=np.int64),
            labels=np.asarray(data["labels"], dtype=np.int64),
            boxes=np.asarray(data["boxes"], dtype=np.float64).reshape(-1, 4),
            difficult=np.asarray(data["difficult"], dtype=bool),
        ))

    def image_labels(self) -> np.ndarray:
        """Image-level labels in the devkit's classification convention.

        Returns:
            int8[n_images, n_classes]: 1 if the image holds a non-difficult box of the class, 0 if all its
            boxes of the class are difficult, -1 if it holds none.
        """
        labels = np.full((len(self.image_ids), len(self.classes)), -1, dtype=np.int8)
        np.maximum.at(labels, (self.image_index, self.labels), np.where(self.difficult, 0, 1).astype(np.int8))
        return labels


@dataclass(frozen=True, eq=False)
class Detections:
    """Scored boxes of one threshold (``gradloc.detections/1``).

    Attributes:
        threshold: τ in [0, 1]; its meaning is ``threshold_mode`` (see ``gradloc.boxes``).
        threshold_mode: ``max`` / ``minmax`` / ``percentile``.
        box_mode: ``largest`` / ``all`` / ``union`` (or the name of a baseline such as ``center``).
        classes: class names; ``labels`` index into it.
        image_ids: image ids; ``image_index`` indexes into it.
        image_index: int64[N], labels: int64[N], scores: float64[N], boxes: float64[N, 4] (VOC convention).
        meta: free-form protocol description (method, layer, model, which classes were explained, ...).
    """

    threshold: float
    threshold_mode: str
    box_mode: str
    classes: list[str]
    image_ids: list[str]
    image_index: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_rows(
            "detections",
            {
                "image_index": (self.image_index, np.int64),
                "labels": (self.labels, np.int64),
                "scores": (self.scores, np.float64),
                "boxes": (self.boxes, np.float64),
            },
            len(self.classes),
            len(self.image_ids),
        )

    def __len__(self) -> int:
        return len(self.scores)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": DETECTIONS_FORMAT,
            "threshold": float(self.threshold),
            "threshold_mode": str(self.threshold_mode),
            "box_mode": str(self.box_mode),
            "classes": list(self.classes),
            "image_ids": list(self.image_ids),
            "image_index": np.asarray(self.image_index, dtype=np.int64),
            "labels": np.asarray(self.labels, dtype=np.int64),
            "scores": np.asarray(self.scores, dtype=np.float64),
            "boxes": np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4),
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "detections") -> Detections:
        _check_format(data, DETECTIONS_FORMAT, source)
        return _named(source, lambda: cls(
            threshold=float(data["threshold"]),
            threshold_mode=str(data["threshold_mode"]),
            box_mode=str(data["box_mode"]),
            classes=list(data["classes"]),
            image_ids=list(data["image_ids"]),
            image_index=np.asarray(data["image_index"], dtype=np.int64),
            labels=np.asarray(data["labels"], dtype=np.int64),
            scores=np.asarray(data["scores"], dtype=np.float64),
            boxes=np.asarray(data["boxes"], dtype=np.float64).reshape(-1, 4),
            meta=dict(data.get("meta", {})),
        ))


def _named(source: str, build: Any) -> Any:
    """``build()``, with a ValueError of the content checks prefixed by ``source`` (the file it came from)."""
    try:
        return build()
    except (ValueError, TypeError) as error:
        message = str(error)
        raise ValueError(message if message.startswith(f"{source}:") else f"{source}: {message}") from None


def _check_format(data: Mapping[str, Any], expected: str, source: str) -> None:
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: expected a dict in format {expected!r}, found {type(data).__name__}")
    found = data.get("format")
    if found != expected:
        raise ValueError(f"{source}: format is {found!r}, expected {expected!r} (see README 'File formats')")
    required = {
        GT_FORMAT: ("classes", "image_ids", "image_sizes", "image_index", "labels", "boxes", "difficult"),
        DETECTIONS_FORMAT: (
            "threshold", "threshold_mode", "box_mode", "classes", "image_ids",
            "image_index", "labels", "scores", "boxes",
        ),
    }[expected]
    missing = [key for key in required if key not in data]
    if missing:
        raise ValueError(f"{source}: missing field(s) {', '.join(missing)} of format {expected!r}")


def _check_rows(what: str, arrays: dict[str, tuple[np.ndarray, type]], n_classes: int, n_images: int) -> None:
    """Check that per-box arrays have one row each, the right dtype, and indices in range."""
    lengths = {name: np.asarray(a).shape[0] if np.ndim(a) else -1 for name, (a, _) in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{what}: per-box arrays differ in length: {lengths}")
    for name, (array, dtype) in arrays.items():
        if np.asarray(array).dtype != dtype:
            raise ValueError(f"{what}: field {name!r} has dtype {np.asarray(array).dtype}, expected {dtype}")
    boxes = arrays["boxes"][0]
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{what}: field 'boxes' has shape {boxes.shape}, expected (N, 4)")
    if not np.all(np.isfinite(boxes)):
        raise ValueError(f"{what}: field 'boxes' holds non-finite values")
    for name, limit in (("labels", n_classes), ("image_index", n_images)):
        values = arrays[name][0]
        if values.size and (values.min() < 0 or values.max() >= limit):
            raise ValueError(f"{what}: field {name!r} holds values outside [0, {limit})")


def load_ground_truth(path: str | os.PathLike[str]) -> GroundTruth:
    """Load and validate a ``gradloc.gt/1`` pickle (see module docstring)."""
    return GroundTruth.from_dict(safe_load_pickle(path), source=str(path))


def load_detections(path: str | os.PathLike[str]) -> Detections:
    """Load and validate a ``gradloc.detections/1`` pickle (see module docstring)."""
    return Detections.from_dict(safe_load_pickle(path), source=str(path))


def class_relabel(classes: Sequence[str], names: Sequence[str]) -> np.ndarray:
    """int64[len(classes)]: the index of each of ``classes`` in ``names``, -1 for the classes left out.

    Raises:
        ValueError: a name is not one of ``classes``.
    """
    index = {name: i for i, name in enumerate(classes)}
    unknown = [name for name in names if name not in index]
    if unknown:
        raise ValueError(f"class {unknown[0]!r} is not one of {', '.join(classes)}")
    relabel = np.full(len(classes), -1, dtype=np.int64)
    relabel[[index[name] for name in names]] = np.arange(len(names))
    return relabel


def keep_classes(item: GroundTruth | Detections, names: Sequence[str]) -> GroundTruth | Detections:
    """``item`` restricted to the classes ``names`` (in that order): their rows, relabelled; the class list
    becomes ``names`` (what ``--only car,cat,bus`` scores).

    Raises:
        ValueError: a name is not one of ``item.classes``.
    """
    relabel = class_relabel(item.classes, names)
    keep = relabel[item.labels] >= 0
    rows = ("image_index", "boxes", "difficult") if isinstance(item, GroundTruth) else ("image_index", "boxes",
                                                                                         "scores")
    return dataclasses.replace(item, classes=list(names), labels=relabel[item.labels[keep]],
                               **{name: getattr(item, name)[keep] for name in rows})


def concat(parts: Sequence[GroundTruth | Detections]) -> GroundTruth | Detections:
    """Ground truth (or detections) of disjoint image sets as one: image lists concatenated in order, each
    part's ``image_index`` shifted by the images before it (cross-validation folds scored as one set). The
    first part gives the scalar fields (threshold, modes, meta) of detections.

    Raises:
        ValueError: no parts, parts of different kinds or class lists, or an image in two parts.
    """
    if not parts:
        raise ValueError("concat: give at least one part")
    first = parts[0]
    if any(type(part) is not type(first) or part.classes != first.classes for part in parts):
        raise ValueError("concat: the parts must be of one kind with the same class list")
    image_ids = [image_id for part in parts for image_id in part.image_ids]
    if len(set(image_ids)) != len(image_ids):
        raise ValueError("concat: an image is in two parts; the parts must hold disjoint images")
    offsets = np.cumsum([0] + [len(part.image_ids) for part in parts[:-1]])
    rows = ("labels", "boxes", "difficult") if isinstance(first, GroundTruth) else ("labels", "boxes", "scores")
    joined = {name: np.concatenate([getattr(part, name) for part in parts]) for name in rows}
    joined["image_index"] = np.concatenate([part.image_index + offset for part, offset in
                                            zip(parts, offsets, strict=True)])
    if isinstance(first, GroundTruth):
        joined["image_sizes"] = np.concatenate([part.image_sizes for part in parts]).reshape(-1, 2)
    return dataclasses.replace(first, image_ids=image_ids, **joined)

