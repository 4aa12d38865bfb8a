"""Azure's rules for an image, as pure functions over what was read from it.

Step 9 (archkernel.azure.verify) reads the image and gathers `TreeFacts` (the root file
system's files) and `BootFacts` (the partition table, the MBR, the EFI system partition);
the `check_*` functions here add one `Check` per rule to a `Report`. Among the tree rules,
the hygiene rules (`_check_hygiene`) fail an image that keeps what the build left: the build
host's identity or secrets, a log written at build time in /var/log, packages in pacman's
cache, a file naming the work directory; each line says what it looked for.

The boot rules follow the firmware the image is for (`azure.firmware`): a UEFI image
(generation 2, or hybrid) needs a GPT, an EFI system partition with a FAT, and a boot
loader at the removable path EFI/BOOT/BOOTX64.EFI (an uploaded disk has no NVRAM entry),
here GRUB's core.efi, which must look for the root file system's UUID; a BIOS image
(generation 1, or hybrid) needs boot code in the MBR and, on GPT, a BIOS boot partition
for GRUB's core.img.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from archkernel.azure import admins
from archkernel.azure import config as conf
from archkernel.image import disk, esp
from archkernel.settings import AzureSettings
from archkernel.units import MiB

# Where pacman keeps downloaded packages; pacstrap -c leaves them in the host's cache.
PACKAGE_CACHE = "/var/cache/pacman/pkg"
LOG_DIR = "/var/log"
SWAP_TYPES = {"0657fd6d-a4ab-43c4-84e5-0933c84b4f4f", "82"}
# PE32+ machine type x86-64 and subsystem "EFI application".
PE_MACHINE_X86_64 = 0x8664
PE_SUBSYSTEM_EFI_APPLICATION = 10


@dataclass
class Check:
    """One rule: its name, whether it holds, and what was found."""

    name: str
    ok: bool
    detail: str


@dataclass
class Report:
    """Every check of one image."""

    image: str
    checks: list[Check] = field(default_factory=list)

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append(Check(name, bool(ok), detail))

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def summary(self) -> str:
        lines = [f"archkernel verify: {self.image}"]
        for c in self.checks:
            lines.append(f"{'PASS' if c.ok else 'FAIL'}  {c.name}: {c.detail}")
        lines.append(f"{len(self.checks) - len(self.failed)} passed, {len(self.failed)} failed")
        return "\n".join(lines) + "\n"


@dataclass
class TreeFacts:
    """What the checks need from the image's root file system."""

    fstab: str = ""
    grub_cfg: str = ""
    shadow: str = ""
    machine_id: str | None = None
    host_keys: list[str] = field(default_factory=list)
    resolv_conf: str = ""
    keyring_private: list[str] = field(default_factory=list)
    sshd_config: str = ""
    sshd_dropins: dict[str, str] = field(default_factory=dict)
    initramfs_modules: dict[str, list[str]] = field(default_factory=dict)
    cloud_cfg: dict[str, str] = field(default_factory=dict)
    waagent_conf: str | None = None
    admin_files: dict[str, int] = field(default_factory=dict)  # admins.files() there: mode
    enabled_units: list[str] = field(default_factory=list)
    modules_load: str = ""
    hostname: str = ""
    # What the build host may have left (see `_check_hygiene`):
    log_files: dict[str, int] = field(default_factory=dict)  # /var/log/... -> size in bytes
    shipped_logs: list[str] = field(default_factory=list)  # those of them a package ships
    cached_packages: list[str] = field(default_factory=list)  # files in PACKAGE_CACHE
    workdir: str = ""  # the work directory's path, as looked for ('': not looked for)
    workdir_files: list[str] = field(default_factory=list)  # the files that name it
    searched: list[str] = field(default_factory=list)  # the directories looked in
    files_searched: int = 0


def _fstab_root_uuid(fstab: str) -> str | None:
    for line in fstab.splitlines():
        fields = line.split()
        if len(fields) >= 2 and not fields[0].startswith("#") and fields[1] == "/":
            m = re.fullmatch(r"UUID=([0-9a-fA-F-]+)", fields[0])
            return m.group(1).lower() if m else fields[0]
    return None


def _grub_roots(cfg: str) -> list[str]:
    return [m.lower() for m in re.findall(r"root=UUID=([0-9a-fA-F-]+)", cfg)]


