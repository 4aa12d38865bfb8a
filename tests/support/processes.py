"""Watching processes from a test: whether one runs, and waiting for a condition."""

from __future__ import annotations

import time
from collections.abc import Callable

from archkernel.host.run import proc_stat


def alive(pid: int) -> bool:
    """Whether `pid` runs: it exists and is no zombie (a zombie has ended)."""
    fields = proc_stat(pid)
    return bool(fields) and fields[0] != b"Z"


def wait_for(
    condition: Callable[[], object], what: str | Callable[[], str], timeout: float = 30.0
) -> None:
    """Poll `condition` until it is true; fail after `timeout` seconds, naming `what` (a
    callable: what it says then, such as the processes still there)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            said = what() if callable(what) else what
            raise AssertionError(f"{said}: not within {timeout:g} s")
        time.sleep(0.02)
