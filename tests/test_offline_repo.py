"""The offline pacman repository of archkernel.demo.offline, built and used for real.

The first tests check the pure parts (file texts, the stand-ins' awk helpers). The
integration tests build the repository once for the module, read it with pacman, pacstrap
every package into a directory and run the stand-ins there the way the azure_vhd build
does: mkinitcpio in arch-chroot, systemctl --root, locale-gen, the test /sbin/init.
"""

from __future__ import annotations

import configparser
import io
import os
import re
import shutil
import subprocess
import time
import zoneinfo
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from archkernel import settings as settings_module
from archkernel.demo import linux, offline, standins
from archkernel.demo import package as pkgformat
from archkernel.host.run import missing_tools, run
from tests.support.skips import skip_for_this_machine

STANDIN_LIB = standins.FILES / "mkinitcpio" / "usr" / "lib" / "initcpio"
HYPERV = ["hv_vmbus", "hv_storvsc", "hv_netvsc", "hv_utils"]
# What the mkinitcpio stand-in's block and filesystems hooks add (see its script).
BLOCK = ["ata_piix", "ahci", "sd_mod", "sr_mod", "virtio_pci", "virtio_blk", "virtio_scsi"]
FILESYSTEMS = ["ext4"]
INTEGRATION_TOOLS = ["pacman", "pacstrap", "arch-chroot", "bsdtar", "repo-add", "depmod",
                     "modprobe", "apt-get", "dpkg-deb"]  # fmt: skip


def busybox() -> str:
    path = shutil.which("busybox")
    if path is None:
        pytest.skip("needs busybox on the host (Debian: busybox-static)")
    return path


# --- pure parts -----------------------------------------------------------------------------


def test_sanitize_pkgver_drops_epoch_and_hyphens():
    assert pkgformat.sanitize_pkgver("1:1.35.0-4+deb12u1+b1") == "1.35.0.4+deb12u1+b1"
    assert pkgformat.sanitize_pkgver("6.1.192-2") == "6.1.192.2"
    with pytest.raises(ValueError):
        pkgformat.sanitize_pkgver("~")


def test_linux_pkgver_comes_from_the_debian_version_in_the_banner():
    banner = "6.1.0-56-amd64 (debian-kernel@lists.debian.org) #1 SMP Debian 6.1.192-2 (2025)"
    assert linux.linux_pkgver(banner, "6.1.0-56-amd64") == "6.1.192.2"
    assert linux.linux_pkgver("6.9.0 #1 SMP", "6.9.0-1-amd64") == "6.9.0.1.amd64"


def test_pkginfo_has_the_fields_pacman_reads():
    pkg = pkgformat.Package(
        "openssh", "1.0-1", "ssh", depends=("filesystem",), backup=("etc/ssh/sshd_config",)
    )
    lines = pkgformat.pkginfo(pkg, 1234).splitlines()
    for line in (
        "pkgname = openssh",
        "pkgver = 1.0-1",
        "arch = x86_64",
        "size = 1234",
        "depend = filesystem",
        "backup = etc/ssh/sshd_config",
    ):
        assert line in lines
    assert pkg.filename == "openssh-1.0-1-x86_64.pkg.tar.zst"


def test_pacman_conf_names_the_repository_by_absolute_url(tmp_path):
    text = offline.pacman_conf(tmp_path / "my repo", tmp_path / "cache")
    conf = configparser.ConfigParser(allow_no_value=True, strict=False, interpolation=None)
    conf.read_string(text)
    assert conf["options"]["Architecture"] == "x86_64"
    assert conf["options"]["SigLevel"] == "Never"
    assert conf["options"]["CacheDir"] == f"{tmp_path}/cache/"
    assert conf["archkernel-test"]["Server"] == (tmp_path / "my repo").as_uri()
    assert "%20" in conf["archkernel-test"]["Server"]


