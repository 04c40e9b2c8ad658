"""Heatmap cache: raw CAM maps + class scores + preprocessing geometry, one verified file per image.

Layout (``<cache_dir>/cams/<key>/``)::

    key.json               everything the key was computed from (model, checkpoint digest, head, method,
                           layer, input size, resize mode, class list, dataset year, gradloc version); the
                           dataset *path* is not part of it: each file records the content of its image
    map_size.json          [h, w] of the maps, written with the first computed map
    maps/<image_id>.pkl    {"format": "gradloc.cam/2", "image_id": str, "classes": [str] | None,
                            "map_shape": [C, h, w],
                            "maps": float16|float32[C, h, w]  raw maps of ALL classes (after ReLU, before any
                                    normalization) at the target layer's resolution,
                            "scores": float32[C]  the model's outputs (logits or log-probabilities),
                            "geometry": {width, height, input_w, input_h, resized_w, resized_h, pad_x, pad_y},
                            "source": {"size", "mtime_ns", "blake2b"} of the image file, or None}

A cached file is used only when it passes :meth:`HeatmapCache.get` (format, image id, class list, map shape,
geometry equal to the plan of the key's input size and resize mode, finite non-negative maps, finite scores)
and, in :meth:`HeatmapCache.todo`, when its image still has the recorded size and blake2b digest and its
annotated size; so editing one image recomputes that image alone, and a copied dataset reuses the cache
(``mtime_ns`` is recorded for diagnosis only, a touched but unchanged file is not recomputed).

Every file is written through a temporary file and an atomic rename, so a killed run leaves only complete
files (plus ``.<name>.<pid>.<random>.tmp`` litter, removed by the next run's :meth:`HeatmapCache.todo` once
its writer is dead or it is over an hour old). Pickles hold only plain data (loaded with the restricted
unpickler) and no timestamps besides the source's ``mtime_ns``. One file per image keeps the cache
shardable by image (several processes can fill one cache without coordination).
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradloc.core.files import atomic_write_bytes, pid_alive, safe_load_pickle
from gradloc.core.geometry import Geometry, plan
from gradloc.core.provenance import config_hash
from gradloc.datasets.voc import VOCDataset, file_fingerprint

logger = logging.getLogger(__name__)


CAM_FORMAT = "gradloc.cam/2"


# A temporary file whose writer is still alive is left alone unless it is older than this (seconds).
TMP_MAX_AGE = 3600.0


# ``.<name>.<pid>.<random>.tmp`` as written by ``atomic_write_bytes``
_TMP_NAME = re.compile(r"^\..+\.(\d+)\.[^.]+\.tmp$")


_RECORD_KEYS = ("image_id", "classes", "map_shape", "maps", "scores", "geometry", "source")


class CacheError(ValueError):
    """A cached heatmap file is malformed or belongs to another image, model or class list; names the file."""


@dataclass(frozen=True)
class CamEntry:
    """The cached result of one image: maps float32[C, h, w], scores float32[C], its geometry and source."""

    image_id: str
    maps: np.ndarray
    scores: np.ndarray
    geometry: Geometry
    source: dict[str, Any] | None = None


def same_content(recorded: Any, current: dict[str, Any]) -> bool:
    """Whether a recorded fingerprint describes the same bytes as ``current`` (size and digest agree)."""
    return (isinstance(recorded, dict) and recorded.get("size") == current["size"]
            and recorded.get("blake2b") == current["blake2b"])


def clean_tmp(folder: Path, max_age: float = TMP_MAX_AGE) -> list[Path]:
    """Delete the ``.*.tmp`` files of killed writes in ``folder`` (not recursive): those whose writer pid
    (in the name) is dead on this host, or older than ``max_age`` seconds. Returns the deleted files."""
    removed = []
    now = time.time()
    for path in folder.glob(".*.tmp"):
        match = _TMP_NAME.match(path.name)
        try:
            old = now - path.stat().st_mtime > max_age
        except FileNotFoundError:  # renamed into place meanwhile
            continue
        if old or (match is not None and not pid_alive(int(match.group(1)))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class HeatmapCache:
    """A folder of per-image CAM results whose name is the hash of everything that produced them.

    ``key_data`` may name ``classes`` (the map rows), ``input_size`` and ``resize_mode``; when present,
    every file read is checked against them.
    """

    def __init__(self, cache_dir: str | Path, key_data: dict[str, Any]):
        self.key_data = key_data
        self.key = config_hash(key_data)
        self.root = Path(cache_dir) / "cams" / self.key
        classes = key_data.get("classes")
        self.classes: list[str] | None = list(classes) if classes is not None else None
        self._checked: dict[str, bool] = {}  # image id -> cached file valid (True) or to compute (False)
        self._map_sizes: dict[str, tuple[int, int]] | None = None

    @classmethod
    def open(cls, root: str | Path) -> HeatmapCache:
        """An existing cache folder ``<cache_dir>/cams/<key>``, rebuilt from its ``key.json``.

        Raises:
            FileNotFoundError: the folder or its key.json is missing.
            ValueError: key.json does not hash to the folder name (renamed or edited folder).
        """
        root = Path(root)
        key_path = root / "key.json"
        if not key_path.is_file():
            raise FileNotFoundError(f"{key_path}: heatmap cache not found (moved or deleted?); rerun "
                                    "`gradloc cams` with the run's config")
        cache = cls(root.parent.parent, json.loads(key_path.read_text()))
        if cache.root.resolve() != root.resolve():
            raise ValueError(f"{key_path}: its key hashes to {cache.key}, not to the folder name {root.name}; "
                             "the cache folder was renamed or edited")
        return cache

    def _path(self, image_id: str) -> Path:
        if not image_id or "/" in image_id or image_id.startswith("."):
            raise ValueError(f"image id {image_id!r} cannot be used as a cache file name")
        return self.root / "maps" / f"{image_id}.pkl"

    def has(self, image_id: str) -> bool:
        return self._path(image_id).is_file()

    def missing(self, image_ids: list[str]) -> list[str]:
        """Ids without a cache file (presence only; :meth:`todo` also verifies the files)."""
        return [image_id for image_id in image_ids if not self.has(image_id)]

    def map_sizes(self) -> dict[str, tuple[int, int]]:
        """(h, w) of the maps computed so far into this cache, per input canvas ``"<input_h>x<input_w>"`` (one
        canvas for letterbox / stretch; one per shape bucket for shortside)."""
        path = self.root / "map_size.json"
        if self._map_sizes is None:
            self._map_sizes = {}
            if path.is_file():
                try:
                    self._map_sizes = {str(canvas): (int(h), int(w))
                                       for canvas, (h, w) in json.loads(path.read_text()).items()}
                except (ValueError, TypeError, AttributeError) as error:
                    raise CacheError(f"{path}: expected {{canvas: [h, w]}} ({error}); delete it and rerun "
                                     "`gradloc cams`") from None
        return self._map_sizes

    def put(self, image_id: str, maps: np.ndarray, scores: np.ndarray, geometry: Geometry, dtype: str,
            source: dict[str, Any] | None = None) -> None:
        """Store one image's raw maps [C, h, w] (as ``dtype``), scores [C], geometry and the
        :func:`gradloc.datasets.voc.fingerprint` of its image file, atomically."""
        if not (self.root / "key.json").is_file():
            atomic_write_bytes(self.root / "key.json", json.dumps(self.key_data, indent=2, sort_keys=True,
                                                                  default=str).encode())
        maps = np.ascontiguousarray(maps, dtype=np.dtype(dtype))
        sizes = self.map_sizes()
        canvas = f"{geometry.input_h}x{geometry.input_w}"
        if canvas not in sizes:
            sizes[canvas] = maps.shape[1:]
            atomic_write_bytes(self.root / "map_size.json",
                               json.dumps({k: list(v) for k, v in sorted(sizes.items())}).encode())
        record = {
            "format": CAM_FORMAT,
            "image_id": image_id,
            "classes": self.classes,
            "map_shape": list(maps.shape),
            "maps": maps,
            "scores": np.ascontiguousarray(scores, dtype=np.float32),
            "geometry": geometry.to_dict(),
            "source": source,
        }
        atomic_write_bytes(self._path(image_id), pickle.dumps(record, protocol=4))
        self._checked[image_id] = True

    def get(self, image_id: str) -> CamEntry:
        """The checked entry of one image.

        Raises:
            FileNotFoundError: no cache file. CacheError: a file that is not this image's heatmaps under
                this key (format, id, classes, shape, geometry, non-finite or negative values), naming it.
        """
        path = self._path(image_id)
        try:
            record = safe_load_pickle(path)
        except ValueError as error:
            raise CacheError(f"{error}; delete it or rerun `gradloc cams` to recompute it") from None
        problem = self._problem(record, image_id)
        if problem:
            raise CacheError(f"{path}: {problem}; delete it or rerun `gradloc cams` to recompute it")
        return CamEntry(image_id=image_id, maps=np.asarray(record["maps"], dtype=np.float32),
                        scores=np.asarray(record["scores"], dtype=np.float32),
                        geometry=Geometry.from_dict(record["geometry"]), source=record["source"])

    def _problem(self, record: Any, image_id: str) -> str | None:
        """What is wrong with a loaded record for ``image_id``, or None."""
        if not isinstance(record, dict) or record.get("format") != CAM_FORMAT:
            found = record.get("format") if isinstance(record, dict) else type(record).__name__
            return f"not a {CAM_FORMAT} heatmap cache file (found {found!r})"
        absent = [key for key in _RECORD_KEYS if key not in record]
        if absent:
            return f"lacks {', '.join(absent)}"
        if record["image_id"] != image_id:
            return f"holds the maps of image {record['image_id']!r}, not {image_id!r}"
        if self.classes is not None and record["classes"] != self.classes:
            return f"made for classes {record['classes']!r}, not this cache's {len(self.classes)} classes"
        maps, scores = record["maps"], record["scores"]
        if not isinstance(maps, np.ndarray) or not isinstance(scores, np.ndarray):
            return "maps or scores are not arrays"
        n_classes = len(self.classes) if self.classes is not None else len(scores)
        if maps.ndim != 3 or list(maps.shape) != record["map_shape"] or maps.shape[0] != n_classes \
                or 0 in maps.shape or scores.shape != (n_classes,):
            return (f"maps {list(maps.shape)} (recorded {record['map_shape']}) and scores {list(scores.shape)} "
                    f"do not fit {n_classes} classes")
        geometry = record["geometry"]
        canvas = f"{geometry.get('input_h')}x{geometry.get('input_w')}" if isinstance(geometry, dict) else None
        expected_size = self.map_sizes().get(canvas)
        if expected_size is not None and maps.shape[1:] != expected_size:
            return (f"maps are {maps.shape[1]}x{maps.shape[2]}, this cache's are {expected_size[0]}x{expected_size[1]} "
                    f"for a {canvas} input")
        if not (np.isfinite(maps).all() and np.isfinite(scores).all()):
            return "maps or scores hold NaN or infinite values"
        if maps.min() < 0:
            return "maps hold negative values (CAM maps are stored after ReLU)"
        return self._geometry_problem(record["geometry"])

    def _geometry_problem(self, data: Any) -> str | None:
        try:
            geometry = Geometry.from_dict(data)
        except (KeyError, TypeError, ValueError, OverflowError) as error:
            return f"unreadable geometry {data!r} ({type(error).__name__}: {error})"
        size, mode = self.key_data.get("input_size"), self.key_data.get("resize_mode")
        try:
            expected = plan(geometry.width, geometry.height, size or geometry.input_w, mode or "letterbox")
        except ValueError as error:
            return f"impossible geometry {geometry.to_dict()} ({error})"
        if size is not None and mode is not None and geometry != expected:
            return f"geometry {geometry.to_dict()} is not the {mode} plan at input size {size}"
        inside = (geometry.pad_x >= 0 and geometry.pad_x + geometry.resized_w <= geometry.input_w
                  and geometry.pad_y >= 0 and geometry.pad_y + geometry.resized_h <= geometry.input_h
                  and geometry.resized_w >= 1 and geometry.resized_h >= 1)
        return None if inside else f"impossible geometry {geometry.to_dict()}"

    def todo(self, dataset: VOCDataset, on_error: str = "raise") -> list[str]:
        """Ids of ``dataset`` whose maps must be computed: no file, an edited image (size or digest differ
        from the recorded ones) or annotated size, or a file failing :meth:`get`. Cleans temporary-file
        litter first. Results are remembered (until :meth:`put`), so calling again costs nothing and warns
        once.

        Raises:
            CacheError: a bad file with ``on_error="raise"`` (with ``"skip"`` it is logged and recomputed).
        """
        for folder in (self.root, self.root / "maps"):
            if folder.is_dir():
                for path in clean_tmp(folder):
                    logger.info("removed %s, left by an interrupted write", path)
        for image_id in dataset.image_ids:
            if image_id not in self._checked:
                self._checked[image_id] = self._valid(dataset, image_id, on_error)
        return [image_id for image_id in dataset.image_ids if not self._checked[image_id]]

    def _valid(self, dataset: VOCDataset, image_id: str, on_error: str) -> bool:
        """Whether the cached file of one image can be used as is (see :meth:`todo`)."""
        if not self.has(image_id):
            return False
        try:
            entry = self.get(image_id)
        except CacheError as error:
            if on_error == "raise":
                raise
            logger.warning("recomputing: %s", error)
            return False
        path, annotation = dataset.image_path(image_id), dataset.annotation(image_id)
        try:
            current = file_fingerprint(path)
        except OSError:  # unreadable now: computing it reports the error (or skips the image)
            return False
        if not same_content(entry.source, current):
            logger.info("%s changed since its maps were cached: recomputing", path)
            return False
        if (entry.geometry.width, entry.geometry.height) != (annotation.width, annotation.height):
            logger.info("%s: annotated size changed since its maps were cached: recomputing", annotation.path)
            return False
        return True

    def nbytes(self) -> int:
        return sum(path.stat().st_size for path in (self.root / "maps").glob("*.pkl"))
