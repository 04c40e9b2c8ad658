"""The run folder ``<out>/<name>/``: its layout, readers and writers of its files, provenance, lock and swap.

Layout (see the README's *Files*)::

    .gradloc-run   manifest.json  config.yaml  images.json  gt.pkl  points.pkl  gt_known.pkl  image_scores.pkl
    scores.csv  scores.json  scores.md  localization.csv  coco.csv
    detections/thr_<τ>.pkl                  CAM boxes at τ (one file per threshold of the sweep)
    baselines/<name>.pkl                    threshold-free baselines (center, full)
    baselines/<name>/thr_<τ>.pkl            map baselines cut at τ (shuffled, blob)

Every reader goes through :func:`open_run` (a :class:`Run`); every writer through :func:`new_run` (a
:class:`RunWriter`) or :func:`update_run`. The folder is owned through :mod:`gradloc.core.folders`:

* **One run per folder, and only gradloc's.** A run is staged in ``<out>/.<name>.new`` (its marker
  ``.gradloc-run`` first) and swapped in whole when complete; it replaces only a folder holding that marker
  (or a run made before markers: a gradloc ``manifest.json``, see :func:`is_legacy_run`) or an empty one.
  A failed or interrupted run leaves the previous results intact; a crash inside the swap is repaired by the
  next :func:`open_run` or :func:`new_run`.
* **Whole updates.** ``gradloc score --save`` stages its four files and the manifest together
  (:func:`update_run`), so a full disk leaves the old set, never a mix.
* **A lock per folder.** ``<out>/.<name>.lock`` holds the writer's pid and host; a second writer refuses with
  one line. The lock of a dead process on this host is taken over with a warning.
* **Checked reads.** Every file is checked when read: pickles through :mod:`gradloc.core.formats`, the
  manifest against :data:`MANIFEST_TYPES`, the score tables for their columns and rows.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from gradloc.core import folders
from gradloc.core.files import atomic_write_bytes, safe_load_pickle, save_pickle, to_plain
from gradloc.core.formats import Detections, GroundTruth, load_detections, load_ground_truth, read_array, read_names
from gradloc.core.names import check_name, excerpt
from gradloc.core.provenance import git_commit, package_versions
from gradloc.core.ranges import threshold_label
from gradloc.scoring.tables import save_scores, selected_tau

logger = logging.getLogger(__name__)


GT_FILE = "gt.pkl"


POINTS_FILE = "points.pkl"


MANIFEST_FILE = "manifest.json"


CONFIG_FILE = "config.yaml"


LOCALIZATION_FILE = "localization.csv"


COCO_FILE = "coco.csv"


SCORES_CSV = "scores.csv"


DETECTIONS_DIR = "detections"


BASELINES_DIR = "baselines"




POINTS_FORMAT = "gradloc.points/1"


GT_KNOWN_FILE = "gt_known.pkl"
IMAGE_SCORES_FILE = "image_scores.pkl"
IMAGE_SCORES_FORMAT = "gradloc.image_scores/1"


GT_KNOWN_FORMAT = "gradloc.gt_known/1"


SCORE_COLUMNS = ("threshold", "threshold_mode", "iou", "metric", "class", "ap", "recall", "n_gt", "source")


IMAGES_FILE = "images.json"


IMAGES_FORMAT = "gradloc.images/1"


RUN_KIND = "run"  # the marker .gradloc-run (gradloc.core.folders)


def threshold_filename(threshold: float) -> str:
    """Stable, readable file name of a per-threshold output, e.g. ``0.02 -> "thr_0.020.pkl"``.

    Raises:
        ValueError: if the threshold is outside [0, 1] or needs more than 3 decimals (:mod:`gradloc.core.ranges`).
    """
    return f"thr_{threshold_label(threshold)}.pkl"


def _listed_thresholds(folder: Path) -> list[float]:
    """τ of the ``thr_<τ>.pkl`` files of a folder, ascending (other names are ignored)."""
    found = []
    for path in folder.glob("thr_*.pkl") if folder.is_dir() else ():
        try:
            tau = float(path.stem.removeprefix("thr_"))
        except ValueError:
            continue
        if 0.0 <= tau <= 1.0 and path.name == threshold_filename(round(tau, 3)):
            found.append(round(tau, 3))
    return sorted(found)


def manifest_record(run_dir: str | Path, config: Mapping[str, Any], config_as_given: Mapping[str, Any],
                    config_hash: str, cache_key: str | None, cache_dir: str | None, seconds: Mapping[str, float],
                    skipped: Sequence[dict[str, str]] = ()) -> dict[str, Any]:
    """The ``manifest.json`` of the run folder ``run_dir``: what it was (configs, hash, cache, versions, commit),
    how long each stage took, the items skipped with ``data.on_error: skip`` (with the reason), and where the
    files it needs are (:data:`RUN_PATHS`, see :func:`portable_paths`)."""
    manifest = {
        "config": to_plain(config),
        "config_as_given": to_plain(config_as_given),
        "config_hash": config_hash,
        "cache_key": cache_key,
        "cache_dir": cache_dir,
        "versions": package_versions(),
        "git_commit": git_commit(),
        "seconds_per_stage": {k: round(v, 2) for k, v in seconds.items()},
        "skipped": [dict(item) for item in skipped],
    }
    return portable_paths(manifest, run_dir)


# Manifest entries holding a path a run needs after it was made (dotted keys): the heatmap cache folder
# ``<cache_dir>/cams/<key>`` (show), the cache root, the VOCdevkit folder (images, for show) and the checkpoint
# (show --guided). ``config_as_given`` keeps the paths as typed (a record, never read back).
RUN_PATHS = ("cache_dir", "config.cache_dir", "config.data.voc_root", "config.model.checkpoint")


PATHS_KEY = "paths"


def _get(data: Mapping[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, Mapping):
            return None
        data = data.get(part)
    return data


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        data = data[part]
    data[last] = value


def portable_paths(manifest: Mapping[str, Any], run_dir: str | Path) -> dict[str, Any]:
    """The manifest with every :data:`RUN_PATHS` entry made absolute (paths are typed relative to the working
    directory; the manifest never keeps them so), and recorded under ``paths`` both relative to the run folder
    and absolute: ``{"config.data.voc_root": {"relative_to_run": "../../data/VOCdevkit", "absolute": "/..."}}``.

    :meth:`Run.manifest` resolves them back (:func:`resolve_paths`), so a run folder copied together with its
    cache and data works anywhere, and a run folder copied alone still finds them at their absolute place."""
    manifest = to_plain(manifest)
    run_dir = Path(run_dir).resolve()
    recorded = {}
    for dotted in RUN_PATHS:
        value = _get(manifest, dotted)
        if not isinstance(value, str) or not value:
            continue
        absolute = Path(value).resolve()
        recorded[dotted] = {"relative_to_run": os.path.relpath(absolute, run_dir), "absolute": str(absolute)}
        _set(manifest, dotted, str(absolute))
    manifest[PATHS_KEY] = recorded
    return manifest


def resolve_paths(manifest: Mapping[str, Any], run_dir: str | Path) -> dict[str, Any]:
    """The manifest of run folder ``run_dir`` with the paths of its ``paths`` record resolved: the path relative
    to the run folder when it exists (a copied folder with its cache beside it), else the absolute one when
    it exists, else the run-relative one (so that errors name where the file was expected). Manifests written
    before ``paths`` existed hold paths relative to the working directory of their run; they are returned
    unchanged."""
    manifest = to_plain(manifest)
    run_dir = Path(run_dir).resolve()
    for dotted, where in (manifest.get(PATHS_KEY) or {}).items():
        if dotted not in RUN_PATHS or not isinstance(where, Mapping) or _get(manifest, dotted) is None:
            continue
        relative = Path(os.path.normpath(run_dir / str(where.get("relative_to_run", ""))))
        absolute = Path(str(where.get("absolute", "")))
        chosen = relative if relative.exists() or not absolute.exists() else absolute
        _set(manifest, dotted, str(chosen))
    return manifest


LOCALIZATION_COLUMNS = ("metric", "threshold", "class", "value", "n")


def _read_table(path: Path, columns: Sequence[str], numeric: Sequence[str], run_dir: Path) -> pd.DataFrame:
    """A score table of a run folder, checked: the documented columns, at least one row, numbers where numbers
    belong.

    Raises:
        FileNotFoundError: no file. ValueError: naming the file and what is wrong.
    """
    again = f"rescore with `gradloc score {run_dir} --save`"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; score the run first with `gradloc score {run_dir} --save`")
    try:
        rows = pd.read_csv(path, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{path}: unreadable CSV ({str(error)[:200]}); {again}") from None
    missing = [column for column in columns if column not in rows.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; {again}")
    if rows.empty:
        raise ValueError(f"{path}: has a header but no rows; {again}")
    for column in numeric:
        if not pd.api.types.is_numeric_dtype(rows[column]) or pd.api.types.is_bool_dtype(rows[column]):
            bad = next((v for v in rows[column] if not isinstance(v, int | float) or isinstance(v, bool)), None)
            raise ValueError(f"{path}: column {column!r} holds {excerpt(bad)}, not a number; {again}")
    return rows


def read_pairs(path: Path, expected: str, extra: Mapping[str, str]) -> dict[str, Any]:
    """A ``points.pkl`` / ``gt_known.pkl`` record: per (image, class) pair ``image_index`` and ``labels``
    (indices into ``image_ids`` and ``classes``) and ``points`` float64[P, 2], plus the ``extra`` fields
    (name -> :func:`gradloc.core.formats.read_array` kind), every array checked.

    Raises:
        ValueError: not that format, or a field of the wrong type, shape or range (naming the file).
    """
    data = safe_load_pickle(path)
    if not isinstance(data, dict) or data.get("format") != expected:
        raise ValueError(f"{path}: not a {expected} file")
    source = str(path)
    missing = [key for key in ("classes", "image_ids", "image_index", "labels", "points", *extra) if key not in data]
    if missing:
        raise ValueError(f"{path}: missing field(s) {', '.join(missing)} of format {expected!r}")
    record = {**data, "classes": read_names(data, "classes", source),
              "image_ids": read_names(data, "image_ids", source),
              "image_index": read_array(data, "image_index", "index", source),
              "labels": read_array(data, "labels", "index", source),
              "points": read_array(data, "points", "number", source, columns=2),
              **{key: read_array(data, key, kind, source) for key, kind in extra.items()}}
    n = len(record["labels"])
    for key, limit in (("image_index", len(record["image_ids"])), ("labels", len(record["classes"]))):
        values = record[key]
        if len(values) != n or (n and (values.min() < 0 or values.max() >= limit)):
            raise ValueError(f"{path}: field {key!r} has {len(values)} values in [{values.min() if n else 0}, "
                             f"{values.max() if n else 0}], expected {n} in [0, {limit})")
    if len(record["points"]) != n or not np.isfinite(record["points"]).all():
        raise ValueError(f"{path}: field 'points' must hold {n} finite (x, y) rows")
    return record


def _check_hits(path: Path, record: dict[str, Any], key: str, grid: str) -> None:
    """``record[key]`` must be bool[pairs, len(record[grid]), len(record["ious"])] (a ``gt_known.pkl`` field)."""
    hits = record[key]
    expected = (len(record["labels"]), len(record[grid]), len(record["ious"]))
    if not isinstance(hits, np.ndarray) or hits.dtype != np.bool_ or hits.shape != expected:
        found = f"{hits.dtype}{list(hits.shape)}" if isinstance(hits, np.ndarray) else type(hits).__name__
        raise ValueError(f"{path}: field {key!r} is {found}, expected bool{list(expected)}")


# The manifest's fields and the types a reader may rely on (dotted keys; absent keys are allowed).
MANIFEST_TYPES: dict[str, tuple[type, ...]] = {
    "config": (dict,), "config_as_given": (dict,), "config_hash": (str,), "cache_key": (str, type(None)),
    "cache_dir": (str, type(None)), "versions": (dict,), "git_commit": (str, type(None)),
    "seconds_per_stage": (dict,), "skipped": (list,), "paths": (dict,), "rescored_scores": (dict,),
    "distributed": (dict,),
    **{f"config.{section}": (dict,) for section in ("data", "demo", "model", "train", "cams", "boxes", "score")},
    **{f"config.{key}": (str, type(None)) for key in ("cache_dir", "data.voc_root", "model.checkpoint")},
}


# Fields that hold several items, and the type of each item.
MANIFEST_ITEMS: dict[str, tuple[type, ...]] = {"seconds_per_stage": (int, float), "skipped": (dict,),
                                               "paths": (dict,), "versions": (str, type(None))}


_ABSENT = object()


def check_manifest(manifest: Any, path: Path) -> None:
    """Check a loaded ``manifest.json`` against :data:`MANIFEST_TYPES` and :data:`MANIFEST_ITEMS`.

    Raises:
        ValueError: naming the file, the field, what it holds and what it should.
    """
    again = "rerun `gradloc run` to rewrite it"
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: holds a {type(manifest).__name__}, expected a mapping; {again}")
    if not isinstance(manifest.get("config"), dict):
        raise ValueError(f"{path}: has no 'config' mapping; {again}")
    for dotted, types in MANIFEST_TYPES.items():
        value: Any = manifest
        for part in dotted.split("."):
            value = value.get(part, _ABSENT) if isinstance(value, dict) else _ABSENT
        if value is not _ABSENT and not isinstance(value, types):
            expected = " or ".join("null" if t is type(None) else {"dict": "a mapping"}.get(t.__name__, t.__name__)
                                   for t in types)
            raise ValueError(f"{path}: field {dotted!r} is {excerpt(value)}, expected {expected}; {again}")
    for key, types in MANIFEST_ITEMS.items():
        items = manifest.get(key)
        values = items.values() if isinstance(items, dict) else items or ()
        bad = next((item for item in values if not isinstance(item, types) or isinstance(item, bool)), _ABSENT)
        if bad is not _ABSENT:
            raise ValueError(f"{path}: field {key!r} holds {excerpt(bad)}; {again}")



class Run:
    """A run folder, read lazily. Use :func:`open_run` (which also repairs an interrupted swap)."""

    def __init__(self, path: str | Path, hint: str = "") -> None:
        self.path = Path(path)
        self.hint = hint  # appended to "not found" errors (e.g. how to do without this file)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    def manifest_or_none(self) -> dict[str, Any] | None:
        """The checked manifest, or None when the folder has none (made by ``gradloc boxes``)."""
        return self.manifest if (self.path / MANIFEST_FILE).is_file() else None

    @cached_property
    def manifest(self) -> dict[str, Any]:
        """The checked ``manifest.json`` with its paths resolved for this folder's place (:func:`resolve_paths`):
        ``cache_dir``, ``config.cache_dir``, ``config.data.voc_root``, ``config.model.checkpoint`` can be used
        from any working directory."""
        return resolve_paths(self.stored_manifest, self.path)

    @cached_property
    def stored_manifest(self) -> dict[str, Any]:
        """The checked ``manifest.json`` as stored (what :meth:`RunWriter.set_manifest` rewrites).

        Raises:
            FileNotFoundError: no manifest. ValueError: not JSON or no ``config`` mapping.
        """
        path = self.path / MANIFEST_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found; is {self.path} a folder made by `gradloc run`?{self.hint}")
        try:
            manifest = json.loads(path.read_text())
        except (ValueError, RecursionError) as error:
            raise ValueError(f"{path}: not valid JSON ({str(error)[:200]})") from None
        check_manifest(manifest, path)
        return manifest

    @cached_property
    def images(self) -> dict[str, dict[str, Any]] | None:
        """``images.json``: the fingerprint ``{"size", "blake2b"}`` of each image the run used, by id; None for
        runs made before the file existed.

        Raises:
            ValueError: a damaged file (named).
        """
        path = self.path / IMAGES_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (ValueError, RecursionError) as error:
            raise ValueError(f"{path}: not valid JSON ({str(error)[:200]})") from None
        images = data.get("images") if isinstance(data, dict) and data.get("format") == IMAGES_FORMAT else None
        if not isinstance(images, dict) or not all(
                isinstance(item, dict) and isinstance(item.get("size"), int) and isinstance(item.get("blake2b"), str)
                for item in images.values()):
            raise ValueError(f"{path}: not a {IMAGES_FORMAT} file ({{image_id: {{size, blake2b}}}}); rerun "
                             "`gradloc run` to rewrite it")
        return images

    @cached_property
    def gt(self) -> GroundTruth:
        path = self.path / GT_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no ground truth; is {self.path} a gradloc run folder "
                                    "(made by `gradloc run` or `gradloc boxes`)?")
        return load_ground_truth(path)

    @property
    def thresholds(self) -> list[float]:
        """τ of the CAM detections files, ascending."""
        return _listed_thresholds(self.path / DETECTIONS_DIR)

    def detections_path(self, threshold: float) -> Path:
        """``detections/thr_<τ>.pkl``; FileNotFoundError listing the run's thresholds when it is missing."""
        path = self.path / DETECTIONS_DIR / threshold_filename(threshold)
        if not path.is_file():
            found = ", ".join(f"{t:.3f}" for t in self.thresholds) or "none"
            raise FileNotFoundError(f"{path}: no detections at threshold {threshold:g}; this run has "
                                    f"thresholds {found}")
        return path

    def detections_at(self, threshold: float) -> Detections:
        return load_detections(self.detections_path(threshold))

    def map_baselines(self) -> dict[str, list[float]]:
        """Map baselines (``baselines/<name>/thr_<τ>.pkl``) by name, each with its τ ascending."""
        folder = self.path / BASELINES_DIR
        names = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        return {name: _listed_thresholds(folder / name) for name in names}

    def baselines_at(self, threshold: float) -> dict[str, Detections]:
        """Every baseline of the run that goes with its CAM detections at τ: the threshold-free ones and the map
        baselines cut at τ, by name."""
        found = dict(self.baselines)
        for name in self.map_baselines():
            dets = self.map_baseline_at(name, threshold)
            if dets is not None:
                found[name] = dets
        return found

    def map_baseline_at(self, name: str, threshold: float) -> Detections | None:
        """Map baseline ``name`` at τ, or None when the run has none."""
        path = self.path / BASELINES_DIR / name / threshold_filename(threshold)
        return load_detections(path) if path.is_file() else None

    @property
    def baselines(self) -> dict[str, Detections]:
        """Threshold-free baselines by name (``center``, ``full``), in name order."""
        folder = self.path / BASELINES_DIR
        paths = sorted(folder.glob("*.pkl")) if folder.is_dir() else []
        return {path.stem: load_detections(path) for path in paths}

    @property
    def points(self) -> dict[str, Any]:
        """``points.pkl`` (``gradloc.points/1``), its arrays checked (:func:`read_pairs`)."""
        return read_pairs(self.path / POINTS_FILE, POINTS_FORMAT, {"scores": "number"})

    @property
    def image_scores(self) -> dict[str, Any]:
        """``image_scores.pkl`` (``gradloc.image_scores/1``): every image's class probabilities (the classifier's
        outputs behind the confidences), float64[n_images, C] under ``probabilities``."""
        path = self.path / IMAGE_SCORES_FILE
        data = safe_load_pickle(path)
        if not isinstance(data, dict) or data.get("format") != IMAGE_SCORES_FORMAT:
            raise ValueError(f"{path}: not a {IMAGE_SCORES_FORMAT} file")
        return data

    @property
    def selection(self) -> tuple[float | None, str | None]:
        """(the run's selected τ, the split it was chosen on) from its config (``boxes.selected_threshold``,
        ``boxes.selected_on``, stored in every detections file's meta); (None, None) for a run without one."""
        if not self.thresholds:
            return None, None
        meta = self.detections_at(self.thresholds[0]).meta
        return selected_tau(meta), meta.get("selected_on")

    def threshold_or_selected(self, threshold: float | None) -> float:
        """``threshold``, or the run's selected τ when None (``boxes.selected_threshold`` of its config).

        Raises:
            ValueError: None given and the run has no selected τ; the message lists the run's thresholds.
        """
        if threshold is not None:
            return threshold
        if not self.thresholds:
            raise FileNotFoundError(f"{self.path}: no CAM detections files; run `gradloc boxes`")
        selected, _ = self.selection
        if selected is None:
            raise ValueError(f"{self.path}: the run has no selected tau (config boxes.selected_threshold); give "
                             f"--threshold, one of {', '.join(f'{t:g}' for t in self.thresholds)}")
        return selected

    @property
    def gt_known(self) -> dict[str, Any]:
        """``gt_known.pkl`` (``gradloc.gt_known/1``): per (image, GT class) pair the map's peak (``points``) and
        the MaxBoxAccV2 box hits bool[P, T, D] over the τ values ``grid`` and the IoUs ``ious``: ``hits`` in
        gradloc's convention (:mod:`gradloc.scoring.wsol`) and, in runs whose boxes stage had OpenCV,
        ``hits_exact`` over ``grid_exact`` in wsolevaluation's exact protocol
        (:mod:`gradloc.scoring.wsol_exact`; absent otherwise). See :func:`gradloc.run.boxes.run_boxes`; the
        arrays are checked."""
        path = self.path / GT_KNOWN_FILE
        record = read_pairs(path, GT_KNOWN_FORMAT, {"grid": "number", "ious": "number"})
        _check_hits(path, record, "hits", "grid")
        if "hits_exact" in record:
            if "grid_exact" not in record:
                raise ValueError(f"{path}: field 'hits_exact' without its 'grid_exact'; rerun `gradloc boxes`")
            record["grid_exact"] = read_array(record, "grid_exact", "number", str(path))
            _check_hits(path, record, "hits_exact", "grid_exact")
        return record

    @property
    def localization(self) -> pd.DataFrame:
        """``localization.csv``: the WSOL rows (metric, threshold, class, value, n) of
        :func:`gradloc.run.score.localization_scores`.

        Raises:
            FileNotFoundError: no file. ValueError: unreadable, or without the documented columns and rows.
        """
        return _read_table(self.path / LOCALIZATION_FILE, LOCALIZATION_COLUMNS, ("threshold", "value", "n"),
                           self.path)

    @property
    def scores_path(self) -> Path:
        return self.path / SCORES_CSV

    @property
    def scores(self) -> pd.DataFrame:
        """The flat score rows (``scores.csv``, see :mod:`gradloc.scoring.tables`).

        Raises:
            FileNotFoundError: no scores.csv. ValueError: unreadable, or without the documented columns and rows.
        """
        return _read_table(self.scores_path, SCORE_COLUMNS, ("threshold", "iou", "ap", "recall", "n_gt"), self.path)

    def files(self) -> list[Path]:
        """Every file of the folder, relative to it, sorted."""
        return sorted(p.relative_to(self.path) for p in self.path.rglob("*") if p.is_file())


