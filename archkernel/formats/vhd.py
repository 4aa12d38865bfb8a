"""Fixed VHD: a raw disk image followed by one 512-byte footer, the only format Azure takes.

A fixed VHD needs no conversion of the disk data, so everything here works on the footer
alone: `footer` decides its bytes (pure), `append_footer` turns a raw image into a VHD in
place in O(1), `from_raw` makes a VHD beside a raw image by cloning or copying only its
data extents (the result stays sparse), and `check` applies Azure's rules by reading the
last 512 bytes of a file.

Layout and rules: the VHD specification's fixed-disk footer, and Azure's rules for uploaded disks.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from archkernel.errors import UserError
from archkernel.host.files import atomic_path
from archkernel.log import log

SECTOR = 512
MiB = 1 << 20
GiB = 1 << 30
FOOTER_SIZE = 512

COOKIE = b"conectix"
FEATURES_RESERVED = 0x2  # the spec's "reserved" feature bit, always set
FORMAT_VERSION = 0x0001_0000
FIXED_DATA_OFFSET = 0xFFFF_FFFF_FFFF_FFFF  # fixed disks have no dynamic header
DISK_TYPE_FIXED = 2
DISK_TYPE_DYNAMIC = 3
DISK_TYPE_DIFFERENCING = 4
DISK_TYPE_NAMES = {
    0: "none",
    DISK_TYPE_FIXED: "fixed",
    DISK_TYPE_DYNAMIC: "dynamic",
    DISK_TYPE_DIFFERENCING: "differencing",
}

# CHS geometry limits from the VHD specification (cylinders, heads, sectors per track).
CHS_MAX = (65535, 16, 255)
CHS_MAX_SECTORS = 65535 * 16 * 255

# VHD timestamps count seconds from 2000-01-01 00:00:00 UTC.
VHD_EPOCH = 946_684_800

# QEMU 7.2 believes `current size` only for a few creators ('win ' among them) and otherwise
# derives a smaller size from the geometry; newer QEMU believes it for 'win ' as well.
CREATOR_APP = b"win "
CREATOR_VERSION = 0x000A_0000  # 10.0, as Windows 10 / Server 2016 Hyper-V writes
CREATOR_OS = b"Wi2k"

AZURE_MAX = 1023 * GiB

_CHECKSUM_OFFSET = 64
# cookie, features, version, data offset, timestamp, creator app/version/OS, original size,
# current size, cylinders, heads, sectors, disk type, checksum, unique id, saved state, zero
_LAYOUT = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427s")
assert _LAYOUT.size == FOOTER_SIZE

# Rule names of `check`, in the order they are reported.
RULES = (
    "cookie",
    "checksum",
    "disk-type",
    "data-offset",
    "whole-mib",
    "azure-max",
    "file-size",
    "original-size",
)


@dataclass(frozen=True)
class Footer:
    """Every field of a VHD footer, as stored (big-endian integers decoded)."""

    cookie: bytes
    features: int
    format_version: int
    data_offset: int
    timestamp: int  # seconds since 2000-01-01 00:00:00 UTC
    creator_app: bytes
    creator_version: int
    creator_os: bytes
    original_size: int
    current_size: int
    cylinders: int
    heads: int
    sectors_per_track: int
    disk_type: int
    checksum: int
    unique_id: uuid.UUID
    saved_state: int
    reserved: bytes = bytes(427)

    def pack(self) -> bytes:
        """The 512 footer bytes, with the checksum field exactly as stored in `checksum`."""
        try:
            return _LAYOUT.pack(
                self.cookie,
                self.features,
                self.format_version,
                self.data_offset,
                self.timestamp,
                self.creator_app,
                self.creator_version,
                self.creator_os,
                self.original_size,
                self.current_size,
                self.cylinders,
                self.heads,
                self.sectors_per_track,
                self.disk_type,
                self.checksum,
                self.unique_id.bytes,
                self.saved_state,
                self.reserved,
            )
        except struct.error as exc:
            raise UserError(
                f"cannot encode VHD footer: {exc}",
                "every field must fit its width in the VHD footer layout",
            ) from exc

    @property
    def geometry(self) -> tuple[int, int, int]:
        """(cylinders, heads, sectors per track)."""
        return (self.cylinders, self.heads, self.sectors_per_track)

    @property
    def disk_type_name(self) -> str:
        """'fixed', 'dynamic', 'differencing', or 'unknown (N)'."""
        return DISK_TYPE_NAMES.get(self.disk_type, f"unknown ({self.disk_type})")


# --- deciding: pure functions --------------------------------------------------------------


def chs_geometry(size_bytes: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) for a disk of `size_bytes`, by the VHD spec.

    This is the specification's algorithm (appendix "CHS calculation"): sectors beyond
    65535*16*255 are ignored, so every disk of about 127 GiB or more gets the maximum.
    """
    total = min(max(size_bytes, 0) // SECTOR, CHS_MAX_SECTORS)
    if total >= 65535 * 16 * 63:
        sectors, heads = 255, 16
        cyl_times_heads = total // sectors
    else:
        sectors = 17
        cyl_times_heads = total // sectors
        heads = max((cyl_times_heads + 1023) // 1024, 4)
        if cyl_times_heads >= heads * 1024 or heads > 16:
            sectors, heads = 31, 16
            cyl_times_heads = total // sectors
        if cyl_times_heads >= heads * 1024:
            sectors, heads = 63, 16
            cyl_times_heads = total // sectors
    return (cyl_times_heads // heads, heads, sectors)


def checksum(footer_bytes: bytes) -> int:
    """The footer checksum: one's complement of the byte sum with the checksum field skipped."""
    if len(footer_bytes) != FOOTER_SIZE:
        raise UserError(
            f"a VHD footer is {FOOTER_SIZE} bytes, got {len(footer_bytes)}",
            "pass exactly the last 512 bytes of the VHD",
        )
    total = sum(footer_bytes) - sum(footer_bytes[_CHECKSUM_OFFSET : _CHECKSUM_OFFSET + 4])
    return ~total & 0xFFFF_FFFF


def vhd_timestamp(unix_seconds: float) -> int:
    """A Unix time as a VHD timestamp (seconds since 2000), clamped to the 32-bit field."""
    return min(max(int(unix_seconds) - VHD_EPOCH, 0), 0xFFFF_FFFF)


def footer(
    size: int,
    *,
    timestamp: int,
    unique_id: uuid.UUID,
    creator_app: bytes = CREATOR_APP,
    creator_version: int = CREATOR_VERSION,
    creator_os: bytes = CREATOR_OS,
) -> bytes:
    """The 512-byte footer of a fixed VHD whose data is `size` bytes.

    `timestamp` is a VHD timestamp (see `vhd_timestamp`). Any whole number of sectors is
    encoded; Azure's stricter rules are applied by `append_footer`, `from_raw` and `check`.
    """
    if size <= 0 or size % SECTOR or size >= 1 << 64:
        raise UserError(
            f"a VHD cannot hold {size} bytes",
            f"the disk size must be a positive multiple of {SECTOR} bytes",
        )
    for name, value in (("creator application", creator_app), ("creator OS", creator_os)):
        if len(value) != 4:
            raise UserError(f"the VHD {name} must be 4 bytes, got {value!r}", "pad it with spaces")
    cylinders, heads, sectors = chs_geometry(size)
    fields = Footer(
        cookie=COOKIE,
        features=FEATURES_RESERVED,
        format_version=FORMAT_VERSION,
        data_offset=FIXED_DATA_OFFSET,
        timestamp=timestamp,
        creator_app=creator_app,
        creator_version=creator_version,
        creator_os=creator_os,
        original_size=size,
        current_size=size,
        cylinders=cylinders,
        heads=heads,
        sectors_per_track=sectors,
        disk_type=DISK_TYPE_FIXED,
        checksum=0,
        unique_id=unique_id,
        saved_state=0,
    )
    unsummed = fields.pack()
    return (
        unsummed[:_CHECKSUM_OFFSET]
        + checksum(unsummed).to_bytes(4, "big")
        + unsummed[_CHECKSUM_OFFSET + 4 :]
    )


def parse_footer(data: bytes) -> Footer:
    """Decode 512 footer bytes into their fields; validates the length only (see `check`)."""
    if len(data) != FOOTER_SIZE:
        raise UserError(
            f"a VHD footer is {FOOTER_SIZE} bytes, got {len(data)}",
            "pass exactly the last 512 bytes of the VHD",
        )
    (
        cookie,
        features,
        format_version,
        data_offset,
        timestamp,
        creator_app,
        creator_version,
        creator_os,
        original_size,
        current_size,
        cylinders,
        heads,
        sectors_per_track,
        disk_type,
        stored_checksum,
        unique_id,
        saved_state,
        reserved,
    ) = _LAYOUT.unpack(data)
    return Footer(
        cookie=cookie,
        features=features,
        format_version=format_version,
        data_offset=data_offset,
        timestamp=timestamp,
        creator_app=creator_app,
        creator_version=creator_version,
        creator_os=creator_os,
        original_size=original_size,
        current_size=current_size,
        cylinders=cylinders,
        heads=heads,
        sectors_per_track=sectors_per_track,
        disk_type=disk_type,
        checksum=stored_checksum,
        unique_id=uuid.UUID(bytes=unique_id),
        saved_state=saved_state,
        reserved=reserved,
    )


def _human(size: int) -> str:
    for unit, factor in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} bytes"


def size_problem(size: int, name: str = "the raw image") -> UserError | None:
    """Why a raw image of `size` bytes cannot become an Azure VHD, or None if it can."""
    if size <= 0:
        return UserError(f"{name} is empty", "build the disk image first")
    if size % MiB:
        whole = -(-size // MiB)
        return UserError(
            f"{name} is {size} bytes, not a whole number of MiB; Azure rejects such a VHD",
            f"resize to {whole} MiB (truncate -s {whole}M; on GPT, sgdisk -e moves the backup "
            "header to the new end)",
        )
    if size > AZURE_MAX:
        return UserError(
            f"{name} is {_human(size)}, more than Azure's limit of 1023 GiB for an uploaded disk",
            f"resize to {AZURE_MAX // MiB} MiB or less",
        )
    return None


@dataclass(frozen=True)
class RuleResult:
    """One of `check`'s rules applied to a footer: its name, whether it held, and why."""

    rule: str
    ok: bool
    detail: str

    def __str__(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.rule}: {self.detail}"


@dataclass(frozen=True)
class Problem:
    """A rule a VHD breaks, with a readable line saying how."""

    rule: str
    detail: str

    def __str__(self) -> str:
        return f"{self.rule}: {self.detail}"


@dataclass(frozen=True)
class Report:
    """What `check` found: one result per rule, and the footer when there was one."""

    path: str
    file_size: int
    results: tuple[RuleResult, ...]
    footer: Footer | None

    @property
    def ok(self) -> bool:
        """True when every rule held."""
        return all(r.ok for r in self.results)

    @property
    def problems(self) -> list[Problem]:
        """One problem per failed rule, in rule order."""
        return [Problem(r.rule, r.detail) for r in self.results if not r.ok]

    @property
    def failed(self) -> set[str]:
        """Names of the failed rules."""
        return {r.rule for r in self.results if not r.ok}

    def __str__(self) -> str:
        return "\n".join([f"{self.path}:", *(f"  {r}" for r in self.results)])


def check_footer(tail: bytes, file_size: int, path: str = "<footer>") -> Report:
    """Apply Azure's fixed-VHD rules to `tail`, the last 512 bytes of a file of `file_size`.

    Without the cookie the bytes are not a footer at all, so that is the only rule reported.
    """
    if file_size < FOOTER_SIZE or len(tail) != FOOTER_SIZE:
        result = RuleResult(
            "cookie", False, f"the file is {file_size} bytes, too small to end with a VHD footer"
        )
        return Report(path, file_size, (result,), None)
    f = parse_footer(tail)
    if f.cookie != COOKIE:
        result = RuleResult(
            "cookie",
            False,
            f"the last 512 bytes start with {f.cookie!r}, not {COOKIE!r}: not a VHD "
            "(a raw image? convert it with from-raw)",
        )
        return Report(path, file_size, (result,), None)
    computed = checksum(tail)
    data_size = file_size - FOOTER_SIZE
    size = f.current_size
    whole_mib = size > 0 and size % MiB == 0
    original_ok = 0 < f.original_size <= size and f.original_size % SECTOR == 0

    def rule(name: str, ok: bool, detail: str, why: str) -> RuleResult:
        return RuleResult(name, ok, detail if ok else f"{detail}{why}")

    results = (
        rule("cookie", True, f"cookie is {COOKIE!r}", ""),
        rule(
            "checksum",
            f.checksum == computed,
            f"stored 0x{f.checksum:08X}",
            f", computed 0x{computed:08X} (a corrupt or hand-edited footer)",
        ),
        rule(
            "disk-type",
            f.disk_type == DISK_TYPE_FIXED,
            f"disk type is {f.disk_type_name}",
            "; Azure accepts only fixed VHDs",
        ),
        rule(
            "data-offset",
            f.data_offset == FIXED_DATA_OFFSET,
            f"data offset is 0x{f.data_offset:X}",
            f", a fixed disk has 0x{FIXED_DATA_OFFSET:X}",
        ),
        rule(
            "whole-mib",
            whole_mib,
            f"current size is {size} bytes" + (f" ({size // MiB} MiB)" if whole_mib else ""),
            ", Azure needs a positive whole number of MiB",
        ),
        rule(
            "azure-max",
            size <= AZURE_MAX,
            f"current size is {_human(size)}",
            ", more than Azure's limit of 1023 GiB",
        ),
        rule(
            "file-size",
            data_size == size,
            f"{data_size} bytes before the footer",
            f", the footer says {size} (a truncated or padded file?)",
        ),
        rule(
            "original-size",
            original_ok,
            f"original size is {f.original_size} bytes",
            ", expected a positive number of sectors no larger than the current size",
        ),
    )
    return Report(path, file_size, results, f)


def decide_append(
    file_size: int,
    tail: bytes,
    *,
    timestamp: int | None = None,
    unique_id: uuid.UUID | None = None,
    name: str = "the raw image",
) -> bool:
    """Whether a file of `file_size` ending with `tail` needs a footer appended.

    False means it already ends with exactly the footer this module writes for the data
    before it (a re-run); `timestamp` and `unique_id`, when given, must match it too.
    A file ending with any other footer is refused: a second footer would hide the first
    inside the disk. So is a size Azure rejects.
    """
    if file_size >= FOOTER_SIZE and tail[: len(COOKIE)] == COOKIE:
        existing = parse_footer(tail)
        data_size = file_size - FOOTER_SIZE
        if size_problem(data_size) is None and data_size == existing.current_size:
            ours = footer(
                data_size,
                timestamp=existing.timestamp if timestamp is None else timestamp,
                unique_id=existing.unique_id if unique_id is None else unique_id,
            )
            if ours == tail:
                return False
        raise UserError(
            f"{name} already ends with a VHD footer ({existing.disk_type_name}, "
            f"creator {existing.creator_app!r}, current size {existing.current_size})",
            "it is a VHD already: check it with `archkernel vhd check`, or strip the footer "
            "to get the raw image back",
        )
    problem = size_problem(file_size, name)
    if problem is not None:
        raise problem
    return True


# --- acting: files -------------------------------------------------------------------------


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


def _size_and_tail(fd: int) -> tuple[int, bytes]:
    """A file's size (block devices included) and its last 512 bytes (empty if shorter)."""
    size = os.lseek(fd, 0, os.SEEK_END)
    if size < FOOTER_SIZE:
        return size, b""
    return size, _pread_all(fd, FOOTER_SIZE, size - FOOTER_SIZE)


def _pread_all(fd: int, length: int, offset: int) -> bytes:
    chunks = []
    while length:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            break
        chunks.append(chunk)
        length -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def examine(path: str | os.PathLike[str]) -> Report:
    """Apply Azure's fixed-VHD rules to the file at `path`; reads only its last 512 bytes."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise _io_error("open", path, exc) from exc
    try:
        size, tail = _size_and_tail(fd)
    except OSError as exc:
        raise _io_error("read", path, exc) from exc
    finally:
        os.close(fd)
    return check_footer(tail, size, os.fspath(path))


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
            "rebuild it with `archkernel vhd from-raw RAW VHD` from a raw image whose size is "
            "a whole number of MiB, at most 1023 GiB",
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
    try:
        fd = os.open(raw, os.O_RDWR)
    except OSError as exc:
        raise _io_error("open", raw, exc) from exc
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
            _pwrite_all(fd, data, size)
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


# Linux's FICLONE ioctl, _IOW(0x94, 9, int): share all extents with another file (reflink).
_FICLONE = 0x4004_9409


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
            _pwrite_all(dst, chunk, offset)
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


def from_raw(
    raw: str | os.PathLike[str],
    vhd: str | os.PathLike[str],
    *,
    timestamp: int | None = None,
    unique_id: uuid.UUID | None = None,
) -> Footer:
    """Write the fixed VHD of the raw image `raw` to `vhd` atomically; `raw` is not changed.

    The data is reflinked when the file system can, otherwise only its data extents are
    copied (in the kernel), so the VHD is as sparse as the raw image. The same size rules
    as `append_footer` apply. Returns the footer written.
    """
    raw_name, vhd_name = os.fspath(raw), os.fspath(vhd)
    try:
        src = os.open(raw, os.O_RDONLY)
    except OSError as exc:
        raise _io_error("open", raw, exc) from exc
    try:
        src_stat = os.fstat(src)
        if stat.S_ISDIR(src_stat.st_mode):
            raise UserError(f"{raw_name} is a directory", "pass the raw disk image file")
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
                    _pwrite_all(dst, data, size)
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
