"""One TFTP download: the lockstep exchange of DATA and ACK packets, trusting nothing.

`Transfer.run` is the client side of RFC 1350 with RFC 2347 options, on one UDP socket.
It accepts packets only from the server's address and, once the server's first reply
has fixed it, only from that transfer ID; any other sender gets ERROR 5 ("unknown
transfer ID") and the transfer goes on. It refuses a granted blksize larger than
requested and DATA larger than agreed, stops at a size cap, at an overall deadline and
as soon as the bytes disagree with the announced tsize, and tells the server why when it
stops. Every failure is a one-line `UserError`; the server's own text appears only
cleaned. `archkernel.host.tftp` is the interface; the packets are
`archkernel.formats.tftp_packets`.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from typing import TYPE_CHECKING, Protocol

from archkernel.errors import UserError
from archkernel.formats import tftp_packets as packets
from archkernel.formats.tftp_packets import Agreed
from archkernel.log import log
from archkernel.units import MiB

if TYPE_CHECKING:
    from archkernel.host.tftp import TftpServer

# Larger than any UDP payload over IPv4, so an oversized DATA packet is seen whole.
RECV_BUFFER = 65536


class Sink(Protocol):
    """Where a download goes: a binary file, a BytesIO, ..."""

    def write(self, data: memoryview, /) -> object: ...


# What one packet did to the transfer: moved it on, ended it, or neither.
_PROGRESS, _DONE, _NOTHING = "progress", "done", "nothing"


class Transfer:
    """One download: the state of the lockstep exchange of DATA and ACK packets."""

    def __init__(
        self,
        sock: socket.socket,
        server: TftpServer,
        address: str,
        remote: str,
        out: Sink,
        *,
        timeout: float,
        retries: int,
        blksize: int,
        max_size: int,
        deadline: float,
    ) -> None:
        self.sock = sock
        self.server = server
        self.address = address
        self.remote = remote
        self.out = out
        self.timeout = timeout
        self.retries = retries
        self.max_size = max_size
        self.deadline = deadline
        self.requested: dict[str, int] = {"tsize": 0}
        if blksize != packets.DEFAULT_BLKSIZE:
            self.requested["blksize"] = blksize
        # The server's transfer ID: the address and port of its first reply.
        self.peer: tuple[str, int] | None = None
        self.agreed: Agreed | None = None  # set by an OACK, or by a first DATA without one
        self.expected = 1  # the next DATA block; block numbers wrap to 0 after 65535
        self.acked: int | None = None  # the last DATA block acknowledged
        self.received = 0
        self.last = packets.read_request(remote, self.requested)  # resent on a timeout
        self.heard = False  # the server sent something since the last progress
        self.strays = 0

    @property
    def what(self) -> str:
        return f"{self.remote} from {self.server}"

    @property
    def peer_text(self) -> str:
        return f"{self.peer[0]}:{self.peer[1]}" if self.peer else str(self.server)

    def run(self) -> int:
        """Exchange packets until the last block; return the file's size."""
        now = time.monotonic()
        end = now + self.deadline
        self._send(self.last)
        resend_at, resends = now + self.timeout, 0
        buffer = bytearray(RECV_BUFFER)
        view = memoryview(buffer)
        wait_for = _Wait(self.sock)
        while True:
            now = time.monotonic()
            if now >= end:
                self._abort(packets.NOT_DEFINED, "Transfer deadline exceeded")
                raise self._deadline_error()
            if now >= resend_at:
                if resends == self.retries:
                    raise self._silence_error()
                resends += 1
                self._send(self.last)
                resend_at = now + self.timeout
                continue
            wait_for(min(resend_at, end) - now)
            try:
                size, source = self.sock.recvfrom_into(buffer)
            except (TimeoutError, BlockingIOError):  # see _Wait
                continue
            if source != self.peer and (self.peer is not None or source[0] != self.address):
                self._stray(source)
                continue
            if size >= 4 and buffer[1] == packets.DATA and not buffer[0]:
                outcome = self._data(view[:size], source)  # most packets: skip the dispatch
            else:
                outcome = self._handle(view[:size], source)
            if outcome is _DONE:
                return self.received
            if outcome is _PROGRESS:
                resend_at, resends = time.monotonic() + self.timeout, 0
                self.heard = False
            else:
                self.heard = True

    def _handle(self, packet: memoryview, source: tuple[str, int]) -> str:
        """Act on one packet from the server."""
        if len(packet) < 2:
            raise self._protocol_error(f"a packet of {len(packet)} byte(s)")
        opcode = packet[0] << 8 | packet[1]
        if opcode == packets.DATA and len(packet) >= packets.HEADER.size:
            return self._data(packet, source)
        if opcode == packets.OACK:
            return self._oack(packet, source)
        if opcode == packets.ERROR:
            try:
                code, message = packets.parse_error(bytes(packet))
            except packets.Malformed as exc:
                raise self._protocol_error(str(exc)) from None
            raise self._server_error(code, message)
        names = {packets.RRQ: "read request", packets.WRQ: "write request", packets.ACK: "ACK"}
        name = names.get(opcode, "DATA" if opcode == packets.DATA else f"opcode {opcode}")
        raise self._protocol_error(f"an unexpected {name} packet of {len(packet)} bytes")

    def _data(self, packet: memoryview, source: tuple[str, int]) -> str:
        _, block = packets.HEADER.unpack_from(packet)
        if self.agreed is None:
            if block != 1:
                raise self._protocol_error(f"DATA block {block} as its first reply")
            self.peer = source
            self.agreed = Agreed()  # no OACK: the server ignored every option
            log.debug("tftp: %s ignored the options %s", self.server, self.requested)
        length = len(packet) - packets.HEADER.size
        if length > self.agreed.blksize:
            self._abort(packets.ILLEGAL_OPERATION, "DATA larger than the block size")
            raise UserError(
                f"TFTP server {self.server} sent {self.remote} in a DATA packet of {length} "
                f"bytes, larger than the agreed blksize {self.agreed.blksize}",
                _MISBEHAVING,
            )
        if block != self.expected:
            if block == self.acked:
                self._send(self.last)  # our ACK was lost: the server sends the block again
            return _NOTHING
        self._take(packet[packets.HEADER.size :], length)
        self.acked, self.expected = block, (block + 1) & 0xFFFF
        self.last = packets.ack(block)
        self._send(self.last)
        if length < self.agreed.blksize:
            self._check_complete()
            return _DONE
        return _PROGRESS

    def _take(self, payload: memoryview, length: int) -> None:
        """Write one block, unless it takes the file past the cap or the announced size."""
        total = self.received + length
        if total > self.max_size:
            self._abort(packets.DISK_FULL, "File too large")
            raise self._too_large(f"it is larger than the limit of {_bytes(self.max_size)}")
        tsize = self.agreed.tsize if self.agreed else None
        if tsize is not None and total > tsize:
            self._abort(packets.ILLEGAL_OPERATION, "More data than the announced size")
            raise UserError(
                f"transfer of {self.what} is longer than announced: got {total} bytes, "
                f"the server announced {tsize}",
                "the file may have changed on the server during the transfer; try again",
            )
        try:
            self.out.write(payload)
        except OSError as exc:
            self._abort(packets.DISK_FULL, "Cannot store the file")
            raise UserError(
                f"cannot store {self.what}: {exc.strerror or exc}",
                "check the free space and permissions of the work directory",
            ) from exc
        self.received = total

    def _check_complete(self) -> None:
        tsize = self.agreed.tsize if self.agreed else None
        if tsize is not None and self.received < tsize:
            raise UserError(
                f"transfer of {self.what} truncated: got {self.received} of {tsize} bytes "
                "the server announced",
                "the server ended the transfer early; try again",
            )

    def _oack(self, packet: memoryview, source: tuple[str, int]) -> str:
        if self.agreed is not None:
            if self.received == 0 and self.acked is None:
                self._send(self.last)  # our ACK of the OACK was lost: acknowledge it again
                return _NOTHING
            raise self._protocol_error("an OACK in the middle of the transfer")
        self.peer = source
        try:
            self.agreed = packets.negotiate(self.requested, packets.parse_oack(bytes(packet)))
        except packets.Malformed as exc:
            raise self._protocol_error(str(exc)) from None
        except packets.Refused as exc:
            self._abort(packets.OPTIONS_REFUSED, "Option negotiation refused")
            raise UserError(
                f"TFTP server {self.server} broke option negotiation for {self.remote}: {exc}",
                _MISBEHAVING,
            ) from None
        tsize = self.agreed.tsize
        if tsize is not None and tsize > self.max_size:
            self._abort(packets.DISK_FULL, "File too large")
            raise self._too_large(
                f"the server announced {_bytes(tsize)}, more than the limit of "
                f"{_bytes(self.max_size)}"
            )
        log.debug("tftp: %s agreed to %s", self.server, self.agreed)
        self.last = packets.ack(0)
        self._send(self.last)
        return _PROGRESS

    def _send(self, packet: bytes) -> None:
        destination = self.peer or (self.address, self.server.port)
        try:
            self.sock.sendto(packet, destination)
        except OSError as exc:
            raise UserError(
                f"cannot reach TFTP server {self.server} for {self.remote}: {exc.strerror or exc}",
                "check that the network is up and the boot server address is right",
            ) from exc

    def _abort(self, code: int, message: str) -> None:
        """Tell the server the transfer is over (best effort: we stop either way)."""
        if self.peer is not None:
            with contextlib.suppress(OSError):
                self.sock.sendto(packets.error(code, message), self.peer)

    def _stray(self, source: tuple[str, int]) -> None:
        """RFC 1350: a packet from another TID is answered with an error, and the
        transfer goes on undisturbed."""
        self.strays += 1
        with contextlib.suppress(OSError):
            self.sock.sendto(packets.error(packets.UNKNOWN_TID, "Unknown transfer ID"), source)

    # --- errors ---------------------------------------------------------------------------

    def _protocol_error(self, what: str) -> UserError:
        self._abort(packets.ILLEGAL_OPERATION, "Illegal TFTP operation")
        return UserError(
            f"TFTP protocol error fetching {self.what}: the server sent {what}",
            "the server sent something unexpected; try again, or a smaller blksize",
        )

    def _too_large(self, why: str) -> UserError:
        return UserError(
            f"refusing {self.what}: {why}",
            "if the file really is that large, raise the limit (scaleway.tftp_max_size)",
        )

    def _deadline_error(self) -> UserError:
        if self.peer is None:
            return UserError(
                f"no answer from {self.server} for {self.remote} within the "
                f"{self.deadline:g}s deadline",
                "check the boot server address and that UDP port "
                f"{self.server.port} is reachable (no firewall in between)",
            )
        return UserError(
            f"transfer of {self.what} did not finish within the {self.deadline:g}s deadline "
            f"(got {self.received} bytes)",
            "the server sends too slowly; check the network, or raise the deadline "
            "(scaleway.tftp_deadline)",
        )

    def _silence_error(self) -> UserError:
        """The error for a server that went quiet: never answered, or stopped mid-transfer."""
        tries = _retries(self.retries)
        if self.peer is None:
            return UserError(
                f"no answer from {self.server} for {self.remote} within {self.timeout:g}s "
                f"({tries})",
                "check the boot server address and that UDP port "
                f"{self.server.port} is reachable (no firewall in between)",
            )
        if self.heard:
            why = f"no new data for {self.timeout * (self.retries + 1):g}s"
        else:
            why = f"no data within {self.timeout:g}s ({tries})"
        hint = "the server stopped sending; try again"
        if self.received == 0:
            hint += ", or lower blksize if large packets are dropped on the way"
        return UserError(
            f"transfer of {self.what} interrupted after {self.received} bytes: {why}", hint
        )

    def _server_error(self, code: int, message: str) -> UserError:
        """The error for a TFTP ERROR packet the server sent (its text is cleaned)."""
        detail = f"TFTP error {code}"
        if message:
            detail += f": {message}"
        elif code in packets.ERROR_NAMES:
            detail += f": {packets.ERROR_NAMES[code]}"
        if code == packets.FILE_NOT_FOUND:
            return UserError(
                f"{self.remote} not found on TFTP server {self.server} ({detail})",
                "check the file name; the server picks files per client, so check the "
                "boot server address too",
            )
        if self.received:
            return UserError(
                f"transfer of {self.what} aborted after {self.received} bytes ({detail})",
                "the server gave up mid-transfer; try again",
            )
        hint = "see the server's message; its logs may say more"
        if code == packets.OPTIONS_REFUSED:
            hint = "the server refused the requested options; try blksize 512"
        return UserError(f"TFTP server {self.server} refused {self.remote} ({detail})", hint)


