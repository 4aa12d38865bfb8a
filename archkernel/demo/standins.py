"""The stand-in packages of the offline repository: Arch's names and layout, little else.

Everything an Arch system needs that is not a kernel or busybox is a stand-in: the files
under `files/<package>/` (this package's data) plus what the `_stage_*` functions below
add (empty directories, symlinks, modes). Nothing runs at install time except, as on
Arch, mkinitcpio's pacman hook (`mkinitcpio -P` after installing a kernel, with the build
host's autodetect). The stand-ins for mkinitcpio, its /init and /sbin/init are busybox
shell scripts; their headers say what they print. `busybox` is Debian's busybox-static
with a symlink per applet.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

from archkernel.demo.package import Package, Staging, is_script, sanitize_pkgver
from archkernel.errors import UserError
from archkernel.host.run import run

FILES = Path(__file__).with_name("files")
STANDIN_VERSION = "1.0-1"
BUSYBOX_DEB = "busybox-static"
# Arch's root layout (filesystem package); proc, sys, root, tmp get other modes below.
FILESYSTEM_DIRS = """
    boot dev etc/profile.d etc/skel home mnt opt run srv usr/bin usr/include usr/lib
    usr/share/man usr/src usr/local/bin usr/local/etc usr/local/include usr/local/lib
    usr/local/sbin usr/local/share usr/local/src var/cache var/empty var/lib var/local
    var/log var/opt var/spool
""".split()  # noqa: SIM905 - a word list reads better than 28 quoted lines
FILESYSTEM_BACKUP = """
    fstab group gshadow hosts issue nsswitch.conf passwd profile shadow shells