def is_legacy_run(path: Path) -> bool:
    """A run folder made before run folders carried the ``.gradloc-run`` marker: its ``manifest.json`` is a
    gradloc manifest (a dict with a ``config`` mapping and a ``config_hash``)."""
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(manifest, dict) and isinstance(manifest.get("config"), dict) \
        and isinstance(manifest.get("config_hash"), str)


def open_run(path: str | Path, hint: str = "") -> Run:
    """An existing run folder (after repairing a swap interrupted by a crash, unless a writer holds it).

    ``hint`` is appended to the error of a missing manifest (e.g. how to do without one).

    Raises:
        FileNotFoundError: no such folder.
    """
    path = Path(path)
    if not folders.lock_path(path).exists():
        folders.repair(path, RUN_KIND, is_legacy_run)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: run folder not found; give a folder made by `gradloc run`")
    return Run(path, hint)


class RunWriter:
    """The staging folder of a run being written (``<out>/.<name>.new``); see :func:`new_run`."""

    def __init__(self, target: Path, staging: Path) -> None:
        self.target = target
        self.path = staging

    @property
    def run(self) -> Run:
        """The staged files read back (for scoring before the swap)."""
        return Run(self.path)

    def write_gt(self, gt: GroundTruth) -> None:
        save_pickle(gt, self.path / GT_FILE)

    def write_images(self, sources: Mapping[str, Mapping[str, Any]]) -> None:
        """``images.json``: the content fingerprint (size, blake2b) of every image the run used, by id, which
        every later read of the run's heatmaps and images is checked against."""
        images = {image_id: {"size": int(source["size"]), "blake2b": str(source["blake2b"])}
                  for image_id, source in sources.items()}
        atomic_write_bytes(self.path / IMAGES_FILE, json.dumps({"format": IMAGES_FORMAT, "images": images},
                                                               indent=1).encode())

    def write_detections(self, dets: Detections) -> None:
        """CAM boxes at ``dets.threshold``."""
        save_pickle(dets, self.path / DETECTIONS_DIR / threshold_filename(dets.threshold))

    def write_map_baseline(self, name: str, dets: Detections) -> None:
        """Map baseline ``name`` at ``dets.threshold``."""
        save_pickle(dets, self.path / BASELINES_DIR / name / threshold_filename(dets.threshold))

    def write_baseline(self, name: str, dets: Detections) -> None:
        """A threshold-free baseline (``center``, ``full``)."""
        save_pickle(dets, self.path / BASELINES_DIR / f"{check_name(name, 'baseline name')}.pkl")

    def write_points(self, record: Mapping[str, Any]) -> None:
        save_pickle({"format": POINTS_FORMAT, **record}, self.path / POINTS_FILE)

    def write_gt_known(self, record: Mapping[str, Any]) -> None:
        save_pickle({"format": GT_KNOWN_FORMAT, **record}, self.path / GT_KNOWN_FILE)

    def write_image_scores(self, record: Mapping[str, Any]) -> None:
        save_pickle({"format": IMAGE_SCORES_FORMAT, **record}, self.path / IMAGE_SCORES_FILE)

    def write_config(self, config: Mapping[str, Any]) -> None:
        atomic_write_bytes(self.path / CONFIG_FILE, yaml.safe_dump(dict(config), sort_keys=False).encode())

    def write_manifest(self, manifest: Mapping[str, Any]) -> None:
        atomic_write_bytes(self.path / MANIFEST_FILE, json.dumps(manifest, indent=2, default=str).encode())

    def write_scores(self, rows: pd.DataFrame, meta: Mapping[str, Any], localization: pd.DataFrame,
                     coco: pd.DataFrame | None = None, headline: pd.DataFrame | None = None) -> list[Path]:
        """``scores.csv/json/md`` (with the ``headline`` rows of ``gradloc.run.score.headline_rows``),
        ``localization.csv`` and, when given, the COCO-style rows ``coco.csv``; returns them (paths inside the
        staged folder)."""
        written = save_scores(rows, self.path, meta, headline)
        tables = {LOCALIZATION_FILE: localization, **({COCO_FILE: coco} if coco is not None else {})}
        for name, table in tables.items():
            atomic_write_bytes(self.path / name, table.to_csv(index=False).encode())
        return [*written, *(self.path / name for name in tables)]

    def set_manifest(self, key: str, value: Any) -> bool:
        """Set ``key`` of the staged ``manifest.json``; False when the run has none (made by ``gradloc boxes``)."""
        if not (self.path / MANIFEST_FILE).is_file():
            return False
        manifest = self.run.stored_manifest
        manifest[key] = value
        self.write_manifest(manifest)
        return True


