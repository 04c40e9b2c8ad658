"""Files: atomic writes, plain-data pickles (a restricted unpickler), process liveness."""

from __future__ import annotations

import _compat_pickle
import collections
import functools
import io
import os
import pickle
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gradloc.core.names import excerpt


class _Refused(pickle.UnpicklingError):
    """The pickle names something beyond plain data, or builds more than its bytes describe."""


# numpy dtype kinds a plain-data pickle may hold: bool, integers, floats, complex, fixed-width strings. Not
# objects (arbitrary references), void/structured records or datetimes: no gradloc format has them.
_DTYPE_KINDS = frozenset("biufcUS")


def _checked_dtype(dtype: Any) -> Any:
    import numpy as np

    if not isinstance(dtype, np.dtype) or dtype.kind not in _DTYPE_KINDS or dtype.fields is not None \
            or dtype.subdtype is not None:
        raise _Refused(f"refusing to load numpy {dtype!r}; only numbers, bools and fixed-width strings are plain data")
    return dtype


class _ArrayClass:
    """What the loader hands out for ``numpy.ndarray``: a name :func:`_numpy_globals`'s ``_reconstruct`` accepts,
    but not the class itself, whose call ``ndarray(shape)`` would allocate any size."""

    def __call__(self, *args: Any) -> Any:
        raise _Refused("refusing to load numpy.ndarray(...); pickles of plain arrays never call it")

    def __repr__(self) -> str:
        return "numpy.ndarray"


_NDARRAY = _ArrayClass()


