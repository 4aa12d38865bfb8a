"""newc cpio archives in memory through libarchive: parse one, decompress a member, write one.

The only module that imports libarchive, so only code that reads or writes an initrd pays
for loading it. It turns archives into `cpio.Entry` values and back; what those entries
may be, and in what order they are written, is decided in `cpio`, and how a payload
divides into archives in `initramfs`.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace

from libarchive import ffi
from libarchive.exception import ArchiveError

from archkernel.errors import UserError
from archkernel.formats.compression import corrupt_payload
from archkernel.formats.cpio import (
    BLOCKDEV,
    CHARDEV,
    FILE,
    IFMT,
    NEWC_MAGICS,
    SYMLINK,
    TRAILER_NAME,
    TYPE_OF_IFMT,
    Entry,
    Member,
    TreeRules,
    bad_entry,
    normalise_path,
)

# libarchive functions that python-libarchive-c 5.3 does not declare.
_entry_nlink = ffi.ffi("entry_nlink", [ffi.c_archive_entry_p], ctypes.c_uint)
_entry_set_nlink = ffi.ffi("entry_set_nlink", [ffi.c_archive_entry_p, ctypes.c_uint], None)
_entry_set_ino64 = ffi.ffi("entry_set_ino64", [ffi.c_archive_entry_p, ctypes.c_int64], None)
# Sets a symlink's target; add_file_from_memory(linkpath=...) loses it (libarchive-c #143).
_entry_copy_symlink = ffi.ffi("entry_copy_symlink", [ffi.c_archive_entry_p, ctypes.c_char_p], None)


# --- reading ----------------------------------------------------------------------------


def decompress(data: bytes, compression: str, source: str, pos: int, *, limit: int) -> bytes:
    """The contents of one compressed member `data` (at byte `pos` of `source`).

    Stops reading once more than `limit` bytes came out: a result longer than `limit`
    means the member unpacks to more than that (the caller refuses it), and a
    decompression bomb costs no more memory than the limit.
    """
    try:
        with _archive_reader(data, "raw") as archive_p:
            holder = _Entry()
            if ffi.read_next_header2(archive_p, holder.pointer) != ffi.ARCHIVE_OK:
                raise corrupt_payload(source, compression, pos)
            filters = [
                ffi.filter_name(archive_p, i).decode()
                for i in range(ffi.filter_count(archive_p) - 1)
            ]
            if compression not in filters:
                raise UserError(
                    f"this libarchive cannot read {compression} (filters found: {filters})",
                    "install a libarchive built with lz4 and zstd support",
                )
            return _read_data(archive_p, limit)
    except ArchiveError as exc:
        raise corrupt_payload(source, compression, pos, exc.msg or "") from exc


def read_archive(
    stream: bytes,
    pos: int,
    source: str,
    with_data: Callable[[str], bool] | None,
    rules: TreeRules,
) -> tuple[list[Entry], int]:
    """Parse the newc archive at `pos` of `stream`: (its entries, its length through the trailer).

    Every entry must pass `rules`; `with_data(path)` says which files' contents to keep.
    """
    if not stream.startswith(NEWC_MAGICS, pos):
        raise UserError(
            f"payload of {source} holds a cpio archive that is not in newc format "
            f"(starts with {stream[pos : pos + 6]!r})",
            "the kernel reads only newc archives (cpio -H newc)",
        )
    rules.new_archive()
    entries: list[Entry] = []
    try:
        # From `pos` in place: a copy of the rest per archive is quadratic in their number.
        with _archive_reader(stream, "cpio", pos) as archive_p:
            holder = _Entry()
            while True:
                status = ffi.read_next_header2(archive_p, holder.pointer)
                if status == ffi.ARCHIVE_EOF:
                    break
                if status != ffi.ARCHIVE_OK:  # e.g. garbage skipped between headers
                    message = ffi.error_string(archive_p) or b"bad header"
                    raise corrupt_payload(source, "cpio", pos, message.decode(errors="replace"))
                entry = _entry_from(holder.pointer, source)
                rules.add(entry)
                if entry.type == FILE and with_data is not None and with_data(entry.path):
                    entry = replace(entry, data=_read_data(archive_p))
                entries.append(entry)
            length = ffi.filter_bytes(archive_p, -1)
    except ArchiveError as exc:
        raise corrupt_payload(source, "cpio", pos, exc.msg or "") from exc
    # libarchive stops at the trailer; an archive cut between two entries also ends.
    if stream.rfind(TRAILER_NAME, pos + max(0, length - 16), pos + length) < 0:
        raise corrupt_payload(source, "cpio", pos, "the archive has no TRAILER!!! entry")
    return entries, length


def _entry_from(entry_p: int, source: str) -> Entry:
    raw_name = ffi.entry_pathname(entry_p) or b""
    name = raw_name.decode("utf-8", "surrogateescape")
    path = normalise_path(name, source=source)
    kind = TYPE_OF_IFMT.get(ffi.entry_filetype(entry_p))
    if kind is None:
        raise bad_entry(source, name, f"has an unknown file type {ffi.entry_mode(entry_p):o}")
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
def _archive_reader(data: bytes, format_name: str, offset: int = 0) -> Iterator[int]:
    """libarchive reading `data` from `offset` in memory: every filter, the one format given."""
    archive_p = ffi.read_new()
    try:
        ffi.read_support_filter_all(archive_p)
        ffi.get_read_format_function(format_name)(archive_p)
        base = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0  # no copy
        ffi.read_open_memory(archive_p, ctypes.c_void_p(base + offset), len(data) - offset)
        yield archive_p
    finally:
        ffi.read_free(archive_p)


def _read_data(archive_p: int, limit: int | None = None) -> bytes:
    """The current entry's data; with `limit`, stop once more than `limit` bytes came."""
    buffer = ctypes.create_string_buffer(1 << 20)
    chunks: list[bytes] = []
    total = 0
    while limit is None or total <= limit:
        count = ffi.read_data(archive_p, buffer, len(buffer))
        if count <= 0:
            break
        chunks.append(ctypes.string_at(buffer, count))
        total += count
    return b"".join(chunks)


# --- writing ----------------------------------------------------------------------------


def write_archive(
    plan: Sequence[Member], filter_name: str | None, options: str, stamp: int
) -> bytes:
    """The newc archive of `plan`, through libarchive's filter `filter_name` with `options`.

    Every mtime is `stamp`. Entries are written in the order given.
    """
    try:
        return _write_newc(plan, filter_name, options, stamp)
    except ArchiveError as exc:
        raise UserError(
            f"libarchive could not write the archive: {exc.msg}",
            "check the compression level and the entries' sizes",
        ) from exc


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
    ffi.entry_set_filetype(pointer, IFMT[entry.type])
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
