"""The Azure build's work tree: where each step writes, and the IDs step 1 records."""

from __future__ import annotations

import json
import os
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from archkernel.azure import buildenv
from archkernel.azure.buildenv.containers import stop_orphan_containers
from archkernel.azure.ids import ImageIds
from archkernel.host import mounts
from archkernel.host.files import (
    remove_path,
    remove_stale_temporaries,
    replace_tree,
    write_if_changed,
)
from archkernel.host.processes import release_stale_trees, release_tree, stop_orphans
from archkernel.image import grub
from archkernel.settings import AzureSettings, Settings

KERNEL = "/boot/vmlinuz-linux"
INITRD = "/boot/initramfs-linux.img"
HOST_TOOLS = [
    "pacman",
    "pacstrap",
    "arch-chroot",
    "systemctl",
    "useradd",
    "sfdisk",
    "mkfs.ext4",
    "e2fsck",
    "debugfs",  # step 6 dates the inodes by the epoch (build.source_date_epoch)
    "blkid",
    "losetup",
    "mount",
    "umount",
    "grub-mkimage",
    "cp",
    "gpgconf",  # step 2 stops the gpg-agent a package's hook may start in the new tree
]
# The EFI system partition (uefi, hybrid): made, filled, listed and checked without a
# mount; core.efi is read back from the root file system with debugfs.
UEFI_TOOLS = ["mkfs.fat", "mcopy", "mdir", "fsck.fat", "debugfs"]

# The settings that choose the firmware, read by the steps it changes: 1 (tools), 3 (fstab
# mounts the ESP), 6 (layout, ESP), 7 (GRUB platforms) and 9 (rules).
FIRMWARE_SETTINGS = ("azure.generation", "azure.boot")
# What `build_environment` reads to know where a step's commands run: every step that runs
# commands declares it.
ROUTING_SETTINGS = ("azure.builder",)
# The settings that choose the packages pacstrap installs (`AzureSettings.all_packages`).
PACKAGE_SETTINGS = (
    "azure.packages",
    "azure.extra_packages",
    "azure.provisioning",
    "azure.extensions",
    "azure.agent_package",
    "azure.cloud_init_package",
)


@dataclass(frozen=True)
class Paths:
    """The workflow's files under `workdir/azure`."""

    work: Path
    # Read only for the VHD's name (azure.output), so that a step that never names the
    # VHD does not read that setting.
    azure: AzureSettings = field(repr=False, compare=False)

    @property
    def pacman_conf(self) -> Path:
        return self.work / "pacman.conf"

    @property
    def gnupg(self) -> Path:
        return self.work / "gnupg"

    @property
    def ids(self) -> Path:
        return self.work / "ids.json"

    @property
    def preflight(self) -> Path:
        return self.work / "preflight.json"

    @property
    def root(self) -> Path:
        return self.work / "root"

    @property
    def packages(self) -> Path:
        return self.work / "packages.txt"

    @property
    def image_root(self) -> Path:
        return self.work / "image-root"

    @property
    def configured(self) -> Path:
        return self.work / "configure.json"

    @property
    def agent(self) -> Path:
        return self.work / "agent.json"

    @property
    def initramfs(self) -> Path:
        return self.work / "initramfs.json"

    @property
    def raw(self) -> Path:
        return self.work / "disk.img"

    @property
    def disk(self) -> Path:
        return self.work / "disk.json"

    @property
    def bootloader(self) -> Path:
        return self.work / "bootloader.json"

    @property
    def vhd(self) -> Path:
        return self.work / self.azure.output

    @property
    def vhd_stamp(self) -> Path:
        return self.work / "vhd.json"

    @property
    def report(self) -> Path:
        return self.work / "verify.json"

    @property
    def summary(self) -> Path:
        return self.work / "verify.txt"

    @property
    def manifest(self) -> Path:
        return self.work / "manifest.json"

    @property
    def vhd_manifest(self) -> Path:
        """The manifest's copy beside the VHD."""
        return self.vhd.with_name(self.vhd.name + ".manifest.json")

    @property
    def console(self) -> Path:
        return self.work / "boottest.log"

    @property
    def boottest(self) -> Path:
        return self.work / "boottest.json"


def paths(settings: Settings) -> Paths:
    """The workflow's paths for these settings."""
    return Paths(settings.workdir.resolve() / "azure", settings.azure)


