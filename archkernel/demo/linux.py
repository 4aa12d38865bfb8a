"""The offline repository's `linux` package: Debian's kernel and modules in Arch's layout.

Debian's amd64 kernel (`archkernel.demo.debian`) with a few big driver trees left out and
depmod run anew, at `/usr/lib/modules/<release>/` with `vmlinuz` and `pkgbase` beside the
modules and `/boot/vmlinuz-linux`, as Arch's `linux` package has them. Unpacking and
compressing the modules is the slow part of the repository, so the package is kept in the
download cache, once per kernel and recipe.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import struct
from pathlib import Path

from archkernel.demo.debian import locked, tree_identity
from archkernel.demo.package import Package, Staging, sanitize_pkgver, write_package
from archkernel.demo.standins import FILES, recipe_digest
from archkernel.errors import UserError
from archkernel.host.files import atomic_path, remove_path, write_text
from archkernel.host.run import run
from archkernel.log import complete_step

# Parts of Debian's module tree no test image needs (about 180 MiB of 400).
PRUNED_MODULE_DIRS = (
    "kernel/drivers/gpu",
    "kernel/sound",
    "kernel/drivers/media",
    "kernel/drivers/infiniband",
    "kernel/drivers/net/wireless",
    "kernel/net/wireless",
    "kernel/net/mac80211",
    "kernel/drivers/staging",
    "kernel/drivers/iio",
    "kernel/drivers/comedi",
    "kernel/drivers/isdn",
    "kernel/drivers/bluetooth",
    "kernel/net/bluetooth",
)
# What depmod reads from Debian's module directory (the rest it writes anew).
DEPMOD_INPUTS = ("modules.order", "modules.builtin", "modules.builtin.modinfo")


def kernel_banner(vmlinuz: Path) -> str:
    """The version string in an x86 bzImage's setup header ("6.1.0-56-amd64 (...) #1 ...")."""
    with open(vmlinuz, "rb") as f:
        head = f.read(0x8000)
    if head[0x202:0x206] != b"HdrS":
        raise UserError(f"{vmlinuz} is not an x86 bzImage", "check the Debian kernel package")
    (offset,) = struct.unpack_from("<H", head, 0x20E)
    start = offset + 0x200
    return head[start : head.index(b"\0", start)].decode("ascii", "replace")


def linux_pkgver(banner: str, release: str) -> str:
    """pkgver of the linux package: Debian's package version from the banner, else `release`."""
    m = re.search(r"\bDebian (\S+)", banner)
    return sanitize_pkgver(m.group(1) if m else release)


def stage_linux(s: Staging, tree: Path) -> tuple[Package, str]:
    """Stage Debian's kernel from the unpacked tree `tree`; return the package and release."""
    moddirs = [
        p
        for base in (tree / "lib/modules", tree / "usr/lib/modules")
        if base.is_dir()
        for p in base.iterdir()
        if p.is_dir()
    ]
    if len(moddirs) != 1:
        raise UserError(f"expected one kernel module directory in {tree}, found {moddirs}")
    release = moddirs[0].name
    vmlinuz = tree / "boot" / f"vmlinuz-{release}"
    dest = s.root / "usr/lib/modules" / release

    def ignore(directory: str, names: list[str]) -> list[str]:
        rel = os.path.relpath(directory, moddirs[0])
        skipped = [n for n in names if os.path.normpath(f"{rel}/{n}") in PRUNED_MODULE_DIRS]
        # depmod's output of the full tree is stale once directories are pruned.
        if rel == ".":
            skipped += [n for n in names if n.startswith("modules.") and n not in DEPMOD_INPUTS]
        return skipped

    shutil.copytree(moddirs[0], dest, symlinks=True, ignore=ignore)
    for name in ("build", "source"):
        remove_path(dest / name)
    shutil.copy2(vmlinuz, dest / "vmlinuz")
    s.dirs("boot")
    shutil.copy2(vmlinuz, s.root / "boot/vmlinuz-linux")
    s.write(f"usr/lib/modules/{release}/pkgbase", "linux\n")
    # depmod -b ROOT reads ROOT/lib/modules: point it at usr/lib for the run only.
    (s.root / "lib").symlink_to("usr/lib")
    try:
        run(["depmod", "-b", s.root, release])
    finally:
        (s.root / "lib").unlink()
    s.copy_files(FILES / "linux")
    version = f"{linux_pkgver(kernel_banner(vmlinuz), release)}-1"
    pkg = Package(
        "linux",
        version,
        f"Debian's {release} kernel and modules in Arch's layout (archkernel tests)",
        depends=("filesystem", "initramfs"),
        backup=("etc/mkinitcpio.d/linux.preset",),
        license="GPL2",
    )
    return pkg, release


def linux_package(cache: Path, tree: Path, work: Path) -> tuple[Path, Package, str]:
    """The linux package, built once per kernel and recipe and kept in the cache."""
    key = recipe_digest("linux", tree_identity(tree))[:16]
    store = cache / "offline-packages"
    slot = store / key
    with locked(store / ".lock"):
        meta = slot / "package.json"
        if meta.is_file():
            data = json.loads(meta.read_text())
            pkg = Package.from_json(data["package"])
            return slot / pkg.filename, pkg, str(data["release"])
        with complete_step("Building the linux package from Debian's kernel"):
            staging = Staging(work / "linux")
            staging.root.mkdir()
            pkg, release = stage_linux(staging, tree)
            with atomic_path(slot) as tmp:
                tmp.mkdir()
                write_package(pkg, staging, tmp, work)
                data = {"package": dataclasses.asdict(pkg), "release": release}
                write_text(tmp / "package.json", json.dumps(data, indent=1) + "\n")
            remove_path(staging.root)
        for old in store.iterdir():
            if old.is_dir() and old.name != key:
                remove_path(old)
    return slot / pkg.filename, pkg, release
