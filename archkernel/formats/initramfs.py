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
the file system: archives are read and written in memory through libarchive.
"""

from __future__ import annotations

import bz2
import ctypes
import lzma
import os
import re
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

from libarchive import ffi
from libarchive.exception import ArchiveError

from archkernel.errors import UserError
from archkernel.log import log

FILE, DIR, SYMLINK = "file", "dir", "symlink"
CHARDEV, BLOCKDEV, FIFO, SOCKET = "chardev", "blockdev", "fifo", "socket"

# Entry type <-> the S_IFMT bits of a cpio mode.
_IFMT = {
    FILE: 0o100000,
    DIR: 0o040000,
    SYMLINK: 0o120000,
    CHARDEV: 0o020000,
    BLOCKDEV: 0o060000,
    FIFO: 0o010000,
    SOCKET: 0o140000,
}
_TYPE_OF_IFMT = {bits: name for name, bits in _IFMT.items()}

COMPRESSIONS = ("gzip", "xz", "zstd", "lz4", "bzip2", "lzma", "none")
WRITABLE_COMPRESSIONS = ("gzip", "xz", "zstd", "lz4", "none")

_LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
_LZ4_FRAME_MAGIC = b"\x04\x22\x4d\x18"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_NEWC_MAGICS = (b"070701", b"070702")  # 070702 carries a checksum; the kernel takes both

# Magic numbers as the kernel's lib/decompress.c and the tools that write them use them.
_MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (_ZSTD_MAGIC, "zstd"),
    (_LZ4_LEGACY_MAGIC, "lz4"),
    (_LZ4_FRAME_MAGIC, "lz4"),
    (b"BZh", "bzip2"),
    (b"\x5d\x00\x00", "lzma"),
    (b"070701", "none"),
    (b"070702", "none"),
)

# Bytes of the trailer entry of a newc archive: 110-byte header + "TRAILER!!!\0", padded.
_TRAILER_NAME = b"TRAILER!!!"
_NONZERO = re.compile(rb"[^\x00]")

# libarchive functions that python-libarchive-c 5.3 does not declare.
_entry_nlink = ffi.ffi("entry_nlink", [ffi.c_archive_entry_p], ctypes.c_uint)
_entry_set_nlink = ffi.ffi("entry_set_nlink", [ffi.c_archive_entry_p, ctypes.c_uint], None)
_entry_set_ino64 = ffi.ffi("entry_set_ino64", [ffi.c_archive_entry_p, ctypes.c_int64], None)
# Sets a symlink's target; add_file_from_memory(linkpath=...) loses it (libarchive-c #143).
_entry_copy_symlink = ffi.ffi("entry_copy_symlink", [ffi.c_archive_entry_p, ctypes.c_char_p], None)


@dataclass(frozen=True)
class Entry:
    """One cpio entry as the kernel sees it.

    `path` is normalised (no leading './' or '/'; the root itself is '.'). `mode` holds
    the permission bits only (including setuid, setgid and sticky). `linkpath` is a
    symlink's target, or for a hard link (`hardlink` true) the path of the earlier entry
    it links to. `nlink` is the link count the header claims; newc stores the contents of
    a hard-linked file once, on one member of the link set. `data` is the contents of a
    regular file when it was asked for (or given, to build an archive), else None.
    """

    path: str
    type: str
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    size: int = 0
    linkpath: str | None = None
    hardlink: bool = False
    rdevmajor: int = 0
    rdevminor: int = 0
    mtime: int = 0
    data: bytes | None = None
    nlink: int = 1

    @classmethod
    def file(
        cls, path: str, data: bytes, *, mode: int = 0o644, uid: int = 0, gid: int = 0
    ) -> Entry:
        """A regular file holding `data`."""
        return cls(path, FILE, mode, uid, gid, size=len(data), data=data)

    @classmethod
    def directory(cls, path: str, *, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Entry:
        """A directory."""
        return cls(path, DIR, mode, uid, gid, nlink=2)

    @classmethod
    def symlink(cls, path: str, target: str, *, uid: int = 0, gid: int = 0) -> Entry:
        """A symbolic link to `target`."""
        return cls(path, SYMLINK, 0o777, uid, gid, size=len(target.encode()), linkpath=target)


# ---------------------------------------------------------------------------------------
# Deciding: names, magic numbers, container framing, tree rules. No libarchive here.


def detect_compression(data: bytes, *, source: str = "the initrd") -> str:
    """Name the compression of a payload (or segment) by its magic number.

    Returns one of 'gzip', 'xz', 'zstd', 'lz4' (legacy and frame format), 'bzip2',
    'lzma' or 'none' (a plain newc cpio archive).
    """
    for magic, name in _MAGICS:
        if data.startswith(magic):
            return name
    head = data[:8].hex(" ") or "nothing"
    hint = "check that the U-Boot header was stripped and the download is complete"
    if data.startswith(b"070707"):
        hint = "this is an old-format (odc) cpio archive; the kernel needs newc (cpio -H newc)"
    raise UserError(
        f"payload of {source} is not a compressed cpio archive (starts with {head})", hint
    )


def normalise_path(name: str, *, source: str) -> str:
    """An archive member's name as a normalised relative path; refuse unsafe names."""
    if not name:
        raise _bad_entry(source, name, "has an empty name")
    if "\0" in name or "\n" in name:
        raise _bad_entry(source, name, "has a NUL or newline in its name")
    if name.startswith("/"):
        raise _bad_entry(source, name, "is an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _bad_entry(source, name, "has a '..' component")
    return "/".join(parts) or "."


def parents(path: str) -> list[str]:
    """The proper ancestors of a normalised path, outermost first: 'a/b/c' -> ['a', 'a/b']."""
    if path == ".":
        return []
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def merged_view(entries: Sequence[Entry]) -> dict[str, Entry]:
    """The tree the kernel leaves: each path's last entry, later archives replacing earlier."""
    tree: dict[str, Entry] = {}
    for entry in entries:
        tree[entry.path] = entry
    return tree


def original_init(entries: Sequence[Entry]) -> Entry:
    """The entry the kernel runs as /init in the tree `entries` build."""
    init = merged_view(entries).get("init")
    if init is None:
        raise UserError(
            "the initrd has no /init",
            "the kernel would not boot it either; check that this is the provider's initrd",
        )
    return init


_SUSPICIOUS = (
    "an initrd made with `find . | cpio -o -H newc` never does this; "
    "refusing a damaged or malicious archive"
)


class _TreeRules:
    """The kernel's view of a growing tree, to refuse entries that alias or escape.

    An entry may not pass through a symlink (the kernel would write through it to a path
    other than the entry's name, which can leave the root for host tools and hides the
    real target from `merged_view`), may not sit below a non-directory, and may not
    replace a non-empty directory (the kernel's rmdir fails and keeps the old tree).
    Hard link targets must be earlier entries of the same archive (the kernel forgets
    links at each trailer).
    """

    def __init__(
        self, source: str, *, links_in_order: bool = True, hint: str = _SUSPICIOUS
    ) -> None:
        self.source = source
        self.hint = hint
        self.links_in_order = links_in_order
        self.tree: dict[str, Entry] = {}
        self.populated: set[str] = set()  # directories that have had children
        self.archive_paths: set[str] = set()

    def new_archive(self) -> None:
        self.archive_paths = set()

    def add(self, entry: Entry) -> None:
        for parent in parents(entry.path):
            above = self.tree.get(parent)
            if above is None or above.type == DIR:
                continue
            if above.type == SYMLINK:
                raise _bad_entry(
                    self.source,
                    entry.path,
                    f"passes through the symlink '{parent}' -> '{above.linkpath}'",
                    self.hint,
                )
            raise _bad_entry(
                self.source, entry.path, f"is below '{parent}', which is a {above.type}", self.hint
            )
        old = self.tree.get(entry.path)
        if (
            old is not None
            and old.type == DIR
            and entry.type != DIR
            and entry.path in self.populated
        ):
            raise _bad_entry(
                self.source, entry.path, "replaces a directory that is not empty", self.hint
            )
        if self.links_in_order and entry.hardlink and entry.linkpath not in self.archive_paths:
            raise _bad_entry(
                self.source,
                entry.path,
                f"is a hard link to '{entry.linkpath}', which is not an earlier entry",
                self.hint,
            )
        self.tree[entry.path] = entry
        self.archive_paths.add(entry.path)
        if entry.path != ".":
            self.populated.add(parents(entry.path)[-1] if "/" in entry.path else ".")


def _bad_entry(source: str, name: str, problem: str, hint: str = _SUSPICIOUS) -> UserError:
    return UserError(f"entry {name!r} in {source} {problem}", hint)


def _corrupt(source: str, compression: str, offset: int, detail: str = "") -> UserError:
    detail = f": {detail}" if detail else ""
    return UserError(
        f"payload of {source} is corrupt or truncated ({compression} data at byte {offset}"
        f"{detail})",
        "download the initrd again; compare its size with the U-Boot header's",
    )


def zstd_frame_end(data: bytes, pos: int, *, source: str) -> int:
    """The offset just past the zstd frame that starts at `pos` (walks block headers)."""
    try:
        descriptor = data[pos + 4]
        if descriptor & 0x08:
            raise _corrupt(source, "zstd", pos, "reserved bit set")
        single_segment = (descriptor >> 5) & 1
        fcs_size = (single_segment, 2, 4, 8)[descriptor >> 6]
        p = pos + 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[descriptor & 3] + fcs_size
        while True:
            (header,) = struct.unpack_from("<I", data[p : p + 3] + b"\0")
            block_type, block_size = (header >> 1) & 3, header >> 3
            if block_type == 3:
                raise _corrupt(source, "zstd", pos, "reserved block type")
            p += 3 + (1 if block_type == 1 else block_size)
            if header & 1:
                break
        p += 4 if descriptor & 0x04 else 0  # content checksum
    except (IndexError, struct.error) as exc:
        raise _corrupt(source, "zstd", pos) from exc
    if p > len(data):
        raise _corrupt(source, "zstd", pos)
    return p


def lz4_frame_blocks(
    data: bytes, pos: int, *, source: str
) -> tuple[list[tuple[int, int, bool]], int]:
    """Walk the lz4 frame at `pos`: its blocks as (start, size, compressed), and its end."""
    blocks: list[tuple[int, int, bool]] = []
    try:
        flags = data[pos + 4]
        if flags >> 6 != 1:
            raise _corrupt(source, "lz4", pos, "unknown frame version")
        p = pos + 7 + (8 if flags & 0x08 else 0) + (4 if flags & 0x01 else 0)
        while True:
            (size,) = struct.unpack_from("<I", data, p)
            p += 4
            if size == 0:
                break
            length = size & 0x7FFFFFFF
            blocks.append((p, length, not size & 0x80000000))
            p += length + (4 if flags & 0x10 else 0)
        p += 4 if flags & 0x04 else 0
    except (IndexError, struct.error) as exc:
        raise _corrupt(source, "lz4", pos) from exc
    if p > len(data):
        raise _corrupt(source, "lz4", pos)
    return blocks, p


def lz4_legacy_from_frame(frame: bytes) -> bytes:
    """Re-wrap an lz4 frame of independent blocks in the legacy format the kernel reads.

    The kernel's unlz4 knows only the legacy container (`lz4 -l`): a magic number, then
    per block a little-endian length and an LZ4 block decoding to at most 8 MiB. A frame
    block stored uncompressed becomes a block of literals only.
    """
    blocks, _end = lz4_frame_blocks(frame, 0, source="our lz4 output")
    out = [_LZ4_LEGACY_MAGIC]
    for start, size, compressed in blocks:
        block = frame[start : start + size]
        if not compressed:
            block = _lz4_literals(block)
        out += [struct.pack("<I", len(block)), block]
    return b"".join(out)


def _lz4_literals(raw: bytes) -> bytes:
    """An LZ4 block holding `raw` as one run of literals (a valid last sequence)."""
    length = len(raw)
    if length < 15:
        return bytes([length << 4]) + raw
    rest = length - 15
    return b"\xf0" + b"\xff" * (rest // 255) + bytes([rest % 255]) + raw


def padding_for(length: int) -> bytes:
    """Zero bytes that bring `length` to a multiple of 4.

    The kernel skips zero bytes between archives, and takes a plain (uncompressed) cpio
    archive only where it starts on a 4-byte boundary.
    """
    return b"\0" * (-length % 4)


def plan_additions(
    original: Sequence[Entry], additions: Sequence[Entry], *, source: str
) -> list[Entry]:
    """The entries to append to `original` so the kernel's tree gains `additions`.

    Refuses additions the kernel would apply wrongly: a path below an original symlink
    or non-directory, a directory over an original non-directory, a non-directory over
    an original directory, a path whose parent exists nowhere, a path listed twice.
    Directories the original already has are left out, so their modes and owners stay the
    provider's. A regular file that lands on an original hard-linked file is preceded by
    a symlink of the same path: the kernel removes an existing path only when the type
    changes, otherwise it truncates the inode and would rewrite every link to it.
    """
    tree = merged_view(original)
    added: dict[str, Entry] = {}
    for entry in additions:
        path = normalise_path(entry.path, source="the additions")
        if path in added:
            raise UserError(f"the additions list {path!r} twice", "give each path once")
        added[path] = replace(entry, path=path)

    plan: list[Entry] = []
    for path, entry in added.items():
        for parent in parents(path):
            mine, theirs = added.get(parent), tree.get(parent)
            if mine is not None:
                if mine.type != DIR:
                    raise _bad_addition(path, f"is below '{parent}', which is a {mine.type}")
            elif theirs is None:
                raise _bad_addition(
                    path, f"has no parent directory '{parent}' in {source} or the additions"
                )
            elif theirs.type == SYMLINK:
                raise _bad_addition(
                    path,
                    f"is below '{parent}', a symlink in {source} -> '{theirs.linkpath}'; "
                    "the kernel would follow it and put the file elsewhere",
                )
            elif theirs.type != DIR:
                raise _bad_addition(path, f"is below '{parent}', a {theirs.type} in {source}")
        old = tree.get(path)
        if old is not None and (old.type == DIR) != (entry.type == DIR):
            raise _bad_addition(path, f"is a {entry.type} but {source} has a {old.type} there")
        if old is not None and old.type == DIR:
            log.debug(
                "initramfs: %s already has directory %s; keeping its owner and mode", source, path
            )
            continue
        if old is not None and old.type == FILE and entry.type == FILE and old.nlink > 1:
            plan.append(Entry.symlink(path, "/dev/null"))
        plan.append(entry)
    return plan


def _bad_addition(path: str, problem: str) -> UserError:
    return UserError(
        f"cannot add {path!r} to the initrd: it {problem}",
        "change the paths of the files to add",
    )


# ---------------------------------------------------------------------------------------
# Reading: split the payload as the kernel does, let libarchive parse each archive.


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


def read_entries(
    payload: bytes, *, source: str, with_data: Callable[[str], bool] | None = None
) -> list[Entry]:
    """Every entry of every archive in `payload`, in the order the kernel applies them.

    `with_data(path)` says for which paths to keep a regular file's contents. Archives
    that are damaged, or whose entries would escape or alias the tree, raise UserError.
    """
    parsed = _read_payload(payload, source, with_data)
    return [entry for archive in parsed.archives for entry in archive]


def read_segments(payload: bytes, *, source: str) -> list[Segment]:
    """How `payload` divides into compressed members and plain archives."""
    return _read_payload(payload, source, None).segments


def read_file(payload: bytes, path: str, source: str) -> bytes:
    """The contents of the regular file `path` in the tree the payload unpacks to."""
    wanted = normalise_path(path.lstrip("/") or ".", source="the request")  # '/init' is fine
    parsed = _read_payload(payload, source, lambda p: p == wanted)
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
        again = _read_payload(payload, source, lambda p: p == carrier.path)
        carrier = again.archives[a][carriers[-1]]
    return carrier.data or b""


def _read_payload(payload: bytes, source: str, with_data: Callable[[str], bool] | None) -> _Payload:
    rules = _TreeRules(source)
    segments: list[Segment] = []
    archives: list[list[Entry]] = []
    pos = 0
    while True:
        found = _NONZERO.search(payload, pos)
        if found is None:
            break
        pos = found.start()
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
            entries, length = _read_cpio(payload, pos, source, with_data, rules)
            archives.append(entries)
            segments.append(Segment(pos, pos + length, compression))
            pos += length
            continue
        stream, end = _decompress(payload, pos, compression, source)
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
    rules: _TreeRules,
    compression: str,
    offset: int,
) -> list[list[Entry]]:
    """The archives in one decompressed member: newc archives with zeros between them."""
    archives: list[list[Entry]] = []
    pos = 0
    while True:
        found = _NONZERO.search(stream, pos)
        if found is None:
            break
        pos = found.start()
        if stream[pos : pos + 6] not in _NEWC_MAGICS or pos % 4:
            raise _corrupt(source, compression, offset, "it does not hold newc cpio archives")
        entries, length = _read_cpio(stream, pos, source, with_data, rules)
        archives.append(entries)
        pos += length
    if not archives:
        raise _corrupt(source, compression, offset, "it holds no archive")
    return archives


def _decompress(payload: bytes, pos: int, compression: str, source: str) -> tuple[bytes, int]:
    """Decompress the one member at `pos`, as the kernel does: (contents, end offset)."""
    view = memoryview(payload)[pos:]
    decompressor: zlib._Decompress | lzma.LZMADecompressor | bz2.BZ2Decompressor
    if compression in ("zstd", "lz4"):
        if compression == "zstd":
            end = zstd_frame_end(payload, pos, source=source)
        elif payload.startswith(_LZ4_FRAME_MAGIC, pos):
            end = lz4_frame_blocks(payload, pos, source=source)[1]
        else:
            end = len(payload)  # legacy lz4 has no end mark: the kernel reads to the end
        return _libarchive_decompress(payload[pos:end], compression, source, pos), end
    if compression == "gzip":
        decompressor = zlib.decompressobj(wbits=31)
    elif compression == "xz":
        decompressor = lzma.LZMADecompressor(lzma.FORMAT_XZ)
    elif compression == "lzma":
        decompressor = lzma.LZMADecompressor(lzma.FORMAT_ALONE)
    else:
        decompressor = bz2.BZ2Decompressor()
    try:
        stream = decompressor.decompress(view)
    except (zlib.error, lzma.LZMAError, OSError, ValueError, EOFError) as exc:
        raise _corrupt(source, compression, pos, str(exc)) from exc
    if not decompressor.eof:
        raise _corrupt(source, compression, pos, "it ends early")
    return stream, len(payload) - len(decompressor.unused_data)


def _libarchive_decompress(data: bytes, compression: str, source: str, pos: int) -> bytes:
    try:
        with _archive_reader(data, "raw") as archive_p:
            holder = _Entry()
            if ffi.read_next_header2(archive_p, holder.pointer) != ffi.ARCHIVE_OK:
                raise _corrupt(source, compression, pos)
            filters = [
                ffi.filter_name(archive_p, i).decode()
                for i in range(ffi.filter_count(archive_p) - 1)
            ]
            if compression not in filters:
                raise UserError(
                    f"this libarchive cannot read {compression} (filters found: {filters})",
                    "install a libarchive built with lz4 and zstd support",
                )
            return _read_data(archive_p)
    except ArchiveError as exc:
        raise _corrupt(source, compression, pos, exc.msg or "") from exc


def _read_cpio(
    stream: bytes,
    pos: int,
    source: str,
    with_data: Callable[[str], bool] | None,
    rules: _TreeRules,
) -> tuple[list[Entry], int]:
    """Parse the newc archive at `pos` with libarchive: (entries, length through trailer)."""
    data = stream if pos == 0 else stream[pos:]
    if not data.startswith(_NEWC_MAGICS):
        raise UserError(
            f"payload of {source} holds a cpio archive that is not in newc format "
            f"(starts with {data[:6]!r})",
            "the kernel reads only newc archives (cpio -H newc)",
        )
    rules.new_archive()
    entries: list[Entry] = []
    try:
        with _archive_reader(data, "cpio") as archive_p:
            holder = _Entry()
            while True:
                status = ffi.read_next_header2(archive_p, holder.pointer)
                if status == ffi.ARCHIVE_EOF:
                    break
                if status != ffi.ARCHIVE_OK:  # e.g. garbage skipped between headers
                    message = ffi.error_string(archive_p) or b"bad header"
                    raise _corrupt(source, "cpio", pos, message.decode(errors="replace"))
                entry = _entry_from(holder.pointer, source)
                rules.add(entry)
                if entry.type == FILE and with_data is not None and with_data(entry.path):
                    entry = replace(entry, data=_read_data(archive_p))
                entries.append(entry)
            length = ffi.filter_bytes(archive_p, -1)
    except ArchiveError as exc:
        raise _corrupt(source, "cpio", pos, exc.msg or "") from exc
    # libarchive stops at the trailer; an archive cut between two entries also ends.
    if data.rfind(_TRAILER_NAME, max(0, length - 16), length) < 0:
        raise _corrupt(source, "cpio", pos, "the archive has no TRAILER!!! entry")
    return entries, length


def _entry_from(entry_p: int, source: str) -> Entry:
    raw_name = ffi.entry_pathname(entry_p) or b""
    name = raw_name.decode("utf-8", "surrogateescape")
    path = normalise_path(name, source=source)
    kind = _TYPE_OF_IFMT.get(ffi.entry_filetype(entry_p))
    if kind is None:
        raise _bad_entry(source, name, f"has an unknown file type {ffi.entry_mode(entry_p):o}")
    linkpath: str | None = None
    hard = ffi.entry_hardlink(entry_p)
    if kind == SYMLINK:
        linkpath = (ffi.entry_symlink(entry_p) or b"").decode("utf-8", "surrogateescape")
    elif hard:
        linkpath = normalise_path(hard.decode("utf-8", "surrogateescape"), source=source)
    return Entry(
        path=path,
        type=kind,
        mode=ffi.entry_perm(entry_p) & 0o7777,
        uid=ffi.entry_uid(entry_p),
        gid=ffi.entry_gid(entry_p),
        size=ffi.entry_size(entry_p),
        linkpath=linkpath,
        hardlink=bool(hard) and kind != SYMLINK,
        rdevmajor=ffi.entry_rdevmajor(entry_p),
        rdevminor=ffi.entry_rdevminor(entry_p),
        mtime=ffi.entry_mtime(entry_p),
        nlink=_entry_nlink(entry_p),
    )


class _Entry:
    """An archive_entry struct owned by Python, freed with it."""

    def __init__(self) -> None:
        self.pointer: int = ffi.entry_new()

    def __del__(self) -> None:
        ffi.entry_free(self.pointer)


@contextmanager
def _archive_reader(data: bytes, format_name: str) -> Iterator[int]:
    """libarchive reading `data` from memory: every filter, the one format given."""
    archive_p = ffi.read_new()
    try:
        ffi.read_support_filter_all(archive_p)
        ffi.get_read_format_function(format_name)(archive_p)
        address = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p)  # no copy of `data`
        ffi.read_open_memory(archive_p, address, len(data))
        yield archive_p
    finally:
        ffi.read_free(archive_p)


