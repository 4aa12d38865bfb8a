"""The functional profile of the offline repository: Debian's real services, Arch's names.

The default repository (`archkernel.demo.offline`) has stand-ins for everything but the
kernel and busybox: enough to build and boot, not to run services. This profile replaces
them with Debian 12's real systemd, udev, networkd, resolved, OpenSSH, sudo, Python,
cloud-init and waagent (and the libraries and tools they need), repacked as pacman
packages under Arch's names and in Arch's merged-/usr layout, so that the unchanged
azure_vhd steps build an image whose services really run, and the provisioning boot test
can prove the provisioning.

What is repacked, and how:
- the package set is what APT resolves for `ROOTS` from an empty system (`closure`),
  downloaded once into the cache (`$ARCHKERNEL_TEST_CACHE/debian-functional-debs`);
- each Debian package goes into the Arch package `GROUPS` names for it, everything else
  into `debian-runtime`; `SKIPPED` ones (they would own Arch's root layout) into none;
- paths move to Arch's layout (`arch_path`: `/bin`, `/sbin`, `/usr/sbin` -> `/usr/bin`,
  `/lib`, `/lib64`, `/usr/lib64` -> `/usr/lib`), symbolic links re-aimed to match;
- what Debian's maintainer scripts would have made is made here (`_fix_*`): the PAM
  `common-*` files, `/etc/ssh/sshd_config`, the `sshd` and `_chrony` users (sysusers.d),
  Arch's unit names (`sshd.service` with host keys made at first boot, `chronyd.service`,
  `waagent.service`), Arch's cloud.cfg (distro arch); modes Debian sets (setuid sudo)
  are kept.

What it cannot prove about Arch's own packages is in the README (functional profile).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path

from archkernel.demo import offline
from archkernel.demo.debian import apt, apt_download, cache_dir, debian_kernel_tree, locked
from archkernel.demo.linux import linux_package
from archkernel.demo.package import Package, Staging, package_paths, write_package
from archkernel.demo.standins import BUSYBOX_DEB, FILES, STANDINS, stage_busybox
from archkernel.errors import UserError
from archkernel.host.files import remove_path, temporary_directory, write_text
from archkernel.host.run import check_tools, run
from archkernel.log import complete_step

FUNCTIONAL_VERSION = "12-2"  # Debian 12, repack 2 (units rendered as Arch renders them)
ROOTS = (
    "systemd", "systemd-sysv", "systemd-resolved", "udev", "dbus", "openssh-server", "sudo",
    "cloud-init", "waagent", "python3", "isc-dhcp-client", "iproute2", "bash", "coreutils",
    "dash", "diffutils", "findutils", "grep", "gzip", "sed", "tar", "util-linux", "mount",
    "passwd", "login", "hostname", "procps", "kmod", "libc-bin", "debianutils", "mawk",
    "ca-certificates", "zstd", "chrony", "tzdata",
)  # fmt: skip
# Arch package -> the Debian packages it is made of.
GROUPS: dict[str, tuple[str, ...]] = {
    "systemd": (
        "systemd", "systemd-sysv", "systemd-resolved", "udev", "libsystemd-shared",
        "libsystemd0", "libudev1",
    ),
    "openssh": ("openssh-server", "openssh-client", "openssh-sftp-server"),
    "sudo": ("sudo",),
    "chrony": ("chrony",),
    "tzdata": ("tzdata",),
    "cloud-init": ("cloud-init",),
    "walinuxagent": ("waagent",),
    "python": (
        "python3", "python3-minimal", "python3.11", "python3.11-minimal",
        "libpython3.11-minimal", "libpython3.11-stdlib", "libpython3-stdlib",
    ),
    "glibc": ("libc6", "libc-bin", "locales", "libc-l10n"),
}  # fmt: skip
RUNTIME = "debian-runtime"
# They own Arch's root layout (base-files, usrmerge) or only run at install time (dpkg).
SKIPPED = frozenset({"base-files", "usrmerge"})
DROPPED_DIRS = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/lintian")
MERGES = (
    ("bin/", "usr/bin/"), ("sbin/", "usr/bin/"), ("usr/sbin/", "usr/bin/"),
    ("lib64/", "usr/lib/"), ("usr/lib64/", "usr/lib/"), ("lib/", "usr/lib/"),
    ("var/run/", "run/"), ("var/lock/", "run/lock/"),
)  # fmt: skip


def arch_path(rel: str) -> str:
    """Where the Debian path `rel` (relative, no leading /) goes in Arch's layout."""
    for old, new in MERGES:
        if rel == old.rstrip("/") or rel.startswith(old):
            return new.rstrip("/") if rel == old.rstrip("/") else new + rel[len(old) :]
    return rel


