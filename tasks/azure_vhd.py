"""azure_vhd: an Arch Linux image that Azure accepts; azure_boottest: boot it in QEMU.

Steps 3-5 work on a fresh copy of the pacstrapped tree, so re-running one after a
settings change starts from a clean tree. Step 8 turns the raw image into the VHD in
place (O(1)); step 9 checks the result and fails the build on any error.

With `azure.builder = "container"`, step 1 also prepares the bootstrap build environment
(its record, `workdir/buildenv/buildenv.json`, is a target of step 1 and an input of every
later step: another environment rebuilds the image). The firmware (`azure.generation`,
`azure.boot`) is read by the steps it changes: 1 (tools), 3 (fstab mounts the ESP), 6
(layout, ESP), 7 (GRUB platforms) and 9 (rules).
"""

from __future__ import annotations

from pathlib import Path

from archkernel.azure import boottest, buildenv, diskimage, preflight, tree, workspace
from archkernel.azure import verify as azureverify
from archkernel.settings import Loaded, Settings
from tasks.steps import Step, Workflow

FIRMWARE_SETTINGS = ["azure.generation", "azure.boot"]
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
    az, p = s.azure, workspace.paths(s)
    pacman_conf_dep = (
        [az.pacman_conf] if az.pacman_conf is not None and az.pacman_conf.is_file() else []
    )
    # The build environment's record: made by step 1, read by every later step.
    env: list[Path] = [buildenv.state_file(s.workdir)] if az.builder == "container" else []

    def verify() -> None:
        with workspace.build_environment(s):
            report = azureverify.verify(p.vhd, az, workspace.root_uuid(p))
        azureverify.write_report(report, p.report, p.summary)
        azureverify.raise_on_failure(report, p.summary)

    return [
        Step(
            1,
            "preflight",
            "prepare the build environment, check tools, prepare pacman.conf, choose IDs",
            lambda: preflight.step_preflight(s),
            targets=[p.preflight, p.pacman_conf, p.ids, *env],
            file_dep=pacman_conf_dep,
            settings=list(dict.fromkeys([*buildenv.SETTINGS, *FIRMWARE_SETTINGS])),
        ),
        Step(
            2,
            "pacstrap",
            "pacstrap the packages into a directory; write the package manifest",
            lambda: tree.step_pacstrap(s),
            targets=[p.packages],
            file_dep=[p.pacman_conf, *env],
            settings=PACKAGE_SETTINGS,
            commands=lambda: [tree.pacstrap_argv(p.pacman_conf, p.root, az.all_packages())],
        ),
        Step(
            3,
            "configure",
            "host name, locale, time, fstab by UUID, network, sshd, users, clean-up",
            lambda: tree.step_configure(s),
            targets=[p.configured],
            file_dep=[p.packages, p.ids, *env],
            settings=[
                "azure.hostname",
                "azure.locale",
                "azure.timezone",
                "azure.keymap",
                "azure.user",
                *FIRMWARE_SETTINGS,
            ],
        ),
        Step(
            4,
            "agent",
            "configure and enable cloud-init or the Azure Linux Agent",
            lambda: tree.step_agent(s),
            targets=[p.agent],
            file_dep=[p.configured, *env],
            settings=["azure.provisioning", "azure.extensions"],
        ),
        Step(
            5,
            "initramfs",
            "mkinitcpio -P in the image with the Hyper-V drivers, checked",
            lambda: tree.step_initramfs(s),
            targets=[p.initramfs],
            file_dep=[p.agent, *env],
            settings=["azure.initramfs_modules"],
            commands=lambda: [["arch-chroot", str(p.image_root), "mkinitcpio", "-P"]],
        ),
        Step(
            6,
            "disk",
            "sparse disk, partition table, ext4 root made from the tree, e2fsck, ESP",
            lambda: diskimage.step_disk(s),
            targets=[p.disk],
            file_dep=[p.initramfs, *env],
            settings=[
                "azure.disk_size",
                "azure.partition_table",
                "azure.filesystem",
                "azure.kernel_cmdline",
                *FIRMWARE_SETTINGS,
            ],
            commands=lambda: diskimage.disk_commands(s),
        ),
        Step(
            7,
            "bootloader",
            "GRUB for the firmware: boot code and core.img, and/or EFI/BOOT/BOOTX64.EFI",
            lambda: diskimage.step_bootloader(s),
            targets=[p.bootloader],
            file_dep=[p.disk, *env],
            settings=FIRMWARE_SETTINGS,
            commands=lambda: diskimage.bootloader_commands(s),
        ),
        Step(
            8,
            "vhd",
            "append the fixed-VHD footer (O(1)) and name the image",
            lambda: diskimage.step_vhd(s),
            targets=[p.vhd_stamp, p.vhd],
            file_dep=[p.bootloader, *env],
            settings=["azure.output"],
            commands=lambda: diskimage.vhd_commands(s),
        ),
        Step(
            9,
            "verify",
            "check the image against Azure's rules; write verify.json and .txt",
            verify,
            targets=[p.report, p.summary],
            file_dep=[p.vhd_stamp, p.vhd, *env],
            settings=[
                "azure.hostname",
                "azure.kernel_cmdline",
                "azure.provisioning",
                "azure.extensions",
                "azure.disk_size",
                *FIRMWARE_SETTINGS,
            ],
        ),
    ]


def _boot_step(number: int, s: Settings, test: boottest.BootTest) -> Step:
    def boot() -> None:
        boottest.run_boottest(s, test)

    return Step(
        number,
        test.verb,
        f"boot the VHD in QEMU with {test.firmware_name}; wait for the marker on the console",
        boot,
        targets=[test.stamp],
        file_dep=[workspace.paths(s).vhd_stamp],
        settings=["azure.boottest_marker", "azure.boottest_timeout"],
        commands=lambda: boottest.boottest_commands(s, test),
    )


def build_boottest(loaded: Loaded) -> list[Step]:
    """azure_boottest: boot the VHD in QEMU with the firmware of its VM generation (and a
    hybrid image with the other one too) and wait for the marker on the serial console."""
    s = loaded.settings
    return [_boot_step(n, s, test) for n, test in enumerate(boottest.boot_tests(s), start=1)]


WORKFLOWS = [
    Workflow("azure_vhd", "build an Arch Linux image that Azure accepts (fixed VHD)", build),
    Workflow(
        "azure_boottest",
        "boot the azure_vhd image in QEMU and wait for a login prompt",
        build_boottest,
    ),
]
