"""Detection and ground-truth containers, their pickle formats, and safe pickle loading.

Both formats hold flat arrays (one row per box) so that scoring is vectorized and files made by other tools
are easy to write. Boxes are ``float64 [x1, y1, x2, y2]`` in VOC convention: 1-based, inclusive pixel
coordinates of the original image (width = x2 - x1 + 1).

``detections/thr_<τ>.pkl`` (format ``gradloc.detections/1``)::

    {"format": "gradloc.detections/1", "threshold": float, "threshold_mode": str, "box_mode": str,
     "classes": list[str], "image_ids": list[str], "image_index": int64[N], "labels": int64[N],
     "scores": float64[N], "boxes": float64[N, 4], "meta": dict}

``gt.pkl`` (format ``gradloc.gt/1``)::

    {"format": "gradloc.gt/1", "classes": list[str], "image_ids": list[str],
     "image_sizes": int64[n_images, 2] (width, height), "image_index": int64[M], "labels": int64[M],
     "boxes": float64[M, 4], "difficult": bool[M]}
"""

from __future__ import annotations

import io
import os
import pickle
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DETECTIONS_FORMAT = "gradloc.detections/1"
GT_FORMAT = "gradloc.gt/1"


def threshold_filename(threshold: float) -> str:
    """Stable, readable file name of a per-threshold output, e.g. ``0.02 -> "thr_0.020.pkl"``.

    Raises:
        ValueError: if the threshold is outside [0, 1] or needs more than 3 decimals.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold {threshold!r} is outside [0, 1]")
    if abs(round(threshold, 3) - threshold) > 1e-9:
        raise ValueError(f"threshold {threshold!r} has more than 3 decimals; file names keep 3 (thr_0.020.pkl)")
    return f"thr_{threshold:.3f}.pkl"


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
        return cls(
            classes=list(data["classes"]),
            image_ids=list(data["image_ids"]),
            image_sizes=np.asarray(data["image_sizes"], dtype=np.int64).reshape(-1, 2),
            image_index=np.asarray(data["image_index"], dtype=np.int64),
            labels=np.asarray(data["labels"], dtype=np.int64),
            boxes=np.asarray(data["boxes"], dtype=np.float64).reshape(-1, 4),
            difficult=np.asarray(data["difficult"], dtype=bool),
        )


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
        return cls(
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
        )


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


# --- pickle I/O ---------------------------------------------------------------------------------------------

# Everything the two formats need: containers, numpy arrays and scalars. Nothing that can run code.
_ALLOWED_GLOBALS = {
    ("builtins", "dict"),
    ("builtins", "list"),
    ("builtins", "tuple"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "str"),
    ("builtins", "int"),
    ("builtins", "float"),
    ("builtins", "bool"),
    ("builtins", "complex"),
    ("builtins", "bytes"),
    ("builtins", "bytearray"),
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),  # numpy arrays pickled with protocol 5
    ("numpy.core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # numpy arrays pickled with protocol 2 (bytes as latin-1 text)
    ("numpy", "int64"),
    ("numpy", "float64"),
    ("numpy", "bool_"),
}
_NUMPY_DTYPE_CLASSES = {"numpy.dtypes", "numpy._core.dtypes", "numpy.core.dtypes"}


class _Refused(pickle.UnpicklingError):
    """The pickle names something beyond plain data."""


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS or (module in _NUMPY_DTYPE_CLASSES and name.endswith("DType")):
            return super().find_class(module, name)
        raise _Refused(f"refusing to load {module}.{name}")


def safe_load_pickle(path: str | os.PathLike[str]) -> Any:
    """Load a pickle that may come from someone else, allowing only builtins and numpy arrays/scalars.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a pickle or refers to anything beyond plain data.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    data = path.read_bytes()
    try:
        return _SafeUnpickler(io.BytesIO(data)).load()
    except _Refused as error:
        raise ValueError(f"{path}: not a plain-data pickle ({error}); only gradloc formats are loaded") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as error:
        raise ValueError(f"{path}: unreadable pickle ({type(error).__name__}: {error})") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp's temporary files are 0600


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, _FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_pickle(obj: GroundTruth | Detections, path: str | os.PathLike[str]) -> None:
    """Pickle a container's plain-data dict atomically (protocol 4, no timestamps: same data, same bytes)."""
    atomic_write_bytes(path, pickle.dumps(obj.to_dict(), protocol=4))


def load_ground_truth(path: str | os.PathLike[str]) -> GroundTruth:
    """Load and validate a ``gradloc.gt/1`` pickle (see module docstring)."""
    return GroundTruth.from_dict(safe_load_pickle(path), source=str(path))


def load_detections(path: str | os.PathLike[str]) -> Detections:
    """Load and validate a ``gradloc.detections/1`` pickle (see module docstring)."""
    return Detections.from_dict(safe_load_pickle(path), source=str(path))
