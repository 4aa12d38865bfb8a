"""VHD files: check one against Azure's rules, make one from a raw image, or take it back.

`examine` and `check` read a file's last 512 bytes (and its first 1024 when those are not a
footer, to tell a raw image from a truncated disk) and apply `vhd_rules` to them;
`append_footer` turns a raw image into a fixed VHD in place in O(1) and `strip_footer`
undoes it; `from_raw` writes a VHD beside a raw image by cloning or copying only its data
extents (`host.sparse`), so the result stays sparse, and `to_raw` writes the raw image of a
VHD beside it the same way. Only regular files and block devices are opened: a FIFO or a
character device named by mistake is refused first (`_open_image`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
import uuid

from archkernel.errors import UserError
from archkernel.formats.vhd import COOKIE, FOOTER_SIZE, Footer, footer, parse_footer, vhd_timestamp
from archkernel.formats.vhd_rules import HEAD_SIZE, Problem, Report, check_footer, decide_append
from archkernel.host.files import atomic_path
from archkernel.host.sparse import copy_sparse, pread_all, pwrite_all
from archkernel.log import log
from archkernel.units import MiB


def _default_timestamp() -> int:
    """Now, or SOURCE_DATE_EPOCH when set, as a VHD timestamp."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "")
    return vhd_timestamp(int(epoch) if epoch.isdigit() else time.time())


def _io_error(action: str, path: str | os.PathLike[str], exc: OSError) -> UserError:
    reason = exc.strerror or str(exc)
    hint = "check the path and its permissions"
    if exc.errno == errno.ENOSPC:
        hint = "free space on that file system"
    return UserError(f"cannot {action} {os.fspath(path)}: {reason}", hint)


_KINDS = {
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFCHR: "a character device",
    stat.S_IFSOCK: "a socket",
}


def _refuse_unless_image(path: str | os.PathLike[str], mode: int) -> None:
    if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
        return
    if stat.S_ISDIR(mode):
        reason = os.strerror(errno.EISDIR)
    else:
        kind = _KINDS.get(stat.S_IFMT(mode), "not a file")
        reason = f"it is {kind}, not a regular file or a block device"
    raise UserError(f"cannot open {os.fspath(path)}: {reason}", "name the disk image file")


def _open_image(path: str | os.PathLike[str], flags: int = os.O_RDONLY) -> int:
    """Open the disk image at `path`, a regular file or a block device, and nothing else.

    Its type is checked before it is opened (opening a FIFO waits for a writer, forever;
    opening some character devices acts on them), and again on what was opened, without
    waiting, in case the path changed in between. Returns a blocking descriptor.
    """
    try:
        _refuse_unless_image(path, os.stat(path).st_mode)
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        raise _io_error("open", path, exc) from exc
    try:
        _refuse_unless_image(path, os.fstat(fd).st_mode)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _size_and_tail(fd: int) -> tuple[int, bytes]:
    """A file's size (block devices included) and its last 512 bytes (empty if shorter)."""
    size = os.lseek(fd, 0, os.SEEK_END)
    if size < FOOTER_SIZE:
        return size, b""
    return size, pread_all(fd, FOOTER_SIZE, size - FOOTER_SIZE)


def examine(path: str | os.PathLike[str]) -> Report:
    """Apply Azure's fixed-VHD rules to the file at `path`; reads only its last 512 bytes,
    and its first 1024 when it does not end with a footer. Refuses anything but a regular
    file or a block device before opening it."""
    fd = _open_image(path)
    try:
        size, tail = _size_and_tail(fd)
        head = b""
        if tail[: len(COOKIE)] != COOKIE:
            head = pread_all(fd, min(HEAD_SIZE, size), 0) if size else b""
    except OSError as exc:
        raise _io_error("read", path, exc) from exc
    finally:
        os.close(fd)
    return check_footer(tail, size, os.fspath(path), head=head)


def check(path: str | os.PathLike[str]) -> list[Problem]:
    """The Azure rules the file at `path` breaks as a VHD; empty when Azure accepts it.

    O(1): reads only the last 512 bytes. `examine` gives every rule's result.
    """
    return examine(path).problems


def check_or_raise(path: str | os.PathLike[str]) -> Footer:
    """Return the footer of the VHD at `path`, or raise a UserError listing every failed rule."""
    report = examine(path)
    if not report.ok or report.footer is None:
        lines = "\n".join(f"  {p}" for p in report.problems)
        raise UserError(
            f"{os.fspath(path)} is not a VHD Azure accepts:\n{lines}",
            report.hint
            or "rebuild it with `archkernel vhd from-raw RAW VHD` from a raw image whose size "
            "is a whole number of MiB, at most 1023 GiB",
        )
    return report.footer


def raw_size(vhd: str | os.PathLike[str]) -> int:
    """The size of the disk inside the fixed VHD at `vhd` (its file size less the footer)."""
    return check_or_raise(vhd).current_size


