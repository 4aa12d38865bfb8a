"""Which inodes of an ext4 file system are in use, read from its inode bitmaps.

Only what that takes of the on-disk format (the kernel's Documentation/filesystems/ext4):
the superblock at byte 1024 (inode count, first data block, block size, inodes per group,
the 64bit feature and the group descriptor size), the group descriptors in the block after
the first data block (each group's inode bitmap block and its INODE_UNINIT flag) and the
bitmaps. Reads bytes through a callable, runs no program.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from archkernel.errors import UserError

# Group descriptor flag: the group's inode bitmap and table are not in use yet.
_INODE_UNINIT = 0x1
_INCOMPAT_64BIT = 0x80
_MAGIC = b"\x53\xef"


def used_inodes(read: Callable[[int, int], bytes]) -> list[int]:
    """The numbers of the inodes in use in the ext4 file system that `read(offset, size)`
    reads (offsets from its start): the bits set in the groups' inode bitmaps."""
    sb = read(1024, 1024)
    if len(sb) < 256 or sb[56:58] != _MAGIC:
        raise UserError("no ext4 superblock found", "make the file system first")
    (inodes_count,) = struct.unpack_from("<I", sb, 0)
    first_data_block, log_block_size = struct.unpack_from("<II", sb, 20)
    (per_group,) = struct.unpack_from("<I", sb, 40)
    (incompat,) = struct.unpack_from("<I", sb, 96)
    (desc_size,) = struct.unpack_from("<H", sb, 254)
    block = 1024 << log_block_size
    if not incompat & _INCOMPAT_64BIT or desc_size < 64:
        desc_size = 32
    groups = -(-inodes_count // per_group)
    table = read((first_data_block + 1) * block, groups * desc_size)
    used: list[int] = []
    for group in range(groups):
        desc = table[group * desc_size : (group + 1) * desc_size]
        (bitmap,) = struct.unpack_from("<I", desc, 4)
        (flags,) = struct.unpack_from("<H", desc, 18)
        if desc_size >= 64:
            bitmap |= struct.unpack_from("<I", desc, 0x24)[0] << 32
        if flags & _INODE_UNINIT:
            continue
        bits = read(bitmap * block, per_group // 8)
        base = group * per_group + 1
        used += [base + i for i in range(per_group) if bits[i >> 3] >> (i & 7) & 1]
    return used
