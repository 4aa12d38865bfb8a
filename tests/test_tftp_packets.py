"""TFTP packets and option negotiation (archkernel.formats.tftp_packets): plain tables."""

from __future__ import annotations

import pytest

from archkernel.formats.text import clean_text
from archkernel.formats.tftp_packets import (
    Agreed,
    Malformed,
    Refused,
    ack,
    error,
    negotiate,
    parse_error,
    parse_oack,
    read_request,
)


def test_read_request_bytes() -> None:
    assert read_request("initrd/uInitrd", {"tsize": 0, "blksize": 1468}) == (
        b"\x00\x01initrd/uInitrd\x00octet\x00tsize\x000\x00blksize\x001468\x00"
    )
    assert read_request("uboot.bootscript", {}) == b"\x00\x01uboot.bootscript\x00octet\x00"


def test_ack_and_error_bytes() -> None:
    assert ack(0) == b"\x00\x04\x00\x00"
    assert ack(65535) == b"\x00\x04\xff\xff"
    assert error(5, "Unknown transfer ID") == b"\x00\x05\x00\x05Unknown transfer ID\x00"


@pytest.mark.parametrize(
    ("packet", "expected"),
    [
        (b"\x00\x05\x00\x01File not found\x00", (1, "File not found")),
        (b"\x00\x05\x00\x02no terminator", (2, "no terminator")),
        (b"\x00\x05\x00\x00", (0, "")),
        (b"\x00\x05\x01\x00first\x00second\x00", (256, "first")),
        (b"\x00\x05\x00\x00\x1b[1;31mred\x1b[0m\r\nline\x07", (0, "red line")),
    ],
)
def test_parse_error(packet: bytes, expected: tuple[int, str]) -> None:
    assert parse_error(packet) == expected


def test_parse_error_refuses_a_short_packet() -> None:
    with pytest.raises(Malformed, match="an ERROR packet of 3 bytes"):
        parse_error(b"\x00\x05\x00")


@pytest.mark.parametrize(
    ("packet", "expected"),
    [
        (b"\x00\x06blksize\x001468\x00tsize\x00123\x00", {"blksize": "1468", "tsize": "123"}),
        (b"\x00\x06BLKSIZE\x00512\x00", {"blksize": "512"}),  # names are case-insensitive
        (b"\x00\x06", {}),
    ],
)
def test_parse_oack(packet: bytes, expected: dict[str, str]) -> None:
    assert parse_oack(packet) == expected


@pytest.mark.parametrize(
    ("packet", "why"),
    [
        (b"\x00\x06blksize\x001468", "an OACK whose last option is not NUL-terminated"),
        (b"\x00\x06blksize\x00", "an OACK with an option name but no value ('blksize')"),
        (b"\x00\x06tsize\x001\x00TSIZE\x002\x00", "an OACK that names option 'TSIZE' twice"),
        (b"\x00\x06bl\xffk\x001\x00", "an OACK with non-ASCII option 'bl\ufffdk'='1'"),
    ],
)
def test_parse_oack_refuses_malformed_packets(packet: bytes, why: str) -> None:
    with pytest.raises(Malformed) as info:
        parse_oack(packet)
    assert str(info.value) == why


@pytest.mark.parametrize(
    ("requested", "granted", "expected"),
    [
        ({"tsize": 0, "blksize": 1468}, {"blksize": "1468", "tsize": "9"}, Agreed(1468, 9)),
        ({"tsize": 0, "blksize": 1468}, {"blksize": "1024"}, Agreed(1024, None)),  # less: fine
        ({"tsize": 0, "blksize": 1468}, {"tsize": "0"}, Agreed(512, 0)),  # no blksize: 512
        ({"tsize": 0, "blksize": 1468}, {"blksize": "8"}, Agreed(8, None)),
        ({"tsize": 0}, {"tsize": "77"}, Agreed(512, 77)),
        ({"tsize": 0}, {"blksize": "512", "tsize": "77"}, Agreed(512, 77)),  # tftpy's server
        ({"tsize": 0}, {}, Agreed(512, None)),
    ],
)
def test_negotiate(requested: dict[str, int], granted: dict[str, str], expected: Agreed) -> None:
    assert negotiate(requested, granted) == expected


@pytest.mark.parametrize(
    ("requested", "granted", "why"),
    [
        (
            {"blksize": 1468},
            {"blksize": "1469"},
            "the server granted blksize 1469, larger than the 1468 requested",
        ),
        ({"blksize": 1468}, {"blksize": "7"}, "the server granted blksize 7, below the minimum 8"),
        ({"blksize": 1468}, {"blksize": " 512"}, "the server granted blksize ' 512', not a number"),
        ({"tsize": 0}, {"tsize": "1" * 21}, f"the server granted tsize '{'1' * 21}', not a number"),
        ({"tsize": 0}, {"tsize": "\xb2"}, "the server granted tsize '\\xb2', not a number"),
        (
            {"tsize": 0},
            {"tsize": "9" * 60},
            f"the server granted tsize '{'9' * 37}'..., not a number",
        ),
        (
            {"tsize": 0},
            {"\x1b[2j": "1"},
            "the server acknowledged option '\\x1b[2j', which was not requested",
        ),
        (
            {"tsize": 0},
            {"blksize": "1024"},
            "the server acknowledged option 'blksize', which was not requested",
        ),
        (
            {"tsize": 0},
            {"timeout": "1"},
            "the server acknowledged option 'timeout', which was not requested",
        ),
    ],
)
def test_negotiate_refuses(requested: dict[str, int], granted: dict[str, str], why: str) -> None:
    with pytest.raises(Refused) as info:
        negotiate(requested, granted)
    assert str(info.value) == why


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"File not found", "File not found"),
        (b"  spaced \t out  ", "spaced out"),
        (b"line one\r\nline two\n", "line one line two"),
        (b"\x1b[2J\x1b[Hcleared", "cleared"),  # CSI sequences go whole
        (b"\x1b]0;new title\x07text", "text"),  # OSC, ended by BEL
        (b"\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\", "link"),  # OSC, ended by ESC \
        (b"\x1bcreset", "reset"),  # a two-character escape
        (b"\x1b(Bascii", "ascii"),  # ... with an intermediate byte
        (b"\x1bP1$r\x1b\\dcs", "dcs"),  # a device control string
        (b"tail\x1b", "tail"),
        (b"bell\x07del\x7fnul\x00end", "bell del nul end"),
        (b"\xe2\x80\xaereversed", "reversed"),  # U+202E right-to-left override
        (b"caf\xc3\xa9 \xff", "caf\u00e9 \ufffd"),  # UTF-8 kept, a bad byte shown as such
        (b"\xc2\x9b31mC1", "31mC1"),  # U+009B, the one-character CSI, is a control
        (b"x" * 200, "x" * 200),
        (b"x" * 201, "x" * 197 + "..."),
        (b"word " * 50, "word " * 39 + "wo..."),
    ],
)
def test_clean_text(raw: bytes, expected: str) -> None:
    assert clean_text(raw) == expected


def test_clean_text_limit() -> None:
    assert clean_text(b"abcdefghij", limit=8) == "abcde..."


def test_clean_text_takes_text_already_decoded() -> None:
    # A VM agent's report, quoted in a failure: no line of its own, no reordered text.
    assert clean_text("UserName\r\nfake: line\u202e \x9b2J", limit=60) == ("UserName fake: line 2J")
