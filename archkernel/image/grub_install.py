"""GRUB installed into a disk image whose root file system holds its staged files.

The second act of archkernel.image.grub, after mkfs:

- BIOS (`bios_install`): `grub-bios-setup` writes `boot.img` into the MBR and embeds
  `core.img` in the BIOS boot partition (GPT) or the gap after the MBR (MBR).
- UEFI (`efi_install`): `core.efi`, read back from the root file system, is copied to the
  EFI system partition's removable path `EFI/BOOT/BOOTX64.EFI`, which UEFI firmware boots
  without an NVRAM entry (an uploaded disk has none).

`grub-bios-setup` writes to the image *file* through a device map `(hd0) IMAGE`, but
before it does anything it insists that the directory holding `boot.img` and `core.img`
lies on a block device GRUB can open (it "guesses the root device" from that directory's
mount, even though the result is not written anywhere; this GRUB has no option to name it).
A directory on the build host's disk fails in containers (`/dev/vda` opens with EPERM) and
would make the result depend on the host, so the BIOS install mounts the image's root
partition read-only (`mount -o ro,loop,offset=...,sizelimit=...`: mount makes the loop
device and frees it again at `umount`, so every command is known before it runs) and
points `grub-bios-setup` at the staged files there. The file system stays exactly as mkfs
made it.

Both are plans (archkernel.plan) that the boot loader step puts into its own;
`install_bios`, `install_efi` and `install_grub` carry them out at once with a temporary
scratch directory.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from archkernel.errors import UserError
from archkernel.host import mounts
from archkernel.host.files import remove_path, temporary_directory, write_text
from archkernel.host.run import minimal_env
from archkernel.image import disk, esp, ext4
from archkernel.image.disk import Layout
from archkernel.image.grub import (
    EFI_CORE,
    GRUB_I386_PC,
    PREFIX,
    bios_setup_argv,
    canonical_uuid,
    device_map,
    platforms,
    staged_dir,
)
from archkernel.plan import Do, Plan, Run, execute
from archkernel.units import SECTOR


def root_uuid_check(image: Path, layout: Layout, root_uuid: str) -> Run:
    """The command that reads the root file system's UUID: it must be `root_uuid`, the UUID
    the core images were built for, or the machine would stop at `grub rescue>`."""
    root = layout.root

    def compare(proc: subprocess.CompletedProcess[str]) -> None:
        found = proc.stdout.strip()
        if found.lower() != canonical_uuid(root_uuid):
            raise UserError(
                f"the root file system of {image} has UUID {found}, but GRUB was staged for "
                f"{root_uuid}",
                "make the file system with the UUID given when GRUB's files were staged",
            )

    return Run.of(
        disk.blkid_argv(image, root, "UUID"),
        capture=True,
        then=compare,
        error=lambda argv, code, err: disk.no_file_system(image, root),
    )


def _table_changed(image: Path) -> Callable[[list[Any], list[Any]], UserError]:
    def changed(written: list[Any], planned: list[Any]) -> UserError:
        return UserError(
            f"installing GRUB changed the partition table of {image}",
            "report this together with `grub-install --version`",
        )

    return changed


def _check_boot_code(image: Path) -> None:
    with open(image, "rb") as f:
        mbr = f.read(SECTOR)
    if mbr[510:] != b"\x55\xaa" or not any(mbr[:440]):
        raise UserError(
            f"{image} has no boot code in its MBR after grub-bios-setup",
            "run the GRUB step again with -v to see grub-bios-setup's output",
        )


def _prepare_bios(map_file: Path, image: Path, mount_point: Path) -> None:
    remove_path(map_file.parent)
    mount_point.mkdir(parents=True)
    write_text(map_file, device_map(image))


def _check_staged(image: Path, grub_dir: Path) -> None:
    missing = [n for n in ("boot.img", "core.img") if not (grub_dir / n).is_file()]
    if missing:
        raise UserError(
            f"the root file system of {image} has no {PREFIX}/i386-pc/{' or '.join(missing)}",
            "stage GRUB's files into the root tree before making the file system",
        )


def bios_install(
    image: Path, layout: Layout, *, root_uuid: str, scratch: Path, bios_lib: Path = GRUB_I386_PC
) -> Plan:
    """Write GRUB's boot.img and core.img (staged by `stage_ops`) into `image`.

    The root partition is mounted read-only at `scratch/root` for grub-bios-setup (see the
    module's docstring), `scratch` holds its device map; `scratch` is made anew.
    """
    if not layout.boots_bios:
        raise UserError(
            f"the {layout.boot} layout of {image} has no place for BIOS boot code",
            "plan the disk with boot='bios' or 'hybrid'",
        )
    scratch = Path(scratch)
    map_file, mount_point = scratch / "device.map", scratch / "root"
    grub_dir = staged_dir(mount_point, "i386-pc")
    # grub-bios-setup is on PATH (Arch) or beside the modules (Debian).
    path = {"PATH": f"{minimal_env()['PATH']}:{os.fspath(bios_lib)}"}
    setup = bios_setup_argv(Path("grub-bios-setup"), grub_dir, map_file, image)
    plan = Plan()
    plan.ops += [
        root_uuid_check(image, layout, root_uuid),
        Do(
            f"write {map_file}: (hd0) is {os.path.realpath(image)}; make {mount_point}",
            lambda: _prepare_bios(map_file, image, mount_point),
        ),
        Run.of(mounts.loop_mount_argv(image, layout.root.start, layout.root.size, mount_point)),
        Do(
            f"check that {grub_dir} holds boot.img and core.img",
            lambda: _check_staged(image, grub_dir),
        ),
        Run.of(setup, env=path),
        Run.of(mounts.umount_argv(mount_point)),
        Do(
            f"wait until the kernel has freed the loop device of {image}",
            lambda: mounts.await_loop_freed(image, layout.root.start),
        ),
        disk.table_check(image, layout, _table_changed(image)),
        Do(f"check that the MBR of {image} holds boot code", lambda: _check_boot_code(image)),
    ]
    plan.cleanup.append(
        Do(
            f"unmount {mount_point} if the step stopped while it was mounted",
            lambda: mounts.unmount_if_mounted(mount_point),
        )
    )
    return plan


def _fat_check(image: Path, partition: disk.Partition) -> Run:
    """The command that checks the ESP holds a FAT (blkid's TYPE `vfat`)."""

    def not_fat(found: str | None) -> UserError:
        return UserError(
            f"the EFI system partition of {image} holds "
            f"{'no file system' if found is None else f'a {found} file system'}, not FAT",
            "make it with esp.make_fat after creating the disk",
        )

    def judge(proc: subprocess.CompletedProcess[str]) -> None:
        if proc.stdout.strip() != "vfat":
            raise not_fat(proc.stdout.strip() or None)

    return Run.of(
        disk.blkid_argv(image, partition, "TYPE"),
        capture=True,
        then=judge,
        error=lambda argv, code, err: not_fat(None),
    )


def _fresh_directory(path: Path) -> None:
    remove_path(path)
    path.mkdir(parents=True)


def _check_copied(image: Path, staged: Path, copied: Path) -> None:
    if copied.read_bytes() != staged.read_bytes():
        raise UserError(
            f"{esp.REMOVABLE_PATH_X64} on the ESP of {image} differs from {staged}",
            "run the boot loader step again with -v to see mcopy's output",
        )


def efi_install(
    image: Path, layout: Layout, *, root_uuid: str, scratch: Path, epoch: int | None = None
) -> Plan:
    """Copy the core.efi staged by `stage_ops` to the ESP of `image` as
    EFI/BOOT/BOOTX64.EFI.

    core.efi is read back from the root file system (debugfs, no mount) into
    `scratch/esp/EFI/BOOT/BOOTX64.EFI`, so the ESP gets exactly the build of the modules
    beside it. The ESP must already hold a FAT (`esp.make_ops`); other files on it are
    kept, an earlier BOOTX64.EFI is replaced. With an `epoch`, the file and the
    directories made for it are dated by it, not by the time of the copy.
    """
    if not layout.boots_uefi:
        raise UserError(
            f"the {layout.boot} layout of {image} has no EFI system partition",
            "plan the disk with boot='uefi' or 'hybrid'",
        )
    scratch = Path(scratch)
    tree, copied = scratch / "esp", scratch / "BOOTX64.EFI.copied"
    loader = tree / esp.REMOVABLE_PATH_X64
    staged = f"{PREFIX}/x86_64-efi/{EFI_CORE}"
    missing = UserError(
        f"the root file system of {image} has no {staged}",
        "stage GRUB's EFI files into the root tree before making the file system",
    )
    return Plan(
        [
            root_uuid_check(image, layout, root_uuid),
            _fat_check(image, layout.esp),
            Do(
                f"make the empty directory {loader.parent}", lambda: _fresh_directory(loader.parent)
            ),
            ext4.dump_op(image, layout.root, staged, loader, missing=missing),
            *_dated(tree, epoch),
            esp.copy_op(image, layout.esp, [tree / "EFI"]),
            esp.read_op(image, layout.esp, esp.REMOVABLE_PATH_X64, copied),
            Do(
                f"check that {esp.REMOVABLE_PATH_X64} on the ESP is {loader}",
                lambda: _check_copied(image, loader, copied),
            ),
            disk.table_check(image, layout, _table_changed(image)),
        ]
    )


def _dated(tree: Path, epoch: int | None) -> list[Do]:
    if epoch is None:
        return []
    return [
        Do(
            f"date {tree} and everything in it {epoch} (mcopy -m copies the times)",
            lambda: esp.date_tree(tree, epoch),
        )
    ]


def installed_platforms(layout: Layout) -> list[str]:
    """The GRUB platforms `install` puts on a disk of `layout`."""
    return platforms(layout.boot)


def install(
    image: Path,
    layout: Layout,
    *,
    root_uuid: str,
    scratch: Path,
    bios_lib: Path = GRUB_I386_PC,
    epoch: int | None = None,
) -> Plan:
    """What the firmware of `layout` boots: `bios_install` for bios, `efi_install` for
    uefi, both for hybrid (in `scratch/bios` and `scratch/efi`); `epoch` dates the ESP's
    files."""
    plan = Plan()
    parts = []
    if layout.boots_bios:
        parts.append(
            bios_install(
                image, layout, root_uuid=root_uuid, scratch=scratch / "bios", bios_lib=bios_lib
            )
        )
    if layout.boots_uefi:
        parts.append(
            efi_install(image, layout, root_uuid=root_uuid, scratch=scratch / "efi", epoch=epoch)
        )
    for part in parts:
        plan.ops += part.ops
        plan.cleanup += part.cleanup
    return plan


def install_bios(
    image: Path, layout: Layout, *, root_uuid: str, grub_lib: Path = GRUB_I386_PC
) -> None:
    """Carry out `bios_install` with a temporary scratch directory."""
    with temporary_directory(prefix="archkernel-grub-") as tmp:
        execute(bios_install(image, layout, root_uuid=root_uuid, scratch=tmp, bios_lib=grub_lib))


def install_efi(image: Path, layout: Layout, *, root_uuid: str) -> None:
    """Carry out `efi_install` with a temporary scratch directory."""
    with temporary_directory(prefix="archkernel-grub-") as tmp:
        execute(efi_install(image, layout, root_uuid=root_uuid, scratch=tmp))


def install_grub(
    image: Path, layout: Layout, *, root_uuid: str, bios_lib: Path = GRUB_I386_PC
) -> list[str]:
    """Carry out `install` with a temporary scratch directory. Returns the GRUB platforms
    installed."""
    with temporary_directory(prefix="archkernel-grub-") as tmp:
        execute(install(image, layout, root_uuid=root_uuid, scratch=tmp, bios_lib=bios_lib))
    return installed_platforms(layout)
