"""TFTP: fetch the bootscript and the initrd from the provider's boot server.

The files come from the network at boot, as root, so the client trusts nothing (see
`archkernel.host.tftp_transfer`: transfer ID pinning, block size and size limits, an
overall deadline, cleaned server text). `download` streams a file into a file object,
`fetch` into memory; `fetch_to` streams into a temporary file beside the destination and
keeps an identical file untouched. Every failure is a one-line `UserError`.
`bootserver_from_pnp` and `choose_server` decide which server to ask; they only look at
text, so they are tested with plain tables.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from archkernel.errors import UserError
from archkernel.formats.tftp_packets import MAX_BLKSIZE as MAX_BLKSIZE
from archkernel.formats.tftp_packets import MIN_BLKSIZE as MIN_BLKSIZE
from archkernel.host.files import atomic_path
from archkernel.host.tftp_transfer import Sink, Transfer
from archkernel.log import log
from archkernel.units import MiB

DEFAULT_PORT = 69
DEFAULT_TIMEOUT = 5.0
DEFAULT_RETRIES = 2
# 1500-byte Ethernet MTU - 20 (IPv4) - 8 (UDP) - 4 (TFTP header): the largest block
# that crosses a LAN without IP fragmentation, and 3x fewer round trips than 512.
DEFAULT_BLKSIZE = 1468
# Far above a real initrd (tens of MiB), far below what would fill a disk or memory.
DEFAULT_MAX_SIZE = 256 * MiB
# Seconds one transfer may take in all, however steadily the server trickles.
DEFAULT_DEADLINE = 300.0
# A read request must fit the 512-byte buffer servers read it into, options included.
MAX_REMOTE_LENGTH = 460
PNP_PATH = Path("/proc/net/pnp")

ServerSource = Literal["settings", "/proc/net/pnp", "fallback"]


@dataclass(frozen=True)
class TftpServer:
    """A TFTP server: an IPv4 address (or a name resolving to one) and its UDP port."""

    host: str
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def check_remote(remote: str) -> str:
    """Return `remote` if it is a safe relative file name to request, else raise UserError.

    Refused before anything is sent: empty or overlong names, absolute paths, `..`
    components (with `/` or `\\` as separator) and anything but printable ASCII
    (NUL and newlines included), which TFTP cannot carry.
    """
    shown = repr(remote)
    hint = "name a file relative to the TFTP server's root, e.g. 'uboot.bootscript'"
    if not remote:
        raise UserError("refusing to fetch an empty TFTP file name", hint)
    bad = [c for c in remote if not " " <= c <= "~"]
    if bad:
        raise UserError(
            f"refusing to fetch TFTP file {shown}: it contains {bad[0]!r}, "
            "which is not printable ASCII",
            hint,
        )
    if len(remote) > MAX_REMOTE_LENGTH:
        raise UserError(
            f"refusing to fetch TFTP file {remote[:40]!r}...: the name is longer than "
            f"{MAX_REMOTE_LENGTH} characters",
            hint,
        )
    if remote.startswith(("/", "\\")):
        raise UserError(f"refusing to fetch TFTP file {shown}: it is an absolute path", hint)
    if ".." in remote.replace("\\", "/").split("/"):
        raise UserError(f"refusing to fetch TFTP file {shown}: it has a '..' component", hint)
    return remote


def fetch(
    server: TftpServer,
    remote: str,
    *,
    timeout: float,
    retries: int,
    blksize: int,
    max_size: int = DEFAULT_MAX_SIZE,
    deadline: float = DEFAULT_DEADLINE,
) -> bytes:
    """Download `remote` from `server` into memory and return its bytes (see `download`)."""
    out = io.BytesIO()
    download(
        server,
        remote,
        out,
        timeout=timeout,
        retries=retries,
        blksize=blksize,
        max_size=max_size,
        deadline=deadline,
    )
    return out.getvalue()


def fetch_to(
    server: TftpServer,
    remote: str,
    dest: Path,
    *,
    timeout: float,
    retries: int,
    blksize: int,
    max_size: int = DEFAULT_MAX_SIZE,
    deadline: float = DEFAULT_DEADLINE,
    mode: int = 0o644,
) -> bool:
    """Fetch `remote` into `dest` unless `dest` already holds the same bytes.

    The download is compared with `dest` as it comes: nothing is written while the two
    agree, so an unchanged file costs no write at all (not even a temporary file on an
    NBD root) and keeps its mtime, which keeps the steps that read it up to date. From
    the first difference on, the new content streams into a temporary file beside
    `dest`, renamed over it once complete. Returns True when `dest` was (re)written. On
    any failure, Ctrl-C included, `dest` is left as it was and the temporary file is gone.
    """
    _check_request(remote, timeout, retries, blksize, max_size, deadline)
    try:
        with atomic_path(dest) as tmp, _Replacement(dest, tmp, mode) as out:
            download(
                server,
                remote,
                out,
                timeout=timeout,
                retries=retries,
                blksize=blksize,
                max_size=max_size,
                deadline=deadline,
            )
            if not out.changed():
                raise _Unchanged
    except _Unchanged:
        return False
    return True


def download(
    server: TftpServer,
    remote: str,
    out: Sink,
    *,
    timeout: float,
    retries: int,
    blksize: int,
    max_size: int = DEFAULT_MAX_SIZE,
    deadline: float = DEFAULT_DEADLINE,
) -> int:
    """Stream `remote` from `server` into `out`; return the number of bytes written.

    `timeout` is how long to wait for each packet and `retries` how many times to resend
    before giving up, so a silent server fails after `timeout * (retries + 1)` seconds,
    and so does a transfer that makes no progress for that long, whatever the server
    sends meanwhile. `deadline` bounds the whole transfer, so a server that trickles a
    block just inside `timeout` cannot hold the boot forever. `blksize` is requested
    with the RFC 2348 option (the server may grant less, never more) and `tsize` always,
    so a file that ends early or runs long is caught when the server supports the option
    (tftpd-hpa does). More than `max_size` bytes, announced or received, stop the
    transfer. Every failure is a one-line UserError naming the server and the file;
    `out` may then hold part of the file.
    """
    _check_request(remote, timeout, retries, blksize, max_size, deadline)
    address = _ipv4_address(server)
    log.debug(
        "tftp: fetching %s from %s (blksize %d, timeout %gs, %d retries)",
        remote,
        server,
        blksize,
        timeout,
        retries,
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        transfer = Transfer(
            sock,
            server,
            address,
            remote,
            out,
            timeout=timeout,
            retries=retries,
            blksize=blksize,
            max_size=max_size,
            deadline=deadline,
        )
        try:
            size = transfer.run()
        finally:
            if transfer.strays:
                log.warning(
                    "tftp: ignored %d packet(s) for %s from senders other than %s (they "
                    "were told 'unknown transfer ID')",
                    transfer.strays,
                    remote,
                    transfer.peer_text,
                )
    log.debug("tftp: got %d bytes of %s from %s", size, remote, server)
    return size


def bootserver_from_pnp(text: str) -> str | None:
    """The TFTP server the kernel's DHCP/BOOTP answer named in /proc/net/pnp, if any.

    Only `bootserver A.B.C.D` lines count (`#PROTO`, `domain` and `nameserver` lines are
    ignored); `0.0.0.0` means none, and a line that is not an IPv4 address is ignored
    with a warning.
    """
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0] != "bootserver":
            continue
        try:
            address = ipaddress.IPv4Address(fields[1])
        except ValueError:
            log.warning("ignoring 'bootserver %s' in /proc/net/pnp: not an IPv4 address", fields[1])
            continue
        if address.is_unspecified:
            continue
        return str(address)
    return None


def read_pnp(path: Path = PNP_PATH) -> str | None:
    """The text of /proc/net/pnp, or None when the kernel did no IP autoconfiguration."""
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise UserError(
            f"cannot read {path}: {exc.strerror or exc}",
            "run as root, or set the boot server address in the settings",
        ) from exc


def choose_server(
    configured: str | None, pnp_text: str | None, fallback: str
) -> tuple[str, ServerSource]:
    """Pick the boot server's address and say where it came from.

    A configured address wins, then the `bootserver` of /proc/net/pnp, then `fallback`
    (for the Scaleway C1, 10.1.31.34).
    """
    if configured is not None and configured.strip():
        return configured.strip(), "settings"
    if pnp_text is not None:
        found = bootserver_from_pnp(pnp_text)
        if found is not None:
            return found, "/proc/net/pnp"
    return fallback, "fallback"


class _Unchanged(Exception):
    """Raised inside `atomic_path` to drop a download identical to the file it would replace."""


class _Replacement:
    """Where `fetch_to` streams a download: nothing is written while the bytes agree with
    `dest`; at the first difference, a temporary file `tmp` is started with the common
    prefix (copied from `dest`) and takes the rest."""

    def __init__(self, dest: Path, tmp: Path, mode: int) -> None:
        self.dest = dest
        self.tmp = tmp
        self.mode = mode
        self.same = 0  # bytes so far equal to the start of dest
        self.new: BinaryIO | None = None
        self.old: BinaryIO | None = None
        with contextlib.suppress(OSError):  # missing, or not a readable file: all new
            self.old = open(dest, "rb")  # noqa: SIM115 (closed in close())

    def __enter__(self) -> _Replacement:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def write(self, data: memoryview, /) -> int:
        if self.new is None:
            if self.old is not None and self.old.read(len(data)) == data:
                self.same += len(data)
                return len(data)
            self._diverge()
        assert self.new is not None
        return self.new.write(data)

    def changed(self) -> bool:
        """After the last write: whether `dest` must be replaced (the temporary file then
        holds the whole new content)."""
        if self.new is None:
            if self.old is not None and not self.old.read(1):
                return False
            self._diverge()  # dest is missing or longer: the new content is the prefix
        return True

    def close(self) -> None:
        for f in (self.new, self.old):
            if f is not None:
                f.close()

    def _diverge(self) -> None:
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, self.mode)
        os.fchmod(fd, self.mode)  # whatever the umask
        self.new = os.fdopen(fd, "wb", buffering=MiB)
        if self.old is not None and self.same:
            self.old.seek(0)
            left = self.same
            while left:
                chunk = self.old.read(min(left, MiB))
                if not chunk:
                    raise UserError(f"{self.dest} shrank while a download was compared with it")
                self.new.write(chunk)
                left -= len(chunk)


def _check_request(
    remote: str, timeout: float, retries: int, blksize: int, max_size: int, deadline: float
) -> None:
    check_remote(remote)
    _check_options(timeout, retries, blksize)
    if max_size < 0:
        raise UserError(f"invalid TFTP size limit {max_size!r}", "use a number of bytes")
    if not (math.isfinite(deadline) and deadline > 0):
        raise UserError(f"invalid TFTP deadline {deadline!r}", "use a positive number of seconds")


def _check_options(timeout: float, retries: int, blksize: int) -> None:
    if not (math.isfinite(timeout) and timeout > 0):
        raise UserError(f"invalid TFTP timeout {timeout!r}", "use a positive number of seconds")
    if retries < 0:
        raise UserError(f"invalid TFTP retries {retries!r}", "use 0 or more")
    if not MIN_BLKSIZE <= blksize <= MAX_BLKSIZE:
        raise UserError(
            f"invalid TFTP blksize {blksize!r}",
            f"use {MIN_BLKSIZE} to {MAX_BLKSIZE}; {DEFAULT_BLKSIZE} suits an Ethernet LAN",
        )


def _ipv4_address(server: TftpServer) -> str:
    """The numeric IPv4 address of `server` (the client speaks IPv4 only)."""
    if not 0 < server.port < 65536:
        raise UserError(f"invalid TFTP server port {server.port!r}", "use 1 to 65535 (TFTP: 69)")
    try:
        infos = socket.getaddrinfo(server.host, server.port, socket.AF_INET, socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UserError(
            f"TFTP server {server.host!r} is not an IPv4 address or a name that resolves to one",
            "set the boot server to an IPv4 address such as 10.1.31.34",
        ) from exc
    return str(infos[0][4][0])
