"""The newc cpio model of an initrd: entries, and the kernel's rules for the tree they build.

The kernel's `init/initramfs.c` applies the entries of its archives in order: a later
entry replaces an earlier one of the same path, zero bytes between archives are skipped,
and a plain archive starts on a 4-byte boundary. This module holds what decides from those
rules, on plain values: `Entry`, the tree the entries leave (`merged_view`,
`original_init`), the rules that refuse entries escaping or aliasing the tree
(`TreeRules`), which entries to append so the tree gains files (`plan_additions`), and
what a reproducible archive holds (`plan_archive`). Reading and writing the bytes through
libarchive is `initramfs`'s job.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from archkernel.errors import UserError
from archkernel.log import log

FILE, DIR, SYMLINK = "file", "dir", "symlink"
CHARDEV, BLOCKDEV, FIFO, SOCKET = "chardev", "blockdev", "fifo", "socket"

# Entry type <-> the S_IFMT bits of a cpio mode.
IFMT = {
    FILE: 0o100000,
    DIR: 0o040000,
    SYMLINK: 0o120000,
    CHARDEV: 0o020000,
    BLOCKDEV: 0o060000,
    FIFO: 0o010000,
    SOCKET: 0o140000,
}
TYPE_OF_IFMT = {bits: name for name, bits in IFMT.items()}

NEWC_MAGICS = (b"070701", b"070702")  # 070702 carries a checksum; the kernel takes both
# The name of the entry that ends a newc archive.
TRAILER_NAME = b"TRAILER!!!"
_NONZERO = re.compile(rb"[^\x00]")


@dataclass(frozen=True)
class Entry:
    """One cpio entry as the kernel sees it.

    `path` is normalised (no leading './' or '/'; the root itself is '.'). `mode` holds
    the permission bits only (including setuid, setgid and sticky). `linkpath` is a
    symlink's target, or for a hard link (`hardlink` true) the path of the earlier entry
    it links to. `nlink` is the link count the header claims; newc stores the contents of
    a hard-linked file once, on one member of the link set. `data` is the contents of a
    regular file when it was asked for (or given, to build an archive), else None.
    """

    path: str
    type: str
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    size: int = 0
    linkpath: str | None = None
    hardlink: bool = False
    rdevmajor: int = 0
    rdevminor: int = 0
    mtime: int = 0
    data: bytes | None = None
    nlink: int = 1

    @classmethod
    def file(
        cls, path: str, data: bytes, *, mode: int = 0o644, uid: int = 0, gid: int = 0
    ) -> Entry:
        """A regular file holding `data`."""
        return cls(path, FILE, mode, uid, gid, size=len(data), data=data)

    @classmethod
    def directory(cls, path: str, *, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Entry:
        """A directory."""
        return cls(path, DIR, mode, uid, gid, nlink=2)

    @classmethod
    def symlink(cls, path: str, target: str, *, uid: int = 0, gid: int = 0) -> Entry:
        """A symbolic link to `target`."""
        return cls(path, SYMLINK, 0o777, uid, gid, size=len(target.encode()), linkpath=target)


# --- the tree the kernel builds ---------------------------------------------------------


def normalise_path(name: str, *, source: str) -> str:
    """An archive member's name as a normalised relative path; refuse unsafe names."""
    if not name:
        raise bad_entry(source, name, "has an empty name")
    if "\0" in name or "\n" in name:
        raise bad_entry(source, name, "has a NUL or newline in its name")
    if name.startswith("/"):
        raise bad_entry(source, name, "is an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise bad_entry(source, name, "has a '..' component")
    return "/".join(parts) or "."


def parents(path: str) -> list[str]:
    """The proper ancestors of a normalised path, outermost first: 'a/b/c' -> ['a', 'a/b']."""
    if path == ".":
        return []
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def merged_view(entries: Sequence[Entry]) -> dict[str, Entry]:
    """The tree the kernel leaves: each path's last entry, later archives replacing earlier."""
    tree: dict[str, Entry] = {}
    for entry in entries:
        tree[entry.path] = entry
    return tree


def original_init(entries: Sequence[Entry]) -> Entry:
    """The entry the kernel runs as /init in the tree `entries` build."""
    init = merged_view(entries).get("init")
    if init is None:
        raise UserError(
            "the initrd has no /init",
            "the kernel would not boot it either; check that this is the provider's initrd",
        )
    return init


SUSPICIOUS = (
    "an initrd made with `find . | cpio -o -H newc` never does this; "
    "refusing a damaged or malicious archive"
)


class _Node:
    """A path of the tree: its entry (None if only its descendants were seen), its children."""

    __slots__ = ("children", "entry", "populated")

    def __init__(self) -> None:
        self.entry: Entry | None = None
        self.children: dict[str, _Node] = {}
        self.populated = False  # a directory that has had children


class TreeRules:
    """The kernel's view of a growing tree, to refuse entries that alias or escape.

    An entry may not pass through a symlink (the kernel would write through it to a path
    other than the entry's name, which can leave the root for host tools and hides the
    real target from `merged_view`), may not sit below a non-directory, and may not
    replace a non-empty directory (the kernel's rmdir fails and keeps the old tree).
    Hard link targets must be earlier entries of the same archive (the kernel forgets
    links at each trailer).

    The tree is kept by path component, so checking an entry costs the length of its
    name (a table of whole ancestor paths cost its square: seconds for a deep name).
    """

    def __init__(self, source: str, *, links_in_order: bool = True, hint: str = SUSPICIOUS) -> None:
        self.source = source
        self.hint = hint
        self.links_in_order = links_in_order
        self.root = _Node()  # the path '.'
        self.archive_paths: set[str] = set()

    def new_archive(self) -> None:
        """Start the next archive: hard links may no longer name earlier entries."""
        self.archive_paths = set()

    def add(self, entry: Entry) -> None:
        """Apply `entry` to the tree, or raise UserError if the kernel would misapply it."""
        if entry.path == "." and entry.type != DIR:  # the kernel cannot replace its root
            raise bad_entry(self.source, entry.path, f"is the root but a {entry.type}", self.hint)
        parts = [] if entry.path == "." else entry.path.split("/")
        node = parent_node = self.root
        for depth, part in enumerate(parts):
            parent_node = node
            child = node.children.get(part)
            if child is None:
                child = node.children[part] = _Node()
            node = child
            above = node.entry
            if depth == len(parts) - 1 or above is None or above.type == DIR:
                continue
            parent = "/".join(parts[: depth + 1])
            if above.type == SYMLINK:
                raise bad_entry(
                    self.source,
                    entry.path,
                    f"passes through the symlink '{parent}' -> '{above.linkpath}'",
                    self.hint,
                )
            raise bad_entry(
                self.source, entry.path, f"is below '{parent}', which is a {above.type}", self.hint
            )
        old = node.entry
        if old is not None and old.type == DIR and entry.type != DIR and node.populated:
            raise bad_entry(
                self.source, entry.path, "replaces a directory that is not empty", self.hint
            )
        if self.links_in_order and entry.hardlink and entry.linkpath not in self.archive_paths:
            raise bad_entry(
                self.source,
                entry.path,
                f"is a hard link to '{entry.linkpath}', which is not an earlier entry",
                self.hint,
            )
        node.entry = entry
        self.archive_paths.add(entry.path)
        if parts:
            parent_node.populated = True


def bad_entry(source: str, name: str, problem: str, hint: str = SUSPICIOUS) -> UserError:
    """The error for entry `name` of `source` that breaks a rule (`problem` says which)."""
    return UserError(f"entry {name!r} in {source} {problem}", hint)


def padding_for(length: int) -> bytes:
    """Zero bytes that bring `length` to a multiple of 4.

    The kernel skips zero bytes between archives, and takes a plain (uncompressed) cpio
    archive only where it starts on a 4-byte boundary.
    """
    return b"\0" * (-length % 4)


def skip_padding(data: bytes, pos: int) -> int:
    """The offset of the first non-zero byte of `data` from `pos`; len(data) if none.

    The kernel skips zero bytes between archives and between compressed members.
    """
    found = _NONZERO.search(data, pos)
    return len(data) if found is None else found.start()


def plan_additions(
    original: Sequence[Entry], additions: Sequence[Entry], *, source: str
) -> list[Entry]:
    """The entries to append to `original` so the kernel's tree gains `additions`.

    Refuses additions the kernel would apply wrongly: a path below an original symlink
    or non-directory, a directory over an original non-directory, a non-directory over
    an original directory, a path whose parent exists nowhere, a path listed twice.
    Directories the original already has are left out, so their modes and owners stay the
    provider's. A regular file that lands on an original hard-linked file is preceded by
    a symlink of the same path: the kernel removes an existing path only when the type
    changes, otherwise it truncates the inode and would rewrite every link to it.
    """
    tree = merged_view(original)
    added: dict[str, Entry] = {}
    for entry in additions:
        path = normalise_path(entry.path, source="the additions")
        if path in added:
            raise UserError(f"the additions list {path!r} twice", "give each path once")
        added[path] = replace(entry, path=path)

    plan: list[Entry] = []
    for path, entry in added.items():
        for parent in parents(path):
            mine, theirs = added.get(parent), tree.get(parent)
            if mine is not None:
                if mine.type != DIR:
                    raise _bad_addition(path, f"is below '{parent}', which is a {mine.type}")
            elif theirs is None:
                raise _bad_addition(
                    path, f"has no parent directory '{parent}' in {source} or the additions"
                )
            elif theirs.type == SYMLINK:
                raise _bad_addition(
                    path,
                    f"is below '{parent}', a symlink in {source} -> '{theirs.linkpath}'; "
                    "the kernel would follow it and put the file elsewhere",
                )
            elif theirs.type != DIR:
                raise _bad_addition(path, f"is below '{parent}', a {theirs.type} in {source}")
        old = tree.get(path)
        if old is not None and (old.type == DIR) != (entry.type == DIR):
            raise _bad_addition(path, f"is a {entry.type} but {source} has a {old.type} there")
        if old is not None and old.type == DIR:
            log.debug(
                "initramfs: %s already has directory %s; keeping its owner and mode", source, path
            )
            continue
        if old is not None and old.type == FILE and entry.type == FILE and old.nlink > 1:
            plan.append(Entry.symlink(path, "/dev/null"))
        plan.append(entry)
    return plan


def _bad_addition(path: str, problem: str) -> UserError:
    return UserError(
        f"cannot add {path!r} to the initrd: it {problem}",
        "change the paths of the files to add",
    )


# --- the archive we write ---------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """An entry as build_archive writes it: its inode number, link count and contents."""

    entry: Entry
    ino: int
    nlink: int
    data: bytes


def _sort_key(entry: Entry) -> tuple[str, ...]:
    return () if entry.path == "." else tuple(entry.path.split("/"))


def plan_archive(entries: Sequence[Entry]) -> list[Member]:
    """What build_archive writes: entries sorted (parents first), inodes numbered from 1.

    Members of a hard-link set share an inode and a link count; as GNU cpio does, their
    contents go with the last member written, the others are empty.
    """
    source = "the archive to build"
    normalised = [
        replace(
            e,
            path=normalise_path(e.path, source=source),
            linkpath=normalise_path(e.linkpath or "", source=source) if e.hardlink else e.linkpath,
        )
        for e in entries
    ]
    ordered = sorted(normalised, key=_sort_key)  # stable: same-path entries keep their order
    # Link sets are rewritten below, so a hard link may name a target sorted after it.
    rules = TreeRules(source, links_in_order=False, hint="fix the entries given to build_archive")
    link_targets = {e.path for e in ordered if e.type == FILE and not e.hardlink}
    for entry in ordered:
        if entry.type not in IFMT:
            raise UserError(
                f"cannot archive {entry.path!r}: unknown type {entry.type!r}",
                f"use one of {', '.join(IFMT)}",
            )
        if entry.type == FILE and not entry.hardlink and entry.data is None and entry.size:
            raise UserError(
                f"cannot archive {entry.path!r}: its contents were not given",
                "read it with with_data, or build it with Entry.file()",
            )
        if entry.type == SYMLINK and not entry.linkpath:
            raise UserError(
                f"cannot archive {entry.path!r}: a symlink needs a target",
                "build it with Entry.symlink(path, target)",
            )
        if entry.hardlink and entry.type != FILE:
            raise UserError(
                f"cannot archive {entry.path!r}: only regular files can be hard links",
                "add it as a separate entry instead",
            )
        if entry.hardlink and entry.linkpath not in link_targets:
            raise UserError(
                f"cannot archive {entry.path!r}: it is a hard link to {entry.linkpath!r}, "
                "which is not a regular file of the archive",
                "add the target, or make the entry a regular file",
            )
        rules.add(entry)

    # Link sets, keyed by the path their members link to.
    group_of: dict[int, str] = {}
    for i, entry in enumerate(ordered):
        if entry.hardlink and entry.linkpath is not None:
            group_of[i] = entry.linkpath
    targets = set(group_of.values())
    for i, entry in enumerate(ordered):
        if entry.type == FILE and not entry.hardlink and entry.path in targets:
            group_of[i] = entry.path
    members_of: dict[str, list[int]] = {}
    for i in sorted(group_of):
        members_of.setdefault(group_of[i], []).append(i)
    contents: dict[str, bytes] = {}
    for target, indices in members_of.items():
        given = [data for i in indices if (data := ordered[i].data)]
        if len(set(given)) > 1:
            raise UserError(
                f"cannot archive the hard links to {target!r}: their contents differ",
                "give the contents on one member of the link set",
            )
        contents[target] = given[0] if given else b""

    plan: list[Member] = []
    ino_of_group: dict[str, int] = {}
    inodes = 0
    for i, entry in enumerate(ordered):
        group = group_of.get(i)
        if group is None:
            inodes += 1
            nlink = 2 if entry.type == DIR else 1
            data = (entry.data or b"") if entry.type == FILE else b""
            plan.append(Member(entry, inodes, nlink, data))
            continue
        if group not in ino_of_group:
            inodes += 1
            ino_of_group[group] = inodes
        ino = ino_of_group[group]
        last = members_of[group][-1] == i
        plan.append(Member(entry, ino, len(members_of[group]), contents[group] if last else b""))
    return plan


def fixed_mtime() -> int:
    """The timestamp of every entry we write: SOURCE_DATE_EPOCH, else 0."""
    value = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not value:
        return 0
    if not value.isdigit():
        raise UserError(
            f"SOURCE_DATE_EPOCH={value!r} is not a number of seconds",
            "set it to an integer such as 1700000000, or unset it",
        )
    return int(value)
