"""Processes left working in a directory tree (a killed pacstrap's gpg-agent, ...)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from archkernel.errors import UserError
from archkernel.host import mounts
from archkernel.host.files import is_under
from archkernel.log import log

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


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"  # a zombie no longer runs


def stop_processes_in(tree: Path, timeout: float = 10.0) -> list[int]:
    """SIGKILL the processes still working in `tree` and wait until they are gone.

    pacstrap runs pacman as PID 1 of a new PID namespace (`unshare --fork --pid`), and
    pacman ignores Ctrl-C while it unpacks packages: killing pacstrap leaves it writing
    into the tree, so the tree could be neither removed nor trusted.
    """
    pids = processes_in(tree, _process_table())
    for pid in pids:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            name = "?"
        log.info("stopping process %d (%s), still working in %s", pid, name, tree)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while not all(_gone(pid) for pid in pids):
        if time.monotonic() > deadline:
            raise UserError(
                f"processes {pids} still work in {tree} after SIGKILL",
                "wait for them to end (they may be stuck on a file system), then run again",
            )
        time.sleep(0.05)
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
