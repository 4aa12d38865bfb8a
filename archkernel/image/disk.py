"""Disk images: partition layout, partition table, and an ext4 root made from a directory.

Deciding and acting are kept apart: `plan_layout` and `sfdisk_script` decide where the
partitions go (pure, 512-byte sectors, everything aligned to 1 MiB); `create_disk` writes
a sparse file with that table; `make_ext4` builds the root file system *inside* the
image with `mkfs.ext4 -d DIR -E offset=...`, so nothing is mounted and no loop device is
needed. `check_ext4` and `fs_uuid` read it back the same way: e2fsprogs tools accept
`IMAGE?offset=BYTES` as a device name (the `offset` I/O option of libext2fs), and
`blkid -p` takes `--offset`.

Boot modes (the firmware the disk boots with):
- 'bios' (Azure generation 1): GPT with a 1 MiB BIOS boot partition for GRUB's core.img,
  or MBR with core.img in the gap before the first partition;
- 'uefi' (generation 2): GPT with an EFI system partition (ESP) before root;
- 'hybrid' (either): GPT with the BIOS boot partition, then the ESP, then root, as Arch's
  own cloud images are laid out. UEFI needs GPT here (Azure generation 2 boots only GPT).
The ESP's FAT file system is archkernel.image.esp's business.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from uuid import UUID

from archkernel.errors import UserError
from archkernel.host.files import temporary_directory
from archkernel.host.run import run

SECTOR = 512
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

# GPT keeps a backup header (1 sector) and entry array (32 sectors) at the end of the disk.
GPT_BACKUP_SECTORS = 33
# A DOS partition table addresses at most 2**32 - 1 sectors.
MBR_MAX_SECTORS = (1 << 32) - 1
# Smallest root partition plan_layout accepts; the real lower bound is the tree it holds.
MIN_ROOT_SIZE = 16 * MiB

BIOS_BOOT_GUID = "21686148-6449-6E6F-744E-656564454649"
ESP_GUID = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
# Fixed, and roomy for one boot loader: Microsoft asks for at least 100 MB (260 MB on 4Kn
# disks); 256 MiB holds a FAT32 with 1 KiB clusters well above FAT32's minimum count.
ESP_SIZE = 256 * MiB
# "Linux root (x86-64)" of the Discoverable Partitions Specification.
ROOT_X86_64_GUID = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
MBR_LINUX = "83"

Table = Literal["gpt", "mbr"]
Boot = Literal["bios", "uefi", "hybrid"]
Role = Literal["bios_boot", "esp", "root"]
BOOT_MODES: tuple[Boot, ...] = ("bios", "uefi", "hybrid")

# The ext4 parameters make_ext4 pins, so required_disk_size can count with them whatever
# the host's /etc/mke2fs.conf says about small file systems.
EXT4_BLOCK = 4096
EXT4_INODE_SIZE = 256
EXT4_INODE_RATIO = 16384
EXT4_RESERVED_PERCENT = 5


@dataclass(frozen=True)
class Partition:
    """One partition. `start` and `size` are bytes; `type` is a GPT type GUID or an MBR
    type byte in hex ("83"); `name` is the GPT partition name (MBR has none)."""

    number: int
    start: int
    size: int
    type: str
    name: str
    role: Role

    @property
    def end(self) -> int:
        """The first byte after the partition."""
        return self.start + self.size


@dataclass(frozen=True)
class Layout:
    """A whole disk: its partition table type, size in bytes, and partitions in order."""

    table: Table
    disk_size: int
    partitions: tuple[Partition, ...]
    disk_guid: str | None = None

    def by_role(self, role: Role) -> Partition:
        """The partition with `role`; a Layout from plan_layout always has a 'root'."""
        for part in self.partitions:
            if part.role == role:
                return part
        raise KeyError(f"the layout has no {role} partition")

    def has(self, role: Role) -> bool:
        """Whether the layout has a partition with `role`."""
        return any(part.role == role for part in self.partitions)

    @property
    def root(self) -> Partition:
        """The root file system's partition."""
        return self.by_role("root")

    @property
    def esp(self) -> Partition:
        """The EFI system partition (KeyError for a 'bios' layout)."""
        return self.by_role("esp")

    @property
    def boot(self) -> Boot:
        """The boot mode the layout was planned for, read from its partitions."""
        efi = self.has("esp")
        bios = self.table == "mbr" or self.has("bios_boot")
        return "hybrid" if efi and bios else "uefi" if efi else "bios"

    @property
    def boots_bios(self) -> bool:
        """Whether BIOS firmware boots it: GRUB's boot.img and core.img are needed."""
        return self.boot in ("bios", "hybrid")

    @property
    def boots_uefi(self) -> bool:
        """Whether UEFI firmware boots it: a boot loader on the ESP is needed."""
        return self.boot in ("uefi", "hybrid")