_MISBEHAVING = (
    "the server does not follow the TFTP standard (RFC 1350, 2347, 2348); check that it "
    "is the right boot server, or try blksize 512"
)


class _Wait:
    """Bounds the socket's next receive to `seconds` (call it before each receive).

    Python polls before every receive on a socket with a timeout; a blocking socket
    bounded by the kernel's SO_RCVTIMEO spares that system call per packet (a timeout
    then raises BlockingIOError). The option is set only when the bound changes by more
    than a millisecond: once per packet at most, not at all while blocks flow. Where the
    C library's `struct timeval` is not two longs (the value read back differs), the
    socket keeps Python's timeouts (TimeoutError).
    """

    _TIMEVAL = struct.Struct("@ll")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.current = -1.0
        self.kernel = self._set(1.5) and self.sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_RCVTIMEO, self._TIMEVAL.size
        ) == self._TIMEVAL.pack(1, 500_000)
        if self.kernel:
            sock.settimeout(None)

    def __call__(self, seconds: float) -> None:
        if not self.kernel:
            self.sock.settimeout(seconds)
        elif abs(seconds - self.current) > 0.001:
            self._set(seconds)
            self.current = seconds

    def _set(self, seconds: float) -> bool:
        # At least 1 µs: a zero timeval means "wait forever".
        whole, micros = divmod(max(round(seconds * 1_000_000), 1), 1_000_000)
        try:
            self.sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVTIMEO, self._TIMEVAL.pack(whole, micros)
            )
        except OSError:
            return False
        return True


def _bytes(n: int) -> str:
    return f"{n} bytes" if n < MiB or n % MiB else f"{n // MiB} MiB"


def _retries(n: int) -> str:
    return f"{n} retry" if n == 1 else f"{n} retries"
