"""azure_vhd: an Arch Linux image that Azure accepts; azure_boottest: boot it in QEMU.

Steps 3-5 work on a fresh copy of the pacstrapped tree, so re-running one after a
settings change starts from a clean tree. Step 8 turns the raw image into the VHD in
place (O(1)); step 9 checks the result and fails the build on any error.
"""

from __future__ import annotations

import json

from archkernel import azure, azureverify, qemu
from archkernel.log import log
from archkernel.settings import Loaded
from tasks.steps import Step, Workflow

PACKAGE_SETTINGS = [
    "azure.packages",
    "azure.extra_packages",
    "azure.provisioning",
    "azure.extensions",
    "azure.agent_package",
    "azure.cloud_init_package",
]


def build(loaded: Loaded) -> list[Step]:
    """The numbered steps for these settings."""
    s = loaded.settings
    az, p = s.azure, azure.paths(s)
    pacman_conf_dep = (
        [az.pacman_conf] if az.pacman_conf is not None and az.pacman_conf.is_file() else []
    )

    def verify() -> None:
        report = azureverify.verify(p.vhd, az, azure.root_uuid(p))
        azureverify.write_report(report, p.report, p.summary)
        azureverify.raise_on_failure(report, p.summary)

    return [
        Step(
            1,
            "preflight",
            "check host tools, prepare pacman.conf, choose the image's UUIDs",
            lambda: azure.step_preflight(s),
            targets=[p.preflight, p.pacman_conf, p.ids],
            file_dep=pacman_conf_dep,
            settings=["azure.pacman_conf", "azure.mirror"],
        ),
        Step(
            2,
            "pacstrap",
            "pacstrap the packages into a directory; write the package manifest",
            lambda: azure.step_pacstrap(s),
            targets=[p.packages],
            file_dep=[p.pacman_conf],
            settings=PACKAGE_SETTINGS,
            commands=lambda: [
                [
                    "pacstrap",
                    "-C",
                    str(p.pacman_conf),
                    "-c",
                    "-G",
                    "-M",
                    str(p.root),
                    *az.all_packages(),
                ]
            ],
        ),
        Step(
            3,
            "configure",
            "host name, locale, time, fstab by UUID, network, sshd, users, clean-up",
            lambda: azure.step_configure(s),
            targets=[p.configured],
            file_dep=[p.packages, p.ids],
            settings=[
                "azure.hostname",
                "azure.locale",
                "azure.timezone",
                "azure.keymap",
                "azure.user",
            ],
        ),
        Step(
            4,
            "agent",
            "configure and enable cloud-init or the Azure Linux Agent",
            lambda: azure.step_agent(s),
            targets=[p.agent],
            file_dep=[p.configured],
            settings=["azure.provisioning", "azure.extensions"],
        ),
        Step(
            5,
            "initramfs",
            "mkinitcpio -P in the image with the Hyper-V drivers, checked",
            lambda: azure.step_initramfs(s),
            targets=[p.initramfs],
            file_dep=[p.agent],
            settings=["azure.initramfs_modules"],
            commands=lambda: [["arch-chroot", str(p.image_root), "mkinitcpio", "-P"]],
        ),
        Step(
            6,
            "disk",
            "sparse disk, partition table, ext4 root made from the tree, e2fsck",
            lambda: azure.step_disk(s),
            targets=[p.disk],
            file_dep=[p.initramfs],
            settings=[
                "azure.disk_size",
                "azure.partition_table",
                "azure.filesystem",
                "azure.kernel_cmdline",
            ],
        ),
        Step(
            7,
            "bootloader",
            "GRUB i386-pc boot code and core.img into the disk",
            lambda: azure.step_bootloader(s),
            targets=[p.bootloader],
            file_dep=[p.disk],
        ),
        Step(
            8,
            "vhd",
            "append the fixed-VHD footer (O(1)) and name the image",
            lambda: azure.step_vhd(s),
            targets=[p.vhd_stamp, p.vhd],
            file_dep=[p.bootloader],
            settings=["azure.output"],
        ),
        Step(
            9,
            "verify",
            "check the image against Azure's rules; write verify.json and .txt",
            verify,
            targets=[p.report, p.summary],
            file_dep=[p.vhd_stamp, p.vhd],
            settings=[
                "azure.hostname",
                "azure.kernel_cmdline",
                "azure.provisioning",
                "azure.extensions",
                "azure.disk_size",
            ],
        ),
    ]


def build_boottest(loaded: Loaded) -> list[Step]:
    """azure_boottest: boot the VHD in QEMU and wait for the marker on the serial console."""
    s = loaded.settings
    az, p = s.azure, azure.paths(s)
    stamp = p.work / "boottest.json"

    def boot() -> None:
        argv = qemu.qemu_argv(disk=p.vhd, disk_format="vpc", serial_log=p.console, memory=1024)
        result = qemu.boot_and_wait(argv, p.console, az.boottest_marker, az.boottest_timeout)
        stamp.write_text(json.dumps({"marker": az.boottest_marker, "seconds": result.elapsed}))
        log.info(
            "%r on the console after %.1fs; log %s", az.boottest_marker, result.elapsed, p.console
        )

    return [
        Step(
            1,
            "boot",
            "boot the VHD in QEMU; wait for the marker on the serial console",
            boot,
            targets=[stamp],
            file_dep=[p.vhd_stamp],
            settings=["azure.boottest_marker", "azure.boottest_timeout"],
            commands=lambda: [
                qemu.qemu_argv(disk=p.vhd, disk_format="vpc", serial_log=p.console, memory=1024)
            ],
        ),
    ]


WORKFLOWS = [
    Workflow("azure_vhd", "build an Arch Linux image that Azure accepts (fixed VHD)", build),
    Workflow(
        "azure_boottest",
        "boot the azure_vhd image in QEMU and wait for a login prompt",
        build_boottest,
    ),
]
