"""Folders gradloc owns: staged aside, swapped in whole, locked, and the only folders it replaces or deletes.

A folder written as a whole (a run folder, an export folder) is *owned*: its first file, written into the
staging folder before anything else, is the marker ``.gradloc-<kind>`` (``{"format": "gradloc.folder/1",
"kind": ...}``). Around a target ``<parent>/<name>``::

    <parent>/.<name>.lock     the writer's pid and host (one writer at a time)
    <parent>/.<name>.new      the staging folder
    <parent>/.<name>.ready    complete, being swapped in
    <parent>/.<name>.old      the previous folder, being deleted

Guarantees, whatever the name, the target or a crash:

* **Nothing foreign is deleted or replaced.** A folder is renamed aside or deleted only when it holds the
  marker of the same kind or is empty; at the target, a folder made before markers existed also counts when
  it passes the kind's ``legacy`` test (it gets its marker before it is moved aside). A file, a symbolic link,
  or a folder without the marker at the target or at a staging name is refused with
  :class:`ForeignFolderError`, naming it, before any work.
* **Whole or nothing.** :func:`staged` swaps the staging folder in only when its block ended without an
  error and no SIGINT arrived meanwhile (:mod:`gradloc.core.interrupts`: a Ctrl-C whose exception was swallowed
  on the way still cancels the swap). A crash in the middle of a swap is finished or undone by the next
  :func:`repair` (``.ready`` rolls forward, a lone ``.old`` rolls back), again only on owned folders.
  ``staged(..., update=True)`` stages an *update* of an existing owned folder: its files are hard-linked into
  the staging folder, changed there (every write replaces a file, never edits it in place) and the whole
  folder is swapped, so a multi-file update is never half applied.
* **Staging names are reserved.** Target names go through :func:`gradloc.core.names.check_name`, which
  refuses names starting with ``.``, so a target can never be another target's staging folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gradloc.core.files import atomic_write_bytes, pid_alive, temporary_name
from gradloc.core.interrupts import deferred, raise_if_interrupted, watching
from gradloc.core.names import check_name

logger = logging.getLogger(__name__)


FOLDER_FORMAT = "gradloc.folder/1"


Legacy = Callable[[Path], bool] | None
"""A test recognising folders of a kind made before markers existed (None: only the marker counts)."""


SWAPPED: list[Path] = []
"""The folders this process has swapped in, in order (what an interrupted command did write)."""


class ForeignFolderError(FileExistsError):
    """A folder gradloc would replace or delete was not made by it (no marker); nothing was touched."""


class LockedError(OSError):
    """Another live process is writing the same folder (an OSError, like EBUSY: the CLI prints one line)."""


def marker_name(kind: str) -> str:
    """The marker file of a folder of ``kind``, e.g. ``.gradloc-run``."""
    return f".gradloc-{kind}"


def is_owned(path: Path, kind: str, legacy: Legacy = None) -> bool:
    """Whether ``path`` is a real folder (not a link) holding the marker of ``kind``, or passing ``legacy``."""
    if path.is_symlink() or not path.is_dir():
        return False
    return (path / marker_name(kind)).is_file() or (legacy is not None and legacy(path))


def _is_empty_folder(path: Path) -> bool:
    return not path.is_symlink() and path.is_dir() and next(path.iterdir(), None) is None


def _check_disposable(path: Path, kind: str, legacy: Legacy, role: str) -> None:
    """Refuse to go on when ``path`` exists and is neither owned nor an empty folder.

    Raises:
        ForeignFolderError: naming the path and what to do.
    """
    if not (path.exists() or path.is_symlink()) or is_owned(path, kind, legacy) or _is_empty_folder(path):
        return
    what = ("a symbolic link" if path.is_symlink() else "a file" if not path.is_dir()
            else f"a folder gradloc did not make (no {marker_name(kind)} marker)")
    raise ForeignFolderError(f"{path}: {role} is {what}; gradloc replaces or deletes only the {kind} folders it "
                             "made, so it was left untouched: choose another name or folder, or move it away")


def _sibling(target: Path, suffix: str) -> Path:
    return target.with_name(f".{target.name}.{suffix}")


def lock_path(target: Path) -> Path:
    """``<parent>/.<name>.lock``."""
    return _sibling(target, "lock")


def remove_owned(path: Path, kind: str) -> None:
    """Delete a folder holding the marker of ``kind``, or an empty one (nothing when absent); the marker goes
    last, so a deletion cut short leaves a folder that is still recognised as owned. A SIGINT meanwhile is
    raised when it is done.

    Raises:
        ForeignFolderError: ``path`` is not owned (nothing is deleted).
    """
    if not (path.exists() or path.is_symlink()):
        return
    _check_disposable(path, kind, None, "the folder to delete")
    marker = path / marker_name(kind)
    with deferred():
        for child in path.iterdir():
            if child == marker:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        marker.unlink(missing_ok=True)
        path.rmdir()


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return holder if isinstance(holder, dict) else None


def _is_stale(holder: dict[str, Any] | None) -> bool:
    """A lock of a dead process on this host (the only case a lock can be judged stale)."""
    if holder is None or holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    return isinstance(pid, int) and not isinstance(pid, bool) and pid != os.getpid() and not pid_alive(pid)


def _unwritable(folder: Path, error: OSError) -> OSError:
    return OSError(f"{folder}: output folder is not writable ({error.strerror or error}); choose another --out")


def _acquire(target: Path, kind: str) -> Path:
    """Create the lock file atomically (write aside, hard-link into place); take over a stale one.

    Raises:
        LockedError: held by a live process (or by one this host cannot check).
        OSError: the parent folder cannot be made or written.
    """
    lock = lock_path(target)
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
                    who = (f"pid {str(holder.get('pid'))[:20]} on host {str(holder.get('host'))[:64]}" if holder
                           else "an unreadable lock")
                    raise LockedError(f"{target}: another gradloc {kind} is writing this folder ({who}, lock file "
                                      f"{lock}); wait for it to finish, or delete the lock file if that "
                                      "process is gone") from None
                logger.warning("%s: taking over the lock of pid %s on %s, which is no longer running", lock,
                               holder.get("pid"), holder.get("host"))
                lock.unlink(missing_ok=True)
        raise LockedError(f"{target}: another gradloc {kind} took the lock file {lock} first; try again")
    except LockedError:
        raise
    except OSError as error:
        raise _unwritable(lock.parent, error) from None
    finally:
        tmp.unlink(missing_ok=True)


def _release(lock: Path) -> None:
    holder = _read_lock(lock)
    if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        lock.unlink(missing_ok=True)


def repair(target: Path, kind: str, legacy: Legacy = None) -> None:
    """Finish or undo a swap interrupted by a crash (the caller holds the lock, or no one does). Only owned
    (or empty) folders are renamed or deleted. A folder at a staging name counts as owned by its marker alone
    (never by ``legacy``: a folder a user or an older version named ``.<name>.ready`` is not a staged run),
    so anything else there is refused.

    Raises:
        ForeignFolderError: a foreign folder at the target or a staging name.
    """
    ready, old, new = _sibling(target, "ready"), _sibling(target, "old"), _sibling(target, "new")
    for path in (ready, old, new):
        _check_disposable(path, kind, None, "a staging name")
    if is_owned(ready, kind):
        _check_disposable(target, kind, legacy, "the target")
        with deferred():
            if target.exists():
                remove_owned(old, kind)
                _adopt(target, kind)
                os.rename(target, old)
            os.rename(ready, target)
        logger.warning("%s: completed the swap of a %s interrupted after it had finished", target, kind)
    elif ready.exists():
        ready.rmdir()  # empty: renamed from a staging folder before its marker was written
    if old.exists():
        if target.exists():
            remove_owned(old, kind)
        elif is_owned(old, kind):
            os.rename(old, target)
            logger.warning("%s: restored the previous %s after an interrupted swap", target, kind)
        else:
            old.rmdir()
    remove_owned(new, kind)


@contextmanager
def locked(target: Path, kind: str, legacy: Legacy = None) -> Iterator[Path]:
    """Hold the lock of ``target`` (repairing an interrupted swap first); yields ``target``.

    Raises:
        LockedError: another live process is writing ``target``. OSError: unwritable parent folder.
        ForeignFolderError: a foreign folder at a staging name.
    """
    target = Path(target)
    lock = _acquire(target, kind)
    try:
        repair(target, kind, legacy)
        yield target
    finally:
        _release(lock)


def check_writable(target: Path, kind: str, legacy: Legacy = None, what: str = "name") -> None:
    """Fail before any work when ``target`` cannot be written as a whole: a name gradloc cannot use, a
    parent that cannot be made or written, another live writer, or a foreign folder at the target or at a
    staging name.

    Raises:
        ValueError: a bad name (``what`` says where it came from, e.g. ``--name``). OSError: unwritable parent.
        LockedError: naming the holder and the lock file. ForeignFolderError: naming the folder.
    """
    target = Path(target)
    check_name(target.name, what)
    with locked(target, kind, legacy):
        _check_disposable(target, kind, legacy, "the target")


def _write_marker(folder: Path, kind: str) -> None:
    atomic_write_bytes(folder / marker_name(kind), json.dumps({"format": FOLDER_FORMAT, "kind": kind}).encode())


def _link_tree(source: Path, destination: Path, skip: str) -> None:
    """Hard-link every file of ``source`` into ``destination`` (copy where links are refused); symbolic links
    are copied as links, never followed."""
    for root, dirs, files in os.walk(source):  # followlinks=False: a link to / is one entry, not a walk
        here = Path(root)
        for name in dirs:
            if (here / name).is_symlink():
                shutil.copy2(here / name, destination / (here / name).relative_to(source), follow_symlinks=False)
            else:
                (destination / (here / name).relative_to(source)).mkdir(exist_ok=True)
        for name in files:
            path = here / name
            relative = path.relative_to(source)
            if relative.as_posix() == skip:
                continue
            try:
                os.link(path, destination / relative, follow_symlinks=False)
            except OSError:
                shutil.copy2(path, destination / relative, follow_symlinks=False)


def owner_of(path: Path) -> Path | None:
    """The nearest folder holding ``path`` (itself included) that gradloc owns, of any kind (it has a
    ``.gradloc-*`` marker), or None: what would delete ``path`` when it is replaced."""
    for folder in (path, *path.parents):
        if folder.is_dir() and any(marker.is_file() for marker in folder.glob(".gradloc-*")):
            return folder
    return None


def _adopt(folder: Path, kind: str) -> None:
    """Give an owned folder made before markers its marker, before it is moved to a staging name (where only
    the marker counts)."""
    if not (folder / marker_name(kind)).is_file():
        _write_marker(folder, kind)


def _swap(staging: Path, target: Path, kind: str) -> None:
    ready, old = _sibling(target, "ready"), _sibling(target, "old")
    os.rename(staging, ready)  # from here the new folder is complete: a crash rolls forward
    if target.exists():
        _adopt(target, kind)
        os.rename(target, old)
    os.rename(ready, target)
    SWAPPED.append(target)
    remove_owned(old, kind)


@contextmanager
def staged(target: str | Path, kind: str, legacy: Legacy = None, *, update: bool = False,
           what: str = "name") -> Iterator[Path]:
    """Write the folder ``target`` as a whole: lock it, stage it in ``.<name>.new`` (marker first) and swap it
    in when the block ends without an error and without a SIGINT; otherwise delete the staging folder and
    leave ``target`` as it was. Yields the staging folder.

    Args:
        target: the folder to write.
        kind: ``run``, ``export``: the marker written, and the only marker a replaced folder may hold.
        legacy: recognises folders of this kind made before markers (see :func:`is_owned`).
        update: start from the files of the existing ``target`` (hard links), for a multi-file update.
        what: where the name came from, for the error of an unusable name (e.g. ``--name``).

    Raises:
        ValueError: unusable name. ForeignFolderError: a foreign folder in the way (before any work).
        LockedError: another writer. OSError: unwritable parent. FileNotFoundError: ``update`` without target.
        KeyboardInterrupt: a SIGINT arrived while the block ran (nothing was replaced).
    """
    target = Path(target)
    check_name(target.name, what)
    with watching() as start, locked(target, kind, legacy):
        _check_disposable(target, kind, legacy, "the target")
        if update and not is_owned(target, kind, legacy):
            raise FileNotFoundError(f"{target}: no {kind} folder to update")
        staging = _sibling(target, "new")
        try:
            staging.mkdir()
        except OSError as error:
            raise _unwritable(target.parent, error) from None
        try:
            _write_marker(staging, kind)
            if update:
                _link_tree(target, staging, skip=marker_name(kind))
            yield staging
            with deferred():
                raise_if_interrupted(start)
                _swap(staging, target, kind)
        except BaseException:
            remove_owned(staging, kind)
            raise