def arch_link_target(link: str, target: str) -> str:
    """A symbolic link's target, re-aimed for its move to `arch_path(link)`."""
    if target.startswith("/"):
        return target  # absolute: Arch's /bin, /sbin, /lib links still resolve it
    resolved = os.path.normpath(os.path.join(os.path.dirname(link), target))
    new_link, new_target = arch_path(link), arch_path(resolved)
    return os.path.relpath(new_target, os.path.dirname(new_link) or ".")


def deb_name(deb: Path) -> str:
    return deb.name.split("_", 1)[0]


# --- the Debian packages -------------------------------------------------------------------


def closure(cache: Path | None = None) -> list[Path]:
    """The .debs of `ROOTS` and everything they depend on (no recommends), as APT resolves
    them for a system with nothing installed; downloaded once into the cache."""
    cache = Path(cache) if cache is not None else cache_dir()
    debs_dir = cache / "debian-functional-debs"
    stamp = debs_dir / ".complete"
    with locked(cache / ".debian-functional.lock"):
        if not stamp.is_file() or stamp.read_text() != " ".join(ROOTS):
            remove_path(debs_dir)
            (debs_dir / "partial").mkdir(parents=True)
            status = debs_dir / "empty-status"
            status.write_text("")
            apt(
                [
                    "apt-get",
                    "-q",
                    "-y",
                    "--no-install-recommends",
                    "--download-only",
                    "-o",
                    f"Dir::State::status={status}",
                    "-o",
                    f"Dir::Cache::archives={debs_dir}",
                    "-o",
                    "Debug::NoLocking=1",
                    "install",
                    *ROOTS,
                ],
                timeout=3600,
            )
            stamp.write_text(" ".join(ROOTS))
    return sorted(debs_dir.glob("*.deb"))


# --- repacking -------------------------------------------------------------------------------


def _copy_entry(src: Path, dest: Path, rel: str, staging: Staging) -> None:
    st = src.lstat()
    if stat.S_ISDIR(st.st_mode):
        if dest.is_symlink():
            return  # Arch's layout has a link there
        dest.mkdir(parents=True, exist_ok=True)
        if stat.S_IMODE(st.st_mode) != 0o755:
            staging.modes[arch_path(rel)] = stat.S_IMODE(st.st_mode)
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    if stat.S_ISLNK(st.st_mode):
        if dest.exists() and not dest.is_symlink():
            return  # a compatibility link onto a file that moved here: keep the file
        remove_path(dest)
        dest.symlink_to(arch_link_target(rel, os.readlink(src)))
        return
    remove_path(dest)
    shutil.copy2(src, dest, follow_symlinks=False)
    mode = stat.S_IMODE(st.st_mode)
    if mode not in (0o644, 0o755):
        staging.modes[arch_path(rel)] = mode


def merge_deb(unpacked: Path, staging: Staging) -> None:
    """Copy an unpacked Debian package into `staging` in Arch's layout."""
    for dirpath, dirnames, filenames in os.walk(unpacked):
        rel_dir = os.path.relpath(dirpath, unpacked)
        rel_dir = "" if rel_dir == "." else rel_dir
        dirnames[:] = [d for d in dirnames if f"{rel_dir}/{d}".lstrip("/") not in DROPPED_DIRS]
        for name in sorted(dirnames) + sorted(filenames):
            rel = f"{rel_dir}/{name}".lstrip("/")
            merged_root = rel in (m[0].rstrip("/") for m in MERGES)
            if merged_root and (unpacked / rel).is_symlink():
                continue  # a usrmerge link of Debian's: Arch's filesystem has its own
            _copy_entry(unpacked / rel, staging.root / arch_path(rel), rel, staging)


def group_of(debian: str) -> str | None:
    """The Arch package a Debian package goes into (None: skipped)."""
    if debian in SKIPPED:
        return None
    for arch, members in GROUPS.items():
        if debian in members:
            return arch
    return RUNTIME


