"""Heatmap cache: raw CAM maps + class scores + preprocessing geometry, one verified file per image.

Layout (``<cache_dir>/cams/<key>/``)::

    key.json               everything the key was computed from (model, checkpoint digest, head, method,
                           layer, input size, resize mode, class list, dataset year, gradloc version); the
                           dataset *path* is not part of it: each file records the content of its image
    map_size.json          [h, w] of the maps, written with the first computed map
    maps/<image_id>.<blake2b>.pkl
                           {"format": "gradloc.cam/3", "image_id": str, "classes": [str] | None,
                            "map_shape": [C, h, w],
                            "maps": float16|float32[C, h, w]  raw maps of ALL classes (after ReLU, before any
                                    normalization) at the target layer's resolution,
                            "scores": float32[C]  the model's outputs (logits or log-probabilities),
                            "geometry": {width, height, input_w, input_h, resized_w, resized_h, pad_x, pad_y},
                            "source": {"size", "mtime_ns", "blake2b"} of the image file}

**Content-addressed entries.** An entry is named by its image id *and* the blake2b digest of the image bytes
its maps were computed from. Two datasets with the same ids (a mirrored copy, an edited image) therefore
never share or overwrite an entry: concurrent runs on both fill one cache side by side, and each reads its
own. Every entry is one file, written whole (temporary file + rename), and self-verifying.

**Every read proves its image.** A :class:`HeatmapCache` serves, per image id, only the entry of the image
bytes it was told about: the fingerprint :meth:`HeatmapCache.todo` read from the image file, the one
:meth:`HeatmapCache.put` stored, or the ones a finished run recorded (:meth:`HeatmapCache.serve`, from the
run's ``images.json``). :meth:`HeatmapCache.get` reads that entry and checks it (format, image id, the
recorded fingerprint, class list, map shape, geometry equal to the plan of the key's input size and resize
mode, finite non-negative maps, finite scores); so editing one image recomputes that image alone, a copied
dataset reuses the cache (``mtime_ns`` is recorded for diagnosis only), and no later stage can be served
another image's maps.

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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradloc.core.files import atomic_write_bytes, pid_alive, safe_load_pickle
from gradloc.core.geometry import Geometry, plan
from gradloc.core.names import check_name, excerpt
from gradloc.core.provenance import config_hash
from gradloc.datasets.voc import VOCDataset, file_fingerprint

logger = logging.getLogger(__name__)


CAM_FORMAT = "gradloc.cam/3"


# A temporary file whose writer is still alive is left alone unless it is older than this (seconds).
TMP_MAX_AGE = 3600.0


# ``.<name>.<pid>.<random>.tmp`` as written by ``atomic_write_bytes``
_TMP_NAME = re.compile(r"^\..+\.(\d+)\.[^.]+\.tmp$")


OPEN_KEYS = ("score_kind", "layer")
"""What a reader of a finished run's cache (:meth:`HeatmapCache.open`) takes from its key.json."""


_DIGEST = re.compile(r"^[0-9a-f]{32}$")  # blake2b, 16 bytes (gradloc.datasets.voc.fingerprint)


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
    source: dict[str, Any]


def same_content(recorded: Any, current: Any) -> bool:
    """Whether two fingerprints (``{"size", "blake2b", ...}``) describe the same bytes (size and digest agree)."""
    return (isinstance(recorded, dict) and isinstance(current, dict) and recorded.get("size") == current.get("size")
            and recorded.get("blake2b") == current.get("blake2b"))


