"""Initramfs payloads: read a provider's cpio archives, append an archive of our own.

An initrd payload (the bytes after a U-Boot header) is what the kernel's
`init/initramfs.c` unpacks: newc cpio archives one after another, each either plain or
compressed on its own, with zero bytes allowed between them. A later entry replaces an
earlier one of the same path. So we patch an initrd by keeping the provider's payload
byte for byte and appending one more compressed archive that holds only what we add:
every original entry (modes, owners, links, device nodes) stays exactly as it was, and
patching costs one read of the original.

Reading follows the kernel's rules and refuses archives that would write outside their
root, alias paths through symlinks or are not what they claim to be. Nothing here touches
the file system: archives are read and written in memory, through libarchive (`newc`). The
rules live in `cpio` (entries and the tree) and `compression` (members and frames). This
module loads libarchive, so import it only where an initrd is read or written.

Decompression is bounded: members are unpacked as streams and refused once the payload
has unpacked to more than `max_unpacked` bytes, or to more than `max_ratio` times its own
size once past `RATIO_EXEMPT` (a few hundred bytes of bzip2 make 512 MiB of zeros).
"""

from __future__ import annotations

import bz2
import lzma
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from archkernel.errors import UserError
from archkernel.formats import newc
from archkernel.formats.compression import (
    LZ4_FRAME_MAGIC,
    LZ4_LEGACY_MAGIC,
    WRITABLE_COMPRESSIONS,
    corrupt_payload,
    detect_compression,
    lz4_frame_blocks,
    lz4_legacy_from_frame,
    zstd_frame_end,
)
from archkernel.formats.cpio import (
    FILE,
    NEWC_MAGICS,
    Entry,
    TreeRules,
    fixed_mtime,
    normalise_path,
    padding_for,
    plan_additions,
    plan_archive,
    skip_padding,
)
from archkernel.log import log
from archkernel.units import MiB

# What a payload may unpack to. A real initrd unpacks to 2-5 times its size (a C1's to
# about 25 MiB); these bound what a hostile or damaged one costs in memory and time.
MAX_UNPACKED = 1024 * MiB
MAX_RATIO = 100
RATIO_EXEMPT = 32 * MiB  # up to this, any ratio: small archives of repetitive files are fine
_CHUNK = 1 * MiB  # decompressed per step, so a bomb is stopped within a chunk of the limit

# --- reading: split the payload as the kernel does, let libarchive parse each archive ---


@dataclass(frozen=True)
class Segment:
    """One stretch of a payload: a compressed member, or one plain cpio archive."""

    offset: int
    end: int
    compression: str


@dataclass(frozen=True)
class _Payload:
    segments: list[Segment]
    archives: list[list[Entry]]


@dataclass(frozen=True)
class Limits:
    """How far a payload may unpack: `max_unpacked` bytes in all, and no more than
    `max_ratio` times the payload's size beyond RATIO_EXEMPT."""

    max_unpacked: int = MAX_UNPACKED
    max_ratio: int = MAX_RATIO

    def allowed(self, packed: int) -> int:
        """The most a payload of `packed` bytes may unpack to."""
        return min(self.max_unpacked, max(RATIO_EXEMPT, self.max_ratio * packed))

    def refuse(self, source: str, packed: int, compression: str, offset: int) -> UserError:
        """The error for a payload of `packed` bytes that unpacks past `allowed`."""
        limit = self.allowed(packed)
        why = "the limit" if limit == self.max_unpacked else f"over {self.max_ratio} times its size"
        return UserError(
            f"payload of {source} ({_size(packed)}) unpacks to more than {_size(limit)}, {why} "
            f"({compression} data at byte {offset}): a decompression bomb or a damaged initrd",
            "a real initrd unpacks to a few times its size; if this one is genuine, raise "
            "the limits (scaleway.max_initrd_unpacked, scaleway.max_initrd_ratio)",
        )


def _size(size: int) -> str:
    return f"{size // MiB} MiB" if size % MiB == 0 else f"{size} bytes"


