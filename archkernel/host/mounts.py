"""Loop devices and mounts as context managers that undo themselves on any exit.

Every context manager here undoes what it did when its block ends, whether normally, by
an exception or by Ctrl-C. What a killed process (SIGKILL, a power cut) leaves behind,
`cleanup_stale(workdir)` finds from the kernel's own lists (/proc/self/mountinfo and
/sys/block/loop*) and removes before a step is run again; it runs no command unless
there is something to undo.

A plan (archkernel.plan) that mounts does it with commands known before it runs:
`loop_mount_argv` lets mount(8) make the loop device itself, which `umount` frees again.

This machine's kernel has no partition-table parser: `losetup -P` makes no
`/dev/loopNp1`, so `loop_device(..., partitions=True)` asks `partx -a` for them.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from archkernel.errors import UserError
from archkernel.host.files import is_under
from archkernel.host.run import run
from archkernel.log import log

MOUNTINFO = Path("/proc/self/mountinfo")
# How long the kernel gets to detach a loop device mount made, after umount.
LOOP_FREE_TIMEOUT = 5.0


@dataclass(frozen=True)
class LoopInfo:
    """One attached loop device as `losetup --list --json` reports it."""

    name: str
    back_file: str
    offset: int
    sizelimit: int


def parse_losetup_json(text: str) -> list[LoopInfo]:
    """The loop devices listed by `losetup --list --json` (empty output: none)."""
    if not text.strip():
        return []
    devices = json.loads(text).get("loopdevices", [])
    out = []
    for dev in devices:
        back = dev.get("back-file") or ""
        # The kernel reports a backing file that was deleted or renamed away this way.
        back = back.removesuffix(" (deleted)")
        out.append(
            LoopInfo(dev["name"], back, int(dev.get("offset") or 0), int(dev.get("sizelimit") or 0))
        )
    return out


SYS_BLOCK = Path("/sys/block")


def list_loop_devices() -> list[LoopInfo]:
    """Every loop device attached on this machine, as the kernel lists them in /sys (what
    `losetup --list` reads too)."""
    found = []
    for entry in sorted(SYS_BLOCK.glob("loop*"), key=lambda p: (len(p.name), p.name)):
        info = entry / "loop"  # only while attached
        try:
            back = (info / "backing_file").read_text().rstrip("\n")
            offset = int((info / "offset").read_text())
            sizelimit = int((info / "sizelimit").read_text())
        except (OSError, ValueError):
            continue
        # The kernel reports a backing file that was deleted or renamed away this way.
        found.append(
            LoopInfo(f"/dev/{entry.name}", back.removesuffix(" (deleted)"), offset, sizelimit)
        )
    return found


def _unescape_mountinfo(field: str) -> str:
    """Undo the octal escapes (\\040 for a space ...) of a /proc/self/mountinfo field."""
    out = bytearray()
    raw = os.fsencode(field)
    i = 0
    while i < len(raw):
        if raw[i] == 0x5C and i + 4 <= len(raw) and raw[i + 1 : i + 4].isdigit():
            out.append(int(raw[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


def mounts_under(mountinfo: str, directory: str) -> list[str]:
    """Mount points at or below `directory`, deepest first (the order to unmount them).

    `mountinfo` is the text of /proc/self/mountinfo; its mount point is the fifth field.
    """
    found = []
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if len(fields) > 4:
            point = _unescape_mountinfo(fields[4])
            if is_under(point, directory):
                found.append(point)
    # Later mounts over the same point sit on top: unmount them first.
    ordered = list(reversed(found))
    ordered.sort(key=lambda p: p.count("/"), reverse=True)
    return ordered


def loops_under(devices: Iterable[LoopInfo], directory: str) -> list[LoopInfo]:
    """The loop devices whose backing file lies in `directory`."""
    return [d for d in devices if d.back_file and is_under(d.back_file, directory)]


@contextlib.contextmanager
def _undo_on_exit(action: str, undo: Callable[[], object]) -> Iterator[None]:
    """Call `undo` when the block ends. If the block raised, a failing `undo` only warns,
    so the error that got us here stays the one the user sees."""
    try:
        yield
    except BaseException:
        try:
            undo()
        except UserError as exc:
            log.warning("could not %s: %s", action, exc.message)
        raise
    undo()


def _attach(image: Path, options: list[str]) -> Path:
    """`losetup --find --show`, undone again if it is interrupted after attaching."""
    before = {d.name for d in list_loop_devices()}
    try:
        out = run(["losetup", "--find", "--show", *options, image], capture=True).stdout
    except BaseException:
        # Ctrl-C can land after the kernel attached the device and before we learned its
        # name: detach whatever new device now points at our image.
        target = os.path.realpath(image)
        with contextlib.suppress(UserError):
            for dev in list_loop_devices():
                if dev.name not in before and dev.back_file == target:
                    run(["losetup", "--detach", dev.name], check=False)
        raise
    return Path(out.strip())


@contextlib.contextmanager
def loop_device(
    image: Path,
    *,
    offset: int | None = None,
    sizelimit: int | None = None,
    partitions: bool = False,
    read_only: bool = False,
) -> Iterator[Path]:
    """Attach `image` (or `sizelimit` bytes of it from `offset`) to a free loop device.

    Yields the device (`/dev/loopN`). With `partitions`, `partx -a` also makes
    `/dev/loopNp1`... for its partition table. Everything is detached when the block ends.
    """
    image = Path(image)
    if not image.is_file():
        raise UserError(f"cannot attach {image}: no such file", "create the image first")
    options = []
    if offset is not None:
        options += ["--offset", str(offset)]
    if sizelimit is not None:
        options += ["--sizelimit", str(sizelimit)]
    if read_only:
        options.append("--read-only")
    device = _attach(image, options)
    log.debug("attached %s to %s", image, device)
    with _undo_on_exit(f"detach {device}", lambda: run(["losetup", "--detach", device])):
        if not partitions:
            yield device
            return
        # Partitions made by partx outlive the loop device unless they are deleted first.
        delete: list[str | os.PathLike[str]] = ["partx", "--delete", device]
        try:
            run(["partx", "--add", device])
        except BaseException:
            run(delete, check=False)
            raise
        with _undo_on_exit(f"remove the partitions of {device}", lambda: run(delete)):
            yield device


@contextlib.contextmanager
def mounted(
    source: str | os.PathLike[str],
    target: Path,
    *,
    fstype: str | None = None,
    options: Sequence[str] = (),
    bind: bool = False,
) -> Iterator[Path]:
    """Mount `source` on `target` (created if missing) and unmount it when the block ends.

    A target that cannot be unmounted because something still uses it is detached lazily
    (`umount --lazy`) after a warning, so the block never leaves a mount behind.
    """
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    argv: list[str | os.PathLike[str]] = ["mount"]
    if fstype:
        argv += ["-t", fstype]
    if bind:
        argv.append("--bind")
    if options:
        argv += ["-o", ",".join(options)]
    before = _mounts_at(target)
    try:
        run([*argv, source, target])
    except BaseException:
        # Interrupted after mount(8) mounted but before we could know: undo that mount.
        if _mounts_at(target) > before:
            _unmount(target)
        raise
    with _undo_on_exit(f"unmount {target}", lambda: _unmount(target)):
        yield target


def _mounts_at(target: Path) -> int:
    point = os.path.realpath(target)
    return sum(1 for p in mounts_under(MOUNTINFO.read_text(), point) if p == point)


def _unmount(target: Path) -> None:
    proc = run(["umount", target], check=False)
    if proc.returncode != 0:
        log.warning("%s is busy (%s); detaching it lazily", target, proc.stderr.strip())
        run(["umount", "--lazy", target])


def loop_mount_argv(image: Path, offset: int, size: int, target: Path) -> list[str]:
    """The mount command that mounts the ext4 in the `size` bytes of `image` from `offset`
    read-only on `target`: mount attaches a read-only loop device of that part of the
    file, which `umount` detaches again."""
    options = f"ro,loop,offset={offset},sizelimit={size}"
    return ["mount", "-t", "ext4", "-o", options, os.fspath(image), os.fspath(target)]


def umount_argv(target: Path) -> list[str]:
    """The umount command for `target`."""
    return ["umount", os.fspath(target)]


def await_loop_freed(image: Path, offset: int, timeout: float = LOOP_FREE_TIMEOUT) -> None:
    """Wait until the kernel has detached the loop device mount made for `image` at
    `offset` (`loop_mount_argv`): it does so just after `umount`, but not always before
    umount returns. One still attached after `timeout` seconds is detached here."""
    back = os.path.realpath(image)
    deadline = time.monotonic() + timeout
    while True:
        left = [d for d in list_loop_devices() if d.back_file == back and d.offset == offset]
        if not left:
            return
        if time.monotonic() > deadline:
            for dev in left:
                log.warning("%s still holds %s after umount; detaching it", dev.name, back)
                run(["losetup", "--detach", dev.name], check=False)
            return
        time.sleep(0.01)


def unmount_if_mounted(target: Path) -> None:
    """Unmount `target` if something is mounted there (what a plan interrupted between its
    mount and umount leaves); runs no command otherwise."""
    if os.path.isdir(target) and _mounts_at(target):
        _unmount(target)


@contextlib.contextmanager
def bind_mounts(root: Path, paths: Iterable[str | os.PathLike[str]]) -> Iterator[list[Path]]:
    """Bind-mount each host path of `paths` (`/proc`, `/dev` ...) at the same place under
    `root`; yields the mount points and unmounts them all, in reverse, when the block ends.

    Binds are not recursive: list `/dev/pts` after `/dev` if the chroot needs it.
    """
    root = Path(root)
    with contextlib.ExitStack() as stack:
        points = []
        for path in paths:
            source = Path(path)
            if not source.is_absolute():
                raise UserError(
                    f"bind mount source {source} is not absolute", "give host paths such as /proc"
                )
            points.append(
                stack.enter_context(mounted(source, root / source.relative_to("/"), bind=True))
            )
        yield points


def cleanup_stale(workdir: Path) -> list[str]:
    """Undo the mounts under `workdir` and detach loop devices whose image lies there.

    For a re-run after a crash or `kill -9`: a context manager that never got to its
    cleanup leaves these behind. Returns what was undone, for the log.
    """
    directory = os.path.realpath(workdir)
    undone = []
    for point in mounts_under(MOUNTINFO.read_text(), directory):
        _unmount(Path(point))
        undone.append(f"unmounted {point}")
    for dev in loops_under(list_loop_devices(), directory):
        # Partitions made by partx would outlive the device: delete them first.
        run(["partx", "--delete", dev.name], check=False)
        run(["losetup", "--detach", dev.name])
        undone.append(f"detached {dev.name} ({dev.back_file})")
    for line in undone:
        log.info("cleaned up: %s", line)
    return undone
