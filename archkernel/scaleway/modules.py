"""Which of the Arch kernel's modules go into the initrd, and what the added archive holds.

The kernel version names the module directory (`/usr/lib/modules/<version>`); the
modules are the settings' names and their dependencies in `modprobe` order (see
`archkernel.formats.kmod`); the manifest (modules.json) records them for the pack step.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from archkernel.errors import UserError
from archkernel.scaleway.scripts import MODULE_DIR

if TYPE_CHECKING:
    from archkernel.formats import cpio


def find_kernel_version(moddirs: Path, kernel: Path, configured: str | None) -> str:
    """The module directory version for `kernel`: the setting, else the one with pkgbase.

    Several Arch kernels installed and no way to tell which is `kernel` is an error that
    lists them.
    """
    if configured:
        if not (moddirs / configured).is_dir():
            raise UserError(
                f"kernel_version {configured!r}: {moddirs / configured} does not exist",
                "set scaleway.kernel_version to one of the directories there, or remove it",
            )
        return configured
    candidates = sorted(p.parent.name for p in moddirs.glob("*/pkgbase"))
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise UserError(
            f"no Arch kernel found: no {moddirs}/*/pkgbase",
            "install the Arch kernel package (e.g. linux-armv7), or set scaleway.kernel_version",
        )
    # Several: the one shipping a copy of the kernel we boot.
    size = kernel.stat().st_size
    same = [
        v
        for v in candidates
        for image in ("vmlinuz", "zImage")
        if (moddirs / v / image).is_file()
        and (moddirs / v / image).stat().st_size == size
        and (moddirs / v / image).read_bytes() == kernel.read_bytes()
    ]
    if len(same) == 1:
        return same[0]
    raise UserError(
        f"several kernels are installed ({', '.join(candidates)}) and none is known to be {kernel}",
        "set scaleway.kernel_version to the one to boot",
    )


@dataclass(frozen=True)
class Selection:
    """The modules to load: paths relative to the module directory, in insmod order."""

    moddir: Path
    version: str
    order: tuple[str, ...]
    missing: tuple[str, ...]  # optional names this kernel does not have

    @property
    def names(self) -> list[str]:
        """The modules' names (`virtio_net`), in order."""
        from archkernel.formats import kmod

        return [kmod.module_name(relpath) for relpath in self.order]


def select(
    moddir: Path, version: str, required: Sequence[str], optional: Sequence[str]
) -> Selection:
    """The modules `required` and `optional` need from the tree `moddir`, with their
    dependencies; a missing required module is a UserError naming the closest ones."""
    from archkernel.formats import kmod

    order, missing = kmod.ModulesDep.load(moddir).resolve(required, optional)
    return Selection(moddir, version, tuple(order), tuple(missing))


def manifest(version: str, modules: Sequence[dict[str, Any]]) -> bytes:
    """modules.json: the kernel version and each module's name, path and size."""
    return json.dumps({"version": version, "modules": list(modules)}, indent=2).encode() + b"\n"


def archive_entries(
    init: bytes, original_init: bytes, modules: Sequence[tuple[str, bytes]]
) -> list[cpio.Entry]:
    """What the appended archive holds: /init, the provider's as /init.scw, the modules
    (`(name, decompressed object)` each) under MODULE_DIR."""
    from archkernel.formats import cpio

    entries = [
        cpio.Entry.file("init", init, mode=0o755),
        cpio.Entry.file("init.scw", original_init, mode=0o755),
        cpio.Entry.directory("archkernel"),
        cpio.Entry.directory(MODULE_DIR),
    ]
    for name, data in modules:
        entries.append(cpio.Entry.file(f"{MODULE_DIR}/{name}.ko", data, mode=0o644))
    return entries
