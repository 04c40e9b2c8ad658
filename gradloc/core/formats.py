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
from gradloc.core.names import excerpt
from gradloc.core.ranges import THRESHOLD_RANGE

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
        if sizes.size and sizes.min() < 1:
            raise ValueError("ground truth: field 'image_sizes' holds a width or height below 1 pixel")

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
        """Ground truth from a loaded ``gradloc.gt/1`` dict, every field checked for type and values
        (:func:`read_array`); errors start with ``source`` (the file)."""
        _check_format(data, GT_FORMAT, source)
        return _named(source, lambda: cls(
            classes=read_names(data, "classes", source),
            image_ids=read_names(data, "image_ids", source),
            image_sizes=read_array(data, "image_sizes", "size", source, columns=2),
            image_index=read_array(data, "image_index", "index", source),
            labels=read_array(data, "labels", "index", source),
            boxes=read_array(data, "boxes", "box", source, columns=4),
            difficult=read_array(data, "difficult", "flag", source),
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
        """Detections from a loaded ``gradloc.detections/1`` dict, every field checked for type and values
        (:func:`read_array`); errors start with ``source`` (the file)."""
        _check_format(data, DETECTIONS_FORMAT, source)
        meta = data.get("meta", {})
        _check_meta(meta, source)
        return _named(source, lambda: cls(
            threshold=THRESHOLD_RANGE.check(_read_number(data, "threshold", source), "field 'threshold'"),
            threshold_mode=_read_text(data, "threshold_mode", source),
            box_mode=_read_text(data, "box_mode", source),
            classes=read_names(data, "classes", source),
            image_ids=read_names(data, "image_ids", source),
            image_index=read_array(data, "image_index", "index", source),
            labels=read_array(data, "labels", "index", source),
            scores=read_array(data, "scores", "number", source),
            boxes=read_array(data, "boxes", "box", source, columns=4),
            meta=dict(meta),
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
        raise ValueError(f"{source}: format is {excerpt(found)}, expected {expected!r} (see README 'File formats')")
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
    """Check that per-box arrays have one row each, the right dtype, indices in range and ordered boxes."""
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
    inverted = np.flatnonzero((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]))
    if inverted.size:
        raise ValueError(f"{what}: field 'boxes' row {inverted[0]} is {boxes[inverted[0]].tolist()}, with x2 < x1 or "
                         f"y2 < y1 ({inverted.size} such rows); boxes are [x1, y1, x2, y2] with x1 <= x2, y1 <= y2")
    for name, limit in (("labels", n_classes), ("image_index", n_images)):
        values = arrays[name][0]
        if values.size and (values.min() < 0 or values.max() >= limit):
            raise ValueError(f"{what}: field {name!r} holds values outside [0, {limit})")


# What a field of a file may hold, by kind: the dtype kinds accepted, the dtype returned, and the check of
# the values (None: any). Integers may come as integral floats; flags as bool or 0/1; never as strings.
_KINDS: dict[str, tuple[str, type, str]] = {
    "index": ("iuf", np.int64, "whole numbers"),
    "size": ("iuf", np.int64, "whole numbers"),
    "flag": ("biuf", np.bool_, "bool or 0/1 values"),
    "number": ("iuf", np.float64, "numbers"),
    "box": ("iuf", np.float64, "numbers"),
}


def read_array(data: Mapping[str, Any], name: str, kind: str, source: str, columns: int | None = None) -> np.ndarray:
    """Field ``name`` of a loaded file as a checked array: 1-D, or ``[N, columns]`` when ``columns`` is given.

    Kinds (:data:`_KINDS`): ``index`` and ``size`` (int64; integral floats accepted, other floats refused, not
    truncated), ``flag`` (bool; bool or 0/1 numbers, never strings), ``number`` and ``box`` (float64).

    Raises:
        ValueError: ``"<source>: field '<name>' ..."`` naming what was found (dtype, shape, first bad value).
    """
    accepted, dtype, meaning = _KINDS[kind]
    value = data[name]
    where = f"{source}: field {name!r}"
    if not isinstance(value, np.ndarray | list | tuple):
        raise ValueError(f"{where} is a {type(value).__name__} ({excerpt(value)}), expected an array of {meaning}")
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{where} is not a regular array ({error})") from None
    if array.dtype.kind not in accepted:
        first = excerpt(array.reshape(-1)[0].item()) if array.size else "nothing"
        raise ValueError(f"{where} holds {array.dtype} values (first {first}), expected {meaning}")
    shape = (-1,) if columns is None else (-1, columns)
    if array.size == 0:
        array = array.reshape(0, *shape[1:])
    if array.ndim != len(shape) or (columns is not None and array.shape[1] != columns):
        expected = "(N,)" if columns is None else f"(N, {columns})"
        raise ValueError(f"{where} has shape {array.shape}, expected {expected}")
    if array.dtype.kind == "f" and kind in ("index", "size", "flag"):
        bad = ~np.isfinite(array) | (array != np.round(array))
        if bad.any():
            raise ValueError(f"{where} holds {array[bad][0].item()!r}, expected {meaning}")
    if kind == "flag" and array.dtype.kind != "b":
        bad = (array != 0) & (array != 1)
        if bad.any():
            raise ValueError(f"{where} holds {array[bad][0].item()!r}, expected {meaning}")
    if array.dtype.kind == "u" and array.size and array.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{where} holds {array.max()}, too large for an index")
    return array.astype(dtype)


def read_names(data: Mapping[str, Any], name: str, source: str) -> list[str]:
    """Field ``name`` of a loaded file as a list of distinct strings (class names, image ids).

    Raises:
        ValueError: not a list of strings, or a name given twice; the message starts with ``source``.
    """
    value = data[name]
    where = f"{source}: field {name!r}"
    if isinstance(value, np.ndarray) and value.dtype.kind == "U":
        value = value.tolist()
    if not isinstance(value, list | tuple):
        raise ValueError(f"{where} is a {type(value).__name__} ({excerpt(value)}), expected a list of strings")
    bad = next((item for item in value if not isinstance(item, str)), None)
    if bad is not None:
        raise ValueError(f"{where} holds {excerpt(bad)}, a {type(bad).__name__}; expected strings")
    bad = next((item for item in value if len(item) > MAX_TEXT_CHARS or any(c < " " for c in item)), None)
    if bad is not None:
        raise ValueError(f"{where} holds {excerpt(bad)}: names are single lines of at most {MAX_TEXT_CHARS} "
                         "characters")
    if len(set(value)) != len(value):
        twice = next(item for i, item in enumerate(value) if item in value[:i])
        raise ValueError(f"{where} lists {excerpt(twice)} twice")
    return list(value)


MAX_TEXT_CHARS = 4096
"""Longest name (class, image id) or protocol string a file may hold: every one of them is printed."""


def _check_meta(meta: Any, source: str) -> None:
    """``meta`` is a dict with string keys whose strings (at any depth) are at most :data:`MAX_TEXT_CHARS` long.

    Raises:
        ValueError: naming the file.
    """
    if not isinstance(meta, Mapping):
        raise ValueError(f"{source}: field 'meta' is a {type(meta).__name__}, expected a dict")
    stack: list[Any] = [meta]
    while stack:  # the restricted loader bounds the size of what it built
        item = stack.pop()
        if isinstance(item, Mapping):
            if not all(isinstance(key, str) for key in item):
                raise ValueError(f"{source}: field 'meta' has a key that is not a string")
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, str) and len(item) > MAX_TEXT_CHARS:
            raise ValueError(f"{source}: field 'meta' holds a string of {len(item):,} characters "
                             f"({excerpt(item)}); at most {MAX_TEXT_CHARS} are printed")


def _read_number(data: Mapping[str, Any], name: str, source: str) -> float:
    value = data[name]
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{source}: field {name!r} is {excerpt(value)}, expected a number")
    return float(value)


def _read_text(data: Mapping[str, Any], name: str, source: str) -> str:
    value = data[name]
    if not isinstance(value, str):
        raise ValueError(f"{source}: field {name!r} is {excerpt(value)}, expected a string")
    return value


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
        raise ValueError(f"class {excerpt(unknown[0])} is not one of {', '.join(classes)}")
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

