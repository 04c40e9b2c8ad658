"""gradloc.core.interrupts: a SIGINT is counted even where its KeyboardInterrupt is swallowed, raised again at a
commit point, and held back over sections that must not be torn."""

import os
import signal
import time

import pytest

from gradloc.core import interrupts


def _sigint() -> None:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)  # the Python handler runs at the next bytecode


class _Swallows:
    def __del__(self) -> None:
        _sigint()  # its KeyboardInterrupt is "ignored in __del__", as in DataLoader shutdown


def test_watching_installs_and_restores_the_handler():
    before = signal.getsignal(signal.SIGINT)
    with interrupts.watching():
        assert signal.getsignal(signal.SIGINT) is not before
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_swallowed_interrupt_is_raised_again_at_the_commit_point():
    with interrupts.watching() as start:
        _Swallows()  # dropped at once: the exception dies in __del__
        with pytest.raises(KeyboardInterrupt):
            interrupts.raise_if_interrupted(start)


def test_no_interrupt_no_raise():
    with interrupts.watching() as start:
        interrupts.raise_if_interrupted(start)


def test_deferred_holds_the_interrupt_until_the_section_ends():
    done = []
    with pytest.raises(KeyboardInterrupt), interrupts.deferred():
        _sigint()
        done.append("the rest of the section ran")
    assert done == ["the rest of the section ran"]


def test_an_ignored_sigint_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupts.watching():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
