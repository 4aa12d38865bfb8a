"""Steps 6-8 of azure_vhd: the disk image, the bootloader and the fixed VHD."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from archkernel.azure.workspace import (
    INITRD,
    KERNEL,
    Paths,
    _json,
    build_environment,
    esp_volume,
    grub_dirs,
    paths,
    root_uuid,
)
from archkernel.errors import UserError
from archkernel.formats import vhd
from archkernel.host import mounts
from archkernel.host.files import (
    atomic_path,
    remove_path,
)
from archkernel.host.run import render
from archkernel.image import disk, esp, grub
from archkernel.log import log
from archkernel.settings import AzureSettings, Settings, format_size

# --- step 6 -------------------------------------------------------------------------------


def layout_for(az: AzureSettings) -> disk.Layout:
    """The partition layout of the image, for the firmware it boots with."""
    return disk.plan_layout(az.disk_size, az.partition_table, boot=az.firmware)


def unstage_other_platforms(rootdir: Path, boot: str) -> None:
    """Remove GRUB platform directories an earlier run of step 6 staged for another boot
    mode: the image gets only what its firmware uses."""
    wanted = {"bios": {"i386-pc"}, "uefi": {"x86_64-efi"}}.get(boot, {"i386-pc", "x86_64-efi"})
    for platform in ("i386-pc", "x86_64-efi"):
        if platform not in wanted:
            remove_path(rootdir / grub.PREFIX.lstrip("/") / platform)


def take_back_raw(p: Paths) -> None:
    """Make disk.img the raw image again if step 8 already turned it into the VHD."""
    if p.raw.exists() or not p.vhd.exists():
        return
    size = vhd.strip_footer(p.vhd)
    os.rename(p.vhd, p.raw)
    p.vhd_stamp.unlink(missing_ok=True)
    log.info("took the raw image (%s) back from %s", format_size(size), p.vhd.name)


def step_disk(settings: Settings) -> None:
    """Step 6: sparse disk, partition table, GRUB files and ext4 root from the tree, and
    the EFI system partition's FAT (uefi, hybrid)."""
    az, p = settings.azure, paths(settings)
    mounts.cleanup_stale(p.work)
    uid = root_uuid(p)
    layout = layout_for(az)
    esp_id = esp_volume(p) if layout.boots_uefi else None
    with build_environment(settings) as env:
        bios_lib, efi_lib = grub_dirs(env)
        cfg = grub.grub_cfg(uid, KERNEL, INITRD, az.kernel_cmdline)
        unstage_other_platforms(p.image_root, layout.boot)
        grub.stage_grub_files(
            p.image_root, layout.boot, cfg, root_uuid=uid, bios_lib=bios_lib, efi_lib=efi_lib
        )
        # With GRUB's files: they go into the root file system too.
        disk.check_disk_size(p.image_root, az.disk_size, az.partition_table, boot=layout.boot)
        # From here on the old disk is destroyed: drop the stamps that describe it first, so
        # a run killed from now on re-runs this step rather than finding it done (a re-run
        # after `--from 6` keeps doit's record of the earlier success).
        p.disk.unlink(missing_ok=True)
        p.bootloader.unlink(missing_ok=True)
        p.vhd.unlink(missing_ok=True)  # any earlier VHD holds an older disk
        p.vhd_stamp.unlink(missing_ok=True)
        unlink_outputs(p)  # and so does the verify report about it
        with atomic_path(p.raw) as tmp:
            disk.create_disk(tmp, layout)
            disk.make_ext4(tmp, layout.root, p.image_root, uuid=uid)
            disk.check_ext4(tmp, layout.root)
            if esp_id is not None:
                esp.make_fat(tmp, layout.esp, volume=esp_id)
    _json(
        p.disk,
        {
            "size": az.disk_size,
            "table": az.partition_table,
            "boot": layout.boot,
            "root_uuid": uid,
            "esp_volume": esp_id,
            "partitions": [
                {"number": x.number, "role": x.role, "start": x.start, "size": x.size}
                for x in layout.partitions
            ],
        },
    )
    log.info(
        "disk %s: %s %s for %s, root UUID %s",
        p.raw,
        format_size(az.disk_size),
        az.partition_table,
        layout.boot,
        uid,
    )


# --- step 7 -------------------------------------------------------------------------------


def step_bootloader(settings: Settings) -> None:
    """Step 7: GRUB for the image's firmware: boot code and core.img (BIOS), core.efi at
    the ESP's removable path EFI/BOOT/BOOTX64.EFI (UEFI), or both (hybrid)."""
    az, p = settings.azure, paths(settings)
    mounts.cleanup_stale(p.work)
    p.bootloader.unlink(missing_ok=True)  # killed while writing boot code: not done
    take_back_raw(p)
    if not p.raw.exists():
        raise UserError(f"the disk image {p.raw} is gone", "run again with --from 6")
    p.vhd.unlink(missing_ok=True)
    layout = layout_for(az)
    with build_environment(settings) as env:
        bios_lib, _ = grub_dirs(env)
        installed = grub.install_grub(p.raw, layout, root_uuid=root_uuid(p), bios_lib=bios_lib)
        if layout.boots_uefi:
            esp.check_fat(p.raw, layout.esp)
    _json(
        p.bootloader,
        {
            "grub": installed,
            "boot": layout.boot,
            "root_uuid": root_uuid(p),
            "table": az.partition_table,
        },
    )
    log.info("GRUB %s installed in %s", " and ".join(installed), p.raw)


