"""Tests for archkernel.formats.initramfs: reading provider initrds and appending our archive.

Fixture initrds are made by GNU cpio from a real tree (`find . | cpio -o -H newc | gzip`);
results are checked with GNU cpio, bsdtar, gzip, xz, zstd and lz4, and with a small
model of the kernel's unpacker (init/initramfs.c) written here, independent of the code
under test. Malicious archives are hand-made newc bytes, since cpio tools refuse to write
them.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
import random
import stat
import subprocess
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from archkernel.errors import UserError
from archkernel.formats import cpio, initramfs
from archkernel.formats.compression import detect_compression
from archkernel.formats.cpio import Entry
from archkernel.units import KiB, MiB

ROOT = os.geteuid() == 0
needs_root = pytest.mark.root  # device nodes and foreign owners

OLD_INIT = b"#!/bin/sh\nmount -t proc proc /proc\nexec switch_root /newroot /sbin/init\n"
NEW_INIT = b"#!/bin/sh\n/bin/busybox --install -s\ninsmod /lib/modules/nbd.ko\n. /init.scw\n"

IFMT = {
    "file": stat.S_IFREG,
    "dir": stat.S_IFDIR,
    "symlink": stat.S_IFLNK,
    "chardev": stat.S_IFCHR,
    "blockdev": stat.S_IFBLK,
    "fifo": stat.S_IFIFO,
    "socket": stat.S_IFSOCK,
}


# --- helpers ---------------------------------------------------------------------------


def tool(argv: list[str], data: bytes | None = None, cwd: Path | None = None) -> bytes:
    """Run an independent tool; its stdout."""
    return subprocess.run(argv, input=data, cwd=cwd, capture_output=True, check=True).stdout


def gnu_cpio_archive(tree: Path) -> bytes:
    names = tool(["find", "."], cwd=tree)
    return tool(["cpio", "-o", "-H", "newc", "--quiet"], names, cwd=tree)


def newc(members: list[tuple[str, int, bytes]], *, nlink: int = 1, trailer: bool = True) -> bytes:
    """Hand-made newc bytes: (name, full mode, body) each, inodes 1, 2, ..."""
    out = bytearray()

    def member(ino: int, name: str, mode: int, body: bytes) -> None:
        raw = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, nlink, 0, len(body), 0, 0, 0, 0, len(raw), 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + raw)
        out.extend(b"\0" * (-len(out) % 4) + body)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, mode, body) in enumerate(members, 1):
        member(ino, name, mode, body)
    if trailer:
        member(0, "TRAILER!!!", 0, b"")
    return bytes(out)


def parse_newc(data: bytes) -> list[dict[str, Any]]:
    """An independent newc parser: every header of every archive, trailers excluded."""
    found: list[dict[str, Any]] = []
    pos = 0
    keys = (
        "ino",
        "mode",
        "uid",
        "gid",
        "nlink",
        "mtime",
        "size",
        "devmajor",
        "devminor",
        "rdevmajor",
        "rdevminor",
        "namesize",
        "check",
    )
    while pos < len(data):
        if data[pos] == 0:
            pos += 1
            continue
        assert data[pos : pos + 6] in (b"070701", b"070702"), data[pos : pos + 16]
        fields = {k: int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i, k in enumerate(keys)}
        name_at = pos + 110
        name = data[name_at : name_at + fields["namesize"] - 1].decode()
        body_at = (name_at + fields["namesize"] + 3) & ~3
        body = data[body_at : body_at + fields["size"]]
        pos = (body_at + fields["size"] + 3) & ~3
        if name != "TRAILER!!!":
            found.append({**fields, "name": name, "body": body})
    return found


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """What an extracted tree holds: type+mode, owner, device, contents or link target."""
    result: dict[str, tuple[object, ...]] = {}
    for path in sorted([root, *root.rglob("*")]):
        st = path.lstat()
        rel = path.relative_to(root).as_posix()
        if stat.S_ISREG(st.st_mode):
            extra: object = hashlib.sha256(path.read_bytes()).hexdigest()
        elif stat.S_ISLNK(st.st_mode):
            extra = os.readlink(path)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            extra = (os.major(st.st_rdev), os.minor(st.st_rdev))
        else:
            extra = None
        result[rel] = (stat.filemode(st.st_mode), st.st_uid, st.st_gid, extra)
    return result


def link_sets(root: Path) -> set[frozenset[str]]:
    """Paths of regular files that share an inode, grouped."""
    by_inode: dict[int, set[str]] = {}
    for path in root.rglob("*"):
        st = path.lstat()
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            by_inode.setdefault(st.st_ino, set()).add(path.relative_to(root).as_posix())
    return {frozenset(paths) for paths in by_inode.values()}


def kernel_unpack(payload: bytes, root: Path) -> None:
    """A model of init/initramfs.c unpacking `payload` (gzip members, then plain) into root.

    Zero bytes are skipped; a plain archive starts on a 4-byte boundary; a gzip member is
    inflated to its exact end. Per entry: clean_path removes an existing path only when
    the type differs (a symlink removes anything); a regular file is opened with O_TRUNC
    unless it was hard-linked (nlink >= 2, same inode seen earlier in the archive).
    """

    def clean_path(path: Path, mode: int) -> None:
        try:
            st = path.lstat()
        except FileNotFoundError:
            return
        if stat.S_IFMT(st.st_mode) != stat.S_IFMT(mode):
            path.rmdir() if stat.S_ISDIR(st.st_mode) else path.unlink()

    def apply_archives(buf: bytes) -> None:
        links: dict[tuple[int, int], Path] = {}
        for h in parse_newc(buf):  # parse_newc walks all archives; links reset is harmless here
            path = root / str(h["name"])
            mode, body = int(h["mode"]), bytes(h["body"])
            nlink, ino = int(h["nlink"]), int(h["ino"])

            def maybe_link(
                path: Path = path, mode: int = mode, nlink: int = nlink, ino: int = ino
            ) -> bool:
                if nlink < 2:
                    return False
                key = (ino, stat.S_IFMT(mode))
                if key in links:
                    clean_path(path, 0)
                    os.link(links[key], path)
                    return True
                links[key] = path
                return False

            if stat.S_ISLNK(mode):
                clean_path(path, 0)
                os.symlink(body.decode(), path)
                continue
            clean_path(path, mode)
            if stat.S_ISREG(mode):
                flags = os.O_WRONLY | os.O_CREAT | (0 if maybe_link() else os.O_TRUNC)
                fd = os.open(path, flags, 0o600)
                try:
                    os.write(fd, body)
                    os.fchmod(fd, stat.S_IMODE(mode))
                finally:
                    os.close(fd)
            elif stat.S_ISDIR(mode):
                path.mkdir(exist_ok=True)
                os.chmod(path, stat.S_IMODE(mode))
            elif not maybe_link():
                os.mknod(path, mode, os.makedev(int(h["rdevmajor"]), int(h["rdevminor"])))

    root.mkdir(exist_ok=True)
    pos = 0
    while pos < len(payload):
        if payload[pos] == 0:
            pos += 1
        elif payload[pos : pos + 1] == b"0":
            assert pos % 4 == 0
            apply_archives(payload[pos:])
            return
        else:
            inflater = zlib.decompressobj(wbits=31)
            apply_archives(inflater.decompress(payload[pos:]))
            assert inflater.eof
            pos = len(payload) - len(inflater.unused_data)


# --- fixtures --------------------------------------------------------------------------


def make_provider_tree(tree: Path, *, hardlinked_init: bool) -> None:
    """A small busybox initrd tree with every kind of entry the kernel knows."""
    tree.mkdir()
    tree.chmod(0o755)
    for d in (
        "bin",
        "sbin",
        "dev",
        "etc",
        "proc",
        "sys",
        "usr",
        "usr/lib",
        "home",
        "home/user",
        "run",
    ):
        (tree / d).mkdir()
        (tree / d).chmod(0o755)
    (tree / "tmp").mkdir()
    (tree / "tmp").chmod(0o1777)
    (tree / "root").mkdir()
    (tree / "root").chmod(0o700)
    (tree / "etc/secret").mkdir()
    (tree / "etc/secret").chmod(0o2750)
    (tree / "init").write_bytes(OLD_INIT)
    (tree / "init").chmod(0o755)
    if hardlinked_init:
        os.link(tree / "init", tree / "linuxrc")
    busybox = Path("/bin/busybox")  # busybox-static; any large binary-like file will do
    (tree / "bin/busybox").write_bytes(
        busybox.read_bytes() if busybox.exists() else random.Random(3).randbytes(1 << 20)
    )
    (tree / "bin/busybox").chmod(0o755)
    os.symlink("/bin/busybox", tree / "bin/sh")  # absolute, as the kernel sees the root
    os.symlink("../bin/busybox", tree / "sbin/switch_root")
    (tree / "etc/issue").write_text("Scaleway C1\n")
    os.link(tree / "etc/issue", tree / "etc/issue.net")
    (tree / "etc/secret/key").write_bytes(os.urandom(64))
    (tree / "etc/secret/key").chmod(0o640)
    (tree / "bin/su").write_bytes(b"\x7fELF fake setuid binary")
    (tree / "bin/su").chmod(0o4755)
    (tree / "home/user/notes").write_text("owned by someone else\n")
    os.chown(tree / "home/user/notes", 1000, 100)
    os.chown(tree / "home/user", 1000, 100)
    os.mknod(tree / "dev/console", stat.S_IFCHR | 0o600, os.makedev(5, 1))
    os.mknod(tree / "dev/nbd0", stat.S_IFBLK | 0o660, os.makedev(43, 0))
    os.mkfifo(tree / "run/initctl", 0o600)


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, bytes]:
    """(tree, plain newc archive, its gzip -9 payload) made by GNU cpio and gzip."""
    if not ROOT:
        pytest.skip("the fixture tree has device nodes and foreign owners: needs root")
    tree = tmp_path_factory.mktemp("provider") / "tree"
    make_provider_tree(tree, hardlinked_init=False)
    archive = gnu_cpio_archive(tree)
    return tree, archive, tool(["gzip", "-9", "-n"], archive)


@pytest.fixture(scope="module")
def provider_linked_init(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A provider initrd whose /init is hard-linked to /linuxrc."""
    if not ROOT:
        pytest.skip("needs root")
    tree = tmp_path_factory.mktemp("linked") / "tree"
    make_provider_tree(tree, hardlinked_init=True)
    return tree, tool(["gzip", "-9", "-n"], gnu_cpio_archive(tree))


