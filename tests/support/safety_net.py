"""A generous time limit for tests of hostile input, so that a regression fails instead of hanging.

Tests bound the work they cause by the size of their input, never by timing it: this is
only a net under that, for a parser that has become quadratic or exponential again. It
uses SIGALRM, so it works in the main thread only (where pytest runs tests).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType


class TookForever(AssertionError):
    """The code under the safety net ran past its generous limit."""


@contextlib.contextmanager
def safety_net(seconds: int = 60) -> Iterator[None]:
    """Fail the test if the block runs longer than `seconds` (far above its normal time)."""

    def expired(_signum: int, _frame: FrameType | None) -> None:
        raise TookForever(f"still running after {seconds} s: the work is not bounded")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
