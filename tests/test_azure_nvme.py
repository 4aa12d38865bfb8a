"""A generation 2 image on NVMe, as Azure's v6 sizes give it: OVMF boots it from an NVMe
disk with a SCSI data disk beside it, and the image's own udev rules name both.

The offline image has no udev (its /sbin/init is a stand-in), so the names are found in
two halves: the booted image records, over the serial console, each block device's sysfs
chain as the kernel built it (ARCHKERNEL-SYSFS lines: the attributes and drivers udev
rules match on); the image's rules files, read from the VHD, then run over those records
(archkernel.azure.udevrules). QEMU's devices are not Azure's: its NVMe controller's model
is "QEMU NVMe Ctrl" and its SCSI controller is virtio-scsi, not a VMBus channel. The test
proves the rules give QEMU's disks no Azure name, then stands Azure's identity in (the
controller's model; the VMBus storvsc channel above the SCSI host) and proves the real
kernel's chains then get /dev/disk/azure/os-part2 and data/by-lun/1.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from archkernel.azure import udev, udevrules
from archkernel.azure.udevrules import Device, Node
from archkernel.demo import offline
from archkernel.errors import UserError
from archkernel.host import qemu
from tests.support.azure import Build, boot_facts, built, image_file

GEN2 = {"ARCHKERNEL_AZURE__GENERATION": "2", "ARCHKERNEL_AZURE__DISK_SIZE": "1GiB"}
RULE_FILES = (udev.DISK_RULES_FILE, udev.SRIOV_RULES_FILE, udev.PTP_RULES_FILE)
_SYSFS = re.compile(r"^ARCHKERNEL-SYSFS (\S+) (\d+) (\S+) ?(.*?)\r?$", re.MULTILINE)


def have_ovmf() -> bool:
    try:
        qemu.find_ovmf()
    except UserError:
        return False
    return True


def recorded_devices(console: str) -> dict[str, Device]:
    """The block devices the stand-in init recorded, as udev would see them on `add`."""
    chains: dict[str, dict[int, Node]] = {}
    devtypes: dict[str, str] = {}
    for name, depth_text, key, value in _SYSFS.findall(console):
        depth = int(depth_text)
        if key == "devtype":
            devtypes[name] = value
            continue
        node = chains.setdefault(name, {}).setdefault(depth, Node(""))
        if key == "kernel":
            node.kernel = value
        elif key == "subsystem":
            node.subsystem = value
        elif key == "driver":
            node.driver = value
        elif key.startswith("attr:"):
            node.attrs[key[5:]] = value
    devices = {}
    for name, chain in chains.items():
        nodes = [chain[d] for d in sorted(chain)]
        env = {"DEVTYPE": devtypes.get(name, "")}
        serial = next((n.attrs["serial"] for n in nodes if "serial" in n.attrs), None)
        if serial:
            env["ID_SERIAL_SHORT"] = serial.strip()  # as 60-persistent-storage sets it
        devices[name] = Device(nodes[0], nodes[1:], env)
    return devices


def as_azure(dev: Device) -> Device:
    """`dev` with Azure's identity for QEMU's: the NVMe controller's model, and a VMBus
    storvsc channel for data disks above the SCSI host."""
    parents = []
    for node in dev.parents:
        attrs = dict(node.attrs)
        if node.subsystem == "nvme" and "model" in attrs:
            attrs["model"] = udev.NVME_REMOTE_MODEL.ljust(40)
        parents.append(Node(node.kernel, node.subsystem, node.driver, attrs))
        if node.subsystem == "scsi" and node.kernel.startswith("host"):
            channel = udev.DATA_DISK_CHANNEL
            parents.append(Node(channel.strip("{}"), "vmbus", "hv_storvsc", {"device_id": channel}))
    return Device(dev.node, parents, dict(dev.env))


def names(rules: list[str], dev: Device) -> list[str]:
    copy = Device(dev.node, dev.parents, dict(dev.env))
    return udevrules.apply(rules, copy).symlinks


@pytest.fixture(scope="module")
def gen2(repo: offline.OfflineRepo) -> Build:
    return built(repo, "build-gen2-nvme", **GEN2)


@pytest.mark.vm
@pytest.mark.root
@pytest.mark.skipif(not have_ovmf(), reason="needs OVMF (Debian's ovmf)")
def test_ovmf_boots_from_nvme_and_the_image_rules_name_the_disks(
    gen2: Build, tmp_path: Path
) -> None:
    data = tmp_path / "data.raw"
    with open(data, "wb") as f:
        f.truncate(16 * 1024 * 1024)
    console_log = tmp_path / "console.log"
    argv = qemu.qemu_argv(
        disk=gen2.vhd,
        disk_format="vpc",
        serial_log=console_log,
        memory=1024,
        firmware=qemu.find_ovmf(),
        disk_interface="nvme",
        data_disks=[data],
    )
    result = qemu.boot_and_wait(argv, console_log, f"{offline.HOSTNAME} login:", 600)
    assert result.found
    console = console_log.read_bytes().decode("utf-8", "replace")
    facts = boot_facts(console)
    # GRUB from the ESP of the NVMe disk, the kernel found the root file system on it.
    assert facts["root"] == "/dev/nvme0n1p2"
    assert facts["rootuuid"] == gen2.root_uuid()
    assert "nvme_core.io_timeout=240" in console

    devices = recorded_devices(console)
    assert {"nvme0n1", "nvme0n1p1", "nvme0n1p2", "sda"} <= set(devices), sorted(devices)
    os_part = devices["nvme0n1p2"]
    assert os_part.env["DEVTYPE"] == "partition"
    assert [n.subsystem for n in os_part.parents[:3]] == ["block", "nvme", "pci"]
    assert os_part.parents[0].attrs["nsid"] == "1"
    assert os_part.parents[1].attrs["model"].startswith("QEMU NVMe Ctrl")
    assert os_part.parents[1].attrs["serial"].strip() == qemu.NVME_SERIAL
    data_disk = devices["sda"]
    assert data_disk.parents[0].kernel.endswith(":1")  # SCSI address H:C:T:LUN, LUN 1

    # The image's own rules files, read from the VHD.
    rules = [image_file(gen2, f"/{path}") for path in sorted(RULE_FILES)]
    assert all(rules)
    assert names(rules, os_part) == []  # QEMU's disks are not Azure's
    assert names(rules, data_disk) == []
    assert names(rules, as_azure(os_part)) == ["disk/azure/os-part2"]
    assert names(rules, as_azure(devices["nvme0n1"])) == ["disk/azure/os"]
    assert names(rules, as_azure(data_disk)) == ["disk/azure/data/by-lun/1"]


def test_the_qemu_command_puts_the_disk_on_nvme_and_data_on_scsi() -> None:
    argv = qemu.qemu_argv(
        disk=Path("/w/os.vhd"),
        disk_format="vpc",
        serial_log=Path("/w/log"),
        disk_interface="nvme",
        data_disks=[Path("/w/d1.raw"), Path("/w/d2.raw")],
    )
    text = " ".join(argv)
    assert "-drive file=/w/os.vhd,format=vpc,if=none,id=os,snapshot=on" in text
    assert "-device nvme,serial=archkernel-os,drive=os,bootindex=0" in text
    assert "-device virtio-scsi-pci,id=data" in text
    assert "-device scsi-hd,drive=data1,bus=data.0,lun=1" in text
    assert "-device scsi-hd,drive=data2,bus=data.0,lun=2" in text
    scsi = " ".join(
        qemu.qemu_argv(disk=Path("/w/os.raw"), serial_log=Path("/l"), disk_interface="scsi")
    )
    assert "-device scsi-hd,drive=os,bus=scsi.0,bootindex=0" in scsi
    with pytest.raises(ValueError, match="disk_interface"):
        qemu.qemu_argv(disk=Path("/d"), serial_log=Path("/l"), disk_interface="sata")


@pytest.mark.integration
def test_qemu_accepts_the_nvme_and_scsi_devices(tmp_path: Path) -> None:
    """QEMU itself makes the machine with these devices: started frozen (-S), its monitor
    (QMP on stdin) shows the NVMe controller with the OS disk and the SCSI data disk, then
    quits it; a device it refused would have ended it at once, with a message."""
    disk = tmp_path / "os.raw"
    data = tmp_path / "data.raw"
    for f in (disk, data):
        f.write_bytes(bytes(1024 * 1024))
    argv = qemu.qemu_argv(
        disk=disk, serial_log=tmp_path / "log", disk_interface="nvme", data_disks=[data]
    )
    commands = [
        {"execute": "qmp_capabilities"},
        {"execute": "human-monitor-command", "arguments": {"command-line": "info qtree"}},
        {"execute": "quit"},
    ]
    done = subprocess.run(
        [*argv, "-S", "-qmp", "stdio"],
        input="".join(json.dumps(c) + "\n" for c in commands),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    replies = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    (qtree,) = [r["return"] for r in replies if isinstance(r.get("return"), str)]
    assert 'drive = "os"' in qtree_device(qtree, "nvme")
    assert 'drive = "data1"' in qtree_device(qtree, "scsi-hd")


def qtree_device(qtree: str, name: str) -> str:
    """The lines `info qtree` gives the device `name`: up to the next device."""
    start = qtree.index(f"dev: {name},")
    end = qtree.find("dev:", start + 1)
    return qtree[start : end if end >= 0 else None]