@pytest.fixture
def guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Run in an empty directory under tmp_path; prove afterwards nothing was written."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    outside = sorted(p.name for p in tmp_path.parent.iterdir())
    passwd = Path("/etc/passwd").read_bytes()
    yield work
    assert list(work.iterdir()) == []
    assert sorted(p.name for p in tmp_path.parent.iterdir()) == outside
    assert Path("/etc/passwd").read_bytes() == passwd
    assert not Path("/x").exists()


# --- what build_archive refuses -------------------------------------------------------


def test_build_archive_refuses_unknown_compression() -> None:
    with pytest.raises(UserError, match="cannot write a 'lzo'-compressed archive"):
        initramfs.build_archive([Entry.directory("a")], compression="lzo")


@pytest.mark.parametrize("compression", ["gzip", "xz", "zstd"])
def test_build_archive_refuses_a_bad_level(compression: str) -> None:
    with pytest.raises(UserError):
        initramfs.build_archive([Entry.file("a", b"x")], compression=compression, level=99)


def test_build_archive_refuses_a_path_below_a_symlink() -> None:
    with pytest.raises(UserError) as caught:
        initramfs.build_archive([Entry.symlink("lib", "usr/lib"), Entry.file("lib/x", b"x")])
    assert "passes through the symlink 'lib' -> 'usr/lib'" in caught.value.message
    assert caught.value.hint == "fix the entries given to build_archive"