def _align_down(value: int, step: int = MiB) -> int:
    return value - value % step


def _mib(size: int) -> str:
    return f"{size // MiB} MiB" if size % MiB == 0 else f"{size} bytes"


def _check_table_and_boot(table: str, boot: str) -> tuple[Table, Boot]:
    """`table` and `boot` as a Table and a Boot; UserError for unknown or unbootable ones."""
    if boot not in BOOT_MODES:
        raise UserError(f"unknown boot mode {boot!r}", "use 'bios', 'uefi' or 'hybrid'")
    mode: Boot = "bios" if boot == "bios" else "uefi" if boot == "uefi" else "hybrid"
    if table == "gpt":
        return "gpt", mode
    if table == "mbr":
        if mode != "bios":
            raise UserError(
                f"boot mode {boot!r} needs a GPT partition table, not MBR",
                "use partition_table 'gpt' (Azure generation 2 VMs boot UEFI only from GPT "
                "with an EFI system partition)",
            )
        return "mbr", mode
    raise UserError(f"unknown partition table {table!r}", "use 'gpt' or 'mbr'")


def plan_layout(
    disk_size: int, table: str, *, boot: str = "bios", disk_guid: str | None = None
) -> Layout:
    """Decide the partitions of a `disk_size`-byte disk with a `table` ('gpt' or 'mbr')
    for the firmware `boot` ('bios', 'uefi' or 'hybrid').

    Everything starts and ends on 1 MiB boundaries. GPT from 1 MiB on: a 1 MiB BIOS boot
    partition (bios, hybrid), a 256 MiB EFI system partition (uefi, hybrid), then root to
    the last whole MiB before the backup GPT. MBR (bios only): root from 1 MiB to the end;
    GRUB's core.img goes in the gap before it.
    """
    kind, mode = _check_table_and_boot(table, boot)
    if disk_size <= 0 or disk_size % MiB:
        raise UserError(
            f"disk_size {disk_size} is not a whole number of MiB",
            "Azure accepts only disks whose size is a whole number of MiB, e.g. 30720MiB",
        )
    if disk_guid is not None:
        if kind != "gpt":
            raise UserError("a disk GUID needs a GPT partition table", "drop disk_guid or use gpt")
        try:
            disk_guid = str(UUID(disk_guid)).upper()
        except ValueError as exc:
            raise UserError(f"disk GUID {disk_guid!r} is not a GUID", "use uuidgen") from exc

    parts: list[Partition] = []
    if kind == "gpt":
        start = MiB
        if mode in ("bios", "hybrid"):
            parts.append(
                Partition(len(parts) + 1, start, MiB, BIOS_BOOT_GUID, "BIOS boot", "bios_boot")
            )
            start += MiB
        if mode in ("uefi", "hybrid"):
            parts.append(Partition(len(parts) + 1, start, ESP_SIZE, ESP_GUID, "EFI system", "esp"))
            start += ESP_SIZE
        root_start = start
        root_end = _align_down(disk_size - GPT_BACKUP_SECTORS * SECTOR)
        root_type = ROOT_X86_64_GUID
    else:
        if disk_size // SECTOR > MBR_MAX_SECTORS:
            raise UserError(
                f"disk_size {_mib(disk_size)} is too large for an MBR partition table",
                "use a GPT partition table or a disk of at most 2 TiB",
            )
        root_start = MiB
        root_end = disk_size
        root_type = MBR_LINUX
    if root_end - root_start < MIN_ROOT_SIZE:
        need = root_start + MIN_ROOT_SIZE + disk_size - root_end
        raise UserError(
            f"disk_size {_mib(disk_size)} leaves no room for a root partition",
            f"use a disk of at least {_mib(need)}",
        )
    parts.append(
        Partition(len(parts) + 1, root_start, root_end - root_start, root_type, "root", "root")
    )
    return Layout(kind, disk_size, tuple(parts), disk_guid)


