"""U-Boot legacy images: parsing, building, script images; cross-checked with u-boot-tools."""

from __future__ import annotations

import os
import re
import struct
import zlib
from datetime import UTC, datetime
from pathlib import Path

import pytest

from archkernel.errors import UserError
from archkernel.formats import uimage
from archkernel.host.run import run

EPOCH = 1_000_000_000  # 2001-09-09 01:46:40 UTC
SCRIPT = "setenv bootargs console=ttyS0\ntftp 0x01000000 initrd/uInitrd-Linux-armv7l-v2.3.4\n"

# A ramdisk image written out by hand from the table in formats.md, independent of
# uimage.build: header then payload b"abc".
_PAYLOAD = b"abc"
_NAME = b"hand made".ljust(32, b"\0")


def _hand_made(type_code: int = 3) -> bytes:
    def header(crc: int) -> bytes:
        return (
            bytes.fromhex("27051956")
            + crc.to_bytes(4, "big")
            + EPOCH.to_bytes(4, "big")
            + len(_PAYLOAD).to_bytes(4, "big")
            + (0x1000).to_bytes(4, "big")
            + (0x2000).to_bytes(4, "big")
            + zlib.crc32(_PAYLOAD).to_bytes(4, "big")
            + bytes([5, 2, type_code, 0])
            + _NAME
        )

    return header(zlib.crc32(header(0))) + _PAYLOAD


def _mkimage(tmp_path: Path, payload: bytes, *args: str) -> bytes:
    src = tmp_path / "payload"
    src.write_bytes(payload)
    out = tmp_path / "out.img"
    run(
        ["mkimage", "-A", "arm", "-O", "linux", "-C", "none", *args, "-d", src, out],
        env={"SOURCE_DATE_EPOCH": str(EPOCH)},
        capture=True,
    )
    return out.read_bytes()


def _mkimage_list(path: Path) -> dict[str, str]:
    out = run(["mkimage", "-l", path], capture=True, env={"TZ": "UTC"}).stdout
    return {
        key.strip(): value.strip()
        for key, _, value in (line.partition(":") for line in out.splitlines())
        if value
    }


# --- pure tests ---------------------------------------------------------------------------


def test_parse_hand_made_image() -> None:
    header, payload = uimage.parse(_hand_made())
    assert payload == b"abc"
    assert header.magic == 0x27051956
    assert (header.timestamp, header.size, header.load, header.entry) == (EPOCH, 3, 0x1000, 0x2000)
    assert (header.os, header.arch, header.type, header.comp) == (5, 2, 3, 0)
    assert header.name == "hand made"
    assert header.data_crc == zlib.crc32(b"abc")


def test_build_matches_hand_made_image() -> None:
    built = uimage.build(
        b"abc",
        type=uimage.RAMDISK,
        arch=uimage.ARM,
        load=0x1000,
        entry=0x2000,
        name="hand made",
        timestamp=EPOCH,
    )
    assert built == _hand_made()


def test_constants_match_formats_reference() -> None:
    assert (uimage.LINUX, uimage.ARM, uimage.I386) == (5, 2, 3)
    assert (uimage.KERNEL, uimage.RAMDISK, uimage.SCRIPT) == (2, 3, 6)
    assert (uimage.NONE, uimage.GZIP, uimage.LZMA, uimage.ZSTD) == (0, 1, 3, 6)


def test_parse_ignores_bytes_after_payload() -> None:
    header, payload = uimage.parse(_hand_made() + b"\0" * 100)
    assert payload == b"abc"
    assert header.size == 3


def test_name_of_32_bytes_has_no_nul() -> None:
    built = uimage.build(b"x", type=uimage.KERNEL, arch=uimage.ARM, name="n" * 32, timestamp=0)
    assert built[32:64] == b"n" * 32
    assert uimage.parse(built)[0].name == "n" * 32


def test_name_too_long_is_a_user_error() -> None:
    with pytest.raises(UserError, match="at most 32"):
        uimage.build(b"x", type=uimage.KERNEL, arch=uimage.ARM, name="n" * 33, timestamp=0)