def test_fixed_mtime_refuses_a_bad_source_date_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(UserError, match="SOURCE_DATE_EPOCH"):
        initramfs.build_archive([Entry.directory("a")])


# --- reading provider initrds (GNU cpio fixtures) --------------------------------------


def bsdtar_listing(payload: bytes) -> list[tuple[str, str, str, str, str, str]]:
    """(mode string, uid, gid, size or 'major,minor', name, link) per bsdtar -tv line."""
    text = tool(["bsdtar", "-tvf", "-", "--numeric-owner"], payload).decode()
    rows = []
    for line in text.splitlines():
        mode, _nlink, uid, gid, size, _mon, _day, _time, rest = line.split(None, 8)
        name, link = rest, ""
        for marker in (" -> ", " link to "):
            if marker in rest:
                name, target = rest.split(marker, 1)
                link = marker.strip() + " " + target
        rows.append((mode, uid, gid, size, name.removeprefix("./") or ".", link))
    return rows


def as_listing(entry: Entry) -> tuple[str, str, str, str, str, str]:
    mode = stat.filemode(IFMT[entry.type] | entry.mode)
    size = str(entry.size)
    if entry.type in ("chardev", "blockdev"):
        size = f"{entry.rdevmajor},{entry.rdevminor}"
    link = ""
    if entry.type == "symlink":
        link = f"-> {entry.linkpath}"
    elif entry.hardlink:
        link = f"link to {entry.linkpath}"
    return (mode, str(entry.uid), str(entry.gid), size, entry.path, link)


@pytest.mark.integration
@needs_root
def test_read_entries_matches_bsdtar_listing(provider: tuple[Path, bytes, bytes]) -> None:
    _tree, _archive, payload = provider
    entries = initramfs.read_entries(payload, source="fixture")
    assert [as_listing(e) for e in entries] == bsdtar_listing(payload)


@pytest.mark.integration
@needs_root
def test_read_entries_matches_gnu_cpio_order(provider: tuple[Path, bytes, bytes]) -> None:
    _tree, archive, payload = provider
    names = tool(["cpio", "-t", "--quiet"], archive).decode().splitlines()
    assert [e.path for e in initramfs.read_entries(payload, source="f")] == [
        n.removeprefix("./") or "." for n in names
    ]


@pytest.mark.integration
@needs_root
def test_read_entries_sees_every_kind_of_entry(provider: tuple[Path, bytes, bytes]) -> None:
    _tree, _archive, payload = provider
    got = {e.path: e for e in initramfs.read_entries(payload, source="f")}
    assert (
        got["dev/console"].type,
        got["dev/console"].rdevmajor,
        got["dev/console"].rdevminor,
    ) == ("chardev", 5, 1)
    assert (got["dev/nbd0"].type, got["dev/nbd0"].rdevmajor, got["dev/nbd0"].rdevminor) == (
        "blockdev",
        43,
        0,
    )
    assert got["run/initctl"].type == "fifo"
    assert (got["bin/sh"].type, got["bin/sh"].linkpath) == ("symlink", "/bin/busybox")
    assert got["sbin/switch_root"].linkpath == "../bin/busybox"
    assert (got["tmp"].mode, got["root"].mode, got["etc/secret"].mode) == (0o1777, 0o700, 0o2750)
    assert got["bin/su"].mode == 0o4755
    assert (got["home/user/notes"].uid, got["home/user/notes"].gid) == (1000, 100)
    pair = {got["etc/issue"].hardlink, got["etc/issue.net"].hardlink}
    assert pair == {True, False}
    assert got["etc/issue"].nlink == got["etc/issue.net"].nlink == 2


