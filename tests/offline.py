"""A small, real pacman repository for building Arch images without an Arch mirror.

    python -m tests.offline DIR [--force] [-v]

writes under DIR:

    repo/             the `archkernel-test` repository: *.pkg.tar.zst and the repo-add db
    pacman.conf       Architecture x86_64, SigLevel Never, [archkernel-test] at file://DIR/repo
    settings.toml     the project's settings for an offline azure_vhd build (workdir "build")
    pkgcache/         pacman's CacheDir (what `pacstrap -c` downloads lands here, not on the host)
    offline.json      what was built from what; a rerun with the same inputs does nothing

The packages carry Arch's names and put files where Arch does, so the default
configuration reads naturally: `linux` is Debian's amd64 kernel and modules (downloaded
with `tests.support.kernel`, a few big driver trees left out, depmod run anew), `busybox`
is Debian's busybox-static with a symlink per applet; everything else is a stand-in from
`tests/offline_files/<package>/` plus what `_stage_*` below adds (empty directories,
symlinks, modes). Nothing runs at install time except, as on Arch, mkinitcpio's pacman
hook (`mkinitcpio -P` after installing a kernel, with the build host's autodetect). The
stand-ins for mkinitcpio, its /init and /sbin/init are busybox shell scripts; their
headers say what they print.

A package is a zstd tar, owned by root, every mtime BUILD_DATE (so rebuilds are identical),
holding .PKGINFO first (all pacman 6.0 requires), .MTREE (so `pacman -Qkk` can check an
installed root) and the files. makepkg is not used: it refuses to run as root.

Downloads and the built `linux` package (the slow part: unpacking and compressing the
modules) are cached in $ARCHKERNEL_TEST_CACHE (default ~/.cache/archkernel-tests); --force
rebuilds DIR but reuses a cached `linux` package made from the same kernel and sources.
Needs: bsdtar, repo-add (pacman), depmod (kmod), apt-get and dpkg-deb (Debian/Ubuntu).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import json
import os
import re
import shutil
import stat
import struct
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from archkernel import log as logging_setup
from archkernel.errors import UserError
from archkernel.host.files import atomic_path, remove_path, temporary_directory, write_text
from archkernel.host.run import check_tools, run
from archkernel.log import complete_step, log
from tests.support.apt import apt_download
from tests.support.cache import cache_dir, locked

REPO_NAME = "archkernel-test"
ARCH = "x86_64"
FILES = Path(__file__).with_name("offline_files")
BUSYBOX_DEB = "busybox-static"
# Every file in every package gets this mtime, so rebuilding gives the same packages.
BUILD_DATE = 1_700_000_000
PACKAGER = "archkernel offline tests <archkernel@localhost>"
STANDIN_VERSION = "1.0-1"
# Package names in settings.toml; cloud-init (provisioning = "cloud-init", the default) and
# walinuxagent (provisioning = "waagent" or extensions = true) are added by the build itself.
SETTINGS_PACKAGES = ("base", "linux", "mkinitcpio", "systemd", "openssh", "sudo")
# pacstrap of every package fills 235 MiB of ext4 (modules, mostly); 512 MiB leaves room
# for GRUB, more initramfs images and whatever a test adds, and keeps images quick to copy.
DISK_SIZE = "512MiB"
HOSTNAME = "archkernel-test"
# Parts of Debian's module tree no test image needs (about 180 MiB of 400).
PRUNED_MODULE_DIRS = (
    "kernel/drivers/gpu",
    "kernel/sound",
    "kernel/drivers/media",
    "kernel/drivers/infiniband",
    "kernel/drivers/net/wireless",
    "kernel/net/wireless",
    "kernel/net/mac80211",
    "kernel/drivers/staging",
    "kernel/drivers/iio",
    "kernel/drivers/comedi",
    "kernel/drivers/isdn",
    "kernel/drivers/bluetooth",
    "kernel/net/bluetooth",
)
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
DEPMOD_INPUTS = ("modules.order", "modules.builtin", "modules.builtin.modinfo")
# busybox applets not linked into /usr/bin: base's /usr/bin/init is the test init.
BUSYBOX_SKIPPED_APPLETS = frozenset({"busybox", "init", "linuxrc"})
TOOLS = ("bsdtar", "repo-add", "depmod", "dpkg-deb", "apt-get", "apt-cache")


# --- what a package is ------------------------------------------------------------------------


@dataclass(frozen=True)
class Package:
    """The .PKGINFO fields of one package."""

    name: str
    version: str  # pkgver-pkgrel
    description: str
    depends: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()
    backup: tuple[str, ...] = ()
    license: str = "custom"

    @property
    def filename(self) -> str:
        return f"{self.name}-{self.version}-{ARCH}.pkg.tar.zst"


def pkginfo(pkg: Package, size: int) -> str:
    """The .PKGINFO text of `pkg` whose files add up to `size` bytes."""
    lines = [
        "# Generated by archkernel's tests/offline.py",
        f"pkgname = {pkg.name}",
        f"pkgbase = {pkg.name}",
        f"pkgver = {pkg.version}",
        f"pkgdesc = {pkg.description}",
        f"builddate = {BUILD_DATE}",
        f"packager = {PACKAGER}",
        f"size = {size}",
        f"arch = {ARCH}",
        f"license = {pkg.license}",
    ]
    lines += [f"provides = {p}" for p in pkg.provides]
    lines += [f"backup = {b}" for b in pkg.backup]
    lines += [f"depend = {d}" for d in pkg.depends]
    return "\n".join(lines) + "\n"


def sanitize_pkgver(version: str) -> str:
    """A Debian version as a pacman pkgver: no epoch, no '-', only [A-Za-z0-9._+].

    `1:1.35.0-4+deb12u1+b1` -> `1.35.0.4+deb12u1+b1`, `6.1.192-2` -> `6.1.192.2`.
    """
    upstream = version.split(":", 1)[-1]
    cleaned = re.sub(r"[^A-Za-z0-9._+]", ".", upstream).strip(".")
    if not cleaned or not cleaned[0].isalnum():
        raise ValueError(f"cannot make a pkgver of {version!r}")
    return cleaned


def mtree(root: Path, paths: Iterable[str]) -> str:
    """The .MTREE text (before gzip) `pacman -Qkk` checks installed files against.

    Written here rather than by `bsdtar --format=mtree`, which hashes several times slower.
    pacman 6.0 compares MD5 digests, later versions SHA-256: both are written, as makepkg does.
    """

    def escape(path: str) -> str:
        out = []
        for byte in path.encode():
            if byte <= 32 or byte >= 127 or byte in b"\\#=":
                out.append(f"\\{byte:03o}")
            else:
                out.append(chr(byte))
        return "".join(out)

    lines = ["#mtree", "/set type=file uid=0 gid=0 mode=644"]
    for rel in paths:
        path = root / rel
        st = path.lstat()
        mode = stat.S_IMODE(st.st_mode)
        head = f"./{escape(rel)} time={int(st.st_mtime)}.0"
        if stat.S_ISDIR(st.st_mode):
            lines.append(f"{head} mode={mode:o} type=dir")
        elif stat.S_ISLNK(st.st_mode):
            target = escape(os.readlink(path))
            lines.append(f"{head} mode=777 type=link link={target}")
        else:
            md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    md5.update(block)
                    sha256.update(block)
            mode_part = "" if mode == 0o644 else f" mode={mode:o}"
            lines.append(
                f"{head}{mode_part} size={st.st_size} md5digest={md5.hexdigest()}"
                f" sha256digest={sha256.hexdigest()}"
            )
    return "\n".join(lines) + "\n"


def package_paths(root: Path) -> list[str]:
    """Every path under `root` (relative, parents first), without pacman's metadata files."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        for name in dirnames + filenames:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if rel_dir == "." and name.startswith("."):
                continue
            found.append(rel)
    return sorted(found, key=lambda p: p.split("/"))


