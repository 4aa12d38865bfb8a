"""Fixed VHD footers: layout from the VHD spec, Azure's rules, and qemu-img as the oracle.

Covers archkernel.formats.vhd (the footer), vhd_rules (Azure's rules), vhd_file (the file
operations, sparse copies included). Expected values are literals from the VHD
specification (or worked through its CHS algorithm by hand), or what qemu-img writes and
reads; never computed by the modules under test.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from archkernel.errors import UserError
from archkernel.formats import vhd, vhd_file, vhd_rules
from archkernel.host.run import run
from archkernel.units import GiB, KiB, MiB
from tests.support.files import sparse_file, write_at

UID = uuid.UUID("00112233-4455-6677-8899-aabbccddeeff")
# Allocation allowed beyond the data: the footer's block, an extent-tree block on ext4, and
# XFS's speculative preallocation past the end of file (64 KiB). Copying the holes of the
# images used here would add megabytes to gigabytes.
SLACK = 128 * KiB


# --- helpers written from the spec, independent of the module -------------------------------


def spec_checksum(footer: bytes) -> int:
    """One's complement of the byte sum, checksum field (offset 64, 4 bytes) taken as zero."""
    return ~(sum(footer[:64]) + sum(footer[68:])) & 0xFFFFFFFF


def patch(footer: bytes, offset: int, fmt: str, value: object, *, resum: bool = True) -> bytes:
    """`footer` with one big-endian field replaced, checksum redone unless told otherwise."""
    raw = bytearray(footer)
    struct.pack_into(fmt, raw, offset, value)
    if resum:
        struct.pack_into(">I", raw, 64, spec_checksum(bytes(raw)))
    return bytes(raw)


def scattered_data(size: int, seed: int = 7, count: int = 12) -> dict[int, bytes]:
    """Random chunks at unaligned offsets, plus the first and the last sector."""
    rng = random.Random(seed)
    chunks = {0: rng.randbytes(512), size - 512: rng.randbytes(512)}
    for _ in range(count):
        offset = rng.randrange(512, size - 70_000)
        chunks[offset] = rng.randbytes(rng.randrange(1, 65_536))
    return chunks


def tail(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-512, os.SEEK_END)
        return f.read()


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(MiB):
            h.update(block)
    return h.hexdigest()


def sparse_vhd(path: Path, footer: bytes, data_size: int) -> Path:
    """A sparse file of `data_size` bytes followed by `footer`."""
    sparse_file(path, data_size)
    with open(path, "ab") as f:
        f.write(footer)
    return path


# --- constants and layout --------------------------------------------------------------------


def test_constants_are_the_specs_and_azures() -> None:
    assert vhd.COOKIE == b"conectix"
    assert vhd.FIXED_DATA_OFFSET == 0xFFFFFFFFFFFFFFFF
    assert vhd.DISK_TYPE_FIXED == 2
    assert vhd_rules.AZURE_MAX == 1_098_437_885_952  # 1023 * 2**30
    assert vhd.CREATOR_APP == b"win "


def test_footer_layout_matches_the_spec() -> None:
    data = vhd.footer(3 * GiB, timestamp=0x12345678, unique_id=UID)
    assert len(data) == 512
    assert data[0:8] == b"conectix"
    assert data[8:12] == b"\x00\x00\x00\x02"  # features: reserved bit
    assert data[12:16] == b"\x00\x01\x00\x00"  # version 1.0
    assert data[16:24] == b"\xff" * 8  # data offset of a fixed disk
    assert data[24:28] == b"\x12\x34\x56\x78"
    assert data[28:32] == b"win "
    assert data[36:40] == b"Wi2k"
    assert data[40:48] == b"\x00\x00\x00\x00\xc0\x00\x00\x00"  # original size 3 GiB
    assert data[48:56] == b"\x00\x00\x00\x00\xc0\x00\x00\x00"  # current size 3 GiB
    # 3 GiB = 6291456 sectors -> 63 sectors, 16 heads, 6241 cylinders (6241 = 0x1861)
    assert data[56:60] == b"\x18\x61\x10\x3f"
    assert data[60:64] == b"\x00\x00\x00\x02"  # fixed
    assert struct.unpack(">I", data[64:68])[0] == spec_checksum(data)
    assert data[68:84] == bytes.fromhex("00112233445566778899aabbccddeeff")
    assert data[84:] == bytes(428)  # saved state 0, then zeros


def test_footer_is_pure() -> None:
    a = vhd.footer(30 * GiB, timestamp=1, unique_id=UID)
    b = vhd.footer(30 * GiB, timestamp=1, unique_id=UID)
    assert a == b
    assert vhd.footer(30 * GiB, timestamp=2, unique_id=UID) != a


@pytest.mark.parametrize("size", [0, -512, 1000, 1 << 64])
def test_footer_refuses_sizes_a_vhd_cannot_hold(size: int) -> None:
    with pytest.raises(UserError):
        vhd.footer(size, timestamp=0, unique_id=UID)


