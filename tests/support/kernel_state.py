"""What the kernel has mounted and attached, read without archkernel's own code.

Tests that mount file systems or attach loop devices check afterwards that they left
nothing behind. They read the kernel's own lists here (/proc/self/mountinfo and
`losetup --list --json`), independently of archkernel.host.mounts, so a bug there cannot
hide itself. Only what lies under the test's own directory counts: other work on this
machine may have mounts and loop devices of its own.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

_OCTAL = re.compile(rb"\\([0-7]{3})")


def mount_points() -> list[str]:
    """Every mount point in /proc/self/mountinfo, in its order, octal escapes undone."""
    points = []
    for line in Path("/proc/self/mountinfo").read_bytes().splitlines():
        field = line.split(b" ")[4]
        points.append(os.fsdecode(_OCTAL.sub(lambda m: bytes([int(m[1], 8)]), field)))
    return points


@dataclass(frozen=True)
class Loop:
    """One attached loop device, as `losetup --list --json` shows it."""

    name: str
    back_file: str  # without the " (deleted)" the kernel adds for a removed file
    offset: int
    sizelimit: int
    read_only: bool


def loop_devices() -> list[Loop]:
    """Every attached loop device on this machine."""
    out = subprocess.run(
        ["losetup", "--list", "--json", "--output", "NAME,BACK-FILE,OFFSET,SIZELIMIT,RO"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    devices = json.loads(out).get("loopdevices", []) if out.strip() else []
    return [
        Loop(
            d["name"],
            (d.get("back-file") or "").removesuffix(" (deleted)"),
            int(d.get("offset") or 0),
            int(d.get("sizelimit") or 0),
            str(d.get("ro")).lower() in ("1", "true"),
        )
        for d in devices
    ]


def _under(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip("/") + "/")


def mounts_in(directory: str | os.PathLike[str]) -> list[str]:
    """Mount points at or below `directory`, in mountinfo order."""
    base = os.path.realpath(directory)
    return [p for p in mount_points() if _under(p, base)]


def loops_in(directory: str | os.PathLike[str]) -> list[Loop]:
    """Loop devices whose backing file lies at or below `directory`."""
    base = os.path.realpath(directory)
    return [d for d in loop_devices() if d.back_file and _under(d.back_file, base)]


def leftovers(directory: str | os.PathLike[str]) -> list[str]:
    """Mounts at or below `directory` and loop devices whose backing file lies in it."""
    found = [f"mounted: {point}" for point in mounts_in(directory)]
    found += [f"loop device: {d.name} on {d.back_file}" for d in loops_in(directory)]
    return found


def undo_leftovers(directory: str | os.PathLike[str]) -> list[str]:
    """Unmount (lazily, deepest first) and detach whatever `leftovers` finds; return it.

    For a fixture's teardown, so a failing test does not leave the machine worse off.
    """
    found = leftovers(directory)
    for point in sorted(mounts_in(directory), key=lambda p: p.count("/"), reverse=True):
        subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)
    for dev in loops_in(directory):
        subprocess.run(["partx", "--delete", dev.name], capture_output=True, check=False)
        subprocess.run(["losetup", "--detach", dev.name], capture_output=True, check=False)
    return found
