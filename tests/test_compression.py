"""Compressed members: magic numbers, and frame ends checked against the zstd and lz4 tools."""

from __future__ import annotations

import random
import subprocess

import pytest

from archkernel.errors import UserError
from archkernel.formats import compression


def tool(argv: list[str], data: bytes) -> bytes:
    """Run an independent tool; its stdout."""
    return subprocess.run(argv, input=data, capture_output=True, check=True).stdout


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"\x1f\x8b\x08\x00", "gzip"),
        (b"\xfd7zXZ\x00\x00", "xz"),
        (b"\x28\xb5\x2f\xfd\x24", "zstd"),
        (b"\x02\x21\x4c\x18\x00", "lz4"),
        (b"\x04\x22\x4d\x18\x64", "lz4"),
        (b"BZh91AY", "bzip2"),
        (b"\x5d\x00\x00\x80\x00", "lzma"),
        (b"07070100000001", "none"),
        (b"07070200000001", "none"),
    ],
)
def test_detect_compression_by_magic(head: bytes, expected: str) -> None:
    assert compression.detect_compression(head) == expected


def test_detect_compression_refuses_unknown_data() -> None:
    with pytest.raises(UserError) as caught:
        compression.detect_compression(b"<html>oops", source="uInitrd-Linux-armv7l-v3.5")
    assert caught.value.message == (
        "payload of uInitrd-Linux-armv7l-v3.5 is not a compressed cpio archive "
        "(starts with 3c 68 74 6d 6c 3e 6f 6f)"
    )
    assert caught.value.hint


def test_detect_compression_names_old_cpio_format() -> None:
    with pytest.raises(UserError) as caught:
        compression.detect_compression(b"070707000000")
    assert "newc" in (caught.value.hint or "")


@pytest.mark.integration
def test_zstd_frame_end_matches_the_tool() -> None:
    one = tool(["zstd", "-q", "-c", "--content-size"], b"first" * 1000)
    two = tool(["zstd", "-q", "-c", "--no-check"], b"second" * 1000)
    assert compression.zstd_frame_end(one + two, 0, source="t") == len(one)
    assert compression.zstd_frame_end(one + two, len(one), source="t") == len(one) + len(two)
    with pytest.raises(UserError, match="corrupt or truncated"):
        compression.zstd_frame_end(one[:-3], 0, source="t")


@pytest.mark.integration
def test_lz4_frame_end_matches_the_tool() -> None:
    one = tool(["lz4", "-q", "-c", "--content-size"], b"first" * 1000)
    two = tool(["lz4", "-q", "-c", "-BX"], random.Random(2).randbytes(100))
    blocks, end = compression.lz4_frame_blocks(one + two, 0, source="t")
    assert end == len(one)
    assert compression.lz4_frame_blocks(one + two, len(one), source="t")[1] == len(one) + len(two)
    assert blocks
