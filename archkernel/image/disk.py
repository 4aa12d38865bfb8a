"""Disk images: the partition layout, the partition table, and what a partition holds.

Deciding and acting are kept apart: `plan_layout` and `sfdisk_script` decide where the
partitions go (pure, 512-byte sectors, everything aligned to 1 MiB); `create_ops` are the
operations that write a sparse file with that table and check what sfdisk wrote
(`create_disk` carries them out). `blkid -p` reads what a partition holds at its offset in
the image file (`--offset`), so nothing is mounted and no loop device is needed. The ext4
root made from a tree is archkernel.image.ext4's business, the ESP's FAT
archkernel.image.esp's.

Boot modes (the firmware the disk boots with):
- 'bios' (Azure generation 1): GPT with a 1 MiB BIOS boot partition for GRUB's core.img,
  or MBR with core.img in the gap before the first partition;
- 'uefi' (generation 2): GPT with an EFI system partition (ESP) before root;
- 'hybrid' (either): GPT with the BIOS boot partition, then the ESP, then root, as Arch's
  own cloud images are laid out. UEFI needs GPT here (Azure generation 2 boots only GPT).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from uuid import UUID

from archkernel.errors import UserError
from archkernel.host.run import run
from archkernel.plan import Do, Op, Plan, Run, execute
from archkernel.units import SECTOR, MiB

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
    guid: str | None = None  # GPT's unique partition GUID (None: sfdisk picks one at random)

    @property
    def end(self) -> int:
        """The first byte after the partition."""
        return self.start + self.size


@dataclass(frozen=True)
class Layout:
    """A whole disk: its partition table type, size in bytes, and partitions in order;
    its GPT disk GUID or MBR disk signature (`0x1234abcd`), None for sfdisk's random one."""

    table: Table
    disk_size: int
    partitions: tuple[Partition, ...]
    disk_guid: str | None = None
    disk_signature: str | None = None

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


def size_text(size: int) -> str:
    """`size` in MiB (`64 MiB`) when it is whole MiBs, else in bytes."""
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


def _guid(value: str, what: str) -> str:
    try:
        return str(UUID(value)).upper()
    except ValueError as exc:
        raise UserError(f"{what} {value!r} is not a GUID", "use uuidgen") from exc


def plan_layout(
    disk_size: int,
    table: str,
    *,
    boot: str = "bios",
    disk_guid: str | None = None,
    partition_guids: Mapping[str, str] | None = None,
    disk_signature: str | None = None,
) -> Layout:
    """Decide the partitions of a `disk_size`-byte disk with a `table` ('gpt' or 'mbr')
    for the firmware `boot` ('bios', 'uefi' or 'hybrid').

    The disk's identity is given, or left to sfdisk (random): `disk_guid` and
    `partition_guids` (by role: 'bios_boot', 'esp', 'root') for GPT, `disk_signature`
    (`0x` and 8 hex digits) for MBR.

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
        disk_guid = _guid(disk_guid, "disk GUID")
    guids = {r: _guid(g, f"{r} partition GUID") for r, g in (partition_guids or {}).items()}
    if guids and kind != "gpt":
        raise UserError(
            "partition GUIDs need a GPT partition table", "drop partition_guids or use gpt"
        )
    if disk_signature is not None:
        if kind != "mbr":
            raise UserError(
                "a disk signature is for an MBR partition table", "use disk_guid for gpt"
            )
        if not re.fullmatch(r"0x[0-9a-f]{8}", disk_signature):
            raise UserError(
                f"disk signature {disk_signature!r} is not 0x and 8 hex digits",
                "write it as sfdisk's label-id, e.g. 0x1234abcd",
            )

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
                f"disk_size {size_text(disk_size)} is too large for an MBR partition table",
                "use a GPT partition table or a disk of at most 2 TiB",
            )
        root_start = MiB
        root_end = disk_size
        root_type = MBR_LINUX
    if root_end - root_start < MIN_ROOT_SIZE:
        need = root_start + MIN_ROOT_SIZE + disk_size - root_end
        raise UserError(
            f"disk_size {size_text(disk_size)} leaves no room for a root partition",
            f"use a disk of at least {size_text(need)}",
        )
    parts.append(
        Partition(len(parts) + 1, root_start, root_end - root_start, root_type, "root", "root")
    )
    unknown = sorted(set(guids) - {part.role for part in parts})
    if unknown:
        raise UserError(
            f"partition GUIDs for partitions a {mode} layout does not have: {', '.join(unknown)}",
            f"give GUIDs for {', '.join(part.role for part in parts)}",
        )
    parts = [dataclasses.replace(part, guid=guids.get(part.role)) for part in parts]
    return Layout(kind, disk_size, tuple(parts), disk_guid, disk_signature)


def sfdisk_script(layout: Layout) -> str:
    """The sfdisk input that writes `layout`'s partition table (sizes in sectors)."""
    lines = [f"label: {'gpt' if layout.table == 'gpt' else 'dos'}"]
    if layout.disk_guid:
        lines.append(f"label-id: {layout.disk_guid}")
    if layout.disk_signature:
        lines.append(f"label-id: {layout.disk_signature}")
    lines += ["unit: sectors", f"sector-size: {SECTOR}", ""]
    for part in layout.partitions:
        fields = [
            f"start={part.start // SECTOR}",
            f"size={part.size // SECTOR}",
            f"type={part.type}",
        ]
        if layout.table == "gpt":
            fields.append(f'name="{part.name}"')
            if part.guid:
                fields.append(f"uuid={part.guid}")
        elif part.role == "root":
            # Some BIOSes only boot an MBR disk that has an active partition.
            fields.append("bootable")
        lines.append(", ".join(fields))
    return "\n".join(lines) + "\n"


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


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