def read_entries(
    payload: bytes,
    *,
    source: str,
    with_data: Callable[[str], bool] | None = None,
    max_unpacked: int = MAX_UNPACKED,
    max_ratio: int = MAX_RATIO,
) -> list[Entry]:
    """Every entry of every archive in `payload`, in the order the kernel applies them.

    `with_data(path)` says for which paths to keep a regular file's contents. Archives
    that are damaged, or whose entries would escape or alias the tree, raise UserError;
    so does a payload that unpacks past `max_unpacked` bytes or `max_ratio` times its size.
    """
    parsed = _read_payload(payload, source, with_data, Limits(max_unpacked, max_ratio))
    return [entry for archive in parsed.archives for entry in archive]


def read_segments(
    payload: bytes, *, source: str, max_unpacked: int = MAX_UNPACKED, max_ratio: int = MAX_RATIO
) -> list[Segment]:
    """How `payload` divides into compressed members and plain archives."""
    return _read_payload(payload, source, None, Limits(max_unpacked, max_ratio)).segments


def read_file(
    payload: bytes,
    path: str,
    source: str,
    *,
    max_unpacked: int = MAX_UNPACKED,
    max_ratio: int = MAX_RATIO,
) -> bytes:
    """The contents of the regular file `path` in the tree the payload unpacks to."""
    wanted = normalise_path(path.lstrip("/") or ".", source="the request")  # '/init' is fine
    limits = Limits(max_unpacked, max_ratio)
    parsed = _read_payload(payload, source, lambda p: p == wanted, limits)
    found = [
        (a, i)
        for a, archive in enumerate(parsed.archives)
        for i, entry in enumerate(archive)
        if entry.path == wanted
    ]
    if not found:
        raise UserError(f"{source} has no /{wanted}", "list the initrd with `bsdtar -tvf`")
    a, i = found[-1]
    entry = parsed.archives[a][i]
    if entry.type != FILE:
        raise UserError(
            f"/{wanted} in {source} is a {entry.type}, not a regular file",
            "read the file it points to instead",
        )
    if entry.nlink < 2:
        return entry.data or b""
    # A hard-linked file's contents travel with one member of its link set, usually the last.
    target = entry.linkpath if entry.hardlink else entry.path
    members = [
        j
        for j, other in enumerate(parsed.archives[a])
        if other.type == FILE
        and (other.path == target or (other.hardlink and other.linkpath == target))
    ]
    carriers = [j for j in members if parsed.archives[a][j].size > 0]
    if not carriers:
        return b""
    carrier = parsed.archives[a][carriers[-1]]
    if carrier.data is None:
        again = _read_payload(payload, source, lambda p: p == carrier.path, limits)
        carrier = again.archives[a][carriers[-1]]
    return carrier.data or b""


def _read_payload(
    payload: bytes, source: str, with_data: Callable[[str], bool] | None, limits: Limits
) -> _Payload:
    rules = TreeRules(source)
    segments: list[Segment] = []
    archives: list[list[Entry]] = []
    allowed = limits.allowed(len(payload))
    unpacked = 0  # by every compressed member so far
    pos = 0
    while (pos := skip_padding(payload, pos)) < len(payload):
        try:
            compression = detect_compression(payload[pos : pos + 8], source=source)
        except UserError as exc:
            if not archives:
                raise
            raise UserError(
                f"payload of {source} has unknown data after its archives, at byte {pos} "
                f"(starts with {payload[pos : pos + 8].hex(' ')})",
                "the kernel would refuse it too; download the initrd again",
            ) from exc
        if compression == "none":
            if pos % 4:
                raise UserError(
                    f"payload of {source} has a cpio archive at byte {pos}, "
                    "not on a 4-byte boundary",
                    "the kernel would refuse it too; the payload is damaged",
                )
            entries, length = newc.read_archive(payload, pos, source, with_data, rules)
            archives.append(entries)
            segments.append(Segment(pos, pos + length, compression))
            pos += length
            continue
        stream, end = _decompress(payload, pos, compression, source, allowed - unpacked)
        unpacked += len(stream)
        if unpacked > allowed:
            raise limits.refuse(source, len(payload), compression, pos)
        log.debug("initramfs: %s: %s member at bytes %d-%d", source, compression, pos, end)
        archives += _read_stream(stream, source, with_data, rules, compression, pos)
        segments.append(Segment(pos, end, compression))
        pos = end
    if not archives:
        raise UserError(f"payload of {source} is empty", "download the initrd again")
    return _Payload(segments, archives)


