"""`archkernel demo azure_vhd`: what it needs, and what the build and boot test made.

The demo builds the offline repository in DIR (`archkernel.demo.offline`), then runs
azure_vhd and azure_boottest with DIR/settings.toml exactly as `archkernel run` does, and
ends with `report()`: the VHD, its verify result and the boot result, read back from the
files the workflows wrote.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from archkernel.azure import boottest, workspace
from archkernel.azure.preflight import preflight_tools
from archkernel.demo import offline
from archkernel.settings import Settings
from archkernel.units import MiB

DEFAULT_DIR = Path("archkernel-demo")
# The boot test's own tool (azure_vhd's are `preflight_tools`).
BOOT_TOOLS = ("qemu-system-x86_64",)


def tools(settings: Settings) -> list[str]:
    """Every tool the demo runs with these settings: the repository's, the build's (step
    1 checks the same list) and the boot test's, so a missing one is named before the
    first download."""
    found = [*offline.TOOLS, *preflight_tools(settings.azure), *BOOT_TOOLS]
    return list(dict.fromkeys(found))


@dataclass(frozen=True)
class Boot:
    """One boot of the boot test, from its stamp."""

    firmware: str  # SeaBIOS, OVMF (UEFI)
    marker: str
    seconds: float
    console: Path


@dataclass(frozen=True)
class Outcome:
    """What the demo made: the VHD, its verify result, the boots."""

    vhd: Path
    size: int
    allocated: int
    verify_result: str  # verify.txt's last line: `N passed, M failed`
    verify_report: Path
    boots: list[Boot]


def outcome(settings: Settings) -> Outcome:
    """Read what azure_vhd and azure_boottest wrote for these settings (both finished)."""
    p = workspace.paths(settings)
    st = p.vhd.stat()
    lines = p.summary.read_text().splitlines()
    boots = []
    for test in boottest.boot_tests(settings):
        stamp = json.loads(test.stamp.read_text())
        boots.append(
            Boot(test.firmware_name, str(stamp["marker"]), float(stamp["seconds"]), test.console)
        )
    return Outcome(
        vhd=p.vhd,
        size=st.st_size,
        allocated=st.st_blocks * 512,
        verify_result=lines[-1] if lines else "(empty report)",
        verify_report=p.summary,
        boots=boots,
    )


def _mib(size: int) -> str:
    return f"{size / MiB:.1f}".removesuffix(".0") + " MiB"


def report(result: Outcome, settings_file: Path) -> list[str]:
    """The lines the demo ends with."""
    lines = [
        "archkernel demo azure_vhd: done",
        f"  image:     {result.vhd}",
        f"             fixed VHD of {_mib(result.size)}, {_mib(result.allocated)} allocated "
        "(sparse)",
        f"  verify:    {result.verify_result} ({result.verify_report})",
    ]
    for boot in result.boots:
        lines.append(
            f"  boot test: passed with {boot.firmware}: {boot.marker!r} on the serial console "
            f"after {boot.seconds:.1f}s ({boot.console})"
        )
    lines += [
        f"  settings:  {settings_file}",
        f"  again:     archkernel run azure_vhd --settings {settings_file}",
    ]
    return lines
