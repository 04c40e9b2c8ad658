"""Ctrl-C that cannot be lost.

Python turns SIGINT into ``KeyboardInterrupt`` wherever the main thread happens to be. When that is inside a
``__del__``, a ``register_at_fork`` callback or a garbage-collector callback (all of which run while
DataLoader workers start or stop), the exception is printed as "Exception ignored" and the program carries
on as if nothing had happened: a run interrupted there finished and replaced its folder.

:func:`watching` installs a handler that *counts* every SIGINT before raising ``KeyboardInterrupt``, so the
signal is remembered even where the exception is swallowed; :func:`raise_if_interrupted` turns a remembered
signal back into ``KeyboardInterrupt`` at a commit point (:mod:`gradloc.core.folders` checks it before a
staged folder is swapped in); :func:`deferred` postpones the exception over a short section that must not be
torn (starting worker processes, a swap, deleting a staging folder) and raises it when the section ends.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

_received = 0  # SIGINTs seen by the handler since the process started
_deferring = 0  # depth of deferred() sections


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    global _received
    _received += 1
    if not _deferring:
        raise KeyboardInterrupt


def received() -> int:
    """SIGINTs counted so far (compare two readings to know whether one arrived in between)."""
    return _received


def raise_if_interrupted(since: int = 0) -> None:
    """Raise ``KeyboardInterrupt`` when a SIGINT was counted after the reading ``since`` of :func:`received`,
    even if its exception was swallowed on the way."""
    if _received > since:
        raise KeyboardInterrupt


def install() -> None:
    """Count SIGINTs for the rest of the process (a program's entry point; a library caller uses
    :func:`watching`), over Python's default handler only, in the main thread only. A KeyboardInterrupt that
    Python cannot raise (it came inside a ``__del__`` or a callback) is then not printed as "Exception
    ignored": it was counted and is raised again at the next :func:`raise_if_interrupted`."""
    if threading.current_thread() is threading.main_thread() \
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)
        previous_hook = sys.unraisablehook

        def hook(unraisable: Any) -> None:
            if not issubclass(unraisable.exc_type, KeyboardInterrupt):
                previous_hook(unraisable)

        sys.unraisablehook = hook


@contextmanager
def watching() -> Iterator[int]:
    """Count SIGINTs while the block runs; yields the count at entry (for :func:`raise_if_interrupted`).

    The handler is installed only in the main thread and only over Python's default one (a program that
    ignores SIGINT, or handles it itself, keeps its handler); the previous handler is restored on exit."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        current = signal.getsignal(signal.SIGINT)
        if current is signal.default_int_handler:
            previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield _received
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


@contextmanager
def deferred() -> Iterator[None]:
    """Hold back ``KeyboardInterrupt`` while the block runs; a SIGINT that arrived meanwhile is raised when it
    ends (also when it ends by another exception, which then becomes its context)."""
    global _deferring
    with watching() as start:
        _deferring += 1
        try:
            yield
        finally:
            _deferring -= 1
            if not _deferring:
                raise_if_interrupted(start)