# --- trees made beside their place -----------------------------------------------------------


def staging(target: Path) -> Path:
    """Where a step makes the tree `target` before putting it in place: `.NAME.tmp-new`
    beside it (same file system, so putting it in place is a rename).

    The name is fixed, so that a step's plan can name it in its commands; the step first
    removes what a killed run left there (`clear_leftovers`).
    """
    return target.with_name(f".{target.name}.tmp-new")


def _retired(target: Path) -> Path:
    return target.with_name(f".{target.name}.old-new")


def put_in_place(staged: Path, target: Path) -> None:
    """Rename the directory `staged` onto `target`; an old `target` goes only once the new
    tree is in place."""
    replace_tree(staged, target, _retired(target))


def clear_leftovers(target: Path) -> None:
    """Remove what a killed run left beside `target`: its staging tree (after stopping the
    processes still working in it and undoing its mounts), a tree it moved aside, and the
    temporary trees of older versions (`.NAME.tmp-PID`). Runs a command (umount) only
    when something is still mounted there."""
    staged = staging(target)
    if staged.exists():
        release_tree(staged)
        remove_path(staged)
    remove_path(_retired(target))
    release_stale_trees(target)
    remove_stale_temporaries(target)


def undo_killed_runs(settings: Settings) -> None:
    """What a run of azure_vhd does first, whether or not any step runs: end the processes
    and remove the containers a killed run left (`stop_orphans`,
    `stop_orphan_containers`), and under the work directory remove the trees it
    was making (`clear_leftovers`) and undo its mounts and loop devices. Runs a command
    only to list containers, or when something is left (umount, losetup)."""
    stop_orphans()
    az = settings.azure
    if az.builder == "container" and az.container_runtime in ("docker", "podman"):
        stop_orphan_containers(az.container_runtime)
    p = paths(settings)
    if not p.work.is_dir():
        return
    for target in (p.gnupg, p.root, p.image_root, p.raw):
        clear_leftovers(target)
    mounts.cleanup_stale(p.work)


def _json(path: Path, data: Any) -> bool:
    return write_if_changed(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def tree_id(stamp: Path) -> str | None:
    """Which copy of the image tree a stamp of steps 3-5 describes.

    Step 3 makes a new copy of the tree each time it runs; steps 4 and 5 edit that copy.
    Their stamps carry the copy's identity, so a new copy changes them and doit runs the
    later steps on it (an unchanged configuration would otherwise leave them "up to date"
    with their work gone with the old copy)."""
    try:
        value = json.loads(stamp.read_text()).get("tree")
    except (OSError, ValueError):
        return None
    return str(value) if value is not None else None


def root_uuid(p: Paths) -> str:
    """The root file system's UUID, as step 1 derived it from the seed."""
    return str(json.loads(p.ids.read_text())["root_uuid"])


def esp_volume(p: Paths) -> str:
    """The EFI system partition's FAT volume ID (`1234-ABCD`), as step 1 derived it."""
    return str(json.loads(p.ids.read_text())["esp_volume"])


def recorded_ids(p: Paths) -> ImageIds | None:
    """Every ID step 1 recorded in `ids.json`; None before it ran (or from an older
    version, whose file step 1 writes again)."""
    try:
        return ImageIds.from_json(json.loads(p.ids.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def record_ids(p: Paths, ids: ImageIds) -> None:
    """Write `ids.json`. The same IDs leave the file as it is: the steps that read it stay
    up to date."""
    _json(p.ids, ids.to_json())


def build_environment(settings: Settings) -> AbstractContextManager[buildenv.BuildEnv | None]:
    """The block in which build tools run in the bootstrap build environment (builder =
    container; it yields it) or, for builder = host, on the host (it yields None)."""
    return buildenv.activate(settings.azure, settings.workdir)


def grub_dirs(env: buildenv.BuildEnv | None) -> tuple[Path, Path]:
    """GRUB's i386-pc and x86_64-efi directories: the build environment's (as host paths:
    modules and core images must come from the GRUB build that runs), or the host's."""
    if env is None:
        return grub.GRUB_I386_PC, grub.GRUB_X86_64_EFI
    bios, efi = (
        buildenv.resolve_in_root(env.root, os.fspath(d)) or env.host_path(os.fspath(d))
        for d in (grub.GRUB_I386_PC, grub.GRUB_X86_64_EFI)
    )
    return bios, efi
