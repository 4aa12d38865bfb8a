"""Verify's rules for today's Azure VM sizes: a tree as the build writes it passes, and
each rule fails when the image lacks what it checks (and only when the settings ask)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from archkernel.azure import config as conf
from archkernel.azure import vmsizes
from archkernel.azure.rules import Report
from archkernel.image import grub
from archkernel.settings import AzureSettings
from archkernel.settings.schema import AzurePublishSettings

UUID = "0b6d3c3e-5a8f-4f3e-9d7e-1c2b3a4d5e6f"
KVER = "6.1.0-57-amd64"
# Where Debian's and Arch's kernels keep the drivers (written out, not taken from the code).
MODULE_FILES = (
    "drivers/net/ethernet/mellanox/mlx4/mlx4_en.ko.zst",
    "drivers/net/ethernet/mellanox/mlx4/mlx4_core.ko.zst",
    "drivers/net/ethernet/mellanox/mlx5/core/mlx5_core.ko.zst",
    "drivers/net/ethernet/microsoft/mana/mana.ko.zst",
    "drivers/nvme/host/nvme.ko.zst",
    "drivers/pci/controller/pci-hyperv.ko.zst",
)
AVAILABLE_UNITS = {
    "sshd.service",
    "systemd-networkd.service",
    "chronyd.service",
    "systemd-timesyncd.service",
    "cloud-init.service",
}


@dataclasses.dataclass
class Image:
    """An image's tree as the build writes it, and what verify reads beside the tree."""

    root: Path
    grub_cfg: str
    initramfs: dict[str, list[str]]
    cloud_cfg: dict[str, str]
    enabled: list[str]
    fstab: str


def build_tree(root: Path, az: AzureSettings) -> Image:
    for file in conf.system_files(az, UUID, "1234-ABCD"):
        path = root / file.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(file.text)
    for rel in MODULE_FILES:
        path = root / "usr/lib/modules" / KVER / "kernel" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    cmdline = conf.grub_cmdline(UUID, az.kernel_cmdline)
    return Image(
        root=root,
        grub_cfg=grub.grub_cfg(UUID, "/boot/vmlinuz-linux", "/boot/initramfs-linux.img", cmdline),
        initramfs={"initramfs-linux.img": ["hv_vmbus", "hv_storvsc", "nvme", "pci-hyperv"]},
        cloud_cfg={"90-archkernel-azure.cfg": conf.cloud_init_cfg()},
        enabled=conf.units_to_enable(az, AVAILABLE_UNITS),
        fstab=conf.fstab(UUID, "1234-ABCD"),
    )


def checks(image: Image, az: AzureSettings) -> dict[str, bool]:
    report = Report("test")
    vmsizes.check(
        report,
        vmsizes.inspect(image.root),
        az,
        initramfs=image.initramfs,
        grub_cfg=image.grub_cfg,
        fstab=image.fstab,
        cloud_cfg=image.cloud_cfg,
        enabled_units=image.enabled,
    )
    return {c.name: c.ok for c in report.checks}


ALL_RULES = {
    "kernel command line without quiet",
    "NVMe: nvme and pci-hyperv in initramfs-linux.img",
    "NVMe: kernel command line",
    "NVMe: nothing names /dev/sd*",
    "Azure disk names (/dev/disk/azure) on SCSI and NVMe",
    "accelerated networking: VF drivers in the image",
    "accelerated networking: udev leaves the VF unmanaged",
    "accelerated networking: DHCP on the synthetic NIC only",
    "Hyper-V clock: chrony reads /dev/ptp_hyperv",
    "Hyper-V clock: chronyd enabled, timesyncd not",
    "Hyper-V clock: udev names it /dev/ptp_hyperv",
    "cloud-init Hyper-V KVP telemetry",
}


def test_the_tree_the_build_writes_passes_every_rule(tmp_path: Path) -> None:
    az = AzureSettings()
    result = checks(build_tree(tmp_path, az), az)
    assert set(result) == ALL_RULES
    assert all(result.values()), [k for k, ok in result.items() if not ok]


def _remove(rel: str) -> Callable[[Image], None]:
    def change(image: Image) -> None:
        (image.root / rel).unlink()

    return change


def _edit(rel: str, old: str, new: str) -> Callable[[Image], None]:
    def change(image: Image) -> None:
        path = image.root / rel
        text = path.read_text()
        assert old in text
        path.write_text(text.replace(old, new))

    return change


def _set(**values: object) -> Callable[[Image], None]:
    def change(image: Image) -> None:
        for key, value in values.items():
            setattr(image, key, value)

    return change


