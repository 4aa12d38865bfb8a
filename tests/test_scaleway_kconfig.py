"""Drivers modules.dep does not name: the kernel config and the module tree say when one
is missing, and the defaults fit Arch Linux ARM's linux-armv7.

The configs are excerpts of real ones (linux-armv7's `config` in archlinuxarm/PKGBUILDs,
Debian's armmp and amd64 configs); the module trees are written by hand as depmod writes
them (modules.dep, modules.builtin), the dependencies as the real kernels have them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from archkernel.errors import UserError
from archkernel.scaleway import kconfig, modules
from archkernel.settings import ScalewaySettings

# linux-armv7's config, the lines that matter for the C1's network and root.
ALARM_CONFIG = """\
CONFIG_LOCALVERSION="-ARCH"
CONFIG_IP_PNP=y
CONFIG_IP_PNP_DHCP=y
CONFIG_BLK_DEV_NBD=m
CONFIG_MVMDIO=y
CONFIG_MVNETA_BM_ENABLE=m
CONFIG_MVNETA=m
CONFIG_MVNETA_BM=m
CONFIG_PHYLINK=m
CONFIG_PHYLIB=y
CONFIG_FIXED_PHY=y
CONFIG_MARVELL_PHY=y
# CONFIG_MACH_ARMADA_370 is not set
# CONFIG_MACH_ARMADA_XP is not set
"""
ALARM_DEP = """\
kernel/drivers/net/ethernet/marvell/mvneta.ko: kernel/drivers/net/phy/phylink.ko
kernel/drivers/net/phy/phylink.ko:
kernel/drivers/net/ethernet/marvell/mvneta_bm.ko:
kernel/drivers/block/nbd.ko:
"""
ALARM_BUILTIN = "kernel/drivers/net/ethernet/marvell/mvmdio.ko\nkernel/drivers/net/phy/marvell.ko\n"
# Debian's armmp: mvmdio, the Marvell PHY and phylib are modules.
ARMMP_CONFIG = (
    ALARM_CONFIG.replace("CONFIG_MVMDIO=y", "CONFIG_MVMDIO=m")
    .replace("CONFIG_MARVELL_PHY=y", "CONFIG_MARVELL_PHY=m")
    .replace("CONFIG_PHYLIB=y", "CONFIG_PHYLIB=m")
)
ARMMP_DEP = """\
kernel/drivers/net/ethernet/marvell/mvneta.ko: kernel/drivers/net/phy/phylink.ko kernel/drivers/net/phy/libphy.ko
kernel/drivers/net/phy/phylink.ko: kernel/drivers/net/phy/libphy.ko
kernel/drivers/net/phy/libphy.ko:
kernel/drivers/net/ethernet/marvell/mvmdio.ko:
kernel/drivers/net/phy/marvell.ko: kernel/drivers/net/phy/libphy.ko
kernel/drivers/block/nbd.ko:
"""


def tree(tmp_path: Path, dep: str, builtin: str = "", config: str | None = None) -> Path:
    moddir = tmp_path / "usr/lib/modules/6.2.10-1-ARCH"
    moddir.mkdir(parents=True)
    (moddir / "modules.dep").write_text(dep)
    (moddir / "modules.builtin").write_text(builtin)
    if config is not None:
        (moddir / "build").mkdir()
        (moddir / "build/.config").write_text(config)
    return moddir


def config_of(moddir: Path) -> dict[str, str] | None:
    found = kconfig.read_config(moddir)
    return found[1] if found else None


def test_parse_config() -> None:
    config = kconfig.parse_config(ALARM_CONFIG)
    assert config["CONFIG_MVMDIO"] == "y" and config["CONFIG_MVNETA"] == "m"
    assert config["CONFIG_MACH_ARMADA_XP"] == "n"
    assert config["CONFIG_LOCALVERSION"] == '"-ARCH"'


def test_the_defaults_fit_linux_armv7(tmp_path: Path) -> None:
    moddir = tree(tmp_path, ALARM_DEP, ALARM_BUILTIN, ALARM_CONFIG)
    defaults = ScalewaySettings()
    chosen = modules.select(
        moddir, moddir.name, defaults.modules, defaults.optional_modules, config_of(moddir)
    )
    assert chosen.names == ["phylink", "mvneta", "nbd", "mvneta_bm"]
    assert chosen.missing == ()


def test_a_modular_phy_driver_outside_the_closure_is_an_error(tmp_path: Path) -> None:
    moddir = tree(tmp_path, ARMMP_DEP, "", ARMMP_CONFIG)
    with pytest.raises(UserError) as info:
        modules.select(moddir, moddir.name, ["mvneta", "nbd"], [], config_of(moddir))
    assert info.value.message == (
        "kernel 6.2.10-1-ARCH: mvneta needs mvmdio (CONFIG_MVMDIO=m), which modules.dep does "
        "not name; mvneta needs marvell (CONFIG_MARVELL_PHY=m), which modules.dep does not "
        "name"
    )
    assert (info.value.hint or "").startswith("add mvmdio to scaleway.modules")
    # Named in the settings, they are loaded, and all is well.
    chosen = modules.select(
        moddir, moddir.name, ["mvmdio", "marvell", "mvneta", "nbd"], [], config_of(moddir)
    )
    assert chosen.names == ["mvmdio", "libphy", "marvell", "phylink", "mvneta", "nbd"]


def test_without_a_config_the_module_tree_says_what_is_modular(tmp_path: Path) -> None:
    moddir = tree(tmp_path, ARMMP_DEP)
    assert kconfig.read_config(moddir) is None
    with pytest.raises(UserError, match=r"mvneta needs mvmdio \(mvmdio is a module\)"):
        modules.select(moddir, moddir.name, ["mvneta"], [], None)
    alarm = tree(tmp_path / "alarm", ALARM_DEP, ALARM_BUILTIN)
    assert modules.select(alarm, alarm.name, ["mvneta"], [], None).names == ["phylink", "mvneta"]


@pytest.mark.parametrize(
    ("setting", "ok"),
    [("CONFIG_VIRTIO_PCI=m", False), ("CONFIG_VIRTIO_PCI=y", True), ("", True)],
)
def test_virtio_needs_a_transport(tmp_path: Path, setting: str, ok: bool) -> None:
    dep = "kernel/virtio_net.ko: kernel/virtio.ko\nkernel/virtio.ko:\nkernel/virtio_pci.ko: kernel/virtio.ko\n"
    moddir = tree(tmp_path, dep, config=f"CONFIG_VIRTIO_NET=m\n{setting}\n")
    config = config_of(moddir)
    if ok:
        assert modules.select(moddir, "v", ["virtio_net"], [], config).names == [
            "virtio",
            "virtio_net",
        ]
    else:
        with pytest.raises(UserError, match=r"virtio_net needs virtio_pci \(CONFIG_VIRTIO_PCI=m\)"):
            modules.select(moddir, "v", ["virtio_net"], [], config)
        assert modules.select(moddir, "v", ["virtio_net", "virtio_pci"], [], config).names == [
            "virtio",
            "virtio_net",
            "virtio_pci",
        ]


def test_a_missing_module_says_what_the_config_says(tmp_path: Path) -> None:
    moddir = tree(tmp_path, "kernel/drivers/block/nbd.ko:\n")
    cases = {
        "# CONFIG_MVNETA is not set\n": (
            "module 'mvneta' is not in 6.2.10-1-ARCH's modules.dep: this kernel does not "
            "build it (# CONFIG_MVNETA is not set)"
        ),
        "CONFIG_MVNETA=m\n": (
            "module 'mvneta' is not in 6.2.10-1-ARCH's modules.dep: the config builds it as "
            "a module (CONFIG_MVNETA=m) but the tree lacks it"
        ),
    }
    for config, message in cases.items():
        with pytest.raises(UserError) as info:
            modules.select(moddir, moddir.name, ["mvneta", "nbd"], [], kconfig.parse_config(config))
        assert info.value.message == message
    # Built in (and modules.builtin not saying so): nothing to load, noted.
    chosen = modules.select(
        moddir, moddir.name, ["mvneta", "nbd"], [], kconfig.parse_config("CONFIG_MVNETA=y\n")
    )
    assert chosen.names == ["nbd"]
    assert chosen.notes == ("module mvneta is built in (CONFIG_MVNETA=y): nothing to load",)
    # No config: kmod's own message, with the closest names.
    with pytest.raises(
        UserError, match=r"module 'mvneta' is not in 6\.2\.10-1-ARCH's modules\.dep"
    ):
        modules.select(moddir, moddir.name, ["mvneta"], [], None)


def test_a_config_larger_than_the_limit_is_refused(tmp_path: Path) -> None:
    moddir = tree(tmp_path, "", config="")
    with (moddir / "build/.config").open("wb") as handle:
        handle.truncate(kconfig.MAX_CONFIG + 1)
    with pytest.raises(UserError, match="is larger than"):
        kconfig.read_config(moddir)


def test_a_config_without_the_c1_soc_is_a_warning() -> None:
    assert kconfig.soc_warning(kconfig.parse_config(ALARM_CONFIG)) == (
        "the kernel config leaves out the C1's SoC (# CONFIG_MACH_ARMADA_370 is not set, "
        "# CONFIG_MACH_ARMADA_XP is not set): this kernel may not boot on a C1"
    )
    older = ALARM_CONFIG.replace("# CONFIG_MACH_ARMADA_XP is not set", "CONFIG_MACH_ARMADA_XP=y")
    assert kconfig.soc_warning(kconfig.parse_config(older)) is None
    assert kconfig.soc_warning(None) is None
    assert kconfig.soc_warning({}) is None  # an x86 config names neither