def sfdisk_script(layout: Layout) -> str:
    """The sfdisk input that writes `layout`'s partition table (sizes in sectors)."""
    lines = [f"label: {'gpt' if layout.table == 'gpt' else 'dos'}"]
    if layout.disk_guid:
        lines.append(f"label-id: {layout.disk_guid}")
    lines += ["unit: sectors", f"sector-size: {SECTOR}", ""]
    for part in layout.partitions:
        fields = [
            f"start={part.start // SECTOR}",
            f"size={part.size // SECTOR}",
            f"type={part.type}",
        ]
        if layout.table == "gpt":
            fields.append(f'name="{part.name}"')
        elif part.role == "root":
            # Some BIOSes only boot an MBR disk that has an active partition.
            fields.append("bootable")
        lines.append(", ".join(fields))
    return "\n".join(lines) + "\n"


def create_disk(path: Path, layout: Layout) -> None:
    """Create a sparse file of `layout.disk_size` bytes at `path` and write its table.

    An existing file at `path` is replaced. The caller makes the step atomic (writes to a
    temporary name and renames it when every later action on the image succeeded).
    """
    path = Path(path)
    try:
        path.unlink(missing_ok=True)
        with open(path, "xb") as f:
            f.truncate(layout.disk_size)
    except OSError as exc:
        raise UserError(f"cannot create {path}: {exc.strerror}", "check the directory") from exc
    run(create_argv(path), stdin=sfdisk_script(layout))
    written = [(p["start"] * SECTOR, p["size"] * SECTOR) for p in read_partitions(path)]
    planned = [(p.start, p.size) for p in layout.partitions]
    if written != planned:
        raise UserError(
            f"sfdisk wrote partitions {written} to {path}, not the planned {planned}",
            "report this together with `sfdisk --version`",
        )


def read_partitions(path: Path) -> list[dict[str, Any]]:
    """The partitions of the image at `path` as `sfdisk --json` lists them (sectors)."""
    out = run(["sfdisk", "--json", path], capture=True).stdout
    try:
        table = json.loads(out)["partitiontable"]
    except (ValueError, KeyError) as exc:
        raise UserError(
            f"cannot read the partition table of {path}",
            "check that the image has one: sfdisk --list IMAGE",
        ) from exc
    parts: list[dict[str, Any]] = table.get("partitions", [])
    return parts


def _ext2_device(image: Path, partition: Partition) -> str:
    """`image` with the partition's offset in libext2fs's `NAME?offset=BYTES` syntax."""
    name = os.fspath(image)
    if "?" in name:
        # libext2fs splits the device name at the first '?'.
        raise UserError(f"the image path {name} contains '?'", "use a path without '?'")
    return f"{name}?offset={partition.start}"


def mkfs_argv(
    image: Path, partition: Partition, rootdir: Path, *, uuid: str, label: str
) -> list[str]:
    """The mkfs.ext4 command that fills `partition` of `image` with the tree `rootdir`."""
    argv = ["mkfs.ext4", "-F", "-q"]
    argv += ["-b", str(EXT4_BLOCK), "-I", str(EXT4_INODE_SIZE), "-i", str(EXT4_INODE_RATIO)]
    argv += ["-m", str(EXT4_RESERVED_PERCENT), "-U", uuid, "-L", label]
    argv += ["-d", os.fspath(rootdir), "-E", f"offset={partition.start}"]
    # Without a suffix mke2fs would read the size in blocks or KiB depending on -b.
    argv += [os.fspath(image), f"{partition.size // KiB}k"]
    return argv


def make_ext4(
    image: Path, partition: Partition, rootdir: Path, *, uuid: str, label: str = "archroot"
) -> None:
    """Make an ext4 file system filling `partition` of `image` from the tree at `rootdir`.

    No mount and no loop device: `mkfs.ext4 -d` copies files, directories, symlinks,
    device nodes, FIFOs and hard links with their owners, modes, timestamps and extended
    attributes (the root directory itself becomes root:root 0755). Block size, inode size
    and inode ratio are pinned so `required_disk_size` can count with them.
    """
    rootdir = Path(rootdir)
    if not rootdir.is_dir():
        raise UserError(
            f"the root tree {rootdir} is not a directory",
            "run the step that builds the root tree first",
        )
    try:
        UUID(uuid)
    except ValueError as exc:
        raise UserError(f"file system UUID {uuid!r} is not a UUID", "use uuidgen") from exc
    if partition.size % KiB:
        raise UserError(
            f"partition {partition.number} is not a whole number of KiB",
            "use a layout from plan_layout",
        )
    try:
        run(mkfs_argv(image, partition, rootdir, uuid=uuid, label=label))
    except UserError as exc:
        # mkfs says "Could not allocate block" or the like; say what it means.
        need = ext4_size_for(tree_usage(rootdir))
        if need <= partition.size:
            raise
        raise UserError(
            f"partition {partition.number} ({_mib(partition.size)}) is too small for the "
            f"root tree {rootdir}: it needs about {need // MiB} MiB; {exc.message}",
            "make the disk larger (disk_size)",
        ) from exc