def _sshd_value(facts: TreeFacts, key: str) -> str | None:
    """sshd's first-match-wins value of `key`, drop-ins (included first) before the main file."""
    texts = list(facts.sshd_dropins.values()) if "Include" in facts.sshd_config else []
    for text in [*texts, facts.sshd_config]:
        for line in text.splitlines():
            words = line.split()
            if len(words) >= 2 and words[0].lower() == key.lower():
                return words[1]
    return None


def check_tree(report: Report, facts: TreeFacts, az: AzureSettings, fs_uuid: str) -> None:
    """The rules about the image's contents."""
    fs_uuid = fs_uuid.lower()
    fstab_uuid = _fstab_root_uuid(facts.fstab)
    report.add(
        "fstab root by UUID", fstab_uuid == fs_uuid, f"fstab {fstab_uuid}, file system {fs_uuid}"
    )
    roots = _grub_roots(facts.grub_cfg)
    report.add(
        "grub root=UUID",
        bool(roots) and set(roots) == {fs_uuid},
        f"grub.cfg root={roots or 'none'}",
    )
    cmdline_ok = all(token in facts.grub_cfg for token in az.kernel_cmdline.split())
    report.add("kernel command line", cmdline_ok, az.kernel_cmdline)
    swap = [
        ln
        for ln in facts.fstab.splitlines()
        if not ln.lstrip().startswith("#") and " swap " in f" {ln} "
    ]
    report.add("no swap on the OS disk", not swap, "none in fstab" if not swap else "; ".join(swap))
    for name, modules in facts.initramfs_modules.items():
        missing = [m for m in conf.HYPERV_REQUIRED if m not in modules]
        report.add(
            f"Hyper-V drivers in {name}",
            not missing,
            f"missing {missing}" if missing else "hv_vmbus hv_storvsc hv_netvsc",
        )
    if not facts.initramfs_modules:
        report.add("initramfs present", False, "no /boot/initramfs-*.img")
    alive = _sshd_value(facts, "ClientAliveInterval")
    report.add(
        "sshd keep-alive",
        alive is not None and 0 < int(alive or 0) <= 180,
        f"ClientAliveInterval {alive}",
    )
    root_login = _sshd_value(facts, "PermitRootLogin")
    report.add("sshd refuses root", root_login == "no", f"PermitRootLogin {root_login}")
    root_pw = None
    for line in facts.shadow.splitlines():
        fields = line.split(":")
        if fields[0] == "root" and len(fields) > 1:
            root_pw = fields[1]
    report.add(
        "root locked",
        root_pw is not None and root_pw[:1] in ("!", "*"),
        f"root password field {root_pw!r:.8}",
    )
    dvd = [m for m in conf.PROVISIONING_MODULES if m not in facts.modules_load.split()]
    report.add(
        "provisioning DVD drivers loaded at boot",
        not dvd,
        f"missing {dvd}" if dvd else " ".join(conf.PROVISIONING_MODULES),
    )
    report.add("host name", facts.hostname == az.hostname, facts.hostname)
    _check_agent(report, facts, az)
    _check_hygiene(report, facts)


def _listed(items: list[str], most: int = 8) -> str:
    shown = ", ".join(items[:most])
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")


def _check_hygiene(report: Report, facts: TreeFacts) -> None:
    """Nothing of the build host or of the build itself stays in the image: its identity and
    secrets, the logs the build wrote, the packages it downloaded, its work directory's path.
    Each line says what it looked for, so a pass says what was proven."""
    leftovers = []
    if facts.machine_id:
        leftovers.append("machine-id is set")
    if facts.host_keys:
        leftovers.append(f"SSH host keys {facts.host_keys}")
    if facts.resolv_conf and not facts.resolv_conf.startswith("-> /run/"):
        leftovers.append("a copied /etc/resolv.conf")
    if facts.keyring_private:
        leftovers.append(f"pacman keyring secrets {facts.keyring_private}")
    report.add(
        "no build-host leftovers",
        not leftovers,
        "; ".join(leftovers)
        or "looked for a set machine-id, SSH host keys, a copied /etc/resolv.conf and pacman "
        "keyring secrets: none",
    )
    # Packages ship some log files empty (btmp, wtmp); anything else, or any content, was
    # written while the image was built (pacman.log: the build's times and host paths).
    shipped = set(facts.shipped_logs)
    written = sorted(p for p, size in facts.log_files.items() if size or p not in shipped)
    if written:
        detail = "written at build time: " + _listed(
            [f"{p} ({facts.log_files[p]} bytes)" for p in written]
        )
    else:
        empty = sorted(shipped & set(facts.log_files))
        detail = f"looked at {len(facts.log_files)} file(s) in {LOG_DIR}" + (
            f" ({_listed(empty)}: shipped empty by their packages)" if empty else ""
        )
        detail += ": none written at build time"
    report.add(f"no build log in {LOG_DIR}", not written, detail)
    cached = sorted(facts.cached_packages)
    report.add(
        "no pacman package cache",
        not cached,
        f"{len(cached)} file(s) in {PACKAGE_CACHE}: {_listed(cached)}"
        if cached
        else f"looked in {PACKAGE_CACHE}: no file",
    )
    if facts.workdir:
        found = sorted(facts.workdir_files)
        where = ", ".join(facts.searched) or "nothing"
        report.add(
            "no work directory path",
            not found,
            f"{facts.workdir} is named in {_listed(found)}"
            if found
            else f"looked for {facts.workdir} in {facts.files_searched} file(s) under {where}: "
            "in none",
        )


