"""Files: atomic writes, plain-data pickles (a restricted unpickler), process liveness."""

from __future__ import annotations

import io
import os
import pickle
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Everything the gradloc formats need: containers, numpy arrays and scalars. Nothing that can run code.
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
        ValueError: the file is not a pickle or refers to anything beyond plain data (the message names it).
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


_FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file


def temporary_name(path: Path) -> Path:
    """``<folder>/.<name>.<pid>.<random>.tmp``: the hidden sibling a write goes through (unique per process
    and call, recognisable as litter by its pattern ``.<name>.*.tmp``)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder (fsynced) and ``os.replace``.

    Raises:
        OSError: the folder cannot be made or written (e.g. ENOSPC); the old file, if any, is untouched and
            the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        if error.filename is None and error.errno is not None:  # name the file we were writing
            raise OSError(error.errno, error.strerror, str(path)) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_pickle(obj: Any, path: str | os.PathLike[str]) -> None:
    """Pickle plain data atomically (protocol 4, no timestamps: same data, same bytes). An object with a
    ``to_dict()`` method (``GroundTruth``, ``Detections``) is saved as that dict."""
    data = obj.to_dict() if hasattr(obj, "to_dict") else obj
    atomic_write_bytes(path, pickle.dumps(data, protocol=4))


def to_plain(value: Any) -> Any:
    """A deep copy of nested mappings/sequences as dicts and lists (JSON- and YAML-ready, safe to edit)."""
    if isinstance(value, Mapping):
        return {key: to_plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_plain(item) for item in value]
    return value


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host. A process this host may not signal (another user's) counts as
    alive, so nothing of a process that might be running is taken over or deleted; a pid no process can have
    (``<= 0``, or too large for the kernel, e.g. 99999999999999999999 from a damaged lock file) is not alive."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True
