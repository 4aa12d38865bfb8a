"""Which inodes an ext4 file system uses, read from its inode bitmaps (pure).

The file systems are built by hand here, byte by byte, from the layout in the kernel's
Documentation/filesystems/ext4; the real ones mkfs.ext4 makes are read in tests/test_disk.py.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from archkernel.errors import UserError
from archkernel.formats.ext4_inodes import used_inodes


def file_system(
    *, block: int, groups: list[tuple[bytes, bool]], per_group: int = 16, desc64: bool
) -> bytes:
    """A file system of 4 KiB (or 1 KiB) blocks: superblock, group descriptors, and one
    inode bitmap block per group (`groups`: each bitmap's bytes and its INODE_UNINIT flag)."""
    first_data = 1 if block == 1024 else 0
    desc_size = 64 if desc64 else 32
    gdt_block = first_data + 1
    bitmaps = gdt_block + 1
    data = bytearray(block * (bitmaps + len(groups)))
    sb = bytearray(1024)
    struct.pack_into("<I", sb, 0, per_group * len(groups))
    struct.pack_into("<II", sb, 20, first_data, block.bit_length() - 11)  # log2(block) - 10
    struct.pack_into("<I", sb, 40, per_group)
    sb[56:58] = b"\x53\xef"
    struct.pack_into("<I", sb, 96, 0x80 if desc64 else 0)
    struct.pack_into("<H", sb, 254, desc_size)
    data[1024:2048] = sb
    for n, (bits, uninit) in enumerate(groups):
        where = bitmaps + n
        desc = gdt_block * block + n * desc_size
        struct.pack_into("<I", data, desc + 4, where)
        struct.pack_into("<H", data, desc + 18, 0x1 if uninit else 0)
        data[where * block : where * block + len(bits)] = bits
    return bytes(data)


def reader(data: bytes) -> Callable[[int, int], bytes]:
    return lambda offset, size: data[offset : offset + size]


@pytest.mark.parametrize("desc64", [True, False])
def test_the_set_bits_of_each_groups_bitmap_by_hand(desc64: bool) -> None:
    # Group 0: inodes 1-11 (0xff 0x07), group 1: inodes 17 and 32 (bits 0 and 15).
    fs = file_system(block=4096, groups=[(b"\xff\x07", False), (b"\x01\x80", False)], desc64=desc64)
    assert used_inodes(reader(fs)) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 17, 32]


def test_a_group_whose_inodes_are_not_initialised_has_none_in_use() -> None:
    fs = file_system(block=1024, groups=[(b"\x03", False), (b"\xff\xff", True)], desc64=False)
    assert used_inodes(reader(fs)) == [1, 2]


def test_no_ext4_is_a_user_error() -> None:
    with pytest.raises(UserError, match="no ext4 superblock"):
        used_inodes(reader(bytes(4096)))