def installed_size(root: Path, paths: Iterable[str]) -> int:
    return sum((root / p).lstat().st_size for p in paths if not (root / p).is_dir())


def pacman_conf(repo_dir: Path, cache_dir: Path) -> str:
    """pacman.conf for the offline repository at `repo_dir` (absolute)."""
    return f"""\
# pacman.conf for archkernel's offline test repository (written by python -m tests.offline).
[options]
Architecture = {ARCH}
# A local repository of unsigned packages: nothing to verify, no keyring needed.
SigLevel = Never
LocalFileSigLevel = Never
# `pacstrap -c` downloads into CacheDir; keep that out of the host's /var/cache/pacman.
CacheDir = {cache_dir}/
# Tried in a plain directory and on a mounted image: pacman finds the right mount point
# in both, and a too small image then fails early with a clear message.
CheckSpace

[{REPO_NAME}]
SigLevel = Never
Server = {repo_dir.as_uri()}
"""


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def settings_toml(packages: Iterable[str]) -> str:
    """The settings file of an offline azure_vhd build next to pacman.conf."""
    names = ", ".join(_toml_string(p) for p in packages)
    return f"""\
# archkernel settings for an azure_vhd build from the offline test repository
# (written by python -m tests.offline). Relative paths are relative to this file.
workdir = "build"

[azure]
# cloud-init comes with provisioning = "cloud-init" (the default), walinuxagent with
# provisioning = "waagent" or extensions = true: both are in the repository.
pacman_conf = "pacman.conf"
packages = [{names}]
disk_size = {_toml_string(DISK_SIZE)}
hostname = {_toml_string(HOSTNAME)}
"""


