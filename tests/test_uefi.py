"""UEFI and hybrid disks: GRUB x86_64-efi on the ESP, booted by OVMF and by SeaBIOS.

The story of an Azure generation 2 disk (and of a hybrid one that boots both ways, like
Arch's own cloud images): a GPT with an EFI system partition planned by archkernel.image.disk,
GRUB's modules and core images staged into the root tree for each firmware, the ext4 root
made from it, the ESP made FAT by archkernel.image.esp, and archkernel.image.grub putting core.efi at
the removable path EFI/BOOT/BOOTX64.EFI (and, for hybrid, boot.img and core.img where
SeaBIOS finds them). Then QEMU boots it with OVMF (UEFI, Debian's `ovmf` package) and with
SeaBIOS; grub.cfg prints a marker on the serial port and powers off. One more boot runs
the real grub.cfg from grub.grub_cfg under UEFI until a Debian kernel prints its command
line: the `linux` and `initrd` commands work there too.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from archkernel.errors import UserError
from archkernel.formats.vhd_file import append_footer
from archkernel.host import console as screen
from archkernel.host import qemu
from archkernel.host.run import missing_tools, run
from archkernel.image import disk, esp, ext4, grub, grub_install
from archkernel.image.disk import Layout
from archkernel.units import MiB
from tests.support.grub import MARKER, MARKER_CFG, UUID, no_leftovers
from tests.support.processes import wait_for

# Where distributions keep an OVMF image that works as QEMU's -bios (code and variables in
# one file; variable writes then last only as long as the VM, which a test wants anyway).
OVMF_CANDIDATES = (
    Path("/usr/share/ovmf/OVMF.fd"),  # Debian, Ubuntu: ovmf
    Path("/usr/share/edk2/x64/OVMF.4m.fd"),  # Arch: edk2-ovmf
    Path("/usr/share/edk2-ovmf/x64/OVMF.fd"),
    Path("/usr/share/qemu/OVMF.fd"),
)
DISK_SIZE = 300 * MiB
ESP_VOLUME = "A1B2-C3D4"


def ovmf() -> Path | None:
    """The first OVMF image of OVMF_CANDIDATES that exists."""
    return next((p for p in OVMF_CANDIDATES if p.is_file()), None)


TOOLS = (
    "grub-mkimage", "sfdisk", "sgdisk", "mkfs.ext4", "e2fsck", "debugfs", "blkid", "losetup",
    "mount", "mkfs.fat", "fsck.fat", "mcopy", "mdir",
)  # fmt: skip
Marked = TypeVar("Marked", bound=Callable[..., None])


def host_efi_grub(fn: Marked) -> Marked:
    """Marks for tests that install GRUB for real: integration, root, the host's tools."""
    marked: Marked = pytest.mark.integration(
        pytest.mark.root(
            pytest.mark.skipif(
                bool(missing_tools(TOOLS))
                or not grub.GRUB_I386_PC.is_dir()
                or not grub.GRUB_X86_64_EFI.is_dir(),
                reason="needs grub-pc-bin, grub-efi-amd64-bin, grub2-common, fdisk, "
                "gdisk, e2fsprogs, dosfstools, mtools, mount",
            )(fn)
        )
    )
    return marked


def vm(fn: Marked) -> Marked:
    """Marks for tests that boot the disk in QEMU with OVMF or SeaBIOS."""
    marked: Marked = pytest.mark.vm(
        pytest.mark.skipif(
            bool(missing_tools(["qemu-system-x86_64"])) or ovmf() is None,
            reason="needs qemu-system-x86 and ovmf",
        )(fn)
    )
    return marked


def make_root(workdir: Path, name: str) -> Path:
    root = workdir / name
    (root / "etc").mkdir(parents=True)
    (root / "etc/hostname").write_text("archkernel-test\n")
    return root


def build_image(
    workdir: Path,
    boot: disk.Boot,
    cfg_text: str,
    *,
    root: Path | None = None,
    size: int = DISK_SIZE,
) -> tuple[Path, Layout]:
    """A GPT disk for `boot`: GRUB staged into the root tree, ext4 root, FAT ESP, GRUB
    installed for every firmware the layout boots."""
    root = root or make_root(workdir, f"root-{boot}")
    grub.stage_grub_files(root, boot, cfg_text, root_uuid=UUID)
    image = workdir / f"{boot}.raw"
    layout = disk.plan_layout(size, "gpt", boot=boot)
    disk.create_disk(image, layout)
    ext4.make_ext4(image, layout.root, root, uuid=UUID)
    esp.make_fat(image, layout.esp, volume=ESP_VOLUME)
    grub_install.install_grub(image, layout, root_uuid=UUID)
    return image, layout


