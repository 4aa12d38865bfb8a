"""azure_boottest: boot the VHD in QEMU and wait for the marker on the console."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from archkernel.azure.diskimage import Planned
from archkernel.azure.workspace import _json, paths
from archkernel.errors import UserError
from archkernel.host import qemu
from archkernel.log import log
from archkernel.settings import Settings

# --- azure_boottest -------------------------------------------------------------------------


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


def boottest_commands(settings: Settings, test: BootTest) -> Planned:
    """What `test` runs (for --dry-run)."""
    try:
        firmware = qemu.find_ovmf() if test.firmware == "uefi" else None
    except UserError as exc:
        return [f"{exc.message} ({exc.hint})"]
    return [boottest_argv(settings, test, firmware)]


def run_boottest(settings: Settings, test: BootTest) -> qemu.BootResult:
    """Boot the VHD as `test` says and wait for `azure.boottest_marker`; writes its stamp."""
    az = settings.azure
    firmware = qemu.find_ovmf() if test.firmware == "uefi" else None
    argv = boottest_argv(settings, test, firmware)
    result = qemu.boot_and_wait(argv, test.console, az.boottest_marker, az.boottest_timeout)
    stamp = {"marker": az.boottest_marker, "seconds": result.elapsed, "firmware": test.firmware}
    _json(test.stamp, stamp)
    log.info(
        "%r on the console after %.1fs with %s; log %s",
        az.boottest_marker,
        result.elapsed,
        test.firmware_name,
        test.console,
    )
    return result
