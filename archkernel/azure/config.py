"""What the Azure image's configuration files say: pure functions from settings to text.

Each function returns the full content of a file the build owns (drop-ins where the
distribution has a drop-in directory), or edits a distribution file's text in a way that
fails loudly when the expected line is not there (the old scripts' `sed` on `MODULES=""`
silently did nothing once mkinitcpio switched to `MODULES=()`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from archkernel.azure import admins, chrony, udev, users
from archkernel.errors import UserError
from archkernel.settings import AzureSettings

# Loaded at boot so the provisioning DVD (UDF, behind the ATA driver) is there in time.
PROVISIONING_MODULES = ["ata_piix", "sr_mod", "cdrom", "udf"]
HYPERV_REQUIRED = ["hv_vmbus", "hv_storvsc", "hv_netvsc"]
MKINITCPIO_HOOKS = ["base", "udev", "modconf", "block", "filesystems", "keyboard", "fsck"]
CLOUD_INIT_UNITS = [
    "cloud-init-main.service",
    "cloud-init-local.service",
    "cloud-init-network.service",
    "cloud-init.service",
    "cloud-config.service",
    "cloud-final.service",
]
BASE_UNITS = ["systemd-networkd.service", "systemd-resolved.service", "sshd.service"]
PACMAN_INIT_UNIT = "pacman-init.service"
# chrony when the image has it (the Hyper-V clock), else systemd-timesyncd.
OPTIONAL_UNITS = [chrony.UNIT, chrony.TIMESYNCD_UNIT, PACMAN_INIT_UNIT]
WAAGENT_UNIT = "waagent.service"
WAAGENT_DROPIN = "etc/systemd/system/waagent.service.d/10-archkernel-udev.conf"
SSHD_DROPIN = "etc/ssh/sshd_config.d/10-archkernel-azure.conf"
CLOUD_INIT_DROPIN = "etc/cloud/cloud.cfg.d/90-archkernel-azure.cfg"
# cloud-init's network stage: cloud-init.service up to 24.2, cloud-init-network.service since.
CLOUD_INIT_NETWORK_UNITS = ("cloud-init.service", "cloud-init-network.service")
CLOUD_INIT_DBUS_DROPINS = tuple(
    f"etc/systemd/system/{unit}.d/10-archkernel-dbus.conf" for unit in CLOUD_INIT_NETWORK_UNITS
)
WAAGENT_CONF = "etc/waagent.conf"
# Where systemd units are found in a root tree, distribution's first.
UNIT_DIRS = ("usr/lib/systemd/system", "etc/systemd/system")


@dataclass(frozen=True)
class File:
    """A file the build writes into the image: its path under the root, its text, its mode."""

    path: str
    text: str
    mode: int = 0o644


def pacman_conf(mirror: str, gpgdir: str | None = None, cache_dir: str | None = None) -> str:
    """A pacman.conf for a build from `mirror` (Arch's `$repo`/`$arch` placeholders kept),
    with the keyring `gpgdir` and the package cache `cache_dir` (azure.package_cache;
    pacstrap -c makes pacman use it rather than a cache inside the new root)."""
    lines = [
        "# Written by archkernel for the Azure image build.",
        "[options]",
        "Architecture = x86_64",
        "SigLevel = Required DatabaseOptional",
        "LocalFileSigLevel = Optional",
        "ParallelDownloads = 5",
    ]
    if gpgdir:
        lines.append(f"GPGDir = {gpgdir}")
    if cache_dir:
        if any(c.isspace() for c in cache_dir):
            # pacman splits CacheDir's value at blanks (it may name several directories).
            raise UserError(
                f"azure.package_cache: pacman cannot use {cache_dir!r}: it holds a blank",
                "choose a directory whose path has no spaces",
            )
        lines.append(f"CacheDir = {cache_dir.rstrip('/')}/")
    for repo in ("core", "extra"):
        lines += ["", f"[{repo}]", f"Server = {mirror}"]
    return "\n".join(lines) + "\n"


# The Arch Linux Archive: a snapshot of the official repositories for every day, under
# repos/YYYY/MM/DD/ with a mirror's layout below it.
ARCHIVE_URL = "https://archive.archlinux.org"


def archive_server(date: str) -> str:
    """The pacman `Server` of the Arch Linux Archive's snapshot of `date` (`YYYY-MM-DD`)."""
    year, month, day = date.split("-")
    return f"{ARCHIVE_URL}/repos/{year}/{month}/{day}/$repo/os/$arch"


def repository_server(settings: AzureSettings) -> str:
    """Where the pacman.conf archkernel writes takes the packages from: the archive's
    snapshot of azure.archive_date when it is set (pinned), else azure.mirror (live)."""
    if settings.archive_date is not None:
        return archive_server(settings.archive_date)
    return settings.mirror


def mirror_probe_url(mirror: str) -> str:
    """The URL of core's database on `mirror`, to see whether it answers."""
    return mirror.replace("$repo", "core").replace("$arch", "x86_64").rstrip("/") + "/core.db"


# Where the EFI system partition is mounted: /efi, as in Arch's own cloud images (the
# kernel and GRUB's files stay on the root file system; only BOOTX64.EFI is on the ESP).
ESP_MOUNT = "/efi"
# nofail: a missing vfat driver or a damaged ESP must not keep the VM from booting (the
# firmware has already read what it needs); umask: only root reads boot files.
ESP_OPTIONS = "umask=0077,nofail"


def fstab(root_uuid: str, esp_volume: str | None = None) -> str:
    """fstab by UUID (the build chose the UUIDs); no swap on the OS disk. With
    `esp_volume` (the FAT volume ID, `1234-ABCD`), the EFI system partition at /efi."""
    text = (
        "# Written by archkernel. The root file system, by UUID; no swap on the OS disk\n"
        "# (Azure puts swap on the resource disk, through the provisioning agent).\n"
        f"UUID={root_uuid}\t/\text4\trw,relatime\t0 1\n"
    )
    if esp_volume is not None:
        text += (
            "# The EFI system partition, so the running system can update the boot loader.\n"
            f"UUID={esp_volume}\t{ESP_MOUNT}\tvfat\t{ESP_OPTIONS}\t0 2\n"
        )
    return text


def locale_gen(locale: str) -> str:
    """/etc/locale.gen naming just the image's locale."""
    charset = locale.split(".", 1)[1] if "." in locale else "ISO-8859-1"
    return f"# Written by archkernel.\n{locale} {charset}\n"


NETWORK_FILE = "etc/systemd/network/20-eth0.network"
VF_NETWORK_FILE = "etc/systemd/network/10-azure-sriov-vf.network"


def networkd_eth0() -> str:
    """DHCP on eth0 (net.ifnames=0 keeps the name) with systemd-networkd: the synthetic
    NIC (hv_netvsc on Azure, whatever QEMU gives in a boot test), never a virtual function
    of accelerated networking, whatever name the kernel gave it."""
    return (
        "# Written by archkernel: Azure's NIC, named eth0 by net.ifnames=0; not an SR-IOV VF.\n"
        f"[Match]\nName=eth0\nDriver=!{' '.join(udev.VF_NET_DRIVERS)}\n\n"
        "[Network]\nDHCP=yes\n\n[DHCPv4]\nUseDomains=true\n"
    )


def networkd_vf() -> str:
    """networkd leaves accelerated networking's virtual function alone (udev's
    ID_NET_MANAGED_BY says so too, for networkd >= 255): the kernel bonds it to eth0."""
    return (
        "# Written by archkernel: the SR-IOV VF is the synthetic NIC's data path, unmanaged.\n"
        f"[Match]\nDriver={' '.join(udev.VF_NET_DRIVERS)}\n\n[Link]\nUnmanaged=yes\n"
    )


def sshd_dropin(password_login: bool) -> str:
    """sshd settings: keep-alive under Azure's 4-minute idle timeout, no root login."""
    lines = [
        "# Written by archkernel for Azure.",
        "# Azure's load balancer drops TCP connections idle for 4 minutes.",
        "ClientAliveInterval 180",
        "PermitRootLogin no",
    ]
    if not password_login:
        lines += ["PasswordAuthentication no", "KbdInteractiveAuthentication no"]
    return "\n".join(lines) + "\n"


def sudoers_wheel() -> str:
    """sudo for the wheel group."""
    return "# Written by archkernel.\n%wheel ALL=(ALL:ALL) ALL\n"


def modules_load() -> str:
    """modules-load.d: the drivers the provisioning DVD needs, loaded at boot."""
    return (
        "# Written by archkernel: the provisioning DVD (ovf-env.xml) is UDF on an ATAPI drive.\n"
        + "\n".join(PROVISIONING_MODULES)
        + "\n"
    )


def cloud_init_cfg() -> str:
    """cloud-init: Azure's datasource only, and the resource disk formatted and mounted."""
    return """\
# Written by archkernel: provision from Azure only.
datasource_list: [ Azure ]
datasource:
  Azure:
    apply_network_config: true
# Provisioning diagnostics for the platform through Hyper-V KVP, as other distributions do.
reporting:
  telemetry:
    type: hyperv
# The resource disk (ephemeral0) holds swap and scratch space, never the OS disk.
disk_setup:
  ephemeral0:
    table_type: gpt
    layout: [66, [33, 82]]
    overwrite: true
fs_setup:
  - device: ephemeral0.1
    filesystem: ext4
  - device: ephemeral0.2
    filesystem: swap
mounts:
  - ["ephemeral0.1", "/mnt/resource"]
  - ["ephemeral0.2", "none", "swap", "sw,nofail,x-systemd.requires=cloud-init.service", "0", "0"]
"""


def waagent_values(provisioning: str) -> dict[str, str]:
    """waagent.conf values: the agent provisions, or leaves it (and the disk) to cloud-init."""
    if provisioning == "waagent":
        return {
            "Provisioning.Agent": "waagent",
            "Provisioning.Enabled": "y",
            "ResourceDisk.Format": "y",
            "ResourceDisk.Filesystem": "ext4",
            "ResourceDisk.MountPoint": "/mnt/resource",
            "ResourceDisk.EnableSwap": "y",
            "ResourceDisk.SwapSizeMB": "2048",
        }
    return {
        "Provisioning.Agent": "cloud-init",
        "Provisioning.Enabled": "n",
        "ResourceDisk.Format": "n",
        "ResourceDisk.EnableSwap": "n",
    }


def set_conf_values(text: str, values: Mapping[str, str]) -> str:
    """`Key=Value` lines set in a waagent-style file: existing lines (even commented) are
    replaced in place, missing keys appended; everything else is kept."""
    out: list[str] = []
    done: set[str] = set()
    for line in text.splitlines():
        m = re.match(r"^\s*#?\s*([A-Za-z][\w.]*)\s*=", line)
        key = m.group(1) if m else None
        if key is not None and key in values:
            if key not in done:
                out.append(f"{key}={values[key]}")
                done.add(key)
            continue
        out.append(line)
    missing = [k for k in values if k not in done]
    if missing:
        out.append("# Added by archkernel")
        out += [f"{k}={values[k]}" for k in missing]
    return "\n".join(out) + "\n"


def read_conf_values(text: str) -> dict[str, str]:
    """The effective `Key=Value` settings of a waagent-style file (comments ignored)."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"^\s*([A-Za-z][\w.]*)\s*=\s*(.*?)\s*$", line)
        if m:
            values[m.group(1)] = m.group(2)
    return values


def waagent_dropin() -> str:
    """Start waagent once udev has settled, so the provisioning DVD's device exists."""
    return (
        "# Written by archkernel: the agent looks for the provisioning DVD once, at start.\n"
        "[Unit]\nWants=systemd-udev-settle.service\nAfter=systemd-udev-settle.service\n"
    )


def cloud_init_dbus_dropin() -> str:
    """cloud-init's network stage after D-Bus. On Arch it sets the running host name (the
    one from the provisioning media) with `hostnamectl`, which needs the system bus; Arch's
    rendering of the unit does not order it after D-Bus (SUSE's does), and without it the
    VM keeps the image's host name until its next boot."""
    return (
        "# Written by archkernel: cloud-init sets the host name with hostnamectl (D-Bus).\n"
        "[Unit]\nWants=dbus.socket\nAfter=dbus.socket\n"
    )


def pacman_init_unit() -> str:
    """A first-boot unit that makes the image's own pacman keyring (none ships in it)."""
    return """\
[Unit]
Description=Initialise the pacman keyring on first boot (archkernel)
ConditionDirectoryNotEmpty=!/etc/pacman.d/gnupg
# Not before cloud-init's network stage: that runs before sysinit.target, this after it
# (default dependencies); ordering one before the other is a cycle, and systemd breaks it
# by dropping cloud-init's job (no user, no keys: provisioning fails).
Before=sshd.service waagent.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/bin/pacman-key --init
ExecStart=/usr/bin/pacman-key --populate

[Install]
WantedBy=multi-user.target
"""


def _array(values: Sequence[str]) -> str:
    return "(" + " ".join(values) + ")"


def mkinitcpio_conf(text: str, modules: Sequence[str]) -> str:
    """mkinitcpio.conf with MODULES set and HOOKS fixed, without `autodetect`.

    autodetect would keep only the build host's modules, which left the Hyper-V drivers
    out of the old images. Raises UserError when there is no MODULES= or HOOKS= line.
    """
    out, seen = [], set()
    for line in text.splitlines():
        m = re.match(r"^\s*(MODULES|HOOKS)\s*=", line)
        if m:
            key = m.group(1)
            seen.add(key)
            value = _array(modules) if key == "MODULES" else _array(MKINITCPIO_HOOKS)
            out.append(f"{key}={value}")
            continue
        out.append(line)
    for key in ("MODULES", "HOOKS"):
        if key not in seen:
            raise UserError(
                f"mkinitcpio.conf has no {key}= line to set",
                "the mkinitcpio package of the image looks unusual; check /etc/mkinitcpio.conf",
            )
    return "\n".join(out) + "\n"


def lock_root(shadow: str) -> str:
    """/etc/shadow with root's password locked (`!*`); other lines unchanged."""
    out, found = [], False
    for line in shadow.splitlines():
        fields = line.split(":")
        if fields[0] == "root" and len(fields) > 1:
            fields[1] = "!*"
            found = True
            line = ":".join(fields)
        out.append(line)
    if not found:
        raise UserError("the image's /etc/shadow has no root entry", "check the base package")
    return "\n".join(out) + "\n"


def shadow_password(shadow: str, user: str) -> str | None:
    """The password field of `user` in shadow text, or None when there is no such user."""
    for line in shadow.splitlines():
        fields = line.split(":")
        if fields[0] == user and len(fields) > 1:
            return fields[1]
    return None


def system_files(settings: AzureSettings, root_uuid: str, esp_volume: str | None) -> list[File]:
    """The files step 3 writes into the image: names, locale, keymap, fstab, network, sshd,
    sudo, the provisioning DVD's drivers, the first-boot keyring unit, and what today's VM
    sizes need (archkernel.azure.vmsizes checks it): the Azure disk names, the SR-IOV VF
    left unmanaged, the Hyper-V PTP clock for chrony."""
    return [
        File("etc/hostname", settings.hostname + "\n"),
        File("etc/locale.gen", locale_gen(settings.locale)),
        File("etc/locale.conf", f"LANG={settings.locale}\n"),
        File("etc/vconsole.conf", f"KEYMAP={settings.keymap}\n"),
        File("etc/fstab", fstab(root_uuid, esp_volume)),
        File(NETWORK_FILE, networkd_eth0()),
        File(VF_NETWORK_FILE, networkd_vf()),
        File(udev.DISK_RULES_FILE, udev.azure_disk_rules()),
        File(udev.SRIOV_RULES_FILE, udev.sriov_rules()),
        File(udev.PTP_RULES_FILE, udev.ptp_rules()),
        File(chrony.CONF_FILE, chrony.chrony_conf()),
        File(SSHD_DROPIN, sshd_dropin(users.password_login(settings.user))),
        File("etc/sudoers.d/10-wheel", sudoers_wheel(), 0o440),
        File("etc/modules-load.d/azure-provisioning.conf", modules_load()),
        File(f"usr/lib/systemd/system/{PACMAN_INIT_UNIT}", pacman_init_unit()),
    ]


def system_links(timezone: str) -> dict[str, str]:
    """The symbolic links step 3 makes in the image (path under the root -> target)."""
    return {
        "etc/localtime": f"/usr/share/zoneinfo/{timezone}",
        "etc/resolv.conf": "/run/systemd/resolve/stub-resolv.conf",
    }


def _optional_units(available: set[str]) -> list[str]:
    """The optional units the image has; not timesyncd when chrony is there."""
    units = [u for u in OPTIONAL_UNITS if u in available]
    if chrony.UNIT in units:
        units = [u for u in units if u != chrony.TIMESYNCD_UNIT]
    return units


def configured_units(available: set[str]) -> list[str]:
    """The units step 3 enables: those of the base and optional ones the image has."""
    return [u for u in BASE_UNITS if u in available] + _optional_units(available)


def agent_units(settings: AzureSettings, available: set[str]) -> list[str]:
    """The units step 4 enables: those of `units_to_enable` that step 3 did not."""
    return [u for u in units_to_enable(settings, available) if u not in BASE_UNITS]


def units_to_enable(settings: AzureSettings, available: set[str]) -> list[str]:
    """The systemd units the image enables, for the units its packages ship."""
    units = configured_units(available)
    if settings.provisioning == "cloud-init":
        units += [u for u in CLOUD_INIT_UNITS if u in available]
    if settings.provisioning == "waagent" or settings.extensions:
        units += [WAAGENT_UNIT, admins.PATH_UNIT]
    return units


def grub_cmdline(root_uuid: str, cmdline: str) -> str:
    """The kernel command line GRUB passes: the root by UUID, then the settings' line."""
    return f"root=UUID={root_uuid} rw {cmdline}"