SSHD_SERVICE = """\
# sshd.service of archkernel's functional profile: Arch's unit name for Debian's sshd,
# with the host keys made on the first boot (the image ships none), as Arch's
# sshdgenkeys.service does.
[Unit]
Description=OpenSSH Daemon
After=network.target

[Service]
ExecStartPre=/usr/bin/ssh-keygen -A
ExecStartPre=/usr/bin/sshd -t
ExecStart=/usr/bin/sshd -D
ExecReload=/bin/kill -HUP $MAINPID
KillMode=process
Restart=always
RuntimeDirectory=sshd
RuntimeDirectoryMode=0755

[Install]
WantedBy=multi-user.target
"""
WAAGENT_SERVICE = """\
# waagent.service of archkernel's functional profile: the unit WALinuxAgent installs on
# Arch Linux, for Debian's agent.
[Unit]
Description=Azure Linux Agent
Wants=network-online.target sshd.service
After=network-online.target
ConditionFileIsExecutable=/usr/bin/waagent
ConditionPathExists=/etc/waagent.conf

[Service]
Type=simple
ExecStart=/usr/bin/python3 -u /usr/bin/waagent -daemon
Restart=always
RestartSec=5

[Install]
WantedBy=multi-user.target
"""
SSHD_SYSUSERS = 'u sshd - "sshd privilege separation" /run/sshd\n'
# What Debian's pam-auth-update writes for pam_unix alone.
PAM_COMMON = {
    "common-auth": "auth [success=1 default=ignore] pam_unix.so nullok\n"
    "auth requisite pam_deny.so\nauth required pam_permit.so\n",
    "common-account": "account [success=1 new_authtok_reqd=done default=ignore] pam_unix.so\n"
    "account requisite pam_deny.so\naccount required pam_permit.so\n",
    "common-password": "password [success=1 default=ignore] pam_unix.so obscure yescrypt\n"
    "password requisite pam_deny.so\npassword required pam_permit.so\n",
    "common-session": "session [default=1] pam_permit.so\nsession requisite pam_deny.so\n"
    "session required pam_permit.so\nsession required pam_unix.so\n",
    "common-session-noninteractive": "session [default=1] pam_permit.so\n"
    "session requisite pam_deny.so\nsession required pam_permit.so\n"
    "session required pam_unix.so\n",
}
UNITS = "usr/lib/systemd/system"
# The lines of Debian's cloud-init units that Arch's rendering of the same templates lacks.
ARCH_CLOUD_INIT_UNITS = {
    "cloud-init-local.service": ("DefaultDependencies=no", "Before=sysinit.target"),
    "cloud-init.service": ("Before=sysinit.target", "After=networking.service"),
}


def without_lines(text: str, lines: Iterable[str], what: str) -> str:
    """`text` without the whole lines `lines`; each must be there (a new Debian release
    that moved them must not go unnoticed)."""
    have = text.splitlines()
    missing = [line for line in lines if line not in have]
    if missing:
        raise UserError(
            f"{what}: Debian's unit no longer has {', '.join(missing)}",
            "update archkernel.demo.functional.ARCH_CLOUD_INIT_UNITS for this release",
        )
    drop = set(lines)
    return "".join(line + "\n" for line in have if line not in drop)