# --- pure -------------------------------------------------------------------------------------


def test_efi_mkimage_command() -> None:
    assert grub.efi_mkimage_argv(
        Path("/usr/lib/grub/x86_64-efi"), Path("/r/core.efi"), Path("/t/early.cfg")
    ) == [
        "grub-mkimage", "--format", "x86_64-efi", "--directory", "/usr/lib/grub/x86_64-efi",
        "--output", "/r/core.efi", "--config", "/t/early.cfg", "--prefix", "/boot/grub",
        "part_gpt", "part_msdos", "ext2", "search",
    ]  # fmt: skip


def test_stage_grub_files_refuses_an_unknown_boot_mode(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown boot mode 'coreboot'"):
        grub.stage_grub_files(tmp_path, "coreboot", "", root_uuid=UUID)
    assert list(tmp_path.iterdir()) == []


def test_a_directory_without_grub_efi_says_which_package(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="is not a GRUB x86_64-efi directory") as err:
        grub.stage_efi_files(tmp_path / "root", tmp_path, "", root_uuid=UUID)
    assert "grub-efi-amd64-bin" in (err.value.hint or "")


# --- real: staging and installing -------------------------------------------------------------


def pe_machine(data: bytes) -> tuple[int, int]:
    """The machine type and subsystem of a PE32+ executable."""
    assert data[:2] == b"MZ"
    pe = int.from_bytes(data[0x3C:0x40], "little")
    assert data[pe : pe + 4] == b"PE\0\0"
    machine = int.from_bytes(data[pe + 4 : pe + 6], "little")
    optional = pe + 24
    assert data[optional : optional + 2] == b"\x0b\x02", "PE32+"
    return machine, int.from_bytes(data[optional + 68 : optional + 70], "little")


@host_efi_grub
def test_stage_efi_files_puts_modules_core_efi_and_config_into_the_tree(tmp_path: Path) -> None:
    root = tmp_path / "root"
    dest = grub.stage_efi_files(root, grub.GRUB_X86_64_EFI, "echo hi\n", root_uuid=UUID)
    assert dest == root / "boot/grub/x86_64-efi"
    assert (root / "boot/grub/grub.cfg").read_text() == "echo hi\n"
    for name in ("normal.mod", "linux.mod", "serial.mod", "halt.mod", "moddep.lst"):
        assert (dest / name).read_bytes() == (grub.GRUB_X86_64_EFI / name).read_bytes(), name
    core = (dest / "core.efi").read_bytes()
    # An x86-64 (0x8664) EFI application (subsystem 10), with the early config inside.
    assert pe_machine(core) == (0x8664, 10)
    assert grub.early_cfg(UUID).encode() in core
    assert len(core) < 1024 * 1024


@host_efi_grub
def test_hybrid_staging_gives_both_platforms_and_one_grub_cfg(tmp_path: Path) -> None:
    root = tmp_path / "root"
    staged = grub.stage_grub_files(root, "hybrid", MARKER_CFG, root_uuid=UUID)
    assert staged == [root / "boot/grub/i386-pc", root / "boot/grub/x86_64-efi"]
    assert (root / "boot/grub/i386-pc/core.img").is_file()
    assert (root / "boot/grub/x86_64-efi/core.efi").is_file()
    assert sorted(p.name for p in (root / "boot/grub").iterdir()) == [
        "grub.cfg",
        "i386-pc",
        "x86_64-efi",
    ]
    assert (root / "boot/grub/grub.cfg").read_text() == MARKER_CFG


@host_efi_grub
def test_a_uefi_disk_has_bootx64_efi_on_a_sound_fat_and_no_bios_boot_code(tmp_path: Path) -> None:
    image, layout = build_image(tmp_path, "uefi", MARKER_CFG)
    part = layout.esp
    assert esp.list_files(image, part) == ["EFI/", "EFI/BOOT/", "EFI/BOOT/BOOTX64.EFI"]
    staged = (tmp_path / "root-uefi/boot/grub/x86_64-efi/core.efi").read_bytes()
    assert esp.read_file(image, part, "EFI/BOOT/BOOTX64.EFI") == staged
    # Read back by a second tool too: mtools' mtype on the image, fsck.fat on a dd copy.
    copy = tmp_path / "esp.img"
    run(["dd", f"if={image}", f"of={copy}", "bs=1M", f"skip={part.start // MiB}",
         f"count={part.size // MiB}", "conv=sparse", "status=none"])  # fmt: skip
    run(["fsck.fat", "-n", copy])
    direct = run(["mdir", "-i", f"{copy}", "::/EFI/BOOT"], capture=True, env=esp.MTOOLS_ENV)
    assert "BOOTX64  EFI" in direct.stdout
    esp.check_fat(image, part)
    assert disk.fs_uuid(image, part) == ESP_VOLUME
    ext4.check_ext4(image, layout.root)
    assert "No problems found" in run(["sgdisk", "--verify", image], capture=True).stdout
    with open(image, "rb") as f:
        assert not any(f.read(440)), "no BIOS boot code in the protective MBR"
    # Installing again replaces the file and changes nothing else.
    grub_install.install_efi(image, layout, root_uuid=UUID)
    assert esp.list_files(image, part) == ["EFI/", "EFI/BOOT/", "EFI/BOOT/BOOTX64.EFI"]
    no_leftovers(tmp_path)


@host_efi_grub
def test_a_hybrid_disk_has_both_boot_loaders(tmp_path: Path) -> None:
    image, layout = build_image(tmp_path, "hybrid", MARKER_CFG)
    with open(image, "rb") as f:
        data = f.read(3 * MiB)
    boot_img = (grub.GRUB_I386_PC / "boot.img").read_bytes()
    assert data[0x68:0x1B8] == boot_img[0x68:0x1B8]
    # core.img in the BIOS boot partition (sector 2048), which boot.img points at.
    diskboot = (grub.GRUB_I386_PC / "diskboot.img").read_bytes()
    assert data[2048 * 512 :][:0x10] == diskboot[:0x10]
    assert int.from_bytes(data[0x5C:0x64], "little") == 2048
    staged = (tmp_path / "root-hybrid/boot/grub/x86_64-efi/core.efi").read_bytes()
    assert esp.read_file(image, layout.esp, esp.REMOVABLE_PATH_X64) == staged
    esp.check_fat(image, layout.esp)
    ext4.check_ext4(image, layout.root)
    assert "No problems found" in run(["sgdisk", "--verify", image], capture=True).stdout
    no_leftovers(tmp_path)


@host_efi_grub
def test_install_efi_refuses_what_would_not_boot(tmp_path: Path) -> None:
    root = make_root(tmp_path, "root")
    grub.stage_bios_files(root, grub.GRUB_I386_PC, MARKER_CFG, root_uuid=UUID)
    image = tmp_path / "disk.raw"
    layout = disk.plan_layout(DISK_SIZE, "gpt", boot="uefi")
    disk.create_disk(image, layout)
    ext4.make_ext4(image, layout.root, root, uuid=UUID)

    with pytest.raises(UserError, match="holds no file system, not FAT") as err:
        grub_install.install_efi(image, layout, root_uuid=UUID)
    assert "esp.make_fat" in (err.value.hint or "")
    esp.make_fat(image, layout.esp)
    with pytest.raises(UserError, match=re.escape("has no /boot/grub/x86_64-efi/core.efi")) as err:
        grub_install.install_efi(image, layout, root_uuid=UUID)
    assert "stage GRUB's EFI files" in (err.value.hint or "")
    other = "00000000-1111-2222-3333-444444444444"
    with pytest.raises(UserError, match=f"has UUID {UUID}, but GRUB was staged for {other}"):
        grub_install.install_efi(image, layout, root_uuid=other)
    with pytest.raises(UserError, match="has no place for BIOS boot code"):
        grub_install.install_bios(image, layout, root_uuid=UUID)
    bios = disk.plan_layout(DISK_SIZE, "gpt")
    with pytest.raises(UserError, match=r"bios layout of .* has no EFI system partition"):
        grub_install.install_efi(image, bios, root_uuid=UUID)
    assert esp.list_files(image, layout.esp) == [], "nothing was written"
    no_leftovers(tmp_path)


# --- booting ----------------------------------------------------------------------------------


def boot(image: Path, log: Path, *, firmware: Path | None, disk_format: str = "raw") -> str:
    """Boot `image` until the marker; the console log."""
    argv = qemu.qemu_argv(disk=image, disk_format=disk_format, serial_log=log, firmware=firmware)
    result = qemu.boot_and_wait(argv, log, MARKER, 300)  # OVMF is slow under TCG
    assert result.found
    return log.read_text(errors="replace")


def as_vhd(image: Path) -> Path:
    vhd_image = image.with_suffix(".vhd")
    shutil.copyfile(image, vhd_image)
    append_footer(vhd_image)
    assert vhd_image.stat().st_size == image.stat().st_size + 512
    return vhd_image


@host_efi_grub
@vm
def test_a_uefi_disk_boots_with_ovmf_as_raw_and_as_fixed_vhd(tmp_path: Path) -> None:
    image, _ = build_image(tmp_path, "uefi", MARKER_CFG)
    log = tmp_path / "serial.log"
    console = boot(image, log, firmware=ovmf())
    # OVMF found it as a removable-media boot loader: no NVRAM entry was needed.
    assert "BdsDxe: starting Boot" in console
    boot(as_vhd(image), log, firmware=ovmf(), disk_format="vpc")
    # SeaBIOS boots the disk, but its protective MBR holds no boot code: GRUB never runs.
    # (SeaBIOS's messages reach the serial port only when fw_cfg's etc/sercon-port names
    # it, as a little-endian integer: 0x3f8 is ttyS0.)
    port = tmp_path / "sercon-port"
    port.write_bytes((0x3F8).to_bytes(2, "little"))
    sercon = ["-fw_cfg", f"name=etc/sercon-port,file={port}"]
    log.unlink()
    with qemu.qemu_process(qemu.qemu_argv(disk=image, serial_log=log, extra=sercon)) as vm:
        wait_for(
            lambda: "Booting from Hard Disk" in qemu.read_log(log) or not vm.running,
            "SeaBIOS booting the disk",
            timeout=300,
        )
        assert vm.running, qemu.read_log(log)
        time.sleep(15)  # GRUB would have printed the marker within a few seconds
        assert MARKER not in qemu.read_log(log)
    no_leftovers(tmp_path)


@host_efi_grub
@vm
@pytest.mark.parametrize("firmware", ["seabios", "ovmf"])
def test_a_hybrid_disk_boots_with_seabios_and_with_ovmf(tmp_path: Path, firmware: str) -> None:
    image, _ = build_image(tmp_path, "hybrid", MARKER_CFG)
    log = tmp_path / "serial.log"
    fw = ovmf() if firmware == "ovmf" else None
    console = boot(image, log, firmware=fw)
    assert ("BdsDxe" in console) == (firmware == "ovmf")
    boot(as_vhd(image), log, firmware=fw, disk_format="vpc")
    no_leftovers(tmp_path)


# A newc cpio archive holding nothing but its trailer: the smallest initrd Linux accepts.
EMPTY_CPIO = b"070701" + b"00000000" * 4 + b"00000001" + b"00000000" * 6 + b"0000000B"
EMPTY_CPIO += b"00000000TRAILER!!!\0"
EMPTY_CPIO += b"\0" * (-len(EMPTY_CPIO) % 4)


def test_the_empty_initrd_is_a_newc_trailer() -> None:
    assert len(EMPTY_CPIO) % 4 == 0 and EMPTY_CPIO.startswith(b"070701")
    assert EMPTY_CPIO[110:121] == b"TRAILER!!!\0"


@host_efi_grub
@vm
@pytest.mark.parametrize(("boot_mode", "firmware"), [("uefi", "ovmf"), ("hybrid", "seabios")])
def test_the_real_grub_cfg_starts_linux(tmp_path: Path, boot_mode: str, firmware: str) -> None:
    from tests.support.kernel import debian_kernel_tree, kernel_image

    kernel = kernel_image(debian_kernel_tree())
    root = make_root(tmp_path, "root")
    (root / "boot").mkdir()
    shutil.copyfile(kernel, root / "boot/vmlinuz-linux")
    (root / "boot/initramfs-linux.img").write_bytes(EMPTY_CPIO)
    marker = f"archkernel.test={boot_mode}-{firmware}"
    cfg = grub.grub_cfg(
        UUID,
        "/boot/vmlinuz-linux",
        "/boot/initramfs-linux.img",
        f"console=ttyS0,115200 panic=-1 {marker}",
        timeout=0,
    )
    mode: disk.Boot = "uefi" if boot_mode == "uefi" else "hybrid"
    image, _ = build_image(tmp_path, mode, cfg, root=root, size=320 * MiB)
    log = tmp_path / "serial.log"
    argv = qemu.qemu_argv(
        disk=image, serial_log=log, firmware=ovmf() if firmware == "ovmf" else None
    )
    result = qemu.boot_and_wait(argv, log, marker, 300)
    assert result.found
    console = screen.clean_console(log.read_text(errors="replace"))
    assert "Linux version" in console
    assert f"root=UUID={UUID} rw console=ttyS0,115200 panic=-1 {marker}" in console
    if firmware == "ovmf":
        assert "efi: EFI v" in console, "the kernel runs on UEFI"
    no_leftovers(tmp_path)
