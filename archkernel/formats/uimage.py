"""U-Boot legacy images (uImage): a 64-byte big-endian header in front of a payload.

The Scaleway C1 bootscript and initrd come over TFTP in this format; see
shared/reference/formats.md for the header layout. `build` writes headers byte-identical to
`mkimage` for the same timestamp, so images made here and there are interchangeable.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from archkernel.errors import UserError
from archkernel.log import log

MAGIC = 0x27051956
HEADER_SIZE = 64
NAME_SIZE = 32
_HEADER = struct.Struct(">IIIIIIIBBBB32s")

# Operating system codes (header byte 28), from U-Boot's include/image.h.
LINUX = 5

# Architecture codes (byte 29).
ARM = 2
I386 = 3
ARM64 = 22
X86_64 = 24
RISCV = 26

# Image types (byte 30).
STANDALONE = 1
KERNEL = 2
RAMDISK = 3
MULTI = 4
FIRMWARE = 5
SCRIPT = 6
FILESYSTEM = 7
FLAT_DT = 8
KERNEL_NOLOAD = 14

# Compression codes (byte 31): what U-Boot itself undoes before using the payload.
NONE = 0
GZIP = 1
BZIP2 = 2
LZMA = 3
LZO = 4
LZ4 = 5
ZSTD = 6

# code -> the name mkimage's -O/-A/-T/-C options take.
OS_NAMES: dict[int, str] = {LINUX: "linux"}
ARCH_NAMES: dict[int, str] = {
    ARM: "arm",
    I386: "x86",
    ARM64: "arm64",
    X86_64: "x86_64",
    RISCV: "riscv",
}
TYPE_NAMES: dict[int, str] = {
    STANDALONE: "standalone",
    KERNEL: "kernel",
    RAMDISK: "ramdisk",
    MULTI: "multi",
    FIRMWARE: "firmware",
    SCRIPT: "script",
    FILESYSTEM: "filesystem",
    FLAT_DT: "flat_dt",
    KERNEL_NOLOAD: "kernel_noload",
}
COMP_NAMES: dict[int, str] = {
    NONE: "none",
    GZIP: "gzip",
    BZIP2: "bzip2",
    LZMA: "lzma",
    LZO: "lzo",
    LZ4: "lz4",
    ZSTD: "zstd",
}

_U32_MAX = 0xFFFFFFFF


@dataclass(frozen=True)
class Header:
    """The fields of a uImage header, as stored (CRCs included)."""

    magic: int
    header_crc: int
    timestamp: int
    size: int
    load: int
    entry: int
    data_crc: int
    os: int
    arch: int
    type: int
    comp: int
    name: str


def type_name(code: int) -> str:
    """A human name for an image type code: 'kernel', 'ramdisk', ... or 'type 42'."""
    return TYPE_NAMES.get(code, f"type {code}")


def _looks_like(data: bytes) -> str:
    """A guess at what a non-uImage file is, for the error hint."""
    if data.startswith(b"\x1f\x8b"):
        return "it starts like gzip data: was the U-Boot header already stripped?"
    if data.startswith(b"\xd0\x0d\xfe\xed"):
        return "it is a FIT image (a device tree blob), not a legacy uImage"
    if data.startswith(b"070701"):
        return "it is a bare cpio archive: was the U-Boot header already stripped?"
    return "check that the right file was downloaded and that the transfer completed"


def parse_header(data: bytes, *, source: str = "image") -> Header:
    """Decode and check the 64-byte header at the start of `data`.

    Checks the length, the magic number and the header CRC; raises UserError naming
    `source` on any failure. The payload is not looked at.
    """
    if len(data) < HEADER_SIZE:
        raise UserError(
            f"{source} is {len(data)} bytes, too short for a U-Boot image header "
            f"({HEADER_SIZE} bytes)",
            "check that the download completed and that the file is a U-Boot image",
        )
    fields = _HEADER.unpack_from(data)
    magic, header_crc = fields[0], fields[1]
    if magic != MAGIC:
        raise UserError(
            f"{source} is not a U-Boot legacy image (magic 0x{magic:08x}, expected 0x{MAGIC:08x})",
            _looks_like(data),
        )
    computed = zlib.crc32(data[:4] + b"\0\0\0\0" + data[8:HEADER_SIZE])
    if computed != header_crc:
        raise UserError(
            f"{source} has a bad U-Boot header CRC (stored 0x{header_crc:08x}, "
            f"computed 0x{computed:08x})",
            "the header is corrupt: download the image again",
        )
    raw_name = fields[11].split(b"\0", 1)[0]
    return Header(
        magic=magic,
        header_crc=header_crc,
        timestamp=fields[2],
        size=fields[3],
        load=fields[4],
        entry=fields[5],
        data_crc=fields[6],
        os=fields[7],
        arch=fields[8],
        type=fields[9],
        comp=fields[10],
        name=raw_name.decode("utf-8", "replace"),
    )


def parse(
    data: bytes, *, expect_type: int | None = None, source: str = "image"
) -> tuple[Header, bytes]:
    """Check a whole uImage and return its header and payload.

    Beyond `parse_header`'s checks: the payload is complete, its CRC matches and, when
    `expect_type` is given, the image has that type. Bytes after the payload (padding
    some servers add) are ignored. Raises UserError naming `source` on any failure.
    """
    header = parse_header(data, source=source)
    available = len(data) - HEADER_SIZE
    if available < header.size:
        missing = header.size - available
        raise UserError(
            f"{source} is truncated: its header announces {header.size} payload bytes "
            f"but only {available} follow ({missing} bytes missing)",
            "the transfer was cut short: download the image again",
        )
    if available > header.size:
        log.debug("%s: ignoring %d bytes after the payload", source, available - header.size)
    payload = data[HEADER_SIZE : HEADER_SIZE + header.size]
    computed = zlib.crc32(payload)
    if computed != header.data_crc:
        raise UserError(
            f"{source} has a bad payload CRC (stored 0x{header.data_crc:08x}, "
            f"computed 0x{computed:08x})",
            "the payload is corrupt: download the image again",
        )
    if expect_type is not None and header.type != expect_type:
        raise UserError(
            f"{source} is a U-Boot {type_name(header.type)} image, "
            f"expected a {type_name(expect_type)} image",
            "check which file the server hands out under this name",
        )
    return header, payload


def _check_u32(what: str, value: int) -> None:
    if not 0 <= value <= _U32_MAX:
        raise UserError(
            f"U-Boot image {what} {value} does not fit in 32 bits",
            "use a value between 0 and 0xffffffff",
        )


def _check_u8(what: str, value: int) -> None:
    if not 0 <= value <= 0xFF:
        raise UserError(
            f"U-Boot image {what} code {value} does not fit in one byte",
            "use one of the codes defined in archkernel.formats.uimage",
        )


def build(
    payload: bytes,
    *,
    type: int,
    arch: int,
    os: int = LINUX,
    comp: int = NONE,
    load: int = 0,
    entry: int = 0,
    name: str = "",
    timestamp: int,
) -> bytes:
    """A uImage holding `payload`, byte-identical to `mkimage`'s for the same timestamp.

    `comp` only labels the payload (U-Boot decompresses it at boot); nothing is
    compressed here. `name` is at most 32 bytes of UTF-8.
    """
    for what, value in (("timestamp", timestamp), ("load address", load), ("entry point", entry)):
        _check_u32(what, value)
    for what, value in (("OS", os), ("architecture", arch), ("type", type), ("compression", comp)):
        _check_u8(what, value)
    if len(payload) > _U32_MAX:
        raise UserError(
            f"payload of {len(payload)} bytes is too large for a U-Boot legacy image",
            "legacy images hold at most 4 GiB - 1 bytes",
        )
    raw_name = name.encode()
    if len(raw_name) > NAME_SIZE:
        raise UserError(
            f"U-Boot image name {name!r} is {len(raw_name)} bytes; at most {NAME_SIZE} fit",
            "shorten the name",
        )

    def pack(header_crc: int) -> bytes:
        return _HEADER.pack(
            MAGIC,
            header_crc,
            timestamp,
            len(payload),
            load,
            entry,
            zlib.crc32(payload),
            os,
            arch,
            type,
            comp,
            raw_name,
        )

    return pack(zlib.crc32(pack(0))) + payload


def script_text(payload: bytes, source: str = "script image") -> str:
    """The script text of a script image's payload (the first component).

    The payload starts with big-endian 32-bit lengths ended by a zero word; the
    components follow, each but the last padded to 4 bytes. Trailing NULs are dropped
    and invalid UTF-8 is replaced, as U-Boot only cares about the ASCII commands.
    """
    lengths: list[int] = []
    offset = 0
    while True:
        if offset + 4 > len(payload):
            raise UserError(
                f"{source} has no end to its length table in {len(payload)} payload bytes",
                "the file is not a U-Boot script image or is corrupt",
            )
        (length,) = struct.unpack_from(">I", payload, offset)
        offset += 4
        if length == 0:
            break
        lengths.append(length)
    if not lengths:
        raise UserError(
            f"{source} has an empty length table: it holds no script",
            "the file is not a U-Boot script image or is corrupt",
        )
    needed = offset + sum((n + 3) & ~3 for n in lengths[:-1]) + lengths[-1]
    if needed > len(payload):
        raise UserError(
            f"{source}'s length table announces {needed} bytes but the payload has {len(payload)}",
            "the file is not a U-Boot script image or is corrupt",
        )
    text = payload[offset : offset + lengths[0]].rstrip(b"\0")
    return text.decode("utf-8", "replace")


def build_script(text: str, *, timestamp: int, arch: int = ARM, name: str = "") -> bytes:
    """A script image of `text`, as `mkimage -A arm -O linux -T script -C none` makes it."""
    data = text.encode()
    payload = struct.pack(">II", len(data), 0) + data
    return build(payload, type=SCRIPT, arch=arch, name=name, timestamp=timestamp)