GRUB_QUIET = "nvme_core.io_timeout=240 quiet"
CASES = [
    ("quiet", "kernel command line without quiet"),
    ("nvme-initramfs", "NVMe: nvme and pci-hyperv in initramfs-linux.img"),
    ("pci-hyperv-initramfs", "NVMe: nvme and pci-hyperv in initramfs-linux.img"),
    ("io-timeout", "NVMe: kernel command line"),
    ("fstab-sda", "NVMe: nothing names /dev/sd*"),
    ("grub-sda", "NVMe: nothing names /dev/sd*"),
    ("waagent-sda", "NVMe: nothing names /dev/sd*"),
    ("no-disk-rules", "Azure disk names (/dev/disk/azure) on SCSI and NVMe"),
    ("nvme-lun-off-by-one", "Azure disk names (/dev/disk/azure) on SCSI and NVMe"),
    ("no-mana", "accelerated networking: VF drivers in the image"),
    ("no-mlx4", "accelerated networking: VF drivers in the image"),
    ("no-sriov-rules", "accelerated networking: udev leaves the VF unmanaged"),
    ("sriov-by-name", "accelerated networking: udev leaves the VF unmanaged"),
    ("dhcp-on-every-nic", "accelerated networking: DHCP on the synthetic NIC only"),
    ("no-dhcp", "accelerated networking: DHCP on the synthetic NIC only"),
    ("no-refclock", "Hyper-V clock: chrony reads /dev/ptp_hyperv"),
    ("makestep-limited", "Hyper-V clock: chrony reads /dev/ptp_hyperv"),
    ("no-chrony-conf", "Hyper-V clock: chrony reads /dev/ptp_hyperv"),
    ("timesyncd", "Hyper-V clock: chronyd enabled, timesyncd not"),
    ("no-chronyd", "Hyper-V clock: chronyd enabled, timesyncd not"),
    ("no-ptp-rule", "Hyper-V clock: udev names it /dev/ptp_hyperv"),
    ("no-telemetry", "cloud-init Hyper-V KVP telemetry"),
]


def lacking(case: str, image: Image) -> None:
    """Take from `image` what `case` names."""
    timeout = "nvme_core.io_timeout=240"
    disk_rules = "etc/udev/rules.d/66-archkernel-azure-disk.rules"
    sriov = "etc/udev/rules.d/66-archkernel-azure-sriov.rules"
    changes: dict[str, Callable[[Image], None]] = {
        "quiet": _set(grub_cfg=image.grub_cfg.replace(timeout, GRUB_QUIET)),
        "nvme-initramfs": _set(initramfs={"initramfs-linux.img": ["hv_vmbus", "pci-hyperv"]}),
        "pci-hyperv-initramfs": _set(initramfs={"initramfs-linux.img": ["hv_vmbus", "nvme"]}),
        "io-timeout": _set(grub_cfg=image.grub_cfg.replace(timeout, "")),
        "fstab-sda": _set(fstab=image.fstab + "/dev/sdb1\t/mnt\text4\tdefaults\t0 2\n"),
        "grub-sda": _set(grub_cfg=image.grub_cfg.replace(f"root=UUID={UUID}", "root=/dev/sda1")),
        "no-disk-rules": _remove(disk_rules),
        "nvme-lun-off-by-one": _edit(disk_rules, 'ATTRS{nsid}=="2", ', 'ATTRS{nsid}=="1", '),
        "no-mana": _remove(f"usr/lib/modules/{KVER}/kernel/{MODULE_FILES[3]}"),
        "no-mlx4": _remove(f"usr/lib/modules/{KVER}/kernel/{MODULE_FILES[0]}"),
        "no-sriov-rules": _remove(sriov),
        "sriov-by-name": _edit(sriov, 'DRIVERS=="hv_pci"', 'KERNEL=="eth1"'),
        "dhcp-on-every-nic": _edit(
            "etc/systemd/network/20-eth0.network", "Name=eth0\nDriver=", "Name=eth*\n#Driver="
        ),
        "no-dhcp": _edit("etc/systemd/network/20-eth0.network", "DHCP=yes", "DHCP=no"),
        "no-refclock": _edit("etc/chrony.conf", "refclock PHC", "#refclock PHC"),
        "makestep-limited": _edit("etc/chrony.conf", "makestep 1.0 -1", "makestep 1.0 3"),
        "no-chrony-conf": _remove("etc/chrony.conf"),
        "timesyncd": _set(enabled=[*image.enabled, "systemd-timesyncd.service"]),
        "no-chronyd": _set(enabled=[u for u in image.enabled if u != "chronyd.service"]),
        "no-ptp-rule": _remove("etc/udev/rules.d/66-archkernel-hyperv-ptp.rules"),
        "no-telemetry": _set(cloud_cfg={"90-archkernel-azure.cfg": "datasource_list: [ Azure ]\n"}),
    }
    if case == "dhcp-on-every-nic":
        (image.root / "etc/systemd/network/10-azure-sriov-vf.network").unlink()
    if case == "waagent-sda":
        (image.root / "etc/waagent.conf").write_text("ResourceDisk.Device=/dev/sdb\n")
        return
    changes[case](image)


