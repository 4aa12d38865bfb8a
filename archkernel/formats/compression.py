"""Compressed initrd members: which compression by magic number, and where a frame ends.

The kernel's `init/initramfs.c` takes a payload of members one after another, each a
plain newc archive or compressed on its own. It recognises a member by its magic number
(lib/decompress.c), and for zstd and lz4 frames the member's end is found by walking the
frame's block headers: no decompression needed. lz4 also has a legacy container, the only
one the kernel's unlz4 reads, which `lz4_legacy_from_frame` writes from a frame.

Pure functions on bytes: nothing here decompresses or runs a program.
"""

from __future__ import annotations

import struct

from archkernel.errors import UserError
from archkernel.formats.cpio import NEWC_MAGICS

COMPRESSIONS = ("gzip", "xz", "zstd", "lz4", "bzip2", "lzma", "none")
WRITABLE_COMPRESSIONS = ("gzip", "xz", "zstd", "lz4", "none")

GZIP_MAGIC = b"\x1f\x8b"
XZ_MAGIC = b"\xfd7zXZ\x00"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
LZ4_FRAME_MAGIC = b"\x04\x22\x4d\x18"
BZIP2_MAGIC = b"BZh"
LZMA_MAGIC = b"\x5d\x00\x00"

# Magic numbers as the kernel's lib/decompress.c and the tools that write them use them.
_MAGICS: tuple[tuple[bytes, str], ...] = (
    (GZIP_MAGIC, "gzip"),
    (XZ_MAGIC, "xz"),
    (ZSTD_MAGIC, "zstd"),
    (LZ4_LEGACY_MAGIC, "lz4"),
    (LZ4_FRAME_MAGIC, "lz4"),
    (BZIP2_MAGIC, "bzip2"),
    (LZMA_MAGIC, "lzma"),
    *((magic, "none") for magic in NEWC_MAGICS),
)


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


def corrupt_payload(source: str, compression: str, offset: int, detail: str = "") -> UserError:
    """The error for a member of `source` that is damaged or cut short at `offset`."""
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
            raise corrupt_payload(source, "zstd", pos, "reserved bit set")
        single_segment = (descriptor >> 5) & 1
        fcs_size = (single_segment, 2, 4, 8)[descriptor >> 6]
        p = pos + 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[descriptor & 3] + fcs_size
        while True:
            (header,) = struct.unpack_from("<I", data[p : p + 3] + b"\0")
            block_type, block_size = (header >> 1) & 3, header >> 3
            if block_type == 3:
                raise corrupt_payload(source, "zstd", pos, "reserved block type")
            p += 3 + (1 if block_type == 1 else block_size)
            if header & 1:
                break
        p += 4 if descriptor & 0x04 else 0  # content checksum
    except (IndexError, struct.error) as exc:
        raise corrupt_payload(source, "zstd", pos) from exc
    if p > len(data):
        raise corrupt_payload(source, "zstd", pos)
    return p


def lz4_frame_blocks(
    data: bytes, pos: int, *, source: str
) -> tuple[list[tuple[int, int, bool]], int]:
    """Walk the lz4 frame at `pos`: its blocks as (start, size, compressed), and its end."""
    blocks: list[tuple[int, int, bool]] = []
    try:
        flags = data[pos + 4]
        if flags >> 6 != 1:
            raise corrupt_payload(source, "lz4", pos, "unknown frame version")
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
        raise corrupt_payload(source, "lz4", pos) from exc
    if p > len(data):
        raise corrupt_payload(source, "lz4", pos)
    return blocks, p


def lz4_legacy_from_frame(frame: bytes) -> bytes:
    """Re-wrap an lz4 frame of independent blocks in the legacy format the kernel reads.

    The kernel's unlz4 knows only the legacy container (`lz4 -l`): a magic number, then
    per block a little-endian length and an LZ4 block decoding to at most 8 MiB. A frame
    block stored uncompressed becomes a block of literals only.
    """
    blocks, _end = lz4_frame_blocks(frame, 0, source="our lz4 output")
    out = [LZ4_LEGACY_MAGIC]
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