@functools.cache
def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The numpy callables an array or scalar pickle names (protocols 2 to 5, numpy 1 and 2 module names),
    each wrapped so that it builds only plain arrays no larger than the bytes the pickle holds."""
    import numpy as np

    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]

    def dtype(*args: Any) -> Any:
        return _checked_dtype(np.dtype(*args))

    def reconstruct(subtype: Any, shape: Any, code: Any) -> Any:  # numpy's empty stub before __setstate__
        if subtype is not _NDARRAY or tuple(shape) != (0,):
            raise _Refused(f"refusing numpy._reconstruct({excerpt(subtype)}, {excerpt(shape)}); pickles of plain "
                           "arrays use (ndarray, (0,))")
        return multiarray._reconstruct(np.ndarray, (0,), code)

    def frombuffer(buffer: Any, kind: Any, shape: Any, order: Any) -> Any:  # protocol 5 arrays
        return numeric._frombuffer(buffer, _checked_dtype(kind), shape, order)

    def scalar(kind: Any, *data: Any) -> Any:
        return multiarray.scalar(_checked_dtype(kind), *data)

    names = {("numpy", "dtype"): dtype, ("numpy", "ndarray"): _NDARRAY}
    for package in ("numpy.core", "numpy._core"):
        names |= {(f"{package}.multiarray", "_reconstruct"): reconstruct,
                  (f"{package}.multiarray", "scalar"): scalar,
                  (f"{package}.numeric", "_frombuffer"): frombuffer}
    return names


def _latin1(text: Any, encoding: Any = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles of bytes use it: latin-1 text to bytes, nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused("refusing _codecs.encode other than of latin-1 text")
    return text.encode("latin-1")


def _bytearray(data: Any = b"", *encoding: Any) -> bytearray:
    """``bytearray`` of given bytes or text (never of a size: ``bytearray(10**10)`` would allocate it)."""
    if not isinstance(data, bytes | str):
        raise _Refused("refusing bytearray of anything but bytes or text")
    return bytearray(data, *encoding) if encoding else bytearray(data)


def _complex(real: Any = 0.0, imag: Any = 0.0) -> complex:
    if not all(isinstance(part, int | float) for part in (real, imag)):
        raise _Refused("refusing complex of anything but numbers")
    return complex(real, imag)


_BUILTIN_GLOBALS: dict[tuple[str, str], Any] = {
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): _bytearray,
    ("builtins", "complex"): _complex,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _latin1,
}


_NUMPY_DTYPE_CLASSES = {"numpy.dtypes", "numpy._core.dtypes", "numpy.core.dtypes"}


class _SafeUnpickler(pickle.Unpickler):
    """Resolves only the globals of plain data (:data:`_BUILTIN_GLOBALS`, :func:`_numpy_globals`)."""

    def find_class(self, module: str, name: str) -> Any:
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)  # Python 2 names of protocol 2 pickles
        found = _BUILTIN_GLOBALS.get((module, name)) or _numpy_globals().get((module, name))
        if found is not None:
            return found
        if module in _NUMPY_DTYPE_CLASSES and name.endswith("DType"):
            dtype_class = super().find_class(module, name)
            return lambda *args: _checked_dtype(dtype_class(*args))
        raise _Refused(f"refusing to load {module}.{name}")


_PLAIN_SCALARS = (str, bytes, bytearray, int, float, bool, complex, type(None))


def _check_plain(data: Any, size: int) -> None:
    """Walk what a pickle of ``size`` bytes built, counting every reference (a shared object once per
    reference). Each reference costs at least one byte of pickle, so more than about twice ``size`` references
    is a bomb of shared or cyclic references; anything but plain containers, scalars and plain numpy values is
    refused.

    Raises:
        _Refused: naming what was found.
    """
    import numpy as np

    budget = 2 * size + 1024
    stack, count = [data], 1
    while stack:
        item = stack.pop()
        if isinstance(item, _PLAIN_SCALARS):
            continue
        if isinstance(item, np.ndarray | np.generic):
            _checked_dtype(item.dtype)
            continue
        if isinstance(item, np.dtype):
            _checked_dtype(item)
            continue
        if not isinstance(item, dict | list | tuple | set | frozenset):
            raise _Refused(f"refusing to load a {type(item).__module__}.{type(item).__name__}")
        count += 2 * len(item) if isinstance(item, dict) else len(item)
        if count > budget:
            raise _Refused(f"its {size:,} bytes build over {budget:,} references (shared or cyclic references: "
                           "a pickle bomb?)")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        else:
            stack.extend(item)


def safe_load_pickle(path: str | os.PathLike[str]) -> Any:
    """Load a pickle that may come from someone else: plain data only, and no more of it than its bytes hold.

    Allowed: dicts, lists, tuples, sets, strings, bytes, numbers, None, and numpy arrays and scalars of
    numbers, bools or fixed-width strings. Nothing that can run code is resolved, no callable that allocates
    by a size argument is offered, and the objects built are counted with every shared reference expanded
    (what ``np.asarray`` of a nested list would allocate): a few-KB "bomb" of nested references is refused
    at once instead of allocating gigabytes.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a pickle, refers to anything beyond plain data, or expands beyond its size
            (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    data = path.read_bytes()
    try:
        loaded = _SafeUnpickler(io.BytesIO(data)).load()
        _check_plain(loaded, len(data))
        return loaded
    except _Refused as error:
        raise ValueError(f"{path}: not a plain-data pickle ({error}); only gradloc formats are loaded") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, RecursionError, OverflowError) as error:
        raise ValueError(f"{path}: unreadable pickle ({type(error).__name__}: {str(error)[:200]})") from None


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


def check_own_file(path: str | os.PathLike[str], signature: bytes, what: str) -> None:
    """Before writing an output file the user named (``--png``, ``--checkpoint-out``): refuse to replace anything
    but a file of the same format, i.e. starting with ``signature`` (an annotation, a paper, a folder and a
    link are left untouched).

    Raises:
        FileExistsError: naming the file.
    """
    path = Path(path)
    if path.is_symlink() or path.is_dir() or (path.exists() and _first_bytes(path, len(signature)) != signature):
        kind = "a symbolic link" if path.is_symlink() else "a folder" if path.is_dir() else "not " + what
        raise FileExistsError(f"{path}: exists and is {kind}; gradloc overwrites only a file it could have "
                              f"written ({what}): choose another file name, or move it away")


def write_own_file(path: str | os.PathLike[str], data: bytes, what: str) -> None:
    """Write an output file the user named atomically, replacing only a file of the same format: the first
    bytes of ``data`` are its signature (:func:`check_own_file`).

    Raises:
        FileExistsError: naming the file. OSError: as :func:`atomic_write_bytes`.
    """
    check_own_file(path, data[:4], what)
    atomic_write_bytes(path, data)


def _first_bytes(path: Path, count: int) -> bytes:
    with path.open("rb") as handle:
        return handle.read(count)


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