""".split()  # noqa: SIM905
# What depmod reads from Debian's module directory (the rest it writes anew).
# busybox applets not linked into /usr/bin: base's /usr/bin/init is the test init.
BUSYBOX_SKIPPED_APPLETS = frozenset({"busybox", "init", "linuxrc"})


def utc_tzif() -> bytes:
    """A TZif file for UTC (version 2: a v1 and a v2 block, then the POSIX TZ footer)."""
    # counts: isutcnt, isstdcnt, leapcnt, timecnt, typecnt, charcnt; one type, no transitions
    header = b"TZif2" + bytes(15) + struct.pack(">6l", 0, 0, 0, 0, 1, 4)
    data = struct.pack(">lBB", 0, 0, 0) + b"UTC\0"
    return header + data + header + data + b"\nUTC0\n"


def _stage_filesystem(s: Staging) -> Package:
    s.copy_files(FILES / "filesystem")
    s.dirs(*FILESYSTEM_DIRS)
    s.dirs("proc", "sys", mode=0o555)
    s.dirs("root", mode=0o750)
    s.dirs("tmp", "var/tmp", "var/spool/mail", mode=0o1777)
    for link, target in (
        ("bin", "usr/bin"),
        ("sbin", "usr/bin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib"),
        ("usr/sbin", "bin"),
        ("usr/lib64", "lib"),
        ("usr/local/man", "share/man"),
        ("var/run", "../run"),
        ("var/lock", "../run/lock"),
        ("var/mail", "spool/mail"),
        ("etc/mtab", "../proc/self/mounts"),
        ("etc/os-release", "../usr/lib/os-release"),
    ):
        s.symlink(link, target)
    s.mode("etc/shadow", 0o600)
    s.mode("etc/gshadow", 0o600)
    return Package(
        "filesystem",
        STANDIN_VERSION,
        "Base Arch Linux files (archkernel test stand-in)",
        backup=tuple(f"etc/{name}" for name in FILESYSTEM_BACKUP),
        license="GPL",
    )


def _stage_glibc(s: Staging) -> Package:
    s.copy_files(FILES / "glibc")
    s.dirs("usr/lib/locale")
    return Package(
        "glibc",
        STANDIN_VERSION,
        "locale.gen and locale-gen of the GNU C Library (archkernel test stand-in)",
        depends=("filesystem", "tzdata"),
        backup=("etc/locale.gen",),
        license="LGPL",
    )


def _stage_tzdata(s: Staging) -> Package:
    utc = utc_tzif()
    for name in ("UTC", "Etc/UTC", "Etc/GMT"):
        s.write(f"usr/share/zoneinfo/{name}", utc)
    return Package(
        "tzdata",
        STANDIN_VERSION,
        "UTC from the time zone database (archkernel test stand-in)",
        license="custom:public domain",
    )


def _stage_base(s: Staging) -> Package:
    s.copy_files(FILES / "base")
    # /sbin/init: /sbin is a symlink to usr/bin.
    s.symlink("usr/bin/init", "../lib/archkernel-test/init")
    return Package(
        "base",
        STANDIN_VERSION,
        "Minimal package set for archkernel's offline test images, with a test /sbin/init",
        depends=("filesystem", "glibc", "tzdata", "busybox"),
        license="GPL",
    )


def _stage_mkinitcpio(s: Staging) -> Package:
    s.copy_files(FILES / "mkinitcpio")
    s.dirs("etc/mkinitcpio.conf.d", "etc/mkinitcpio.d")
    return Package(
        "mkinitcpio",
        STANDIN_VERSION,
        "Initramfs generator with Arch's configuration (archkernel test stand-in, busybox sh)",
        depends=("filesystem", "busybox"),
        provides=("initramfs",),
        backup=("etc/mkinitcpio.conf",),
        license="GPL",
    )


def _stage_systemd(s: Staging) -> Package:
    s.copy_files(FILES / "systemd")
    s.dirs("etc/systemd/system", "etc/systemd/network", "usr/lib/systemd/network")
    s.symlink("usr/lib/systemd/system/default.target", "graphical.target")
    s.symlink("usr/lib/systemd/system/multi-user.target.wants/getty.target", "../getty.target")
    return Package(
        "systemd",
        STANDIN_VERSION,
        "systemd unit files only, for systemctl --root (archkernel test stand-in)",
        depends=("filesystem",),
        license="GPL2",
    )


def _stage_openssh(s: Staging) -> Package:
    s.copy_files(FILES / "openssh")
    s.dirs("etc/ssh/sshd_config.d")
    return Package(
        "openssh",
        STANDIN_VERSION,
        "sshd_config and units of OpenSSH (archkernel test stand-in)",
        depends=("filesystem",),
        backup=("etc/ssh/sshd_config",),
        license="BSD",
    )


def _stage_sudo(s: Staging) -> Package:
    s.copy_files(FILES / "sudo")
    s.mode("etc/sudoers", 0o440)
    s.dirs("etc/sudoers.d", mode=0o750)
    return Package(
        "sudo",
        STANDIN_VERSION,
        "sudoers of sudo (archkernel test stand-in)",
        depends=("filesystem",),
        backup=("etc/sudoers",),
    )


def _stage_cloud_init(s: Staging) -> Package:
    s.copy_files(FILES / "cloud-init")
    s.dirs("etc/cloud/templates", "var/lib/cloud")
    return Package(
        "cloud-init",
        STANDIN_VERSION,
        "cloud.cfg and units of cloud-init (archkernel test stand-in)",
        depends=("filesystem", "systemd"),
        backup=("etc/cloud/cloud.cfg", "etc/cloud/cloud.cfg.d/05_logging.cfg"),
        license="GPL3",
    )


def _stage_walinuxagent(s: Staging) -> Package:
    s.copy_files(FILES / "walinuxagent")
    return Package(
        "walinuxagent",
        STANDIN_VERSION,
        "waagent.conf and unit of the Azure Linux Agent (archkernel test stand-in)",
        depends=("filesystem", "openssh"),
        backup=("etc/waagent.conf",),
        license="Apache",
    )


def _stage_chrony(s: Staging) -> Package:
    s.copy_files(FILES / "chrony")
    s.dirs("var/lib/chrony")
    return Package(
        "chrony",
        STANDIN_VERSION,
        "chrony.conf and unit of chrony (archkernel test stand-in)",
        depends=("filesystem",),
        backup=("etc/chrony.conf",),
        license="GPL2",
    )


def stage_busybox(s: Staging, deb: Path, work: Path) -> Package:
    unpacked = work / "busybox-deb"
    run(["dpkg-deb", "-x", deb, unpacked])
    binary = next(
        (p for p in (unpacked / "bin/busybox", unpacked / "usr/bin/busybox") if p.is_file()), None
    )
    if binary is None:
        raise UserError(f"{deb.name} holds no bin/busybox", "check the busybox-static package")
    s.dirs("usr/bin")
    shutil.copy2(binary, s.root / "usr/bin/busybox")
    (s.root / "usr/bin/busybox").chmod(0o755)
    applets = run([binary, "--list"], capture=True).stdout.split()
    for applet in applets:
        if applet not in BUSYBOX_SKIPPED_APPLETS and "/" not in applet:
            s.symlink(f"usr/bin/{applet}", "busybox")
    version = run(["dpkg-deb", "-f", deb, "Version"], capture=True).stdout.strip()
    return Package(
        "busybox",
        f"{sanitize_pkgver(version)}-1",
        "Debian's static busybox with a symlink for every applet (archkernel tests)",
        depends=("filesystem",),
        provides=("sh",),
        license="GPL",
    )


StageFn = Callable[[Staging], Package]
STANDINS: tuple[StageFn, ...] = (
    _stage_filesystem,
    _stage_glibc,
    _stage_tzdata,
    _stage_base,
    _stage_mkinitcpio,
    _stage_systemd,
    _stage_openssh,
    _stage_sudo,
    _stage_cloud_init,
    _stage_walinuxagent,
    _stage_chrony,
)

# The modules whose code decides what the packages hold.
RECIPE_MODULES = ("package.py", "standins.py", "linux.py", "offline.py")


def recipe_digest(*extra: str) -> str:
    """Digest of the recipe modules, the stand-in files and `extra`: what packages are made of."""
    h = hashlib.sha256()
    for name in RECIPE_MODULES:
        h.update(Path(__file__).with_name(name).read_bytes())
    for path in sorted(FILES.rglob("*")):
        rel = path.relative_to(FILES).as_posix()
        h.update(f"\0{rel}\0".encode())
        if path.is_symlink():
            h.update(os.readlink(path).encode())
        elif path.is_file():
            h.update(b"x" if is_script(path) else b"-")
            h.update(path.read_bytes())
    for item in extra:
        h.update(f"\0{item}".encode())
    return h.hexdigest()