def _check_agent(report: Report, facts: TreeFacts, az: AzureSettings) -> None:
    units = set(facts.enabled_units)
    if az.provisioning == "cloud-init":
        azure_only = any(
            re.search(r"^datasource_list:\s*\[\s*Azure\s*\]", text, re.MULTILINE)
            for text in facts.cloud_cfg.values()
        )
        report.add(
            "cloud-init datasource Azure",
            azure_only,
            ", ".join(facts.cloud_cfg) or "no cloud.cfg.d",
        )
        enabled = sorted(units & set(conf.CLOUD_INIT_UNITS))
        report.add(
            "cloud-init enabled", bool(enabled), " ".join(enabled) or "no cloud-init unit enabled"
        )
    wants_agent = az.provisioning == "waagent" or az.extensions
    if wants_agent:
        values = conf.read_conf_values(facts.waagent_conf or "")
        expected = conf.waagent_values(az.provisioning)
        wrong = {k: values.get(k) for k, v in expected.items() if values.get(k) != v}
        report.add(
            "waagent.conf matches provisioning",
            facts.waagent_conf is not None and not wrong,
            f"differs: {wrong}" if wrong else "as expected",
        )
        report.add("waagent enabled", conf.WAAGENT_UNIT in units, "waagent.service")
        _check_admins(report, facts, units)
    elif facts.waagent_conf is not None and conf.WAAGENT_UNIT in units:
        report.add(
            "waagent not provisioning", False, "waagent is enabled though cloud-init provisions"
        )


def _check_admins(report: Report, facts: TreeFacts, units: set[str]) -> None:
    """The path unit that puts waagent's sudoers in wheel: enabled, its service and program
    there, the program executable."""
    problems = [f"{p} missing" for p in admins.files() if p not in facts.admin_files]
    program = admins.SCRIPT.lstrip("/")
    if program in facts.admin_files and not facts.admin_files[program] & 0o111:
        problems.append(f"{program} not executable")
    if admins.PATH_UNIT not in units:
        problems.append(f"{admins.PATH_UNIT} not enabled")
    report.add(
        "waagent's administrators join wheel",
        not problems,
        "; ".join(problems) or f"{admins.PATH_UNIT} enabled, runs {admins.SCRIPT}",
    )


@dataclass
class BootFacts:
    """What the boot rules need from the disk itself (outside the root file system)."""

    label: str  # the partition table: 'gpt' or 'dos'
    types: list[str]  # each partition's type GUID (or MBR type), upper case, in order
    mbr_boot_code: bool  # boot code in the first 440 bytes and the 55AA signature
    esp_fs: str | None = None  # what blkid finds on the ESP ('vfat'); None: nothing
    esp_volume: str | None = None  # its FAT volume ID, `1234-ABCD`
    esp_files: list[str] = field(default_factory=list)  # every path on it
    esp_error: str | None = None  # why the FAT could not be read
    loader: bytes = b""  # EFI/BOOT/BOOTX64.EFI


def has_boot_code(mbr: bytes) -> bool:
    """Whether a first sector holds boot code: any byte of the code area, and 55AA."""
    return len(mbr) >= 512 and mbr[510:512] == b"\x55\xaa" and any(mbr[:440])


def pe_kind(data: bytes) -> tuple[int, int] | None:
    """(machine, subsystem) of a PE32+ executable, or None if `data` is not one."""
    if data[:2] != b"MZ" or len(data) < 0x40:
        return None
    pe = int.from_bytes(data[0x3C:0x40], "little")
    optional = pe + 24
    if data[pe : pe + 4] != b"PE\0\0" or data[optional : optional + 2] != b"\x0b\x02":
        return None
    machine = int.from_bytes(data[pe + 4 : pe + 6], "little")
    return machine, int.from_bytes(data[optional + 68 : optional + 70], "little")


