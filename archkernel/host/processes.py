"""Processes a killed run left: working in a directory tree (a killed pacstrap's pacman or
gpg-agent), or carrying the mark of a run that is gone (`stop_orphans`); and ending
processes (`terminate`: SIGTERM, then SIGKILL)."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from archkernel.errors import UserError
from archkernel.host import mounts
from archkernel.host.files import is_under
from archkernel.host.run import RUN_VARIABLE, process_identity
from archkernel.log import log

K = TypeVar("K")  # what identifies a process or a container

# --- processes left working in a tree ------------------------------------------------------


def processes_in(tree: Path, table: Iterable[tuple[int, list[str], str]]) -> list[int]:
    """Of the processes (pid, argv, root directory) in `table`, those working in `tree`:
    an argument names it or a path below it (`pacman -r TREE`, `--cachedir=TREE/...`), or
    they are chrooted inside it."""
    base = os.path.realpath(tree)
    found = []
    for pid, argv, root in table:
        paths = [arg.split("=", 1)[-1] for arg in argv]
        if any(is_under(x, base) for x in paths) or is_under(root, base):
            found.append(pid)
    return found


def _process_table() -> Iterator[tuple[int, list[str], str]]:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
            root = os.readlink(entry / "root")
        except OSError:  # gone meanwhile, or a kernel thread
            continue
        yield int(entry.name), [os.fsdecode(a) for a in raw.split(b"\0") if a], root


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


@contextlib.contextmanager
def _held(pids: list[int]) -> Iterator[dict[int, int]]:
    """A pidfd for each of `pids` still running (Linux 5.3): a signal sent through it
    reaches that process or none, never a later one given the same pid."""
    handles: dict[int, int] = {}
    try:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                handles[pid] = os.pidfd_open(pid)
        yield handles
    finally:
        for fd in handles.values():
            os.close(fd)


def _ended(fd: int) -> bool:
    """Whether the process behind pidfd `fd` has ended (a zombie has)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def _signal_and_wait(handles: dict[int, int], sig: signal.Signals, timeout: float) -> list[int]:
    """Send `sig` to the processes `handles` holds and wait up to `timeout` seconds for
    them to end; the pids still running then."""
    for fd in handles.values():
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(fd, sig)
    deadline = time.monotonic() + timeout
    while True:
        left = [pid for pid, fd in handles.items() if not _ended(fd)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def _kill_and_wait(pids: list[int], timeout: float, message: str) -> None:
    with _held(pids) as handles:
        if _signal_and_wait(handles, signal.SIGKILL, timeout):
            raise UserError(
                message,
                "wait for them to end (they may be stuck on a file system), then run again",
            )


def terminate(pids: list[int], grace: float = 5.0) -> list[int]:
    """End `pids`: SIGTERM, then SIGKILL for those still running after `grace` seconds,
    waiting as long again; the pids that would not end (stuck in the kernel)."""
    with _held(pids) as handles:
        left = _signal_and_wait(handles, signal.SIGTERM, grace)
        if not left:
            return []
        return _signal_and_wait({p: handles[p] for p in left}, signal.SIGKILL, grace)


def stop_processes_in(tree: Path, timeout: float = 10.0) -> list[int]:
    """SIGKILL the processes still working in `tree` and wait until they are gone.

    pacstrap runs pacman as PID 1 of a new PID namespace (`unshare --fork --pid`), and
    pacman ignores Ctrl-C while it unpacks packages: killing pacstrap leaves it writing
    into the tree, so the tree could be neither removed nor trusted.
    """
    pids = processes_in(tree, _process_table())
    for pid in pids:
        log.info("stopping process %d (%s), still working in %s", pid, _name(pid), tree)
    _kill_and_wait(pids, timeout, f"processes {pids} still work in {tree} after SIGKILL")
    return pids


def release_tree(tree: Path) -> None:
    """Stop what still works in `tree` and undo the mounts inside it (after a chroot)."""
    stop_processes_in(tree)
    mounts.cleanup_stale(tree)


def release_stale_trees(target: Path) -> None:
    """Release the temporary trees of `target` left by killed runs (their owner is gone)."""
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        owner = tmp.name.rsplit("-", 1)[-1]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            release_tree(tmp)


# --- processes of runs that are gone -------------------------------------------------------


def orphans(
    table: Iterable[tuple[K, str | None]], alive: Callable[[str], bool]
) -> list[tuple[K, str]]:
    """Of the processes (pid, the run they carry in RUN_VARIABLE or None) in `table`, those
    whose run is not `alive` (killed: they outlived it), with that run. (Containers too:
    their ID and the run in their label.)"""
    found: list[tuple[K, str]] = []
    runs: dict[str, bool] = {}
    for pid, run in table:
        if run is None:
            continue
        if run not in runs:
            runs[run] = alive(run)
        if not runs[run]:
            found.append((pid, run))
    return found


def _run_of(environ: bytes) -> str | None:
    prefix = RUN_VARIABLE.encode() + b"="
    for entry in environ.split(b"\0"):
        if entry.startswith(prefix):
            return entry[len(prefix) :].decode("ascii", "replace")
    return None


def _marked_processes() -> Iterator[tuple[int, str | None]]:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone meanwhile, a kernel thread, or another user's
            continue
        yield int(entry.name), _run_of(environ)


def run_alive(run: str) -> bool:
    """Whether the run a mark (`process_identity`) names still runs."""
    pid = run.split(":", 1)[0]
    return pid.isdigit() and process_identity(int(pid)) == run


def stop_orphans(timeout: float = 10.0) -> list[int]:
    """SIGKILL the processes a killed run left running, and wait until they are gone.

    run() marks each command with the run that started it (RUN_VARIABLE), and everything
    the command starts inherits the mark. The command itself dies with its run
    (PR_SET_PDEATHSIG); what it started (pacman under pacstrap, a gpg-agent, QEMU under a
    wrapper) is found here by the mark of a run that no longer exists.
    """
    found = orphans(_marked_processes(), run_alive)
    for pid, run in found:
        log.info(
            "stopping process %d (%s), left by run %s, which was killed",
            pid,
            _name(pid),
            run.split(":", 1)[0],
        )
    pids = [pid for pid, _ in found]
    _kill_and_wait(pids, timeout, f"processes {pids} left by killed runs still run after SIGKILL")
    return pids