def _read_data(archive_p: int) -> bytes:
    buffer = ctypes.create_string_buffer(1 << 20)
    chunks: list[bytes] = []
    while True:
        count = ffi.read_data(archive_p, buffer, len(buffer))
        if count <= 0:
            return b"".join(chunks)
        chunks.append(ctypes.string_at(buffer, count))


# ---------------------------------------------------------------------------------------
# Writing: a reproducible newc archive, then the patched payload.


@dataclass(frozen=True)
class Member:
    """An entry as build_archive writes it: its inode number, link count and contents."""

    entry: Entry
    ino: int
    nlink: int
    data: bytes


def _sort_key(entry: Entry) -> tuple[str, ...]:
    return () if entry.path == "." else tuple(entry.path.split("/"))


def plan_archive(entries: Sequence[Entry]) -> list[Member]:
    """What build_archive writes: entries sorted (parents first), inodes numbered from 1.

    Members of a hard-link set share an inode and a link count; as GNU cpio does, their
    contents go with the last member written, the others are empty.
    """
    source = "the archive to build"
    normalised = [
        replace(
            e,
            path=normalise_path(e.path, source=source),
            linkpath=normalise_path(e.linkpath or "", source=source) if e.hardlink else e.linkpath,
        )
        for e in entries
    ]
    ordered = sorted(normalised, key=_sort_key)  # stable: same-path entries keep their order
    # Link sets are rewritten below, so a hard link may name a target sorted after it.
    rules = _TreeRules(source, links_in_order=False, hint="fix the entries given to build_archive")
    link_targets = {e.path for e in ordered if e.type == FILE and not e.hardlink}
    for entry in ordered:
        if entry.type not in _IFMT:
            raise UserError(
                f"cannot archive {entry.path!r}: unknown type {entry.type!r}",
                f"use one of {', '.join(_IFMT)}",
            )
        if entry.type == FILE and not entry.hardlink and entry.data is None and entry.size:
            raise UserError(
                f"cannot archive {entry.path!r}: its contents were not given",
                "read it with with_data, or build it with Entry.file()",
            )
        if entry.type == SYMLINK and not entry.linkpath:
            raise UserError(
                f"cannot archive {entry.path!r}: a symlink needs a target",
                "build it with Entry.symlink(path, target)",
            )
        if entry.hardlink and entry.type != FILE:
            raise UserError(
                f"cannot archive {entry.path!r}: only regular files can be hard links",
                "add it as a separate entry instead",
            )
        if entry.hardlink and entry.linkpath not in link_targets:
            raise UserError(
                f"cannot archive {entry.path!r}: it is a hard link to {entry.linkpath!r}, "
                "which is not a regular file of the archive",
                "add the target, or make the entry a regular file",
            )
        rules.add(entry)

    # Link sets, keyed by the path their members link to.
    group_of: dict[int, str] = {}
    for i, entry in enumerate(ordered):
        if entry.hardlink and entry.linkpath is not None:
            group_of[i] = entry.linkpath
    targets = set(group_of.values())
    for i, entry in enumerate(ordered):
        if entry.type == FILE and not entry.hardlink and entry.path in targets:
            group_of[i] = entry.path
    members_of: dict[str, list[int]] = {}
    for i in sorted(group_of):
        members_of.setdefault(group_of[i], []).append(i)
    contents: dict[str, bytes] = {}
    for target, indices in members_of.items():
        given = [data for i in indices if (data := ordered[i].data)]
        if len(set(given)) > 1:
            raise UserError(
                f"cannot archive the hard links to {target!r}: their contents differ",
                "give the contents on one member of the link set",
            )
        contents[target] = given[0] if given else b""

    plan: list[Member] = []
    ino_of_group: dict[str, int] = {}
    inodes = 0
    for i, entry in enumerate(ordered):
        group = group_of.get(i)
        if group is None:
            inodes += 1
            nlink = 2 if entry.type == DIR else 1
            data = (entry.data or b"") if entry.type == FILE else b""
            plan.append(Member(entry, inodes, nlink, data))
            continue
        if group not in ino_of_group:
            inodes += 1
            ino_of_group[group] = inodes
        ino = ino_of_group[group]
        last = members_of[group][-1] == i
        plan.append(Member(entry, ino, len(members_of[group]), contents[group] if last else b""))
    return plan


