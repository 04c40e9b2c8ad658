"""Heatmap cache: raw CAM maps + class scores + preprocessing geometry, one file per image.

Layout (``<cache_dir>/cams/<key>/``)::

    key.json               everything the key was computed from (model, checkpoint digest, head, method,
                           layer, input size, resize mode, dataset root/year/split, gradloc version)
    maps/<image_id>.pkl    {"format": "gradloc.cam/1", "image_id": str,
                            "maps": float16|float32[C, h, w]  raw maps of ALL classes (after ReLU, before any
                                    normalization) at the target layer's resolution,
                            "scores": float32[C]  the model's outputs (logits or log-probabilities),
                            "geometry": {width, height, input_w, input_h, resized_w, resized_h, pad_x, pad_y}}

Every file is written through a temporary file and an atomic rename, so a killed run leaves only complete
files and a rerun computes just the missing images. Pickles hold only plain data (loaded with the
restricted unpickler) and no timestamps, so the same work gives the same bytes. One file per image keeps
the cache shardable by image (several processes can fill one cache without coordination).
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradloc.config import config_hash
from gradloc.detections import atomic_write_bytes, safe_load_pickle
from gradloc.geometry import Geometry

CAM_FORMAT = "gradloc.cam/1"


@dataclass(frozen=True)
class CamEntry:
    """The cached result of one image: maps float32[C, h, w], scores float32[C] and its geometry."""

    image_id: str
    maps: np.ndarray
    scores: np.ndarray
    geometry: Geometry


class HeatmapCache:
    """A folder of per-image CAM results whose name is the hash of everything that produced them."""

    def __init__(self, cache_dir: str | Path, key_data: dict[str, Any]):
        self.key_data = key_data
        self.key = config_hash(key_data)
        self.root = Path(cache_dir) / "cams" / self.key

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
        return [image_id for image_id in image_ids if not self.has(image_id)]

    def put(self, image_id: str, maps: np.ndarray, scores: np.ndarray, geometry: Geometry, dtype: str) -> None:
        """Store one image's raw maps [C, h, w] (as ``dtype``), scores [C] and geometry, atomically."""
        if not (self.root / "key.json").is_file():
            atomic_write_bytes(self.root / "key.json", json.dumps(self.key_data, indent=2, sort_keys=True,
                                                                  default=str).encode())
        record = {
            "format": CAM_FORMAT,
            "image_id": image_id,
            "maps": np.ascontiguousarray(maps, dtype=np.dtype(dtype)),
            "scores": np.ascontiguousarray(scores, dtype=np.float32),
            "geometry": geometry.to_dict(),
        }
        atomic_write_bytes(self._path(image_id), pickle.dumps(record, protocol=4))

    def get(self, image_id: str) -> CamEntry:
        path = self._path(image_id)
        record = safe_load_pickle(path)
        if not isinstance(record, dict) or record.get("format") != CAM_FORMAT:
            raise ValueError(f"{path}: not a gradloc heatmap cache file; delete it and rerun `gradloc cams`")
        return CamEntry(
            image_id=record["image_id"],
            maps=np.asarray(record["maps"], dtype=np.float32),
            scores=np.asarray(record["scores"], dtype=np.float32),
            geometry=Geometry.from_dict(record["geometry"]),
        )

    def nbytes(self) -> int:
        return sum(path.stat().st_size for path in (self.root / "maps").glob("*.pkl"))