def fix_package(name: str, s: Staging) -> None:
    """What Debian's maintainer scripts would do, and Arch's names, for package `name`."""
    root = s.root
    if name == "openssh":
        for unit in ("ssh.service", "ssh@.service", "ssh.socket", "rescue-ssh.target"):
            remove_path(root / UNITS / unit)
        s.write(f"{UNITS}/sshd.service", SSHD_SERVICE)
        s.write("usr/lib/sysusers.d/openssh.conf", SSHD_SYSUSERS)
        # Debian's postinst copies it there; Arch's package ships it.
        shutil.copy2(root / "usr/share/openssh/sshd_config", root / "etc/ssh/sshd_config")
    elif name == "chrony":
        unit = (root / UNITS / "chrony.service").read_text()
        (root / UNITS / "chrony.service").unlink()
        s.write(f"{UNITS}/chronyd.service", unit.replace("Alias=chronyd.service\n", ""))
        s.write("usr/lib/sysusers.d/chrony.conf", 'u _chrony - "chrony daemon" /var/lib/chrony\n')
    elif name == "walinuxagent":
        # Debian's unit runs only under Hyper-V (ConditionVirtualization=microsoft);
        # Arch's is WALinuxAgent's own, which does not ask.
        (root / UNITS / "walinuxagent.service").unlink()
        s.write(f"{UNITS}/waagent.service", WAAGENT_SERVICE)
    elif name == "cloud-init":
        # Arch's cloud.cfg (distro arch); Debian's debconf datasource list would win over
        # the build's drop-in.
        shutil.copy2(FILES / "cloud-init/etc/cloud/cloud.cfg", root / "etc/cloud/cloud.cfg")
        remove_path(root / "etc/cloud/cloud.cfg.d/90_dpkg.cfg")
        # cloud-init renders its units per distribution: Debian's run before sysinit.target,
        # Arch's do not (upstream's templates give those lines to Debian and Ubuntu only).
        for unit, lines in ARCH_CLOUD_INIT_UNITS.items():
            path = root / UNITS / unit
            path.write_text(without_lines(path.read_text(), lines, unit))
    elif name == "glibc":
        shutil.copy2(FILES / "glibc/etc/locale.gen", root / "etc/locale.gen")
    elif name == RUNTIME:
        for file, text in PAM_COMMON.items():
            s.write(f"etc/pam.d/{file}", text)


def package_of(name: str, debs: Iterable[str]) -> Package:
    """The .PKGINFO of the Arch package `name` made of the Debian packages `debs`."""
    depends: tuple[str, ...] = ("filesystem",) if name == RUNTIME else ("filesystem", RUNTIME)
    backup = {"openssh": ("etc/ssh/sshd_config",), "sudo": ("etc/sudoers",),
              "walinuxagent": ("etc/waagent.conf",), "glibc": ("etc/locale.gen",),
              "cloud-init": ("etc/cloud/cloud.cfg",)}.get(name, ())  # fmt: skip
    provides = ("sh",) if name == RUNTIME else ()
    return Package(
        name,
        FUNCTIONAL_VERSION,
        f"Debian 12's {', '.join(sorted(debs))} (archkernel functional profile)",
        depends=depends,
        provides=provides,
        backup=backup,
    )


def stage_functional(
    debs: list[Path], work: Path, reserved: Iterable[str] = ()
) -> dict[str, Staging]:
    """One staging tree per Arch package, filled from `debs` in Arch's layout and fixed;
    `reserved` paths (the stand-ins') are left out."""
    stagings: dict[str, Staging] = {}
    members: dict[str, list[str]] = {}
    claimed: dict[str, str] = dict.fromkeys(reserved, "stand-in")
    for deb in debs:
        arch = group_of(deb_name(deb))
        if arch is None:
            continue
        if arch not in stagings:
            stagings[arch] = Staging(work / f"functional-{arch}")
            stagings[arch].root.mkdir(parents=True)
        members.setdefault(arch, []).append(deb_name(deb))
        with temporary_directory(prefix="deb-", parent=str(work)) as unpacked:
            run(["dpkg-deb", "-x", deb, unpacked])
            merge_deb(unpacked, stagings[arch])
    for arch, s in stagings.items():
        fix_package(arch, s)
        _drop_claimed(s, arch, claimed)
    return stagings


def _drop_claimed(s: Staging, arch: str, claimed: dict[str, str]) -> None:
    """Remove from `s` the non-directories another package already has (pacman refuses
    two owners); record the rest as `arch`'s."""
    for dirpath, _dirs, files in os.walk(s.root):
        for name in files + [d for d in _dirs if os.path.islink(os.path.join(dirpath, d))]:
            rel = os.path.relpath(os.path.join(dirpath, name), s.root)
            if rel in claimed and claimed[rel] != arch:
                os.unlink(os.path.join(dirpath, name))
            else:
                claimed[rel] = arch


# --- the repository ------------------------------------------------------------------------

# The stand-ins the functional profile keeps: Arch's layout, time zone, initramfs builder.
KEPT_STANDINS = ("filesystem", "mkinitcpio")
DISK_SIZE = "2GiB"


