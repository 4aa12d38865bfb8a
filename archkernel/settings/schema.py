"""The settings file's shape: its sections, their keys, defaults and descriptions.

The sections are frozen standard dataclasses; pydantic validates the raw TOML into them
(`archkernel.settings.loading.validate`), reading the value types of
`archkernel.settings.types`.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from archkernel.settings.types import (
    SHA256,
    ArchiveDate,
    Bounds,
    Check,
    Cmdline,
    DiskSize,
    FileName,
    HostName,
    IPv4,
    Keymap,
    Locale,
    MirrorURL,
    ModuleName,
    OneLinePath,
    PackageName,
    PasswordHash,
    RelativeName,
    Secret,
    SSHKey,
    SystemPath,
    Tag,
    Text,
    TimeZone,
    UserName,
    _size,
)
from archkernel.units import GiB, MiB


def setting(default: Any, doc: str) -> Any:
    """A settings field: its default and the description `settings.toml.example` shows."""
    if isinstance(default, list):
        return field(default_factory=default.copy, metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


def required(doc: str) -> Any:
    """A settings field without a default."""
    return field(metadata={"doc": doc})


class Section:
    """Base of every settings section: unknown keys are errors, defaults are validated too.

    A section built directly (`AzureSettings(generation=2)`) is not validated, only its
    rules across keys are checked: values from users go through `validate` (or `load`).
    """

    __pydantic_config__: ClassVar[dict[str, Any]] = {"extra": "forbid", "validate_default": True}
    __dataclass_fields__: ClassVar[dict[str, Any]]  # every section is a dataclass


# --- sections -----------------------------------------------------------------------------


def _module_options(value: list[str]) -> list[str]:
    from archkernel.scaleway.modparams import check_options_line

    for line in value:
        check_options_line(line)
    return value


def _cmdline_names(value: list[str]) -> list[str]:
    import re

    for name in value:
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}", name):
            raise ValueError(f"{name!r} is not a kernel command-line parameter name")
    return value


# "MODULE PARAM=VALUE ...", a modprobe.d `options` line each (archkernel.scaleway.modparams)
ModuleOptions = Annotated[list[str], Check(_module_options)]
CmdlineNames = Annotated[list[str], Check(_cmdline_names)]


@dataclass(frozen=True, kw_only=True)
class ScalewaySettings(Section):
    """`[scaleway]`: boot the Arch kernel on a Scaleway C1 by kexec."""

    root: OneLinePath = setting(Path("/"), "the system every path below is taken under")
    tftp_server: IPv4 | None = setting(
        None, "TFTP server; default: the bootserver line of /proc/net/pnp"
    )
    fallback_tftp_server: IPv4 = setting("10.1.31.34", "used when pnp names none")
    tftp_port: Annotated[int, Bounds(ge=1, le=65535)] = setting(69, "TFTP port")
    tftp_timeout: Annotated[float, Bounds(gt=0, le=300)] = setting(
        5.0, "seconds to wait for a packet"
    )
    tftp_retries: Annotated[int, Bounds(ge=0, le=20)] = setting(3, "retries after a timeout")
    tftp_blksize: Annotated[int, Bounds(ge=8, le=65464)] = setting(
        1468, "TFTP block size (RFC 2348)"
    )
    tftp_max_size: Annotated[int, Bounds(ge=MiB, le=4 * GiB), Check(_size, before=True)] = setting(
        256 * MiB, "largest file fetched over TFTP (MiB or GiB); a larger one is refused"
    )
    tftp_deadline: Annotated[float, Bounds(gt=0, le=86400)] = setting(
        300.0, "seconds one TFTP transfer may take in all"
    )
    max_initrd_unpacked: Annotated[int, Bounds(ge=MiB, le=16 * GiB), Check(_size, before=True)] = (
        setting(1024 * MiB, "most the initrd's archives may unpack to (MiB or GiB)")
    )
    max_initrd_ratio: Annotated[int, Bounds(ge=2, le=10000)] = setting(
        100, "most times its packed size the initrd may unpack to (above 32 MiB)"
    )
    bootscript: RelativeName = setting("uboot.bootscript", "bootscript name on TFTP")
    kernel: SystemPath = setting("/boot/zImage", "the Arch kernel to kexec")
    kernel_version: Text | None = setting(
        None,
        "default: the modules directory of the package that owns `kernel` in pacman's "
        "database, else the one with a pkgbase file, else the one matching the image",
    )
    modules: list[ModuleName] = setting(
        ["mvneta", "nbd"], "modules added to the initrd, with their dependencies"
    )
    optional_modules: list[ModuleName] = setting(
        ["mvneta_bm"], "added when the kernel has them; a warning otherwise"
    )
    module_options: ModuleOptions = setting(
        [],
        'insmod parameters, "MODULE PARAM=VALUE ..." each as in modprobe.d, e.g. '
        '["nbd nbds_max=3"]; the kexec command line\'s module.param=value wins',
    )
    output_initrd: SystemPath = setting(
        "/boot/initramfs-archkernel.img", "where the patched initrd is written"
    )
    compression: Literal["gzip", "xz", "zstd", "lz4", "none"] = setting(
        "gzip", "compression of the added archive"
    )
    extra_cmdline: Cmdline = setting(
        "is_in_kexec=yes NO_SIGNAL_STATE=1 DONT_FETCH_KERNEL_MODULES=1 NO_NTPDATE=1 archkernel",
        "appended to the current command line",
    )
    drop_cmdline: CmdlineNames = setting(
        ["ip"],
        "parameters of the current command line left off the kexec line: ip= would start "
        "the kernel's own network configuration before the NIC's module is loaded",
    )
    dtb: SystemPath | None = setting(None, "device tree for kexec --dtb (optional)")
    disable_tag: Tag = setting("archkernel_disabled", "server tag that disables us")


@dataclass(frozen=True, kw_only=True)
class AzureUser(Section):
    """`[azure.user]`: an administrator created at build time (root stays locked)."""

    name: UserName = required("login name; member of wheel")
    ssh_authorized_keys: list[SSHKey] = setting([], "public keys for ~/.ssh")
    password_hash: PasswordHash | None = setting(None, "crypt(3) hash; omit for key-only login")


def _seed(value: str) -> str:
    if not value.strip() or len(value) > 256 or any(c in value for c in "\n\r\0"):
        raise ValueError("must be one line of 1 to 256 characters, not blank")
    return value


# Any text: the IDs are derived from it (archkernel.azure.ids), it is not one of them.
Seed = Annotated[str, Check(_seed)]

DEFAULT_PACKAGES = [
    "base",
    "linux",
    "mkinitcpio",
    "grub",
    "openssh",
    "sudo",
    "cloud-init",
    "chrony",
    "python",
    "which",
    "less",
    "vim",
]
VmFeature = Literal["disk-names", "accelerated-networking", "ptp-clock", "kvp-telemetry"]
VM_FEATURES: tuple[VmFeature, ...] = (
    "disk-names",
    "accelerated-networking",
    "ptp-clock",
    "kvp-telemetry",
)
DEFAULT_KEYRING = Path("/usr/share/keyrings/archlinux.gpg")


@dataclass(frozen=True, kw_only=True)
class AzurePublishSettings(Section):
    """`[azure.publish]`: take the verified VHD into Azure (workflow azure_publish)."""

    target: Literal["gallery", "blob"] = setting(
        "gallery", "gallery (managed disk, then a Compute Gallery image version) or blob"
    )
    blob_url: Secret | None = setting(
        None,
        "target blob: the page blob's URL; a SAS in it is used as is, else credentials "
        "come from AZURE_STORAGE_CONNECTION_STRING or DefaultAzureCredential",
    )
    subscription: Text | None = setting(None, "target gallery: the subscription ID")
    resource_group: Text | None = setting(None, "target gallery: resource group (must exist)")
    region: Text | None = setting(None, "target gallery: region of the disk, gallery, image")
    gallery: Text = setting("archlinux", "Compute Gallery name (made when missing)")
    image_definition: Text = setting("archlinux", "image definition name (made when missing)")
    image_version: Text | None = setting(None, "image version to make: MAJOR.MINOR.PATCH")
    publisher: Text = setting("archkernel", "image definition's publisher")
    offer: Text = setting("archlinux", "image definition's offer")
    sku: Text = setting("rolling", "image definition's SKU")
    target_regions: list[Text] = setting([], "regions the version is replicated to; default region")
    replica_count: Annotated[int, Bounds(ge=1, le=50)] = setting(1, "replicas per region")
    disk_controller_types: list[Literal["SCSI", "NVMe"]] = setting(
        ["SCSI", "NVMe"], "the image's DiskControllerTypes"
    )
    security_type: Literal["Standard", "TrustedLaunchSupported", "TrustedLaunch"] = setting(
        "Standard", "the image's SecurityType (not Standard needs a generation 2 image)"
    )
    disk_name: Text | None = setting(
        None, "upload disk; default <image_definition>-<version>-upload"
    )
    keep_disk: bool = setting(False, "keep the upload disk once the image version exists")
    access_seconds: Annotated[int, Bounds(ge=300, le=86400)] = setting(
        3600, "lifetime of the upload SAS (renewed when it expires)"
    )
    parallel: Annotated[int, Bounds(ge=1, le=64)] = setting(8, "page writes in flight")
    arm_endpoint: Text = setting(
        "https://management.azure.com", "Azure Resource Manager (another cloud's, or a stand-in)"
    )


@dataclass(frozen=True, kw_only=True)
class AzureSettings(Section):
    """`[azure]`: build an Arch Linux image that Azure accepts."""

    disk_size: DiskSize = setting(
        30 * GiB,
        "virtual disk size, whole MiB: 30GiB, 512MiB; a bare number counts bytes, so 30 is refused",
    )
    partition_table: Literal["gpt", "mbr"] = setting("gpt", "gpt (BIOS boot) or mbr")
    filesystem: Literal["ext4"] = setting("ext4", "root file system")
    hostname: HostName = setting("archlinux", "host name of the image")
    locale: Locale = setting("en_US.UTF-8", "system locale")
    timezone: TimeZone = setting("UTC", "time zone under /usr/share/zoneinfo")
    keymap: Keymap = setting("us", "console keymap")
    mirror: MirrorURL = setting(
        "https://geo.mirror.pkgbuild.com/$repo/os/$arch",
        "Arch mirror used when pacman_conf is not given",
    )
    archive_date: ArchiveDate | None = setting(
        None,
        "install from the Arch Linux Archive's snapshot of this day (YYYY-MM-DD) instead of "
        "mirror: the same packages on every build",
    )
    pacman_conf: OneLinePath | None = setting(
        None, "a pacman.conf used as given (local mirror, cache, test repository)"
    )
    package_cache: OneLinePath | None = setting(
        None,
        "pacman's package cache (CacheDir) for the build from mirror, worth keeping between "
        "builds (CI); default: pacman's own",
    )
    packages: list[PackageName] = setting(DEFAULT_PACKAGES, "packages installed by pacstrap")
    extra_packages: list[PackageName] = setting([], "installed in addition")
    provisioning: Literal["cloud-init", "waagent"] = setting(
        "cloud-init", "what provisions host name, user and keys"
    )
    extensions: bool = setting(False, "also install waagent for VM extensions")
    agent_package: PackageName = setting(
        "walinuxagent", "package of the Azure Linux Agent (AUR or your repository)"
    )
    cloud_init_package: PackageName = setting("cloud-init", "package of cloud-init")
    kernel_cmdline: Cmdline = setting(
        "console=ttyS0,115200 earlyprintk=ttyS0 rootdelay=300 net.ifnames=0 "
        "nvme_core.io_timeout=240",
        "kernel command line after root=UUID=...",
    )
    initramfs_modules: list[ModuleName] = setting(
        ["hv_vmbus", "hv_storvsc", "hv_netvsc", "hv_utils", "nvme", "pci-hyperv"],
        "modules forced into the initramfs",
    )
    vm_features: list[VmFeature] = setting(
        list(VM_FEATURES),
        "what today's VM sizes need, each checked by verify: disk-names (/dev/disk/azure), "
        "accelerated-networking (VF drivers, VF unmanaged), ptp-clock (chrony on "
        "/dev/ptp_hyperv), kvp-telemetry (cloud-init); NVMe follows "
        "publish.disk_controller_types",
    )
    output: FileName = setting("archlinux-azure.vhd", "VHD file name under workdir")
    seed: Seed | None = setting(
        None,
        "every ID of the image (root UUID, ESP volume ID, GPT GUIDs, ext4 hash seed, VHD "
        "unique ID) derives from it; default: a digest of the settings that shape the image",
    )
    boottest_marker: Text = setting("login:", "console text azure_boottest waits for")
    boottest_timeout: Annotated[float, Bounds(gt=0, le=7200)] = setting(
        600.0, "seconds azure_boottest waits for the marker"
    )
    boottest_mode: Literal["console", "provision"] = setting(
        "console",
        "console: wait for boottest_marker on the serial console; provision: boot with a "
        "local Azure fabric (DVD, wireserver, IMDS, Azure's DHCP in a network namespace: "
        "needs root, ip and dnsmasq) and prove over SSH that the agent provisioned host "
        "name, user and key (workdir/azure/provision.json)",
    )
    boottest_ssh_key: OneLinePath | None = setting(
        None,
        "private key (its .pub beside it) the provision boot test gives the VM's user; "
        "default: a throwaway ed25519 key pair made for each boot",
    )
    generation: Annotated[int, Bounds(ge=1, le=2)] = setting(
        1, "Azure VM generation: 1 (BIOS) or 2 (UEFI)"
    )
    boot: Literal["bios", "uefi", "hybrid"] | None = setting(
        None, "firmware the image boots with; default bios (gen 1), uefi (gen 2)"
    )
    builder: Literal["host", "container"] = setting(
        "host", "run build tools on the host, or in an Arch bootstrap environment"
    )
    container_runtime: Literal["chroot", "docker", "podman"] = setting(
        "chroot", "how the bootstrap environment runs (builder = container)"
    )
    bootstrap_mirror: MirrorURL = setting(
        "https://geo.mirror.pkgbuild.com/iso/latest",
        "where the newest Arch bootstrap tarball and its signature are found",
    )
    bootstrap_tarball: Text | None = setting(
        None, "a bootstrap tarball by path or URL instead (needs bootstrap_sha256)"
    )
    bootstrap_sha256: SHA256 | None = setting(None, "SHA-256 of bootstrap_tarball")
    bootstrap_keyring: Path = setting(
        DEFAULT_KEYRING, "OpenPGP keys that may sign the bootstrap tarball (Arch's master keys)"
    )
    user: AzureUser | None = setting(None, "optional build-time administrator")
    publish: AzurePublishSettings = field(default_factory=AzurePublishSettings)

    def __post_init__(self) -> None:
        # Rules across keys; pydantic reports a ValueError here as an error of `azure`.
        boot = self.firmware
        if self.generation == 1 and boot == "uefi":
            raise ValueError("generation 1 VMs boot BIOS: use boot = 'bios' or 'hybrid'")
        if self.generation == 2 and boot == "bios":
            raise ValueError("generation 2 VMs boot UEFI: use boot = 'uefi' or 'hybrid'")
        if boot != "bios" and self.partition_table != "gpt":
            raise ValueError(f"boot = {boot!r} needs partition_table = 'gpt' (an EFI partition)")
        if self.bootstrap_tarball is not None and self.bootstrap_sha256 is None:
            raise ValueError("bootstrap_tarball needs bootstrap_sha256 to check it")
        if self.archive_date is not None and self.pacman_conf is not None:
            raise ValueError(
                "archive_date is for the pacman.conf archkernel writes: with pacman_conf, "
                "name the snapshot's Server in that file instead"
            )
        if self.archive_date is not None and self.mirror != default_of(AzureSettings, "mirror"):
            raise ValueError(
                "archive_date takes the packages from the Arch Linux Archive instead of "
                "mirror: set one of them, not both"
            )
        if self.package_cache is not None and self.pacman_conf is not None:
            raise ValueError(
                "package_cache is for the pacman.conf archkernel writes for mirror: with "
                "pacman_conf, set CacheDir in that file instead"
            )

    @property
    def firmware(self) -> str:
        """The effective boot mode: `boot`, or the generation's default."""
        return self.boot or ("bios" if self.generation == 1 else "uefi")

    def all_packages(self) -> list[str]:
        """Every package pacstrap installs, in order, without duplicates."""
        names = [*self.packages, *self.extra_packages]
        if self.provisioning == "cloud-init":
            names.append(self.cloud_init_package)
        if self.provisioning == "waagent" or self.extensions:
            names.append(self.agent_package)
        return list(dict.fromkeys(names))