@pytest.mark.parametrize(("case", "rule"), CASES, ids=[c for c, _ in CASES])
def test_each_rule_fails_when_the_image_lacks_it(tmp_path: Path, case: str, rule: str) -> None:
    az = AzureSettings()
    image = build_tree(tmp_path, az)
    lacking(case, image)
    result = checks(image, az)
    assert result[rule] is False
    assert [k for k, ok in result.items() if not ok] == [rule]


FEATURE_OF = {
    "no-disk-rules": "disk-names",
    "no-sriov-rules": "accelerated-networking",
    "no-mana": "accelerated-networking",
    "no-refclock": "ptp-clock",
    "timesyncd": "ptp-clock",
    "no-telemetry": "kvp-telemetry",
}


@pytest.mark.parametrize(("case", "feature"), FEATURE_OF.items())
def test_a_rule_is_off_when_its_feature_is_off(tmp_path: Path, case: str, feature: str) -> None:
    on = AzureSettings()
    off = dataclasses.replace(on, vm_features=[f for f in on.vm_features if f != feature])
    image = build_tree(tmp_path, on)
    lacking(case, image)
    assert not all(checks(image, on).values())
    assert all(checks(image, off).values())


def test_the_nvme_rules_follow_the_disk_controllers(tmp_path: Path) -> None:
    on = AzureSettings()
    scsi_only = dataclasses.replace(
        on, publish=dataclasses.replace(AzurePublishSettings(), disk_controller_types=["SCSI"])
    )
    image = build_tree(tmp_path, on)
    lacking("io-timeout", image)
    assert checks(image, on)["NVMe: kernel command line"] is False
    assert not any(name.startswith("NVMe") for name in checks(image, scsi_only))


def test_quiet_fails_whatever_the_settings(tmp_path: Path) -> None:
    az = AzureSettings(vm_features=[])
    image = build_tree(tmp_path, az)
    lacking("quiet", image)
    assert checks(image, az)["kernel command line without quiet"] is False


@pytest.mark.parametrize(
    ("text", "on"),
    [
        ("reporting:\n  telemetry:\n    type: hyperv\n", True),
        ("reporting: {telemetry: {type: hyperv}}\n", True),
        ("reporting:\n  logging:\n    type: log\n", False),
        ("# reporting:\n#   telemetry:\n#     type: hyperv\n", False),
        ("datasource:\n  Azure:\n    reporting:\n      type: hyperv\n", False),
    ],
)
def test_kvp_telemetry_is_read_from_cloud_init_yaml(text: str, on: bool) -> None:
    assert vmsizes.kvp_telemetry(text) is on


def test_the_cloud_init_configuration_asks_for_kvp_reporting() -> None:
    # Read by a YAML parser, as cloud-init reads it.
    yaml = pytest.importorskip("yaml")
    cfg = yaml.safe_load(conf.cloud_init_cfg())
    assert cfg["reporting"]["telemetry"] == {"type": "hyperv"}
    assert cfg["datasource_list"] == ["Azure"]


@pytest.mark.integration
def test_the_rules_pass_beside_a_distributions_own_udev_rules(tmp_path: Path) -> None:
    """With Debian's systemd rules files (PROGRAM, IMPORT, RUN ...) in /usr/lib/udev/rules.d,
    as a real image has its distribution's, verify still runs the image's rules and passes."""
    host_rules = sorted(Path("/usr/lib/udev/rules.d").glob("*.rules"))
    if len(host_rules) < 10:
        pytest.skip("needs the host's udev rules (Debian's udev package)")
    az = AzureSettings()
    image = build_tree(tmp_path, az)
    target = tmp_path / "usr/lib/udev/rules.d"
    target.mkdir(parents=True)
    for rules in host_rules:
        (target / rules.name).write_text(rules.read_text())
    result = checks(image, az)
    assert all(result.values()), [k for k, ok in result.items() if not ok]
    # And they still fail the image without archkernel's disk rules.
    lacking("no-disk-rules", image)
    assert checks(image, az)["Azure disk names (/dev/disk/azure) on SCSI and NVMe"] is False


def test_a_driver_built_into_the_kernel_needs_no_module(tmp_path: Path) -> None:
    az = AzureSettings()
    image = build_tree(tmp_path, az)
    lacking("nvme-initramfs", image)
    lacking("no-mana", image)
    assert not all(checks(image, az).values())
    (tmp_path / "usr/lib/modules" / KVER / "modules.builtin").write_text(
        "kernel/drivers/nvme/host/nvme.ko\nkernel/drivers/net/ethernet/microsoft/mana/mana.ko\n"
    )
    result = checks(image, az)
    assert all(result.values()), [k for k, ok in result.items() if not ok]


def test_kvp_telemetry_is_cloud_inits_and_not_asked_of_waagent(tmp_path: Path) -> None:
    waagent = AzureSettings(provisioning="waagent")
    image = build_tree(tmp_path, waagent)
    lacking("no-telemetry", image)
    assert "cloud-init Hyper-V KVP telemetry" not in checks(image, waagent)
    assert checks(image, AzureSettings())["cloud-init Hyper-V KVP telemetry"] is False