def _read_stream(
    stream: bytes,
    source: str,
    with_data: Callable[[str], bool] | None,
    rules: TreeRules,
    compression: str,
    offset: int,
) -> list[list[Entry]]:
    """The archives in one decompressed member: newc archives with zeros between them."""
    archives: list[list[Entry]] = []
    pos = 0
    while (pos := skip_padding(stream, pos)) < len(stream):
        if stream[pos : pos + 6] not in NEWC_MAGICS or pos % 4:
            raise corrupt_payload(
                source, compression, offset, "it does not hold newc cpio archives"
            )
        entries, length = newc.read_archive(stream, pos, source, with_data, rules)
        archives.append(entries)
        pos += length
    if not archives:
        raise corrupt_payload(source, compression, offset, "it holds no archive")
    return archives


def _decompress(
    payload: bytes, pos: int, compression: str, source: str, limit: int
) -> tuple[bytes, int]:
    """Decompress the one member at `pos`, as the kernel does: (contents, end offset).

    Stops once the contents pass `limit` bytes: longer contents mean "too large", and
    the member's end is then unknown (the caller refuses the payload).
    """
    if compression in ("zstd", "lz4"):
        if compression == "zstd":
            end = zstd_frame_end(payload, pos, source=source)
        elif payload.startswith(LZ4_FRAME_MAGIC, pos):
            end = lz4_frame_blocks(payload, pos, source=source)[1]
        else:
            end = len(payload)  # legacy lz4 has no end mark: the kernel reads to the end
        return newc.decompress(payload[pos:end], compression, source, pos, limit=limit), end
    try:
        if compression == "gzip":
            return _inflate(payload, pos, limit)
        decompressor: lzma.LZMADecompressor | bz2.BZ2Decompressor
        if compression == "xz":
            decompressor = lzma.LZMADecompressor(lzma.FORMAT_XZ)
        elif compression == "lzma":
            decompressor = lzma.LZMADecompressor(lzma.FORMAT_ALONE)
        else:
            decompressor = bz2.BZ2Decompressor()
        return _unpack_stream(decompressor, payload, pos, limit)
    except (zlib.error, lzma.LZMAError, OSError, ValueError, EOFError) as exc:
        raise corrupt_payload(source, compression, pos, str(exc)) from exc
    except _EndsEarly:
        raise corrupt_payload(source, compression, pos, "it ends early") from None


class _EndsEarly(Exception):
    """The compressed data stopped before its end mark."""


def _inflate(payload: bytes, pos: int, limit: int) -> tuple[bytes, int]:
    """One gzip member at `pos`, in steps, at most a chunk past `limit`."""
    decompressor = zlib.decompressobj(wbits=31)
    pending: bytes | memoryview = memoryview(payload)[pos:]
    chunks: list[bytes] = []
    total = 0
    while not decompressor.eof and total <= limit:
        before = len(pending)
        chunk = decompressor.decompress(pending, _CHUNK)
        pending = decompressor.unconsumed_tail
        stuck = not pending or len(pending) == before  # no input left, or none taken
        if not chunk and not decompressor.eof and stuck:
            raise _EndsEarly
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks), len(payload) - len(decompressor.unused_data)


