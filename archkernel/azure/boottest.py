"""azure_boottest: boot the VHD in QEMU and wait for the marker on the console.

One step per boot (`boot_tests`): the firmware of the VM generation the image is for,
and for a hybrid image the other one too. Each is one QEMU command (`qemu.Boot`: shown by
a dry run as it runs) whose pid file lives in `workdir/azure/tmp/boottest`.

With `azure.boottest_mode = "provision"` each boot is `provision` instead: the VM boots on
a stand-in Azure fabric (archkernel.azure.fabric: the DVD with ovf-env.xml, the
wireserver, IMDS, a network holding their addresses) and the boot passes only when the
agent provisioned it: the host name and user from the DVD, SSH with the key, password
login refused, Ready reported, a DHCP lease, `ClientAliveInterval 180`, a machine-id and
host keys made on this boot. The proofs go to `workdir/azure/provision.json` and the log.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from archkernel.azure.diskimage import remove_scratch, scratch
from archkernel.azure.fabric import boot as fabric_boot
from archkernel.azure.fabric import media, ovf
from archkernel.azure.workspace import Paths, _json, paths
from archkernel.errors import UserError
from archkernel.host import qemu
from archkernel.host.run import check_tools
from archkernel.log import log
from archkernel.plan import Do, Plan, reads
from archkernel.settings import Settings


@dataclass(frozen=True)
class BootTest:
    """One boot of the VHD in QEMU: the firmware, the step's verb, its console log and its
    stamp."""

    firmware: Literal["bios", "uefi"]
    verb: str
    console: Path
    stamp: Path

    @property
    def firmware_name(self) -> str:
        return "SeaBIOS" if self.firmware == "bios" else "OVMF (UEFI)"


def boot_tests(settings: Settings) -> list[BootTest]:
    """The boots azure_boottest makes: first with the firmware of the VM generation the
    image is for (SeaBIOS for 1, OVMF for 2), into `boottest.log`; a hybrid image then
    also with the other one, into `boottest-bios.log` or `boottest-uefi.log`."""
    az, p = settings.azure, paths(settings)
    first: Literal["bios", "uefi"] = "bios" if az.generation == 1 else "uefi"
    # A provisioning boot's stamp is its proofs: provision.json.
    record = "provision" if az.boottest_mode == "provision" else "boottest"
    tests = [BootTest(first, "boot", p.console, p.work / f"{record}.json")]
    if az.firmware == "hybrid":
        other: Literal["bios", "uefi"] = "uefi" if first == "bios" else "bios"
        log_file, stamp = p.work / f"boottest-{other}.log", p.work / f"{record}-{other}.json"
        tests.append(BootTest(other, f"boot_{other}", log_file, stamp))
    return tests


def boottest_argv(settings: Settings, test: BootTest, firmware: qemu.Firmware | None) -> list[str]:
    """The QEMU command of `test` (`firmware`: OVMF for a UEFI boot). A UEFI boot puts the
    disk on NVMe, as Azure's generation 2 v6 sizes do; a BIOS boot on IDE."""
    p = paths(settings)
    return qemu.qemu_argv(
        disk=p.vhd,
        disk_format="vpc",
        serial_log=test.console,
        memory=1024,
        firmware=firmware,
        disk_interface="nvme" if test.firmware == "uefi" else "ide",
    )


def require_verified(p: Paths) -> None:
    """UserError unless step 9's report says the VHD there passed every check: an image
    that did not pass verify is never booted."""
    try:
        report = json.loads(p.report.read_text())
    except (OSError, ValueError):
        report = None
    if not isinstance(report, dict) or report.get("image") != str(p.vhd):
        raise UserError(
            f"{p.vhd} has not been verified (no report {p.report} on it)",
            "run azure_vhd first: its step 9 checks the image",
        )
    if report.get("ok") is not True:
        raise UserError(
            f"{p.vhd} failed verification: the boot test does not boot it",
            f"see {p.summary}, fix the cause and run azure_vhd again",
        )