@pytest.mark.integration
@needs_root
def test_read_entries_returns_data_only_when_asked(provider: tuple[Path, bytes, bytes]) -> None:
    _tree, _archive, payload = provider
    entries = initramfs.read_entries(payload, source="f", with_data=lambda p: p == "init")
    assert [e.path for e in entries if e.data is not None] == ["init"]
    assert next(e for e in entries if e.path == "init").data == OLD_INIT


@pytest.mark.integration
@needs_root
def test_read_file_follows_hard_link_contents(provider: tuple[Path, bytes, bytes]) -> None:
    tree, _archive, payload = provider
    assert initramfs.read_file(payload, "/init", "f") == OLD_INIT
    assert initramfs.read_file(payload, "etc/issue", "f") == b"Scaleway C1\n"
    assert initramfs.read_file(payload, "etc/issue.net", "f") == b"Scaleway C1\n"
    assert initramfs.read_file(payload, "bin/busybox", "f") == (tree / "bin/busybox").read_bytes()
    with pytest.raises(UserError, match="is a symlink, not a regular file"):
        initramfs.read_file(payload, "bin/sh", "f")
    with pytest.raises(UserError, match="has no /nothing"):
        initramfs.read_file(payload, "nothing", "f")


@pytest.mark.integration
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["xz", "-c", "--check=crc32"], "xz"),
        (["zstd", "-q", "-c"], "zstd"),
        (["lz4", "-q", "-l", "-c"], "lz4"),
        (["bzip2", "-c"], "bzip2"),
        (["xz", "--format=lzma", "-c"], "lzma"),
        (["cat"], "none"),
    ],
)
@needs_root
def test_other_compressions_are_detected_and_read(
    provider: tuple[Path, bytes, bytes], argv: list[str], expected: str
) -> None:
    _tree, archive, payload = provider
    other = tool(argv, archive)
    assert detect_compression(other) == expected
    assert initramfs.read_entries(other, source="o") == initramfs.read_entries(payload, source="g")
    (segment,) = initramfs.read_segments(other, source="o")
    assert (segment.offset, segment.compression) == (0, expected)
    if expected != "none":  # a plain archive ends at its trailer, before cpio's padding
        assert segment.end == len(other)


@pytest.mark.integration
def test_concatenated_archives_are_read_in_order(tmp_path: Path) -> None:
    early = tmp_path / "early"
    (early / "kernel/x86/microcode").mkdir(parents=True)
    (early / "kernel/x86/microcode/GenuineIntel.bin").write_bytes(b"microcode")
    (early / "init").write_bytes(b"early init\n")
    main = tmp_path / "main"
    main.mkdir()
    (main / "init").write_bytes(b"main init\n")
    plain = gnu_cpio_archive(early)
    squeezed = tool(["gzip", "-n"], gnu_cpio_archive(main))
    third = tool(["zstd", "-q", "-c"], newc([("extra", stat.S_IFREG | 0o644, b"x")]))
    payload = plain + squeezed + b"\0" * 5 + third
    entries = initramfs.read_entries(payload, source="p", with_data=lambda p: p == "init")
    listed = [
        name.removeprefix("./") or "."
        for part in (early, main)
        for name in tool(["cpio", "-t", "--quiet"], gnu_cpio_archive(part)).decode().splitlines()
    ]
    assert [e.path for e in entries] == [*listed, "extra"]
    assert [e.data for e in entries if e.path == "init"] == [b"early init\n", b"main init\n"]
    assert cpio.merged_view(entries)["init"].data == b"main init\n"
    assert [s.compression for s in initramfs.read_segments(payload, source="p")] == [
        "none",
        "gzip",
        "zstd",
    ]
    assert initramfs.read_segments(payload, source="p")[1] == initramfs.Segment(
        len(plain), len(plain) + len(squeezed), "gzip"
    )


def test_several_archives_inside_one_gzip_member() -> None:
    first = newc([("a", stat.S_IFREG | 0o644, b"1")])
    second = newc([("b", stat.S_IFREG | 0o644, b"2")])
    payload = gzip.compress(first + b"\0" * 8 + second, mtime=0)
    assert [e.path for e in initramfs.read_entries(payload, source="p")] == ["a", "b"]


def test_plain_archive_off_a_four_byte_boundary_is_refused() -> None:
    with pytest.raises(UserError, match="not on a 4-byte boundary"):
        initramfs.read_entries(b"\0" + newc([("a", stat.S_IFDIR | 0o755, b"")]), source="p")


# --- corrupt and malicious archives ----------------------------------------------------


def test_garbage_is_refused(guard: Path) -> None:
    with pytest.raises(UserError, match="is not a compressed cpio archive"):
        initramfs.read_entries(b"this is not an initrd at all", source="p")


def test_trailing_garbage_is_refused(guard: Path) -> None:
    good = gzip.compress(newc([("init", stat.S_IFREG | 0o755, OLD_INIT)]), mtime=0)
    with pytest.raises(UserError) as caught:
        initramfs.read_entries(good + b"\0\0\xff\xff\xff\xff", source="p")
    assert caught.value.message == (
        f"payload of p has unknown data after its archives, at byte {len(good) + 2} "
        "(starts with ff ff ff ff)"
    )