def test_footer_refuses_creator_fields_of_the_wrong_width() -> None:
    with pytest.raises(UserError, match="4 bytes"):
        vhd.footer(MiB, timestamp=0, unique_id=UID, creator_app=b"qemu2")


def test_footer_refuses_a_timestamp_beyond_32_bits() -> None:
    with pytest.raises(UserError):
        vhd.footer(MiB, timestamp=1 << 32, unique_id=UID)


def test_checksum_is_the_ones_complement_of_the_byte_sum() -> None:
    assert vhd.checksum(bytes(512)) == 0xFFFFFFFF
    one = bytearray(512)
    one[0] = 1
    assert vhd.checksum(bytes(one)) == 0xFFFFFFFE
    one[65] = 0xFF  # inside the checksum field: ignored
    assert vhd.checksum(bytes(one)) == 0xFFFFFFFE
    full = bytes([0xFF]) * 512  # 508 counted bytes of 255 = 129540 = 0x1FA04
    assert vhd.checksum(full) == 0xFFFE05FB


def test_checksum_refuses_other_lengths() -> None:
    with pytest.raises(UserError, match="512 bytes"):
        vhd.checksum(bytes(511))


def test_vhd_timestamp_counts_from_2000() -> None:
    assert vhd.vhd_timestamp(946_684_800) == 0  # 2000-01-01T00:00:00Z
    assert vhd.vhd_timestamp(1_700_000_000) == 753_315_200
    assert vhd.vhd_timestamp(0) == 0  # before 2000: clamped


def test_parse_footer_reads_every_field() -> None:
    packed = struct.pack(
        ">8sIIQI4sI4sQQHBBII16sB427s",
        b"conectix",
        2,
        0x00010000,
        0xFFFFFFFFFFFFFFFF,
        1000,
        b"d2v ",
        0x00050003,
        b"Mac ",
        5 * MiB,
        6 * MiB,
        180,
        4,
        17,
        2,
        0xDEADBEEF,
        UID.bytes,
        0,
        bytes(427),
    )
    f = vhd.parse_footer(packed)
    assert f.cookie == b"conectix"
    assert (f.features, f.format_version) == (2, 0x00010000)
    assert f.data_offset == 0xFFFFFFFFFFFFFFFF
    assert f.timestamp == 1000
    assert (f.creator_app, f.creator_version, f.creator_os) == (b"d2v ", 0x00050003, b"Mac ")
    assert (f.original_size, f.current_size) == (5 * MiB, 6 * MiB)
    assert f.geometry == (180, 4, 17)
    assert f.disk_type == 2
    assert f.disk_type_name == "fixed"
    assert f.checksum == 0xDEADBEEF
    assert f.unique_id == UID
    assert f.saved_state == 0
    assert f.pack() == packed


def test_parse_footer_refuses_other_lengths() -> None:
    with pytest.raises(UserError, match="512 bytes"):
        vhd.parse_footer(b"conectix")


# --- CHS geometry ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "geometry"),
    [
        # Worked by hand through the spec's algorithm.
        (1 * MiB, (30, 4, 17)),  # 2048 sectors: 120 cyl*heads at 17, heads raised to 4
        (64 * MiB, (963, 8, 17)),  # 7710 at 17 -> 8 heads
        (200 * MiB, (825, 16, 31)),  # 24 heads at 17 is too many -> 31 sectors
        (3 * GiB, (6241, 16, 63)),
        (65535 * 16 * 63 * 512, (16191, 16, 255)),  # first size with 255 sectors
        (65535 * 16 * 255 * 512, (65535, 16, 255)),  # the maximum
        (1023 * GiB, (65535, 16, 255)),  # capped
        # Written by `qemu-img create -f vpc -o subformat=fixed` (without force_size).
        (1_079_296, (31, 4, 17)),
        (3_221_471_232, (6242, 16, 63)),
    ],
)
def test_chs_geometry_follows_the_spec(size: int, geometry: tuple[int, int, int]) -> None:
    assert vhd.chs_geometry(size) == geometry


# --- size rules -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "hint"),
    [
        (1, "resize to 1 MiB"),
        (MiB + 1, "resize to 2 MiB"),
        (MiB + 512, "resize to 2 MiB"),
        (3 * GiB - 4096, "resize to 3072 MiB"),
        (1023 * GiB + MiB, "resize to 1047552 MiB or less"),
        (2048 * GiB, "resize to 1047552 MiB or less"),
    ],
)
def test_decide_append_refuses_sizes_azure_rejects(size: int, hint: str) -> None:
    with pytest.raises(UserError) as info:
        vhd_rules.decide_append(size, b"\0" * 512)
    assert info.value.hint is not None
    assert hint in info.value.hint


def test_decide_append_refuses_an_empty_image() -> None:
    with pytest.raises(UserError, match="empty"):
        vhd_rules.decide_append(0, b"")


@pytest.mark.parametrize("size", [MiB, 30 * GiB, 1023 * GiB])
def test_decide_append_accepts_whole_mib_up_to_1023_gib(size: int) -> None:
    assert vhd_rules.decide_append(size, bytes(512)) is True