def fixed_mtime() -> int:
    """The timestamp of every entry we write: SOURCE_DATE_EPOCH, else 0."""
    value = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not value:
        return 0
    if not value.isdigit():
        raise UserError(
            f"SOURCE_DATE_EPOCH={value!r} is not a number of seconds",
            "set it to an integer such as 1700000000, or unset it",
        )
    return int(value)


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
    try:
        output = _write_newc(plan, filter_name, options, stamp)
    except ArchiveError as exc:
        raise UserError(
            f"libarchive could not write the archive: {exc.msg}",
            "check the compression level and the entries' sizes",
        ) from exc
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


def _write_newc(plan: Sequence[Member], filter_name: str | None, options: str, stamp: int) -> bytes:
    chunks: list[bytes] = []

    def collect(_archive: int, _context: int, buffer: int, length: int) -> int:
        chunks.append(ctypes.string_at(buffer, length))
        return length

    callback = ffi.WRITE_CALLBACK(collect)
    archive_p = ffi.write_new()
    try:
        ffi.get_write_format_function("cpio_newc")(archive_p)
        if filter_name:
            ffi.get_write_filter_function(filter_name)(archive_p)
        if options:
            ffi.write_set_options(archive_p, options.encode())
        ffi.write_set_bytes_per_block(archive_p, ffi.page_size)
        ffi.write_set_bytes_in_last_block(archive_p, 1)
        ffi.write_open(archive_p, None, ffi.NO_OPEN_CB, callback, ffi.NO_CLOSE_CB)
        for member in plan:
            _write_member(archive_p, member, stamp)
        ffi.write_close(archive_p)
    finally:
        ffi.write_free(archive_p)
    return b"".join(chunks)


