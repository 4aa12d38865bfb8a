"""What the Azure image's configuration says, and the verify rules, with plain asserts."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from archkernel.azure import config as conf
from archkernel.azure import pacman
from archkernel.azure.buildenv import Bind, shared_paths
from archkernel.azure.preflight import preflight
from archkernel.azure.rules import (
    BootFacts,
    Report,
    TreeFacts,
    check_boot,
    check_partitions,
    check_tree,
    has_boot_code,
    pe_kind,
)
from archkernel.errors import UserError
from archkernel.image import disk
from archkernel.plan import Do, declared_settings
from archkernel.settings import AzureSettings, Settings, load

UUID = "0b6d3c3e-5a8f-4f3e-9d7e-1c2b3a4d5e6f"

ARCH_MKINITCPIO = """\
# vim:set ft=sh
MODULES=()
BINARIES=()
FILES=()
HOOKS=(base udev autodetect microcode modconf kms keyboard keymap consolefont block filesystems fsck)
#COMPRESSION="zstd"
"""

OLD_MKINITCPIO = (
    'MODULES=""\nHOOKS="base udev autodetect modconf block filesystems keyboard fsck"\n'
)

WAAGENT_CONF = """\
# Microsoft Azure Linux Agent Configuration
Provisioning.Enabled=y
Provisioning.Agent=auto
ResourceDisk.Format=n
ResourceDisk.Filesystem=ext4
ResourceDisk.MountPoint=/mnt/resource
#ResourceDisk.EnableSwap=n
ResourceDisk.SwapSizeMB=0
Logs.Verbose=n
"""


def test_mkinitcpio_sets_modules_and_drops_autodetect() -> None:
    for original in (ARCH_MKINITCPIO, OLD_MKINITCPIO):
        text = conf.mkinitcpio_conf(original, ["hv_vmbus", "hv_storvsc"])
        assert "MODULES=(hv_vmbus hv_storvsc)" in text.splitlines()
        hooks = next(line for line in text.splitlines() if line.startswith("HOOKS="))
        assert "autodetect" not in hooks and "block" in hooks and "filesystems" in hooks


def test_mkinitcpio_without_modules_line_is_an_error() -> None:
    with pytest.raises(UserError, match="no MODULES= line"):
        conf.mkinitcpio_conf("HOOKS=(base)\n", ["hv_vmbus"])


def test_waagent_values_for_cloud_init_leave_the_disk_to_cloud_init() -> None:
    text = conf.set_conf_values(WAAGENT_CONF, conf.waagent_values("cloud-init"))
    values = conf.read_conf_values(text)
    assert values["Provisioning.Agent"] == "cloud-init"
    assert values["ResourceDisk.Format"] == "n"
    assert values["ResourceDisk.EnableSwap"] == "n"
    assert values["Logs.Verbose"] == "n"  # untouched
    assert text.count("ResourceDisk.EnableSwap") == 1  # the commented line was replaced


def test_waagent_values_for_waagent_follow_microsofts_guide() -> None:
    values = conf.read_conf_values(
        conf.set_conf_values(WAAGENT_CONF, conf.waagent_values("waagent"))
    )
    assert values["Provisioning.Agent"] == "waagent"
    assert values["ResourceDisk.Format"] == "y"
    assert values["ResourceDisk.Filesystem"] == "ext4"
    assert values["ResourceDisk.MountPoint"] == "/mnt/resource"
    assert values["ResourceDisk.EnableSwap"] == "y"
    assert int(values["ResourceDisk.SwapSizeMB"]) > 0


def test_lock_root_locks_only_root() -> None:
    shadow = "root::14871::::::\narch:$6$x$y:1:0:99999:7:::\n"
    locked = conf.lock_root(shadow)
    assert conf.shadow_password(locked, "root") == "!*"
    assert conf.shadow_password(locked, "arch") == "$6$x$y"
    with pytest.raises(UserError):
        conf.lock_root("arch:x:1::::::\n")


def test_fstab_mounts_root_by_uuid_and_no_swap() -> None:
    lines = [ln for ln in conf.fstab(UUID).splitlines() if not ln.startswith("#")]
    assert lines == [f"UUID={UUID}\t/\text4\trw,relatime\t0 1"]


def test_fstab_of_a_uefi_image_mounts_the_esp_at_efi_by_volume_id() -> None:
    lines = [ln for ln in conf.fstab(UUID, "1234-ABCD").splitlines() if not ln.startswith("#")]
    assert lines == [
        f"UUID={UUID}\t/\text4\trw,relatime\t0 1",
        # nofail: the VM boots even if the ESP cannot be mounted.
        "UUID=1234-ABCD\t/efi\tvfat\tumask=0077,nofail\t0 2",
    ]


def test_sshd_keepalive_and_password_login() -> None:
    assert "ClientAliveInterval 180" in conf.sshd_dropin(False).splitlines()
    assert "PasswordAuthentication no" in conf.sshd_dropin(False).splitlines()
    assert "PasswordAuthentication no" not in conf.sshd_dropin(True).splitlines()
    assert "PermitRootLogin no" in conf.sshd_dropin(True).splitlines()


def test_cloud_init_config_names_only_azure() -> None:
    text = conf.cloud_init_cfg()
    assert "datasource_list: [ Azure ]" in text.splitlines()
    assert "/mnt/resource" in text


def test_units_depend_on_provisioning() -> None:
    available = set(conf.BASE_UNITS + conf.CLOUD_INIT_UNITS + [conf.WAAGENT_UNIT])
    cloud = conf.units_to_enable(AzureSettings(), available)
    assert "cloud-init.service" in cloud and conf.WAAGENT_UNIT not in cloud
    assert "archkernel-waagent-wheel.path" not in cloud
    both = conf.units_to_enable(AzureSettings(extensions=True), available)
    assert "cloud-init.service" in both and conf.WAAGENT_UNIT in both
    agent = conf.units_to_enable(AzureSettings(provisioning="waagent"), available)
    assert conf.WAAGENT_UNIT in agent and "cloud-init.service" not in agent
    # Wherever waagent runs, the users it makes administrators join wheel.
    assert "archkernel-waagent-wheel.path" in both and "archkernel-waagent-wheel.path" in agent


def test_pacman_conf_keeps_the_mirror_placeholders() -> None:
    text = conf.pacman_conf("https://mirror.example/$repo/os/$arch", "/w/gnupg")
    assert "Server = https://mirror.example/$repo/os/$arch" in text.splitlines()
    assert "GPGDir = /w/gnupg" in text.splitlines()
    assert conf.mirror_probe_url("https://m/$repo/os/$arch") == "https://m/core/os/x86_64/core.db"


def test_pacman_conf_names_the_package_cache() -> None:
    text = conf.pacman_conf("https://m/$repo/os/$arch", "/w/gnupg", "/var/tmp/ci/pacman-cache")
    assert text == (
        "# Written by archkernel for the Azure image build.\n"
        "[options]\n"
        "Architecture = x86_64\n"
        "SigLevel = Required DatabaseOptional\n"
        "LocalFileSigLevel = Optional\n"
        "ParallelDownloads = 5\n"
        "GPGDir = /w/gnupg\n"
        "CacheDir = /var/tmp/ci/pacman-cache/\n"
        "\n"
        "[core]\n"
        "Server = https://m/$repo/os/$arch\n"
        "\n"
        "[extra]\n"
        "Server = https://m/$repo/os/$arch\n"
    )
    assert "CacheDir = /c/\n" in conf.pacman_conf("https://m", None, "/c/")
    assert "CacheDir" not in conf.pacman_conf("https://m", "/w/gnupg")  # pacman's default
    # pacman splits CacheDir at blanks: such a path would silently become two caches.
    with pytest.raises(UserError, match=r"azure\.package_cache: .* holds a blank"):
        conf.pacman_conf("https://m", None, "/var/tmp/my cache")


def test_pacstrap_takes_the_cache_of_its_pacman_conf() -> None:
    # -c: the cache named by the pacman.conf (azure.package_cache), not root/var/cache.
    assert pacman.pacstrap_argv(Path("/w/pacman.conf"), Path("/w/root"), ["base", "linux"]) == [
        "pacstrap",
        "-C",
        "/w/pacman.conf",
        "-c",
        "-G",
        "-M",
        "/w/root",
        "base",
        "linux",
    ]


def test_package_cache_setting(tmp_path: Path) -> None:
    assert AzureSettings().package_cache is None
    (tmp_path / "ci").mkdir()
    settings = tmp_path / "ci" / "settings.toml"
    settings.write_text('[azure]\npackage_cache = "../cache/pacman"\n')
    loaded = load(settings, env={}, cwd=tmp_path).settings
    assert loaded.azure.package_cache is not None
    assert loaded.azure.package_cache.resolve() == tmp_path / "cache/pacman"  # from the file
    settings.write_text('[azure]\npackage_cache = "/c"\npacman_conf = "/etc/pacman.conf"\n')
    with pytest.raises(UserError, match="with pacman_conf, set CacheDir in that file"):
        load(settings, env={}, cwd=tmp_path)


def test_preflight_makes_the_cache_and_names_it_in_pacman_conf(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "pacman-cache"
    settings = Settings(
        workdir=tmp_path / "build",
        azure=AzureSettings(package_cache=cache, mirror="https://m/$repo/os/$arch"),
    )
    plan = preflight(settings)
    assert "package_cache" in " ".join(declared_settings(preflight))
    wanted = ("make the package cache", f"write {tmp_path / 'build/azure/pacman.conf'}")
    for op in plan.ops:
        if isinstance(op, Do) and op.description.startswith(wanted):
            op()
    assert cache.is_dir()
    written = (tmp_path / "build/azure/pacman.conf").read_text().splitlines()
    assert f"CacheDir = {cache}/" in written
    # In the build environment (builder = container) the cache is shared read-write.
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    assert shared_paths(settings.azure, tmp_path / "build") == (
        Bind(tmp_path / "build"),
        Bind(cache),
        Bind(tmp_path / "tmp"),
    )


# --- pinning: an Arch Linux Archive snapshot instead of a live mirror -----------------------


def test_pacman_conf_of_an_archive_snapshot() -> None:
    az = AzureSettings(archive_date="2026-11-30")
    text = conf.pacman_conf(conf.repository_server(az), "/w/gnupg", "/var/tmp/cache")
    assert text == (
        "# Written by archkernel for the Azure image build.\n"
        "[options]\n"
        "Architecture = x86_64\n"
        "SigLevel = Required DatabaseOptional\n"
        "LocalFileSigLevel = Optional\n"
        "ParallelDownloads = 5\n"
        "GPGDir = /w/gnupg\n"
        "CacheDir = /var/tmp/cache/\n"
        "\n"
        "[core]\n"
        "Server = https://archive.archlinux.org/repos/2026/11/30/$repo/os/$arch\n"
        "\n"
        "[extra]\n"
        "Server = https://archive.archlinux.org/repos/2026/11/30/$repo/os/$arch\n"
    )
    # Without a date: the live mirror, as before.
    assert conf.repository_server(AzureSettings()) == (
        "https://geo.mirror.pkgbuild.com/$repo/os/$arch"
    )


def test_preflight_writes_the_snapshots_pacman_conf_and_probes_it(tmp_path: Path) -> None:
    settings = Settings(workdir=tmp_path / "build", azure=AzureSettings(archive_date="2013-08-31"))
    assert "azure.archive_date" in declared_settings(preflight)
    plan = preflight(settings)
    written = tmp_path / "build/azure/pacman.conf"
    probes = [
        op.description
        for op in plan.ops
        if isinstance(op, Do) and op.description.startswith("check that the mirror answers")
    ]
    assert probes == [
        "check that the mirror answers "
        "(https://archive.archlinux.org/repos/2013/08/31/core/os/x86_64/core.db)"
    ]
    for op in plan.ops:
        if isinstance(op, Do) and op.description.startswith(f"write {written}"):
            op()
    assert written.read_text().splitlines()[-4:] == [
        "Server = https://archive.archlinux.org/repos/2013/08/31/$repo/os/$arch",
        "",
        "[extra]",
        "Server = https://archive.archlinux.org/repos/2013/08/31/$repo/os/$arch",
    ]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("archive_date = 2026-11-30", "2026-11-30"),  # TOML's own date
        ('archive_date = "2026-11-30"', "2026-11-30"),
        ('archive_date = "2013-08-31"', "2013-08-31"),  # the archive's first snapshot
    ],
)
def test_archive_date_setting(tmp_path: Path, line: str, expected: str) -> None:
    (tmp_path / "settings.toml").write_text(f"[azure]\n{line}\n")
    loaded = load(tmp_path / "settings.toml", env={}, cwd=tmp_path).settings
    assert loaded.azure.archive_date == expected
    assert AzureSettings().archive_date is None


@pytest.mark.parametrize(
    ("lines", "error"),
    [
        ('archive_date = "2026-02-30"', "azure.archive_date: '2026-02-30' is not a day of the"),
        ('archive_date = "2026-1-5"', "azure.archive_date: '2026-1-5' is not a date; write e.g."),
        ("archive_date = 20261130", "azure.archive_date: 20261130 is not a day; write e.g."),
        ("archive_date = 2026-11-30T10:00:00", "is not a day; write e.g. 2026-11-30"),
        (
            'archive_date = "2013-08-30"',
            "azure.archive_date: '2013-08-30' is before the Arch Linux Archive's first snapshot",
        ),
        (
            'archive_date = "2026-11-30"\npacman_conf = "/etc/pacman.conf"',
            "with pacman_conf, name the snapshot's Server in that file instead",
        ),
        (
            'archive_date = "2026-11-30"\nmirror = "https://m.example/$repo/os/$arch"',
            "archive_date takes the packages from the Arch Linux Archive instead of mirror",
        ),
    ],
)
def test_archive_date_is_validated(tmp_path: Path, lines: str, error: str) -> None:
    (tmp_path / "settings.toml").write_text(f"[azure]\n{lines}\n")
    with pytest.raises(UserError) as raised:
        load(tmp_path / "settings.toml", env={}, cwd=tmp_path)
    assert error in raised.value.message


def good_facts(az: AzureSettings) -> TreeFacts:
    return TreeFacts(
        fstab=conf.fstab(UUID),
        grub_cfg=f"linux /boot/vmlinuz-linux root=UUID={UUID} rw {az.kernel_cmdline}\n",
        shadow="root:!*:1::::::\n",
        machine_id="",
        resolv_conf="-> /run/systemd/resolve/stub-resolv.conf",
        sshd_config="Include /etc/ssh/sshd_config.d/*.conf\n#PermitRootLogin prohibit-password\n",
        sshd_dropins={"10-archkernel-azure.conf": conf.sshd_dropin(False)},
        initramfs_modules={"initramfs-linux.img": ["hv_netvsc", "hv_storvsc", "hv_vmbus"]},
        cloud_cfg={"90-archkernel-azure.cfg": conf.cloud_init_cfg()},
        enabled_units=["cloud-init.service", "sshd.service"],
        modules_load=conf.modules_load(),
        hostname=az.hostname,
    )


def failed(facts: TreeFacts, az: AzureSettings, uuid: str = UUID) -> list[str]:
    report = Report("test")
    check_tree(report, facts, az, uuid)
    return [c.name for c in report.failed]


def test_a_good_tree_passes() -> None:
    az = AzureSettings()
    assert failed(good_facts(az), az) == []


@pytest.mark.parametrize(
    ("change", "rule"),
    [
        ({"fstab": conf.fstab("11111111-2222-3333-4444-555555555555")}, "fstab root by UUID"),
        ({"grub_cfg": "linux /boot/vmlinuz-linux root=/dev/sda2 rw"}, "grub root=UUID"),
        (
            {"fstab": conf.fstab(UUID) + "/swapfile none swap defaults 0 0\n"},
            "no swap on the OS disk",
        ),
        (
            {"initramfs_modules": {"initramfs-linux.img": ["hv_vmbus"]}},
            "Hyper-V drivers in initramfs-linux.img",
        ),
        ({"sshd_dropins": {}}, "sshd keep-alive"),
        ({"shadow": "root::1::::::\n"}, "root locked"),
        ({"machine_id": "0123456789abcdef0123456789abcdef\n"}, "no build-host leftovers"),
        ({"host_keys": ["ssh_host_ed25519_key"]}, "no build-host leftovers"),
        ({"resolv_conf": "nameserver 10.0.0.1\n"}, "no build-host leftovers"),
        ({"cloud_cfg": {}}, "cloud-init datasource Azure"),
        ({"enabled_units": ["sshd.service"]}, "cloud-init enabled"),
        ({"modules_load": "udf\n"}, "provisioning DVD drivers loaded at boot"),
        ({"hostname": "other"}, "host name"),
    ],
)
def test_each_broken_rule_is_caught(change: dict[str, object], rule: str) -> None:
    az = AzureSettings()
    facts = good_facts(az)
    for key, value in change.items():
        setattr(facts, key, value)
    assert rule in failed(facts, az)


def test_file_system_uuid_must_match() -> None:
    az = AzureSettings()
    names = failed(good_facts(az), az, uuid="11111111-2222-3333-4444-555555555555")
    assert "fstab root by UUID" in names and "grub root=UUID" in names


def test_waagent_configuration_must_match_provisioning() -> None:
    az = AzureSettings(provisioning="waagent")
    facts = good_facts(az)
    facts.waagent_conf = conf.set_conf_values(WAAGENT_CONF, conf.waagent_values("cloud-init"))
    facts.enabled_units = ["sshd.service", "waagent.service", "archkernel-waagent-wheel.path"]
    facts.admin_files = dict(ADMIN_FILES)
    assert "waagent.conf matches provisioning" in failed(facts, az)
    facts.waagent_conf = conf.set_conf_values(WAAGENT_CONF, conf.waagent_values("waagent"))
    assert failed(facts, az) == []


ADMIN_FILES = {
    "etc/systemd/system/archkernel-waagent-wheel.path": 0o644,
    "etc/systemd/system/archkernel-waagent-wheel.service": 0o644,
    "usr/local/lib/archkernel/waagent-wheel": 0o755,
}


@pytest.mark.parametrize(
    ("extensions", "enabled", "files", "detail"),
    [
        (False, True, ADMIN_FILES, "archkernel-waagent-wheel.path enabled, runs "),
        (True, True, ADMIN_FILES, "archkernel-waagent-wheel.path enabled, runs "),
        (False, False, ADMIN_FILES, "archkernel-waagent-wheel.path not enabled"),
        (True, False, ADMIN_FILES, "archkernel-waagent-wheel.path not enabled"),
        (
            False,
            True,
            {**ADMIN_FILES, "usr/local/lib/archkernel/waagent-wheel": 0o644},
            "usr/local/lib/archkernel/waagent-wheel not executable",
        ),
        (
            False,
            True,
            {"usr/local/lib/archkernel/waagent-wheel": 0o755},
            "etc/systemd/system/archkernel-waagent-wheel.path missing; "
            "etc/systemd/system/archkernel-waagent-wheel.service missing",
        ),
    ],
)
def test_waagents_administrators_must_join_wheel(
    extensions: bool, enabled: bool, files: dict[str, int], detail: str
) -> None:
    provisioning = "cloud-init" if extensions else "waagent"
    az = AzureSettings(provisioning=provisioning, extensions=extensions)
    facts = good_facts(az)
    facts.waagent_conf = conf.set_conf_values(WAAGENT_CONF, conf.waagent_values(provisioning))
    facts.enabled_units += ["waagent.service"]
    facts.enabled_units += ["archkernel-waagent-wheel.path"] if enabled else []
    facts.admin_files = files
    report = Report("test")
    check_tree(report, facts, az, UUID)
    (check,) = [c for c in report.checks if c.name == "waagent's administrators join wheel"]
    assert check.detail.startswith(detail)
    assert [c.name for c in report.failed] == ([] if check.ok else [check.name])
    assert check.ok is (detail.endswith("runs "))


def test_partitions_must_be_aligned_and_inside() -> None:
    size = 64 << 20
    report = Report("x")
    check_partitions(report, [{"node": "p1", "start": 2048, "size": 2048}], size, "gpt")
    assert not report.failed
    report = Report("x")
    check_partitions(report, [{"node": "p1", "start": 2049, "size": 2048}], size, "gpt")
    assert report.failed
    report = Report("x")
    check_partitions(report, [{"node": "p1", "start": 2048, "size": size // 512}], size, "gpt")
    assert report.failed


# --- boot rules: generation 1 (BIOS), generation 2 (UEFI) and hybrid ----------------------------

ESP_VOLUME = "1234-ABCD"
ESP, BIOS_BOOT, ROOT = disk.ESP_GUID, disk.BIOS_BOOT_GUID, disk.ROOT_X86_64_GUID


def pe32_plus(machine: int = 0x8664, subsystem: int = 10, body: bytes = b"") -> bytes:
    """The headers of a PE32+ executable (what the rules read), then `body`."""
    data = bytearray(0x200)
    data[:2] = b"MZ"
    data[0x3C:0x40] = (0x80).to_bytes(4, "little")
    data[0x80:0x84] = b"PE\0\0"
    data[0x84:0x86] = machine.to_bytes(2, "little")
    data[0x98:0x9A] = b"\x0b\x02"
    data[0x98 + 68 : 0x98 + 70] = subsystem.to_bytes(2, "little")
    return bytes(data) + body


SEARCH = f"search --no-floppy --fs-uuid --set=root {UUID}\n".encode()
LOADER = pe32_plus(body=SEARCH)


def boot_facts(firmware: str) -> BootFacts:
    """What a good disk for `firmware` shows (layouts of disk.plan_layout)."""
    types = {
        "bios": [BIOS_BOOT, ROOT],
        "uefi": [ESP, ROOT],
        "hybrid": [BIOS_BOOT, ESP, ROOT],
    }[firmware]
    facts = BootFacts("gpt", types, mbr_boot_code=firmware != "uefi")
    if firmware != "bios":
        facts.esp_fs, facts.esp_volume = "vfat", ESP_VOLUME
        facts.esp_files = ["EFI/", "EFI/BOOT/", "EFI/BOOT/BOOTX64.EFI"]
        facts.loader = LOADER
    return facts


def boot_checks(facts: BootFacts, firmware: str, fstab: str | None = None) -> dict[str, bool]:
    report = Report("test")
    esp = ESP_VOLUME if firmware != "bios" else None
    check_boot(report, facts, firmware, UUID, conf.fstab(UUID, esp) if fstab is None else fstab)
    return {c.name: c.ok for c in report.checks}


UEFI_RULES = {
    "UEFI: GPT partition table",
    "UEFI: EFI system partition with a FAT",
    "UEFI: boot loader at EFI/BOOT/BOOTX64.EFI",
    "UEFI: boot loader looks for the root file system",
    "UEFI: ESP mounted at /efi by volume ID",
}
BIOS_RULES = {"BIOS: boot code in the MBR", "BIOS: BIOS boot partition for GRUB's core.img"}


@pytest.mark.parametrize(
    ("firmware", "rules"),
    [("bios", BIOS_RULES), ("uefi", UEFI_RULES), ("hybrid", UEFI_RULES | BIOS_RULES)],
)
def test_each_firmware_has_its_rules_and_a_good_disk_passes_them(firmware, rules) -> None:
    assert boot_checks(boot_facts(firmware), firmware) == dict.fromkeys(rules, True)


def test_an_mbr_disk_for_bios_needs_no_bios_boot_partition() -> None:
    facts = BootFacts("dos", ["83"], mbr_boot_code=True)
    assert boot_checks(facts, "bios") == {"BIOS: boot code in the MBR": True}


@pytest.mark.parametrize(
    ("firmware", "change", "rule"),
    [
        ("uefi", {"label": "dos"}, "UEFI: GPT partition table"),
        ("uefi", {"types": [ROOT]}, "UEFI: EFI system partition with a FAT"),
        ("uefi", {"types": [ESP, ESP, ROOT]}, "UEFI: EFI system partition with a FAT"),
        ("uefi", {"esp_fs": None}, "UEFI: EFI system partition with a FAT"),
        (
            "uefi",
            {"esp_files": ["EFI/", "EFI/arch/", "EFI/arch/grubx64.efi"]},
            "UEFI: boot loader at EFI/BOOT/BOOTX64.EFI",
        ),
        ("uefi", {"esp_error": "cannot read the FAT"}, "UEFI: boot loader at EFI/BOOT/BOOTX64.EFI"),
        (
            "uefi",
            {"loader": pe32_plus(machine=0x14C, body=SEARCH)},
            "UEFI: boot loader at EFI/BOOT/BOOTX64.EFI",
        ),
        (
            "uefi",
            {"loader": pe32_plus(subsystem=3, body=SEARCH)},
            "UEFI: boot loader at EFI/BOOT/BOOTX64.EFI",
        ),
        ("uefi", {"loader": b"\x7fELF" + SEARCH}, "UEFI: boot loader at EFI/BOOT/BOOTX64.EFI"),
        ("uefi", {"loader": pe32_plus()}, "UEFI: boot loader looks for the root file system"),
        ("uefi", {"esp_volume": "9999-0000"}, "UEFI: ESP mounted at /efi by volume ID"),
        ("hybrid", {"mbr_boot_code": False}, "BIOS: boot code in the MBR"),
        ("hybrid", {"types": [ESP, ROOT]}, "BIOS: BIOS boot partition for GRUB's core.img"),
        ("bios", {"types": [ROOT]}, "BIOS: BIOS boot partition for GRUB's core.img"),
    ],
)
def test_each_broken_boot_rule_is_caught(firmware: str, change: dict[str, object], rule: str):
    facts = boot_facts(firmware)
    for key, value in change.items():
        setattr(facts, key, value)
    checks = boot_checks(facts, firmware)
    assert checks[rule] is False
    assert [name for name, ok in checks.items() if not ok] == [rule]


def test_a_uefi_image_must_mount_its_esp() -> None:
    checks = boot_checks(boot_facts("uefi"), "uefi", fstab=conf.fstab(UUID))
    assert [name for name, ok in checks.items() if not ok] == [
        "UEFI: ESP mounted at /efi by volume ID"
    ]


def test_boot_code_and_pe_headers_are_recognised() -> None:
    mbr = bytearray(512)
    mbr[510:] = b"\x55\xaa"
    assert not has_boot_code(bytes(mbr))  # a protective MBR: the signature, no code
    mbr[0:2] = b"\xeb\x63"
    assert has_boot_code(bytes(mbr))
    assert not has_boot_code(bytes(mbr[:510]))
    assert pe_kind(LOADER) == (0x8664, 10)
    assert pe_kind(b"MZ") is None and pe_kind(b"") is None


# --- today's VM sizes: what step 3 writes for them ---------------------------------------------


def test_the_image_carries_the_files_for_todays_vm_sizes() -> None:
    files = {f.path: f.text for f in conf.system_files(AzureSettings(), UUID, None)}
    for path in (
        "etc/udev/rules.d/66-archkernel-azure-disk.rules",
        "etc/udev/rules.d/66-archkernel-azure-sriov.rules",
        "etc/udev/rules.d/66-archkernel-hyperv-ptp.rules",
        "etc/systemd/network/10-azure-sriov-vf.network",
        "etc/chrony.conf",
    ):
        assert path in files
    chrony_lines = files["etc/chrony.conf"].splitlines()
    # Microsoft's lines, as its time-sync page gives them.
    assert "refclock PHC /dev/ptp_hyperv poll 3 dpoll -2 offset 0 stratum 2" in chrony_lines
    assert "makestep 1.0 -1" in chrony_lines
    assert not [ln for ln in chrony_lines if ln.startswith(("pool ", "server "))]
    assert "/dev/sd" not in "".join(files.values())


def test_dhcp_is_for_the_synthetic_nic_and_the_vf_is_unmanaged() -> None:
    eth0 = conf.networkd_eth0().splitlines()
    assert "Name=eth0" in eth0 and "DHCP=yes" in eth0
    assert "Driver=!mlx4_en mlx4_core mlx5_core mana" in eth0
    vf = conf.networkd_vf().splitlines()
    assert "Driver=mlx4_en mlx4_core mlx5_core mana" in vf
    assert "Unmanaged=yes" in vf
    # networkd reads files in lexical order: the VF's comes first.
    assert sorted([conf.VF_NETWORK_FILE, conf.NETWORK_FILE])[0] == conf.VF_NETWORK_FILE


def test_chrony_replaces_timesyncd_when_the_image_has_it() -> None:
    az = AzureSettings()
    both = {"sshd.service", "chronyd.service", "systemd-timesyncd.service"}
    assert conf.configured_units(both) == ["sshd.service", "chronyd.service"]
    assert "systemd-timesyncd.service" not in conf.units_to_enable(az, both)
    without = {"sshd.service", "systemd-timesyncd.service"}
    assert conf.configured_units(without) == ["sshd.service", "systemd-timesyncd.service"]


def test_the_defaults_ask_for_nvme_and_todays_vm_sizes() -> None:
    az = AzureSettings()
    assert "nvme_core.io_timeout=240" in az.kernel_cmdline.split()
    assert "quiet" not in az.kernel_cmdline.split()
    assert {"nvme", "pci-hyperv"} <= set(az.initramfs_modules)
    assert "chrony" in az.packages
    assert az.vm_features == ["disk-names", "accelerated-networking", "ptp-clock", "kvp-telemetry"]
    assert az.publish.disk_controller_types == ["SCSI", "NVMe"]


def test_verify_declares_the_settings_of_the_vm_size_rules() -> None:
    from archkernel.azure import verify

    declared = declared_settings(verify.verify)
    assert "azure.vm_features" in declared
    assert "azure.publish.disk_controller_types" in declared