def test_decide_append_accepts_its_own_footer_as_done() -> None:
    ours = vhd.footer(4 * MiB, timestamp=5, unique_id=UID)
    assert vhd_rules.decide_append(4 * MiB + 512, ours) is False
    assert vhd_rules.decide_append(4 * MiB + 512, ours, unique_id=UID, timestamp=5) is False


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(dict(unique_id=uuid.UUID(int=1)), id="another unique id asked for"),
        pytest.param(dict(timestamp=6), id="another timestamp asked for"),
    ],
)
def test_decide_append_refuses_its_footer_with_other_fields(other: dict[str, object]) -> None:
    ours = vhd.footer(4 * MiB, timestamp=5, unique_id=UID)
    with pytest.raises(UserError, match="already ends with a VHD footer"):
        vhd_rules.decide_append(4 * MiB + 512, ours, **other)  # type: ignore[arg-type]


def test_decide_append_refuses_a_footer_from_another_creator() -> None:
    qemu_like = patch(vhd.footer(4 * MiB, timestamp=5, unique_id=UID), 28, ">4s", b"qem2")
    with pytest.raises(UserError, match="already ends with a VHD footer") as info:
        vhd_rules.decide_append(4 * MiB + 512, qemu_like)
    assert "qem2" in str(info.value)


def test_decide_append_refuses_a_footer_for_other_data() -> None:
    # Our footer, but the file has grown since: the footer now sits inside the disk.
    ours = vhd.footer(4 * MiB, timestamp=5, unique_id=UID)
    with pytest.raises(UserError, match="already ends with a VHD footer"):
        vhd_rules.decide_append(8 * MiB + 512, ours)


# --- check --------------------------------------------------------------------------------------

GOOD = vhd.footer(4 * MiB, timestamp=5, unique_id=UID)


@pytest.mark.parametrize(
    ("footer", "data_size", "rule"),
    [
        pytest.param(patch(GOOD, 0, ">8s", b"conectiX"), 4 * MiB, "cookie", id="corrupt cookie"),
        pytest.param(
            patch(GOOD, 64, ">I", 0x12345678, resum=False), 4 * MiB, "checksum", id="bad checksum"
        ),
        pytest.param(patch(GOOD, 60, ">I", 3), 4 * MiB, "disk-type", id="dynamic type"),
        pytest.param(patch(GOOD, 16, ">Q", 512), 4 * MiB, "data-offset", id="data offset"),
        pytest.param(
            patch(patch(GOOD, 48, ">Q", 4 * MiB + 512), 40, ">Q", 4 * MiB + 512),
            4 * MiB + 512,
            "whole-mib",
            id="size not whole MiB",
        ),
        pytest.param(
            patch(patch(GOOD, 48, ">Q", 1024 * GiB), 40, ">Q", 1024 * GiB),
            1024 * GiB,
            "azure-max",
            id="over 1023 GiB",
        ),
        pytest.param(GOOD, 5 * MiB, "file-size", id="size mismatch"),
        pytest.param(patch(GOOD, 40, ">Q", 8 * MiB), 4 * MiB, "original-size", id="original big"),
        pytest.param(patch(GOOD, 40, ">Q", 0), 4 * MiB, "original-size", id="original zero"),
    ],
)
def test_check_flags_exactly_the_broken_rule(
    tmp_path: Path, footer: bytes, data_size: int, rule: str
) -> None:
    path = sparse_vhd(tmp_path / "disk.vhd", footer, data_size)
    report = vhd_file.examine(path)
    assert not report.ok
    assert report.failed == {rule}
    problems = vhd_file.check(path)
    assert [p.rule for p in problems] == [rule]
    assert str(problems[0]).startswith(f"{rule}: ")
    with pytest.raises(UserError) as info:
        vhd_file.check_or_raise(path)
    assert str(problems[0]) in info.value.message


def test_check_passes_a_good_footer_and_names_every_rule(tmp_path: Path) -> None:
    path = sparse_vhd(tmp_path / "disk.vhd", GOOD, 4 * MiB)
    assert vhd_file.check(path) == []
    report = vhd_file.examine(path)
    assert report.ok, str(report)
    assert [r.rule for r in report.results] == [
        "cookie",
        "checksum",
        "disk-type",
        "data-offset",
        "whole-mib",
        "azure-max",
        "file-size",
        "original-size",
    ]
    assert report.footer is not None and report.footer.current_size == 4 * MiB
    assert vhd_file.check_or_raise(path).unique_id == UID
    assert vhd_file.raw_size(path) == 4 * MiB


def test_check_reports_a_raw_image_as_not_a_vhd(tmp_path: Path) -> None:
    path = sparse_file(tmp_path / "disk.raw", 4 * MiB)
    report = vhd_file.examine(path)
    assert report.failed == {"cookie"}
    assert "not a VHD" in str(vhd_file.check(path)[0])


def test_check_reports_a_tiny_file(tmp_path: Path) -> None:
    path = tmp_path / "tiny"
    path.write_bytes(b"conectix")
    assert vhd_file.examine(path).failed == {"cookie"}


