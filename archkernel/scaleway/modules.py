"""Which of the Arch kernel's modules go into the initrd, and what the added archive holds.

The kernel version names the module directory (`/usr/lib/modules/<version>`); the
modules are the settings' names and their dependencies in `modprobe` order (see
`archkernel.formats.kmod`); the manifest (modules.json) records them for the pack step.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from archkernel.errors import UserError
from archkernel.scaleway.scripts import MODULE_DIR

if TYPE_CHECKING:
    from archkernel.formats import cpio


@dataclass(frozen=True)
class Selection:
    """The modules to load: paths relative to the module directory, in insmod order."""

    moddir: Path
    version: str
    order: tuple[str, ...]
    missing: tuple[str, ...]  # optional names this kernel does not have
    notes: tuple[str, ...] = ()  # required modules the kernel config builds in

    @property
    def names(self) -> list[str]:
        """The modules' names (`virtio_net`), in order."""
        from archkernel.formats import kmod

        return [kmod.module_name(relpath) for relpath in self.order]


def select(
    moddir: Path,
    version: str,
    required: Sequence[str],
    optional: Sequence[str],
    config: Mapping[str, str] | None = None,
) -> Selection:
    """The modules `required` and `optional` need from the tree `moddir`, with their
    dependencies. A missing required module is a UserError (saying what the kernel
    `config` says about it, else naming the closest ones), unless the config builds it
    in; a NIC driver the config (or the tree) has as a module that the closure lacks is a
    UserError too (`archkernel.scaleway.kconfig`)."""
    from archkernel.formats import kmod
    from archkernel.scaleway import kconfig

    index = kmod.ModulesDep.load(moddir)
    notes: list[str] = []
    wanted: list[str] = []
    for name in required:
        why = None if index.lookup(name) else kconfig.why_missing(name, config)
        if why is None:
            wanted.append(name)
        elif why.startswith("built in"):
            notes.append(f"module {name} is {why}: nothing to load")
        else:
            raise UserError(
                f"module '{name}' is not in {version}'s modules.dep: {why}",
                "choose a kernel that builds it, or remove it from scaleway.modules"
                if "does not build" in why
                else "reinstall the kernel package; its module tree is incomplete",
            )
    order, missing = index.resolve(wanted, optional)
    modular = set(index.names())
    loaded = [kmod.module_name(path) for path in order]
    found = kconfig.problems(
        loaded + [n for n in wanted if index.is_builtin(n)],
        config,
        is_module=lambda m: m in modular,
        is_builtin=index.is_builtin,
    )
    if found:
        raise kconfig.error(found, config, f"kernel {version}")
    return Selection(moddir, version, tuple(order), tuple(missing), tuple(notes))


def manifest(version: str, modules: Sequence[dict[str, Any]]) -> bytes:
    """modules.json: the kernel version and each module's name, path, size and the
    parameters its insmod gets."""
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
