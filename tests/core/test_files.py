"""Tests for gradloc.core.files: restricted unpickler, atomic writes (temporary name, fsync, failure cleanup)."""

from __future__ import annotations

import errno
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from gradloc.core import files as io_module
from gradloc.core.files import atomic_write_bytes, safe_load_pickle, save_pickle
from gradloc.core.formats import DETECTIONS_FORMAT, GroundTruth, load_detections


def gt_fields() -> dict:
    return {
        "classes": ["cat"], "image_ids": ["000001"], "image_sizes": np.array([[500, 375]], dtype=np.int64),
        "image_index": np.array([0], dtype=np.int64), "labels": np.array([0], dtype=np.int64),
        "boxes": np.array([[1.0, 1, 10, 10]]), "difficult": np.array([False]),
    }


# --- safe loading -------------------------------------------------------------------------------------------


class Payload:
    """A class instance that a plain-data loader must refuse."""

    def __init__(self) -> None:
        self.value = 1


class RunsCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_safe_loader_refuses_code(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"format": DETECTIONS_FORMAT, "x": RunsCommand(marker)}))
    refused = r"evil\.pkl: not a plain-data pickle .*refusing to load (posix|os|nt)\.system"
    with pytest.raises(ValueError, match=refused):
        safe_load_pickle(path)
    assert not marker.exists()
    with pytest.raises(ValueError, match="refusing to load"):
        load_detections(path)


@pytest.mark.parametrize(
    "obj",
    [Payload(), [np.zeros(2), Payload()], eval, np.array([Payload()], dtype=object)],
    ids=["instance", "nested instance", "builtin function", "object array"],
)
def test_safe_loader_refuses_non_data(tmp_path, obj):
    path = tmp_path / "obj.pkl"
    path.write_bytes(pickle.dumps(obj))
    with pytest.raises(ValueError, match="refusing to load"):
        safe_load_pickle(path)


PLAIN = {"a": [1, 2.5, "x", None, (True, b"z")], "arr": np.arange(6, dtype=np.int64).reshape(2, 3),
         "flags": np.array([True, False]), "scalar": np.float64(0.5)}


def _check_plain_round_trip(path: Path, protocol: int) -> None:
    path.write_bytes(pickle.dumps(PLAIN, protocol=protocol))
    loaded = safe_load_pickle(path)
    assert loaded["a"] == PLAIN["a"] and loaded["scalar"] == 0.5
    assert np.array_equal(loaded["arr"], PLAIN["arr"]) and loaded["arr"].dtype == np.int64
    assert loaded["flags"].dtype == bool


@pytest.mark.parametrize("protocol", [3, 4])
def test_safe_loader_accepts_plain_data(tmp_path, protocol):
    _check_plain_round_trip(tmp_path / "plain.pkl", protocol)


# numpy arrays pickled with protocol 2 need ``_codecs.encode`` and with protocol 5
# ``numpy._core.numeric._frombuffer``: plain-data constructors that the allow-list includes.
@pytest.mark.parametrize("protocol", [2, 5])
def test_safe_loader_accepts_numpy_pickled_with_protocol_2_and_5(tmp_path, protocol):
    _check_plain_round_trip(tmp_path / "plain.pkl", protocol)


def test_safe_loader_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.pkl: no such file"):
        safe_load_pickle(tmp_path / "missing.pkl")
    (tmp_path / "text.pkl").write_text("not a pickle at all")
    with pytest.raises(ValueError, match=r"text\.pkl"):
        safe_load_pickle(tmp_path / "text.pkl")
    (tmp_path / "cut.pkl").write_bytes(pickle.dumps({"a": list(range(100))})[:20])
    with pytest.raises(ValueError, match=r"cut\.pkl: .*truncated"):
        safe_load_pickle(tmp_path / "cut.pkl")


def _bomb(depth: int) -> list:
    leaf: list = [0.0, 0.0, 0.0, 0.0]
    for _ in range(depth):
        leaf = [leaf, leaf]
    return leaf


def _cycle() -> list:
    cycle: list = []
    cycle.append(cycle)
    return cycle


