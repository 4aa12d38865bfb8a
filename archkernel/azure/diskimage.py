"""Steps 6-8 of azure_vhd: the disk image, the boot loader and the fixed VHD.

Each step function returns its plan (`archkernel.plan`) without changing anything; the
commands of steps 6 and 7 run in the build environment (`workspace.build_environment`,
the plan's context). Step 6 makes the disk as `.disk.img.tmp-new` and renames it to
`disk.img` once it is whole; step 7 installs GRUB into it; step 8 turns it into the VHD in
place (a footer and a rename, O(1)). Scratch files (GRUB's early config, a mount point,
copies to check) live in `workdir/azure/tmp/STEP`, removed when the step ends.

The last good VHD stays until a new one replaces it: step 6 drops only the records of the
disk it makes again (so a run killed meanwhile does it again), step 7 installs GRUB into a
copy of the disk when step 8 already made it the VHD (`raw_from_vhd`), and step 8's rename
onto the VHD's name is the one moment the old image goes. However a rebuild is stopped, the
old VHD with its records, or the new one, is there. The old VHD's verify report goes just
before that rename: no report ever describes another image than the VHD there.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path
from uuid import UUID

from archkernel.azure import buildenv, ids
from archkernel.azure.workspace import (
    FIRMWARE_SETTINGS,
    INITRD,
    KERNEL,
    ROUTING_SETTINGS,
    Paths,
    _json,
    build_environment,
    clear_leftovers,
    esp_volume,
    grub_dirs,
    paths,
    recorded_ids,
    root_uuid,
    staging,
)
from archkernel.errors import UserError
from archkernel.formats import vhd_file
from archkernel.formats.vhd import vhd_timestamp
from archkernel.host import mounts
from archkernel.host.files import remove_path
from archkernel.image import esp, ext4, grub, grub_install
from archkernel.image.disk import Layout, create_ops, plan_layout
from archkernel.log import log
from archkernel.plan import Do, Plan, reads
from archkernel.settings import AzureSettings, Settings, format_size

# Stand-ins for the IDs step 1 chooses, in a plan made (for a dry run) before it ran.
PLANNED_ROOT_UUID = "ROOT-UUID-FROM-STEP-1"
PLANNED_ESP_VOLUME = "0000-0000"
# What `layout_for` reads, besides the firmware.
LAYOUT_SETTINGS = ("azure.disk_size", "azure.partition_table")


def layout_for(az: AzureSettings) -> Layout:
    """The partition layout of the image, for the firmware it boots with."""
    return plan_layout(az.disk_size, az.partition_table, boot=az.firmware)


def scratch(p: Paths, step: str) -> Path:
    """The scratch directory of `step`: `workdir/azure/tmp/STEP` (fixed, so commands can
    name it; the step removes it when it ends)."""
    return p.work / "tmp" / step


def _remove_scratch(tmp: Path) -> None:
    remove_path(tmp)
    with contextlib.suppress(OSError):  # not empty: another step's is there
        tmp.parent.rmdir()


def remove_scratch(p: Paths, step: str) -> Do:
    """The operation that removes the scratch directory of `step` (and `tmp` if empty)."""
    tmp = scratch(p, step)
    return Do(f"remove {tmp}", lambda: _remove_scratch(tmp))


def planned_ids(p: Paths) -> tuple[str, str]:
    """The IDs step 1 chose (root file system UUID, ESP volume ID), or stand-ins before
    it ran."""
    try:
        return root_uuid(p), esp_volume(p)
    except (OSError, ValueError, KeyError):
        try:
            return root_uuid(p), PLANNED_ESP_VOLUME
        except (OSError, ValueError, KeyError):
            return PLANNED_ROOT_UUID, PLANNED_ESP_VOLUME


def planned_grub_dirs(settings: Settings) -> tuple[Path, Path]:
    """GRUB's i386-pc and x86_64-efi directories, of the build environment step 1 prepared
    (builder = container) or of the host: where the step's commands will find them."""
    if settings.azure.builder != "container":
        return grub_dirs(None)
    return grub_dirs(buildenv.load(settings.azure, settings.workdir))


def _environment(settings: Settings) -> Plan:
    return Plan(context=functools.partial(build_environment, settings))


def _undo_killed_run(p: Paths) -> None:
    mounts.cleanup_stale(p.work)
    clear_leftovers(p.raw)


def _fresh_directory(path: Path) -> None:
    remove_path(path)
    path.mkdir(parents=True)


def _housekeeping(p: Paths) -> Do:
    return Do(
        f"undo what a killed run left under {p.work} (mounts, loop devices, processes "
        "working on the disk): runs umount, losetup or kill only then",
        functools.partial(_undo_killed_run, p),
    )


def made_vhd(p: Paths) -> Path | None:
    """The VHD step 8 made, as its stamp `vhd.json` names it (None: no stamp)."""
    try:
        return Path(json.loads(p.vhd_stamp.read_text())["vhd"])
    except (OSError, ValueError, KeyError):
        return None