def _fstab_mount(fstab: str, mount_point: str) -> str | None:
    for line in fstab.splitlines():
        fields = line.split()
        if len(fields) >= 2 and not fields[0].startswith("#") and fields[1] == mount_point:
            return fields[0]
    return None


def check_boot(report: Report, facts: BootFacts, firmware: str, root_uuid: str, fstab: str) -> None:
    """The rules of the firmware the image boots with: 'bios', 'uefi' or 'hybrid'."""
    esp_type, bios_type = disk.ESP_GUID.upper(), disk.BIOS_BOOT_GUID.upper()
    if firmware in ("uefi", "hybrid"):
        report.add(
            "UEFI: GPT partition table",
            facts.label == "gpt",
            f"{facts.label} (generation 2 VMs boot GPT disks only)",
        )
        esps = [n for n, t in enumerate(facts.types, start=1) if t == esp_type]
        if len(esps) != 1:
            esp_ok, detail = False, f"{len(esps)} partitions of type {disk.ESP_GUID}"
        elif facts.esp_fs != "vfat":
            esp_ok, detail = False, f"partition {esps[0]} holds {facts.esp_fs or 'nothing'}"
        else:
            esp_ok, detail = True, f"partition {esps[0]}, FAT volume {facts.esp_volume}"
        report.add("UEFI: EFI system partition with a FAT", esp_ok, detail)
        files = {f.upper() for f in facts.esp_files}
        kind = pe_kind(facts.loader)
        if facts.esp_error is not None:
            loader_ok, detail = False, facts.esp_error
        elif esp.REMOVABLE_PATH_X64.upper() not in files:
            loader_ok, detail = False, f"not there; the ESP holds {sorted(files) or 'nothing'}"
        elif kind != (PE_MACHINE_X86_64, PE_SUBSYSTEM_EFI_APPLICATION):
            loader_ok, detail = False, f"not an x86-64 EFI application (PE {kind})"
        else:
            loader_ok, detail = True, f"x86-64 EFI application, {len(facts.loader)} bytes"
        report.add(f"UEFI: boot loader at {esp.REMOVABLE_PATH_X64}", loader_ok, detail)
        # GRUB's core image carries its early configuration as text.
        search = f"--set=root {root_uuid.lower()}".encode()
        report.add(
            "UEFI: boot loader looks for the root file system",
            search in facts.loader,
            f"search {'finds' if search in facts.loader else 'does not name'} {root_uuid}",
        )
        source = _fstab_mount(fstab, conf.ESP_MOUNT)
        wanted = f"UUID={facts.esp_volume}"
        report.add(
            f"UEFI: ESP mounted at {conf.ESP_MOUNT} by volume ID",
            source is not None and source.upper() == wanted.upper(),
            f"fstab {source or 'does not mount it'}, ESP {facts.esp_volume}",
        )
    if firmware in ("bios", "hybrid"):
        report.add(
            "BIOS: boot code in the MBR",
            facts.mbr_boot_code,
            "GRUB boot.img" if facts.mbr_boot_code else "none: SeaBIOS/Hyper-V BIOS cannot boot it",
        )
        if facts.label == "gpt":
            found = [n for n, t in enumerate(facts.types, start=1) if t == bios_type]
            report.add(
                "BIOS: BIOS boot partition for GRUB's core.img",
                len(found) == 1,
                f"partition {found[0]}" if len(found) == 1 else f"{len(found)} found",
            )


def check_partitions(report: Report, parts: list[dict[str, Any]], size: int, table: str) -> None:
    """Partitions aligned to 1 MiB and inside the disk; no swap partition."""
    sectors = size // 512
    for part in parts:
        start, length = int(part["start"]), int(part["size"])
        aligned = start % (MiB // 512) == 0
        inside = start + length <= sectors
        # By number, not by the loop device node it was read through (which varies).
        number = re.search(r"(\d+)$", str(part.get("node", "")))
        label = number[1] if number else "?"
        report.add(
            f"partition {label} aligned and inside",
            aligned and inside,
            f"start {start}, {length} sectors of {sectors}",
        )
        if str(part.get("type", "")).lower() in SWAP_TYPES:
            report.add("no swap partition", False, f"partition {part.get('node')}")
    report.add("partition table", bool(parts), f"{table}, {len(parts)} partition(s)")