def check_writable(target: str | Path) -> None:
    """Fail before any work when a run cannot be written to ``target``: an unusable name, a parent that cannot
    be made or written, another live writer, or a folder there (or at a staging name) gradloc did not make.

    Raises:
        ValueError: the name. OSError: naming the folder. LockedError: naming the holder and the lock file.
        ForeignFolderError: naming the folder that is in the way.
    """
    folders.check_writable(Path(target), RUN_KIND, is_legacy_run, what="run name")


@contextmanager
def new_run(target: str | Path) -> Iterator[RunWriter]:
    """Write a run into ``target`` as a whole (:func:`gradloc.core.folders.staged`): lock it, stage the files in
    ``<out>/.<name>.new``, and swap them in when the block ends without an error or a SIGINT. On an error (or
    Ctrl-C) the staging folder is deleted and ``target`` keeps the previous run; the lock is always released.

    Raises:
        LockedError: another live process is writing ``target``. OSError: unwritable output folder.
        ForeignFolderError: ``target`` exists and is not a run folder gradloc made.
    """
    target = Path(target)
    with folders.staged(target, RUN_KIND, is_legacy_run, what="run name") as staging:
        yield RunWriter(target, staging)


@contextmanager
def update_run(target: str | Path) -> Iterator[RunWriter]:
    """Update files of a finished run as a whole: the run's files are hard-linked into a staging folder, the
    block replaces some of them (through the writer), and the folder is swapped in when the block ends without
    an error or a SIGINT; otherwise the run is left exactly as it was.

    Raises:
        FileNotFoundError: no run folder at ``target``. LockedError, OSError, ForeignFolderError: as
            :func:`new_run`.
    """
    target = Path(target)
    with folders.staged(target, RUN_KIND, is_legacy_run, update=True, what="run name") as staging:
        yield RunWriter(target, staging)