def utc_tzif() -> bytes:
    """A TZif file for UTC (version 2: a v1 and a v2 block, then the POSIX TZ footer)."""
    # counts: isutcnt, isstdcnt, leapcnt, timecnt, typecnt, charcnt; one type, no transitions
    header = b"TZif2" + bytes(15) + struct.pack(">6l", 0, 0, 0, 0, 1, 4)
    data = struct.pack(">lBB", 0, 0, 0) + b"UTC\0"
    return header + data + header + data + b"\nUTC0\n"


# --- staging the packages -----------------------------------------------------------------------


@dataclass
class Staging:
    """One package's file tree being assembled, and the modes that are not 644/755."""

    root: Path
    modes: dict[str, int] = field(default_factory=dict)

    def copy_files(self, package: str) -> None:
        """Copy tests/offline_files/<package>/ into the tree."""
        src = FILES / package
        if src.is_dir():
            shutil.copytree(src, self.root, symlinks=True, dirs_exist_ok=True)

    def dirs(self, *paths: str, mode: int = 0o755) -> None:
        for p in paths:
            (self.root / p).mkdir(parents=True, exist_ok=True)
            if mode != 0o755:
                self.modes[p] = mode

    def symlink(self, path: str, target: str) -> None:
        link = self.root / path
        link.parent.mkdir(parents=True, exist_ok=True)
        remove_path(link)
        link.symlink_to(target)

    def write(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        dest = self.root / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data.encode() if isinstance(data, str) else data)
        self.modes[path] = mode

    def mode(self, path: str, mode: int) -> None:
        self.modes[path] = mode

    def normalize(self) -> None:
        """Modes 755/644 (or as set), every mtime BUILD_DATE: the same package every time."""
        for rel in package_paths(self.root):
            path = self.root / rel
            st = path.lstat()
            if not stat.S_ISLNK(st.st_mode):
                if rel in self.modes:
                    mode = self.modes[rel]
                elif stat.S_ISDIR(st.st_mode) or st.st_mode & 0o111:
                    mode = 0o755
                else:
                    mode = 0o644
                path.chmod(mode)
            os.utime(path, (BUILD_DATE, BUILD_DATE), follow_symlinks=False)
        os.utime(self.root, (BUILD_DATE, BUILD_DATE))


