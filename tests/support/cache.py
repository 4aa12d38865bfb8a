"""The test cache: where downloaded and built test inputs are kept between runs.

Everything the tests fetch or build slowly (Debian's kernel and busybox packages, the build
environment tarball, the offline repository's `linux` package) lives under
`$ARCHKERNEL_TEST_CACHE`, default `~/.cache/archkernel-tests`. Delete it to start afresh.
Test processes may run at the same time: whoever fills an entry holds its lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

CACHE_ENV = "ARCHKERNEL_TEST_CACHE"


def cache_dir() -> Path:
    """$ARCHKERNEL_TEST_CACHE, else ~/.cache/archkernel-tests."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "archkernel-tests"


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created) so one test process at a time fills a cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