def e2fsck_argv(image: Path, partition: Partition) -> list[str]:
    """The e2fsck command that checks the file system in `partition` without changing it."""
    return ["e2fsck", "-f", "-n", _ext2_device(image, partition)]


def create_argv(image: Path) -> list[str]:
    """The sfdisk command that writes a partition table (`sfdisk_script`, on its input)."""
    return ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", os.fspath(image)]


def check_ext4(image: Path, partition: Partition) -> None:
    """Run `e2fsck -fn` on the file system in `partition`; raise UserError on any problem."""
    proc = run(e2fsck_argv(image, partition), capture=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join(
            f"    {line}" for line in (proc.stdout + proc.stderr).strip().splitlines()[-12:]
        )
        raise UserError(
            f"e2fsck found problems in partition {partition.number} of {image} "
            f"(exit code {proc.returncode}):\n{tail}",
            "rebuild the image from this step on",
        )


def _blkid_value(image: Path, partition: Partition, tag: str) -> str:
    """The blkid `tag` (UUID, TYPE...) of the file system in `partition`; '' if none."""
    proc = run(
        [
            "blkid",
            "-p",
            "-O",
            str(partition.start),
            "-S",
            str(partition.size),
            "-s",
            tag,
            "-o",
            "value",
            image,
        ],
        capture=True,
        check=False,
    )
    return proc.stdout.strip() if proc.returncode == 0 else ""


def fs_uuid(image: Path, partition: Partition) -> str:
    """The UUID of the file system in `partition` of `image`, as blkid reports it
    (`XXXX-XXXX` for FAT)."""
    value = _blkid_value(image, partition, "UUID")
    if not value:
        raise UserError(
            f"no file system found in partition {partition.number} of {image}",
            "make the file system first (the step that makes the disk)",
        )
    return value


def fs_type(image: Path, partition: Partition) -> str | None:
    """The type of the file system in `partition` of `image` as blkid names it ('ext4',
    'vfat'), or None when blkid finds none."""
    return _blkid_value(image, partition, "TYPE") or None


def read_ext4_file(image: Path, partition: Partition, path: str) -> bytes:
    """The content of the regular file at `path` in the ext4 file system in `partition`.

    Read with `debugfs` through libext2fs's offset option: no mount, no loop device.
    UserError if there is no such file.
    """
    if not path.startswith("/") or any(c.isspace() or c in "\"'" for c in path):
        raise ValueError(f"read_ext4_file needs a plain absolute path, not {path!r}")
    with temporary_directory(prefix="archkernel-ext4-") as tmp:
        # A relative output name, so debugfs's own argument parsing never sees our paths.
        proc = run(
            ["debugfs", "-R", f"dump {path} out", _ext2_device(image, partition)],
            capture=True,
            check=False,
            cwd=tmp,
        )
        out = tmp / "out"
        # debugfs exits 0 when the path does not exist; only the missing output tells.
        if proc.returncode != 0 or not out.is_file():
            raise UserError(
                f"the file system in partition {partition.number} of {image} has no file {path}",
                "check that the file was in the tree the file system was made from",
            )
        return out.read_bytes()


@dataclass(frozen=True)
class TreeUsage:
    """What a directory tree takes in ext4: data and directory blocks, and inodes."""

    bytes: int
    inodes: int


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def tree_usage(rootdir: Path) -> TreeUsage:
    """Count the blocks and inodes the tree at `rootdir` needs in ext4 (4 KiB blocks).

    Files count their size rounded up to blocks (hard links once), directories their
    entries (8 bytes plus the name, 4-byte aligned) in whole blocks, symlinks of 60 bytes
    or more one block; device nodes, FIFOs and short symlinks live in the inode.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    inodes = 1  # rootdir itself
    todo = [os.fspath(rootdir)]
    try:
        while todo:
            directory = todo.pop()
            dir_bytes = 24  # "." and ".."
            with os.scandir(directory) as entries:
                for entry in entries:
                    dir_bytes += 8 + _round_up(len(os.fsencode(entry.name)), 4)
                    st = entry.stat(follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode):
                        todo.append(entry.path)
                    elif st.st_nlink > 1:
                        if (st.st_dev, st.st_ino) in seen:
                            continue
                        seen.add((st.st_dev, st.st_ino))
                    inodes += 1
                    if stat.S_ISREG(st.st_mode):
                        total += _round_up(st.st_size, EXT4_BLOCK)
                    elif stat.S_ISLNK(st.st_mode) and st.st_size >= 60:
                        total += EXT4_BLOCK
            total += _round_up(dir_bytes, EXT4_BLOCK)
    except OSError as exc:
        raise UserError(
            f"cannot read the root tree {rootdir}: {exc}",
            "run as root so every file of the tree is readable",
        ) from exc
    return TreeUsage(total, inodes)


def tree_size(rootdir: Path) -> int:
    """Bytes of data and directory blocks the tree at `rootdir` takes in ext4."""
    return tree_usage(rootdir).bytes


def ext4_journal_size(fs_size: int) -> int:
    """The journal mke2fs makes by default for a file system of `fs_size` bytes."""
    blocks = fs_size // EXT4_BLOCK
    # (fewer blocks than, journal blocks), as libext2fs's ext2fs_default_journal_size.
    for limit, journal in (
        (2048, 0),
        (32768, 1024),
        (256 * 1024, 4096),
        (512 * 1024, 8192),
        (4096 * 1024, 16384),
        (8192 * 1024, 32768),
        (16384 * 1024, 65536),
        (32768 * 1024, 131072),
    ):
        if blocks < limit:
            return journal * EXT4_BLOCK
    return 262144 * EXT4_BLOCK


def ext4_size_for(usage: TreeUsage) -> int:
    """The smallest ext4 size, in whole MiB, that holds `usage` with room to spare.

    Counts the inode tables (one 256-byte inode per 16 KiB), the journal, about 2% for
    bitmaps, group descriptors and their reserve, the 5% root reserve, and 10% margin.
    """
    size = _round_up(usage.bytes + 16 * MiB, MiB)
    # The overhead grows with the size; a few rounds settle it (it only ever grows).
    for _ in range(20):
        metadata = size * EXT4_INODE_SIZE // EXT4_INODE_RATIO + size // 50 + 4 * MiB
        need = (usage.bytes + metadata + ext4_journal_size(size)) * 100
        need //= 100 - EXT4_RESERVED_PERCENT
        need = max(need * 11 // 10, usage.inodes * EXT4_INODE_RATIO * 11 // 10)
        need = _round_up(need, MiB)
        if need <= size:
            break
        size = need
    return size


def disk_size_for(fs_size: int, table: str, *, boot: str = "bios") -> int:
    """The disk size whose root partition from plan_layout is at least `fs_size` bytes."""
    kind, mode = _check_table_and_boot(table, boot)
    if kind == "mbr":
        overhead = MiB  # the table and GRUB's core.img before root
    else:
        # 1 MiB for the table, the BIOS boot partition and/or the ESP before root, and the
        # backup GPT in the last MiB.
        overhead = 2 * MiB
        if mode in ("bios", "hybrid"):
            overhead += MiB
        if mode in ("uefi", "hybrid"):
            overhead += ESP_SIZE
    return max(_round_up(fs_size, MiB), MIN_ROOT_SIZE) + overhead


def required_disk_size(rootdir: Path, table: str, *, boot: str = "bios") -> int:
    """An estimate of the smallest disk (whole MiB) whose root partition holds `rootdir`."""
    return disk_size_for(ext4_size_for(tree_usage(rootdir)), table, boot=boot)


def check_disk_size(rootdir: Path, disk_size: int, table: str, *, boot: str = "bios") -> None:
    """Raise UserError when a `disk_size`-byte disk cannot hold the tree at `rootdir`."""
    need = required_disk_size(rootdir, table, boot=boot)
    if disk_size < need:
        raise UserError(
            f"disk_size {_mib(disk_size)} is too small for the root tree {rootdir}: "
            f"it needs at least {need // MiB} MiB",
            f"set disk_size to {need // MiB}MiB or more (Azure's default OS disk is 30720MiB)",
        )