def _stage_filesystem(s: Staging) -> Package:
    s.copy_files("filesystem")
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
    s.copy_files("glibc")
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
    s.copy_files("base")
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
    s.copy_files("mkinitcpio")
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
    s.copy_files("systemd")
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
    s.copy_files("openssh")
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
    s.copy_files("sudo")
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
    s.copy_files("cloud-init")
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
    s.copy_files("walinuxagent")
    return Package(
        "walinuxagent",
        STANDIN_VERSION,
        "waagent.conf and unit of the Azure Linux Agent (archkernel test stand-in)",
        depends=("filesystem", "openssh"),
        backup=("etc/waagent.conf",),
        license="Apache",
    )


def _stage_busybox(s: Staging, deb: Path, work: Path) -> Package:
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


# --- the kernel ---------------------------------------------------------------------------------


def kernel_banner(vmlinuz: Path) -> str:
    """The version string in an x86 bzImage's setup header ("6.1.0-56-amd64 (...) #1 ...")."""
    with open(vmlinuz, "rb") as f:
        head = f.read(0x8000)
    if head[0x202:0x206] != b"HdrS":
        raise UserError(f"{vmlinuz} is not an x86 bzImage", "check the Debian kernel package")
    (offset,) = struct.unpack_from("<H", head, 0x20E)
    start = offset + 0x200
    return head[start : head.index(b"\0", start)].decode("ascii", "replace")


def linux_pkgver(banner: str, release: str) -> str:
    """pkgver of the linux package: Debian's package version from the banner, else `release`."""
    m = re.search(r"\bDebian (\S+)", banner)
    return sanitize_pkgver(m.group(1) if m else release)


def _stage_linux(s: Staging, tree: Path) -> tuple[Package, str]:
    """Stage Debian's kernel from the unpacked tree `tree`; return the package and release."""
    moddirs = [
        p
        for base in (tree / "lib/modules", tree / "usr/lib/modules")
        if base.is_dir()
        for p in base.iterdir()
        if p.is_dir()
    ]
    if len(moddirs) != 1:
        raise UserError(f"expected one kernel module directory in {tree}, found {moddirs}")
    release = moddirs[0].name
    vmlinuz = tree / "boot" / f"vmlinuz-{release}"
    dest = s.root / "usr/lib/modules" / release

    def ignore(directory: str, names: list[str]) -> list[str]:
        rel = os.path.relpath(directory, moddirs[0])
        skipped = [n for n in names if os.path.normpath(f"{rel}/{n}") in PRUNED_MODULE_DIRS]
        # depmod's output of the full tree is stale once directories are pruned.
        if rel == ".":
            skipped += [n for n in names if n.startswith("modules.") and n not in DEPMOD_INPUTS]
        return skipped

    shutil.copytree(moddirs[0], dest, symlinks=True, ignore=ignore)
    for name in ("build", "source"):
        remove_path(dest / name)
    shutil.copy2(vmlinuz, dest / "vmlinuz")
    s.dirs("boot")
    shutil.copy2(vmlinuz, s.root / "boot/vmlinuz-linux")
    s.write(f"usr/lib/modules/{release}/pkgbase", "linux\n")
    # depmod -b ROOT reads ROOT/lib/modules: point it at usr/lib for the run only.
    (s.root / "lib").symlink_to("usr/lib")
    try:
        run(["depmod", "-b", s.root, release])
    finally:
        (s.root / "lib").unlink()
    s.copy_files("linux")
    version = f"{linux_pkgver(kernel_banner(vmlinuz), release)}-1"
    pkg = Package(
        "linux",
        version,
        f"Debian's {release} kernel and modules in Arch's layout (archkernel tests)",
        depends=("filesystem", "initramfs"),
        backup=("etc/mkinitcpio.d/linux.preset",),
        license="GPL2",
    )
    return pkg, release


# --- writing packages and the repository --------------------------------------------------------