def test_check_reads_only_the_last_512_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = sparse_vhd(tmp_path / "big.vhd", GOOD, 4 * MiB)
    reads: list[tuple[int, int]] = []
    real_pread = os.pread

    def spy(fd: int, length: int, offset: int) -> bytes:
        reads.append((length, offset))
        return real_pread(fd, length, offset)

    monkeypatch.setattr(os, "pread", spy)
    monkeypatch.setattr(os, "read", lambda *a: pytest.fail("check() used os.read"))
    assert vhd_file.examine(path).ok
    assert reads == [(512, 4 * MiB)]


def test_check_of_a_missing_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot open"):
        vhd_file.check(tmp_path / "nope.vhd")


def test_check_of_a_directory_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="Is a directory"):
        vhd_file.check(tmp_path)


# --- only files and block devices are opened ------------------------------------------------


def never_opening(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """Fail the test if `path` is opened (a FIFO would block the open forever)."""
    real_open = os.open

    def spy(name: object, *args: object, **kwargs: object) -> int:
        if os.fspath(name) == os.fspath(path):  # type: ignore[arg-type]
            pytest.fail(f"{path} was opened")
        return real_open(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", spy)


@pytest.mark.parametrize(
    "operation",
    [
        vhd_file.check,
        vhd_file.append_footer,
        lambda path: vhd_file.from_raw(path, path.with_name("disk.vhd")),
    ],
    ids=["check", "append_footer", "from_raw"],
)
def test_a_fifo_is_refused_before_it_is_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, operation
) -> None:
    fifo = tmp_path / "disk.vhd.fifo"
    os.mkfifo(fifo)
    never_opening(monkeypatch, fifo)
    with pytest.raises(UserError) as info:
        operation(fifo)
    assert info.value.message == (
        f"cannot open {fifo}: it is a named pipe (FIFO), not a regular file or a block device"
    )
    assert not (tmp_path / "disk.vhd").exists()


def test_a_character_device_or_a_socket_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^cannot open /dev/null: it is a character device, not"):
        vhd_file.check("/dev/null")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(os.fspath(tmp_path / "sock"))
        with pytest.raises(UserError, match=": it is a socket, not a regular file or a block"):
            vhd_file.check(tmp_path / "sock")


def test_a_path_that_became_a_fifo_after_its_check_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A file when checked, a FIFO by the time it is opened: what was opened is checked too.
    path = tmp_path / "disk.vhd"
    os.mkfifo(path)
    writer = os.open(path, os.O_RDWR | os.O_NONBLOCK)  # so no open of it can block this test
    try:
        real_stat = os.stat
        regular = os.stat_result((0o100644, *real_stat(path)[1:]))
        monkeypatch.setattr(os, "stat", lambda p, *a, **k: regular if p == path else real_stat(p))
        with pytest.raises(UserError, match="it is a named pipe"):
            vhd_file.check(path)
    finally:
        os.close(writer)


@pytest.mark.parametrize("action", ["check", "from-raw"])
def test_the_vhd_command_refuses_a_fifo_at_once(tmp_path: Path, action: str) -> None:
    fifo = tmp_path / "disk.fifo"
    os.mkfifo(fifo)
    args = [str(fifo)] if action == "check" else [str(fifo), str(tmp_path / "disk.vhd")]
    result = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "vhd", action, *args],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=60,  # without the check it waits for a writer forever
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines()[0] == (
        f"error: cannot open {fifo}: it is a named pipe (FIFO), not a regular file or a block "
        "device"
    )
    assert "Traceback" not in result.stderr