def test_empty_payload_is_refused(guard: Path) -> None:
    with pytest.raises(UserError, match="is empty"):
        initramfs.read_entries(b"\0" * 64, source="p")


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda gz: gz[: len(gz) // 2], id="truncated-gzip"),
        pytest.param(lambda gz: gz[:40] + bytes([gz[40] ^ 0xFF]) + gz[41:], id="flipped-byte"),
        pytest.param(
            lambda gz: gzip.compress(zlib.decompress(gz, 31)[:300], mtime=0), id="cut-cpio"
        ),
        pytest.param(
            lambda gz: gzip.compress(
                newc([("a", stat.S_IFREG | 0o644, b"x")], trailer=False), mtime=0
            ),
            id="no-trailer",
        ),
        pytest.param(
            lambda gz: gzip.compress(
                newc([("a", stat.S_IFREG | 0o644, b"x")], trailer=False)
                + b"JUNKJUNK"
                + newc([("b", stat.S_IFREG | 0o644, b"y")]),
                mtime=0,
            ),
            id="junk-between-headers",
        ),
    ],
)
def test_corrupt_payloads_are_refused(guard: Path, damage: Callable[[bytes], bytes]) -> None:
    good = gzip.compress(
        newc([(".", stat.S_IFDIR | 0o755, b""), ("init", stat.S_IFREG | 0o755, OLD_INIT * 20)]),
        mtime=0,
    )
    assert len(initramfs.read_entries(good, source="p")) == 2
    with pytest.raises(UserError) as caught:
        initramfs.read_entries(damage(good), source="uInitrd")
    assert "payload of uInitrd is corrupt or truncated" in caught.value.message
    assert "\n" not in caught.value.message


@pytest.mark.parametrize(
    ("members", "problem"),
    [
        ([("../../etc/passwd", stat.S_IFREG | 0o644, b"root::0:0::/:/bin/sh\n")], "'..'"),
        ([("/etc/passwd", stat.S_IFREG | 0o644, b"root::0:0::/:/bin/sh\n")], "absolute path"),
        ([("a", stat.S_IFDIR | 0o755, b""), ("a/../../x", stat.S_IFREG | 0o644, b"x")], "'..'"),
        (
            [("evil", stat.S_IFLNK | 0o777, b"/etc"), ("evil/passwd", stat.S_IFREG | 0o644, b"x")],
            "passes through the symlink 'evil' -> '/etc'",
        ),
        (
            [("evil", stat.S_IFLNK | 0o777, b"../.."), ("evil/passwd", stat.S_IFREG | 0o644, b"x")],
            "passes through the symlink 'evil' -> '../..'",
        ),
        (
            [("here", stat.S_IFLNK | 0o777, b"."), ("here/init", stat.S_IFREG | 0o755, b"x")],
            "passes through the symlink 'here' -> '.'",
        ),
        (
            [("f", stat.S_IFREG | 0o644, b"x"), ("f/g", stat.S_IFREG | 0o644, b"y")],
            "is below 'f', which is a file",
        ),
        (
            [
                ("d", stat.S_IFDIR | 0o755, b""),
                ("d/f", stat.S_IFREG | 0o644, b""),
                ("d", stat.S_IFLNK | 0o777, b"/"),
            ],
            "replaces a directory that is not empty",
        ),
    ],
)
@pytest.mark.parametrize("compressed", [True, False])
def test_malicious_archives_are_refused(
    guard: Path, members: list[tuple[str, int, bytes]], problem: str, compressed: bool
) -> None:
    payload = newc(members)
    if compressed:
        payload = gzip.compress(payload, mtime=0)
    with pytest.raises(UserError) as caught:
        initramfs.read_entries(payload, source="uInitrd", with_data=lambda p: True)
    assert problem in caught.value.message
    assert caught.value.message.startswith("entry ")
    assert caught.value.hint


def test_symlink_traversal_is_refused_across_archives(guard: Path) -> None:
    first = gzip.compress(newc([("lib", stat.S_IFLNK | 0o777, b"/etc")]), mtime=0)
    second = gzip.compress(newc([("lib/shadow", stat.S_IFREG | 0o600, b"x")]), mtime=0)
    with pytest.raises(UserError, match="passes through the symlink 'lib'"):
        initramfs.read_entries(first + second, source="p")


def test_a_symlink_replaced_by_a_directory_can_be_entered(guard: Path) -> None:
    first = gzip.compress(newc([("lib", stat.S_IFLNK | 0o777, b"usr/lib")]), mtime=0)
    second = gzip.compress(
        newc([("lib", stat.S_IFDIR | 0o755, b""), ("lib/x", stat.S_IFREG | 0o644, b"x")]),
        mtime=0,
    )
    tree = cpio.merged_view(initramfs.read_entries(first + second, source="p"))
    assert (tree["lib"].type, tree["lib/x"].type) == ("dir", "file")


# --- building --------------------------------------------------------------------------


@pytest.mark.integration
@needs_root
def test_build_archive_round_trips_through_gnu_cpio(
    provider: tuple[Path, bytes, bytes], tmp_path: Path
) -> None:
    tree, _archive, payload = provider
    entries = initramfs.read_entries(payload, source="f", with_data=lambda p: True)
    built = initramfs.build_archive(entries)
    out = tmp_path / "out"
    out.mkdir()
    tool(
        ["cpio", "-idm", "--quiet", "--no-absolute-filenames"],
        tool(["gzip", "-dc"], built),
        cwd=out,
    )
    assert snapshot(out) == snapshot(tree)
    assert link_sets(out) == link_sets(tree) == {frozenset({"etc/issue", "etc/issue.net"})}


