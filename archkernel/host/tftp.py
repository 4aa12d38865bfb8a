"""TFTP: fetch the bootscript and the initrd from the provider's boot server.

`fetch` downloads one file into memory with tftpy's client and turns every way a
transfer can fail into a one-line `UserError`; `fetch_to` stores the result without
touching an identical file. `bootserver_from_pnp` and `choose_server` decide which
server to ask; they only look at text, so they are tested with plain tables.
"""

from __future__ import annotations

import io
import ipaddress
import logging
import math
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import tftpy

from archkernel.errors import UserError
from archkernel.host.files import write_if_changed
from archkernel.log import log

DEFAULT_PORT = 69
DEFAULT_TIMEOUT = 5.0
DEFAULT_RETRIES = 2
# 1500-byte Ethernet MTU - 20 (IPv4) - 8 (UDP) - 4 (TFTP header): the largest block
# that crosses a LAN without IP fragmentation, and 3x fewer round trips than 512.
DEFAULT_BLKSIZE = 1468
MIN_BLKSIZE = 8
MAX_BLKSIZE = 65464  # RFC 2348
# A read request must fit the 512-byte buffer servers read it into, options included.
MAX_REMOTE_LENGTH = 460
PNP_PATH = Path("/proc/net/pnp")

ServerSource = Literal["settings", "/proc/net/pnp", "fallback"]