def gpt_head(disk_size: int) -> bytes:
    """A disk's first 1024 bytes with a GPT header (LBA 1) whose backup header is at the
    last sector of a `disk_size`-byte disk, as the UEFI specification places it."""
    head = bytearray(1024)
    header = struct.pack("<8sIII4xQQ", b"EFI PART", 0x10000, 92, 0, 1, disk_size // 512 - 1)
    head[512 : 512 + len(header)] = header
    return bytes(head)


def mbr_head(start: int, sectors: int) -> bytes:
    """An MBR with one Linux partition of `sectors` sectors from LBA `start`."""
    head = bytearray(1024)
    head[446 + 4] = 0x83
    head[446 + 8 : 446 + 16] = struct.pack("<II", start, sectors)
    head[510:512] = b"\x55\xaa"
    return bytes(head)


def disk_with(path: Path, head: bytes, size: int) -> Path:
    sparse_file(path, size)
    write_at(path, {0: head})
    return path


@pytest.mark.parametrize(
    "head",
    [gpt_head(64 * MiB), mbr_head(2048, 64 * 2048 - 2048)],
    ids=["gpt", "mbr"],
)
def test_check_says_a_disk_shorter_than_its_partition_table_looks_truncated(
    tmp_path: Path, head: bytes
) -> None:
    path = disk_with(tmp_path / "disk.vhd", head, 40 * MiB)
    report = vhd_file.examine(path)
    assert report.failed == {"cookie"} and report.truncated
    detail = report.results[0].detail
    assert "partition table describes a 64 MiB disk but the file holds 40 MiB" in detail
    assert "looks truncated" in detail and "from-raw" not in detail
    assert report.hint is not None and report.hint.startswith("copy or download the file again")
    with pytest.raises(UserError) as info:
        vhd_file.check_or_raise(path)
    assert "from-raw" not in str(info.value.message) and "download" in str(info.value.hint)


@pytest.mark.parametrize(
    "head", [gpt_head(64 * MiB), mbr_head(2048, 64 * 2048 - 2048)], ids=["gpt", "mbr"]
)
def test_check_still_calls_a_whole_raw_disk_a_raw_image(tmp_path: Path, head: bytes) -> None:
    report = vhd_file.examine(disk_with(tmp_path / "disk.raw", head, 64 * MiB))
    assert not report.truncated and report.hint is None
    assert "a raw image? convert it with from-raw" in report.results[0].detail


def test_check_says_a_dynamic_vhd_without_its_end_looks_truncated(tmp_path: Path) -> None:
    # A dynamic VHD starts with a copy of its footer; a fixed one never does.
    dynamic = patch(patch(GOOD, 60, ">I", 3), 16, ">Q", 512)
    path = disk_with(tmp_path / "dynamic.vhd", dynamic, 3 * MiB)
    report = vhd_file.examine(path)
    assert report.truncated and "looks truncated" in report.results[0].detail


def test_the_partition_table_describes_the_disk_size() -> None:
    assert vhd_rules.described_size(gpt_head(30 * GiB)) == 30 * GiB
    assert vhd_rules.described_size(mbr_head(2048, 4096)) == 6144 * 512
    assert vhd_rules.described_size(bytes(1024)) is None


@pytest.mark.parametrize("disk_type", [3, 4], ids=["dynamic", "differencing"])
def test_check_gives_the_qemu_img_line_for_a_dynamic_vhd(tmp_path: Path, disk_type: int) -> None:
    path = sparse_vhd(tmp_path / "disk.vhd", patch(GOOD, 60, ">I", disk_type), 4 * MiB)
    report = vhd_file.examine(path)
    assert "disk-type" in report.failed
    assert report.hint == (
        "make a fixed VHD of it: qemu-img convert -f vpc -O vpc -o subformat=fixed,force_size "
        f"{path} {tmp_path / 'disk-fixed.vhd'}"
    )
    with pytest.raises(UserError) as info:
        vhd_file.check_or_raise(path)
    assert info.value.hint == report.hint


def test_check_gives_no_conversion_hint_for_a_fixed_vhd_with_a_bad_checksum(
    tmp_path: Path,
) -> None:
    path = sparse_vhd(tmp_path / "disk.vhd", patch(GOOD, 64, ">I", 1, resum=False), 4 * MiB)
    assert vhd_file.examine(path).hint is None


# --- append_footer --------------------------------------------------------------------------


def test_append_footer_writes_the_footer_after_the_data(tmp_path: Path) -> None:
    raw = sparse_file(tmp_path / "disk.raw", 4 * MiB)
    write_at(raw, {0: b"boot", 4 * MiB - 4: b"last"})
    vhd_file.append_footer(raw, timestamp=0x01020304, unique_id=UID)
    assert raw.stat().st_size == 4 * MiB + 512
    data = raw.read_bytes()
    assert data[:4] == b"boot"
    assert data[4 * MiB - 4 : 4 * MiB] == b"last"
    footer = data[4 * MiB :]
    assert footer[:8] == b"conectix"
    assert footer[24:28] == b"\x01\x02\x03\x04"
    assert footer[48:56] == (4 * MiB).to_bytes(8, "big")
    assert footer[68:84] == UID.bytes
    assert struct.unpack(">I", footer[64:68])[0] == spec_checksum(footer)


def test_append_footer_uses_source_date_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(946_684_800 + 1000))
    raw = sparse_file(tmp_path / "disk.raw", MiB)
    vhd_file.append_footer(raw)
    assert tail(raw)[24:28] == (1000).to_bytes(4, "big")


def test_append_footer_keeps_a_30_gib_image_sparse(tmp_path: Path) -> None:
    raw = sparse_file(tmp_path / "disk.raw", 30 * GiB)
    write_at(raw, {0: os.urandom(MiB), 17 * GiB: os.urandom(MiB)})
    os.sync()
    before = allocated(raw)
    vhd_file.append_footer(raw)
    assert raw.stat().st_size == 30 * GiB + 512
    assert allocated(raw) <= before + SLACK


def test_append_footer_twice_leaves_the_file_alone(tmp_path: Path) -> None:
    raw = sparse_file(tmp_path / "disk.raw", 2 * MiB)
    first = vhd_file.append_footer(raw)
    footer = tail(raw)
    again = vhd_file.append_footer(raw)
    assert raw.stat().st_size == 2 * MiB + 512
    assert tail(raw) == footer
    assert again == first


