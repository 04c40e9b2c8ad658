"""Pooled-features cache: the input of a network's final linear layer, one verified file per image.

The cams stage records these features in the same forward pass that makes the heatmaps; ``gradloc train``
reads them (its frozen-backbone feature extraction) and writes those it had to compute, so a head is trained
without a second pass over images whose features exist.

Layout (``<cache_dir>/features/<key>/``)::

    key.json               everything the key was computed from (:func:`features_key`): architecture,
                           sha256 of the backbone's weights (every parameter and buffer outside the final
                           linear layer), the preprocessing, the execution (memory format, precision),
                           gradloc version
    <image_id>.pkl         {"format": "gradloc.features/1", "image_id": str, "features": float32[F],
                            "batch": [image ids computed together with it, in order],
                            "source": {"size", "mtime_ns", "blake2b"} of the image file}

A file is used only when :meth:`FeatureCache.get` accepts it: the format, the image id, a finite float32
vector of the expected length, the recorded size and blake2b digest of the image equal to those of the
image file now (as for the heatmap cache), and the same batch-mates as the reader's own plan
(:func:`gradloc.cams.loader.plan_batches`). A network's outputs can differ in the last bits with the batch an
image is computed in, so this makes cached features the very bytes the reader would compute: a head trained
with a warm cache is the same file as one trained with an empty cache.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from gradloc import __version__
from gradloc.cams.cache import clean_tmp, same_content
from gradloc.core.files import atomic_write_bytes, safe_load_pickle
from gradloc.core.provenance import config_hash

logger = logging.getLogger(__name__)


FEATURES_FORMAT = "gradloc.features/1"


def features_key(arch: str, backbone_sha256: str, preprocessing: dict[str, Any],
                 execution: dict[str, str]) -> dict[str, Any]:
    """The key data of a features cache.

    Args:
        arch: registry name of the architecture.
        backbone_sha256: :func:`gradloc.models.checkpoints.backbone_digest` of the network.
        preprocessing: ``Preprocessing.to_dict()``.
        execution: ``Execution.key()`` (memory format, precision; empty at the defaults).
    """
    return {"arch": arch, "backbone_sha256": backbone_sha256, "preprocessing": dict(preprocessing), **execution,
            "gradloc": __version__}


class FeatureCache:
    """A folder of per-image pooled features named by the hash of :func:`features_key`."""

    def __init__(self, cache_dir: str | Path, key_data: dict[str, Any]) -> None:
        self.key_data = key_data
        self.key = config_hash(key_data)
        self.root = Path(cache_dir) / "features" / self.key

    def _path(self, image_id: str) -> Path:
        if not image_id or "/" in image_id or image_id.startswith("."):
            raise ValueError(f"image id {image_id!r} cannot be used as a cache file name")
        return self.root / f"{image_id}.pkl"

    def put(self, image_id: str, features: np.ndarray, source: dict[str, Any], batch: list[str]) -> None:
        """Store one image's features float32[F] with the fingerprint of its image file and the ids of the
        batch it was computed in, atomically."""
        if not (self.root / "key.json").is_file():
            atomic_write_bytes(self.root / "key.json", json.dumps(self.key_data, indent=2, sort_keys=True).encode())
        record = {"format": FEATURES_FORMAT, "image_id": image_id,
                  "features": np.ascontiguousarray(features, dtype=np.float32).reshape(-1), "batch": list(batch),
                  "source": source}
        atomic_write_bytes(self._path(image_id), pickle.dumps(record, protocol=4))

    def get(self, image_id: str, current: dict[str, Any], n_features: int, batch: list[str]) -> np.ndarray | None:
        """The cached features float32[n_features] of an image whose file now has the fingerprint ``current``
        (:func:`gradloc.datasets.voc.file_fingerprint`) and that the reader computes in ``batch``; None when
        there is no usable file (absent, made from other image bytes or in another batch, or malformed: logged)
        and the caller computes them."""
        path = self._path(image_id)
        if not path.is_file():
            return None
        try:
            record = safe_load_pickle(path)
        except ValueError as error:
            logger.warning("recomputing: %s", error)
            return None
        problem = _problem(record, image_id, n_features)
        if problem is not None:
            logger.warning("recomputing: %s: %s", path, problem)
            return None
        if not same_content(record["source"], current):
            logger.info("%s: its image changed since the features were cached: recomputing", path)
            return None
        if record["batch"] != list(batch):
            logger.debug("%s: computed in another batch: recomputing", path)
            return None
        return record["features"]

    def clean(self) -> None:
        """Remove the temporary files of interrupted writes (see :func:`gradloc.cams.cache.clean_tmp`)."""
        if self.root.is_dir():
            for path in clean_tmp(self.root):
                logger.info("removed %s, left by an interrupted write", path)


def _problem(record: Any, image_id: str, n_features: int) -> str | None:
    if not isinstance(record, dict) or record.get("format") != FEATURES_FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        return f"not a {FEATURES_FORMAT} file (found {found!r})"
    if record.get("image_id") != image_id:
        return f"holds the features of image {record.get('image_id')!r}, not {image_id!r}"
    if not isinstance(record.get("batch"), list) or "source" not in record:
        return "lacks its batch or source"
    features = record.get("features")
    if not isinstance(features, np.ndarray) or features.dtype != np.float32 or features.shape != (n_features,):
        found = (f"{features.dtype}{list(features.shape)}" if isinstance(features, np.ndarray)
                 else type(features).__name__)
        return f"features are {found}, expected float32[{n_features}]"
    if not np.isfinite(features).all():
        return "features hold NaN or infinite values"
    return None
