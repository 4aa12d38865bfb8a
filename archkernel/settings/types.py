"""The value types of settings: what each kind of value may hold, checked by pydantic.

pydantic reads the `Annotated` metadata (`Check`, `Bounds`) when it builds a validator;
nothing here imports it until then, so importing the settings stays cheap.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from archkernel.units import GiB, MiB

# --- checks pydantic applies (read from `Annotated` metadata when it builds a validator) ----


class Check:
    """Run `func` on a value after pydantic has checked its type (before it, with `before`).

    `func` returns the value (possibly converted) or raises ValueError with a message that
    names the problem; it becomes one line of the settings error.
    """

    __slots__ = ("before", "func")

    def __init__(self, func: Callable[[Any], Any], *, before: bool = False) -> None:
        self.func = func
        self.before = before

    def __get_pydantic_core_schema__(self, source: Any, handler: Callable[[Any], Any]) -> Any:
        from pydantic_core import core_schema

        if self.before:
            return core_schema.no_info_before_validator_function(self.func, handler(source))
        return core_schema.no_info_after_validator_function(self.func, handler(source))


class Bounds:
    """Numeric bounds (`ge`, `le`, `gt`) for an int or float setting."""

    __slots__ = ("bounds",)

    def __init__(self, **bounds: float) -> None:
        self.bounds = bounds

    def __get_pydantic_core_schema__(self, source: Any, handler: Callable[[Any], Any]) -> Any:
        return {**handler(source), **self.bounds}


class Secret:
    """A secret string: shown as `**********`, digested in doit's state, never cached."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    def __str__(self) -> str:
        return "**********"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Callable[[Any], Any]) -> Any:
        from pydantic_core import core_schema

        return core_schema.no_info_after_validator_function(cls, core_schema.str_schema())


# --- validated scalar types --------------------------------------------------------------


def _text(value: str) -> str:
    if "\n" in value or "\r" in value or "\0" in value:
        raise ValueError("must be a single line without NUL characters")
    return value


def _size(value: object) -> int:
    """`30GiB`, `512MiB`, or a bare number of bytes of at least 1 MiB.

    No size setting can be smaller than 1 MiB, so a smaller bare number (`disk_size = 30`)
    is a forgotten unit, not a size in bytes: it is refused.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size; write e.g. 30GiB or 30720MiB")
    if isinstance(value, int):
        if 0 <= value < MiB:
            raise ValueError(
                f"has no unit: write {value}GiB or {value}MiB (a bare number counts bytes)"
            )
        return value
    text = str(value)
    m = re.fullmatch(r"\s*(\d+)\s*(MiB|GiB)\s*", text)
    if not m:
        raise ValueError(f"{text!r} is not a size; write e.g. 30GiB or 30720MiB")
    return int(m.group(1)) * (GiB if m.group(2) == "GiB" else MiB)


def format_size(size: int) -> str:
    """Bytes as the settings file writes them: `30GiB`, `3072MiB`."""
    if size % GiB == 0:
        return f"{size // GiB}GiB"
    if size % MiB == 0:
        return f"{size // MiB}MiB"
    return str(size)


def _pattern(regex: str, what: str) -> Check:
    # Compiled on first use (re caches it): importing this module compiles nothing.
    def check(value: str) -> str:
        _text(value)
        if not re.fullmatch(regex, value):
            raise ValueError(f"{value!r} is not {what}")
        return value

    return Check(check)


def _hostname(value: str) -> str:
    _text(value)
    labels = value.split(".")
    ok = len(value) <= 253 and all(
        re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", label) for label in labels
    )
    if not ok:
        raise ValueError(
            f"{value!r} is not a valid host name (RFC 1123: letters, digits and '-', "
            "labels of 1-63 characters not starting or ending with '-')"
        )
    return value


def _ipv4(value: str) -> str:
    import ipaddress

    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 address") from None
    return value


def _relative_name(value: str) -> str:
    _text(value)
    if not value or value.startswith("/") or ".." in value.split("/"):
        raise ValueError(f"{value!r} must be a relative path without '..'")
    return value


def _system_path(value: str) -> str:
    _text(value)
    if not value.startswith("/") or ".." in value.split("/"):
        raise ValueError(f"{value!r} must be an absolute path without '..'")
    return value


def _path_text(value: Path) -> Path:
    _text(str(value))
    return value


def _cmdline(value: str) -> str:
    _text(value)
    bad = sorted(set(value) & set("\"'`$;\\{}<>|&"))
    if bad or not value.isprintable():
        raise ValueError(
            f"{value!r} may hold only printable characters without quotes or shell/GRUB "
            f"metacharacters (found {''.join(bad) or 'non-printable characters'})"
        )
    return value


def _password_hash(value: Secret) -> Secret:
    raw = value.get_secret_value()
    if not re.fullmatch(r"\$(1|5|6|y|gy|2[abxy]|7)\$[./A-Za-z0-9$=,]+", raw):
        raise ValueError(
            "is not a crypt(3) password hash; make one with `openssl passwd -6` or `mkpasswd`"
        )
    return value


def _azure_disk_size(value: int) -> int:
    if value % MiB:
        raise ValueError(f"'{value}' bytes is not a whole number of MiB (Azure requires it)")
    if value > 1023 * GiB:
        raise ValueError(f"'{format_size(value)}' is larger than Azure's 1023GiB")
    if value < 64 * MiB:
        raise ValueError(f"'{format_size(value)}' is too small; use at least 64MiB")
    return value


# The first day of the Arch Linux Archive's daily repository snapshots (repos/2013/08/31).
FIRST_ARCHIVE_DAY = "2013-08-31"


def _archive_date(value: object) -> str:
    """A day of the Arch Linux Archive as `YYYY-MM-DD`: TOML's bare date (2026-11-30) or
    that text; a real calendar day, not before the archive's first snapshot."""
    import datetime

    if isinstance(value, datetime.date) and not isinstance(value, datetime.datetime):
        value = value.isoformat()
    if not isinstance(value, str):
        raise ValueError("is not a day; write e.g. 2026-11-30 (YYYY-MM-DD, no time)")
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        raise ValueError(f"{value!r} is not a date; write e.g. 2026-11-30 (YYYY-MM-DD)")
    try:
        datetime.date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a day of the calendar") from None
    if value < FIRST_ARCHIVE_DAY:
        raise ValueError(
            f"{value!r} is before the Arch Linux Archive's first snapshot ({FIRST_ARCHIVE_DAY})"
        )
    return value


