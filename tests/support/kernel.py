"""A real Debian kernel (image and modules) for tests, downloaded once and cached.

`debian_kernel_tree()` returns a root holding `boot/vmlinuz-<version>` and
`lib/modules/<version>/` with the index `depmod` writes, so `modprobe -d ROOT -S VERSION`
and `ModulesDep.load` both work on it. The tree lives under `$ARCHKERNEL_TEST_CACHE`
(default `~/.cache/archkernel-tests`) and is reused by every later run; delete that
directory to fetch a newer kernel. Tests must treat the tree as read-only: copy what they
change.

Needs a Debian/Ubuntu host (apt-get, apt-cache, dpkg-deb, depmod; `apt-get update` runs
when the package lists are missing, which needs root). Elsewhere the calling test is
skipped.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from archkernel.errors import UserError
from archkernel.host.files import remove_path, temporary_directory
from archkernel.host.run import missing_tools, run
from tests.support.apt import apt, apt_download
from tests.support.cache import cache_dir as default_cache_dir
from tests.support.cache import locked

META_PACKAGE = "linux-image-amd64"
STAMP = ".archkernel-complete"  # in a finished tree: the package it was unpacked from


def module_dir(root: Path) -> Path:
    """The single `lib/modules/<version>` (or `usr/lib/modules/<version>`) under `root`."""
    for base in (root / "lib" / "modules", root / "usr" / "lib" / "modules"):
        if base.is_dir():
            versions = sorted(p for p in base.iterdir() if p.is_dir())
            if len(versions) == 1:
                return versions[0]
            raise RuntimeError(f"expected one kernel under {base}, found {versions}")
    raise RuntimeError(f"no lib/modules directory under {root}")


def kernel_version(root: Path) -> str:
    """The kernel version of the tree at `root` (`6.1.0-56-amd64`)."""
    return module_dir(root).name


def kernel_image(root: Path) -> Path:
    """The kernel image `boot/vmlinuz-<version>` of the tree at `root`."""
    return root / "boot" / f"vmlinuz-{kernel_version(root)}"


def debian_kernel_tree(cache_dir: Path | None = None, meta_package: str = META_PACKAGE) -> Path:
    """An unpacked, depmod-indexed Debian kernel package; downloaded on first use.

    `meta_package` is the flavour's meta package (`linux-image-amd64`, or the smaller
    `linux-image-cloud-amd64`); the versioned package it depends on is what is fetched.
    Safe to call from concurrent test processes: they wait for each other on a lock.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = cache / f"debian-{meta_package}"
    if (root / STAMP).is_file():
        return root
    missing = missing_tools(["apt-get", "apt-cache", "dpkg-deb", "depmod"])
    if missing:
        pytest.skip(f"a Debian kernel for tests needs {', '.join(missing)}")
    with locked(cache / ".debian-kernel.lock"):
        if (root / STAMP).is_file():  # another process finished while we waited
            return root
        package = _versioned_package(meta_package)
        with temporary_directory(prefix=".download-", parent=str(cache)) as work:
            deb = apt_download(package, work)  # not kept: the unpacked tree is
            tree = work / "root"
            run(["dpkg-deb", "-x", deb, tree])
            deb.unlink()
            _index(tree)
            (tree / STAMP).write_text(f"{package}\n")
            remove_path(root)  # a half-built tree from an interrupted run
            os.rename(tree, root)
    return root


def _versioned_package(meta_package: str) -> str:
    """The linux-image-<version>-<flavour> package `meta_package` depends on."""
    try:
        result = apt(["apt-cache", "depends", meta_package], capture=True)
    except UserError as exc:
        if os.geteuid() != 0:  # no package lists, and we may not fetch them
            pytest.skip(f"apt-cache knows no {meta_package}: {exc.hint}")
        raise
    for line in result.stdout.splitlines():
        kind, _, target = line.strip().partition(":")
        target = target.strip().strip("<>")
        if kind == "Depends" and target.startswith("linux-image-"):
            return target
    raise RuntimeError(f"apt-cache depends {meta_package} names no linux-image package")


def _index(tree: Path) -> None:
    """Run depmod on the unpacked tree, making lib/ reachable for a usr-merged package."""
    if not (tree / "lib").exists() and (tree / "usr" / "lib" / "modules").is_dir():
        # depmod -b looks in ROOT/lib/modules; a merged-/usr system has lib -> usr/lib.
        (tree / "lib").symlink_to("usr/lib")
    run(["depmod", "-b", tree, kernel_version(tree)])


def copy_modules(src_moddir: Path, dest_moddir: Path, relpaths: list[str]) -> None:
    """Copy some modules and the depmod inputs (modules.order, .builtin*) to a new tree."""
    for rel in relpaths:
        (dest_moddir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src_moddir / rel, dest_moddir / rel)
    for name in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        if (src_moddir / name).is_file():
            shutil.copy2(src_moddir / name, dest_moddir / name)
