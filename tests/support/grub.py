"""A small BIOS disk with GRUB installed, for the GRUB, ESP, UEFI and QEMU tests.

`build_bios_image` makes a 64 MiB disk with archkernel.image.disk, an ext4 root holding
GRUB's files staged by archkernel.image.grub, and GRUB installed with the host's GRUB. With
MARKER_CFG as its grub.cfg, a boot prints MARKER on the serial port and powers off.
`no_leftovers` asserts that a test left no mount and no loop device behind.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from archkernel.host.run import missing_tools
from archkernel.image import disk, ext4, grub, grub_install
from archkernel.image.disk import Layout
from archkernel.units import MiB
from tests.support.kernel_state import leftovers

UUID = "6f1d2c3b-4a59-4e8d-b7c6-0a1b2c3d4e5f"
MARKER = "ARCHKERNEL-GRUB-OK"
# grub.cfg for the boot test: say we got here, then power off (QEMU exits).
MARKER_CFG = f"""\
serial --unit=0 --speed=115200
terminal_input serial
terminal_output serial
echo {MARKER}
halt
"""

TOOLS = ("grub-mkimage", "sfdisk", "sgdisk", "mkfs.ext4", "e2fsck", "blkid", "losetup", "mount")
Marked = TypeVar("Marked", bound=Callable[..., None])


def host_grub(fn: Marked) -> Marked:
    """Marks for tests that install GRUB for real: integration, root, the host's tools."""
    marked: Marked = pytest.mark.integration(
        pytest.mark.root(
            pytest.mark.skipif(
                bool(missing_tools(TOOLS)) or not grub.GRUB_I386_PC.is_dir(),
                reason="needs grub-pc-bin, grub2-common, fdisk, gdisk, e2fsprogs, mount",
            )(fn)
        )
    )
    return marked


def build_bios_image(
    workdir: Path, table: str, cfg_text: str, *, root_uuid: str = UUID
) -> tuple[Path, Layout]:
    """A 64 MiB disk with `table`, an ext4 root holding GRUB's files, GRUB installed."""
    root = workdir / f"root-{table}"
    root.mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "etc/hostname").write_text("archkernel-test\n")
    grub.stage_bios_files(root, grub.GRUB_I386_PC, cfg_text, root_uuid=root_uuid)
    image = workdir / f"{table}.raw"
    layout = disk.plan_layout(64 * MiB, table)
    disk.create_disk(image, layout)
    ext4.make_ext4(image, layout.root, root, uuid=root_uuid)
    grub_install.install_bios(image, layout, root_uuid=root_uuid)
    return image, layout


def no_leftovers(directory: Path) -> None:
    """Assert that no loop device's backing file and no mount point lies under `directory`."""
    assert leftovers(directory) == []
