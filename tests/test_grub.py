"""GRUB for BIOS boot: the texts and commands (pure), then a disk that really boots.

The boot test is the end of the story: a disk made by archkernel.image.disk, GRUB installed by
archkernel.image.grub with the host's GRUB, booted in QEMU (TCG, SeaBIOS like an Azure
generation 1 VM) from a GPT and from an MBR disk, as a raw image and as a fixed VHD. Its
grub.cfg prints a marker on the serial port and powers off instead of booting Linux.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from archkernel.errors import UserError
from archkernel.formats.vhd_file import append_footer
from archkernel.host import qemu
from archkernel.host.run import missing_tools, run
from archkernel.image import disk, ext4, grub, grub_install
from archkernel.units import MiB
from tests.support.grub import (
    MARKER,
    MARKER_CFG,
    UUID,
    build_bios_image,
    host_grub,
    no_leftovers,
)

# --- pure -------------------------------------------------------------------------------------


def test_grub_cfg_boots_arch_from_the_root_uuid_on_the_serial_console() -> None:
    cfg = grub.grub_cfg(
        UUID.upper(),
        "/boot/vmlinuz-linux",
        "/boot/initramfs-linux.img",
        "console=ttyS0 earlyprintk=ttyS0 rootdelay=300 net.ifnames=0",
    )
    assert cfg == (
        "# Written by archkernel; the build host's GRUB was installed with this file.\n"
        "serial --unit=0 --speed=115200\n"
        "terminal_input serial console\n"
        "terminal_output serial console\n"
        "set timeout=1\n"
        "set default=0\n"
        "search --no-floppy --fs-uuid --set=root 6f1d2c3b-4a59-4e8d-b7c6-0a1b2c3d4e5f\n"
        "\n"
        "menuentry 'Arch Linux' {\n"
        "\tlinux /boot/vmlinuz-linux root=UUID=6f1d2c3b-4a59-4e8d-b7c6-0a1b2c3d4e5f rw"
        " console=ttyS0 earlyprintk=ttyS0 rootdelay=300 net.ifnames=0\n"
        "\tinitrd /boot/initramfs-linux.img\n"
        "}\n"
    )


def test_grub_cfg_timeout_and_quoting() -> None:
    cfg = grub.grub_cfg(
        UUID,
        "/boot/vmlinuz-linux",
        "/boot/initramfs-linux.img",
        "quiet init=/bin/sh acpi_osi='!Windows 2012' x=$y",
        timeout=5,
    )
    assert "set timeout=5\n" in cfg
    # Words GRUB would expand or split are single-quoted, quotes inside escaped like sh.
    assert " quiet init=/bin/sh 'acpi_osi='\\''!Windows' '2012'\\''' 'x=$y'\n" in cfg


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("not-a-uuid", "/boot/vmlinuz-linux", "/boot/i.img", ""), "is not a UUID"),
        ((UUID, "vmlinuz-linux", "/boot/i.img", ""), "kernel path"),
        ((UUID, "/boot/vmlinuz linux", "/boot/i.img", ""), "kernel path"),
        ((UUID, "/boot/vmlinuz-linux", "/boot/$i.img", ""), "initrd path"),
        ((UUID, "/boot/vmlinuz-linux", "/boot/i.img", "a\nb"), "line break"),
    ],
)
def test_grub_cfg_refuses_what_it_cannot_write(args: tuple[str, str, str, str], words: str) -> None:
    with pytest.raises(UserError) as err:
        grub.grub_cfg(*args)
    assert words in err.value.message


def test_grub_word() -> None:
    assert grub.grub_word("console=ttyS0,115200n8") == "console=ttyS0,115200n8"
    assert grub.grub_word("a b") == "'a b'"
    assert grub.grub_word("it's") == "'it'\\''s'"
    assert grub.grub_word("${x}") == "'${x}'"
    assert grub.grub_word("") == "''"


def test_early_config_finds_the_root_by_uuid_and_sets_the_prefix_there() -> None:
    assert grub.early_cfg("6F1D2C3B-4A59-4E8D-B7C6-0A1B2C3D4E5F") == (
        "search --no-floppy --fs-uuid --set=root 6f1d2c3b-4a59-4e8d-b7c6-0a1b2c3d4e5f\n"
        "set prefix=($root)/boot/grub\n"
    )


def test_mkimage_and_setup_commands() -> None:
    assert grub.mkimage_argv(
        Path("/usr/lib/grub/i386-pc"), Path("/r/core.img"), Path("/t/early.cfg")
    ) == [
        "grub-mkimage",
        "--format",
        "i386-pc",
        "--directory",
        "/usr/lib/grub/i386-pc",
        "--output",
        "/r/core.img",
        "--config",
        "/t/early.cfg",
        "--prefix",
        "/boot/grub",
        "biosdisk",
        "part_gpt",
        "part_msdos",
        "ext2",
        "search",
    ]
    assert grub.bios_setup_argv(
        Path("/bin/grub-bios-setup"),
        Path("/m/boot/grub/i386-pc"),
        Path("/t/device.map"),
        Path("/w/disk.raw"),
    ) == [
        "/bin/grub-bios-setup",
        "--directory",
        "/m/boot/grub/i386-pc",
        "--device-map",
        "/t/device.map",
        "/w/disk.raw",
    ]


def test_device_map_names_the_image_by_its_real_path(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    assert grub.device_map(tmp_path / "link/disk.raw") == f"(hd0) {tmp_path}/real/disk.raw\n"


# --- real: staging and installing -------------------------------------------------------------


@host_grub
def test_stage_bios_files_puts_modules_core_img_and_config_into_the_tree(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    dest = grub.stage_bios_files(root, grub.GRUB_I386_PC, "echo hi\n", root_uuid=UUID)
    assert dest == root / "boot/grub/i386-pc"
    assert (root / "boot/grub/grub.cfg").read_text() == "echo hi\n"
    for name in ("normal.mod", "linux.mod", "serial.mod", "moddep.lst", "command.lst", "boot.img"):
        assert (dest / name).read_bytes() == (grub.GRUB_I386_PC / name).read_bytes(), name
    # core.img starts with diskboot.img, the sector that loads the rest of it.
    diskboot = (grub.GRUB_I386_PC / "diskboot.img").read_bytes()
    core = (dest / "core.img").read_bytes()
    assert core[:0x100] == diskboot[:0x100]
    assert 10_000 < len(core) < 1024 * 1024, "must fit the 1 MiB BIOS boot partition"


@host_grub
@pytest.mark.parametrize("table", ["gpt", "mbr"])
def test_install_bios_writes_boot_code_and_keeps_table_and_file_system(
    tmp_path: Path, table: str
) -> None:
    image, layout = build_bios_image(tmp_path, table, MARKER_CFG)
    with open(image, "rb") as f:
        data = f.read(2 * MiB)
    boot_img = (grub.GRUB_I386_PC / "boot.img").read_bytes()
    # boot.img's code is in the MBR (grub-bios-setup patches the fields before 0x68) ...
    assert data[0x68:0x1B8] == boot_img[0x68:0x1B8]
    assert data[510:512] == b"\x55\xaa"
    # ... and core.img in the BIOS boot partition (GPT) or right after the MBR.
    core_sector = 2048 if table == "gpt" else 1
    diskboot = (grub.GRUB_I386_PC / "diskboot.img").read_bytes()
    assert data[core_sector * 512 :][:0x10] == diskboot[:0x10]
    # boot.img's "kernel sector" (8 bytes at 0x5C) is where it loads core.img from.
    assert int.from_bytes(data[0x5C:0x64], "little") == core_sector
    assert [(p["start"], p["size"]) for p in disk.read_partitions(image)] == [
        (p.start // 512, p.size // 512) for p in layout.partitions
    ]
    ext4.check_ext4(image, layout.root)
    if table == "gpt":
        assert "No problems found" in run(["sgdisk", "--verify", image], capture=True).stdout
    no_leftovers(tmp_path)


@host_grub
def test_install_bios_refuses_a_file_system_with_another_uuid(tmp_path: Path) -> None:
    root = tmp_path / "root"
    grub.stage_bios_files(root, grub.GRUB_I386_PC, MARKER_CFG, root_uuid=UUID)
    image = tmp_path / "disk.raw"
    layout = disk.plan_layout(64 * MiB, "gpt")
    disk.create_disk(image, layout)
    other = "00000000-1111-2222-3333-444444444444"
    ext4.make_ext4(image, layout.root, root, uuid=other)
    with pytest.raises(UserError) as err:
        grub_install.install_bios(image, layout, root_uuid=UUID)
    assert f"has UUID {other}, but GRUB was staged for {UUID}" in err.value.message
    with open(image, "rb") as f:
        assert not any(f.read(440)), "nothing was written"


@host_grub
def test_install_bios_without_staged_files_says_so_and_cleans_up(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    image = tmp_path / "disk.raw"
    layout = disk.plan_layout(64 * MiB, "mbr")
    disk.create_disk(image, layout)
    ext4.make_ext4(image, layout.root, root, uuid=UUID)
    with pytest.raises(UserError, match=re.escape("no /boot/grub/i386-pc/boot.img or core.img")):
        grub_install.install_bios(image, layout, root_uuid=UUID)
    no_leftovers(tmp_path)


def test_bios_setup_tool_is_found_on_path_or_beside_the_modules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    on_path, lib = tmp_path / "bin", tmp_path / "lib"
    on_path.mkdir()
    lib.mkdir()
    monkeypatch.setenv("PATH", os.fspath(on_path))
    with pytest.raises(UserError, match="command not found: grub-bios-setup") as err:
        grub.bios_setup_tool(lib)
    assert "grub-pc-bin" in (err.value.hint or "")
    # Debian keeps it beside the modules ...
    (lib / "grub-bios-setup").write_text("#!/bin/sh\n")
    (lib / "grub-bios-setup").chmod(0o755)
    assert grub.bios_setup_tool(lib) == lib / "grub-bios-setup"
    # ... Arch on PATH, which wins.
    (on_path / "grub-bios-setup").write_text("#!/bin/sh\n")
    (on_path / "grub-bios-setup").chmod(0o755)
    assert grub.bios_setup_tool(lib) == on_path / "grub-bios-setup"


# --- the boot test ----------------------------------------------------------------------------


@host_grub
@pytest.mark.vm
@pytest.mark.skipif(bool(missing_tools(["qemu-system-x86_64"])), reason="needs qemu-system-x86")
@pytest.mark.parametrize("table", ["gpt", "mbr"])
def test_the_disk_boots_grub_in_qemu_as_raw_and_as_fixed_vhd(tmp_path: Path, table: str) -> None:
    image, _ = build_bios_image(tmp_path, table, MARKER_CFG)
    log = tmp_path / "serial.log"
    raw = qemu.boot_and_wait(qemu.qemu_argv(disk=image, serial_log=log), log, MARKER, 300)
    assert raw.found
    assert MARKER in raw.log_tail

    vhd_image = tmp_path / f"{table}.vhd"
    shutil.copyfile(image, vhd_image)
    append_footer(vhd_image)
    assert vhd_image.stat().st_size == 64 * MiB + 512
    vpc = qemu.boot_and_wait(
        qemu.qemu_argv(disk=vhd_image, disk_format="vpc", serial_log=log), log, MARKER, 300
    )
    assert vpc.found
