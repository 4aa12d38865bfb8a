"""GRUB for BIOS (i386-pc) and UEFI (x86_64-efi) boot of a disk image, from the build host.

Like mkosi's tools tree, the boot loader comes from the machine that builds the image, not
from the image, so nothing runs inside the image. It happens in two acts:

1. `stage_bios_files` / `stage_efi_files`, *before* the root file system is made: copy the
   host's modules into `ROOT/boot/grub/i386-pc` or `ROOT/boot/grub/x86_64-efi`, build the
   core image there with `grub-mkimage` (`core.img`, `core.efi`; its early config finds
   the root file system by UUID, which we choose before mkfs, and sets the prefix to
   `/boot/grub` on it), and write `ROOT/boot/grub/grub.cfg`, the one configuration both
   firmwares end up in. `mkfs.ext4 -d` then carries them in.
2. `install_bios` / `install_efi`, after mkfs: `grub-bios-setup` writes `boot.img` into the
   MBR and embeds `core.img` in the BIOS boot partition (GPT) or the gap after the MBR
   (MBR); `install_efi` copies `core.efi`, read back from the root file system, to the EFI
   system partition's removable path `EFI/BOOT/BOOTX64.EFI`, which UEFI firmware boots
   without an NVRAM entry (an uploaded disk has none).

A hybrid disk gets both. For UEFI the core image is small and loads its modules from the
root file system, as for BIOS, rather than being a standalone image carrying them all: one
grub.cfg and one module directory per platform, all from the same GRUB build, and the ESP
holds a single ~200 KiB file that never needs to change when grub.cfg does.

`grub-bios-setup` writes to the image *file* through a device map `(hd0) IMAGE`, but
before it does anything it insists that the directory holding `boot.img` and `core.img`
lies on a block device GRUB can open (it "guesses the root device" from that directory's
mount, even though the result is not written anywhere). A directory on the build host's
disk fails in containers (`/dev/vda` opens with EPERM) and would make the result depend on
the host, so `install_bios` attaches the image's root partition read-only to a loop device,
mounts it read-only and points `grub-bios-setup` at the staged files there. The file
system stays exactly as mkfs made it.

Modules and core images must come from the same GRUB build; both come from `grub_lib`
(`efi_lib`). No Secure Boot: the EFI image is unsigned, so Azure generation 2 VMs need the
"Standard" security type (or Trusted Launch with Secure Boot off).
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

from archkernel.errors import UserError
from archkernel.host.files import temporary_directory, write_text
from archkernel.host.mounts import loop_device, mounted
from archkernel.host.run import check_tools, package_hint, run, which
from archkernel.image import esp
from archkernel.image.disk import SECTOR, Layout, fs_type, fs_uuid, read_ext4_file, read_partitions

GRUB_I386_PC = Path("/usr/lib/grub/i386-pc")
GRUB_X86_64_EFI = Path("/usr/lib/grub/x86_64-efi")
# Where the staged files live inside the root tree, and GRUB's prefix at boot.
PREFIX = "/boot/grub"
# What core.img needs to find and read /boot/grub on the root file system; everything else
# is loaded from there on demand (command.lst says which module holds which command).
CORE_MODULES = ("biosdisk", "part_gpt", "part_msdos", "ext2", "search")
# The same for UEFI; the firmware's disk access (efidisk) is part of GRUB's EFI kernel.
EFI_CORE_MODULES = ("part_gpt", "part_msdos", "ext2", "search")
# The EFI core image in the root tree, beside its modules (where grub-install puts it).
EFI_CORE = "core.efi"
_EFI_HINT = "install 'grub' on Arch Linux or 'grub-efi-amd64-bin' on Debian/Ubuntu"

# Characters that need no quoting in a GRUB script word.
_PLAIN_WORD = re.compile(r"[A-Za-z0-9_./:=,+@%^-]+")


def canonical_uuid(value: str) -> str:
    """`value` as a lower-case hyphenated UUID; UserError if it is not one."""
    try:
        return str(uuid.UUID(value))
    except ValueError as exc:
        raise UserError(
            f"{value!r} is not a UUID", "use the form 8-4-4-4-12 hex digits, e.g. from uuidgen"
        ) from exc


def grub_word(word: str) -> str:
    """`word` quoted for a GRUB script, if it needs it (single quotes, like sh)."""
    if _PLAIN_WORD.fullmatch(word):
        return word
    return "'" + word.replace("'", "'\\''") + "'"


def _boot_path(value: str, what: str) -> str:
    if not value.startswith("/") or any(c.isspace() or c in "'\"\\$;" for c in value):
        raise UserError(
            f"the {what} path {value!r} is not a plain absolute path",
            f"give the {what} as a path inside the root file system, e.g. /boot/vmlinuz-linux",
        )
    return value


def grub_cfg(root_uuid: str, kernel: str, initrd: str, cmdline: str, *, timeout: int = 1) -> str:
    """The text of /boot/grub/grub.cfg: one entry booting `kernel` from the root file system.

    Input and output go to the serial port as well as the screen: the serial console is
    what Azure's boot diagnostics and serial console show.
    """
    fs = canonical_uuid(root_uuid)
    if "\n" in cmdline:
        raise UserError("the kernel command line has a line break", "give it on one line")
    args = " ".join(grub_word(w) for w in [f"root=UUID={fs}", "rw", *cmdline.split()])
    return "\n".join(
        [
            "# Written by archkernel; the build host's GRUB was installed with this file.",
            "serial --unit=0 --speed=115200",
            "terminal_input serial console",
            "terminal_output serial console",
            f"set timeout={int(timeout)}",
            "set default=0",
            f"search --no-floppy --fs-uuid --set=root {fs}",
            "",
            "menuentry 'Arch Linux' {",
            f"\tlinux {_boot_path(kernel, 'kernel')} {args}",
            f"\tinitrd {_boot_path(initrd, 'initrd')}",
            "}",
            "",
        ]
    )


def early_cfg(root_uuid: str) -> str:
    """The config built into core.img: find the root file system, load the rest from it."""
    fs = canonical_uuid(root_uuid)
    return f"search --no-floppy --fs-uuid --set=root {fs}\nset prefix=($root){PREFIX}\n"


def _mkimage_argv(
    platform: str, modules: tuple[str, ...], grub_lib: Path, output: Path, early_config: Path
) -> list[str]:
    argv = ["grub-mkimage", "--format", platform, "--directory", os.fspath(grub_lib)]
    argv += ["--output", os.fspath(output), "--config", os.fspath(early_config)]
    return [*argv, "--prefix", PREFIX, *modules]


def mkimage_argv(grub_lib: Path, output: Path, early_config: Path) -> list[str]:
    """The grub-mkimage command that builds an i386-pc core.img."""
    return _mkimage_argv("i386-pc", CORE_MODULES, grub_lib, output, early_config)


def efi_mkimage_argv(efi_lib: Path, output: Path, early_config: Path) -> list[str]:
    """The grub-mkimage command that builds an x86_64-efi core image (a PE executable)."""
    return _mkimage_argv("x86_64-efi", EFI_CORE_MODULES, efi_lib, output, early_config)


def device_map(image: Path) -> str:
    """A GRUB device map that makes the image file GRUB's first hard disk."""
    return f"(hd0) {os.path.realpath(image)}\n"


