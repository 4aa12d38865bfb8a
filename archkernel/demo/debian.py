"""Debian's packages for the demos: `apt-get download`, a download cache, Debian's kernel.

Downloads and what is slow to rebuild from them (Debian's kernel unpacked and indexed, the
offline repository's `linux` package) are kept in a cache, `$ARCHKERNEL_TEST_CACHE`,
default `~/.cache/archkernel-tests`: the tests share it with the demos, so neither fetches
the kernel twice. Delete it to start afresh. Processes may fill it at the same time:
whoever fills an entry holds its lock.

An APT command fails when the host has no package lists yet (a fresh container). Then, as
root, `apt-get update` runs once and the command is tried again; without root the failure
says what to do instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from archkernel.errors import UserError
from archkernel.host.files import remove_path, temporary_directory
from archkernel.host.run import check_tools, run

CACHE_ENV = "ARCHKERNEL_TEST_CACHE"
APT_HINT = "run `apt-get update` as root, or fill $ARCHKERNEL_TEST_CACHE"
KERNEL_META_PACKAGE = "linux-image-amd64"
KERNEL_TOOLS = ("apt-get", "apt-cache", "dpkg-deb", "depmod")
STAMP = ".archkernel-complete"  # in a finished kernel tree: the package it was unpacked from


# --- the cache ---------------------------------------------------------------------------------


def cache_dir() -> Path:
    """$ARCHKERNEL_TEST_CACHE, else ~/.cache/archkernel-tests."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "archkernel-tests"


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created) so one process at a time fills a cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- APT ----------------------------------------------------------------------------------------


def apt(
    argv: Sequence[str],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    capture: bool = False,
    timeout: float = 900,
) -> subprocess.CompletedProcess[str]:
    """Run an APT command; if it fails, `apt-get update` (as root) and run it once more."""
    result = run(argv, cwd=cwd, env=env, capture=capture, check=False, timeout=timeout)
    if result.returncode == 0:
        return result
    if os.geteuid() != 0:
        raise UserError(f"{' '.join(argv)} failed with exit code {result.returncode}", APT_HINT)
    run(["apt-get", "update", "-q"], env=env, timeout=900)
    return run(argv, cwd=cwd, env=env, capture=capture, timeout=timeout)


def apt_download(package: str, directory: Path) -> Path:
    """`package`'s .deb in `directory`: one already there, else what `apt-get download` gets.

    The download goes to a temporary directory first, so a killed download leaves no
    partial .deb that a later run would take for a whole one.
    """
    debs = sorted(directory.glob(f"{package}_*.deb"))
    if debs:
        return debs[-1]
    directory.mkdir(parents=True, exist_ok=True)
    with temporary_directory(prefix=".download-", parent=str(directory)) as work:
        apt(["apt-get", "download", package], cwd=work, timeout=1800)
        fetched = sorted(work.glob("*.deb"))
        if len(fetched) != 1:
            raise UserError(f"apt-get download {package} left {[p.name for p in fetched]}")
        dest = directory / fetched[0].name
        os.replace(fetched[0], dest)
    return dest


# --- Debian's kernel ----------------------------------------------------------------------------


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


def tree_identity(tree: Path) -> str:
    """What names the kernel in `tree`: the package in its stamp, else the path."""
    stamp = tree / STAMP
    return stamp.read_text().strip() if stamp.is_file() else str(tree)


def debian_kernel_tree(cache: Path | None = None, meta_package: str = KERNEL_META_PACKAGE) -> Path:
    """An unpacked, depmod-indexed Debian kernel package; downloaded on first use.

    The tree holds `boot/vmlinuz-<version>` and `lib/modules/<version>/` with the index
    `depmod` writes, so `modprobe -d ROOT -S VERSION` and `ModulesDep.load` both work on
    it. Treat it as read-only: copy what you change. `meta_package` is the flavour's meta
    package (`linux-image-amd64`, or the smaller `linux-image-cloud-amd64`); the versioned
    package it depends on is what is fetched, into `cache` (default: `cache_dir()`).
    Concurrent callers wait for each other.
    """
    cache = Path(cache) if cache is not None else cache_dir()
    root = cache / f"debian-{meta_package}"
    if (root / STAMP).is_file():
        return root
    check_tools(KERNEL_TOOLS, f"downloading Debian's kernel ({meta_package})")
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
    result = apt(["apt-cache", "depends", meta_package], capture=True)
    for line in result.stdout.splitlines():
        kind, _, target = line.strip().partition(":")
        target = target.strip().strip("<>")
        if kind == "Depends" and target.startswith("linux-image-"):
            return target
    raise UserError(
        f"apt-cache depends {meta_package} names no linux-image package",
        "check the host's APT sources (a Debian or Ubuntu release with amd64 kernels)",
    )


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


# --- unpacked package sets ------------------------------------------------------------------------


def unpacked_packages(name: str, packages: Sequence[str], cache: Path | None = None) -> Path:
    """`packages` (Debian package names) downloaded and unpacked together into one tree,
    `CACHE/debian-NAME`; downloaded and unpacked on first use, like the kernel. The
    stamp lists the .deb files it was made from. Concurrent callers wait for each other."""
    cache = Path(cache) if cache is not None else cache_dir()
    root = cache / f"debian-{name}"
    if (root / STAMP).is_file():
        return root
    check_tools(("apt-get", "dpkg-deb"), f"downloading Debian's {name} packages")
    with locked(cache / f".debian-{name}.lock"):
        if (root / STAMP).is_file():
            return root
        debs = [apt_download(package, cache / "debs") for package in packages]
        with temporary_directory(prefix=".unpack-", parent=str(cache)) as work:
            tree = work / "root"
            for deb in debs:
                run(["dpkg-deb", "-x", deb, tree])
            (tree / STAMP).write_text("".join(f"{deb.name}\n" for deb in debs))
            remove_path(root)
            os.rename(tree, root)
    return root
