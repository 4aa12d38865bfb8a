"""What the build may have left in the image, read from a copy of its files.

Step 9 (archkernel.azure.verify) copies the root file system out of the VHD and fills the
hygiene facts of `rules.TreeFacts` from that copy: the files in /var/log (and which of
them the installed packages ship, from pacman's local database in the image), the files
in pacman's package cache, and the files that name the work directory. The rules that
judge them are in archkernel.azure.rules.

The work directory is named by the host paths the build handed its tools (`pacman -r
WORKDIR/azure/.root.tmp-new` ends up in pacman.log). A mention counts when it is the work
directory itself or a path in it: with a work directory `/build`, the text
`/build/python/src` (Arch's packages are built in /build, and some keep that path) names
nothing of ours, while `/build/azure/...` does.
"""

from __future__ import annotations

import mmap
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from archkernel.azure.rules import LOG_DIR, PACKAGE_CACHE, TreeFacts

# pacman's local database in a root tree: one directory per package, with its `files`.
LOCAL_DB = "var/lib/pacman/local"
# What the build itself makes in a work directory, named even before it exists.
WORKDIR_NAMES = ("azure", "buildenv")
# Characters that continue a file name: `/w/build` followed by one is another name.
_NAME_CHAR = rb"[A-Za-z0-9._+~@-]"


@dataclass(frozen=True)
class WorkdirSearch:
    """How to find the work directory's path in a file's bytes."""

    shown: str  # the path, as the report names it
    needles: tuple[bytes, ...]  # its spellings (resolved, and as given)
    pattern: re.Pattern[bytes]  # a mention, matched where a needle starts

    @classmethod
    def of(cls, workdir: Path, names: Iterable[str] | None = None) -> WorkdirSearch:
        """The search for `workdir` and the paths in it: those of `names` (default: what
        the directory holds now, and what the build makes in it)."""
        resolved = workdir.resolve()
        if names is None:
            held = [e.name for e in resolved.iterdir()] if resolved.is_dir() else []
            names = [*WORKDIR_NAMES, *held]
        forms = dict.fromkeys(
            os.fsencode(str(p)).rstrip(b"/") for p in (resolved, Path(os.path.abspath(workdir)))
        )
        needles = tuple(f for f in forms if f)
        return cls(str(resolved), needles, _pattern(needles, names))

    def named_in(self, data: bytes | mmap.mmap) -> bool:
        """Whether `data` names the work directory or a path in it."""
        for needle in self.needles:
            at = data.find(needle)
            while at >= 0:
                if self.pattern.match(data, at):
                    return True
                at = data.find(needle, at + 1)
        return False


def _pattern(needles: Iterable[bytes], names: Iterable[str]) -> re.Pattern[bytes]:
    base = b"|".join(re.escape(n) for n in needles)
    inside = b"|".join(re.escape(os.fsencode(n)) for n in sorted(set(names)) if n)
    # The directory itself (`/w/build`, `/w/build/`), or a path in it (`/w/build/azure/..`).
    alternatives = [rb"/?(?!" + _NAME_CHAR + rb"|/)"]
    if inside:
        alternatives.insert(0, rb"/(?:" + inside + rb")(?!" + _NAME_CHAR + rb")")
    return re.compile(rb"(?:" + base + rb")(?:" + b"|".join(alternatives) + rb")")


def _file_names(path: Path, search: WorkdirSearch) -> bool:
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return False
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return search.named_in(data)
    except OSError:
        return False


def files_naming(
    root: Path, search: WorkdirSearch, also: Mapping[str, Path] | None = None
) -> tuple[list[str], int]:
    """The files of the tree `root` (as image paths) and of `also` (name -> copy) that name
    the work directory, and how many files were searched. Symbolic links count by their
    target; nothing is followed."""
    found: list[str] = []
    count = 0
    for directory, dirs, files in os.walk(root):
        for name in [*files, *(d for d in dirs if os.path.islink(os.path.join(directory, d)))]:
            path = Path(directory, name)
            shown = "/" + os.fspath(path.relative_to(root))
            count += 1
            if path.is_symlink():
                if search.named_in(os.fsencode(os.readlink(path))):
                    found.append(shown)
            elif path.is_file() and _file_names(path, search):
                found.append(shown)
    for shown, path in (also or {}).items():
        if path.is_file():
            count += 1
            if _file_names(path, search):
                found.append(shown)
    return sorted(found), count


def shipped_files(root: Path, prefix: str) -> set[str]:
    """The files (not directories) under `prefix` (`var/log/`) that the packages installed
    in the tree `root` ship, as image paths, from pacman's local database."""
    shipped: set[str] = set()
    for listing in (root / LOCAL_DB).glob("*/files"):
        try:
            lines = listing.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        section = ""
        for line in lines:
            if line.startswith("%") and line.endswith("%"):
                section = line
            elif section == "%FILES%" and line.startswith(prefix) and not line.endswith("/"):
                shipped.add("/" + line)
    return shipped


def _regular_files(directory: Path, root: Path) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for folder, _dirs, files in os.walk(directory):
        for name in files:
            path = Path(folder, name)
            if path.is_file() and not path.is_symlink():
                sizes["/" + os.fspath(path.relative_to(root))] = path.stat().st_size
    return sizes


def inspect(
    facts: TreeFacts,
    root: Path,
    workdir: WorkdirSearch | None,
    also: Mapping[str, Path] | None = None,
    searched: Iterable[str] = (),
) -> None:
    """Fill the hygiene facts of `facts` from the tree `root` (a copy of the image's
    directories `searched`) and the copies `also`; the work directory is looked for only
    with a `workdir` search."""
    facts.log_files = _regular_files(root / LOG_DIR.lstrip("/"), root)
    shipped = shipped_files(root, LOG_DIR.lstrip("/") + "/")
    facts.shipped_logs = sorted(p for p in facts.log_files if p in shipped)
    cache = root / PACKAGE_CACHE.lstrip("/")
    facts.cached_packages = sorted(
        os.fspath(Path(folder, name).relative_to(cache))
        for folder, _dirs, files in os.walk(cache)
        for name in files
    )
    if workdir is not None:
        facts.workdir = workdir.shown
        facts.workdir_files, facts.files_searched = files_naming(root, workdir, also)
        facts.searched = [*searched, *(also or {})]