def test_append_footer_refuses_another_footer(tmp_path: Path) -> None:
    other = patch(vhd.footer(2 * MiB, timestamp=5, unique_id=UID), 28, ">4s", b"qem2")
    path = sparse_vhd(tmp_path / "disk.vhd", other, 2 * MiB)
    with pytest.raises(UserError, match="already ends with a VHD footer"):
        vhd_file.append_footer(path)
    assert path.stat().st_size == 2 * MiB + 512


@pytest.mark.parametrize(
    ("size", "hint"),
    [(MiB + 512, "resize to 2 MiB"), (MiB + 1, "resize to 2 MiB"), (3 * GiB - 4096, "3072 MiB")],
)
def test_append_footer_refuses_odd_sizes_and_leaves_the_file(
    tmp_path: Path, size: int, hint: str
) -> None:
    raw = sparse_file(tmp_path / "disk.raw", size)
    with pytest.raises(UserError, match="not a whole number of MiB") as info:
        vhd_file.append_footer(raw)
    assert hint in str(info.value.hint)
    assert raw.stat().st_size == size


def test_append_footer_refuses_more_than_1023_gib(tmp_path: Path) -> None:
    raw = sparse_file(tmp_path / "disk.raw", 1024 * GiB)
    with pytest.raises(UserError, match="1023 GiB"):
        vhd_file.append_footer(raw)
    assert raw.stat().st_size == 1024 * GiB


def test_append_footer_explains_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot open"):
        vhd_file.append_footer(tmp_path / "missing.raw")


def test_append_footer_refuses_a_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError):
        vhd_file.append_footer(tmp_path)


def test_strip_footer_gives_the_raw_image_back(tmp_path: Path) -> None:
    raw = sparse_file(tmp_path / "disk.raw", 3 * MiB)
    write_at(raw, {5: b"payload"})
    digest = file_sha256(raw)
    vhd_file.append_footer(raw)
    assert vhd_file.strip_footer(raw) == 3 * MiB
    assert file_sha256(raw) == digest


def test_strip_footer_refuses_a_raw_image(tmp_path: Path) -> None:
    raw = sparse_file(tmp_path / "disk.raw", 3 * MiB)
    with pytest.raises(UserError, match="not a VHD Azure accepts"):
        vhd_file.strip_footer(raw)
    assert raw.stat().st_size == 3 * MiB


# --- from_raw -----------------------------------------------------------------------------------


def _assert_same_data(raw: Path, image: Path, chunks: dict[int, bytes]) -> None:
    with open(raw, "rb") as r, open(image, "rb") as v:
        for offset, data in chunks.items():
            r.seek(offset)
            v.seek(offset)
            assert v.read(len(data)) == r.read(len(data)) == data


def test_from_raw_leaves_raw_unchanged_and_the_vhd_sparse(tmp_path: Path) -> None:
    raw = sparse_file(tmp_path / "disk.raw", 256 * MiB)
    chunks = scattered_data(256 * MiB)
    write_at(raw, chunks)
    os.sync()
    before = (file_sha256(raw), raw.stat().st_size, raw.stat().st_mtime_ns, allocated(raw))
    out = tmp_path / "out" / "disk.vhd"
    footer = vhd_file.from_raw(raw, out, unique_id=UID)
    assert (file_sha256(raw), raw.stat().st_size, raw.stat().st_mtime_ns, allocated(raw)) == before
    assert out.stat().st_size == 256 * MiB + 512
    assert allocated(out) <= before[3] + SLACK
    assert footer.current_size == 256 * MiB
    _assert_same_data(raw, out, chunks)
    with open(out, "rb") as v:
        assert hashlib.sha256(v.read(256 * MiB)).hexdigest() == before[0]
    assert tail(out)[68:84] == UID.bytes
    assert vhd_file.examine(out).ok
    assert [p.name for p in out.parent.iterdir()] == ["disk.vhd"]  # no temporary left


def test_from_raw_keeps_a_30_gib_image_sparse(tmp_path: Path) -> None:
    raw = sparse_file(tmp_path / "disk.raw", 30 * GiB)
    chunks = {0: os.urandom(MiB), 11 * GiB + 12345: os.urandom(3 * MiB), 30 * GiB - 512: b"e" * 512}
    write_at(raw, chunks)
    os.sync()
    out = tmp_path / "disk.vhd"
    vhd_file.from_raw(raw, out)
    assert out.stat().st_size == 30 * GiB + 512
    assert allocated(out) <= allocated(raw) + SLACK
    _assert_same_data(raw, out, chunks)


def test_from_raw_without_copy_file_range_still_copies_only_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_copy_file_range(*args: object) -> int:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", no_copy_file_range)
    raw = sparse_file(tmp_path / "disk.raw", 64 * MiB)
    chunks = scattered_data(64 * MiB, seed=3)
    write_at(raw, chunks)
    os.sync()
    out = tmp_path / "disk.vhd"
    vhd_file.from_raw(raw, out)
    assert allocated(out) <= allocated(raw) + SLACK
    _assert_same_data(raw, out, chunks)
    assert file_sha256(raw) == hashlib.sha256(out.read_bytes()[: 64 * MiB]).hexdigest()


