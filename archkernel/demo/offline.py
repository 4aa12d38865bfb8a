"""A small, real pacman repository for building Arch images without an Arch mirror.

    archkernel demo azure_vhd DIR             builds it in DIR, then the image from it
    python -m archkernel.demo.offline DIR [--force] [-v]    only the repository

writes under DIR:

    repo/             the `archkernel-test` repository: *.pkg.tar.zst and the repo-add db
    pacman.conf       Architecture x86_64, SigLevel Never, [archkernel-test] at file://DIR/repo
    settings.toml     the project's settings for an offline azure_vhd build (workdir "build")
    pkgcache/         pacman's CacheDir (what `pacstrap -c` downloads lands here, not on the host)
    offline.json      what was built from what; a rerun with the same inputs does nothing

The packages carry Arch's names and put files where Arch does, so the default
configuration reads naturally: `linux` is Debian's amd64 kernel and modules
(`archkernel.demo.linux`), `busybox` is Debian's busybox-static, everything else is a
stand-in (`archkernel.demo.standins`); `archkernel.demo.package` writes them.

Downloads and the built `linux` package (the slow part) are cached in $ARCHKERNEL_TEST_CACHE
(default ~/.cache/archkernel-tests, `archkernel.demo.debian`); --force rebuilds DIR but
reuses a cached `linux` package made from the same kernel and sources. A settings.toml
already in DIR is kept (edit it to try other settings); a missing one is written again.
Needs: bsdtar, repo-add (pacman), depmod (kmod), apt-get and dpkg-deb (Debian/Ubuntu).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from archkernel import log as logging_setup
from archkernel.demo.debian import apt_download, cache_dir, debian_kernel_tree, tree_identity
from archkernel.demo.linux import linux_package
from archkernel.demo.package import ARCH, Package, Staging, write_package
from archkernel.demo.standins import BUSYBOX_DEB, STANDINS, recipe_digest, stage_busybox
from archkernel.errors import UserError
from archkernel.host.files import atomic_path, remove_path, temporary_directory, write_text
from archkernel.host.run import check_tools, run
from archkernel.log import complete_step, log

# What a user of the repository needs, from here (the package format included).
__all__ = [
    "ARCH",
    "DISK_SIZE",
    "HOSTNAME",
    "REPO_NAME",
    "SETTINGS_PACKAGES",
    "TOOLS",
    "OfflineRepo",
    "Package",
    "Staging",
    "build",
    "main",
    "pacman_conf",
    "settings_toml",
    "write_package",
    "write_settings",
]

REPO_NAME = "archkernel-test"
# Package names in settings.toml; cloud-init (provisioning = "cloud-init", the default) and
# walinuxagent (provisioning = "waagent" or extensions = true) are added by the build itself.
SETTINGS_PACKAGES = ("base", "linux", "mkinitcpio", "systemd", "openssh", "sudo", "chrony")
# pacstrap of every package fills 235 MiB of ext4 (modules, mostly); 512 MiB leaves room
# for GRUB, more initramfs images and whatever a test adds, and keeps images quick to copy.
DISK_SIZE = "512MiB"
HOSTNAME = "archkernel-test"
TOOLS = ("bsdtar", "repo-add", "depmod", "dpkg-deb", "apt-get", "apt-cache")


def pacman_conf(repo_dir: Path, cache_dir: Path) -> str:
    """pacman.conf for the offline repository at `repo_dir` (absolute)."""
    return f"""\
# pacman.conf for archkernel's offline test repository (written by archkernel.demo.offline).
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
# (written by archkernel.demo.offline). Relative paths are relative to this file.
# Edit freely: `archkernel demo azure_vhd` keeps this file and resumes with it.
workdir = "build"

[azure]
# cloud-init comes with provisioning = "cloud-init" (the default), walinuxagent with
# provisioning = "waagent" or extensions = true: both are in the repository.
pacman_conf = "pacman.conf"
packages = [{names}]
disk_size = {_toml_string(DISK_SIZE)}
hostname = {_toml_string(HOSTNAME)}
"""


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
    check_tools(TOOLS, "building the offline repository")
    dest = Path(dest).resolve()
    cache = cache_dir() if cache is None else Path(cache)
    tree = debian_kernel_tree(cache)
    busybox_deb = apt_download(BUSYBOX_DEB, cache)
    inputs = recipe_digest(str(dest), busybox_deb.name, tree_identity(tree))
    manifest_path = dest / "offline.json"
    if not force and manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        repo = _from_manifest(dest, manifest)
        if manifest.get("inputs") == inputs and all(p.is_file() for p in repo.package_files):
            log.info("offline repository in %s is up to date", dest)
            _write_missing_configuration(repo)
            return repo

    with complete_step(f"Building the offline repository in {dest}"):
        dest.mkdir(parents=True, exist_ok=True)
        remove_path(manifest_path)  # from here on, the directory is not known to be whole
        with temporary_directory(prefix=".offline-", parent=str(dest)) as work:
            repo_tmp = work / "repo"
            repo_tmp.mkdir()
            packages: dict[str, str] = {}
            linux_file, linux_pkg, release = linux_package(cache, tree, work)
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
            pkg = stage_busybox(staging, busybox_deb, work)
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
        write_settings(dest)
        manifest = {"inputs": inputs, "kernel_release": release, "packages": packages}
        write_text(manifest_path, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return _from_manifest(dest, manifest)


def write_settings(dest: Path) -> Path:
    """`dest/settings.toml` for a build from the repository in `dest`: written when missing,
    kept when there (a user's edits stay)."""
    path = dest / "settings.toml"
    if not path.is_file():
        dest.mkdir(parents=True, exist_ok=True)
        write_text(path, settings_toml(SETTINGS_PACKAGES))
    return path


def _write_missing_configuration(repo: OfflineRepo) -> None:
    """pacman.conf and settings.toml of an up-to-date repository, where they are missing."""
    if not repo.pacman_conf.is_file():
        write_text(repo.pacman_conf, pacman_conf(repo.repo, repo.dir / "pkgcache"))
    write_settings(repo.dir)


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
        prog="python -m archkernel.demo.offline",
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