def describe(source: Any) -> str:
    """A fingerprint for messages: ``<size> bytes, blake2b <first 12 hex digits>``."""
    if not isinstance(source, dict):
        return excerpt(source)
    return f"{excerpt(source.get('size'))} bytes, blake2b {str(source.get('blake2b'))[:12]}"


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
    every file read is checked against them. The object serves, per image id, the entry of one image content
    (see the module docstring): :meth:`todo`, :meth:`put` and :meth:`serve` say which.
    """

    def __init__(self, cache_dir: str | Path, key_data: dict[str, Any]):
        self.key_data = key_data
        self.key = config_hash(key_data)
        self.root = Path(cache_dir) / "cams" / self.key
        classes = key_data.get("classes")
        self.classes: list[str] | None = list(classes) if classes is not None else None
        self._sources: dict[str, dict[str, Any]] = {}  # image id -> fingerprint of the entry served
        self._pending: set[str] = set()  # image ids checked by todo() and to compute
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
        try:
            key_data = json.loads(key_path.read_text())
        except (ValueError, RecursionError) as error:
            raise ValueError(f"{key_path}: not valid JSON ({str(error)[:200]})") from None
        if not isinstance(key_data, dict):
            raise ValueError(f"{key_path}: expected a mapping, found {excerpt(key_data)}")
        bad = next((key for key in OPEN_KEYS if not isinstance(key_data.get(key), str)), None)
        if bad is not None:
            raise ValueError(f"{key_path}: not a heatmap cache key (its {bad!r} is {excerpt(key_data.get(bad))}, "
                             "expected a string); rerun `gradloc cams` with the run's config")
        cache = cls(root.parent.parent, key_data)
        if cache.root.resolve() != root.resolve():
            raise ValueError(f"{key_path}: its key hashes to {cache.key}, not to the folder name {root.name}; "
                             "the cache folder was renamed or edited")
        return cache

    def path(self, image_id: str, source: Any) -> Path:
        """``maps/<image_id>.<blake2b>.pkl``: the entry of one image id and content.

        Raises:
            ValueError: an id that cannot be a file name, or not a fingerprint.
        """
        check_name(image_id, "image id")
        digest = source.get("blake2b") if isinstance(source, dict) else None
        if not isinstance(digest, str) or not _DIGEST.match(digest) or not isinstance(source.get("size"), int):
            raise ValueError(f"image {image_id!r}: {excerpt(source)} is not an image fingerprint "
                             "{size, blake2b}")
        return self.root / "maps" / f"{image_id}.{digest}.pkl"

    def has(self, image_id: str, source: dict[str, Any]) -> bool:
        """Whether an entry of this image id and content exists (unverified; :meth:`get` verifies)."""
        return self.path(image_id, source).is_file()

    def serve(self, sources: Mapping[str, dict[str, Any]]) -> None:
        """Serve, for each image id, the entry of the image content ``sources[id]`` (e.g. a finished run's
        ``images.json``), so :meth:`get` returns those maps or fails, never another content's."""
        self._sources.update({image_id: dict(source) for image_id, source in sources.items()})

    def sources(self, image_ids: list[str]) -> dict[str, dict[str, Any]]:
        """The fingerprint of the entry served for each id (what a run records in ``images.json``).

        Raises:
            CacheError: an id this object has not verified, stored or been told about.
        """
        unknown = [image_id for image_id in image_ids if image_id not in self._sources]
        if unknown:
            raise CacheError(f"{self.root}: no verified maps for {len(unknown)} images (e.g. {unknown[0]}); run "
                             "`gradloc cams` with the same options first")
        return {image_id: self._sources[image_id] for image_id in image_ids}

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
            source: dict[str, Any]) -> None:
        """Store one image's raw maps [C, h, w] (as ``dtype``), scores [C], geometry and the
        :func:`gradloc.datasets.voc.fingerprint` ``source`` of the image bytes they were computed from,
        atomically, as the entry of that content; this object then serves it for ``image_id``."""
        path = self.path(image_id, source)
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
            "source": dict(source),
        }
        atomic_write_bytes(path, pickle.dumps(record, protocol=4))
        self._sources[image_id] = dict(source)
        self._pending.discard(image_id)

    def get(self, image_id: str, source: dict[str, Any] | None = None) -> CamEntry:
        """The checked entry of one image: of the content ``source`` when given, else of the content this
        object serves for ``image_id`` (see :meth:`todo`, :meth:`put`, :meth:`serve`).

        Raises:
            FileNotFoundError: no entry of that content. CacheError: no content known for ``image_id``, or a
                file that is not this image content's heatmaps under this key (format, id, fingerprint,
                classes, shape, geometry, non-finite or negative values), naming it.
        """
        source = source if source is not None else self._sources.get(image_id)
        if source is None:
            raise CacheError(f"{self.root}: no verified maps of image {image_id!r} for this run; run `gradloc "
                             "cams` with the same options first")
        path = self.path(image_id, source)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no cached maps of image {image_id!r} ({describe(source)}); run "
                                    "`gradloc cams` with the same options to compute them")
        try:
            record = safe_load_pickle(path)
        except ValueError as error:
            raise CacheError(f"{error}; delete it or rerun `gradloc cams` to recompute it") from None
        problem = self._problem(record, image_id, source)
        if problem:
            raise CacheError(f"{path}: {problem}; delete it or rerun `gradloc cams` to recompute it")
        return CamEntry(image_id=image_id, maps=np.asarray(record["maps"], dtype=np.float32),
                        scores=np.asarray(record["scores"], dtype=np.float32),
                        geometry=Geometry.from_dict(record["geometry"]), source=record["source"])

    def _problem(self, record: Any, image_id: str, source: dict[str, Any]) -> str | None:
        """What is wrong with a loaded record for ``image_id`` computed from the content ``source``, or None."""
        if not isinstance(record, dict) or record.get("format") != CAM_FORMAT:
            found = record.get("format") if isinstance(record, dict) else type(record).__name__
            return f"not a {CAM_FORMAT} heatmap cache file (found {excerpt(found)})"
        absent = [key for key in _RECORD_KEYS if key not in record]
        if absent:
            return f"lacks {', '.join(absent)}"
        if record["image_id"] != image_id:
            return f"holds the maps of image {excerpt(record['image_id'])}, not {image_id!r}"
        if not same_content(record["source"], source):
            return (f"holds the maps of other image bytes ({describe(record['source'])}), not of "
                    f"{describe(source)}")
        if self.classes is not None and record["classes"] != self.classes:
            return f"made for classes {excerpt(record['classes'])}, not this cache's {len(self.classes)} classes"
        maps, scores = record["maps"], record["scores"]
        if not isinstance(maps, np.ndarray) or not isinstance(scores, np.ndarray) or maps.dtype.kind != "f" \
                or scores.dtype.kind != "f":
            return "maps or scores are not arrays of floats"
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
            return f"unreadable geometry {excerpt(data)} ({type(error).__name__}: {str(error)[:100]})"
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
        """Ids of ``dataset`` whose maps must be computed: no entry of the image's current content (an edited
        image, or another dataset's image under the same id, has its own), an edited annotated size, or an
        entry failing :meth:`get`. The others are served from then on. Cleans temporary-file litter first.
        Results are remembered (until :meth:`put`), so calling again costs nothing and warns once.

        Raises:
            CacheError: a bad file with ``on_error="raise"`` (with ``"skip"`` it is logged and recomputed).
        """
        for folder in (self.root, self.root / "maps"):
            if folder.is_dir():
                for path in clean_tmp(folder):
                    logger.info("removed %s, left by an interrupted write", path)
        for image_id in dataset.image_ids:
            if image_id not in self._sources and image_id not in self._pending:
                source = self._valid(dataset, image_id, on_error)
                if source is None:
                    self._pending.add(image_id)
                else:
                    self._sources[image_id] = source
        return [image_id for image_id in dataset.image_ids if image_id not in self._sources]

    def _valid(self, dataset: VOCDataset, image_id: str, on_error: str) -> dict[str, Any] | None:
        """The fingerprint of the image's current content when its entry can be used as is, else None."""
        path, annotation = dataset.image_path(image_id), dataset.annotation(image_id)
        try:
            current = file_fingerprint(path)
        except OSError:  # unreadable now: computing it reports the error (or skips the image)
            return None
        if not self.has(image_id, current):
            return None
        try:
            entry = self.get(image_id, current)
        except CacheError as error:
            if on_error == "raise":
                raise
            logger.warning("recomputing: %s", error)
            return None
        if (entry.geometry.width, entry.geometry.height) != (annotation.width, annotation.height):
            logger.info("%s: annotated size changed since its maps were cached: recomputing", annotation.path)
            return None
        return current

    def nbytes(self) -> int:
        return sum(path.stat().st_size for path in (self.root / "maps").glob("*.pkl"))
