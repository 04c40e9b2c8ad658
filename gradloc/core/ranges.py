"""The one definition of each valid value (IoU thresholds, τ, score cut) and of a τ's file-name precision,
shared by config validation, the box stage, the scorer and the run folder.

Every check raises ``ValueError`` with a message that starts with what was checked (``what``, e.g.
``config key 'boxes.thresholds[1]'`` or ``--iou``) and says what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ValidRange:
    """A range of valid values, e.g. ``ValidRange(0, 1, low_open=True, high_open=True)`` is (0, 1).

    ``value in valid`` tests membership (NaN is never inside); ``str(valid)`` is the usual notation."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = self.low < value if self.low_open else self.low <= value
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"

    def check(self, value: float, what: str) -> float:
        """``value`` as a float (``-0.0`` read as ``0.0``) when it is inside; else ValueError naming ``what``."""
        value = float(value)
        if value not in self:
            raise ValueError(f"{what}: {value:g} is outside {self}")
        return value + 0.0


# IoU thresholds: a match needs IoU > thr strictly, so thr = 1 could never match and thr = 0 would match any
# overlap of zero area.
IOU_RANGE = ValidRange(0.0, 1.0, low_open=True, high_open=True)
THRESHOLD_RANGE = ValidRange(0.0, 1.0)  # τ: a fraction with a named meaning (boxes.threshold_mode)
SCORE_CUT_RANGE = ValidRange(0.0, 1.0)  # a class probability
CENTER_SIZE_RANGE = ValidRange(0.0, 1.0, low_open=True)  # the center baseline's share of width and height

MAX_IOUS = 100
"""Most IoU thresholds scored at once (each is a column of every table)."""

MAX_INPUT_SIZE = 2048
"""Largest network input side (pixels). VOC images are at most 500 px; past 2048 a batch needs gigabytes."""

THRESHOLD_DECIMALS = 3
"""Per-threshold files are named by τ with this many decimals (``thr_0.020.pkl``), so a run's τ have at most
this many and no two of them round to the same name."""


def threshold_label(tau: float, what: str = "threshold") -> str:
    """τ as written in file names and tables, e.g. ``0.02 -> "0.020"``.

    Raises:
        ValueError: τ outside [0, 1] or with more than :data:`THRESHOLD_DECIMALS` decimals.
    """
    tau = THRESHOLD_RANGE.check(tau, what)
    if abs(round(tau, THRESHOLD_DECIMALS) - tau) > 1e-9:
        raise ValueError(f"{what}: {tau!r} has more than {THRESHOLD_DECIMALS} decimals; file names keep "
                         f"{THRESHOLD_DECIMALS} (thr_0.020.pkl)")
    return f"{round(tau, THRESHOLD_DECIMALS) + 0.0:.{THRESHOLD_DECIMALS}f}"


def _distinct(values: Sequence[float], names: Sequence[str], what: str) -> None:
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise ValueError(f"{what}: {values[seen[name]]:.12g} and {values[i]:.12g} are the same threshold "
                             f"({name}); give each once")
        seen[name] = i


def check_thresholds(values: Sequence[float], what: str = "thresholds") -> tuple[float, ...]:
    """A sweep of τ: at least one, each in [0, 1] with at most :data:`THRESHOLD_DECIMALS` decimals, no two
    with the same file name. Returns them as floats (``-0`` read as 0).

    Raises:
        ValueError: naming ``what`` and the offending value.
    """
    if not len(values):
        raise ValueError(f"{what}: give at least one threshold")
    labels = [threshold_label(tau, f"{what}[{i}]") for i, tau in enumerate(values)]
    _distinct(values, labels, what)
    return tuple(float(tau) + 0.0 for tau in values)


def check_ious(values: Sequence[float], what: str = "IoU thresholds") -> tuple[float, ...]:
    """IoU thresholds: at least one and at most :data:`MAX_IOUS`, each in (0, 1) (:data:`IOU_RANGE`), no
    duplicates.

    Raises:
        ValueError: naming ``what`` and the offending value.
    """
    if not len(values):
        raise ValueError(f"{what}: give at least one IoU threshold, e.g. 0.5")
    if len(values) > MAX_IOUS:
        raise ValueError(f"{what}: {len(values):,} IoU thresholds; give at most {MAX_IOUS}")
    checked = tuple(IOU_RANGE.check(iou, f"{what}[{i}]") for i, iou in enumerate(values))
    _distinct(checked, [repr(iou) for iou in checked], what)
    return checked


def is_finite_number(value: object) -> bool:
    """A real number (bool excluded) that is neither NaN nor infinite."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
