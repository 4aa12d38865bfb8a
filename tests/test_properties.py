"""Property-based tests of the parsers that read what comes from outside (hypothesis).

Bootscripts, initrds and their cpio archives arrive over TFTP at boot; modules.dep and
modules.softdep come with a kernel package; sha256sums.txt is unsigned. Whatever bytes
they hold, each parser must end in a result or a UserError, never in another exception,
and a cpio archive it accepts must never place an entry outside the tree it unpacks to.

Inputs are small (the work each example causes is bounded by its size), and the number
of examples is the hypothesis profile's: `ci` (the default, registered in conftest.py) or,
for a long run, `HYPOTHESIS_PROFILE=nightly pytest tests/test_properties.py`.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import re
import stat
import tempfile
from collections.abc import Callable
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from archkernel.azure import bootstrap
from archkernel.errors import UserError
from archkernel.formats import compression, cpio, initramfs, kmod, uimage
from archkernel.scaleway import bootscript

T = TypeVar("T")


def result_or_user_error(call: Callable[[], T]) -> T | UserError:
    """What `call` returns, or the UserError it raises; any other exception fails the test."""
    try:
        result = call()
    except UserError as exc:
        assert exc.message  # a message to show, and it is the whole error
        event("UserError")
        return exc
    event("result")
    return result


# Any character that matters to a parser (an explicit alphabet: no Unicode tables needed).
ANY_TEXT = "".join(map(chr, range(128))) + "\u00a0\u00e9\u2028\u3000\U0001f600\udcff"


def texts(tokens: list[str], max_size: int = 40) -> st.SearchStrategy[str]:
    """Text made of `tokens`: closer to the real thing than random characters."""
    return st.lists(st.sampled_from(tokens), max_size=max_size).map("".join)


# --- U-Boot images ----------------------------------------------------------------------------

HEADER_FIELDS = st.fixed_dictionaries(
    {
        "type": st.integers(0, 255),
        "arch": st.integers(0, 255),
        "os": st.integers(0, 255),
        "comp": st.integers(0, 255),
        "load": st.integers(0, 0xFFFFFFFF),
        "entry": st.integers(0, 0xFFFFFFFF),
        "timestamp": st.integers(0, 0xFFFFFFFF),
        "name": st.text(alphabet="abc-_. \u00e9", max_size=12),
    }
)


@st.composite
def uimages(draw: st.DrawFn) -> bytes:
    """Real images, then perhaps cut short, extended or with one byte changed."""
    payload = draw(st.binary(max_size=96))
    if draw(st.booleans()):  # a script image's length table, possibly lying
        lengths = draw(st.lists(st.integers(0, 200), max_size=3))
        payload = b"".join(n.to_bytes(4, "big") for n in lengths) + payload
    fields: dict[str, Any] = draw(HEADER_FIELDS)
    image = bytearray(uimage.build(payload, **fields))
    how = draw(st.sampled_from(["keep", "cut", "extend", "flip"]))
    if how == "cut":
        del image[draw(st.integers(0, len(image))) :]
    elif how == "extend":
        image += draw(st.binary(max_size=16))
    elif how == "flip":
        at = draw(st.integers(0, len(image) - 1))
        image[at] ^= draw(st.integers(1, 255))
    return bytes(image)


@given(st.one_of(st.binary(max_size=200), uimages()), st.sampled_from([None, uimage.SCRIPT]))
def test_uimage_parse_ends_in_an_image_or_a_user_error(data: bytes, expect: int | None) -> None:
    parsed = result_or_user_error(lambda: uimage.parse(data, expect_type=expect, source="x"))
    if isinstance(parsed, UserError):
        return
    header, payload = parsed
    assert len(payload) == header.size and payload == data[64 : 64 + header.size]
    assert expect is None or header.type == expect
    text = result_or_user_error(lambda: uimage.script_text(payload, "x"))
    assert isinstance(text, (str, UserError))


@given(st.text(alphabet="tfp 0x2\n;$'\"#\0\u00e9", max_size=60), st.integers(0, 0xFFFFFFFF))
def test_uimage_script_images_round_trip(text: str, timestamp: int) -> None:
    image = uimage.build_script(text, timestamp=timestamp)
    _header, payload = uimage.parse(image, expect_type=uimage.SCRIPT)
    if text.rstrip("\0"):
        assert uimage.script_text(payload) == text.rstrip("\0")


# --- compression detection and frame walking ------------------------------------------------

MAGICS = [
    b"",
    compression.GZIP_MAGIC,
    compression.XZ_MAGIC,
    compression.ZSTD_MAGIC,
    compression.LZ4_LEGACY_MAGIC,
    compression.LZ4_FRAME_MAGIC,
    compression.BZIP2_MAGIC,
    compression.LZMA_MAGIC,
    b"070701",
    b"070707",
]


@given(st.sampled_from(MAGICS), st.binary(max_size=64))
def test_compression_detection_and_frame_ends(magic: bytes, rest: bytes) -> None:
    data = magic + rest
    found = result_or_user_error(lambda: compression.detect_compression(data, source="x"))
    assert isinstance(found, UserError) or found in compression.COMPRESSIONS
    for walk in (
        lambda: compression.zstd_frame_end(data, 0, source="x"),
        lambda: compression.lz4_frame_blocks(data, 0, source="x")[1],
    ):
        end = result_or_user_error(walk)
        assert isinstance(end, UserError) or 0 < end <= len(data)


# --- cpio archives and initrd payloads --------------------------------------------------------

TYPES = {
    "file": stat.S_IFREG,
    "dir": stat.S_IFDIR,
    "symlink": stat.S_IFLNK,
    "fifo": stat.S_IFIFO,
    "chardev": stat.S_IFCHR,
    "weird": 0o170000,  # no such file type
}
# Path pieces: mostly ordinary names, sometimes anything that could escape or alias the tree.
PLAIN_PARTS = ["a", "b", "init", "lib", "usr"]
HOSTILE_PARTS = ["/", "..", ".", "", "./", "../", "a/..", "//", "\n", "é"]
TARGETS = ["a", "b", "lib", "usr/lib", "/", "..", "../..", "/etc", "a/b", ".", "/tmp/x"]


@st.composite
def members(draw: st.DrawFn, hostile: bool) -> tuple[str, int, bytes, int, int]:
    """(name, mode, body, nlink, ino) of one newc member; a `hostile` one may be anything."""
    parts = st.sampled_from(PLAIN_PARTS + HOSTILE_PARTS if hostile else PLAIN_PARTS)
    pieces = draw(st.lists(parts, min_size=1, max_size=3))
    name = "".join(pieces) if hostile and draw(st.booleans()) else "/".join(pieces)
    if draw(st.integers(0, 4)) == 0:
        name = draw(st.sampled_from(["./", "/"] if hostile else ["./"])) + name
    sane = ["file", "file", "dir", "dir", "symlink"]
    kind = draw(st.sampled_from([*sane, *TYPES] if hostile else sane))
    if kind == "symlink":
        body = draw(st.sampled_from(TARGETS)).encode()
    elif kind == "file":
        body = draw(st.binary(max_size=8))
    else:
        body = b""
    nlink = draw(st.sampled_from([1, 1, 1, 2, 3] if hostile else [1]))
    ino = draw(st.integers(1, 4))
    return name, TYPES[kind] | 0o644, body, nlink, ino


def newc(items: list[tuple[str, int, bytes, int, int]], trailer: bool) -> bytes:
    """Hand-made newc bytes: tools refuse to write most of these archives."""
    out = bytearray()
    for name, mode, body, nlink, ino in [*items, *([("TRAILER!!!", 0, b"", 1, 0)] * trailer)]:
        raw = name.encode("utf-8", "surrogateescape") + b"\0"
        fields = (ino, mode, 0, 0, nlink, 0, len(body), 0, 0, 1, 3, len(raw), 0)
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + raw
        out += b"\0" * (-len(out) % 4) + body
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


COMPRESS: dict[str, Callable[[bytes], bytes]] = {
    "none": lambda data: data,
    "gzip": lambda data: gzip.compress(data, mtime=0),
    "bzip2": bz2.compress,
    "xz": lambda data: lzma.compress(data, check=lzma.CHECK_CRC32),
    "lzma": lambda data: lzma.compress(data, format=lzma.FORMAT_ALONE),
}


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    """One to three archives, each plain or compressed, perhaps damaged at the end."""
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        trailer = draw(st.integers(0, 9)) > 0
        hostile = draw(st.integers(0, 3)) == 0
        archive = newc(draw(st.lists(members(hostile), min_size=1, max_size=8)), trailer=trailer)
        parts.append(COMPRESS[draw(st.sampled_from(list(COMPRESS)))](archive))
        parts.append(b"\0" * (-sum(map(len, parts)) % 4) + b"\0" * draw(st.sampled_from([0, 4])))
    payload = b"".join(parts)
    if draw(st.integers(0, 9)) == 0:
        payload = payload[: draw(st.integers(0, len(payload)))]
    return payload


def check_tree(entries: list[cpio.Entry]) -> None:
    """Paths are normalised, and no entry goes through a symlink or below a non-directory."""
    tree: dict[str, cpio.Entry] = {}
    for entry in entries:
        parts = entry.path.split("/")
        assert entry.path == "." or not {"", ".", ".."} & set(parts), entry.path
        assert not entry.path.startswith("/") and "\0" not in entry.path
        assert "\n" not in entry.path
        if entry.hardlink:
            assert entry.linkpath in tree
        for i in range(1, len(parts)):
            above = tree.get("/".join(parts[:i]))
            assert above is None or above.type == "dir", (entry.path, above)
        tree[entry.path] = entry


def unpack_like_the_kernel(entries: list[cpio.Entry], root: Path) -> None:
    """Apply `entries` under `root` as the kernel does, asserting that each lands inside."""
    real_root = os.path.realpath(root)
    for entry in entries:
        if entry.path == ".":
            assert entry.type == "dir"
            continue
        target = root / entry.path
        # Where the kernel's open/mkdir/symlink call would act, symlinks resolved.
        where = os.path.realpath(target.parent)
        assert where == os.path.normpath(os.path.join(real_root, os.path.dirname(entry.path)))
        if not target.parent.is_dir():
            continue  # the kernel's call fails: nothing is written
        if target.is_symlink() or (target.exists() and target.is_dir() != (entry.type == "dir")):
            target.rmdir() if target.is_dir() and not target.is_symlink() else target.unlink()
        if entry.type == "dir":
            target.mkdir(exist_ok=True)
        elif entry.type == "symlink":
            if not target.exists() and not target.is_symlink():
                os.symlink(entry.linkpath or "", target)
        elif entry.hardlink and entry.linkpath and (root / entry.linkpath).is_file():
            if not target.exists():
                os.link(root / entry.linkpath, target)
        elif not target.exists() or target.is_file():
            target.write_bytes(entry.data or b"")


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(payloads())
def test_initrd_payloads_are_read_or_refused_and_never_escape(payload: bytes) -> None:
    read = result_or_user_error(
        lambda: initramfs.read_entries(
            payload, source="p", with_data=lambda _path: True, max_unpacked=1 << 20
        )
    )
    if isinstance(read, UserError):
        return
    check_tree(read)
    for entry in read:
        assert entry.data is None or entry.type == "file"
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "root").mkdir()
        unpack_like_the_kernel(read, Path(scratch) / "root")
        assert sorted(os.listdir(scratch)) == ["root"]


@given(st.sampled_from(MAGICS), st.binary(max_size=300))
def test_initrd_reading_of_any_bytes_ends_in_entries_or_a_user_error(
    magic: bytes, rest: bytes
) -> None:
    read = result_or_user_error(
        lambda: initramfs.read_entries(magic + rest, source="p", max_unpacked=1 << 20)
    )
    if not isinstance(read, UserError):
        check_tree(read)


# --- modules.dep and modules.softdep ----------------------------------------------------------

DEP_TOKENS = [
    "kernel/",
    "a",
    "b",
    "c-d",
    "e_f",
    ".ko",
    ".ko.zst",
    ".ko.xz",
    ":",
    " ",
    "\t",
    "\n",
    "../",
    "/",
    "$(x)",
    "#",
    "*",
    "é",
]
SOFTDEP_TOKENS = [
    "softdep ",
    "a",
    "b",
    "c-d",
    "e_f",
    "*",
    "?",
    "[ab]",
    " ",
    "pre: ",
    "post: ",
    "\n",
]
NAMES = ["a", "b", "c-d", "c_d", "e_f", "x", "*", ""]


@given(texts(DEP_TOKENS), texts(SOFTDEP_TOKENS), st.lists(st.sampled_from(NAMES), max_size=3))
def test_module_index_text_ends_in_an_order_or_a_user_error(
    dep: str, softdep: str, names: list[str]
) -> None:
    index = result_or_user_error(lambda: kmod.ModulesDep.parse(dep, softdep, "kernel/x.ko\n"))
    if isinstance(index, UserError):
        return
    order = result_or_user_error(lambda: index.closure(names))
    if isinstance(order, UserError):
        return
    assert len(order) == len(set(order))
    for path in order:
        assert kmod.check_module_path(path) == path


MODULES = [f"m{i}" for i in range(6)]


@st.composite
def module_graphs(
    draw: st.DrawFn,
) -> tuple[dict[str, list[str]], list[tuple[str, list[str], list[str]]], set[str]]:
    """Modules with any dependencies, softdep lines (patterns, cycles) and built-ins."""
    deps = {m: draw(st.lists(st.sampled_from(MODULES), max_size=3)) for m in MODULES}
    patterns = st.sampled_from([*MODULES, "m*", "m[0-2]", "*", "x*"])
    names = st.lists(st.sampled_from([*MODULES, "built", "nothing"]), max_size=3)
    softdeps = draw(st.lists(st.tuples(patterns, names, names), max_size=6))
    builtin = draw(st.sets(st.sampled_from(["built", "m5"])))
    return deps, softdeps, builtin


def reference_closure(
    deps: dict[str, list[str]],
    softdeps: list[tuple[str, list[str], list[str]]],
    builtin: set[str],
    names: list[str],
) -> list[str]:
    """kmod's recursion as kmod writes it, for small graphs (see archkernel.formats.kmod)."""
    loadable = {m for m in deps if m not in builtin}

    def lookup(name: str) -> list[str]:
        return [name] if name in loadable or name in builtin else []

    def soft(module: str) -> tuple[list[str], list[str]]:
        for pattern, pre, post in softdeps:
            if fnmatchcase(module, pattern):
                return [m for n in pre for m in lookup(n)], [m for n in post for m in lookup(n)]
        return [], []

    result: dict[str, None] = {}
    for name in names:
        for module in lookup(name):
            order: list[str] = []
            visited: set[str] = set()

            def with_softdeps(
                m: str, order: list[str] = order, visited: set[str] = visited
            ) -> None:
                pre, post = soft(m)
                for s in pre:
                    probe(s, order, visited)
                if m not in builtin:
                    order.append(m)
                for s in post:
                    probe(s, order, visited)

            def probe(m: str, order: list[str], visited: set[str]) -> None:
                if m in visited:
                    return
                visited.add(m)
                for dep in reversed(deps.get(m, []) if m in loadable else []):
                    with_softdeps(dep, order, visited)
                with_softdeps(m, order, visited)

            probe(module, order, visited)
            result.update(dict.fromkeys(f"kernel/{m}.ko" for m in order))
    return list(result)


