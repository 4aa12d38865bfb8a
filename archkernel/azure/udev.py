"""The udev rules the Azure image carries for today's VM sizes, written by archkernel.

- `AZURE_DISK_RULES`: stable names for Azure's disks, `/dev/disk/azure/os`, `resource`
  and `data/by-lun/N` (and `-partN` for their partitions), on both disk controllers:
  SCSI disks are told apart by the VMBus channel of their storvsc controller (fixed
  device IDs for the OS and resource disks, one for the data disks' controller, whose
  SCSI LUN is the data disk's LUN); NVMe disks of the remote-disk controller by namespace
  (1: the OS disk, 2 + N: the data disk of LUN N); local NVMe disks get
  `local/by-serial/SERIAL`. azure-vm-utils gives the same names; it has no Arch package.
- `SRIOV_RULES`: the SR-IOV virtual function of accelerated networking (a Mellanox or MANA
  NIC behind the Hyper-V PCI bus) is left alone by networkd and NetworkManager; the
  address stays on the synthetic hv_netvsc NIC it is bonded to.
- `PTP_RULES`: Hyper-V's PTP clock at /dev/ptp_hyperv, whatever its /dev/ptpN number.

udev keys that look at parents (`ATTRS`, `KERNELS`, `DRIVERS`) must all match on one
device; where two ancestors decide (the controller's channel and the LUN), a first rule
records one in a variable the second reads.
"""

from __future__ import annotations

DISK_RULES_FILE = "etc/udev/rules.d/66-archkernel-azure-disk.rules"
SRIOV_RULES_FILE = "etc/udev/rules.d/66-archkernel-azure-sriov.rules"
PTP_RULES_FILE = "etc/udev/rules.d/66-archkernel-hyperv-ptp.rules"

# Hyper-V's storvsc channels (the VMBus device_id of the SCSI controller).
OS_DISK_CHANNEL = "{00000000-0000-8899-0000-000000000000}"
RESOURCE_DISK_CHANNEL = "{00000000-0001-8899-0000-000000000000}"
DATA_DISK_CHANNEL = "{f8b3781a-1e82-4818-a1c3-63d806ec15bb}"
# The NVMe controllers' model numbers: remote (managed) disks, and local disks.
NVME_REMOTE_MODEL = "MSFT NVMe Accelerator v1.0"
NVME_LOCAL_MODEL = "Microsoft NVMe Direct Disk*"
# Azure attaches at most 64 data disks (LUN 0-63).
DATA_LUNS = range(64)
# The drivers of the virtual functions' PCI devices, and of their network interfaces.
VF_PCI_DRIVERS = ("mlx4_core", "mlx5_core", "mana")
VF_NET_DRIVERS = ("mlx4_en", "mlx4_core", "mlx5_core", "mana")
PTP_DEVICE = "ptp_hyperv"


def azure_disk_rules() -> str:
    """/dev/disk/azure/... for the OS, resource and data disks on SCSI and NVMe."""
    lines = [
        "# Written by archkernel: stable names for Azure's disks on SCSI and NVMe.",
        'ACTION=="remove", GOTO="archkernel_azure_disk_end"',
        'SUBSYSTEM!="block", GOTO="archkernel_azure_disk_end"',
        'ENV{DEVTYPE}=="partition", ENV{AZURE_DISK_PART}="-part%n"',
        "# SCSI (storvsc): the VMBus channel of the controller says which disk it is.",
        f'ATTRS{{device_id}}=="{OS_DISK_CHANNEL}", ENV{{AZURE_DISK}}="os"',
        f'ATTRS{{device_id}}=="{RESOURCE_DISK_CHANNEL}", ENV{{AZURE_DISK}}="resource"',
        f'ATTRS{{device_id}}=="{DATA_DISK_CHANNEL}", ENV{{AZURE_DISK}}="scsi-data"',
        "# NVMe: the controller's model, then the namespace (1: OS disk, 2+N: LUN N).",
        f'KERNEL=="nvme*", ATTRS{{model}}=="{NVME_REMOTE_MODEL}", ENV{{AZURE_DISK}}="nvme"',
        f'KERNEL=="nvme*", ATTRS{{model}}=="{NVME_LOCAL_MODEL}", ENV{{AZURE_DISK}}="local"',
        'ENV{AZURE_DISK}=="nvme", ATTRS{nsid}=="1", ENV{AZURE_DISK}="os"',
    ]
    for lun in DATA_LUNS:
        lines.append(
            f'ENV{{AZURE_DISK}}=="scsi-data", KERNELS=="*:*:*:{lun}", '
            f'ENV{{AZURE_DISK}}="data", ENV{{AZURE_DISK_LUN}}="{lun}"'
        )
    for lun in DATA_LUNS:
        lines.append(
            f'ENV{{AZURE_DISK}}=="nvme", ATTRS{{nsid}}=="{lun + 2}", '
            f'ENV{{AZURE_DISK}}="data", ENV{{AZURE_DISK_LUN}}="{lun}"'
        )
    lines += [
        'ENV{AZURE_DISK}=="os|resource", '
        'SYMLINK+="disk/azure/$env{AZURE_DISK}$env{AZURE_DISK_PART}"',
        'ENV{AZURE_DISK}=="data", ENV{AZURE_DISK_LUN}=="?*", '
        'SYMLINK+="disk/azure/data/by-lun/$env{AZURE_DISK_LUN}$env{AZURE_DISK_PART}"',
        'ENV{AZURE_DISK}=="local", ENV{ID_SERIAL_SHORT}=="?*", '
        'SYMLINK+="disk/azure/local/by-serial/$env{ID_SERIAL_SHORT}$env{AZURE_DISK_PART}"',
        'LABEL="archkernel_azure_disk_end"',
    ]
    return "\n".join(lines) + "\n"


def sriov_rules() -> str:
    """The SR-IOV virtual function unmanaged, told by its drivers (not by its name)."""
    drivers = "|".join(VF_PCI_DRIVERS)
    return (
        "# Written by archkernel: accelerated networking's virtual function is bonded to the\n"
        "# synthetic NIC by the kernel and may vanish at any time; nothing may configure it.\n"
        'SUBSYSTEM!="net", GOTO="archkernel_azure_sriov_end"\n'
        'ACTION=="remove", GOTO="archkernel_azure_sriov_end"\n'
        'DRIVERS=="hv_pci", ENV{AZURE_HV_PCI}="1"\n'
        f'ENV{{AZURE_HV_PCI}}=="1", DRIVERS=="{drivers}", '
        'ENV{ID_NET_MANAGED_BY}="unmanaged", ENV{NM_UNMANAGED}="1"\n'
        'LABEL="archkernel_azure_sriov_end"\n'
    )


def ptp_rules() -> str:
    """/dev/ptp_hyperv: the Hyper-V host's clock, the one chrony reads."""
    return (
        "# Written by archkernel: a stable name for Hyper-V's PTP clock (chrony's refclock).\n"
        f'ACTION!="remove", SUBSYSTEM=="ptp", ATTR{{clock_name}}=="hyperv", '
        f'SYMLINK+="{PTP_DEVICE}"\n'
    )
