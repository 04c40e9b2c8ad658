"""gradloc.core.folders: owned folders (marker), staged writes swapped whole, updates, and refusals of anything
gradloc did not make."""

import errno
import json
import os
import signal
import time
from pathlib import Path

import pytest

from gradloc.core import files as io_module
from gradloc.core.folders import (
    SWAPPED,
    ForeignFolderError,
    check_writable,
    is_owned,
    marker_name,
    remove_owned,
    repair,
    staged,
)

KIND = "thing"


def _write(target, files: dict[str, str], **kwargs) -> None:
    with staged(target, KIND, **kwargs) as staging:
        for name, text in files.items():
            io_module.atomic_write_bytes(staging / name, text.encode())


def _tree(folder) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_staged_folder_gets_its_marker_and_replaces_only_its_own(tmp_path):
    target = tmp_path / "t"
    _write(target, {"a.txt": "1", "sub/b.txt": "2"})
    assert is_owned(target, KIND) and not is_owned(target, "other")
    assert json.loads((target / marker_name(KIND)).read_text()) == {"format": "gradloc.folder/1", "kind": KIND}
    _write(target, {"c.txt": "3"})
    assert set(_tree(target)) == {marker_name(KIND), "c.txt"}  # the whole folder was replaced
    assert SWAPPED[-1] == target
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def _snapshot(folder) -> dict[str, bytes | str]:
    """Every entry under ``folder`` (links not followed): file bytes, or the link's target."""
    found: dict[str, bytes | str] = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder)] = (os.readlink(path) if os.path.islink(path)
                                                   else Path(path).read_bytes() if os.path.isfile(path) else "dir")
    return found


@pytest.mark.parametrize("make", [
    lambda p: (p.mkdir(), (p / "mine.txt").write_text("keep")),
    lambda p: p.write_text("a file"),
    lambda p: p.symlink_to(p.parent),
    lambda p: (p.mkdir(), (p / marker_name("other")).write_text("{}"), (p / "x").write_text("keep")),
], ids=["user folder", "file", "symlink", "another kind's folder"])
def test_anything_gradloc_did_not_make_is_refused_and_untouched(make, tmp_path):
    target = tmp_path / "t"
    make(target)
    before = _snapshot(tmp_path)
    with pytest.raises(ForeignFolderError, match=rf"{target}: the target is .*left untouched"):
        _write(target, {"a.txt": "1"})
    with pytest.raises(ForeignFolderError):
        check_writable(target, KIND)
    assert _snapshot(tmp_path) == before


def test_an_empty_folder_may_be_replaced(tmp_path):
    (tmp_path / "t").mkdir()
    _write(tmp_path / "t", {"a.txt": "1"})
    assert _tree(tmp_path / "t")["a.txt"] == "1"


def test_legacy_folders_are_recognised_by_their_test(tmp_path):
    target = tmp_path / "t"
    target.mkdir()
    (target / "old.txt").write_text("made by an older version")
    _write(target, {"a.txt": "1"}, legacy=lambda path: (path / "old.txt").is_file())
    assert set(_tree(target)) == {marker_name(KIND), "a.txt"}


@pytest.mark.parametrize("name", [".t.ready", ".hidden", "..", "x" * 300])
def test_reserved_and_unusable_names_are_refused(name, tmp_path):
    with pytest.raises(ValueError, match=r"^--name .* cannot be used as a file or folder name"):
        _write(tmp_path / name, {"a.txt": "1"}, what="--name")
    assert list(tmp_path.iterdir()) == []


def test_a_foreign_folder_at_a_staging_name_is_never_swapped_in_or_deleted(tmp_path):
    target = tmp_path / "t"
    _write(target, {"a.txt": "1"})
    foreign = tmp_path / ".t.ready"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep")
    with pytest.raises(ForeignFolderError, match=r"\.t\.ready: a staging name is a folder gradloc did not make"):
        repair(target, KIND)
    assert _tree(target)["a.txt"] == "1" and (foreign / "mine.txt").read_text() == "keep"


def test_a_crash_is_repaired_only_on_owned_folders(tmp_path):
    target = tmp_path / "t"
    _write(target, {"a.txt": "old"})
    os.rename(target, tmp_path / ".t.old")  # crash after moving the old folder aside ...
    _write(tmp_path / "x", {"a.txt": "new"})
    os.rename(tmp_path / "x", tmp_path / ".t.ready")  # ... with the new one complete
    repair(target, KIND)
    assert _tree(target)["a.txt"] == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def test_an_update_starts_from_the_files_and_is_whole_or_nothing(tmp_path, monkeypatch):
    target = tmp_path / "t"
    _write(target, {"keep.txt": "k", "a.txt": "1", "b.txt": "1"})
    inode = (target / "keep.txt").stat().st_ino
    _write(target, {"a.txt": "2", "b.txt": "2"}, update=True)
    assert _tree(target) == {marker_name(KIND): _tree(target)[marker_name(KIND)], "keep.txt": "k", "a.txt": "2",
                             "b.txt": "2"}
    assert (target / "keep.txt").stat().st_ino == inode  # linked, not copied
    calls = []

    def full_disk(fd):  # the lock, the marker, a.txt, then b.txt fails
        calls.append(fd)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io_module.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        _write(target, {"a.txt": "3", "b.txt": "3"}, update=True)
    monkeypatch.undo()
    assert (_tree(target)["a.txt"], _tree(target)["b.txt"]) == ("2", "2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def test_an_update_needs_an_owned_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no thing folder to update"):
        _write(tmp_path / "t", {"a.txt": "1"}, update=True)


def test_a_sigint_during_the_block_cancels_the_swap_even_if_swallowed(tmp_path):
    target = tmp_path / "t"
    _write(target, {"a.txt": "old"})
    with pytest.raises(KeyboardInterrupt), staged(target, KIND) as staging:
        (staging / "a.txt").write_text("new")
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        except KeyboardInterrupt:
            pass  # swallowed on the way, as in a __del__ or a fork hook
    assert _tree(target)["a.txt"] == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def test_remove_owned_deletes_the_marker_last_and_refuses_foreign(tmp_path):
    _write(tmp_path / "t", {"a.txt": "1", "d/b.txt": "2"})
    remove_owned(tmp_path / "t", KIND)
    assert not (tmp_path / "t").exists()
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "mine.txt").write_text("keep")
    with pytest.raises(ForeignFolderError):
        remove_owned(tmp_path / "u", KIND)
    assert (tmp_path / "u" / "mine.txt").read_text() == "keep"


def test_an_update_copies_links_as_links_and_never_walks_them(tmp_path):
    target = tmp_path / "t"
    _write(target, {"a.txt": "1"})
    (target / "root").symlink_to("/")  # a crafted folder: following it would link the whole file system
    (target / "loop").symlink_to(target)
    _write(target, {"b.txt": "2"}, update=True)
    assert os.readlink(target / "root") == "/" and (target / "loop").is_symlink()
    assert sorted(p.name for p in target.iterdir()) == sorted([marker_name(KIND), "a.txt", "b.txt", "loop", "root"])


def test_owner_of_finds_the_nearest_owned_folder(tmp_path):
    from gradloc.core.folders import owner_of

    _write(tmp_path / "t", {"a.txt": "1"})
    assert owner_of(tmp_path / "t" / "sub" / "cache") == tmp_path / "t"
    assert owner_of(tmp_path / "t") == tmp_path / "t"
    assert owner_of(tmp_path / "elsewhere") is None