@given(module_graphs(), st.lists(st.sampled_from(MODULES), min_size=1, max_size=3))
def test_module_order_is_kmods_recursion(graph: Any, names: list[str]) -> None:
    deps, softdeps, builtin = graph
    loadable = [m for m in MODULES if m not in builtin]
    assume(all(n in loadable for n in names))
    dep_text = "".join(
        f"kernel/{m}.ko: {' '.join(f'kernel/{d}.ko' for d in deps[m] if d in loadable)}\n"
        for m in loadable
    )
    softdep_text = "".join(
        f"softdep {pattern} pre: {' '.join(pre)} post: {' '.join(post)}\n"
        for pattern, pre, post in softdeps
    )
    index = kmod.ModulesDep.parse(dep_text, softdep_text, "".join(f"{b}.ko\n" for b in builtin))
    usable = {m: [d for d in deps[m] if d in loadable] for m in loadable}
    assert index.closure(names) == reference_closure(usable, softdeps, builtin, names)


@given(st.one_of(texts(SOFTDEP_TOKENS, max_size=60), st.text(alphabet=ANY_TEXT, max_size=200)))
def test_softdep_text_always_parses(text: str) -> None:
    for softdep in kmod.parse_softdeps(text):
        assert softdep.pattern and " " not in softdep.pattern


