"""Logging: plain text for journald and pipes, step start/end lines with durations."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from typing import ClassVar

LOGGER_NAME = "archkernel"
log = logging.getLogger(LOGGER_NAME)


class _Formatter(logging.Formatter):
    """`archkernel: message`, with colour only when writing to a terminal."""

    COLOURS: ClassVar[dict[int, str]] = {
        logging.WARNING: "\033[33m",
        logging.ERROR: "\033[31m",
        logging.DEBUG: "\033[2m",
    }

    def __init__(self, colour: bool) -> None:
        super().__init__()
        self.colour = colour

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        if self.colour and record.levelno in self.COLOURS:
            text = f"{self.COLOURS[record.levelno]}{text}\033[0m"
        return text


def setup(verbosity: int = 0, stream: object = None) -> None:
    """Configure the archkernel logger: -1 quiet (warnings), 0 info, 1+ debug."""
    out = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(out)  # type: ignore[arg-type]
    colour = bool(getattr(out, "isatty", lambda: False)())
    handler.setFormatter(_Formatter(colour))
    log.handlers[:] = [handler]
    log.propagate = False
    level = logging.INFO
    if verbosity < 0:
        level = logging.WARNING
    elif verbosity > 0:
        level = logging.DEBUG
    log.setLevel(level)
    # tftpy logs every packet and warns about errors it handles itself.
    logging.getLogger("tftpy").setLevel(logging.CRITICAL)


@contextlib.contextmanager
def complete_step(title: str, what: str | None = None) -> Iterator[None]:
    """Log `title` (and `what` it does) when the block starts, and how it ended: `title:
    done in 1.2s`, `failed after`, or `interrupted after` (Ctrl-C)."""
    if what:
        log.info("%s: %s", title, what)
    else:
        log.info("%s ...", title)
    start = time.monotonic()
    try:
        yield
    except KeyboardInterrupt:
        log.info("%s: interrupted after %.1fs", title, time.monotonic() - start)
        raise
    except BaseException:
        log.info("%s: failed after %.1fs", title, time.monotonic() - start)
        raise
    log.info("%s: done in %.1fs", title, time.monotonic() - start)
