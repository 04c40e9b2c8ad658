"""gradloc checkpoints (``gradloc.checkpoint/1``) and plain state dicts: writing, reading, validating."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradloc.core.files import atomic_write_bytes
from gradloc.core.provenance import file_sha256

CHECKPOINT_FORMAT = "gradloc.checkpoint/1"


# Fields of a gradloc checkpoint besides "format" and "state_dict", in the order they are written.
CHECKPOINT_FIELDS = (
    "arch", "arch_kwargs", "weights", "head", "classes", "input_size", "resize_mode", "mean", "std", "train",
    "git_commit",
)


# what torch.load raises on truncated, foreign or unsafe files
_LOAD_ERRORS = (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError, KeyError, IndexError,
                TypeError, AttributeError, struct.error)


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, meta: Mapping[str, Any]) -> None:
    """Write a ``gradloc.checkpoint/1`` file atomically (temporary file + rename).

    Args:
        path: checkpoint file.
        model: the model whose full ``state_dict`` is stored (tensors moved to the CPU).
        meta: every field of :data:`CHECKPOINT_FIELDS` (see the module docstring).

    Raises:
        ValueError: a field is missing or the head is not ``voc``.
    """
    missing = [key for key in CHECKPOINT_FIELDS if key not in meta]
    if missing:
        raise ValueError(f"checkpoint {path}: meta lacks field(s) {', '.join(missing)}")
    if meta["head"] != "voc":
        raise ValueError(f"checkpoint {path}: head {meta['head']!r}; only 'voc' heads are saved")
    state = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
    data = {"format": CHECKPOINT_FORMAT, **{key: meta[key] for key in CHECKPOINT_FIELDS}, "state_dict": state}
    buffer = io.BytesIO()
    torch.save(data, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _read_torch_file(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found; train one with `gradloc train --checkpoint-out "
                                f"{path}` or pass an existing file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except _LOAD_ERRORS as error:
        if "weights only load failed" in str(error).lower():  # torch's advice (weights_only=False) is unsafe
            raise ValueError(f"{path}: not a loadable torch checkpoint (not a file of plain tensors: gradloc "
                             "never unpickles other objects); pass a file written by `gradloc train` or a state "
                             "dict") from None
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path}: not a loadable torch checkpoint ({type(error).__name__}: {first})") from None


def _is_state_dict(data: Any) -> bool:
    return isinstance(data, Mapping) and bool(data) and all(
        isinstance(key, str) and isinstance(value, Tensor) for key, value in data.items()
    )


def _validate_checkpoint(data: Any, path: Path) -> dict[str, Any]:
    if not isinstance(data, Mapping) or data.get("format") != CHECKPOINT_FORMAT:
        found = data.get("format") if isinstance(data, Mapping) else type(data).__name__
        raise ValueError(f"{path}: format is {found!r}, expected {CHECKPOINT_FORMAT!r} (a file written by "
                         "`gradloc train`)")
    missing = [key for key in (*CHECKPOINT_FIELDS, "state_dict") if key not in data]
    if missing:
        raise ValueError(f"{path}: {CHECKPOINT_FORMAT} checkpoint lacks field(s) {', '.join(missing)}")
    if not _is_state_dict(data["state_dict"]):
        raise ValueError(f"{path}: field 'state_dict' is not a dict of tensors")
    if not data["classes"] or len(set(data["classes"])) != len(data["classes"]):
        raise ValueError(f"{path}: field 'classes' must be a non-empty list of distinct names")
    return dict(data)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a ``gradloc.checkpoint/1`` file (``torch.load(weights_only=True)``: no code runs).

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable, another format, or missing fields.
    """
    path = Path(path)
    return _validate_checkpoint(_read_torch_file(path), path)


def _file_record(path: Path) -> dict[str, str]:
    return {"path": str(path.resolve()), "sha256": file_sha256(path)}


def backbone_digest(model: nn.Module, classifier: str) -> str:
    """sha256 of every parameter and buffer of ``model`` outside the module ``classifier`` (its final linear
    layer or the head replacing it): dtype, shape and values in ``state_dict`` order, names left out, so a
    network and the same network wrapped by a head (``backbone.<name>``) or with another classifier give the
    same digest. Independent of the memory format and device."""
    skip = f"{classifier}."
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if name.startswith(skip):
            continue
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