def test_from_raw_skips_zero_blocks_where_holes_cannot_be_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As with a block device: no SEEK_DATA, no copy_file_range; all of it reads as data.
    real_lseek = os.lseek

    def lseek(fd: int, pos: int, how: int) -> int:
        if how in (os.SEEK_DATA, os.SEEK_HOLE):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_lseek(fd, pos, how)

    def no_copy_file_range(*args: object) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "lseek", lseek)
    monkeypatch.setattr(os, "copy_file_range", no_copy_file_range)
    raw = sparse_file(tmp_path / "disk.raw", 64 * MiB)
    chunks = {3 * MiB: b"a" * 4096, 50 * MiB + 7: b"b" * 100}
    write_at(raw, chunks)
    out = tmp_path / "disk.vhd"
    vhd_file.from_raw(raw, out)
    assert allocated(out) <= 2 * MiB + SLACK  # the two 1 MiB blocks that hold data
    _assert_same_data(raw, out, chunks)
    assert out.stat().st_size == 64 * MiB + 512


def test_from_raw_replaces_an_old_vhd(tmp_path: Path) -> None:
    raw = sparse_file(tmp_path / "disk.raw", MiB)
    out = tmp_path / "disk.vhd"
    out.write_bytes(b"old")
    vhd_file.from_raw(raw, out)
    assert out.stat().st_size == MiB + 512


def test_from_raw_without_replace_keeps_an_existing_vhd(tmp_path: Path) -> None:
    raw = sparse_file(tmp_path / "disk.raw", MiB)
    out = tmp_path / "disk.vhd"
    out.write_bytes(b"old")
    with pytest.raises(UserError, match=r"disk\.vhd exists"):
        vhd_file.from_raw(raw, out, replace=False)
    assert out.read_bytes() == b"old"
    vhd_file.from_raw(raw, tmp_path / "new.vhd", replace=False)
    assert (tmp_path / "new.vhd").stat().st_size == MiB + 512


def test_from_raw_refuses_an_odd_size_and_keeps_the_old_vhd(tmp_path: Path) -> None:
    raw = sparse_file(tmp_path / "disk.raw", MiB + 4096)
    out = tmp_path / "disk.vhd"
    out.write_bytes(b"old")
    with pytest.raises(UserError) as info:
        vhd_file.from_raw(raw, out)
    assert "resize to 2 MiB" in str(info.value.hint)
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.raw", "disk.vhd"]


@pytest.mark.parametrize("same", ["path", "hard link"])
def test_from_raw_refuses_to_write_over_the_raw_image(tmp_path: Path, same: str) -> None:
    raw = sparse_file(tmp_path / "disk.raw", MiB)
    out = raw
    if same == "hard link":
        out = tmp_path / "disk.vhd"
        os.link(raw, out)
    with pytest.raises(UserError, match="is the raw image itself"):
        vhd_file.from_raw(raw, out)
    assert raw.stat().st_size == MiB


def test_from_raw_refuses_a_vhd_as_input(tmp_path: Path) -> None:
    raw = sparse_file(tmp_path / "disk.raw", MiB)
    vhd_file.append_footer(raw)
    with pytest.raises(UserError, match="already is a fixed VHD"):
        vhd_file.from_raw(raw, tmp_path / "disk.vhd")
    assert not (tmp_path / "disk.vhd").exists()


def test_to_raw_copies_the_disk_out_and_leaves_the_vhd_as_it_was(tmp_path: Path) -> None:
    # Step 7 installs GRUB into such a copy: the VHD stays whole until step 8 replaces it.
    raw = sparse_file(tmp_path / "disk.raw", 3 * MiB)
    write_at(raw, {5: b"payload"})
    digest = file_sha256(raw)
    vhd_file.append_footer(raw, timestamp=0, unique_id=UID)
    made = raw.rename(tmp_path / "disk.vhd")
    before = file_sha256(made)
    copy = tmp_path / "copy.raw"
    assert vhd_file.to_raw(made, copy) == 3 * MiB
    assert copy.stat().st_size == 3 * MiB
    assert file_sha256(copy) == digest
    assert file_sha256(made) == before
    assert copy.stat().st_blocks * 512 <= SLACK + 4 * KiB  # the holes stayed holes
    assert sorted(os.listdir(tmp_path)) == ["copy.raw", "disk.vhd"]


def test_from_raw_explains_a_missing_raw_image(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot open"):
        vhd_file.from_raw(tmp_path / "missing.raw", tmp_path / "disk.vhd")


def test_from_raw_refuses_a_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="directory"):
        vhd_file.from_raw(tmp_path, tmp_path / "disk.vhd")


# --- qemu-img as the independent oracle -----------------------------------------------------


@pytest.fixture
def qemu_img() -> str:
    path = shutil.which("qemu-img")
    if path is None:
        pytest.skip("qemu-img not installed (Debian: qemu-utils)")
    return path


def qemu_info(qemu_img: str, path: Path) -> dict[str, object]:
    out = run([qemu_img, "info", "-f", "vpc", "--output=json", path], capture=True).stdout
    info: dict[str, object] = json.loads(out)
    return info


