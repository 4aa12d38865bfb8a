"""The image's udev rules for Azure: their names and properties over recorded devices
(Azure's disks, clock and virtual functions, as udev sees them there: written out here,
not taken from the code under test), and real udev reading them without a complaint."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from archkernel.azure import udev, udevrules
from archkernel.azure.udevrules import Device, Node
from tests.support.fabric import debian_agents
from tests.support.skips import skip_for_this_machine

RULES = [udev.azure_disk_rules(), udev.sriov_rules(), udev.ptp_rules()]
OS_CHANNEL = "{00000000-0000-8899-0000-000000000000}"
RESOURCE_CHANNEL = "{00000000-0001-8899-0000-000000000000}"
DATA_CHANNEL = "{f8b3781a-1e82-4818-a1c3-63d806ec15bb}"


def scsi(kernel: str, channel: str, hctl: str, part: int | None = None) -> Device:
    """A disk on a Hyper-V SCSI controller: block -> scsi_device -> host -> vmbus."""
    chain = [
        Node(hctl, "scsi", "sd", {"vendor": "Msft    ", "model": "Virtual Disk    "}),
        Node("target0:0:0", "scsi"),
        Node("host0", "scsi"),
        Node(channel.strip("{}"), "vmbus", "hv_storvsc", {"device_id": channel}),
        Node("VMBUS:00", "acpi"),
    ]
    if part is not None:
        chain.insert(0, Node(kernel, "block"))
        return Device(Node(f"{kernel}{part}", "block"), chain, {"DEVTYPE": "partition"})
    return Device(Node(kernel, "block"), chain, {"DEVTYPE": "disk"})


def nvme(ctrl: int, nsid: int, model: str, serial: str, part: int | None = None) -> Device:
    """A namespace of an NVMe controller behind the Hyper-V PCI bus."""
    disk = Node(f"nvme{ctrl}n{nsid}", "block", "", {"nsid": str(nsid), "wwid": "eui.0"})
    chain = [
        # sysfs pads the model to 40 characters.
        Node(f"nvme{ctrl}", "nvme", "", {"model": f"{model:<40}", "serial": serial}),
        Node("c05b:00:00.0", "pci", "nvme"),
        Node("pcic05b:00", ""),
        Node("c05b0000-0000-0000-0000-000000000000", "vmbus", "hv_pci"),
    ]
    env = {"ID_SERIAL_SHORT": serial}
    if part is not None:
        own = Node(f"{disk.kernel}p{part}", "block")
        return Device(own, [disk, *chain], {**env, "DEVTYPE": "partition"})
    return Device(disk, chain, {**env, "DEVTYPE": "disk"})


def names(dev: Device) -> list[str]:
    return udevrules.apply(RULES, dev).symlinks


@pytest.mark.parametrize(
    ("dev", "expected"),
    [
        (scsi("sda", OS_CHANNEL, "0:0:0:0"), ["disk/azure/os"]),
        (scsi("sda", OS_CHANNEL, "0:0:0:0", part=1), ["disk/azure/os-part1"]),
        (scsi("sdb", RESOURCE_CHANNEL, "1:0:1:0"), ["disk/azure/resource"]),
        (scsi("sdb", RESOURCE_CHANNEL, "1:0:1:0", part=1), ["disk/azure/resource-part1"]),
        (scsi("sdc", DATA_CHANNEL, "3:0:0:0"), ["disk/azure/data/by-lun/0"]),
        (scsi("sdd", DATA_CHANNEL, "3:0:0:10"), ["disk/azure/data/by-lun/10"]),
        (scsi("sde", DATA_CHANNEL, "3:0:0:63", part=2), ["disk/azure/data/by-lun/63-part2"]),
        (nvme(0, 1, "MSFT NVMe Accelerator v1.0", "SN1"), ["disk/azure/os"]),
        (nvme(0, 1, "MSFT NVMe Accelerator v1.0", "SN1", part=15), ["disk/azure/os-part15"]),
        (nvme(0, 2, "MSFT NVMe Accelerator v1.0", "SN1"), ["disk/azure/data/by-lun/0"]),
        (nvme(0, 12, "MSFT NVMe Accelerator v1.0", "SN1"), ["disk/azure/data/by-lun/10"]),
        (nvme(0, 65, "MSFT NVMe Accelerator v1.0", "SN1"), ["disk/azure/data/by-lun/63"]),
        (
            nvme(1, 1, "Microsoft NVMe Direct Disk v2", "LOCAL7"),
            ["disk/azure/local/by-serial/LOCAL7"],
        ),
        # Not Azure's: a QEMU NVMe disk and a disk on another SCSI controller get nothing.
        (nvme(0, 1, "QEMU NVMe Ctrl", "deadbeef"), []),
        (scsi("sdf", "{11111111-2222-3333-4444-555555555555}", "4:0:0:1"), []),
    ],
)
def test_azure_disks_get_their_names(dev: Device, expected: list[str]) -> None:
    assert names(dev) == expected


def test_a_removed_disk_is_left_alone() -> None:
    dev = scsi("sda", OS_CHANNEL, "0:0:0:0")
    dev.action = "remove"
    assert names(dev) == []


def vf(name: str, driver: str) -> Device:
    return Device(
        Node(name, "net"),
        [
            Node("7870:00:02.0", "pci", driver, {"vendor": "0x15b3"}),
            Node("pci7870:00", ""),
            Node("7870aaaa-0000-0000-0000-000000000000", "vmbus", "hv_pci"),
        ],
    )


@pytest.mark.parametrize("driver", ["mlx4_core", "mlx5_core", "mana"])
@pytest.mark.parametrize("name", ["eth0", "eth1", "enP30832s1"])
def test_the_virtual_function_is_unmanaged_by_driver(name: str, driver: str) -> None:
    env = udevrules.apply(RULES, vf(name, driver)).env
    assert env["ID_NET_MANAGED_BY"] == "unmanaged"
    assert env["NM_UNMANAGED"] == "1"


def test_the_synthetic_nic_and_other_pci_nics_stay_managed() -> None:
    synthetic = Device(Node("eth0", "net"), [Node("guid", "vmbus", "hv_netvsc")])
    # A Mellanox NIC on a real PCI bus (not Hyper-V's): the rule is about VFs only.
    passthrough = Device(Node("eth1", "net"), [Node("0000:03:00.0", "pci", "mlx5_core")])
    for dev in (synthetic, passthrough):
        env = udevrules.apply(RULES, dev).env
        assert "ID_NET_MANAGED_BY" not in env and "NM_UNMANAGED" not in env


def test_the_hyperv_clock_is_ptp_hyperv_and_no_other_is() -> None:
    hyperv = Device(Node("ptp0", "ptp", "", {"clock_name": "hyperv\n"}))
    kvm = Device(Node("ptp1", "ptp", "", {"clock_name": "KVM virtual PTP"}))
    assert names(hyperv) == ["ptp_hyperv"]
    assert names(kvm) == []


def test_the_evaluator_refuses_keys_it_does_not_know() -> None:
    with pytest.raises(udevrules.UnsupportedRule):
        udevrules.apply(['KERNEL=="sd*", PROGRAM=="/bin/true", SYMLINK+="x"'], scsi("sda", "", ""))


def test_parent_keys_match_on_one_device_only() -> None:
    # KERNELS and DRIVERS on two different parents: udev does not match such a rule.
    rule = 'KERNELS=="0:0:0:0", DRIVERS=="hv_storvsc", SYMLINK+="split"'
    assert udevrules.apply([rule], scsi("sda", OS_CHANNEL, "0:0:0:0")).symlinks == []
    rule = 'KERNELS=="0:0:0:0", DRIVERS=="sd", SYMLINK+="same"'
    assert udevrules.apply([rule], scsi("sda", OS_CHANNEL, "0:0:0:0")).symlinks == ["same"]


@pytest.mark.integration
@pytest.mark.root
def test_real_udev_reads_the_rules_without_a_complaint(tmp_path: Path) -> None:
    """Debian's udevadm reads the three files (in a private mount namespace, over an
    empty /etc/udev/rules.d) and runs them on a loop device: no complaint about any
    line of them, and no Azure name for a disk that is not Azure's."""
    for tool in ("udevadm", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if not Path("/sys/block/loop0").exists():
        skip_for_this_machine("no /sys/block/loop0 to run the rules on")
    rules = tmp_path / "rules.d"
    rules.mkdir()
    files = {
        Path(udev.DISK_RULES_FILE).name: udev.azure_disk_rules(),
        Path(udev.SRIOV_RULES_FILE).name: udev.sriov_rules(),
        Path(udev.PTP_RULES_FILE).name: udev.ptp_rules(),
        "66-zz-broken.rules": 'KERNEL=="x", FOO{bar}="1"\n',  # proves complaints show
    }
    for name, text in files.items():
        (rules / name).write_text(text)
    script = 'mount --bind "$1" /etc/udev/rules.d && exec udevadm test /sys/block/loop0'
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", str(rules)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    out = proc.stdout + proc.stderr
    for name in files:
        assert f"Reading rules file: /etc/udev/rules.d/{name}" in out
    about_ours = [
        line
        for line in out.splitlines()
        if "66-archkernel" in line and not line.startswith("Reading rules file")
    ]
    assert about_ours == []
    assert "66-zz-broken.rules:1 Invalid key 'FOO'" in out
    assert "disk/azure" not in out


def test_not_strict_skips_rules_it_cannot_judge_and_counts_them() -> None:
    rules = [
        'KERNEL=="sd*", PROGRAM=="/bin/true", SYMLINK+="by-program"\n'
        'KERNEL=="sd*", IMPORT{builtin}="path_id", RUN+="/bin/x", SYMLINK+="kept"\n'
        "this is not a rule\n"
    ]
    dev = udevrules.apply(rules, scsi("sda", OS_CHANNEL, "0:0:0:0"), strict=False)
    assert dev.symlinks == ["kept"]
    assert dev.skipped == 1


def test_parent_keys_with_not_equal_match_on_one_device() -> None:
    # `ATTRS{vendor}!="Msft"`: some device of the chain has no such vendor (the disk's
    # own block node has no vendor at all), as udev reads it.
    rule = 'KERNEL=="sda", ATTRS{vendor}!="Msft", DRIVERS=="sd", SYMLINK+="not-msft"'
    assert udevrules.apply([rule], scsi("sda", OS_CHANNEL, "0:0:0:0")).symlinks == []
    rule = 'KERNEL=="sda", ATTRS{vendor}!="Other", DRIVERS=="sd", SYMLINK+="not-other"'
    assert udevrules.apply([rule], scsi("sda", OS_CHANNEL, "0:0:0:0")).symlinks == ["not-other"]
    # A missing attribute matches neither == nor != (udev reads no value to compare).
    rule = 'KERNEL=="sda", ATTRS{ID_VENDOR}!="Msft", SYMLINK+="no-such-attribute"'
    assert udevrules.apply([rule], scsi("sda", OS_CHANNEL, "0:0:0:0")).symlinks == []
    rule = 'KERNEL=="sda", ATTR{size}!="0", SYMLINK+="no-size"'
    assert udevrules.apply([rule], scsi("sda", OS_CHANNEL, "0:0:0:0")).symlinks == []
    rule = 'KERNEL=="sda", KERNELS!="sda", SUBSYSTEMS=="vmbus", SYMLINK+="on-vmbus"'
    assert udevrules.apply([rule], scsi("sda", OS_CHANNEL, "0:0:0:0")).symlinks == ["on-vmbus"]


@pytest.mark.integration
def test_a_distributions_real_rules_do_not_stop_the_check() -> None:
    """Debian's own udev rules files, and those of its cloud-init and waagent packages
    (ATTRS!=, TAG==, GROUP=, PROGRAM, IMPORT ...), run before and after the image's, not
    strictly: nothing is refused and the Azure names come out as with the image's files
    alone."""
    system = sorted(Path("/usr/lib/udev/rules.d").glob("*.rules"))
    assert len(system) > 10, "udev's rules files are missing: install udev"
    agents = sorted((debian_agents() / "lib/udev/rules.d").glob("66-azure-*.rules"))
    assert [p.name for p in agents] == ["66-azure-ephemeral.rules", "66-azure-storage.rules"]
    system = sorted([*system, *agents], key=lambda p: p.name)
    texts = [p.read_text() for p in system]
    assert any('ATTRS{ID_VENDOR}!="Msft"' in t for t in texts)
    everything = [*texts[: len(texts) // 2], *RULES, *texts[len(texts) // 2 :]]
    for dev, expected in [
        (scsi("sda", OS_CHANNEL, "0:0:0:0"), "disk/azure/os"),
        (scsi("sdd", DATA_CHANNEL, "3:0:0:10"), "disk/azure/data/by-lun/10"),
        (nvme(0, 1, "MSFT NVMe Accelerator v1.0", "SN1", part=2), "disk/azure/os-part2"),
        (Device(Node("ptp0", "ptp", "", {"clock_name": "hyperv"})), "ptp_hyperv"),
    ]:
        out = udevrules.apply(everything, dev, strict=False)
        assert expected in out.symlinks
        assert out.skipped > 0
    for driver in ("mlx5_core", "mana"):
        out = udevrules.apply(everything, vf("eth1", driver), strict=False)
        assert out.env.get("ID_NET_MANAGED_BY") == "unmanaged"
    # The agents' own rules name the OS disk too, as on Azure: cloud-init's
    # disk/cloud/azure_root, and waagent's disk/azure/root (`ATTRS{ID_VENDOR}!="Msft"` names
    # no sysfs attribute, so its early GOTO is never taken).
    os_disk = udevrules.apply(everything, scsi("sda", OS_CHANNEL, "0:0:0:0"), strict=False)
    assert sorted(os_disk.symlinks) == [
        "disk/azure/os",
        "disk/azure/root",
        "disk/cloud/azure_root",
    ]
