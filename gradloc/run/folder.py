"""The run folder ``<out>/<name>/``: its layout, readers and writers of its files, provenance, lock and swap.

Layout (see the README's *Files*)::

    manifest.json  config.yaml  gt.pkl  points.pkl  scores.csv  scores.json  scores.md  localization.csv  coco.csv
    detections/thr_<τ>.pkl                  CAM boxes at τ (one file per threshold of the sweep)
    baselines/<name>.pkl                    threshold-free baselines (center, full)
    baselines/<name>/thr_<τ>.pkl            map baselines cut at τ (shuffled, blob)

Every reader goes through :func:`open_run` (a :class:`Run`); every writer through :func:`new_run` (a
:class:`RunWriter`). Reliability:

* **One run per folder.** A run is written into the hidden sibling ``<out>/.<name>.new`` and swapped in only
  when complete: ``.new`` is renamed ``.<name>.ready`` (complete), the old folder ``.<name>.old``, ``.ready``
  becomes ``<name>``, ``.old`` is deleted. A failed or interrupted run leaves the previous results intact; a
  crash inside the swap is repaired by the next :func:`open_run` or :func:`new_run` (``.ready`` rolls forward,
  a lone ``.old`` rolls back, leftover ``.old`` / ``.new`` are deleted).
* **A lock per folder.** ``<out>/.<name>.lock`` holds the writer's pid and host; a second writer refuses with
  one line. The lock of a dead process on this host is taken over with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from gradloc.core.files import atomic_write_bytes, pid_alive, safe_load_pickle, save_pickle, temporary_name, to_plain
from gradloc.core.formats import Detections, GroundTruth, load_detections, load_ground_truth
from gradloc.core.provenance import git_commit, package_versions
from gradloc.core.ranges import threshold_label
from gradloc.scoring.tables import save_scores

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


class RunLockedError(OSError):
    """Another live process is writing the same run folder (an OSError, like EBUSY: the CLI prints one line)."""


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
        """The checked ``manifest.json`` as stored (what :func:`update_manifest` rewrites).

        Raises:
            FileNotFoundError: no manifest. ValueError: not JSON or no ``config`` mapping.
        """
        path = self.path / MANIFEST_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found; is {self.path} a folder made by `gradloc run`?{self.hint}")
        try:
            manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("config"), dict):
            raise ValueError(f"{path}: has no 'config' mapping; rerun `gradloc run` to rewrite it")
        return manifest

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
        """``points.pkl`` (``gradloc.points/1``)."""
        path = self.path / POINTS_FILE
        data = safe_load_pickle(path)
        if not isinstance(data, dict) or data.get("format") != POINTS_FORMAT:
            raise ValueError(f"{path}: not a {POINTS_FORMAT} file")
        return data

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
    def gt_known(self) -> dict[str, Any]:
        """``gt_known.pkl`` (``gradloc.gt_known/1``): per (image, GT class) pair the map's peak and the
        wsolevaluation box hits (see :func:`gradloc.run.boxes.run_boxes`)."""
        path = self.path / GT_KNOWN_FILE
        data = safe_load_pickle(path)
        if not isinstance(data, dict) or data.get("format") != GT_KNOWN_FORMAT:
            raise ValueError(f"{path}: not a {GT_KNOWN_FORMAT} file")
        return data

    @property
    def localization(self) -> pd.DataFrame:
        """``localization.csv``: the WSOL rows (metric, threshold, class, value, n) of
        :func:`gradloc.run.score.localization_scores`."""
        path = self.path / LOCALIZATION_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found; score the run first with `gradloc score {self.path} --save`")
        return pd.read_csv(path)

    @property
    def scores_path(self) -> Path:
        return self.path / SCORES_CSV

    @property
    def scores(self) -> pd.DataFrame:
        """The flat score rows (``scores.csv``, see :mod:`gradloc.scoring.tables`).

        Raises:
            FileNotFoundError: no scores.csv. ValueError: unreadable or without the documented columns.
        """
        path = self.scores_path
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found; score the run first with `gradloc score {self.path} --save`")
        try:
            rows = pd.read_csv(path, keep_default_na=False, na_values=[""])
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: unreadable CSV ({error})") from None
        missing = [column for column in SCORE_COLUMNS if column not in rows.columns]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; "
                             f"rescore with `gradloc score {self.path} --save`")
        return rows

    def files(self) -> list[Path]:
        """Every file of the folder, relative to it, sorted."""
        return sorted(p.relative_to(self.path) for p in self.path.rglob("*") if p.is_file())


def open_run(path: str | Path, hint: str = "") -> Run:
    """An existing run folder (after repairing a swap interrupted by a crash, unless a writer holds it).

    ``hint`` is appended to the error of a missing manifest (e.g. how to do without one).

    Raises:
        FileNotFoundError: no such folder.
    """
    path = Path(path)
    if not _lock_path(path).exists():
        _repair(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: run folder not found; give a folder made by `gradloc run`")
    return Run(path, hint)


def _sibling(target: Path, suffix: str) -> Path:
    return target.with_name(f".{target.name}.{suffix}")


def _lock_path(target: Path) -> Path:
    return _sibling(target, "lock")


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

    def write_detections(self, dets: Detections) -> None:
        """CAM boxes at ``dets.threshold``."""
        save_pickle(dets, self.path / DETECTIONS_DIR / threshold_filename(dets.threshold))

    def write_map_baseline(self, name: str, dets: Detections) -> None:
        """Map baseline ``name`` at ``dets.threshold``."""
        save_pickle(dets, self.path / BASELINES_DIR / name / threshold_filename(dets.threshold))

    def write_baseline(self, name: str, dets: Detections) -> None:
        """A threshold-free baseline (``center``, ``full``)."""
        save_pickle(dets, self.path / BASELINES_DIR / f"{name}.pkl")

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


def write_scores(folder: str | Path, rows: pd.DataFrame, meta: Mapping[str, Any],
                 localization: pd.DataFrame, coco: pd.DataFrame | None = None,
                 headline: pd.DataFrame | None = None) -> list[Path]:
    """``scores.csv/json/md`` (with the ``headline`` rows of ``gradloc.run.score.headline_rows``),
    ``localization.csv`` and, when given, the COCO-style rows ``coco.csv`` of a run folder (each file
    atomically); returns them."""

    written = save_scores(rows, Path(folder), meta, headline)
    tables = {LOCALIZATION_FILE: localization, **({COCO_FILE: coco} if coco is not None else {})}
    for name, table in tables.items():
        atomic_write_bytes(Path(folder) / name, table.to_csv(index=False).encode())
    return [*written, *(Path(folder) / name for name in tables)]


def update_manifest(folder: str | Path, key: str, value: Any) -> bool:
    """Set ``key`` of a finished run's ``manifest.json`` (atomically, holding the run's lock).

    Returns:
        False when the folder has no manifest, True when it was updated.
    """
    run = open_run(folder)
    with locked(run.path):
        if not (run.path / MANIFEST_FILE).is_file():
            return False
        manifest = run.stored_manifest
        manifest[key] = value
        atomic_write_bytes(run.path / MANIFEST_FILE, json.dumps(manifest, indent=2, default=str).encode())
    return True


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return holder if isinstance(holder, dict) else None


def _is_stale(holder: dict[str, Any] | None) -> bool:
    """A lock of a dead process on this host (the only case a lock can be judged stale)."""
    if holder is None or holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    return isinstance(pid, int) and pid != os.getpid() and not pid_alive(pid)


def _unwritable(folder: Path, error: OSError) -> OSError:
    return OSError(f"{folder}: output folder is not writable ({error.strerror or error}); choose another --out")


def _acquire(target: Path) -> Path:
    """Create the lock file atomically (write aside, hard-link into place); take over a stale one.

    Raises:
        RunLockedError: held by a live process (or by one this host cannot check).
        OSError: the output folder cannot be made or written.
    """
    lock = _lock_path(target)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_name(lock)
        atomic_write_bytes(tmp, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
    except OSError as error:
        raise _unwritable(lock.parent, error) from None
    try:
        for _ in range(2):
            try:
                os.link(tmp, lock)
                return lock
            except FileExistsError:
                holder = _read_lock(lock)
                if not _is_stale(holder):
                    who = (f"pid {holder.get('pid')} on host {holder.get('host')}" if holder
                           else "an unreadable lock")
                    raise RunLockedError(f"{target}: another gradloc run is writing this folder ({who}, lock file "
                                         f"{lock}); wait for it to finish, or delete the lock file if that "
                                         "process is gone") from None
                logger.warning("%s: taking over the lock of pid %s on %s, which is no longer running", lock,
                               holder.get("pid"), holder.get("host"))
                lock.unlink(missing_ok=True)
        raise RunLockedError(f"{target}: another gradloc run took the lock file {lock} first; try again")
    except RunLockedError:
        raise
    except OSError as error:
        raise _unwritable(lock.parent, error) from None
    finally:
        tmp.unlink(missing_ok=True)


def _release(lock: Path) -> None:
    holder = _read_lock(lock)
    if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        lock.unlink(missing_ok=True)


def _rmtree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _repair(target: Path) -> None:
    """Finish or undo a swap interrupted by a crash (caller holds the lock, or no one does)."""
    ready, old, new = _sibling(target, "ready"), _sibling(target, "old"), _sibling(target, "new")
    if ready.is_dir():
        if target.exists():
            if old.exists():
                _rmtree(old)
            os.rename(target, old)
        os.rename(ready, target)
        logger.warning("%s: completed the swap of a run interrupted after it had finished", target)
    if old.exists():
        if target.exists():
            _rmtree(old)
        else:
            os.rename(old, target)
            logger.warning("%s: restored the previous results after an interrupted swap", target)
    if new.exists():
        _rmtree(new)


def _swap(staging: Path, target: Path) -> None:
    ready, old = _sibling(target, "ready"), _sibling(target, "old")
    os.rename(staging, ready)  # from here the new run is complete: a crash rolls forward
    if target.exists():
        os.rename(target, old)
    os.rename(ready, target)
    if old.exists():
        _rmtree(old)


def check_writable(target: str | Path) -> None:
    """Fail before any work when a run cannot be written to ``target``: its parent cannot be made or written,
    or another live process holds its lock.

    Raises:
        OSError: naming the folder. RunLockedError: naming the holder and the lock file.
    """
    target = Path(target)
    lock = _acquire(target)
    _release(lock)


@contextmanager
def locked(target: str | Path) -> Iterator[Path]:
    """Hold the lock of run folder ``target`` (repairing an interrupted swap first); yields ``target``.

    Raises:
        RunLockedError: another live process is writing ``target``. OSError: unwritable output folder.
    """
    target = Path(target)
    lock = _acquire(target)
    try:
        _repair(target)
        yield target
    finally:
        _release(lock)


@contextmanager
def new_run(target: str | Path) -> Iterator[RunWriter]:
    """Write a run into ``target`` atomically: lock it, repair an interrupted swap, stage the files in
    ``<out>/.<name>.new``, and swap them in when the block ends without an error. On an error (or Ctrl-C) the
    staging folder is deleted and ``target`` keeps the previous run; the lock is always released.

    Raises:
        RunLockedError: another live process is writing ``target``. OSError: unwritable output folder.
    """
    with locked(target) as target:
        staging = _sibling(target, "new")
        try:
            staging.mkdir()
        except OSError as error:
            raise _unwritable(target.parent, error) from None
        try:
            yield RunWriter(target, staging)
            _swap(staging, target)
        except BaseException:
            _rmtree(staging)
            raise