def qemu_compare(qemu_img: str, raw: Path, image: Path) -> int:
    return run([qemu_img, "compare", "-f", "raw", "-F", "vpc", raw, image], check=False).returncode


@pytest.mark.integration
@pytest.mark.parametrize(
    "size", [MiB, 3 * GiB, 30 * GiB, 1023 * GiB], ids=["1MiB", "3GiB", "30GiB", "1023GiB"]
)
def test_qemu_reads_the_exact_size_of_our_footer(qemu_img: str, tmp_path: Path, size: int) -> None:
    raw = sparse_file(tmp_path / "disk.raw", size)
    vhd_file.append_footer(raw)
    info = qemu_info(qemu_img, raw)
    assert info["format"] == "vpc"
    assert info["virtual-size"] == size


@pytest.mark.integration
def test_qemu_compare_finds_our_vhds_identical_to_the_raw_image(
    qemu_img: str, tmp_path: Path
) -> None:
    raw = sparse_file(tmp_path / "disk.raw", 128 * MiB)
    write_at(raw, scattered_data(128 * MiB, seed=11, count=40))
    copied = tmp_path / "copied.vhd"
    vhd_file.from_raw(raw, copied)
    assert qemu_compare(qemu_img, raw, copied) == 0

    in_place = tmp_path / "in-place.raw"
    shutil.copyfile(raw, in_place)
    vhd_file.append_footer(in_place)
    assert qemu_compare(qemu_img, raw, in_place) == 0

    # The oracle can tell: one changed byte in the data makes the images differ.
    write_at(copied, {77 * MiB + 3: b"\x5a"})
    write_at(raw, {77 * MiB + 3: b"\xa5"})
    assert qemu_compare(qemu_img, raw, copied) == 1


@pytest.mark.integration
def test_a_vhd_from_qemu_img_convert_passes_check(qemu_img: str, tmp_path: Path) -> None:
    raw = sparse_file(tmp_path / "disk.raw", 64 * MiB)
    write_at(raw, scattered_data(64 * MiB, seed=5))
    out = tmp_path / "qemu.vhd"
    run(
        [
            qemu_img,
            "convert",
            "-f",
            "raw",
            "-O",
            "vpc",
            "-o",
            "subformat=fixed,force_size",
            raw,
            out,
        ]
    )
    report = vhd_file.examine(out)
    assert report.ok, str(report)
    assert vhd_file.raw_size(out) == 64 * MiB
    theirs = tail(out)
    assert vhd.checksum(theirs) == struct.unpack(">I", theirs[64:68])[0]


@pytest.mark.integration
def test_our_footer_agrees_with_qemus_field_by_field(qemu_img: str, tmp_path: Path) -> None:
    out = tmp_path / "qemu.vhd"
    run([qemu_img, "create", "-q", "-f", "vpc", "-o", "subformat=fixed,force_size", out, "3G"])
    theirs = vhd.parse_footer(tail(out))
    ours = vhd.parse_footer(vhd.footer(3 * GiB, timestamp=0, unique_id=UID))
    for field in (
        "cookie",
        "features",
        "format_version",
        "data_offset",
        "creator_os",
        "original_size",
        "current_size",
        "disk_type",
        "saved_state",
        "reserved",
    ):
        assert getattr(ours, field) == getattr(theirs, field), field


@pytest.mark.integration
@pytest.mark.parametrize("size", ["1M", "64M", "200M", "3G", "40G", "200G"])
def test_chs_geometry_matches_qemu(qemu_img: str, tmp_path: Path, size: str) -> None:
    # Without force_size qemu rounds the size up to a whole geometry and stores both.
    out = tmp_path / "qemu.vhd"
    run([qemu_img, "create", "-q", "-f", "vpc", "-o", "subformat=fixed", out, size])
    footer = tail(out)
    current = struct.unpack(">Q", footer[48:56])[0]
    cylinders, heads, sectors = struct.unpack(">HBB", footer[56:60])
    assert vhd.chs_geometry(current) == (cylinders, heads, sectors)


@pytest.mark.integration
def test_check_flags_a_dynamic_vhd_from_qemu(qemu_img: str, tmp_path: Path) -> None:
    out = tmp_path / "dynamic.vhd"
    run([qemu_img, "create", "-q", "-f", "vpc", "-o", "subformat=dynamic,force_size", out, "1M"])
    report = vhd_file.examine(out)
    assert report.failed == {"disk-type", "data-offset", "file-size"}
    with pytest.raises(UserError, match="disk type is dynamic"):
        vhd_file.check_or_raise(out)


@pytest.mark.integration
def test_append_footer_refuses_a_vhd_from_qemu(qemu_img: str, tmp_path: Path) -> None:
    out = tmp_path / "qemu.vhd"
    run([qemu_img, "create", "-q", "-f", "vpc", "-o", "subformat=fixed,force_size", out, "2M"])
    size = out.stat().st_size
    with pytest.raises(UserError, match="already ends with a VHD footer"):
        vhd_file.append_footer(out)
    assert out.stat().st_size == size