@reads("azure.boottest_marker", "azure.boottest_timeout", "azure.output")
def boot(settings: Settings, *, test: BootTest) -> Plan:
    """boot the VHD in QEMU as `test` says; wait for the marker on the serial console.

    A UEFI boot needs OVMF: without it the plan cannot be made (UserError, shown by a
    dry run).
    """
    az, p = settings.azure, paths(settings)
    marker, wait = az.boottest_marker, az.boottest_timeout
    firmware = qemu.find_ovmf() if test.firmware == "uefi" else None
    tmp = scratch(p, "boottest")

    results: list[qemu.BootResult] = []

    def stamp() -> None:
        (result,) = results
        record = {"marker": marker, "seconds": result.elapsed, "firmware": test.firmware}
        _json(test.stamp, record)
        log.info(
            "%r on the console after %.1fs with %s; log %s",
            marker,
            result.elapsed,
            test.firmware_name,
            test.console,
        )

    plan = Plan()
    plan.ops += [
        Do(
            f"check that {p.report} says {p.vhd.name} passed every check",
            lambda: require_verified(p),
        ),
        qemu.Boot.of_boot(
            boottest_argv(settings, test, firmware),
            serial_log=test.console,
            marker=marker,
            wait=wait,
            pidfile=tmp / f"{test.verb}.pid",
            booted=results.append,
            label=f"booting with {test.firmware_name}",
        ),
        Do(f"write {test.stamp}: the marker, how long it took, the firmware", stamp),
    ]
    plan.cleanup.append(remove_scratch(p, "boottest"))
    return plan


# --- provisioning mode -----------------------------------------------------------------------

USER = "azureuser"  # the user ovf-env.xml asks for, as `az vm create` names it
PROVISION_TOOLS = (qemu.QEMU, media.TOOL, "ssh", "ssh-keygen")


def provisioning(settings: Settings, public_key: str) -> ovf.Provisioning:
    """What the fabric hands the VM: a host name unlike the image's (so that the proof
    shows the DVD was read), `USER` with `public_key`, password login disabled."""
    hostname = f"provisioned-{settings.azure.hostname}"[:63].rstrip("-.")
    return ovf.Provisioning.with_key(hostname, USER, public_key)


@reads(
    "azure.boottest_timeout",
    "azure.boottest_ssh_key",
    "azure.provisioning",
    "azure.extensions",
    "azure.hostname",
    "azure.generation",
    "azure.output",
)
def provision(settings: Settings, *, test: BootTest) -> Plan:
    """boot the VHD on a stand-in Azure fabric and prove that its agent provisioned it.

    The proofs are written to `test.stamp` (provision.json), passed or not; the step fails
    unless all pass. A UEFI boot needs OVMF (UserError, shown by a dry run).
    """
    az, p = settings.azure, paths(settings)
    firmware = qemu.find_ovmf() if test.firmware == "uefi" else None
    tmp = scratch(p, "boottest")
    generation = 1 if test.firmware == "bios" else 2
    key = az.boottest_ssh_key or tmp / "id_ed25519"

    def boot() -> None:
        check_tools(PROVISION_TOOLS, "the provisioning boot test")
        if az.boottest_ssh_key is None:
            fabric_boot.make_key(key)
        public = Path(f"{key}.pub").read_text()
        run = fabric_boot.ProvisionBoot(
            qemu=boottest_argv(settings, test, firmware),
            generation=generation,
            console=test.console,
            spec=provisioning(settings, public),
            key=key,
            agent=az.provisioning,
            timeout=az.boottest_timeout,
            scratch=tmp,
            image_root=p.image_root if p.image_root.is_dir() else None,
            label=f"provisioning with {test.firmware_name}",
            extensions=az.extensions,
        )
        try:
            result = fabric_boot.provision_boot(run)
        except fabric_boot.ProvisionFailed as failed:
            if failed.result is not None:
                _json(test.stamp, {**failed.result.record(), "ok": False})
            raise
        _json(test.stamp, {**result.record(), "ok": True})
        log.info("provisioning proven in %.1fs with %s; %s", result.seconds,
                 test.firmware_name, test.stamp)  # fmt: skip

    plan = Plan()
    plan.ops += [
        Do(
            f"check that {p.report} says {p.vhd.name} passed every check",
            lambda: require_verified(p),
        ),
        Do(
            f"boot {p.vhd.name} with {test.firmware_name} on a stand-in Azure fabric "
            "(DVD, wireserver, IMDS, Azure's DHCP in a network namespace of its own); "
            f"prove the {az.provisioning} provisioning "
            f"over SSH as {USER}; write {test.stamp}",
            boot,
        ),
    ]
    plan.cleanup.append(remove_scratch(p, "boottest"))
    return plan
