"""TFTP packets (RFC 1350) and option negotiation (RFC 2347; blksize RFC 2348, tsize 2349).

Pure functions for the client in `archkernel.host.tftp`: `read_request`, `ack` and `error`
build what it sends; `HEADER`, `parse_error` and `parse_oack` read what a server sends;
`negotiate` decides whether the options a server granted are acceptable; text from the
server is shown through `archkernel.formats.text.clean_text`. Nothing from the network is
trusted: a malformed packet raises `Malformed`, an unacceptable answer `Refused`.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from archkernel.formats.text import clean_text

# Opcodes.
RRQ = 1
WRQ = 2
DATA = 3
ACK = 4
ERROR = 5
OACK = 6

# Error codes (RFC 1350, RFC 2347).
NOT_DEFINED = 0
FILE_NOT_FOUND = 1
DISK_FULL = 3
ILLEGAL_OPERATION = 4
UNKNOWN_TID = 5
OPTIONS_REFUSED = 8
ERROR_NAMES = {
    0: "not defined",
    1: "file not found",
    2: "access violation",
    3: "disk full",
    4: "illegal TFTP operation",
    5: "unknown transfer ID",
    6: "file already exists",
    7: "no such user",
    8: "option negotiation failed",
}

DEFAULT_BLKSIZE = 512  # RFC 1350, when no blksize option is agreed
MIN_BLKSIZE = 8  # RFC 2348
MAX_BLKSIZE = 65464  # RFC 2348
# Every packet starts with its opcode; DATA, ACK and ERROR then carry a 16-bit number.
HEADER = struct.Struct("!HH")
# Text from a server is cut to this many characters before it is shown anywhere.
# A number in an option: RFC 2349's tsize is at most 2^64, so 20 digits are plenty.
_NUMBER = re.compile(r"[0-9]{1,20}")
# Option names and values are shown escaped (ascii()), cut to this many characters.
_MAX_TOKEN = 40


class Malformed(ValueError):
    """A packet that does not follow the protocol's layout."""


class Refused(ValueError):
    """An answer that follows the layout but that the client must not accept."""


@dataclass(frozen=True)
class Agreed:
    """The options in force for a transfer: block size, and the file size if announced."""

    blksize: int = DEFAULT_BLKSIZE
    tsize: int | None = None


def read_request(filename: str, options: Mapping[str, int]) -> bytes:
    """A read request (RRQ) for `filename` in octet mode, with `options` (RFC 2347).

    `filename` must be printable ASCII (see `archkernel.host.tftp.check_remote`).
    """
    fields = [filename, "octet"]
    for name, value in options.items():
        fields += [name, str(value)]
    return RRQ.to_bytes(2, "big") + b"".join(f.encode("ascii") + b"\0" for f in fields)


def ack(block: int) -> bytes:
    """The acknowledgement of DATA block `block` (0 acknowledges an OACK)."""
    return HEADER.pack(ACK, block)


def error(code: int, message: str) -> bytes:
    """An ERROR packet; `message` is ASCII text of our own."""
    return HEADER.pack(ERROR, code) + message.encode("ascii") + b"\0"


def parse_error(packet: bytes) -> tuple[int, str]:
    """The code and the cleaned message of an ERROR packet.

    A missing NUL terminator is tolerated (the message then runs to the end), so a
    server's complaint is never lost to a formatting mistake.
    """
    if len(packet) < HEADER.size:
        raise Malformed(f"an ERROR packet of {len(packet)} bytes")
    _, code = HEADER.unpack_from(packet)
    message = packet[HEADER.size :].split(b"\0", 1)[0]
    return code, clean_text(message)


def parse_oack(packet: bytes) -> dict[str, str]:
    """The options of an option acknowledgement (OACK): name (lower case) -> value.

    Names are case-insensitive (RFC 2347); both names and values are NUL-terminated
    ASCII. A repeated name, a name without a value or non-ASCII text is `Malformed`.
    """
    body = packet[2:]
    if body and not body.endswith(b"\0"):
        raise Malformed("an OACK whose last option is not NUL-terminated")
    fields = body.split(b"\0")[:-1] if body else []
    if len(fields) % 2:
        raise Malformed(f"an OACK with an option name but no value ({clean_text(fields[-1])!r})")
    options: dict[str, str] = {}
    for raw_name, raw_value in zip(fields[::2], fields[1::2], strict=True):
        try:
            name, value = raw_name.decode("ascii").lower(), raw_value.decode("ascii")
        except UnicodeDecodeError:
            raise Malformed(
                f"an OACK with non-ASCII option {clean_text(raw_name)!r}={clean_text(raw_value)!r}"
            ) from None
        if name in options:
            raise Malformed(f"an OACK that names option {clean_text(raw_name)!r} twice")
        options[name] = value
    return options


def negotiate(requested: Mapping[str, int], granted: Mapping[str, str]) -> Agreed:
    """What a transfer uses, given the options the client asked for and the server granted.

    RFC 2347: the server may only acknowledge options the client asked for (an unasked
    blksize of 512, the default, is let through). RFC 2348: it may grant a smaller
    `blksize` than requested, never a larger one (the client sized its expectations on
    the request). RFC 2349: `tsize` is the file's size in bytes. Anything else raises
    `Refused`.
    """
    for name, value in granted.items():
        # tftpy's server names blksize 512 unasked: harmless, it is what applies anyway.
        if name not in requested and (name, value) != ("blksize", str(DEFAULT_BLKSIZE)):
            raise Refused(f"the server acknowledged option {shown(name)}, which was not requested")
    agreed = Agreed()
    if "blksize" in requested and "blksize" in granted:
        blksize = _number("blksize", granted["blksize"])
        if blksize > requested["blksize"]:
            raise Refused(
                f"the server granted blksize {blksize}, larger than the "
                f"{requested['blksize']} requested"
            )
        if blksize < MIN_BLKSIZE:
            raise Refused(f"the server granted blksize {blksize}, below the minimum {MIN_BLKSIZE}")
        agreed = Agreed(blksize=blksize)
    if "tsize" in granted:
        agreed = Agreed(blksize=agreed.blksize, tsize=_number("tsize", granted["tsize"]))
    return agreed


def shown(token: str) -> str:
    """An option name or value from the network, quoted and escaped (`'\\x1b[2J'`) so it
    prints safely and exactly, cut to a few dozen characters."""
    if len(token) > _MAX_TOKEN:
        return ascii(token[: _MAX_TOKEN - 3]) + "..."
    return ascii(token)


def _number(name: str, value: str) -> int:
    if not _NUMBER.fullmatch(value):
        raise Refused(f"the server granted {name} {shown(value)}, not a number")
    return int(value)