# RFC 1350 and RFC 2347 error codes, for messages.
_TFTP_ERRORS = {
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


def fetch(server: TftpServer, remote: str, *, timeout: float, retries: int, blksize: int) -> bytes:
    """Download `remote` from `server` into memory and return its bytes.

    `timeout` is how long to wait for each packet, `retries` how many times to resend
    before giving up, so a silent server fails after `timeout * (retries + 1)` seconds;
    a transfer that makes no progress for that long fails too, whatever the server
    sends meanwhile. `blksize` is requested with the RFC 2348 option (the server may
    grant less); `tsize` is always requested so that a file that ends early is caught
    when the server supports the option (tftpd-hpa does). Every failure is a one-line
    UserError naming the server and the file; nothing is written anywhere.
    """
    check_remote(remote)
    _check_options(timeout, retries, blksize)
    address = _ipv4_address(server)
    # tftpy logs every packet and warns about errors it handles; we report them ourselves.
    logging.getLogger("tftpy").setLevel(logging.CRITICAL)

    out = io.BytesIO()
    watch = _Watch(out, stall_after=timeout * (retries + 1))
    options: dict[str, int] = {"tsize": 0}
    if blksize != 512:
        options["blksize"] = blksize
    client = tftpy.TftpClient(address, server.port, options=options)
    what = f"{remote} from {server}"
    log.debug(
        "tftp: fetching %s (blksize %d, timeout %gs, %d retries)", what, blksize, timeout, retries
    )
    try:
        # tftpy counts attempts, not resends: `retries` resends are `retries + 1` tries.
        client.download(remote, out, packethook=watch.hook, timeout=timeout, retries=retries + 1)
    except _Stalled as exc:
        raise _silence_error(server, remote, watch, timeout, retries, stalled=True) from exc
    except tftpy.TftpTimeout as exc:
        raise _silence_error(server, remote, watch, timeout, retries, stalled=False) from exc
    except OSError as exc:
        raise UserError(
            f"cannot reach TFTP server {server} for {remote}: {exc.strerror or exc}",
            "check that the network is up and the boot server address is right",
        ) from exc
    except Exception as exc:
        # tftpy raises TftpException for protocol errors, and ValueError, struct.error
        # or AttributeError when a packet is malformed: all mean the server misbehaved.
        if watch.error is not None:
            raise _server_error(server, remote, watch) from exc
        raise UserError(
            f"TFTP protocol error fetching {what}: {exc}",
            "the server sent something unexpected; try again, or a smaller blksize",
        ) from exc

    data = out.getvalue()
    if watch.tsize is not None and len(data) < watch.tsize:
        raise UserError(
            f"transfer of {what} truncated: got {len(data)} of {watch.tsize} bytes "
            "the server announced",
            "the server ended the transfer early; try again",
        )
    if watch.tsize is not None and len(data) > watch.tsize:
        raise UserError(
            f"transfer of {what} is longer than announced: got {len(data)} bytes, "
            f"the server announced {watch.tsize}",
            "the file may have changed on the server during the transfer; try again",
        )
    log.debug("tftp: got %d bytes of %s", len(data), what)
    return data


def fetch_to(
    server: TftpServer,
    remote: str,
    dest: Path,
    *,
    timeout: float,
    retries: int,
    blksize: int,
    mode: int = 0o644,
) -> bool:
    """Fetch `remote` and store it at `dest` unless `dest` already holds the same bytes.

    An identical file keeps its mtime, so the steps that read it stay up to date.
    Returns True when `dest` was (re)written. On any failure `dest` is left as it was.
    """
    data = fetch(server, remote, timeout=timeout, retries=retries, blksize=blksize)
    return write_if_changed(dest, data, mode)


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


class _Stalled(Exception):
    """Raised from the packet hook: no new data within the stall limit."""


class _Watch:
    """tftpy packet hook: notes what the server said and stops a stalled transfer.

    tftpy calls it with every packet it receives (before handling it) and with every
    packet it resends after a timeout, so it runs at least once per `timeout`.
    """

    def __init__(self, out: io.BytesIO, stall_after: float) -> None:
        self.out = out
        self.stall_after = stall_after
        self.answered = False
        self.tsize: int | None = None
        self.error: tuple[int, str] | None = None
        self._size = 0
        self._progress_at = time.monotonic()

    def hook(self, pkt: Any) -> None:
        if isinstance(pkt, tftpy.TftpPacketTypes.TftpPacketDAT):
            self.answered = True
        elif isinstance(pkt, tftpy.TftpPacketTypes.TftpPacketOACK):
            self.answered = True
            tsize = pkt.options.get("tsize")
            if isinstance(tsize, str) and tsize.isdigit():
                self.tsize = int(tsize)
        elif isinstance(pkt, tftpy.TftpPacketTypes.TftpPacketERR):
            self.answered = True
            message = pkt.errmsg.decode("ascii", "replace") if pkt.errmsg else ""
            self.error = (pkt.errorcode, message.strip())
        now = time.monotonic()
        size = self.out.tell()
        if size != self._size:
            self._size = size
            self._progress_at = now
        elif now - self._progress_at > self.stall_after:
            raise _Stalled

    @property
    def received(self) -> int:
        """Bytes of the file received so far."""
        return self.out.tell()


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
    """The numeric IPv4 address of `server` (tftpy speaks IPv4 only)."""
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


def _silence_error(
    server: TftpServer, remote: str, watch: _Watch, timeout: float, retries: int, *, stalled: bool
) -> UserError:
    """The error for a server that went quiet: never answered, or stopped mid-transfer."""
    if not watch.answered:
        return UserError(
            f"no answer from {server} for {remote} within {timeout:g}s ({_retries(retries)})",
            "check the boot server address and that UDP port "
            f"{server.port} is reachable (no firewall in between)",
        )
    why = (
        f"no new data for {watch.stall_after:g}s"
        if stalled
        else (f"no data within {timeout:g}s ({_retries(retries)})")
    )
    hint = "the server stopped sending; try again"
    if watch.received == 0:
        hint += ", or lower blksize if large packets are dropped on the way"
    return UserError(
        f"transfer of {remote} from {server} interrupted after {watch.received} bytes: {why}",
        hint,
    )


def _retries(n: int) -> str:
    return f"{n} retry" if n == 1 else f"{n} retries"


def _server_error(server: TftpServer, remote: str, watch: _Watch) -> UserError:
    """The error for a TFTP ERROR packet the server sent."""
    assert watch.error is not None
    code, message = watch.error
    detail = f"TFTP error {code}"
    if message:
        detail += f": {message}"
    elif code in _TFTP_ERRORS:
        detail += f": {_TFTP_ERRORS[code]}"
    if code == 1:
        return UserError(
            f"{remote} not found on TFTP server {server} ({detail})",
            "check the file name; the server picks files per client, so check the "
            "boot server address too",
        )
    if watch.received:
        return UserError(
            f"transfer of {remote} from {server} aborted after {watch.received} bytes ({detail})",
            "the server gave up mid-transfer; try again",
        )
    hint = "see the server's message; its logs may say more"
    if code == 8:
        hint = "the server refused the requested options; try blksize 512"
    return UserError(f"TFTP server {server} refused {remote} ({detail})", hint)