# --- step 8 -------------------------------------------------------------------------------


def step_vhd(settings: Settings) -> None:
    """Step 8: append the fixed-VHD footer and rename: O(1), whatever the disk size."""
    p = paths(settings)
    if not p.raw.exists():
        if p.vhd.exists():
            vhd.check_or_raise(p.vhd)
            log.info("%s is already the VHD of the current disk", p.vhd)
        else:
            raise UserError(f"the disk image {p.raw} is gone", "run again with --from 6")
    else:
        footer = vhd.append_footer(p.raw)
        os.replace(p.raw, p.vhd)
        log.info(
            "VHD %s: %s fixed, unique id %s",
            p.vhd,
            format_size(footer.current_size),
            footer.unique_id,
        )
    footer = vhd.check_or_raise(p.vhd)
    _json(
        p.vhd_stamp, {"vhd": str(p.vhd), "size": footer.current_size, "id": str(footer.unique_id)}
    )


def unlink_outputs(p: Paths) -> None:
    """Remove outputs an earlier step makes stale (used when a step re-runs)."""
    for path in (p.report, p.summary):
        path.unlink(missing_ok=True)


# --- what steps 6-8 would run (for --dry-run; nothing here runs or writes) ------------------

Planned = list[list[str] | str]  # argv lists, and descriptions of what is not a command


def _planned_ids(p: Paths) -> tuple[str, str]:
    """The IDs step 1 chose, or placeholders before it ran."""
    try:
        return root_uuid(p), esp_volume(p)
    except (OSError, ValueError, KeyError):
        return "ROOT-UUID-FROM-STEP-1", "0000-0000"


def _planned_tmp(name: str) -> Path:
    return Path(tempfile.gettempdir()) / "archkernel-grub-XXXXXXXX" / name


def _in_environment(az: AzureSettings) -> Planned:
    if az.builder != "container":
        return []
    return [f"build tools run in the bootstrap build environment ({az.container_runtime})"]


def disk_commands(settings: Settings) -> Planned:
    """What step 6 runs: GRUB's core images staged into the tree, the partition table,
    ext4 from the tree, e2fsck, and the ESP's FAT (uefi, hybrid)."""
    az, p = settings.azure, paths(settings)
    uid, volume = _planned_ids(p)
    layout = layout_for(az)
    early = _planned_tmp("early.cfg")
    grub_dir = p.image_root / grub.PREFIX.lstrip("/")
    planned: Planned = _in_environment(az)
    if layout.boots_bios:
        planned.append(f"copy GRUB's i386-pc modules from {grub.GRUB_I386_PC} to {grub_dir}")
        planned.append(grub.mkimage_argv(grub.GRUB_I386_PC, grub_dir / "i386-pc/core.img", early))
    if layout.boots_uefi:
        planned.append(f"copy GRUB's x86_64-efi modules from {grub.GRUB_X86_64_EFI} to {grub_dir}")
        core = grub_dir / "x86_64-efi" / grub.EFI_CORE
        planned.append(grub.efi_mkimage_argv(grub.GRUB_X86_64_EFI, core, early))
    planned.append(f"write {grub_dir}/grub.cfg: root=UUID={uid} {az.kernel_cmdline}")
    planned.append(f"create the sparse file {p.raw} of {format_size(az.disk_size)}")
    script = "; ".join(line for line in disk.sfdisk_script(layout).splitlines() if line)
    planned += [disk.create_argv(p.raw), f"sfdisk reads: {script}"]
    planned.append(disk.mkfs_argv(p.raw, layout.root, p.image_root, uuid=uid, label="archroot"))
    planned.append(disk.e2fsck_argv(p.raw, layout.root))
    if layout.boots_uefi:
        planned.append(esp.mkfs_argv(p.raw, layout.esp, volume=volume))
    return planned


def bootloader_commands(settings: Settings) -> Planned:
    """What step 7 runs: grub-bios-setup from the staged files (bios, hybrid); core.efi
    copied to the ESP's removable path and the FAT checked (uefi, hybrid)."""
    az, p = settings.azure, paths(settings)
    layout = layout_for(az)
    planned: Planned = _in_environment(az)
    if layout.boots_bios:
        mnt = _planned_tmp("root")
        planned.append(
            f"attach partition {layout.root.number} of {p.raw} read-only to a loop device and "
            f"mount it read-only on {mnt}"
        )
        grub_dir = mnt / grub.PREFIX.lstrip("/") / "i386-pc"
        tool = Path("grub-bios-setup")
        planned.append(grub.bios_setup_argv(tool, grub_dir, _planned_tmp("device.map"), p.raw))
    if layout.boots_uefi:
        core = f"{grub.PREFIX}/x86_64-efi/{grub.EFI_CORE}"
        planned.append(f"read {core} from the root file system with debugfs")
        staged = _planned_tmp("esp")
        planned.append(f"copy it to {staged}/{esp.REMOVABLE_PATH_X64}")
        planned.append(esp.copy_argv(p.raw, layout.esp, [staged / "EFI"]))
        planned.append(
            f"copy the ESP to a sparse file and check it: {render(esp.fsck_argv(Path('esp.img')))}"
        )
    return planned


def vhd_commands(settings: Settings) -> Planned:
    """What step 8 does: no command, an append and a rename."""
    az, p = settings.azure, paths(settings)
    return [
        f"append the 512-byte fixed-VHD footer ({format_size(az.disk_size)}) to {p.raw} and "
        f"rename it to {p.vhd}: no data is copied, the file stays sparse"
    ]
