"""pacman's local database: which installed package owns a file, and what it ships.

`var/lib/pacman/local/<name>-<version>/` holds one directory per installed package: `desc`
(`%NAME%`, `%VERSION%` ... sections) and `files` (a `%FILES%` section listing every path
the package installed, relative, directories ending in `/`). Arch Linux ARM's
`linux-armv7` writes no `pkgbase` file, so this database is how the system itself knows
which kernel package owns `/boot/zImage` and which `usr/lib/modules/<version>/` it ships.

Parsing is pure (`parse_sections`, `parse_package`); `read_database` reads the files
defensively: bounded sizes and entry counts, no symbolic links followed, paths with `..`
or a leading `/` ignored, since a broken or hostile database must not make the boot
service read without end or look outside the root.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from archkernel.errors import UserError

LOCAL_DB = "var/lib/pacman/local"
MAX_DESC = 256 * 1024  # a real desc is a few hundred bytes
MAX_FILES = 32 * 1024 * 1024  # linux-firmware's files list is about 1 MiB
MAX_PACKAGES = 100_000
MODULES_PREFIX = "usr/lib/modules/"


@dataclass(frozen=True)
class Package:
    """One installed package: its name, version and the files it owns (relative paths)."""

    name: str
    version: str
    files: frozenset[str]

    @property
    def label(self) -> str:
        """`linux-armv7 6.2.10-1`, as pacman -Q prints it."""
        return f"{self.name} {self.version}"

    def owns(self, path: str) -> bool:
        """Whether the package installed `path` (relative to the root, no leading `/`)."""
        return path.strip("/") in self.files

    def module_versions(self) -> list[str]:
        """The `<version>` of every `usr/lib/modules/<version>/` the package ships, sorted.

        Arch's old `extramodules-*` directories hold no kernel's modules and are left out.
        """
        found = set()
        for path in self.files:
            if path.startswith(MODULES_PREFIX):
                name = path[len(MODULES_PREFIX) :].split("/", 1)[0]
                if safe_component(name) and not name.startswith("extramodules"):
                    found.add(name)
        return sorted(found)


def safe_component(name: str) -> bool:
    """A single path component that names something inside its directory."""
    return bool(name) and name not in (".", "..") and "/" not in name and name.isprintable()


def _safe_path(path: str) -> str | None:
    """`path` without its trailing `/` when it stays below the root, else None."""
    if not path or path.startswith("/") or not path.isprintable():
        return None
    parts = path.rstrip("/").split("/")
    if any(p in ("", ".", "..") for p in parts):
        return None
    return "/".join(parts)


def parse_sections(text: str) -> dict[str, list[str]]:
    """The `%SECTION%` blocks of a desc or files text: {"NAME": ["linux-armv7"], ...}.

    A section runs from its header to the next blank line; lines before any header are
    ignored, as pacman ignores them. Lines end at a newline only, as pacman reads them: a
    file name holding another line break (NEL, U+2028 ...) stays one (unsafe) entry rather
    than naming a second path.
    """
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in (raw.rstrip("\r") for raw in text.split("\n")):
        if not line.strip():
            current = None
        elif line.startswith("%") and line.endswith("%") and len(line) > 2:
            current = sections.setdefault(line[1:-1], [])
        elif current is not None:
            current.append(line)
    return sections


def parse_package(entry: str, desc: str, files: str) -> Package:
    """A package from its database directory name and the texts of `desc` and `files`.

    The name and version come from `desc`; without them, from the directory name
    (`<name>-<pkgver>-<pkgrel>`). Unsafe paths in `%FILES%` are dropped.
    """
    sections = parse_sections(desc)
    names, versions = sections.get("NAME", []), sections.get("VERSION", [])
    if names and versions:
        name, version = names[0].strip(), versions[0].strip()
    else:
        parts = entry.rsplit("-", 2)
        name = parts[0]
        version = "-".join(parts[1:]) if len(parts) == 3 else "?"
    owned = (_safe_path(p) for p in parse_sections(files).get("FILES", []))
    return Package(name, version, frozenset(p for p in owned if p))


def _read_bounded(path: Path, limit: int) -> str | None:
    """The text of the regular file `path` (not a symbolic link), or None when absent.

    A file larger than `limit` is a UserError: the database is not what pacman writes.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UserError(
            f"cannot read pacman's database file {path}: {exc.strerror}",
            "check it with `pacman -Dk`",
        ) from None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise UserError(
                f"pacman's database file {path} is not a regular file",
                "check it with `pacman -Dk`",
            )
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise UserError(
            f"pacman's database file {path} is larger than {limit} bytes",
            "a real one is far smaller; check the database with `pacman -Dk`",
        )
    return data.decode("utf-8", errors="replace")


def _entries(local: Path) -> list[str]:
    try:
        with os.scandir(local) as it:
            names: list[str] = []
            for entry in it:
                if len(names) >= MAX_PACKAGES:
                    raise UserError(
                        f"pacman's database {local} has more than {MAX_PACKAGES} entries",
                        "check it with `pacman -Dk`",
                    )
                if entry.is_dir(follow_symlinks=False) and safe_component(entry.name):
                    names.append(entry.name)
    except FileNotFoundError:
        return []
    return sorted(names)


def kernel_first(entries: Iterable[str]) -> list[str]:
    """Database entries with the kernel-looking ones (`linux*`) first: the owner of the
    kernel image is found after reading a few `files` lists rather than all of them."""
    names = list(entries)
    return [e for e in names if e.startswith("linux")] + [
        e for e in names if not e.startswith("linux")
    ]


def read_packages(root: Path, entries: Iterable[str] | None = None) -> Iterator[Package]:
    """The installed packages under `root`, read one at a time (kernel-looking first)."""
    local = root / LOCAL_DB
    for entry in kernel_first(_entries(local) if entries is None else entries):
        files = _read_bounded(local / entry / "files", MAX_FILES)
        if files is None:
            continue
        desc = _read_bounded(local / entry / "desc", MAX_DESC) or ""
        yield parse_package(entry, desc, files)


def owners(root: Path, path: str) -> list[Package]:
    """Every installed package that owns `path` (relative to `root`).

    pacman allows one owner per file; two mean a forced install, and the caller says so.
    The `linux*` entries are read first, and the rest only when none of them owns it.
    """
    entries = _entries(root / LOCAL_DB)
    kernels = [e for e in entries if e.startswith("linux")]
    found = [p for p in read_packages(root, kernels) if p.owns(path)]
    if found:
        return found
    others = [e for e in entries if not e.startswith("linux")]
    return [p for p in read_packages(root, others) if p.owns(path)]
