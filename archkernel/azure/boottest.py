"""azure_boottest: boot the VHD in QEMU and wait for the marker on the console.

One step per boot (`boot_tests`): the firmware of the VM generation the image is for,
and for a hybrid image the other one too. Each is one QEMU command (`qemu.Boot`: shown by
a dry run as it runs) whose pid file lives in `workdir/azure/tmp/boottest`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from archkernel.azure.diskimage import remove_scratch, scratch
from archkernel.azure.workspace import Paths, _json, paths
from archkernel.errors import UserError
from archkernel.host import qemu
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
    tests = [BootTest(first, "boot", p.console, p.boottest)]
    if az.firmware == "hybrid":
        other: Literal["bios", "uefi"] = "uefi" if first == "bios" else "bios"
        log_file, stamp = p.work / f"boottest-{other}.log", p.work / f"boottest-{other}.json"
        tests.append(BootTest(other, f"boot_{other}", log_file, stamp))
    return tests


def boottest_argv(settings: Settings, test: BootTest, firmware: qemu.Firmware | None) -> list[str]:
    """The QEMU command of `test` (`firmware`: OVMF for a UEFI boot)."""
    p = paths(settings)
    return qemu.qemu_argv(
        disk=p.vhd, disk_format="vpc", serial_log=test.console, memory=1024, firmware=firmware
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