def bios_setup_argv(tool: Path, grub_dir: Path, map_file: Path, image: Path) -> list[str]:
    """The grub-bios-setup command that writes boot.img and core.img from `grub_dir`."""
    argv = [os.fspath(tool), "--directory", os.fspath(grub_dir)]
    return [*argv, "--device-map", os.fspath(map_file), os.path.realpath(image)]


def bios_setup_tool(grub_lib: Path = GRUB_I386_PC) -> Path:
    """Where grub-bios-setup is: on PATH (Arch) or beside the modules (Debian).

    Asked through run.which, so inside a build environment (archkernel.azure.buildenv) it is
    the environment's, found on its PATH or beside its modules."""
    found = which("grub-bios-setup")
    if found:
        return Path(found)
    beside = Path(grub_lib) / "grub-bios-setup"
    if os.access(beside, os.X_OK):
        return beside
    raise UserError("command not found: grub-bios-setup", package_hint("grub-install"))


def _check_grub_lib(grub_lib: Path, platform: str, needed: tuple[str, ...], hint: str) -> None:
    missing = [n for n in needed if not (grub_lib / n).is_file()]
    if missing:
        raise UserError(
            f"{grub_lib} is not a GRUB {platform} directory (no {', '.join(missing)})", hint
        )


def check_platforms(
    boot: str, *, bios_lib: Path = GRUB_I386_PC, efi_lib: Path = GRUB_X86_64_EFI
) -> None:
    """UserError unless GRUB's files for the firmware `boot` are there: the i386-pc
    directory and grub-bios-setup (bios, hybrid), the x86_64-efi directory (uefi, hybrid).
    What a build checks before it starts, so a missing package fails it at once."""
    if boot in ("bios", "hybrid"):
        needed = ("kernel.img", "boot.img", "moddep.lst")
        _check_grub_lib(Path(bios_lib), "i386-pc", needed, package_hint("grub-install"))
        bios_setup_tool(bios_lib)
    if boot in ("uefi", "hybrid"):
        _check_grub_lib(Path(efi_lib), "x86_64-efi", ("kernel.img", "moddep.lst"), _EFI_HINT)


