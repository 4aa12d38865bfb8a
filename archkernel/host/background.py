"""A long-running command in the background of this process: QEMU, the fabric's dnsmasq.

The command runs in a worker thread through `run()` (so it dies with the thread that
started it, and `limit` bounds it in the worst case), which waits for it and hands out
no pid: the command writes its pid to a pid file, and that is how `stop` finds it. A pid
is taken only from a child of this process whose command line names the pid file: a
killed run's pid file may name a pid reused since, and another run's command may name
the same file. Before the pid file is written, the same test over /proc finds it.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from archkernel.errors import UserError
from archkernel.host.processes import terminate
from archkernel.host.run import proc_stat, render, run
from archkernel.log import log

STOP_GRACE = 5.0


def _names(cmdline: bytes, pidfile: Path) -> bool:
    """Whether a command line (NUL-separated) names `pidfile`: as an argument of its own
    (`-pidfile PATH`) or as an option's value (`--pid-file=PATH`)."""
    path = os.fsencode(pidfile)
    return any(arg == path or arg.endswith(b"=" + path) for arg in cmdline.split(b"\0"))


def _ours(pid: int, pidfile: Path) -> bool:
    """Whether `pid` is a child of this process whose command line names `pidfile`."""
    fields = proc_stat(pid)  # the parent's pid is field 4
    if len(fields) < 2 or int(fields[1]) != os.getpid():
        return False
    try:
        return _names(Path(f"/proc/{pid}/cmdline").read_bytes(), pidfile)
    except OSError:
        return False


class Background:
    """`argv` (which writes its pid to `pidfile`) run in a worker thread: whether it still
    runs, its pid, how it ended; `stop` ends it (SIGTERM, then SIGKILL) and waits."""

    def __init__(self, name: str, argv: Sequence[str], pidfile: Path, limit: float) -> None:
        self.name, self.argv, self.pidfile, self.limit = name, list(argv), pidfile, limit
        self.result: subprocess.CompletedProcess[str] | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            # `limit` is a backstop: stop() normally ends the command long before.
            self.result = run(self.argv, check=False, stdin=b"", timeout=self.limit)
        except BaseException as exc:  # handed to the main thread by raise_error()
            self.error = exc

    def start(self, *, wait: float | None = None) -> None:
        """Start it; with `wait`, return only once its pid file names it (UserError if it
        ended first or took longer than `wait` seconds)."""
        self.pidfile.parent.mkdir(parents=True, exist_ok=True)
        self.pidfile.unlink(missing_ok=True)  # a killed run's may name a reused pid
        log.debug("starting %s: %s", self.name, render(self.argv))
        self._thread.start()
        if wait is None:
            return
        deadline = time.monotonic() + wait
        while self.pid() is None:
            if not self.running or time.monotonic() > deadline:
                self.stop()
                self.raise_error()
                said = self.result.stderr.strip() if self.result is not None else ""
                raise UserError(
                    f"{self.name} did not start: {said or f'no pid file within {wait:g}s'}",
                    "see the command in the debug log (-v)",
                )
            time.sleep(0.05)

    @property
    def running(self) -> bool:
        """True until the command has exited (or failed to start)."""
        return self._thread.is_alive()

    def raise_error(self) -> None:
        """Re-raise what stopped the command from running at all (e.g. not installed)."""
        if self.error is not None:
            raise self.error

    def pid(self) -> int | None:
        """The pid in the pid file, if it is our child naming the pid file."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _ours(pid, self.pidfile) else None

    def _find(self) -> int | None:
        """Its pid, from the pid file or, before it wrote one, from /proc."""
        pid = self.pid()
        if pid is not None:
            return pid
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and _ours(int(proc.name), self.pidfile):
                return int(proc.name)
        return None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL; return once the worker thread has ended."""
        said = False
        start = time.monotonic()
        # Stopped at once, it may not have started the command yet: look until it has,
        # or the thread ended without it (run()'s timeout ends the thread at worst).
        while self.running:
            pid = self._find()
            if pid is not None:
                terminate([pid], STOP_GRACE)
                break
            if not said and time.monotonic() - start > STOP_GRACE:
                log.info("waiting for %s to start, to stop it", self.name)
                said = True
            self._thread.join(0.05)
        if self._thread.ident is not None:
            self._thread.join()