def append_footer(
    raw: str | os.PathLike[str],
    *,
    timestamp: int | None = None,
    unique_id: uuid.UUID | None = None,
) -> Footer:
    """Make the raw image `raw` a fixed VHD in place by appending a footer; O(1), stays sparse.

    Refuses a size that is not a whole MiB or above 1023 GiB, and a file that already ends
    with a footer unless it is exactly ours (then nothing is written). `timestamp` is a VHD
    timestamp; by default SOURCE_DATE_EPOCH or now. Returns the footer the file ends with.
    """
    name = os.fspath(raw)
    fd = _open_image(raw, os.O_RDWR)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UserError(f"{name} is not a regular file", "pass the raw disk image file")
        size, tail = _size_and_tail(fd)
        if not decide_append(size, tail, timestamp=timestamp, unique_id=unique_id, name=name):
            log.info("%s already ends with its VHD footer", name)
            return parse_footer(tail)
        data = footer(
            size,
            timestamp=_default_timestamp() if timestamp is None else timestamp,
            unique_id=uuid.uuid4() if unique_id is None else unique_id,
        )
        try:
            pwrite_all(fd, data, size)
            os.fsync(fd)
        except OSError as exc:
            # Leave the raw image as it was rather than with half a footer.
            os.ftruncate(fd, size)
            raise _io_error("append a VHD footer to", raw, exc) from exc
        log.debug("appended a %d MiB fixed VHD footer to %s", size // MiB, name)
        return parse_footer(data)
    except OSError as exc:
        raise _io_error("update", raw, exc) from exc
    finally:
        os.close(fd)


def strip_footer(vhd: str | os.PathLike[str]) -> int:
    """Turn the fixed VHD at `vhd` back into its raw image in place; returns the raw size."""
    size = raw_size(vhd)
    try:
        os.truncate(vhd, size)
    except OSError as exc:
        raise _io_error("truncate", vhd, exc) from exc
    return size


def from_raw(
    raw: str | os.PathLike[str],
    vhd: str | os.PathLike[str],
    *,
    timestamp: int | None = None,
    unique_id: uuid.UUID | None = None,
    replace: bool = True,
) -> Footer:
    """Write the fixed VHD of the raw image `raw` to `vhd` atomically; `raw` is not changed.

    The data is reflinked when the file system can, otherwise only its data extents are
    copied (in the kernel), so the VHD is as sparse as the raw image. The same size rules
    as `append_footer` apply. An existing `vhd` is replaced, or with `replace=False`
    refused before anything is read. Returns the footer written.
    """
    raw_name, vhd_name = os.fspath(raw), os.fspath(vhd)
    src = _open_image(raw)
    try:
        src_stat = os.fstat(src)
        try:
            vhd_stat = os.stat(vhd)
        except FileNotFoundError:
            pass
        else:
            if (vhd_stat.st_dev, vhd_stat.st_ino) == (src_stat.st_dev, src_stat.st_ino):
                raise UserError(
                    f"{vhd_name} is the raw image itself",
                    "name another file, or use append-footer to convert in place",
                )
            if not replace:
                raise UserError(f"{vhd_name} exists", "name another file, or replace it (--force)")
        size, tail = _size_and_tail(src)
        if not decide_append(size, tail, timestamp=timestamp, unique_id=unique_id, name=raw_name):
            raise UserError(
                f"{raw_name} already is a fixed VHD", f"use it as it is, or copy it to {vhd_name}"
            )
        data = footer(
            size,
            timestamp=_default_timestamp() if timestamp is None else timestamp,
            unique_id=uuid.uuid4() if unique_id is None else unique_id,
        )
        try:
            with atomic_path(vhd) as tmp:
                dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    how = copy_sparse(src, dst, size)
                    pwrite_all(dst, data, size)
                finally:
                    os.close(dst)
        except OSError as exc:
            raise _io_error(f"write {raw_name} as a VHD to", vhd, exc) from exc
        log.debug("wrote %s from %s (%s) with a %d MiB footer", vhd_name, raw_name, how, size >> 20)
        return parse_footer(data)
    except OSError as exc:
        raise _io_error("read", raw, exc) from exc
    finally:
        os.close(src)


def to_raw(vhd: str | os.PathLike[str], raw: str | os.PathLike[str]) -> int:
    """Write the raw image inside the fixed VHD `vhd` to `raw` atomically; `vhd` is not
    changed. Reflinked or copied by data extents as in `from_raw`, so `raw` stays sparse.
    Returns the raw image's size."""
    size = raw_size(vhd)
    src = _open_image(vhd)
    try:
        with atomic_path(raw) as tmp:
            dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                how = copy_sparse(src, dst, size)
                os.ftruncate(dst, size)  # a reflink brought the footer along
            finally:
                os.close(dst)
    except OSError as exc:
        raise _io_error(f"write the raw image of {os.fspath(vhd)} to", raw, exc) from exc
    finally:
        os.close(src)
    log.debug("wrote %s from %s (%s), %d MiB", os.fspath(raw), os.fspath(vhd), how, size >> 20)
    return size
