"""GRUB for BIOS (i386-pc) and UEFI (x86_64-efi) boot of a disk image, from the build host.

Like mkosi's tools tree, the boot loader comes from the machine that builds the image, not
from the image, so nothing runs inside the image. It happens in two acts:

1. Here, *before* the root file system is made (`stage_ops`, `stage_grub_files`): copy the
   host's modules into `ROOT/boot/grub/i386-pc` or `ROOT/boot/grub/x86_64-efi`, build the
   core image there with `grub-mkimage` (`core.img`, `core.efi`; its early config finds
   the root file system by UUID, which we choose before mkfs, and sets the prefix to
   `/boot/grub` on it); `cfg_op` writes `ROOT/boot/grub/grub.cfg`, the one configuration
   both firmwares end up in. `mkfs.ext4 -d` then carries them in.
2. archkernel.image.grub_install, after mkfs: boot code and core.img for BIOS, core.efi at
   the ESP's removable path for UEFI.

A hybrid disk gets both. For UEFI the core image is small and loads its modules from the
root file system, as for BIOS, rather than being a standalone image carrying them all: one
grub.cfg and one module directory per platform, all from the same GRUB build, and the ESP
holds a single ~200 KiB file that never needs to change when grub.cfg does.

The texts (`grub_cfg`, `early_cfg`) and commands (`*_argv`) are decided here, purely;
`stage_ops` are the operations of a plan (archkernel.plan) that the disk step puts into its
own, and `stage_grub_files` carries them out at once.

Modules and core images must come from the same GRUB build; both come from `grub_lib`
(`efi_lib`). No Secure Boot: the EFI image is unsigned, so Azure generation 2 VMs need the
"Standard" security type (or Trusted Launch with Secure Boot off).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from archkernel.errors import UserError
from archkernel.host.files import temporary_directory, write_text
from archkernel.host.run import check_tools, package_hint, which
from archkernel.plan import Do, Op, Plan, Run, execute

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


# --- staging, before the root file system is made ----------------------------------------------

# platform -> (files the GRUB directory must have, files to copy besides *.mod and *.lst, hint)
_PLATFORMS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "i386-pc": (("kernel.img", "boot.img", "moddep.lst"), ("boot.img",), ""),
    "x86_64-efi": (("kernel.img", "moddep.lst"), (), _EFI_HINT),
}


def platforms(boot: str) -> list[str]:
    """The GRUB platforms the firmware `boot` ('bios', 'uefi' or 'hybrid') needs."""
    found = {"bios": ["i386-pc"], "uefi": ["x86_64-efi"], "hybrid": ["i386-pc", "x86_64-efi"]}
    if boot not in found:
        raise UserError(f"unknown boot mode {boot!r}", "use 'bios', 'uefi' or 'hybrid'")
    return found[boot]


def staged_dir(rootdir: Path, platform: str) -> Path:
    """Where the files of `platform` go in the root tree: `ROOT/boot/grub/PLATFORM`."""
    return Path(rootdir) / PREFIX.lstrip("/") / platform


def _copy_modules(platform: str, grub_lib: Path, dest: Path) -> None:
    needed, extra, hint = _PLATFORMS[platform]
    _check_grub_lib(grub_lib, platform, needed, hint or package_hint("grub-install"))
    check_tools(["grub-mkimage"], "installing GRUB")
    dest.mkdir(parents=True, exist_ok=True)
    for source in sorted(grub_lib.iterdir()):
        if source.suffix in (".mod", ".lst") or source.name in extra:
            shutil.copyfile(source, dest / source.name)
            os.chmod(dest / source.name, 0o644)


def _write_early_cfg(path: Path, root_uuid: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, early_cfg(root_uuid))


def stage_ops(
    rootdir: Path,
    boot: str,
    *,
    root_uuid: str,
    scratch: Path,
    bios_lib: Path = GRUB_I386_PC,
    efi_lib: Path = GRUB_X86_64_EFI,
) -> list[Op]:
    """Put what the firmware `boot` needs into `rootdir`: for each platform GRUB's modules
    and a core image for `root_uuid` (its early config is written to `scratch`).

    Done before the root file system is made, with the UUID it will be made with; `cfg_op`
    writes grub.cfg beside them.
    """
    early = Path(scratch) / "early.cfg"
    ops: list[Op] = [
        Do(
            f"write {early}: find the root file system by UUID {root_uuid}, load the rest "
            f"from {PREFIX} on it",
            lambda: _write_early_cfg(early, root_uuid),
        )
    ]
    for platform in platforms(boot):
        dest = staged_dir(rootdir, platform)
        grub_lib = Path(bios_lib if platform == "i386-pc" else efi_lib)
        build = (
            mkimage_argv(grub_lib, dest / "core.img", early)
            if platform == "i386-pc"
            else efi_mkimage_argv(grub_lib, dest / EFI_CORE, early)
        )
        ops += [
            Do(
                f"copy GRUB's {platform} modules from {grub_lib} to {dest}",
                functools.partial(_copy_modules, platform, grub_lib, dest),
            ),
            Run.of(build),
        ]
    return ops


def cfg_op(rootdir: Path, text: Callable[[], str], what: str = "") -> Do:
    """Write ROOT/boot/grub/grub.cfg: `text()` (made when it runs, so a plan can show it
    before the values it needs exist; `what` sums it up for a dry run)."""
    path = Path(rootdir) / PREFIX.lstrip("/") / "grub.cfg"
    return Do(f"write {path}" + (f": {what}" if what else ""), lambda: write_text(path, text()))


def stage_grub_files(
    rootdir: Path,
    boot: str,
    cfg_text: str,
    *,
    root_uuid: str,
    bios_lib: Path = GRUB_I386_PC,
    efi_lib: Path = GRUB_X86_64_EFI,
) -> list[Path]:
    """Carry out `stage_ops` and `cfg_op` for the firmware `boot` (`layout.boot` of the
    disk it goes on). Returns the module directories."""
    dirs = [staged_dir(rootdir, platform) for platform in platforms(boot)]
    with temporary_directory(prefix="archkernel-grub-") as tmp:
        ops = stage_ops(
            rootdir, boot, root_uuid=root_uuid, scratch=tmp, bios_lib=bios_lib, efi_lib=efi_lib
        )
        execute(Plan([*ops, cfg_op(rootdir, lambda: cfg_text)]))
    return dirs


def stage_bios_files(rootdir: Path, grub_lib: Path, cfg_text: str, *, root_uuid: str) -> Path:
    """`stage_grub_files` for BIOS: GRUB's i386-pc files, a core.img for `root_uuid` and
    grub.cfg. Returns the directory `ROOT/boot/grub/i386-pc`."""
    (dest,) = stage_grub_files(rootdir, "bios", cfg_text, root_uuid=root_uuid, bios_lib=grub_lib)
    return dest


def stage_efi_files(rootdir: Path, efi_lib: Path, cfg_text: str, *, root_uuid: str) -> Path:
    """`stage_grub_files` for UEFI: GRUB's x86_64-efi modules, a core.efi for `root_uuid`
    and grub.cfg. Returns `ROOT/boot/grub/x86_64-efi`."""
    (dest,) = stage_grub_files(rootdir, "uefi", cfg_text, root_uuid=root_uuid, efi_lib=efi_lib)
    return dest