@pytest.mark.parametrize(
    ("field", "value"),
    [("load", -1), ("entry", 1 << 32), ("timestamp", 1 << 32)],
)
def test_out_of_range_numbers_are_user_errors(field: str, value: int) -> None:
    numbers = {"load": 0, "entry": 0, "timestamp": 0, field: value}
    with pytest.raises(UserError, match="32 bits"):
        uimage.build(
            b"x",
            type=uimage.KERNEL,
            arch=uimage.ARM,
            load=numbers["load"],
            entry=numbers["entry"],
            timestamp=numbers["timestamp"],
        )


def test_short_file_is_a_user_error() -> None:
    with pytest.raises(UserError, match=r"uInitrd is 10 bytes, too short") as info:
        uimage.parse(b"\x27\x05\x19\x56" + b"\0" * 6, source="uInitrd")
    assert info.value.hint


def test_bad_magic_is_a_user_error() -> None:
    data = bytearray(_hand_made())
    data[0] = 0x28
    with pytest.raises(UserError, match=r"uInitrd is not a U-Boot legacy image \(magic 0x28051956"):
        uimage.parse(bytes(data), source="uInitrd")


def test_gzip_instead_of_uimage_gets_a_hint() -> None:
    with pytest.raises(UserError) as info:
        uimage.parse(b"\x1f\x8b\x08\x00" + b"\0" * 80, source="uInitrd")
    assert "not a U-Boot legacy image" in info.value.message
    assert info.value.hint is not None and "gzip" in info.value.hint


def test_bad_header_crc_is_a_user_error() -> None:
    data = bytearray(_hand_made())
    data[16] ^= 0x01  # load address
    with pytest.raises(UserError, match=r"uInitrd has a bad U-Boot header CRC"):
        uimage.parse(bytes(data), source="uInitrd")


def test_bad_data_crc_is_a_user_error() -> None:
    data = bytearray(_hand_made())
    data[-1] ^= 0xFF
    with pytest.raises(UserError, match=r"uInitrd has a bad payload CRC"):
        uimage.parse(bytes(data), source="uInitrd")


def test_truncated_payload_says_how_much_is_missing() -> None:
    with pytest.raises(
        UserError, match=r"uInitrd is truncated: .*3 payload bytes.*\(2 bytes missing\)"
    ):
        uimage.parse(_hand_made()[:-2], source="uInitrd")


def test_wrong_type_is_a_user_error() -> None:
    with pytest.raises(UserError, match=r"uInitrd is a U-Boot kernel image, expected a ramdisk"):
        uimage.parse(_hand_made(type_code=2), expect_type=uimage.RAMDISK, source="uInitrd")


def test_expected_type_passes() -> None:
    header, _ = uimage.parse(_hand_made(), expect_type=uimage.RAMDISK)
    assert header.type == 3


def test_parse_header_does_not_need_the_payload() -> None:
    header = uimage.parse_header(_hand_made()[:64])
    assert header.size == 3


def test_script_text_reads_first_component() -> None:
    text = b"echo one\n"
    payload = struct.pack(">II", len(text), 0) + text
    assert uimage.script_text(payload) == "echo one\n"


def test_script_text_strips_trailing_nuls_and_replaces_bad_utf8() -> None:
    text = b"echo \xff\n\0\0\0"
    payload = struct.pack(">II", len(text), 0) + text
    assert uimage.script_text(payload) == "echo \ufffd\n"


def test_script_text_multi_component_takes_the_first() -> None:
    # Two components: 5 bytes (padded to 8), then 3 bytes.
    payload = struct.pack(">III", 5, 3, 0) + b"first\0\0\0" + b"two"
    assert uimage.script_text(payload) == "first"


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        (b"", "no end to its length table"),
        (struct.pack(">I", 5), "no end to its length table"),
        (struct.pack(">I", 0) + b"text", "empty length table"),
        (struct.pack(">II", 100, 0) + b"short", "announces 108 bytes but the payload has 13"),
        (struct.pack(">III", 5, 3, 0) + b"first\0\0\0tw", "announces 23 bytes"),
    ],
)
def test_bad_script_tables_are_user_errors(payload: bytes, problem: str) -> None:
    with pytest.raises(UserError, match=rf"uboot\.bootscript.*{re.escape(problem)}"):
        uimage.script_text(payload, "uboot.bootscript")