def _stage(
    dest: Path, grub_lib: Path, extra: tuple[str, ...], build: list[str], cfg_text: str
) -> Path:
    """Copy `grub_lib`'s modules (and `extra` files) to `dest` (ROOT/boot/grub/PLATFORM),
    run the grub-mkimage command `build`, write grub.cfg beside `dest`; returns `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for source in sorted(grub_lib.iterdir()):
        if source.suffix in (".mod", ".lst") or source.name in extra:
            shutil.copyfile(source, dest / source.name)
            os.chmod(dest / source.name, 0o644)
    run(build)
    write_text(dest.parent / "grub.cfg", cfg_text)
    return dest


def stage_bios_files(rootdir: Path, grub_lib: Path, cfg_text: str, *, root_uuid: str) -> Path:
    """Put GRUB's i386-pc files, a core.img for `root_uuid` and grub.cfg into `rootdir`.

    Run before the root file system is made, with the UUID it will be made with. Returns
    the directory `ROOT/boot/grub/i386-pc`.
    """
    grub_lib = Path(grub_lib)
    needed = ("kernel.img", "boot.img", "moddep.lst")
    _check_grub_lib(grub_lib, "i386-pc", needed, package_hint("grub-install"))
    check_tools(["grub-mkimage"], "installing GRUB")
    dest = Path(rootdir) / PREFIX.lstrip("/") / "i386-pc"
    with temporary_directory(prefix="archkernel-grub-") as tmp:
        config = write_text(tmp / "early.cfg", early_cfg(root_uuid))
        build = mkimage_argv(grub_lib, dest / "core.img", config)
        return _stage(dest, grub_lib, ("boot.img",), build, cfg_text)


def stage_efi_files(rootdir: Path, efi_lib: Path, cfg_text: str, *, root_uuid: str) -> Path:
    """Put GRUB's x86_64-efi modules, a core.efi for `root_uuid` and grub.cfg into `rootdir`.

    Run before the root file system is made, with the UUID it will be made with;
    `install_efi` later copies core.efi to the ESP. Returns `ROOT/boot/grub/x86_64-efi`.
    """
    efi_lib = Path(efi_lib)
    _check_grub_lib(efi_lib, "x86_64-efi", ("kernel.img", "moddep.lst"), _EFI_HINT)
    check_tools(["grub-mkimage"], "installing GRUB")
    dest = Path(rootdir) / PREFIX.lstrip("/") / "x86_64-efi"
    with temporary_directory(prefix="archkernel-grub-") as tmp:
        config = write_text(tmp / "early.cfg", early_cfg(root_uuid))
        build = efi_mkimage_argv(efi_lib, dest / EFI_CORE, config)
        return _stage(dest, efi_lib, (), build, cfg_text)


def stage_grub_files(
    rootdir: Path,
    boot: str,
    cfg_text: str,
    *,
    root_uuid: str,
    bios_lib: Path = GRUB_I386_PC,
    efi_lib: Path = GRUB_X86_64_EFI,
) -> list[Path]:
    """Stage what the firmware `boot` ('bios', 'uefi' or 'hybrid'; `layout.boot` of the disk
    it goes on) needs into `rootdir`: `stage_bios_files`, `stage_efi_files` or both.
    Returns the module directories."""
    staged = []
    if boot in ("bios", "hybrid"):
        staged.append(stage_bios_files(rootdir, bios_lib, cfg_text, root_uuid=root_uuid))
    if boot in ("uefi", "hybrid"):
        staged.append(stage_efi_files(rootdir, efi_lib, cfg_text, root_uuid=root_uuid))
    if not staged:
        raise UserError(f"unknown boot mode {boot!r}", "use 'bios', 'uefi' or 'hybrid'")
    return staged


def install_bios(
    image: Path, layout: Layout, *, root_uuid: str, grub_lib: Path = GRUB_I386_PC
) -> None:
    """Write GRUB's boot.img and core.img (staged by `stage_bios_files`) into `image`.

    `root_uuid` is the UUID core.img was built for; the root file system must have it, or
    the machine would stop at `grub rescue>`.
    """
    if not layout.boots_bios:
        raise UserError(
            f"the {layout.boot} layout of {image} has no place for BIOS boot code",
            "plan the disk with boot='bios' or 'hybrid'",
        )
    tool = bios_setup_tool(grub_lib)
    root = layout.root
    _check_root_uuid(image, layout, root_uuid)
    with temporary_directory(prefix="archkernel-grub-") as tmp:
        map_file = write_text(tmp / "device.map", device_map(image))
        with (
            loop_device(image, offset=root.start, sizelimit=root.size, read_only=True) as dev,
            mounted(dev, tmp / "root", fstype="ext4", options=("ro",)) as mnt,
        ):
            grub_dir = mnt / PREFIX.lstrip("/") / "i386-pc"
            missing = [n for n in ("boot.img", "core.img") if not (grub_dir / n).is_file()]
            if missing:
                raise UserError(
                    f"the root file system of {image} has no {PREFIX}/i386-pc/"
                    f"{' or '.join(missing)}",
                    "stage GRUB's files into the root tree before making the file system",
                )
            run(bios_setup_argv(tool, grub_dir, map_file, image))
    _check_table_kept(image, layout)
    _check_boot_code(image)


def _check_root_uuid(image: Path, layout: Layout, root_uuid: str) -> None:
    found = fs_uuid(image, layout.root)
    if found.lower() != canonical_uuid(root_uuid):
        raise UserError(
            f"the root file system of {image} has UUID {found}, but GRUB was staged for "
            f"{root_uuid}",
            "make the file system with the UUID given when GRUB's files were staged",
        )


def install_efi(image: Path, layout: Layout, *, root_uuid: str) -> None:
    """Copy the core.efi staged by `stage_efi_files` to the ESP of `image` as
    EFI/BOOT/BOOTX64.EFI.

    core.efi is read back from the root file system (debugfs, no mount), so the ESP gets
    exactly the build of the modules beside it. The ESP must already hold a FAT
    (`esp.make_fat`); other files on it are kept, an earlier BOOTX64.EFI is replaced.
    """
    if not layout.boots_uefi:
        raise UserError(
            f"the {layout.boot} layout of {image} has no EFI system partition",
            "plan the disk with boot='uefi' or 'hybrid'",
        )
    _check_root_uuid(image, layout, root_uuid)
    part = layout.esp
    found = fs_type(image, part)
    if found != "vfat":
        raise UserError(
            f"the EFI system partition of {image} holds "
            f"{'no file system' if found is None else f'a {found} file system'}, not FAT",
            "make it with esp.make_fat after creating the disk",
        )
    staged = f"{PREFIX}/x86_64-efi/{EFI_CORE}"
    try:
        core = read_ext4_file(image, layout.root, staged)
    except UserError as exc:
        raise UserError(
            f"the root file system of {image} has no {staged}",
            "stage GRUB's EFI files into the root tree before making the file system",
        ) from exc
    with temporary_directory(prefix="archkernel-grub-") as tmp:
        source = tmp / "BOOTX64.EFI"
        source.write_bytes(core)
        esp.add_files(image, part, {esp.REMOVABLE_PATH_X64: source})
    if esp.read_file(image, part, esp.REMOVABLE_PATH_X64) != core:
        raise UserError(
            f"{esp.REMOVABLE_PATH_X64} on the ESP of {image} differs from {staged}",
            "run the boot loader step again with -v to see mcopy's output",
        )
    _check_table_kept(image, layout)


def install_grub(
    image: Path, layout: Layout, *, root_uuid: str, bios_lib: Path = GRUB_I386_PC
) -> list[str]:
    """Install what the firmware of `layout` boots: `install_bios` for bios, `install_efi`
    for uefi, both for hybrid. Returns the GRUB platforms installed."""
    done = []
    if layout.boots_bios:
        install_bios(image, layout, root_uuid=root_uuid, grub_lib=bios_lib)
        done.append("i386-pc")
    if layout.boots_uefi:
        install_efi(image, layout, root_uuid=root_uuid)
        done.append("x86_64-efi")
    return done


def _check_table_kept(image: Path, layout: Layout) -> None:
    written = [(p["start"], p["size"]) for p in read_partitions(image)]
    planned = [(p.start // SECTOR, p.size // SECTOR) for p in layout.partitions]
    if written != planned:
        raise UserError(
            f"installing GRUB changed the partition table of {image}",
            "report this together with `grub-install --version`",
        )


def _check_boot_code(image: Path) -> None:
    with open(image, "rb") as f:
        mbr = f.read(SECTOR)
    if mbr[510:] != b"\x55\xaa" or not any(mbr[:440]):
        raise UserError(
            f"{image} has no boot code in its MBR after grub-bios-setup",
            "run the GRUB step again with -v to see grub-bios-setup's output",
        )
