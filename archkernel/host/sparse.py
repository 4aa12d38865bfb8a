"""Sparse files copied as sparse files: a reflink where the file system can, else only data.

A disk image is mostly holes. `copy_sparse` shares the extents (reflink, O(1)) on btrfs,
XFS and the like; elsewhere it copies only the ranges that hold data (`data_extents`, by
SEEK_DATA/SEEK_HOLE) in the kernel with copy_file_range, and where even that fails it
reads and writes, skipping zero blocks, so holes stay holes.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator

from archkernel.units import MiB

# Linux's FICLONE ioctl, _IOW(0x94, 9, int): share all extents with another file (reflink).
_FICLONE = 0x4004_9409


def pread_all(fd: int, length: int, offset: int) -> bytes:
    """`length` bytes of `fd` from `offset` (fewer only at its end), in as many reads as needed."""
    chunks = []
    while length:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            break
        chunks.append(chunk)
        length -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """Write all of `data` to `fd` at `offset`, however os.pwrite splits it."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of the ranges of `fd` that hold data, by SEEK_DATA/SEEK_HOLE.

    Where the file system or device cannot tell, the whole file counts as data.
    """
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                return
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP) and pos == 0:
                yield (0, size)
                return
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if end <= start:
            return
        yield (start, end)
        pos = end


def _copy_range(src: int, dst: int, start: int, end: int) -> None:
    """Copy [start, end) at the same offsets, in the kernel when it can."""
    offset = start
    try:
        while offset < end:
            copied = os.copy_file_range(src, dst, end - offset, offset, offset)
            if copied == 0:  # the source shrank under us
                return
            offset += copied
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    # No in-kernel copy between these files: read and write, skipping zero blocks.
    zero = bytes(MiB)
    while offset < end:
        want = min(MiB, end - offset)
        chunk = os.pread(src, want, offset)
        if not chunk:
            return
        if chunk != zero[: len(chunk)]:
            pwrite_all(dst, chunk, offset)
        offset += len(chunk)


def copy_sparse(src: int, dst: int, size: int) -> str:
    """Copy `size` bytes of `src` into the empty file `dst`, keeping holes as holes.

    Tries a reflink first (O(1) on btrfs, XFS and similar), then copies only the data
    extents. Returns how: "reflink" or "extents".
    """
    try:
        fcntl.ioctl(dst, _FICLONE, src)
        return "reflink"
    except OSError as exc:
        if exc.errno not in (
            errno.EOPNOTSUPP,
            errno.ENOTTY,
            errno.EXDEV,
            errno.EINVAL,
            errno.ENOSYS,
        ):
            raise
    os.ftruncate(dst, size)
    for start, end in data_extents(src, size):
        _copy_range(src, dst, start, end)
    return "extents"