# 1980-01-01 00:00:00 UTC: FAT cannot date a file earlier.
FIRST_EPOCH = 315_532_800
# 2100-01-01 00:00:00 UTC: within what FAT, ext4 and the VHD footer can date.
LAST_EPOCH = 4_102_444_800


@dataclass(frozen=True, kw_only=True)
class BuildSettings(Section):
    """`[build]`: how builds are made, whatever they build."""

    source_date_epoch: Annotated[int, Bounds(ge=FIRST_EPOCH, le=LAST_EPOCH)] | None = setting(
        None,
        "the time (seconds since 1970, 1980 to 2100) the image's files, file systems and VHD "
        "carry, for byte-identical rebuilds; default: $SOURCE_DATE_EPOCH, else the build time",
    )


@dataclass(frozen=True, kw_only=True)
class Settings(Section):
    """The whole settings file."""

    workdir: OneLinePath = setting(Path("build"), "step outputs and doit's state")
    build: BuildSettings = field(default_factory=BuildSettings)
    scaleway: ScalewaySettings = field(default_factory=ScalewaySettings)
    azure: AzureSettings = field(default_factory=AzureSettings)


SECTIONS: dict[str, type[Section]] = {
    cls.__name__: cls
    for cls in (
        Settings,
        BuildSettings,
        ScalewaySettings,
        AzureSettings,
        AzureUser,
        AzurePublishSettings,
    )
}


def default_of(cls: type[Section], name: str) -> Any:
    """The default value of `cls`'s field `name` (None for a required field)."""
    for f in fields(cls):
        if f.name == name:
            if f.default_factory is not MISSING:
                return f.default_factory()
            return None if f.default is MISSING else f.default
    raise KeyError(name)