def write_package(pkg: Package, staging: Staging, out_dir: Path, work: Path) -> Path:
    """Archive the staged tree as `out_dir/<name>-<ver>-x86_64.pkg.tar.zst`, owned by root."""
    staging.normalize()
    root = staging.root
    paths = package_paths(root)
    write_text(root / ".PKGINFO", pkginfo(pkg, installed_size(root, paths)))
    os.utime(root / ".PKGINFO", (BUILD_DATE, BUILD_DATE))
    mtree_text = mtree(root, [".PKGINFO", *paths])
    (root / ".MTREE").write_bytes(gzip.compress(mtree_text.encode(), mtime=0))
    os.utime(root / ".MTREE", (BUILD_DATE, BUILD_DATE))
    listing = work / f"{pkg.name}.files"
    listing.write_bytes(b"".join(f"{p}\0".encode() for p in [".PKGINFO", ".MTREE", *paths]))
    out = out_dir / pkg.filename
    with atomic_path(out) as tmp:
        run(
            [
                "bsdtar",
                "--uid",
                "0",
                "--gid",
                "0",
                "--uname",
                "root",
                "--gname",
                "root",
                "--no-fflags",
                "--zstd",
                "--options",
                "zstd:compression-level=3",
                "-cnf",
                tmp,
                "-C",
                root,
                "--null",
                "--files-from",
                listing,
            ]
        )
    return out


@dataclass(frozen=True)
class OfflineRepo:
    """What `build()` made; paths are absolute."""

    dir: Path
    repo: Path
    pacman_conf: Path
    settings: Path
    packages: dict[str, str]  # name -> pkgver-pkgrel
    kernel_release: str

    @property
    def package_files(self) -> list[Path]:
        return [self.repo / f"{n}-{v}-{ARCH}.pkg.tar.zst" for n, v in self.packages.items()]


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
)


def _kernel_tree(cache: Path) -> Path:
    """Debian's unpacked kernel, through tests.support.kernel (shared with other tests)."""
    # Imported here: tests.support.kernel reports a missing tool by skipping the calling
    # test, so it needs pytest, which `python -m tests.offline` does not.
    import pytest

    from tests.support.kernel import debian_kernel_tree

    try:
        return debian_kernel_tree(cache)
    except pytest.skip.Exception as exc:
        raise UserError(f"cannot get Debian's kernel: {exc}") from None


def _tree_identity(tree: Path) -> str:
    """What names the kernel in `tree`: the package in its stamp (tests.support.kernel), else
    the path."""
    stamp = tree / ".archkernel-complete"
    return stamp.read_text().strip() if stamp.is_file() else str(tree)


def _source_digest(*extra: str) -> str:
    """Digest of this module, tests/offline_files and `extra`: what the packages are made of."""
    h = hashlib.sha256(Path(__file__).read_bytes())
    for path in sorted(FILES.rglob("*")):
        rel = path.relative_to(FILES).as_posix()
        h.update(f"\0{rel}\0".encode())
        if path.is_symlink():
            h.update(os.readlink(path).encode())
        elif path.is_file():
            h.update(b"x" if os.access(path, os.X_OK) else b"-")
            h.update(path.read_bytes())
    for item in extra:
        h.update(f"\0{item}".encode())
    return h.hexdigest()


def _linux_package(cache: Path, tree: Path, work: Path) -> tuple[Path, Package, str]:
    """The linux package, built once per kernel and recipe and kept in the cache."""
    key = _source_digest("linux", _tree_identity(tree))[:16]
    store = cache / "offline-packages"
    slot = store / key
    with locked(store / ".lock"):
        meta = slot / "package.json"
        if meta.is_file():
            data = json.loads(meta.read_text())
            pkg = _package_from_json(data["package"])
            return slot / pkg.filename, pkg, str(data["release"])
        with complete_step("Building the linux package from Debian's kernel"):
            staging = Staging(work / "linux")
            staging.root.mkdir()
            pkg, release = _stage_linux(staging, tree)
            with atomic_path(slot) as tmp:
                tmp.mkdir()
                write_package(pkg, staging, tmp, work)
                data = {"package": dataclasses.asdict(pkg), "release": release}
                write_text(tmp / "package.json", json.dumps(data, indent=1) + "\n")
            remove_path(staging.root)
        for old in store.iterdir():
            if old.is_dir() and old.name != key:
                remove_path(old)
    return slot / pkg.filename, pkg, release


def _package_from_json(data: dict[str, Any]) -> Package:
    return Package(
        name=str(data["name"]),
        version=str(data["version"]),
        description=str(data["description"]),
        depends=tuple(data["depends"]),
        provides=tuple(data["provides"]),
        backup=tuple(data["backup"]),
        license=str(data["license"]),
    )