# --- bootscripts ------------------------------------------------------------------------------

SCRIPT_TOKENS = [
    "setenv ",
    "env set ",
    "tftp ",
    "tftpboot ",
    "bootm ",
    "bootz ",
    "a ",
    "rd ",
    "${a}",
    "$rd",
    "${",
    "0x2000000 ",
    "0x200000 ",
    "initrd/x",
    "zImage ",
    "10.1.31.34:",
    "../",
    "/",
    " ",
    "\t",
    ";",
    "'",
    '"',
    "\\",
    "#",
    "\n",
    "\r\n",
    "-",
    ":",
]


def safe_initrd_name(name: str) -> bool:
    return bool(name.strip()) and not name.startswith("/") and ".." not in name.split("/")


WORDS = {
    "var": ["a", "rd", "initrd_addr", "p"],
    "address": ["0x2000000", "0x02000000", "0x200000", "${a}", "$rd", "${ramdisk_addr_r}", "-"],
    "path": ["initrd/x", "zImage", "${p}", "10.1.31.34:initrd/y", "../x", "/abs", "a;b", ""],
}


@st.composite
def bootscripts(draw: st.DrawFn) -> str:
    """Commands as bootscripts hold them, with their words quoted, joined and commented."""

    def word(kind: str) -> str:
        text = draw(st.sampled_from(WORDS[kind]))
        quote = draw(st.sampled_from(["", "", "'", '"', "\\"]))
        return f"{quote}{text}{quote}" if quote != "\\" else text.replace(";", "\\;")

    commands = []
    for _ in range(draw(st.integers(1, 8))):
        shape = draw(st.sampled_from(["setenv", "env", "tftp", "tftp1", "bootm", "junk"]))
        if shape == "setenv":
            commands.append(f"setenv {word('var')} {word(draw(st.sampled_from(list(WORDS))))}")
        elif shape == "env":
            commands.append(f"env set {word('var')} {word('address')}")
        elif shape == "tftp":
            commands.append(
                f"{draw(st.sampled_from(['tftp', 'tftpboot']))} {word('address')} {word('path')}"
            )
        elif shape == "tftp1":
            commands.append(f"tftp {word('path')}")
        elif shape == "bootm":
            commands.append(f"bootm {word('address')} {word('address')} {word('address')}")
        else:
            commands.append(draw(texts(SCRIPT_TOKENS, max_size=8)))
    separators = st.sampled_from(["\n", "; ", ";", "\r\n", " # note\n", "\n\t"])
    return "".join(f"{command}{draw(separators)}" for command in commands)