def test_settings_toml_is_valid_project_settings(tmp_path):
    (tmp_path / "settings.toml").write_text(offline.settings_toml(offline.SETTINGS_PACKAGES))
    loaded = settings_module.load(tmp_path / "settings.toml", env={}, cwd=tmp_path)
    s = loaded.settings
    assert s.workdir == tmp_path / "build"
    assert s.azure.pacman_conf == tmp_path / "pacman.conf"
    assert s.azure.packages == list(offline.SETTINGS_PACKAGES)
    assert s.azure.disk_size == 512 << 20
    assert s.azure.hostname == "archkernel-test"
    # Everything the build installs by default is in the repository.
    built = {"base", "busybox", "chrony", "cloud-init", "filesystem", "glibc", "linux", "mkinitcpio",
             "openssh", "sudo", "systemd", "tzdata", "walinuxagent"}  # fmt: skip
    assert set(s.azure.all_packages()) <= built


def test_utc_zone_file_reads_as_utc():
    zone = zoneinfo.ZoneInfo.from_file(io.BytesIO(standins.utc_tzif()), key="UTC")
    moment = datetime(2024, 6, 1, tzinfo=zone)
    assert moment.utcoffset() == timedelta(0)
    assert moment.tzname() == "UTC"


def test_mtree_lists_types_modes_and_digests(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/a b").write_text("x")
    (tmp_path / "etc/a b").chmod(0o600)
    (tmp_path / "etc/link").symlink_to("a b")
    text = pkgformat.mtree(tmp_path, pkgformat.package_paths(tmp_path))
    assert text.startswith("#mtree\n/set type=file uid=0 gid=0 mode=644\n")
    assert re.search(r"^\./etc time=\d+\.0 mode=755 type=dir$", text, re.M)
    assert re.search(
        r"^\./etc/a\\040b time=\d+\.0 mode=600 size=1 md5digest=9dd4e461268c8034f5c8564e155c67a6"
        r" sha256digest=2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881$",
        text,
        re.M,
    )
    assert re.search(r"^\./etc/link time=\d+\.0 mode=777 type=link link=a\\040b$", text, re.M)


def parse_conf(tmp_path: Path, var: str, *texts: str) -> list[str]:
    files = []
    for i, text in enumerate(texts):
        files.append(tmp_path / f"{i}.conf")
        files[-1].write_text(text)
    out = subprocess.run(
        [busybox(), "awk", "-v", f"var={var}", "-f", STANDIN_LIB / "parse-conf.awk", *files],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split("\n")[:-1]


@pytest.mark.integration
def test_parse_conf_reads_bash_arrays_without_bash(tmp_path):
    main = """\
# MODULES=(commented out)
MODULES=(hv_vmbus 'hv_storvsc' "hv_netvsc"  # a comment
   hv_utils)
HOOKS=(base udev
  autodetect block filesystems)
COMPRESSION="gzip"
#COMPRESSION="zstd"
FILES=()
"""
    dropin = "HOOKS=(base block filesystems)\nMODULES+=(udf?)\n"
    assert parse_conf(tmp_path, "MODULES", main, dropin) == [*HYPERV, "udf?"]
    assert parse_conf(tmp_path, "HOOKS", main) == [
        "base",
        "udev",
        "autodetect",
        "block",
        "filesystems",
    ]
    assert parse_conf(tmp_path, "HOOKS", main, dropin) == ["base", "block", "filesystems"]
    assert parse_conf(tmp_path, "COMPRESSION", main) == ["gzip"]
    assert parse_conf(tmp_path, "FILES", main) == []
    assert parse_conf(tmp_path, "BINARIES", main) == []


@pytest.mark.integration
def test_parse_conf_reads_arch_presets(tmp_path):
    preset = (standins.FILES / "linux/etc/mkinitcpio.d/linux.preset").read_text()
    assert parse_conf(tmp_path, "PRESETS", preset) == ["default"]
    assert parse_conf(tmp_path, "ALL_kver", preset) == ["/boot/vmlinuz-linux"]
    assert parse_conf(tmp_path, "default_image", preset) == ["/boot/initramfs-linux.img"]
    assert parse_conf(tmp_path, "default_options", preset) == []


@pytest.mark.integration
def test_standin_scripts_parse_under_busybox_sh():
    for script in (
        standins.FILES / "mkinitcpio/usr/bin/mkinitcpio",
        STANDIN_LIB / "init",
        standins.FILES / "base/usr/lib/archkernel-test/init",
        standins.FILES / "glibc/usr/bin/locale-gen",
        standins.FILES / "cloud-init/usr/bin/cloud-init",
        standins.FILES / "walinuxagent/usr/bin/waagent",
    ):
        run([busybox(), "sh", "-n", script])
        assert os.access(script, os.X_OK), f"{script} is not executable"


# --- the repository, for real ---------------------------------------------------------------


def _require_integration() -> None:
    if os.geteuid() != 0:
        pytest.skip("pacstrap and chroot need root")
    missing = missing_tools(INTEGRATION_TOOLS)
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Iterator[offline.OfflineRepo]:
    _require_integration()
    dest = tmp_path_factory.mktemp("offline")
    yield offline.build(dest)
    shutil.rmtree(dest, ignore_errors=True)


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path`, from /proc/mounts (octal escapes decoded)."""
    prefix = str(path.resolve())
    found = []
    for line in Path("/proc/mounts").read_text().splitlines():
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[1])
        if point == prefix or point.startswith(prefix + "/"):
            found.append(point)
    return found


def chroot(root: Path, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """arch-chroot ROOT ARGV..., then prove it left no mount behind."""
    result = run(["arch-chroot", root, *argv], capture=True, check=check, timeout=300)
    assert mounts_under(root) == [], "arch-chroot left mounts behind"
    return result


@dataclass
class Installed:
    root: Path
    release: str
    hook_image: list[str]  # the initramfs pacman's hook made during pacstrap


@pytest.fixture(scope="module")
def installed(repo, tmp_path_factory) -> Iterator[Installed]:
    root = tmp_path_factory.mktemp("root")
    names = sorted(repo.packages)
    try:
        run(["pacstrap", "-C", repo.pacman_conf, "-c", "-G", "-M", root, *names], timeout=600)
        hook_image = image_listing(root / "boot/initramfs-linux.img")
        yield Installed(root, repo.kernel_release, hook_image)
    finally:
        gnupg = root / "etc/pacman.d/gnupg"
        if gnupg.is_dir() and shutil.which("gpgconf"):
            run(["gpgconf", "--homedir", gnupg, "--kill", "gpg-agent"], check=False)
        left = mounts_under(root)
        if left:
            run(["umount", "-R", "--lazy", root], check=False)
        if mounts_under(root):  # never delete through a mount into the host's /dev or /proc
            pytest.fail(f"mounts left under {root}: {left}")
        shutil.rmtree(root, ignore_errors=True)


def image_listing(image: Path) -> list[str]:
    return run(["bsdtar", "-tf", image], capture=True).stdout.splitlines()


def image_file(image: Path, member: str) -> str:
    return run(["bsdtar", "-xOf", image, member], capture=True).stdout


def host_loaded(module: str) -> bool:
    modules = Path("/proc/modules")
    return modules.is_file() and any(
        line.split()[0] == module for line in modules.read_text().splitlines()
    )


def modprobe_order(root: Path, release: str, names: list[str]) -> list[str]:
    """kmod's load order for `names`, each module once, as paths under the module dir."""
    order: list[str] = []
    for name in names:
        argv: list[str | Path] = ["modprobe", "-C", root / "etc/modprobe.d", "-d", root]
        out = run([*argv, "-S", release, "--show-depends", name], capture=True).stdout
        for line in out.splitlines():
            if line.startswith("insmod "):
                rel = line.split()[1].split(f"/modules/{release}/", 1)[1]
                if rel not in order:
                    order.append(rel)
    return order


@pytest.mark.integration
@pytest.mark.root
def test_packages_are_owned_by_root_with_pkginfo_first(repo):
    assert sorted(p.name for p in repo.repo.glob("*.pkg.tar.zst")) == sorted(
        p.name for p in repo.package_files
    )
    for (name, version), package in zip(repo.packages.items(), repo.package_files, strict=True):
        listing = run(["bsdtar", "-tvf", package], capture=True).stdout.splitlines()
        assert listing[0].split()[-1] == ".PKGINFO"
        assert listing[1].split()[-1] == ".MTREE"
        for entry in listing:
            assert entry.split()[2:4] == ["root", "root"], f"{package.name}: {entry}"
        info = image_file(package, ".PKGINFO").splitlines()
        assert f"pkgname = {name}" in info
        assert f"pkgver = {version}" in info
        assert "arch = x86_64" in info
        assert any(re.fullmatch(r"size = [1-9]\d*", line) for line in info)


@pytest.mark.integration
@pytest.mark.root
def test_pacman_lists_every_package(repo, tmp_path):
    pacman = ["pacman", "--config", repo.pacman_conf, "--dbpath", tmp_path / "db",
              "--logfile", tmp_path / "pacman.log", "--noconfirm"]  # fmt: skip
    (tmp_path / "db").mkdir()
    run([*pacman, "-Sy"])
    listed = run([*pacman, "-Sl", offline.REPO_NAME], capture=True).stdout.splitlines()
    assert {line.split()[1]: line.split()[2] for line in listed} == repo.packages
    info = run([*pacman, "-Si", "mkinitcpio"], capture=True).stdout
    assert re.search(r"^Provides\s*:\s*initramfs$", info, re.M)


@pytest.mark.integration
@pytest.mark.root
def test_a_second_build_reuses_everything(repo, capsys):
    manifest = repo.dir / "offline.json"
    before = manifest.stat().st_mtime_ns
    start = time.monotonic()
    assert offline.main([str(repo.dir)]) == 0
    assert time.monotonic() - start < 10
    assert manifest.stat().st_mtime_ns == before
    out = capsys.readouterr().out
    assert re.search(r"^linux\s+\S+\s+\d+\.\d MiB$", out, re.M)


@pytest.mark.integration
@pytest.mark.root
def test_pacstrap_installs_arch_layout(installed):
    root, release = installed.root, installed.release
    for link, target in (
        ("bin", "usr/bin"),
        ("sbin", "usr/bin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib"),
        ("usr/sbin", "bin"),
    ):
        assert os.readlink(root / link) == target
    assert os.readlink(root / "usr/bin/sh") == "busybox"
    assert os.path.realpath(root / "sbin/init") == str(root / "usr/lib/archkernel-test/init")
    moddir = root / "usr/lib/modules" / release
    assert (moddir / "pkgbase").read_text() == "linux\n"
    assert (moddir / "vmlinuz").read_bytes() == (root / "boot/vmlinuz-linux").read_bytes()
    dep = (moddir / "modules.dep").read_text()
    for name in [*HYPERV, "udf", "sr_mod", "cdrom", "ata_piix", "virtio_blk", "ext4", "nbd"]:
        assert re.search(rf"/{name}\.ko[^:]*:", dep), name
    assert not (moddir / "kernel/drivers/gpu").exists()
    assert "ID=arch\n" in (root / "etc/os-release").read_text()
    assert (root / "etc/shadow").read_text().startswith("root:*:14871::::::\n")
    assert (root / "etc/shadow").stat().st_mode & 0o777 == 0o600
    assert "#en_US.UTF-8 UTF-8\n" in (root / "etc/locale.gen").read_text()
    assert not (root / "etc/machine-id").exists()
    assert not (root / "etc/resolv.conf").exists()
    assert (root / "etc/sudoers").stat().st_mode & 0o777 == 0o440
    assert (root / "etc/sudoers.d").stat().st_mode & 0o777 == 0o750
    sudoers = (root / "etc/sudoers").read_text()
    assert "@includedir /etc/sudoers.d\n" in sudoers and "# %wheel ALL=(ALL:ALL) ALL\n" in sudoers
    sshd = (root / "etc/ssh/sshd_config").read_text()
    assert "\nInclude /etc/ssh/sshd_config.d/*.conf\n" in sshd
    assert "#PermitRootLogin prohibit-password" in sshd
    waagent = (root / "etc/waagent.conf").read_text()
    assert "\nProvisioning.Agent=auto\n" in waagent and "\nResourceDisk.Format=n\n" in waagent
    assert not re.search(r"^\s*datasource", (root / "etc/cloud/cloud.cfg").read_text(), re.M)
    assert (root / "etc/cloud/cloud.cfg.d").is_dir()
    assert (root / "etc/systemd/network").is_dir()
    assert (root / "usr/share/zoneinfo/UTC").read_bytes() == standins.utc_tzif()


@pytest.mark.integration
@pytest.mark.root
def test_installed_files_match_the_packages_mtree(installed):
    out = run(["pacman", "--root", installed.root, "-Qkk"], capture=True, check=False)
    counts = re.findall(r"^(\S+): \d+ total files, (\d+) altered files?$", out.stdout, re.M)
    assert {name for name, _ in counts} == {
        "base", "busybox", "chrony", "cloud-init", "filesystem", "glibc", "linux",
        "mkinitcpio", "openssh", "sudo", "systemd", "tzdata", "walinuxagent",
    }  # fmt: skip
    # mkinitcpio's hook rewrote nothing the packages own; nothing else ran.
    assert {name: int(n) for name, n in counts if n != "0"} == {}, out.stdout + out.stderr


@pytest.mark.integration
@pytest.mark.root
def test_pacstrap_hook_made_an_autodetected_initramfs(installed):
    """As on Arch, installing linux runs mkinitcpio -P; autodetect keeps the host's modules."""
    assert "init" in installed.hook_image
    assert "etc/mkinitcpio-standin.modules" in installed.hook_image
    if not host_loaded("ata_piix"):
        assert not any(p.endswith("/ata_piix.ko") for p in installed.hook_image)


@pytest.mark.integration
@pytest.mark.root
def test_mkinitcpio_without_autodetect_packs_hyperv_in_modprobe_order(installed):
    root, release = installed.root, installed.release
    dropin = root / "etc/mkinitcpio.conf.d/azure.conf"
    dropin.write_text(
        f"MODULES=({' '.join(HYPERV)})\n"
        "HOOKS=(base udev modconf kms keyboard keymap consolefont block filesystems fsck)\n"
    )
    image = root / "boot/initramfs-linux.img"
    image.unlink()
    try:
        out = chroot(root, "mkinitcpio", "-P").stdout
    finally:
        dropin.unlink()
    assert "==> Image generation successful" in out
    assert image.stat().st_mode & 0o777 == 0o600
    listing = image_listing(image)
    for name in [*HYPERV, *BLOCK, *FILESYSTEMS]:
        assert any(p.endswith(f"/{name}.ko") for p in listing), name
    for member in (
        "init",
        "usr/bin/busybox",
        "usr/bin/sh",
        "usr/bin/switch_root",
        "dev/console",
        f"usr/lib/modules/{release}/modules.dep",
    ):
        assert member in listing
    order = image_file(image, "etc/mkinitcpio-standin.modules").split()
    assert order == modprobe_order(root, release, [*HYPERV, *BLOCK, *FILESYSTEMS])
    assert all(f"usr/lib/modules/{release}/{rel}" in listing for rel in order)
    assert image_file(image, "init").startswith("#!/usr/bin/busybox sh\n")


def mkinitcpio_with(
    installed: Installed, conf_text: str, kver: str = "/boot/vmlinuz-linux"
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """mkinitcpio -c CONF -k KVER -g IMAGE in the root: its result and the image's members."""
    root = installed.root
    conf, image = root / "etc/mkinitcpio-test.conf", root / "boot/test.img"
    conf.write_text(conf_text)
    try:
        result = chroot(root, "mkinitcpio", "-c", "/etc/mkinitcpio-test.conf", "-k", kver,
                        "-g", "/boot/test.img", check=False)  # fmt: skip
        listing = image_listing(image) if image.exists() else []
    finally:
        conf.unlink()
        image.unlink(missing_ok=True)
    return result, listing


@pytest.mark.integration
@pytest.mark.root
def test_autodetect_drops_hook_modules_but_keeps_modules_array(installed):
    if host_loaded("ata_piix"):
        skip_for_this_machine("ata_piix is loaded, so autodetect keeps it")
    result, listing = mkinitcpio_with(
        installed, "MODULES=(hv_vmbus)\nHOOKS=(base udev autodetect block filesystems)\n"
    )
    assert result.returncode == 0, result.stderr
    assert "autodetect: leaving out 'ata_piix' (not loaded on this machine)" in result.stdout
    assert any(p.endswith("/hv_vmbus.ko") for p in listing)
    assert not any(p.endswith(("/ata_piix.ko", "/ext4.ko")) for p in listing)


@pytest.mark.integration
@pytest.mark.root
def test_autodetect_says_that_step_5_rebuilds_the_image_without_it(installed):
    """What pacstrap's hook prints must not read as an error of the build."""
    left_out = [m for m in [*BLOCK, *FILESYSTEMS] if not host_loaded(m)]
    if not left_out:
        skip_for_this_machine("every block and file system module is loaded")
    result, _ = mkinitcpio_with(installed, "HOOKS=(base udev autodetect block filesystems)\n")
    assert result.returncode == 0, result.stderr
    assert (
        f"  -> autodetect left out {len(left_out)} module(s) the build host has not loaded; "
        "expected in the image pacman's hook makes during pacstrap: archkernel's azure_vhd "
        "step 5 (05_initramfs) rebuilds the initramfs without autodetect\n"
    ) in result.stdout
    without, _ = mkinitcpio_with(installed, "HOOKS=(base udev block filesystems)\n")
    assert "autodetect left out" not in without.stdout


@pytest.mark.integration
@pytest.mark.root
def test_mkinitcpio_fails_on_a_missing_module_unless_optional(installed):
    missing, _ = mkinitcpio_with(installed, "MODULES=(no_such_module)\nHOOKS=(base)\n")
    assert missing.returncode == 1
    assert "module not found: 'no_such_module'" in missing.stderr
    optional, listing = mkinitcpio_with(
        installed, "MODULES=(no_such_module? udf)\nHOOKS=(base)\n", kver=installed.release
    )
    assert optional.returncode == 0, optional.stderr
    assert any(p.endswith("/udf.ko") for p in listing)
    bad_hook, _ = mkinitcpio_with(installed, "HOOKS=(base no_such_hook)\n")
    assert bad_hook.returncode == 1
    assert "Hook 'no_such_hook' cannot be found" in bad_hook.stderr


@pytest.mark.integration
@pytest.mark.root
def test_modules_order_matches_modprobe_for_soft_and_alias_dependencies(installed):
    moddir = installed.root / "usr/lib/modules" / installed.release
    awk = STANDIN_LIB / "modules-order.awk"
    for names in (["ext4"], ["sd_mod"], ["btrfs"], ["xfs"], ["udf"], ["nbd"], ["virtio_net"],
                  ["crc32c"], ["nvme", "hv_storvsc", "ext4"]):  # fmt: skip
        out = subprocess.run(
            [busybox(), "awk", "-v", f"moddir={moddir}", "-v", f"names={' '.join(names)}",
             "-f", awk],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        order = [line.split()[2] for line in out.splitlines() if line.startswith("MOD ")]
        assert order == modprobe_order(installed.root, installed.release, names), names


@pytest.mark.integration
@pytest.mark.root
def test_host_systemctl_enables_the_standin_units(installed):
    if shutil.which("systemctl") is None:
        pytest.skip("needs systemctl on the host")
    root = installed.root
    units = ["sshd.service", "systemd-networkd.service", "systemd-resolved.service",
             "systemd-timesyncd.service", "serial-getty@ttyS0.service", "cloud-init-local.service",
             "cloud-init.service", "cloud-config.service", "cloud-final.service",
             "cloud-init.target", "waagent.service"]  # fmt: skip
    run(["systemctl", f"--root={root}", "enable", *units])
    wants = root / "etc/systemd/system"
    for link in (
        "multi-user.target.wants/sshd.service",
        "multi-user.target.wants/systemd-networkd.service",
        "sockets.target.wants/systemd-networkd.socket",
        "sysinit.target.wants/systemd-resolved.service",
        "getty.target.wants/serial-getty@ttyS0.service",
        "cloud-init.target.wants/cloud-init.service",
        "multi-user.target.wants/cloud-init.target",
        "multi-user.target.wants/waagent.service",
    ):
        assert (wants / link).is_symlink(), link
    run(["systemctl", f"--root={root}", "set-default", "multi-user.target"])
    assert os.readlink(wants / "default.target").endswith("/multi-user.target")


@pytest.mark.integration
@pytest.mark.root
def test_test_init_reports_hostname_root_and_fstab(installed):
    root = installed.root
    uuid = "0b7ac8a6-5d0a-4f2e-9a53-7a1d2c3e4f50"
    fstab = (root / "etc/fstab").read_text()
    try:
        (root / "etc/hostname").write_text("archkernel-test\n")
        (root / "etc/fstab").write_text(f"{fstab}UUID={uuid} / ext4 rw,relatime 0 1\n")
        out = chroot(root, "/sbin/init").stdout
    finally:
        (root / "etc/hostname").unlink(missing_ok=True)
        (root / "etc/fstab").write_text(fstab)
    marker = re.search(
        r"^ARCHKERNEL-TEST-BOOT hostname=(\S*) root=(\S*) rootuuid=(\S+) fstab=(\S+)$", out, re.M
    )
    assert marker, out
    assert marker.group(1) == "archkernel-test"
    assert marker.group(4) == uuid
    assert re.search(r"^archkernel-test login:$", out, re.M)
    assert "powering off" not in out  # not PID 1: it only reports


@pytest.mark.integration
@pytest.mark.root
def test_locale_gen_generates_the_uncommented_locales(installed):
    root = installed.root
    original = (root / "etc/locale.gen").read_text()
    try:
        (root / "etc/locale.gen").write_text(original.replace("#en_US.UTF-8", "en_US.UTF-8"))
        out = chroot(root, "locale-gen").stdout
        archive = (root / "usr/lib/locale/locale-archive").read_text()
    finally:
        (root / "etc/locale.gen").write_text(original)
        (root / "usr/lib/locale/locale-archive").unlink(missing_ok=True)
    assert "en_US.UTF-8... done" in out
    assert archive == "en_US.UTF-8 UTF-8\n"


def boot(root: Path, disk: Path, log: Path, uuid: str) -> None:
    """Boot the kernel and initramfs of `root` on `disk` (IDE) until the guest powers off."""
    run(
        ["qemu-system-x86_64", "-accel", "tcg", "-M", "pc", "-cpu", "max", "-m", "512",
         "-display", "none", "-monitor", "none", "-no-reboot", "-serial", f"file:{log}",
         "-kernel", root / "boot/vmlinuz-linux", "-initrd", root / "boot/initramfs-linux.img",
         "-append", f"root=UUID={uuid} console=ttyS0,115200 rootdelay=300 quiet",
         "-drive", f"file={disk},format=raw,if=ide"],
        timeout=300,
    )  # fmt: skip


@pytest.mark.integration
@pytest.mark.vm
@pytest.mark.root
def test_standin_initramfs_boots_the_test_init_in_qemu(installed, tmp_path):
    """The whole chain on a real kernel: stand-in /init, root by UUID, test /sbin/init."""
    missing = missing_tools(["qemu-system-x86_64", "mkfs.ext4"])
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    root = installed.root
    uuid = "5a0c1e2d-3b4f-4a6e-8d7c-9b0a1f2e3d4c"
    dropin = root / "etc/mkinitcpio.conf.d/azure.conf"
    fstab = (root / "etc/fstab").read_text()
    disk = tmp_path / "root.img"
    try:
        dropin.write_text(f"MODULES=({' '.join(HYPERV)})\nHOOKS=(base udev block filesystems)\n")
        chroot(root, "mkinitcpio", "-P")
        (root / "etc/hostname").write_text("archkernel-test\n")
        (root / "etc/fstab").write_text(f"{fstab}UUID={uuid} / ext4 rw,relatime 0 1\n")
        run(["mkfs.ext4", "-q", "-U", uuid, "-d", root, disk, "512M"])
    finally:
        dropin.unlink(missing_ok=True)
        (root / "etc/hostname").unlink(missing_ok=True)
        (root / "etc/fstab").write_text(fstab)
    log = tmp_path / "console.log"
    try:
        boot(root, disk, log, uuid)
    finally:
        disk.unlink(missing_ok=True)  # 250 MB that pytest would keep for three sessions
    console = log.read_text(errors="replace").replace("\r", "")
    assert "mkinitcpio-standin: loaded ata_piix\n" in console
    assert "mkinitcpio-standin: loaded ext4\n" in console
    assert "mkinitcpio-standin: could not load hv_vmbus (" in console  # not on Hyper-V
    assert f"mkinitcpio-standin: root UUID={uuid} from /dev/sda\n" in console
    assert (
        f"ARCHKERNEL-TEST-BOOT hostname=archkernel-test root=/dev/sda rootuuid={uuid} "
        f"fstab={uuid}\n"
    ) in console
    assert "\narchkernel-test login:\n" in console
    assert "archkernel test init: powering off" in console
