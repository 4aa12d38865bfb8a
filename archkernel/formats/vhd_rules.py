"""Azure's rules for an uploaded fixed VHD, applied to a footer and a file size.

Azure takes a fixed VHD whose disk is a whole number of MiB, at most 1023 GiB, with a
valid footer that matches the file. `check_footer` reports every rule (and, for a file
without a footer, whether its partition table says it was cut short), `size_problem`
says why a raw image cannot become such a VHD, and `decide_append` whether a file needs
a footer at all. Pure functions: `vhd_file` reads the bytes they judge.
"""

from __future__ import annotations

import shlex
import struct
import uuid
from dataclasses import dataclass
from pathlib import PurePath

from archkernel.errors import UserError
from archkernel.formats.vhd import (
    COOKIE,
    DISK_TYPE_DIFFERENCING,
    DISK_TYPE_DYNAMIC,
    DISK_TYPE_FIXED,
    FIXED_DATA_OFFSET,
    FOOTER_SIZE,
    Footer,
    checksum,
    footer,
    parse_footer,
)
from archkernel.units import SECTOR, GiB, KiB, MiB

AZURE_MAX = 1023 * GiB

# Rule names of `check_footer`, in the order they are reported.
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


def _human(size: int) -> str:
    for unit, factor in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
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


# The start of a disk that `described_size` reads: the MBR (LBA 0) and the GPT header (LBA 1).
HEAD_SIZE = 2 * SECTOR
_GPT_SIGNATURE = b"EFI PART"
_MBR_SIGNATURE = b"\x55\xaa"
_MBR_PROTECTIVE = 0xEE


def described_size(head: bytes) -> int | None:
    """The disk size in bytes that the partition table in `head` (a disk's first 1024
    bytes) describes: up to the GPT's backup header, else the end of the last MBR
    partition; None without a partition table."""
    if len(head) >= HEAD_SIZE and head[SECTOR : SECTOR + 8] == _GPT_SIGNATURE:
        current, backup = struct.unpack_from("<QQ", head, SECTOR + 24)
        if current == 1 and backup > 1:
            return int(backup + 1) * SECTOR
    if len(head) < SECTOR or head[510:512] != _MBR_SIGNATURE:
        return None
    ends = []
    for i in range(4):
        kind, start, count = struct.unpack_from("<4xB3xII", head, 446 + 16 * i)
        if kind and count and not (kind == _MBR_PROTECTIVE and count == 0xFFFF_FFFF):
            ends.append((start + count) * SECTOR)
    return max(ends) if ends else None


@dataclass(frozen=True)
class RuleResult:
    """One of `check_footer`'s rules applied to a footer: its name, whether it held, and why."""

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
    """What `check_footer` found: one result per rule, and the footer when there was one."""

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

    truncated: bool = False  # no footer, and shorter than the disk it starts

    @property
    def hint(self) -> str | None:
        """How to fix what the rules found, when one step does: a dynamic or differencing
        VHD is converted to a fixed one; a truncated file must be fetched again."""
        if self.truncated:
            return (
                "copy or download the file again: it is shorter than the disk it holds, so "
                "making it a VHD with from-raw would upload a damaged disk"
            )
        f = self.footer
        if f is not None and f.disk_type in (DISK_TYPE_DYNAMIC, DISK_TYPE_DIFFERENCING):
            fixed = PurePath(self.path)
            fixed = fixed.with_name(f"{fixed.stem}-fixed.vhd")
            return (
                f"make a fixed VHD of it: qemu-img convert -f vpc -O vpc -o "
                f"subformat=fixed,force_size {shlex.quote(self.path)} {shlex.quote(str(fixed))}"
            )
        return None

    def __str__(self) -> str:
        return "\n".join([f"{self.path}:", *(f"  {r}" for r in self.results)])


def _without_footer(file_size: int, found: str, otherwise: str, head: bytes, path: str) -> Report:
    """The report on a file that does not end with a footer (`found` says what it ends
    with): a disk, or a dynamic VHD (which starts with a copy of its footer), that lost its
    end; else `otherwise`, what the file seems to be."""
    described = described_size(head)
    truncated = True
    if head[: len(COOKIE)] == COOKIE:
        detail = f"{found}, yet it starts with one (a dynamic VHD's copy): it looks truncated"
    elif described is not None and described > file_size:
        detail = (
            f"{found}, and its partition table describes a {_human(described)} disk but the "
            f"file holds {_human(file_size)}: it looks truncated"
        )
    else:
        detail, truncated = f"{found}{otherwise}", False
    result = RuleResult("cookie", False, detail)
    return Report(path, file_size, (result,), None, truncated=truncated)


def check_footer(
    tail: bytes, file_size: int, path: str = "<footer>", *, head: bytes = b""
) -> Report:
    """Apply Azure's fixed-VHD rules to `tail`, the last 512 bytes of a file of `file_size`.

    Without the cookie the bytes are not a footer at all, so that is the only rule reported;
    `head`, the file's first `HEAD_SIZE` bytes, then tells a raw image from a cut-off disk.
    """
    if file_size < FOOTER_SIZE or len(tail) != FOOTER_SIZE:
        found = f"the file is {file_size} bytes, too small to end with a VHD footer"
        return _without_footer(file_size, found, "", head, path)
    f = parse_footer(tail)
    if f.cookie != COOKIE:
        found = f"the last 512 bytes start with {f.cookie!r}, not {COOKIE!r}"
        raw = ": not a VHD (a raw image? convert it with from-raw)"
        return _without_footer(file_size, found, raw, head, path)
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
