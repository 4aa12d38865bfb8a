"""azure_vhd: an Arch Linux image that Azure accepts; azure_boottest: boot it in QEMU.

Each step is a function of `archkernel.azure` that returns its plan; this module says only
in which order they run and which files each makes and reads. Steps 3-5 work on a fresh
copy of the pacstrapped tree, so re-running one after a settings change starts from a
clean tree. Step 8 turns the raw image into the VHD in place (O(1)), replacing the last
good VHD only then; step 9 checks the result and fails the build on any error, and the
boot test boots only a VHD step 9 passed.

With `azure.builder = "container"`, step 1 also prepares the bootstrap build environment;
its record, `workdir/buildenv/buildenv.json`, is an input of every later step (another
environment rebuilds the image).
"""

from __future__ import annotations

import functools
from pathlib import Path

from archkernel.azure import boottest, buildenv, diskimage, preflight, tree, verify, workspace
from archkernel.settings import Settings

from .steps import Step, Workflow


def build_environment_record(s: Settings) -> list[Path]:
    """The build environment's record, when there is one: made by step 1, read by all."""
    return [buildenv.state_file(s.workdir)] if s.azure.builder == "container" else []


def build(s: Settings) -> list[Step]:
    """The steps of azure_vhd, in order."""
    az, p = s.azure, workspace.paths(s)
    given_pacman_conf = [az.pacman_conf] if az.pacman_conf and az.pacman_conf.is_file() else []
    return [
        Step.of(
            preflight.preflight,
            targets=[p.preflight, p.pacman_conf, p.ids, *build_environment_record(s)],
            file_dep=given_pacman_conf,
        ),
        Step.of(tree.pacstrap, targets=[p.packages], file_dep=[p.pacman_conf]),
        Step.of(tree.configure, targets=[p.configured], file_dep=[p.packages, p.ids]),
        Step.of(tree.agent, targets=[p.agent], file_dep=[p.configured]),
        Step.of(tree.initramfs, targets=[p.initramfs], file_dep=[p.agent]),
        Step.of(diskimage.disk, targets=[p.disk], file_dep=[p.initramfs]),
        Step.of(diskimage.bootloader, targets=[p.bootloader], file_dep=[p.disk]),
        Step.of(diskimage.vhd, targets=[p.vhd_stamp, p.vhd], file_dep=[p.bootloader]),
        Step.of(
            verify.verify,
            targets=[p.report, p.summary, p.manifest, p.vhd_manifest],
            # The manifest reads pacstrap's package list, the pacman.conf and the IDs too.
            file_dep=[p.vhd_stamp, p.vhd, p.packages, p.pacman_conf, p.ids],
        ),
    ]


def build_boottest(s: Settings) -> list[Step]:
    """azure_boottest: boot the VHD in QEMU with the firmware of its VM generation (and a
    hybrid image with the other one too) and wait for the marker on the serial console;
    with `azure.boottest_mode = "provision"`, boot it on a stand-in Azure fabric and prove
    that its agent provisioned it (`workdir/azure/provision.json`).

    Only a verified image boots: each boot reads step 9's report (it runs again when a new
    report comes) and refuses a VHD the report does not pass."""
    p = workspace.paths(s)
    if s.azure.boottest_mode == "provision":
        return [
            Step.of(
                functools.partial(boottest.provision, test=test),
                verb=test.verb,
                doc=f"boot the VHD with {test.firmware_name} on a stand-in Azure fabric; "
                "prove the provisioning",
                targets=[test.stamp],
                file_dep=[p.vhd_stamp, p.report],
            )
            for test in boottest.boot_tests(s)
        ]
    return [
        Step.of(
            functools.partial(boottest.boot, test=test),
            verb=test.verb,
            doc=f"boot the VHD in QEMU with {test.firmware_name}; wait for the console marker",
            targets=[test.stamp],
            file_dep=[p.vhd_stamp, p.report],
        )
        for test in boottest.boot_tests(s)
    ]


WORKFLOWS = [
    Workflow(
        "azure_vhd",
        "build an Arch Linux image that Azure accepts (fixed VHD)",
        build,
        shared_inputs=build_environment_record,
        locating=("workdir", *buildenv.ACTIVATION_SETTINGS),
        intermediates=lambda s: [workspace.paths(s).root, workspace.paths(s).image_root],
        outputs=lambda s: [workspace.paths(s).vhd],
        housekeeping=workspace.undo_killed_runs,
    ),
    Workflow(
        "azure_boottest",
        "boot the azure_vhd image in QEMU and wait for a login prompt",
        build_boottest,
    ),
]
