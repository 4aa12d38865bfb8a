"""Atomic writes: a target is either the old file, the new file, or absent.

Work happens on a temporary name beside the target (same file system, so the final
rename is atomic); the temporary name is removed on any failure, Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from archkernel.errors import UserError


def _tmp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` when the block ends.

    The caller creates a file or a directory at the yielded path. If the block raises,
    the temporary path is removed and `target` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(target)
    remove_stale_temporaries(target)
    remove_path(tmp)
    try:
        yield tmp
        if tmp.is_dir() and not tmp.is_symlink():
            replace_tree(tmp, target, target.with_name(f".{target.name}.old-{os.getpid()}"))
        else:
            _fsync(tmp)
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        remove_path(tmp)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def replace_tree(staged: Path, target: Path, old: Path) -> None:
    """Rename the directory `staged` onto `target`. A directory cannot be renamed over a
    non-empty one, so an existing `target` moves aside to `old` first and is removed only
    once the new tree is in place."""
    if not target.exists():
        os.rename(staged, target)
        return
    remove_path(old)
    os.rename(target, old)
    os.rename(staged, target)
    remove_path(old)


def remove_stale_temporaries(target: str | os.PathLike[str]) -> None:
    """Remove temporary names of `target` left by processes that were killed."""
    target = Path(target)
    for kind in ("tmp", "old"):
        for path in target.parent.glob(f".{target.name}.{kind}-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and (int(pid) == os.getpid() or not _pid_alive(int(pid))):
                remove_path(path)


def write_bytes(target: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> Path:
    """Write `data` to `target` atomically."""
    with atomic_path(target) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
    return Path(target)


def write_text(target: str | os.PathLike[str], text: str, mode: int = 0o644) -> Path:
    """Write `text` (UTF-8) to `target` atomically."""
    return write_bytes(target, text.encode(), mode)


def write_if_changed(target: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> bool:
    """Write `data` unless `target` already holds it; keep the old mtime then.

    Returns True when the file was (re)written. Steps use this so an unchanged result
    keeps the steps after them up to date.
    """
    path = Path(target)
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return False
    write_bytes(path, data, mode)
    return True


def is_under(path: str | os.PathLike[str], directory: str | os.PathLike[str]) -> bool:
    """True if `path` is `directory` or lies below it, by the names alone (no symlinks
    resolved, so pass real paths); every path is below '/'."""
    p, d = os.fspath(path), os.fspath(directory).rstrip("/")
    return p == d or p.startswith(d + "/") or d == ""


def mount_points_under(path: str | os.PathLike[str]) -> list[str]:
    """Mount points at or below `path`, deepest first (from /proc/self/mountinfo)."""
    # mounts imports this module: its one mountinfo parser is imported when used.
    from archkernel.host import mounts

    try:
        text = mounts.MOUNTINFO.read_text()
    except OSError:
        return []
    return mounts.mounts_under(text, os.path.realpath(path))


def remove_path(path: str | os.PathLike[str]) -> None:
    """Remove a file, symlink or directory tree; a missing path is fine.

    A tree with something mounted inside (a chroot's /dev, say) is never removed: that
    would delete the host's files through the mount.
    """
    p = Path(path)
    if p.is_symlink() or p.is_file():
        p.unlink(missing_ok=True)
    elif p.is_dir():
        busy = mount_points_under(p)
        if busy:
            raise UserError(
                f"refusing to remove {p}: {busy[0]} is mounted inside it",
                f"unmount it first (umount -R {busy[0]})",
            )
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def temporary_directory(prefix: str = "archkernel-", parent: str | None = None) -> Iterator[Path]:
    """A temporary directory removed on any exit, Ctrl-C included."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield path
    finally:
        if not mount_points_under(path):  # never delete through a mount left inside
            shutil.rmtree(path, ignore_errors=True)


def _fsync(path: Path) -> None:
    if path.is_file():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
