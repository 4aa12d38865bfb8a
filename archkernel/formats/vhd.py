"""Fixed VHD footers: the 512 bytes after a raw disk that make it a VHD, Azure's only format.

A fixed VHD is the raw disk data followed by one footer, so making or reading one needs
only the footer: `footer` decides its bytes, `parse_footer` decodes them, `checksum` and
`chs_geometry` are the specification's algorithms. Pure functions; Azure's rules are in
`vhd_rules` and the operations on files in `vhd_file`.

Layout: the VHD specification's fixed-disk footer.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from archkernel.errors import UserError
from archkernel.units import SECTOR

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

_CHECKSUM_OFFSET = 64
# cookie, features, version, data offset, timestamp, creator app/version/OS, original size,
# current size, cylinders, heads, sectors, disk type, checksum, unique id, saved state, zero
_LAYOUT = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427s")
assert _LAYOUT.size == FOOTER_SIZE


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
    encoded; Azure's stricter rules are in `vhd_rules`.
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
    """Decode 512 footer bytes into their fields; validates the length only (see `vhd_rules`)."""
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