def _base(s: Staging, names: Iterable[str]) -> Package:
    """`base` of the functional profile: everything, and no test init (systemd's is
    /usr/bin/init)."""
    s.dirs("usr/share/archkernel-functional")
    return Package(
        "base",
        FUNCTIONAL_VERSION,
        "Minimal package set of archkernel's functional profile (Debian's services)",
        depends=("filesystem", "glibc", "tzdata", "busybox", *sorted(names)),
    )


def _trim_busybox(s: Staging, provided: set[str]) -> None:
    """Remove busybox's applet links that a Debian package provides for real."""
    for link in (s.root / "usr/bin").iterdir():
        if link.is_symlink() and link.name in provided:
            link.unlink()


def _non_directories(root: Path) -> list[str]:
    return [p for p in package_paths(root) if (root / p).is_symlink() or not (root / p).is_dir()]


def settings_text() -> str:
    """settings.toml of a functional build: the offline one, a bigger disk, provisioning
    boot test."""
    text = offline.settings_toml(offline.SETTINGS_PACKAGES)
    text = text.replace(f'disk_size = "{offline.DISK_SIZE}"', f'disk_size = "{DISK_SIZE}"')
    return text + 'boottest_mode = "provision"\nboottest_timeout = 1200.0\n'


def build(dest: Path, cache: Path | None = None) -> offline.OfflineRepo:
    """The functional repository, pacman.conf and settings.toml in `dest` (built again
    each time; the downloads and the linux package are cached)."""
    check_tools(offline.TOOLS, "building the functional repository")
    dest = Path(dest).resolve()
    cache = cache_dir() if cache is None else Path(cache)
    tree = debian_kernel_tree(cache)
    debs = closure(cache)
    busybox_deb = apt_download(BUSYBOX_DEB, cache)
    with complete_step(f"Building the functional repository in {dest}"):
        dest.mkdir(parents=True, exist_ok=True)
        packages: dict[str, str] = {}
        with temporary_directory(prefix=".functional-", parent=str(dest)) as work:
            repo = work / "repo"
            repo.mkdir()
            linux_file, linux_pkg, release = linux_package(cache, tree, work)
            shutil.copy2(linux_file, repo / linux_file.name)
            packages[linux_pkg.name] = linux_pkg.version
            reserved: list[str] = []
            for fn in STANDINS:
                if fn.__name__.removeprefix("_stage_") not in KEPT_STANDINS:
                    continue
                staging = Staging(work / fn.__name__)
                staging.root.mkdir()
                pkg = fn(staging)
                write_package(pkg, staging, repo, work)
                packages[pkg.name] = pkg.version
                reserved += _non_directories(staging.root)
            stagings = stage_functional(debs, work, reserved)
            provided = set()
            for arch, staging in stagings.items():
                bindir = staging.root / "usr/bin"
                provided |= {p.name for p in bindir.iterdir()} if bindir.is_dir() else set()
                members = [deb_name(d) for d in debs if group_of(deb_name(d)) == arch]
                pkg = package_of(arch, members)
                write_package(pkg, staging, repo, work)
                packages[pkg.name] = pkg.version
            staging = Staging(work / "busybox")
            staging.root.mkdir()
            pkg = stage_busybox(staging, busybox_deb, work)
            _trim_busybox(staging, provided)
            write_package(pkg, staging, repo, work)
            packages[pkg.name] = pkg.version
            staging = Staging(work / "base")
            staging.root.mkdir()
            pkg = _base(staging, stagings)
            write_package(pkg, staging, repo, work)
            packages[pkg.name] = pkg.version
            files = sorted(p.name for p in repo.glob("*.pkg.tar.zst"))
            run(["repo-add", "--quiet", f"{offline.REPO_NAME}.db.tar.gz", *files], cwd=repo)
            remove_path(dest / "repo")
            os.rename(repo, dest / "repo")
        remove_path(dest / "pkgcache")
        (dest / "pkgcache").mkdir()
        write_text(dest / "pacman.conf", offline.pacman_conf(dest / "repo", dest / "pkgcache"))
        if not (dest / "settings.toml").is_file():
            write_text(dest / "settings.toml", settings_text())
        manifest = {"profile": "functional", "kernel_release": release, "packages": packages}
        write_text(dest / "offline.json", json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return offline.OfflineRepo(
        dir=dest,
        repo=dest / "repo",
        pacman_conf=dest / "pacman.conf",
        settings=dest / "settings.toml",
        packages=packages,
        kernel_release=release,
    )