# --- step 6 -------------------------------------------------------------------------------


def unstage_other_platforms(rootdir: Path, boot: str) -> None:
    """Remove GRUB platform directories an earlier run of step 6 staged for another boot
    mode: the image gets only what its firmware uses."""
    wanted = set(grub.platforms(boot))
    for platform in ("i386-pc", "x86_64-efi"):
        if platform not in wanted:
            remove_path(grub.staged_dir(rootdir, platform))


def _drop_disk_records(p: Paths) -> None:
    """The disk is made again from here on: drop the records of steps 6 and 7 first, so a
    run killed from now on re-runs them rather than finding them done (a re-run after
    `--from 6` keeps doit's record of the earlier success). The VHD and its records stay:
    they are the last good image until step 8 replaces it."""
    for path in (p.disk, p.bootloader):
        path.unlink(missing_ok=True)


def _put_disk_in_place(made: Path, target: Path) -> None:
    fd = os.open(made, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(made, target)


@reads(
    *LAYOUT_SETTINGS,
    "azure.filesystem",
    "azure.kernel_cmdline",
    *FIRMWARE_SETTINGS,
    *ROUTING_SETTINGS,
    ids.EPOCH_SETTING,
)
def disk(settings: Settings) -> Plan:
    """sparse disk, partition table, ext4 root made from the tree, e2fsck, ESP.

    GRUB's files go into the root tree first (`grub.stage_ops`), so mkfs.ext4 carries them
    in; for uefi and hybrid the EFI system partition gets its FAT (the boot loader on it is
    step 7's).
    """
    az, p = settings.azure, paths(settings)
    uid, volume = planned_ids(p)
    recorded, epoch = recorded_ids(p), ids.source_date_epoch(settings)
    layout = ids.with_ids(layout_for(az), recorded)  # GPT GUIDs or MBR signature
    hash_seed = recorded.ext4_hash_seed if recorded is not None else None
    size, table, cmdline = az.disk_size, az.partition_table, az.kernel_cmdline
    bios_lib, efi_lib = planned_grub_dirs(settings)
    made, tmp = staging(p.raw), scratch(p, "disk")

    def stamp() -> None:
        _json(
            p.disk,
            {
                "size": size,
                "table": table,
                "boot": layout.boot,
                "root_uuid": root_uuid(p),
                "esp_volume": esp_volume(p) if layout.boots_uefi else None,
                "partitions": [
                    {"number": x.number, "role": x.role, "start": x.start, "size": x.size}
                    for x in layout.partitions
                ],
            },
        )
        log.info(
            "disk %s: %s %s for %s, root UUID %s",
            p.raw,
            format_size(size),
            table,
            layout.boot,
            root_uuid(p),
        )

    plan = _environment(settings)
    plan.ops += [
        _housekeeping(p),
        Do(
            f"remove GRUB's files for other firmware from {p.image_root}/boot/grub",
            lambda: unstage_other_platforms(p.image_root, layout.boot),
        ),
        *grub.stage_ops(
            p.image_root,
            layout.boot,
            root_uuid=uid,
            scratch=tmp,
            bios_lib=bios_lib,
            efi_lib=efi_lib,
        ),
        grub.cfg_op(
            p.image_root,
            lambda: grub.grub_cfg(uid, KERNEL, INITRD, cmdline),
            f"root=UUID={uid} {cmdline}",
        ),
        # With GRUB's files: they go into the root file system too.
        Do(
            f"check that {format_size(size)} holds the tree {p.image_root}",
            lambda: ext4.check_disk_size(p.image_root, size, table, boot=layout.boot),
        ),
        Do(
            f"drop the records of the disk made again ({p.disk.name}, {p.bootloader.name}); "
            "the VHD stays until step 8 replaces it",
            lambda: _drop_disk_records(p),
        ),
        *create_ops(made, layout),
        *ext4.make_ops(
            made, layout.root, p.image_root, uuid=uid, hash_seed=hash_seed, epoch=epoch, scratch=tmp
        ),
        ext4.check_op(made, layout.root),
    ]
    if layout.boots_uefi:
        plan.ops += esp.make_ops(made, layout.esp, volume=volume, epoch=epoch)
    plan.ops += [
        Do(f"rename {made} to {p.raw}", lambda: _put_disk_in_place(made, p.raw)),
        Do(f"write {p.disk}", stamp),
    ]
    plan.cleanup += [
        Do(f"remove {made} if the step stopped before renaming it", lambda: remove_path(made)),
        remove_scratch(p, "disk"),
    ]
    return plan


# --- step 7 -------------------------------------------------------------------------------


def raw_from_vhd(p: Paths) -> None:
    """If step 8 already made disk.img the VHD, make disk.img again: a copy of the disk in
    the VHD (reflinked or by data extents), written atomically. The VHD is not touched."""
    made = made_vhd(p) or p.vhd
    if p.raw.exists() or not made.exists():
        return
    size = vhd_file.to_raw(made, p.raw)
    log.info("copied the raw image (%s) out of %s, which stays", format_size(size), made.name)


def _prepare_raw(p: Paths) -> None:
    p.bootloader.unlink(missing_ok=True)  # killed while writing boot code: not done
    raw_from_vhd(p)
    if not p.raw.exists():
        raise UserError(f"the disk image {p.raw} is gone", "run again with --from 6")


@reads(
    *FIRMWARE_SETTINGS,
    *LAYOUT_SETTINGS,
    *ROUTING_SETTINGS,
    ids.EPOCH_SETTING,
    "azure.output",  # raw_from_vhd: the VHD to copy the disk out of
)
def bootloader(settings: Settings) -> Plan:
    """GRUB for the firmware: boot code and core.img, and/or EFI/BOOT/BOOTX64.EFI.

    BIOS: grub-bios-setup from the files step 6 staged (bios, hybrid); UEFI: core.efi
    copied to the ESP's removable path and the FAT checked (uefi, hybrid).
    """
    az, p = settings.azure, paths(settings)
    layout = layout_for(az)
    uid, _ = planned_ids(p)
    bios_lib, _ = planned_grub_dirs(settings)
    tmp = scratch(p, "bootloader")
    installed = grub_install.installed_platforms(layout)

    def stamp() -> None:
        record = {
            "grub": installed,
            "boot": layout.boot,
            "root_uuid": root_uuid(p),
            "table": layout.table,
        }
        _json(p.bootloader, record)
        log.info("GRUB %s installed in %s", " and ".join(installed), p.raw)

    plan = _environment(settings)
    plan.ops += [
        _housekeeping(p),
        Do(
            f"drop {p.bootloader.name}; if step 8 made {p.raw} the VHD, copy the disk out of "
            "the VHD (which stays) to it",
            lambda: _prepare_raw(p),
        ),
        Do(f"make the empty directory {tmp}", lambda: _fresh_directory(tmp)),
    ]
    epoch = ids.source_date_epoch(settings)
    install = grub_install.install(
        p.raw, layout, root_uuid=uid, scratch=tmp, bios_lib=bios_lib, epoch=epoch
    )
    plan.ops += install.ops
    plan.cleanup += install.cleanup
    if layout.boots_uefi:
        plan.ops += esp.check_ops(p.raw, layout.esp, tmp / "esp.img")
    plan.ops.append(Do(f"write {p.bootloader}", stamp))
    plan.cleanup.append(remove_scratch(p, "bootloader"))
    return plan


# --- step 8 -------------------------------------------------------------------------------


def _replace_vhd(p: Paths) -> None:
    """Rename disk.img, a whole VHD now, onto the VHD's name: the old VHD goes only here.
    Its report and manifest go first: the boot test must not take them for the new image's."""
    for report in (p.report, p.summary, p.manifest, p.vhd_manifest):
        report.unlink(missing_ok=True)
    os.replace(p.raw, p.vhd)


def _make_vhd(p: Paths, timestamp: int | None = None, unique_id: str | None = None) -> None:
    if not p.raw.exists():
        if p.vhd.exists():  # a run killed after the rename, or `--from 8`
            vhd_file.check_or_raise(p.vhd)
            log.info("%s is already the VHD of the current disk", p.vhd)
        else:
            raise UserError(f"the disk image {p.raw} is gone", "run again with --from 6")
    else:
        footer = vhd_file.append_footer(
            p.raw, timestamp=timestamp, unique_id=None if unique_id is None else UUID(unique_id)
        )
        _replace_vhd(p)
        log.info(
            "VHD %s: %s fixed, unique id %s",
            p.vhd,
            format_size(footer.current_size),
            footer.unique_id,
        )
    footer = vhd_file.check_or_raise(p.vhd)
    before = made_vhd(p)
    _json(
        p.vhd_stamp, {"vhd": str(p.vhd), "size": footer.current_size, "id": str(footer.unique_id)}
    )
    if before is not None and before != p.vhd:
        before.unlink(missing_ok=True)  # the VHD under the name azure.output had before
        before.with_name(before.name + ".manifest.json").unlink(missing_ok=True)


@reads("azure.output", "azure.disk_size", ids.EPOCH_SETTING)
def vhd(settings: Settings) -> Plan:
    """append the fixed-VHD footer (O(1)) and name the image.

    The footer goes after the raw disk and the file is renamed onto the VHD's name, which
    replaces the old VHD at once: no data is copied, whatever the disk size, and there is
    always a VHD. No command runs.
    """
    az, p = settings.azure, paths(settings)
    epoch, recorded = ids.source_date_epoch(settings), recorded_ids(p)
    timestamp = None if epoch is None else vhd_timestamp(epoch)
    unique_id = None if recorded is None else recorded.vhd_unique_id
    return Plan().do(
        f"append the 512-byte fixed-VHD footer ({format_size(az.disk_size)}) to {p.raw} and "
        f"rename it to {p.vhd}: no data is copied, the file stays sparse",
        lambda: _make_vhd(p, timestamp, unique_id),
    )