def _unpack_stream(
    decompressor: lzma.LZMADecompressor | bz2.BZ2Decompressor,
    payload: bytes,
    pos: int,
    limit: int,
) -> tuple[bytes, int]:
    """One xz, lzma or bzip2 member at `pos`, in steps, at most a chunk past `limit`."""
    chunks = [decompressor.decompress(memoryview(payload)[pos:], _CHUNK)]
    total = len(chunks[0])
    while not decompressor.eof and total <= limit:
        if decompressor.needs_input:
            raise _EndsEarly
        chunks.append(decompressor.decompress(b"", _CHUNK))
        total += len(chunks[-1])
        if not chunks[-1] and not decompressor.eof and not decompressor.needs_input:
            raise _EndsEarly  # neither output nor progress: never loop on it
    return b"".join(chunks), len(payload) - len(decompressor.unused_data)


# --- writing: a reproducible newc archive, then the patched payload ----------------------


def _write_options(compression: str, level: int | None) -> tuple[str | None, str]:
    """libarchive's filter name and option string for `compression`."""
    if compression not in WRITABLE_COMPRESSIONS:
        raise UserError(
            f"cannot write a {compression!r}-compressed archive",
            f"use one of {', '.join(WRITABLE_COMPRESSIONS)}",
        )
    if compression in ("none", "xz"):
        return None, ""  # xz: see build_archive
    options = []
    if compression == "gzip":
        options.append("gzip:!timestamp")
    if compression == "lz4":
        # Independent blocks of at most 4 MiB re-wrap into the kernel's legacy format.
        options += ["lz4:block-size=7", "lz4:!block-dependence", "lz4:!stream-checksum"]
    if level is not None:
        options.append(f"{compression}:compression-level={level}")
    return compression, ",".join(options)


def build_archive(
    entries: Sequence[Entry],
    *,
    compression: str = "gzip",
    level: int | None = None,
    mtime: int | None = None,
) -> bytes:
    """A newc cpio archive of `entries`, compressed, the same bytes for the same input.

    Entries are sorted by path (parents first; entries of the same path keep their
    order), inodes are renumbered, every mtime is `mtime` (default SOURCE_DATE_EPOCH or
    0), owners are written as given. `compression` is gzip, xz (CRC32 checks), zstd, lz4
    (the kernel's legacy lz4 format) or none.
    """
    filter_name, options = _write_options(compression, level)
    plan = plan_archive(entries)
    stamp = fixed_mtime() if mtime is None else mtime
    output = newc.write_archive(plan, filter_name, options, stamp)
    if compression == "lz4":
        output = lz4_legacy_from_frame(output)
    if compression == "xz":
        # libarchive's xz filter always writes CRC64 checks; the kernel's XZ decoder is
        # documented to need CRC32 (`xz --check=crc32`), which the standard library writes.
        preset = 6 if level is None else level
        if not 0 <= preset <= 9:
            raise UserError(f"xz compression level {preset} is not 0-9", "pick a level from 0 to 9")
        output = lzma.compress(output, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, preset=preset)
    return output


def patch(
    payload: bytes,
    additions: Sequence[Entry],
    *,
    source: str,
    compression: str = "gzip",
    max_unpacked: int = MAX_UNPACKED,
    max_ratio: int = MAX_RATIO,
) -> bytes:
    """`payload` unchanged, then a separately compressed archive adding `additions`.

    The original is read and checked first (within the limits of `read_entries`); see
    plan_additions for what is refused.
    """
    parsed = _read_payload(payload, source, None, Limits(max_unpacked, max_ratio))
    if parsed.segments[-1].compression == "lz4" and payload.startswith(
        LZ4_LEGACY_MAGIC, parsed.segments[-1].offset
    ):
        raise UserError(
            f"cannot append to {source}: it ends in legacy lz4 data, "
            "which the kernel reads to the end of the initrd",
            "recompress the provider's initrd with gzip or zstd first",
        )
    original = [entry for archive in parsed.archives for entry in archive]
    plan = plan_additions(original, additions, source=source)
    return payload + padding_for(len(payload)) + build_archive(plan, compression=compression)