def test_build_script_round_trips() -> None:
    image = uimage.build_script(SCRIPT, timestamp=EPOCH)
    header, payload = uimage.parse(image, expect_type=uimage.SCRIPT)
    assert (header.arch, header.os, header.comp) == (2, 5, 0)
    assert payload[:8] == struct.pack(">II", len(SCRIPT), 0)
    assert uimage.script_text(payload) == SCRIPT


# --- cross-checks with mkimage and dumpimage ------------------------------------------------


@pytest.mark.integration
def test_mkimage_ramdisk_parses_like_mkimage_lists_it(tmp_path: Path) -> None:
    payload = os.urandom(1001)
    image = _mkimage(tmp_path, payload, "-T", "ramdisk", "-a", "0x1000", "-e", "0x2000", "-n", "c1")
    header, parsed = uimage.parse(image, expect_type=uimage.RAMDISK)
    listed = _mkimage_list(tmp_path / "out.img")
    assert header.name == listed["Image Name"] == "c1"
    assert listed["Image Type"] == "ARM Linux RAMDisk Image (uncompressed)"
    assert (header.arch, header.os, header.type, header.comp) == (2, 5, 3, 0)
    assert header.size == int(listed["Data Size"].split()[0]) == 1001
    assert header.load == int(listed["Load Address"], 16) == 0x1000
    assert header.entry == int(listed["Entry Point"], 16) == 0x2000
    created = datetime.strptime(listed["Created"], "%a %b %d %H:%M:%S %Y").replace(tzinfo=UTC)
    assert header.timestamp == int(created.timestamp()) == EPOCH
    run(["dumpimage", "-T", "ramdisk", "-p", "0", "-o", tmp_path / "dumped", tmp_path / "out.img"])
    assert parsed == (tmp_path / "dumped").read_bytes() == payload


@pytest.mark.integration
def test_mkimage_script_text(tmp_path: Path) -> None:
    image = _mkimage(tmp_path, SCRIPT.encode(), "-T", "script")
    header, payload = uimage.parse(image, expect_type=uimage.SCRIPT)
    assert header.type == 6
    assert "ARM Linux Script" in _mkimage_list(tmp_path / "out.img")["Image Type"]
    run(["dumpimage", "-T", "script", "-p", "0", "-o", tmp_path / "dumped", tmp_path / "out.img"])
    assert payload == (tmp_path / "dumped").read_bytes()
    assert uimage.script_text(payload, "out.img") == SCRIPT


@pytest.mark.integration
@pytest.mark.parametrize("name", ["", "c1 initrd", "x" * 32])
@pytest.mark.parametrize("type_name", ["ramdisk", "kernel", "script"])
def test_build_is_byte_identical_to_mkimage(tmp_path: Path, type_name: str, name: str) -> None:
    payload = os.urandom(777) if type_name != "script" else SCRIPT.encode()
    expected = _mkimage(
        tmp_path, payload, "-T", type_name, "-a", "0x8000", "-e", "0x8040", "-n", name
    )
    if type_name == "script":
        payload = struct.pack(">II", len(payload), 0) + payload
    built = uimage.build(
        payload,
        type={"ramdisk": 3, "kernel": 2, "script": 6}[type_name],
        arch=uimage.ARM,
        load=0x8000,
        entry=0x8040,
        name=name,
        timestamp=EPOCH,
    )
    assert built == expected


@pytest.mark.integration
def test_build_script_is_byte_identical_to_mkimage(tmp_path: Path) -> None:
    assert uimage.build_script(SCRIPT, timestamp=EPOCH) == _mkimage(
        tmp_path, SCRIPT.encode(), "-T", "script"
    )