def _write_member(archive_p: int, member: Member, stamp: int) -> None:
    entry = member.entry
    holder = _Entry()
    pointer = holder.pointer
    ffi.entry_copy_pathname(pointer, entry.path.encode("utf-8", "surrogateescape"))
    ffi.entry_set_filetype(pointer, _IFMT[entry.type])
    ffi.entry_set_perm(pointer, entry.mode & 0o7777)
    ffi.entry_set_uid(pointer, entry.uid)
    ffi.entry_set_gid(pointer, entry.gid)
    ffi.entry_set_mtime(pointer, stamp, 0)
    _entry_set_ino64(pointer, member.ino)
    _entry_set_nlink(pointer, member.nlink)
    if entry.type == SYMLINK and entry.linkpath is not None:
        _entry_copy_symlink(pointer, entry.linkpath.encode("utf-8", "surrogateescape"))
    if entry.type in (CHARDEV, BLOCKDEV):
        ffi.entry_set_rdevmajor(pointer, entry.rdevmajor)
        ffi.entry_set_rdevminor(pointer, entry.rdevminor)
    ffi.entry_set_size(pointer, len(member.data))
    ffi.write_header(archive_p, pointer)
    if member.data:
        ffi.write_data(archive_p, member.data, len(member.data))
    ffi.write_finish_entry(archive_p)


def patch(
    payload: bytes, additions: Sequence[Entry], *, source: str, compression: str = "gzip"
) -> bytes:
    """`payload` unchanged, then a separately compressed archive adding `additions`.

    The original is read and checked first; see plan_additions for what is refused.
    """
    parsed = _read_payload(payload, source, None)
    if parsed.segments[-1].compression == "lz4" and payload.startswith(
        _LZ4_LEGACY_MAGIC, parsed.segments[-1].offset
    ):
        raise UserError(
            f"cannot append to {source}: it ends in legacy lz4 data, "
            "which the kernel reads to the end of the initrd",
            "recompress the provider's initrd with gzip or zstd first",
        )
    original = [entry for archive in parsed.archives for entry in archive]
    plan = plan_additions(original, additions, source=source)
    return payload + padding_for(len(payload)) + build_archive(plan, compression=compression)