def _link_or_copy(src: Path, dest: Path) -> None:
    remove_path(dest)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def build(
    dest: str | os.PathLike[str], force: bool = False, cache: Path | None = None
) -> OfflineRepo:
    """Create (or refresh) the offline repository and its pacman.conf/settings.toml in `dest`."""
    check_tools(TOOLS, "building the offline test repository")
    dest = Path(dest).resolve()
    cache = cache_dir() if cache is None else Path(cache)
    tree = _kernel_tree(cache)
    busybox_deb = apt_download(BUSYBOX_DEB, cache)
    inputs = _source_digest(str(dest), busybox_deb.name, _tree_identity(tree))
    manifest_path = dest / "offline.json"
    if not force and manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        repo = _from_manifest(dest, manifest)
        if manifest.get("inputs") == inputs and all(p.is_file() for p in repo.package_files):
            log.info("offline repository in %s is up to date", dest)
            return repo

    with complete_step(f"Building the offline repository in {dest}"):
        dest.mkdir(parents=True, exist_ok=True)
        remove_path(manifest_path)  # from here on, the directory is not known to be whole
        with temporary_directory(prefix=".offline-", parent=str(dest)) as work:
            repo_tmp = work / "repo"
            repo_tmp.mkdir()
            packages: dict[str, str] = {}
            linux_file, linux_pkg, release = _linux_package(cache, tree, work)
            _link_or_copy(linux_file, repo_tmp / linux_file.name)
            packages[linux_pkg.name] = linux_pkg.version
            for fn in STANDINS:
                staging = Staging(work / fn.__name__)
                staging.root.mkdir()
                pkg = fn(staging)
                write_package(pkg, staging, repo_tmp, work)
                packages[pkg.name] = pkg.version
            staging = Staging(work / "busybox")
            staging.root.mkdir()
            pkg = _stage_busybox(staging, busybox_deb, work)
            write_package(pkg, staging, repo_tmp, work)
            packages[pkg.name] = pkg.version
            files = sorted(p.name for p in repo_tmp.glob("*.pkg.tar.zst"))
            run(["repo-add", "--quiet", f"{REPO_NAME}.db.tar.gz", *files], cwd=repo_tmp)
            with atomic_path(dest / "repo") as tmp:
                os.rename(repo_tmp, tmp)
        # Rebuilt packages keep their names: pacman would take stale copies for corrupt ones.
        remove_path(dest / "pkgcache")
        (dest / "pkgcache").mkdir()
        write_text(dest / "pacman.conf", pacman_conf(dest / "repo", dest / "pkgcache"))
        write_text(dest / "settings.toml", settings_toml(SETTINGS_PACKAGES))
        manifest = {"inputs": inputs, "kernel_release": release, "packages": packages}
        write_text(manifest_path, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return _from_manifest(dest, manifest)


def _from_manifest(dest: Path, manifest: dict[str, object]) -> OfflineRepo:
    packages = manifest.get("packages")
    release = manifest.get("kernel_release")
    return OfflineRepo(
        dir=dest,
        repo=dest / "repo",
        pacman_conf=dest / "pacman.conf",
        settings=dest / "settings.toml",
        packages=dict(packages) if isinstance(packages, dict) else {},
        kernel_release=str(release),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.offline",
        description="Build archkernel's offline pacman repository, pacman.conf and settings.toml.",
    )
    parser.add_argument("dir", type=Path, help="output directory (created)")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="show every command")
    args = parser.parse_args(argv)
    logging_setup.setup(args.verbose)
    try:
        repo = build(args.dir, force=args.force)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    for name, version in sorted(repo.packages.items()):
        size = (repo.repo / f"{name}-{version}-{ARCH}.pkg.tar.zst").stat().st_size
        shown = f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"
        print(f"{name:14} {version:24} {shown:>10}")
    print(f"pacman.conf:   {repo.pacman_conf}")
    print(f"settings.toml: {repo.settings}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