@pytest.mark.integration
def test_dumpimage_reads_what_build_writes(tmp_path: Path) -> None:
    payload = os.urandom(4096 + 3)
    image = tmp_path / "built.img"
    image.write_bytes(
        uimage.build(payload, type=uimage.RAMDISK, arch=uimage.ARM, name="ours", timestamp=EPOCH)
    )
    listed = _mkimage_list(image)
    assert listed["Image Name"] == "ours"
    assert listed["Image Type"] == "ARM Linux RAMDisk Image (uncompressed)"
    run(["dumpimage", "-T", "ramdisk", "-p", "0", "-o", tmp_path / "dumped", image])
    assert (tmp_path / "dumped").read_bytes() == payload


@pytest.mark.integration
@pytest.mark.parametrize(
    ("option", "value", "offset", "table"),
    [
        ("-A", "arm", 29, uimage.ARCH_NAMES),
        ("-A", "x86", 29, uimage.ARCH_NAMES),
        ("-A", "arm64", 29, uimage.ARCH_NAMES),
        ("-A", "x86_64", 29, uimage.ARCH_NAMES),
        ("-A", "riscv", 29, uimage.ARCH_NAMES),
        ("-T", "standalone", 30, uimage.TYPE_NAMES),
        ("-T", "kernel", 30, uimage.TYPE_NAMES),
        ("-T", "ramdisk", 30, uimage.TYPE_NAMES),
        ("-T", "multi", 30, uimage.TYPE_NAMES),
        ("-T", "firmware", 30, uimage.TYPE_NAMES),
        ("-T", "script", 30, uimage.TYPE_NAMES),
        ("-T", "filesystem", 30, uimage.TYPE_NAMES),
        ("-T", "kernel_noload", 30, uimage.TYPE_NAMES),
        ("-C", "gzip", 31, uimage.COMP_NAMES),
        ("-C", "bzip2", 31, uimage.COMP_NAMES),
        ("-C", "lzma", 31, uimage.COMP_NAMES),
        ("-C", "lzo", 31, uimage.COMP_NAMES),
        ("-C", "lz4", 31, uimage.COMP_NAMES),
        ("-C", "zstd", 31, uimage.COMP_NAMES),
    ],
)
def test_codes_agree_with_mkimage(
    tmp_path: Path, option: str, value: str, offset: int, table: dict[int, str]
) -> None:
    (tmp_path / "payload").write_bytes(b"payload")
    options = {"-A": "arm", "-O": "linux", "-T": "kernel", "-C": "none"} | {option: value}
    argv: list[str | Path] = ["mkimage"]
    for key, val in options.items():
        argv += [key, val]
    run([*argv, "-d", tmp_path / "payload", tmp_path / "out.img"], capture=True)
    code = (tmp_path / "out.img").read_bytes()[offset]
    assert table[code] == value


@pytest.mark.integration
@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda d: d.__setitem__(1, 0x06), "is not a U-Boot legacy image"),
        (lambda d: d.__setitem__(12, d[12] ^ 0x80), "bad U-Boot header CRC"),
        (lambda d: d.__setitem__(100, d[100] ^ 0x01), "bad payload CRC"),
        (lambda d: d.__delitem__(slice(-10, None)), "truncated"),
    ],
    ids=["magic", "header-crc", "data-crc", "truncated"],
)
def test_damage_rejected_like_dumpimage_rejects_it(tmp_path: Path, damage, problem: str) -> None:
    data = bytearray(_mkimage(tmp_path, os.urandom(500), "-T", "ramdisk"))
    damage(data)
    bad = tmp_path / "bad.img"
    bad.write_bytes(bytes(data))
    with pytest.raises(UserError, match=re.escape(problem)) as info:
        uimage.parse(bytes(data), expect_type=uimage.RAMDISK, source="bad.img")
    assert "bad.img" in info.value.message
    dumped = run(
        ["dumpimage", "-T", "ramdisk", "-p", "0", "-o", tmp_path / "out", bad], check=False
    )
    assert dumped.returncode != 0


@pytest.mark.integration
def test_kernel_image_rejected_where_ramdisk_expected(tmp_path: Path) -> None:
    image = _mkimage(tmp_path, b"\0" * 64, "-T", "kernel", "-a", "0x8000", "-e", "0x8000")
    with pytest.raises(UserError, match="is a U-Boot kernel image, expected a ramdisk image"):
        uimage.parse(image, expect_type=uimage.RAMDISK, source="uInitrd")