class _Reduces:
    """Pickles as ``function(*args)``: what a hostile pickle can ask the loader to call."""

    def __init__(self, function, *args) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize(("obj", "message"), [
    (_bomb(28), "pickle bomb"),  # 2**28 lists of 4 floats once np.asarray expands the shared references
    ({"boxes": _bomb(40), "x": 1}, "pickle bomb"),
    (_cycle(), "pickle bomb"),
    (_Reduces(bytearray, 10**10), "refusing bytearray of anything but bytes"),  # would allocate 10 GB
    (_Reduces(np.ndarray, (10**6,)), "refusing to load numpy.ndarray"),
    (_Reduces(np.dtype, "O"), "refusing to load numpy dtype"),
    (_Reduces(np.dtype, [("a", "f8"), ("b", "O")]), "refusing to load numpy dtype"),
], ids=["nested shared lists", "nested in a dict", "cycle", "bytearray(size)", "ndarray(shape)",
        "object dtype", "structured dtype"])
def test_safe_loader_bounds_what_it_builds(tmp_path, obj, message):
    path = tmp_path / "bomb.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=4))
    assert path.stat().st_size < 4000
    with pytest.raises(ValueError, match=rf"bomb\.pkl: not a plain-data pickle \(.*{message}"):
        safe_load_pickle(path)


def test_safe_loader_refuses_numpy_reconstruct_of_a_huge_stub(tmp_path):
    from numpy._core.multiarray import _reconstruct

    path = tmp_path / "stub.pkl"
    path.write_bytes(pickle.dumps(_Reduces(_reconstruct, np.ndarray, (10**12,), b"b"), protocol=4))
    with pytest.raises(ValueError, match=r"refusing numpy\._reconstruct"):
        safe_load_pickle(path)


def test_a_shared_string_is_fine(tmp_path):
    """Legitimate sharing (one class name string referenced by many rows) stays within the budget."""
    name = "diningtable"
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps({"rows": [name] * 10_000, "arrays": [np.zeros(3)] * 100}, protocol=4))
    assert len(safe_load_pickle(path)["rows"]) == 10_000


# --- atomic writes ------------------------------------------------------------------------------------------


def test_atomic_write_leaves_no_temp_file(tmp_path):
    target = tmp_path / "out" / "thr_0.100.pkl"
    atomic_write_bytes(target, b"first")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["thr_0.100.pkl"]


def test_atomic_write_failure_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    target = tmp_path / "gt.pkl"
    target.write_bytes(b"old")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(io_module.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        save_pickle(GroundTruth(**gt_fields()), target)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["gt.pkl"]


def test_temporary_name_is_hidden_sibling_with_pid(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append(Path(src))
        real_replace(src, dst)

    monkeypatch.setattr(io_module.os, "replace", spy)
    atomic_write_bytes(tmp_path / "gt.pkl", b"x")
    (tmp, ) = seen
    assert tmp.parent == tmp_path
    assert tmp.name.startswith(f".gt.pkl.{os.getpid()}.") and tmp.name.endswith(".tmp")


def test_full_disk_during_write_keeps_old_file(tmp_path, monkeypatch):
    """A write that fails with ENOSPC (simulated) keeps the old content and leaves no temporary file."""
    target = tmp_path / "scores.csv"
    target.write_bytes(b"old")

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io_module.os, "fsync", lambda fd: full(fd, b""))
    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["scores.csv"]


def test_save_pickle_same_data_same_bytes(tmp_path):
    save_pickle({"a": np.arange(3)}, tmp_path / "one.pkl")
    save_pickle({"a": np.arange(3)}, tmp_path / "two.pkl")
    assert (tmp_path / "one.pkl").read_bytes() == (tmp_path / "two.pkl").read_bytes()
    assert pickle.loads((tmp_path / "one.pkl").read_bytes())["a"].tolist() == [0, 1, 2]


def test_write_own_file_replaces_only_a_file_of_its_format(tmp_path):
    from gradloc.core.files import write_own_file

    png = b"\x89PNG\r\n\x1a\n" + b"pixels"
    target = tmp_path / "a.png"
    write_own_file(target, png, "a PNG image")
    write_own_file(target, png + b"more", "a PNG image")  # an earlier PNG is replaced
    assert target.read_bytes() == png + b"more"
    for name, make in (("notes.xml", lambda p: p.write_text("<annotation/>")), ("d", lambda p: p.mkdir()),
                       ("link.png", lambda p: p.symlink_to(target))):
        make(tmp_path / name)
        with pytest.raises(FileExistsError, match=rf"{name}: exists and is .*gradloc overwrites only"):
            write_own_file(tmp_path / name, png, "a PNG image")
    assert (tmp_path / "notes.xml").read_text() == "<annotation/>" and target.read_bytes() == png + b"more"
