"""How a network runs: memory format, precision and the allocator -- the fast path of the cams stage and of
``gradloc train``.

* **Memory format**: ``channels_last`` (NHWC in memory) for the families of
  :data:`gradloc.models.registry.CHANNELS_LAST_FAMILIES` (measured faster there), ``contiguous`` (NCHW)
  elsewhere; ``cams.channels_last`` (``--channels-last/--no-channels-last``) overrides the registry. The
  values differ from NCHW's by float32 rounding only (other summation orders inside the convolutions).
* **Precision**: float32, or with ``--amp`` autocast to bfloat16 on a CPU with native bfloat16 arithmetic
  (AVX512-BF16 or AMX; elsewhere a one-line note and float32) and to float16 on CUDA. The CAM engine ends
  the autocast at the target layer (:mod:`gradloc.cams.engine`): the activation and everything after it --
  the head, the scores, the gradients, the map formulas -- are float32.
* **Allocator**: :func:`keep_freed_memory` stops glibc's malloc from handing the large activation buffers
  back to the kernel after every batch.

The memory format and the precision change the maps' bits, so they are part of the heatmap cache key
(:meth:`Execution.key`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import platform
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch import Tensor, nn

from gradloc.models.registry import CHANNELS_LAST_FAMILIES

logger = logging.getLogger(__name__)


MEMORY_FORMATS: dict[str, torch.memory_format] = {
    "channels_last": torch.channels_last,
    "contiguous": torch.contiguous_format,
}
"""Memory formats of the model and its inputs."""


PRECISIONS: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Precision name -> autocast dtype (None: no autocast)."""


def cpu_has_bfloat16() -> bool:
    """Whether this CPU does bfloat16 arithmetic natively (AVX512-BF16 or AMX), as torch reports it. Without
    it bfloat16 is emulated and slower than float32."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


@dataclass(frozen=True)
class _Amp:
    """What ``--amp`` means on one device type: the autocast precision and whether this machine runs it fast."""

    precision: str
    supported: Callable[[], bool]
    without: str  # what the machine lacks when ``supported()`` is False


AMP: dict[str, _Amp] = {
    "cpu": _Amp("bfloat16", cpu_has_bfloat16, "native bfloat16 arithmetic (AVX512-BF16 or AMX)"),
    "cuda": _Amp("float16", lambda: True, ""),
}
"""Device type -> what ``--amp`` autocasts to there."""


@dataclass(frozen=True)
class Execution:
    """How the network runs: device, memory format (:data:`MEMORY_FORMATS`), precision (:data:`PRECISIONS`)."""

    device: torch.device
    memory_format: str = "contiguous"
    precision: str = "float32"

    def key(self) -> dict[str, str]:
        """Cache-key entries. Each is absent at its default (contiguous, float32), so caches made before these
        options existed stay valid."""
        return {**({"memory_format": self.memory_format} if self.memory_format != "contiguous" else {}),
                **({"precision": self.precision} if self.precision != "float32" else {})}

    @property
    def channels_last(self) -> bool:
        return self.memory_format == "channels_last"

    def describe(self) -> str:
        return f"{self.precision}, {self.memory_format}, {self.device}"

    def model(self, model: nn.Module) -> nn.Module:
        """Move ``model`` (in place) to the device and memory format."""
        return model.to(self.device, memory_format=MEMORY_FORMATS[self.memory_format])

    def inputs(self, inputs: Tensor) -> Tensor:
        """float32[B, 3, H, W] on the device, in the memory format (no copy when already there)."""
        moved = inputs.to(self.device, non_blocking=True)
        return moved.contiguous(memory_format=MEMORY_FORMATS[self.memory_format])

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The autocast context of the precision (a no-op for float32)."""
        dtype = PRECISIONS[self.precision]
        return contextlib.nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)


def resolve_execution(device: torch.device, family: str, channels_last: bool | None = None,
                      amp: bool = False) -> Execution:
    """The execution of a model of ``family`` on ``device``.

    Args:
        channels_last: None for the family's registry fact (:data:`CHANNELS_LAST_FAMILIES`).
        amp: autocast (:data:`AMP`); on a CPU without native bfloat16 it logs a one-line note and runs float32.

    Raises:
        ValueError: ``amp`` on a device type without autocast here (e.g. mps).
    """
    if channels_last is None:
        channels_last = family in CHANNELS_LAST_FAMILIES
    precision = "float32"
    if amp:
        if device.type not in AMP:
            raise ValueError(f"--amp (cams.amp) autocasts on {' or '.join(AMP)}, not on {device}; drop --amp")
        rule = AMP[device.type]
        if rule.supported():
            precision = rule.precision
        else:
            _note_float32(device.type, rule.without)
    return Execution(device, "channels_last" if channels_last else "contiguous", precision)


@cache
def _note_float32(device_type: str, without: str) -> None:
    """The one-line note of ``--amp`` on a machine without fast low precision (once per process)."""
    logger.warning("--amp: this %s has no %s; running float32", device_type.upper(), without)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the kernel.

    By default every buffer above a (dynamic, at most 32 MB) threshold is ``mmap``-ed when allocated and
    unmapped when freed, so each batch of a CNN page-faults its activations in again: on EfficientNet-Lite0 at
    a 320-px short side that was about a third of the forward pass's CPU time (README "Speed"). Raising the
    mmap and trim thresholds to 1 GiB keeps those pages in the process; the peak memory is that of one batch
    as before, but it is not handed back until the process ends. Process-wide and idempotent; a no-op (False)
    off glibc.

    Returns:
        Whether the thresholds were set.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    done = bool(libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))
    logger.debug("malloc keeps freed memory: %s", done)
    return done