Text = Annotated[str, Check(_text)]
HostName = Annotated[str, Check(_hostname)]
IPv4 = Annotated[str, Check(_ipv4)]
UserName = Annotated[
    str,
    _pattern(r"[a-z_][a-z0-9_-]{0,30}\$?", "a valid user name (useradd: lower case, digits, _ -)"),
]
PackageName = Annotated[
    str,
    _pattern(r"[a-z0-9@_+][a-z0-9@._+-]{0,127}", "a valid pacman package name"),
]
ModuleName = Annotated[str, _pattern(r"[A-Za-z0-9_-]{1,64}", "a kernel module name")]
Locale = Annotated[
    str, _pattern(r"[A-Za-z]{2,3}(_[A-Za-z]{2})?(\.[A-Za-z0-9-]+)?(@\w+)?|C|POSIX", "a locale")
]
TimeZone = Annotated[
    str,
    _pattern(r"[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+)*", "a time zone such as Europe/Paris"),
]
Keymap = Annotated[str, _pattern(r"[A-Za-z0-9_.-]{1,64}", "a console keymap name such as us")]
Tag = Annotated[str, _pattern(r"[A-Za-z0-9_.:=-]{1,128}", "a tag name")]
MirrorURL = Annotated[
    str,
    _pattern(r"(https?|ftp|file)://[A-Za-z0-9._~:/?#@!*+,=%$-]+", "an http(s), ftp or file URL"),
]
SSHKey = Annotated[
    str,
    _pattern(
        r"(ssh-(rsa|ed25519|dss)|ecdsa-sha2-nistp(256|384|521)|sk-[a-z0-9@.-]+) "
        r"[A-Za-z0-9+/]+={0,3}( [^\n\r\0]*)?",
        "an SSH public key line (type, base64 key, optional comment)",
    ),
]
SHA256 = Annotated[str, _pattern(r"[0-9a-f]{64}", "a SHA-256 hex digest")]
RelativeName = Annotated[str, Check(_relative_name)]
SystemPath = Annotated[str, Check(_system_path)]
Cmdline = Annotated[str, Check(_cmdline)]
FileName = Annotated[
    str, _pattern(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}", "a plain file name (no directories)")
]
OneLinePath = Annotated[Path, Check(_path_text)]
DiskSize = Annotated[int, Check(_size, before=True), Check(_azure_disk_size)]
ArchiveDate = Annotated[str, Check(_archive_date, before=True)]
# A crypt(3) hash such as `$6$salt$...` or `$y$...`; never a plain password.
PasswordHash = Annotated[Secret, Check(_password_hash)]