@given(
    st.one_of(
        bootscripts(),
        texts(SCRIPT_TOKENS, max_size=60),
        st.text(alphabet=ANY_TEXT, max_size=200),
    )
)
def test_bootscript_text_ends_in_a_safe_name_or_a_user_error(text: str) -> None:
    name = result_or_user_error(lambda: bootscript.initrd_from_bootscript(text))
    assert isinstance(name, UserError) or safe_initrd_name(name)


@given(
    st.one_of(
        st.binary(max_size=200),
        uimages(),
        bootscripts().map(lambda text: uimage.build_script(text, timestamp=0)),
    )
)
def test_bootscript_images_end_in_a_safe_name_or_a_user_error(data: bytes) -> None:
    name = result_or_user_error(lambda: bootscript.initrd_from_image(data, source="b"))
    assert isinstance(name, UserError) or safe_initrd_name(name)


# --- sha256sums.txt ---------------------------------------------------------------------------

SUMS_TOKENS = [
    "a" * 64,
    "F" * 64,
    "0" * 63,
    "g",
    " ",
    "  ",
    "\t",
    "*",
    "./",
    "x.tar.zst",
    "\n",
    "\r",
    "\x0b",
    "\x1c",
    "\u00a0",
    "\u2028",
]


def sums_by_pattern(text: str) -> dict[str, str]:
    """The regular expression the parser used before it became linear (for small inputs)."""
    sums = {}
    for line in text.splitlines():
        m = re.fullmatch(r"\s*([0-9a-fA-F]{64})\s+\*?(\S.*?)\s*", line)
        if m:
            sums[m.group(2).lstrip("./")] = m.group(1).lower()
    return sums


@given(st.one_of(texts(SUMS_TOKENS, max_size=30), st.text(alphabet=ANY_TEXT, max_size=200)))
def test_sha256sums_parse_any_text_like_the_pattern_did(text: str) -> None:
    sums = bootstrap.parse_sha256sums(text)
    assert sums == sums_by_pattern(text)
    assert all(re.fullmatch("[0-9a-f]{64}", digest) for digest in sums.values())
