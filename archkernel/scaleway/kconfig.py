"""The drivers a NIC needs that modules.dep does not name, read against the kernel config.

modules.dep lists the modules whose symbols a module uses, not the drivers it needs at run
time: `mvneta` talks to its PHY through the `mvmdio` bus driver and the Marvell PHY
driver, a virtio NIC needs a virtio transport (`virtio_pci`, `virtio_mmio`). One kernel
builds them in (Arch Linux ARM's `linux-armv7`: MVMDIO, MARVELL_PHY and PHYLIB are `=y`),
another builds them as modules (Debian's armmp: `mvmdio` is `=m`), and then the NIC comes
up without its PHY: no network, and on a C1 no root. `COMPANIONS` names them.

`problems` decides, from the kernel config (`CONFIG_*=y|m`, read from
`usr/lib/modules/<version>/build/.config` or a `config` beside it when present) and the
module index, which companion is modular yet not loaded. That is an error (the step
stops, the server keeps the provider's kernel, nothing is lost), whose hint names the
module to add to `scaleway.modules`. A module of `modules` that the tree lacks is an error
too; the config says why (not built, or built in).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from archkernel.errors import UserError

MAX_CONFIG = 4 * 1024 * 1024  # a distribution kernel's .config is about 250 KiB
# Where an Arch kernel's config is: the headers package's build/.config, a `config` file.
CONFIG_FILES = ("build/.config", "config")

# module -> groups of (config symbol, module); each group needs one of its drivers.
COMPANIONS: dict[str, tuple[tuple[tuple[str, str], ...], ...]] = {
    "mvneta": (
        (("CONFIG_MVMDIO", "mvmdio"),),
        (("CONFIG_MARVELL_PHY", "marvell"),),
        (("CONFIG_PHYLIB", "libphy"),),
    ),
    "virtio_net": ((("CONFIG_VIRTIO_PCI", "virtio_pci"), ("CONFIG_VIRTIO_MMIO", "virtio_mmio")),),
    "virtio_blk": ((("CONFIG_VIRTIO_PCI", "virtio_pci"), ("CONFIG_VIRTIO_MMIO", "virtio_mmio")),),
}
# The config symbol of the modules the settings name, to say why one is missing.
SYMBOLS = {
    "mvneta": "CONFIG_MVNETA",
    "mvneta_bm": "CONFIG_MVNETA_BM_ENABLE",
    "nbd": "CONFIG_BLK_DEV_NBD",
    "phylink": "CONFIG_PHYLINK",
    "mvmdio": "CONFIG_MVMDIO",
    "marvell": "CONFIG_MARVELL_PHY",
    "libphy": "CONFIG_PHYLIB",
    "virtio_net": "CONFIG_VIRTIO_NET",
    "virtio_blk": "CONFIG_VIRTIO_BLK",
    "virtio_pci": "CONFIG_VIRTIO_PCI",
    "virtio_mmio": "CONFIG_VIRTIO_MMIO",
    "igb": "CONFIG_IGB",
}
_LINE = re.compile(r"(CONFIG_[A-Za-z0-9_]+)=(.*)")
_UNSET = re.compile(r"# (CONFIG_[A-Za-z0-9_]+) is not set")


def parse_config(text: str) -> dict[str, str]:
    """`{"CONFIG_MVMDIO": "y", "CONFIG_MVNETA": "m", "CONFIG_X": "n", ...}` of a .config."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if m := _LINE.fullmatch(line):
            values[m.group(1)] = m.group(2)
        elif m := _UNSET.fullmatch(line):
            values[m.group(1)] = "n"
    return values


def read_config(moddir: Path) -> tuple[Path, dict[str, str]] | None:
    """The kernel config kept with the module directory, if there is one."""
    for name in CONFIG_FILES:
        path = moddir / name
        if path.is_file():
            with path.open("rb") as handle:
                data = handle.read(MAX_CONFIG + 1)
            if len(data) > MAX_CONFIG:
                raise UserError(
                    f"kernel config {path} is larger than {MAX_CONFIG} bytes",
                    "a real one is far smaller; check the kernel's headers package",
                )
            return path, parse_config(data.decode("utf-8", errors="replace"))
    return None


def state(symbol: str, config: Mapping[str, str] | None) -> str:
    """`CONFIG_X=m`, `# CONFIG_X is not set`, or `CONFIG_X unknown` for messages."""
    value = (config or {}).get(symbol)
    if value is None:
        return f"{symbol} unknown"
    return f"# {symbol} is not set" if value == "n" else f"{symbol}={value}"


@dataclass(frozen=True)
class Missing:
    """A driver `module` needs that will not be there: the modular choices to load."""

    module: str
    choices: tuple[tuple[str, str], ...]  # (symbol, module) that are modules

    def text(self, config: Mapping[str, str] | None) -> str:
        names = " or ".join(m for _, m in self.choices)
        why = ", ".join(state(s, config) if config else f"{m} is a module" for s, m in self.choices)
        return f"{self.module} needs {names} ({why}), which modules.dep does not name"


def problems(
    loaded: Iterable[str],
    config: Mapping[str, str] | None,
    is_module: Callable[[str], bool],
    is_builtin: Callable[[str], bool],
) -> list[Missing]:
    """The companions of the `loaded` modules (names) that are modular yet not loaded.

    Built in is the config's `=y`, or modules.builtin; modular is the config's `=m`, or,
    without a config, a module file in the index.
    """
    names = set(loaded)
    found: list[Missing] = []
    for module in sorted(names):
        for group in COMPANIONS.get(module, ()):
            if any(m in names for _, m in group):
                continue
            if config is not None:
                if any(config.get(s) == "y" for s, _ in group):
                    continue
                modular = tuple((s, m) for s, m in group if config.get(s) == "m")
            else:
                if any(is_builtin(m) for _, m in group):
                    continue
                modular = tuple((s, m) for s, m in group if is_module(m))
            if modular:
                found.append(Missing(module, modular))
    return found


def error(found: list[Missing], config: Mapping[str, str] | None, where: str) -> UserError:
    """The UserError for `problems`' answer."""
    first = found[0].choices[0][1]
    return UserError(
        f"{where}: " + "; ".join(m.text(config) for m in found),
        f"add {first} to scaleway.modules (or optional_modules); the NIC's PHY or bus "
        "driver must be loaded before the root can be reached",
    )


def why_missing(name: str, config: Mapping[str, str] | None) -> str | None:
    """What the config says about a module the tree lacks: built in, or not built."""
    symbol = SYMBOLS.get(name.replace("-", "_"))
    if symbol is None or not config or symbol not in config:
        return None
    value = config[symbol]
    if value == "y":
        return f"built in ({symbol}=y)"
    if value == "m":
        return f"the config builds it as a module ({symbol}=m) but the tree lacks it"
    return f"this kernel does not build it ({state(symbol, config)})"


def soc_warning(config: Mapping[str, str] | None) -> str | None:
    """A warning when the config says the kernel leaves out the C1's SoC (linux-armv7
    since 5.17: `# CONFIG_MACH_ARMADA_370 is not set`, and XP)."""
    symbols = ("CONFIG_MACH_ARMADA_370", "CONFIG_MACH_ARMADA_XP")
    if config is None or any(config.get(s) != "n" for s in symbols):
        return None
    return (
        "the kernel config leaves out the C1's SoC (# CONFIG_MACH_ARMADA_370 is not set, "
        "# CONFIG_MACH_ARMADA_XP is not set): this kernel may not boot on a C1"
    )
