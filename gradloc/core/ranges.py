"""The one definition of each valid range (IoU thresholds, τ, score cut), shared by config validation and the
code that uses the value."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Interval:
    """A range of valid values, e.g. ``Interval(0, 1, low_open=True, high_open=True)`` is (0, 1).

    ``value in interval`` tests membership; ``str(interval)`` is the usual notation."""

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


# The one definition of each valid range, shared by config validation and the code that uses the value.
# IoU thresholds: a match needs IoU > thr strictly, so thr = 1 could never match and thr = 0 would match any
# overlap of zero area; the scorer (gradloc.metrics) checks the same interval.
IOU_RANGE = Interval(0.0, 1.0, low_open=True, high_open=True)


THRESHOLD_RANGE = Interval(0.0, 1.0)  # τ: a fraction with a named meaning (boxes.threshold_mode)


SCORE_CUT_RANGE = Interval(0.0, 1.0)  # a class probability