@pytest.mark.integration
@needs_root
def test_build_archive_is_reproducible(
    provider: tuple[Path, bytes, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    _tree, _archive, payload = provider
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    entries = initramfs.read_entries(payload, source="f", with_data=lambda p: True)
    once = initramfs.build_archive(entries)
    shuffled = list(entries)
    random.Random(7).shuffle(shuffled)
    assert shuffled != entries
    assert initramfs.build_archive(shuffled) == once
    assert initramfs.build_archive(entries) == once
    assert once[:2] == b"\x1f\x8b" and once[4:8] == b"\0\0\0\0"  # RFC 1952 MTIME: unset
    members = parse_newc(tool(["gzip", "-dc"], once))
    assert {m["mtime"] for m in members} == {0}
    # Inodes 1..n in archive order; the one hard-link pair shares one.
    assert sorted({int(m["ino"]) for m in members}) == list(range(1, len(members)))
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    stamped = parse_newc(tool(["gzip", "-dc"], initramfs.build_archive(entries)))
    assert {m["mtime"] for m in stamped} == {1700000000}


@pytest.mark.integration
def test_build_archive_writes_symlink_targets_and_devices(tmp_path: Path) -> None:
    built = initramfs.build_archive(
        [
            Entry.directory("bin"),
            Entry.symlink("bin/sh", "/bin/busybox"),
            Entry.symlink("sbin", "bin"),
            Entry("console", "chardev", 0o600, rdevmajor=5, rdevminor=1),
            Entry.file("etc.txt", b"hello", uid=1000, gid=100),
        ],
        compression="none",
    )
    listing = tool(["cpio", "-tv", "--quiet", "--numeric-uid-gid"], built).decode()
    assert "bin/sh -> /bin/busybox" in listing
    assert "sbin -> bin" in listing
    assert "5,   1" in listing
    assert " 1000     100 " in listing
    assert len(built) % 4 == 0


@pytest.mark.integration
@pytest.mark.parametrize(
    ("compression", "decompress"),
    [
        ("gzip", ["gzip", "-dc"]),
        ("xz", ["xz", "-dc"]),
        ("zstd", ["zstd", "-dc"]),
        ("lz4", ["lz4", "-dc"]),
        ("none", ["cat"]),
    ],
)
def test_build_archive_compressions_are_read_by_their_tools(
    compression: str, decompress: list[str]
) -> None:
    noise = random.Random(1).randbytes(5 << 20)  # incompressible, several lz4 blocks
    built = initramfs.build_archive(
        [Entry.file("noise", noise), Entry.file("text", b"abc" * 100000)],
        compression=compression,
        level=1 if compression != "none" else None,
    )
    assert detect_compression(built) == compression
    members = parse_newc(tool(decompress, built))
    assert [(m["name"], m["body"]) for m in members] == [
        ("noise", noise),
        ("text", b"abc" * 100000),
    ]


@pytest.mark.integration
def test_build_archive_xz_check_from_file(tmp_path: Path) -> None:
    path = tmp_path / "a.xz"
    path.write_bytes(initramfs.build_archive([Entry.file("a", b"x")], compression="xz"))
    listing = tool(["xz", "-lvv", str(path)]).decode()
    assert "CRC32" in listing
    assert "CRC64" not in listing


# --- patching --------------------------------------------------------------------------

ADDITIONS = [
    Entry.file("init", NEW_INIT, mode=0o755),
    Entry.file("init.scw", OLD_INIT, mode=0o755),
    Entry.directory("usr/lib/modules"),
    Entry.directory("usr/lib/modules/6.6.1-arch1"),
    Entry.file("usr/lib/modules/6.6.1-arch1/nbd.ko", b"\x7fELF nbd module", mode=0o644),
]


@pytest.mark.integration
@needs_root
def test_patch_appends_a_second_archive(provider: tuple[Path, bytes, bytes]) -> None:
    _tree, _archive, payload = provider
    patched = initramfs.patch(payload, ADDITIONS, source="uInitrd")
    assert patched[: len(payload)] == payload
    tail = patched[len(payload) :]
    padding = len(tail) - len(tail.lstrip(b"\0"))
    assert (len(payload) + padding) % 4 == 0 and padding < 4
    # Each segment decompresses on its own with gzip; the second lists exactly the additions.
    assert tool(["gzip", "-dc"], payload) == provider[1]
    listing = (
        tool(["cpio", "-tv", "--quiet", "--numeric-uid-gid"], tool(["gzip", "-dc"], tail[padding:]))
        .decode()
        .splitlines()
    )
    assert [line.split()[-1] for line in listing] == [
        "init",
        "init.scw",
        "usr/lib/modules",
        "usr/lib/modules/6.6.1-arch1",
        "usr/lib/modules/6.6.1-arch1/nbd.ko",
    ]
    assert [line.split()[0] for line in listing] == [
        "-rwxr-xr-x",
        "-rwxr-xr-x",
        "drwxr-xr-x",
        "drwxr-xr-x",
        "-rw-r--r--",
    ]


@pytest.mark.integration
@needs_root
def test_patched_tree_has_the_new_init(provider: tuple[Path, bytes, bytes]) -> None:
    _tree, _archive, payload = provider
    patched = initramfs.patch(payload, ADDITIONS, source="uInitrd")
    before = cpio.merged_view(initramfs.read_entries(payload, source="o"))
    after = cpio.merged_view(
        initramfs.read_entries(patched, source="p", with_data=lambda p: p.startswith("init"))
    )
    assert after["init"].data == NEW_INIT
    assert after["init.scw"].data == OLD_INIT
    assert "init.scw" not in before
    unchanged = {k: v for k, v in after.items() if k in before and k != "init"}
    assert unchanged == {k: v for k, v in before.items() if k != "init"}
    assert initramfs.read_file(patched, "init", "p") == NEW_INIT


@pytest.mark.integration
@needs_root
def test_patched_initrd_unpacked_by_gnu_cpio_keeps_the_provider_tree(
    provider: tuple[Path, bytes, bytes], tmp_path: Path
) -> None:
    tree, _archive, payload = provider
    patched = initramfs.patch(payload, ADDITIONS, source="uInitrd")
    out = tmp_path / "out"
    out.mkdir()
    tail = patched[len(payload) :].lstrip(b"\0")
    for segment in (payload, tail):
        tool(
            ["cpio", "-idmu", "--quiet", "--no-absolute-filenames"],
            tool(["gzip", "-dc"], segment),
            cwd=out,
        )
    got, want = snapshot(out), snapshot(tree)
    assert (out / "init").read_bytes() == NEW_INIT
    assert (out / "init.scw").read_bytes() == OLD_INIT
    new = {
        "init",
        "init.scw",
        "usr/lib/modules",
        "usr/lib/modules/6.6.1-arch1",
        "usr/lib/modules/6.6.1-arch1/nbd.ko",
    }
    assert set(got) - set(want) == new - {"init"}
    assert {k: v for k, v in got.items() if k not in new} == {
        k: v for k, v in want.items() if k != "init"
    }


@pytest.mark.integration
@needs_root
def test_kernel_model_shows_why_a_hard_linked_init_is_unlinked_first(
    provider_linked_init: tuple[Path, bytes], tmp_path: Path
) -> None:
    _tree, payload = provider_linked_init
    assert cpio.original_init(initramfs.read_entries(payload, source="o")).nlink == 2

    naive = (
        payload
        + cpio.padding_for(len(payload))
        + initramfs.build_archive([Entry.file("init", NEW_INIT, mode=0o755)])
    )
    kernel_unpack(naive, naive_root := tmp_path / "naive")  # control: the hazard is real
    assert (naive_root / "linuxrc").read_bytes() == NEW_INIT

    patched = initramfs.patch(payload, ADDITIONS, source="uInitrd")
    kernel_unpack(patched, root := tmp_path / "patched")
    assert (root / "init").read_bytes() == NEW_INIT
    assert (root / "linuxrc").read_bytes() == OLD_INIT
    assert (root / "init.scw").read_bytes() == OLD_INIT
    assert not (root / "init").is_symlink()
    assert (root / "init").stat().st_nlink == 1


@pytest.mark.integration
@needs_root
def test_kernel_model_unpacks_the_patched_provider_tree(
    provider: tuple[Path, bytes, bytes], tmp_path: Path
) -> None:
    _tree, _archive, payload = provider
    patched = initramfs.patch(payload, ADDITIONS, source="uInitrd", compression="none")
    assert initramfs.read_segments(patched, source="p")[-1].offset % 4 == 0
    kernel_unpack(patched, root := tmp_path / "root")
    assert (root / "init").read_bytes() == NEW_INIT
    assert (root / "usr/lib/modules/6.6.1-arch1/nbd.ko").read_bytes() == b"\x7fELF nbd module"
    assert os.readlink(root / "bin/sh") == "/bin/busybox"


@pytest.mark.integration
@needs_root
def test_patch_refuses_additions_through_provider_symlinks(
    provider: tuple[Path, bytes, bytes],
) -> None:
    _tree, _archive, payload = provider
    with pytest.raises(UserError) as caught:
        initramfs.patch(payload, [Entry.file("bin/sh/x", b"x")], source="uInitrd")
    assert "symlink in uInitrd -> '/bin/busybox'" in caught.value.message


@pytest.mark.integration
@needs_root
def test_patch_refuses_to_append_to_legacy_lz4(provider: tuple[Path, bytes, bytes]) -> None:
    _tree, archive, _payload = provider
    legacy = tool(["lz4", "-q", "-l", "-c"], archive)
    with pytest.raises(UserError, match="legacy lz4"):
        initramfs.patch(legacy, ADDITIONS, source="uInitrd")


def test_patch_refuses_a_corrupt_original(guard: Path) -> None:
    with pytest.raises(UserError, match="corrupt or truncated"):
        initramfs.patch(b"\x1f\x8b\x08\x00broken", ADDITIONS, source="uInitrd")


# --- decompression bombs ---------------------------------------------------------------


def zeros_archive(size: int) -> Iterator[bytes]:
    """A newc archive holding one file of `size` zero bytes, in pieces of at most 1 MiB."""
    name = b"zeros\0"
    fields = (1, stat.S_IFREG | 0o644, 0, 0, 1, 0, size, 0, 0, 0, 0, len(name), 0)
    head = b"070701" + b"".join(b"%08X" % f for f in fields) + name
    yield head + b"\0" * (-len(head) % 4)
    chunk = bytes(MiB)
    for start in range(0, size, MiB):
        yield chunk[: min(MiB, size - start)]
    yield b"\0" * (-size % 4) + newc([])


STREAM_COMPRESSORS: dict[str, Callable[[], Any]] = {
    "gzip": lambda: zlib.compressobj(9, zlib.DEFLATED, 31),
    "xz": lambda: lzma.LZMACompressor(lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, preset=0),
    "lzma": lambda: lzma.LZMACompressor(lzma.FORMAT_ALONE, preset=0),
    "bzip2": lambda: bz2.BZ2Compressor(9),
}
TOOL_COMPRESSORS = {"zstd": ["zstd", "-q", "-c"], "lz4": ["lz4", "-q", "-l", "-c"]}


def compressed(pieces: Iterable[bytes], compression: str) -> bytes:
    """`pieces` as one member of `compression`, never holding them all (for the stdlib's)."""
    if compression in TOOL_COMPRESSORS:
        return tool(TOOL_COMPRESSORS[compression], b"".join(pieces))
    compressor = STREAM_COMPRESSORS[compression]()
    return b"".join([*(compressor.compress(p) for p in pieces), compressor.flush()])


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    """A few KiB of gzip or bzip2 that unpack to a 36 MiB archive (zeros): over the ratio."""
    return {c: compressed(zeros_archive(36 * MiB), c) for c in ("gzip", "bzip2")}


@pytest.mark.parametrize("compression", ["gzip", "bzip2"])
def test_a_decompression_bomb_is_refused_within_the_default_limits(
    bombs: dict[str, bytes], compression: str
) -> None:
    payload = bombs[compression]
    assert len(payload) < 64 * KiB
    with pytest.raises(UserError) as caught:
        initramfs.read_entries(payload, source="bomb")
    assert caught.value.message == (
        f"payload of bomb ({len(payload)} bytes) unpacks to more than 32 MiB, over 100 times "
        f"its size ({compression} data at byte 0): a decompression bomb or a damaged initrd"
    )
    assert caught.value.hint == (
        "a real initrd unpacks to a few times its size; if this one is genuine, raise the "
        "limits (scaleway.max_initrd_unpacked, scaleway.max_initrd_ratio)"
    )


def test_patch_and_read_file_refuse_a_bomb_too(bombs: dict[str, bytes]) -> None:
    with pytest.raises(UserError, match="unpacks to more than 32 MiB"):
        initramfs.patch(bombs["gzip"], [Entry.file("x", b"x")], source="bomb")
    with pytest.raises(UserError, match="unpacks to more than 32 MiB"):
        initramfs.read_file(bombs["gzip"], "zeros", "bomb")


@pytest.mark.parametrize("compression", ["gzip", "xz", "lzma", "bzip2", "zstd", "lz4"])
def test_every_compression_stops_at_the_size_limit(compression: str) -> None:
    payload = compressed(zeros_archive(2 * MiB), compression)
    with pytest.raises(UserError) as caught:
        initramfs.read_entries(payload, source="p", max_unpacked=1 * MiB)
    assert caught.value.message == (
        f"payload of p ({len(payload)} bytes) unpacks to more than 1 MiB, the limit "
        f"({compression} data at byte 0): a decompression bomb or a damaged initrd"
    )


def test_the_size_limit_counts_every_member() -> None:
    first = compressed(zeros_archive(700 * KiB), "gzip")
    second = compressed(zeros_archive(700 * KiB), "xz")
    with pytest.raises(UserError) as caught:
        initramfs.read_entries(first + second, source="p", max_unpacked=1 * MiB)
    assert f"the limit (xz data at byte {len(first)})" in caught.value.message


@pytest.mark.parametrize("compression", ["gzip", "xz", "bzip2", "zstd"])
def test_a_payload_that_unpacks_to_exactly_the_limit_is_read(compression: str) -> None:
    # 3 MiB exactly (240 bytes of headers and trailer): the end comes with a full chunk.
    archive = b"".join(zeros_archive(3 * MiB - 240))
    assert len(archive) == 3 * MiB
    payload = compressed([archive], compression)
    (entry,) = initramfs.read_entries(payload, source="p", max_unpacked=3 * MiB)
    assert (entry.path, entry.size) == ("zeros", 3 * MiB - 240)
    with pytest.raises(UserError, match="the limit"):
        initramfs.read_entries(payload, source="p", max_unpacked=3 * MiB - 1)


def test_a_small_archive_may_compress_very_well() -> None:
    # 2 MiB of zeros in a few KiB: far over the ratio, but under RATIO_EXEMPT.
    payload = compressed(zeros_archive(2 * MiB), "bzip2")
    assert len(payload) * initramfs.MAX_RATIO < 2 * MiB
    assert [e.path for e in initramfs.read_entries(payload, source="p")] == ["zeros"]