# --- the partition table ----------------------------------------------------------------------


def create_argv(image: Path) -> list[str]:
    """The sfdisk command that writes a partition table (`sfdisk_script`, on its input)."""
    return ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", os.fspath(image)]


def list_argv(image: Path) -> list[str]:
    """The sfdisk command that lists the partitions of `image` as JSON."""
    return ["sfdisk", "--json", os.fspath(image)]


def parse_partitions(text: str, image: Path) -> list[dict[str, Any]]:
    """The partitions `sfdisk --json` listed (sectors); UserError if it listed no table."""
    try:
        table = json.loads(text)["partitiontable"]
    except (ValueError, KeyError) as exc:
        raise UserError(
            f"cannot read the partition table of {image}",
            "check that the image has one: sfdisk --list IMAGE",
        ) from exc
    parts: list[dict[str, Any]] = table.get("partitions", [])
    return parts


def read_partitions(path: Path) -> list[dict[str, Any]]:
    """The partitions of the image at `path` as `sfdisk --json` lists them (sectors)."""
    return parse_partitions(run(list_argv(path), capture=True).stdout, path)


def table_check(
    image: Path, layout: Layout, problem: Callable[[list[Any], list[Any]], UserError]
) -> Run:
    """The command that reads the table of `image` back and raises `problem(written,
    planned)` (each a list of (start, size) in bytes) unless its partitions are where
    `layout` puts them."""

    def compare(proc: subprocess.CompletedProcess[str]) -> None:
        parts = parse_partitions(proc.stdout, image)
        written = [(p["start"] * SECTOR, p["size"] * SECTOR) for p in parts]
        planned = [(p.start, p.size) for p in layout.partitions]
        if written != planned:
            raise problem(written, planned)

    return Run.of(list_argv(image), capture=True, then=compare)


def _create_file(path: Path, size: int) -> None:
    try:
        path.unlink(missing_ok=True)
        with open(path, "xb") as f:
            f.truncate(size)
    except OSError as exc:
        raise UserError(f"cannot create {path}: {exc.strerror}", "check the directory") from exc


def create_ops(path: Path, layout: Layout) -> list[Op]:
    """Create a sparse file of `layout.disk_size` bytes at `path` (replacing any file
    there), write `layout`'s partition table with sfdisk and check what it wrote.

    The caller makes the step atomic (writes to a temporary name and renames it when every
    later action on the image succeeded).
    """
    path = Path(path)
    script = sfdisk_script(layout)
    shown = "; ".join(line for line in script.splitlines() if line)

    def differs(written: list[Any], planned: list[Any]) -> UserError:
        return UserError(
            f"sfdisk wrote partitions {written} to {path}, not the planned {planned}",
            "report this together with `sfdisk --version`",
        )

    return [
        Do(
            f"create the sparse file {path} of {size_text(layout.disk_size)}",
            lambda: _create_file(path, layout.disk_size),
        ),
        Run.of(create_argv(path), stdin=script, note=f"sfdisk reads: {shown}"),
        table_check(path, layout, differs),
    ]


def create_disk(path: Path, layout: Layout) -> None:
    """Carry out `create_ops`: a sparse file at `path` with `layout`'s partition table."""
    execute(Plan(create_ops(path, layout)))


# --- what a partition holds -----------------------------------------------------------------


def blkid_argv(image: Path, partition: Partition, tag: str) -> list[str]:
    """The blkid command that prints the `tag` (UUID, TYPE ...) of the file system in
    `partition` of `image`; it exits 2 when it finds none."""
    return [
        "blkid", "-p", "-O", str(partition.start), "-S", str(partition.size),
        "-s", tag, "-o", "value", os.fspath(image),
    ]  # fmt: skip


def no_file_system(image: Path, partition: Partition) -> UserError:
    return UserError(
        f"no file system found in partition {partition.number} of {image}",
        "make the file system first (the step that makes the disk)",
    )


def _blkid_value(image: Path, partition: Partition, tag: str) -> str:
    """The blkid `tag` of the file system in `partition`; '' if none."""
    proc = run(blkid_argv(image, partition, tag), capture=True, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def fs_uuid(image: Path, partition: Partition) -> str:
    """The UUID of the file system in `partition` of `image`, as blkid reports it
    (`XXXX-XXXX` for FAT)."""
    value = _blkid_value(image, partition, "UUID")
    if not value:
        raise no_file_system(image, partition)
    return value


def fs_type(image: Path, partition: Partition) -> str | None:
    """The type of the file system in `partition` of `image` as blkid names it ('ext4',
    'vfat'), or None when blkid finds none."""
    return _blkid_value(image, partition, "TYPE") or None


def check_failure(
    tool: str, partition: Partition, image: Path, hint: str
) -> Callable[[subprocess.CompletedProcess[str]], None]:
    """A `then` for a file system check (`e2fsck -n`, `fsck.fat -n`) of `partition`:
    a UserError quoting its last output when it exits non-zero (the tools report on
    stdout)."""

    def judge(proc: subprocess.CompletedProcess[str]) -> None:
        if proc.returncode == 0:
            return
        lines = (proc.stdout + proc.stderr).strip().splitlines()[-12:]
        tail = "\n".join(f"    {line}" for line in lines)
        raise UserError(
            f"{tool} found problems in partition {partition.number} of {image} "
            f"(exit code {proc.returncode}):\n{tail}",
            hint,
        )

    return judge
