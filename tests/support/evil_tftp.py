"""A malicious TFTP server for tests: a UDP server on 127.0.0.1 that misbehaves on purpose.

`evil_tftp_servers()` yields `start(behaviour)`, which runs a server on a free port; it
answers every read request with its behaviour, one of the scripted misbehaviours below
(or `Honest`, the baseline). What the client sent back is recorded on the `EvilServer`
handle: the requests, the ERROR packets it sent (to the transfer's socket or to a
spoofer's) and how many DATA blocks it acknowledged. Packets are built here by hand, not
with archkernel's code, so a test does not trust what it tests. The `evil_tftp` fixture
(tests/conftest.py) wraps it.

Every wait is bounded and every behaviour ends by itself (an endless sender gives up
after `give_up_after` bytes), so a client without the protection a test checks fails
the test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

LOOPBACK = "127.0.0.1"
# Another address of this machine (Linux routes all of 127/8 to lo): a spoofer elsewhere.
OTHER_LOOPBACK = "127.0.0.2"
RRQ, DATA, ACK, ERROR, OACK = 1, 3, 4, 5, 6
# How long the server waits for an ACK before it resends, and how often it resends.
ACK_TIMEOUT = 0.5
SENDS = 3


def data_packet(block: int, payload: bytes) -> bytes:
    return struct.pack("!HH", DATA, block & 0xFFFF) + payload


def oack_packet(options: tuple[tuple[str, str], ...]) -> bytes:
    body = b"".join(name.encode() + b"\0" + value.encode() + b"\0" for name, value in options)
    return struct.pack("!H", OACK) + body


def error_packet(code: int, message: bytes) -> bytes:
    return struct.pack("!HH", ERROR, code) + message + b"\0"


def blocks(data: bytes, size: int) -> list[bytes]:
    """`data` cut in DATA payloads of `size`: the last one is short, empty if need be."""
    return [data[i : i + size] for i in range(0, len(data) + 1, size)]


@dataclass(frozen=True)
class Request:
    """A read request as the server received it: file name and options (name -> value)."""

    filename: str
    options: dict[str, str]

    @property
    def blksize(self) -> int:
        """The block size asked for, 512 without the option."""
        return int(self.options.get("blksize", 512))


@dataclass
class EvilServer:
    """A running malicious server and what the client sent it.

    `client_errors` holds (socket, code, text) for every ERROR packet the client sent,
    where socket is "transfer" (the server's transfer ID) or "spoofer".
    """

    host: str
    port: int
    requests: list[Request] = field(default_factory=list)
    client_errors: list[tuple[str, int, str]] = field(default_factory=list)
    acked: int = 0  # DATA blocks the client acknowledged
    transfer_ports: list[int] = field(default_factory=list)  # one per session, its TID
    idle: threading.Event = field(default_factory=threading.Event)  # no session running

    def __post_init__(self) -> None:
        self.idle.set()

    def settled(self, timeout: float = 5.0) -> EvilServer:
        """This handle, once the session under way has ended (the client's last packets
        are recorded by then): call it before looking at what the client sent."""
        assert self.idle.wait(timeout), "the evil TFTP server's session did not end"
        return self


class Session:
    """One read request being answered, from a new socket: the transfer's ID."""

    def __init__(
        self, server: EvilServer, client: tuple[str, int], request: Request, stop: threading.Event
    ) -> None:
        self.server = server
        self.client = client
        self.request = request
        self.stop = stop
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOOPBACK, 0))
        server.transfer_ports.append(int(self.sock.getsockname()[1]))

    def close(self) -> None:
        self.sock.close()

    def send(self, packet: bytes) -> None:
        self.sock.sendto(packet, self.client)

    def honest_options(self, tsize: int | None) -> tuple[tuple[str, str], ...]:
        """The options a correct server grants: blksize as asked, tsize if asked for."""
        granted: list[tuple[str, str]] = []
        if "blksize" in self.request.options:
            granted.append(("blksize", self.request.options["blksize"]))
        if "tsize" in self.request.options and tsize is not None:
            granted.append(("tsize", str(tsize)))
        return tuple(granted)

    def exchange(self, packet: bytes, block: int) -> bool:
        """Send `packet` until the client acknowledges `block`; False if it never does
        (it went quiet, sent an ERROR, or the server is stopping)."""
        for _ in range(SENDS):
            if self.stop.is_set():
                return False
            self.send(packet)
            outcome = self.wait_ack(block)
            if outcome is not None:
                return outcome
        return False

    def wait_ack(self, block: int) -> bool | None:
        """True on ACK `block`, False on an ERROR from the client, None on a timeout."""
        self.sock.settimeout(ACK_TIMEOUT)
        while True:
            try:
                reply, _ = self.sock.recvfrom(65536)
            except TimeoutError:
                return None
            if len(reply) < 4:
                continue
            opcode, number = struct.unpack_from("!HH", reply)
            if opcode == ERROR:
                self.server.client_errors.append(("transfer", number, _text(reply)))
                return False
            if opcode == ACK and number == block & 0xFFFF:
                if block:
                    self.server.acked += 1
                return True

    def negotiate(self, options: tuple[tuple[str, str], ...]) -> bool:
        """Send an OACK with `options` (none: go straight to DATA); True to go on."""
        return self.exchange(oack_packet(options), 0) if options else True

    def send_blocks(
        self,
        payloads: Iterator[bytes] | list[bytes],
        *,
        interval: float = 0.0,
        before: Callable[[int], None] | None = None,
    ) -> None:
        """Send DATA blocks 1, 2, ... in lockstep; stop when the client stops acknowledging."""
        for block, payload in enumerate(payloads, 1):
            if before is not None:
                before(block)
            if interval and self.stop.wait(interval):
                return
            if not self.exchange(data_packet(block, payload), block):
                return

    def spoof(self, address: str, block: int, payload: bytes) -> None:
        """Send a forged DATA block from another socket (another port, or another address),
        and note the client's answer to it (RFC 1350: ERROR 5 to the stray sender)."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as spoofer:
            spoofer.bind((address, 0))
            spoofer.settimeout(2)
            spoofer.sendto(data_packet(block, payload), self.client)
            with contextlib.suppress(TimeoutError):
                reply, _ = spoofer.recvfrom(65536)
                if reply[:2] == struct.pack("!H", ERROR):
                    code = struct.unpack_from("!H", reply, 2)[0]
                    self.server.client_errors.append(("spoofer", code, _text(reply)))


# --- behaviours ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Honest:
    """Serve `data` correctly; `on_ack(block)` runs after each acknowledged block."""

    data: bytes
    on_ack: Callable[[int], None] | None = None

    def run(self, s: Session) -> None:
        if not s.negotiate(s.honest_options(len(self.data))):
            return
        on_ack = self.on_ack

        def before(block: int) -> None:
            if on_ack is not None and block > 1:
                on_ack(block - 1)

        s.send_blocks(blocks(self.data, s.request.blksize), before=before)


@dataclass(frozen=True)
class Endless:
    """Grant the options asked for, announce `tsize` (None: no tsize at all), then send full
    blocks and never the short one that ends a file (giving up after `give_up_after`
    bytes, when a client without a size cap times out)."""

    tsize: int | None = None
    give_up_after: int = 16 << 20

    def run(self, s: Session) -> None:
        if not s.negotiate(s.honest_options(self.tsize)):
            return
        size = s.request.blksize
        s.send_blocks(b"E" * size for _ in range(self.give_up_after // size))


@dataclass(frozen=True)
class WrongTsize:
    """Announce `tsize`, then send `data`, ending cleanly."""

    data: bytes
    tsize: int

    def run(self, s: Session) -> None:
        if s.negotiate(s.honest_options(self.tsize)):
            s.send_blocks(blocks(self.data, s.request.blksize))


@dataclass(frozen=True)
class Trickle:
    """Serve `data` correctly, one block every `interval` seconds (within the timeout)."""

    data: bytes
    interval: float

    def run(self, s: Session) -> None:
        if s.negotiate(s.honest_options(len(self.data))):
            s.send_blocks(blocks(self.data, s.request.blksize), interval=self.interval)


@dataclass(frozen=True)
class Spoof:
    """Serve `data`, but first send a forged DATA `block` holding `forged` from a second
    socket on `address` (127.0.0.1: another port of the server; 127.0.0.2: another
    address). With `before_reply` the forgery (block 1) comes before the server's first
    reply, when no transfer ID is fixed yet (from 127.0.0.2 then: until the first reply,
    any port of the server's address may fix the ID); otherwise just before the real
    `block`."""

    data: bytes
    forged: bytes
    address: str = LOOPBACK
    block: int = 1
    before_reply: bool = False

    def run(self, s: Session) -> None:
        if self.before_reply:
            s.spoof(self.address, 1, self.forged)
        if not s.negotiate(s.honest_options(len(self.data))):
            return

        def before(block: int) -> None:
            if block == self.block and not self.before_reply:
                s.spoof(self.address, block, self.forged)

        s.send_blocks(blocks(self.data, s.request.blksize), before=before)


@dataclass(frozen=True)
class Grant:
    """Answer with an OACK holding exactly `options` (name, value), then serve `data` in
    blocks of the blksize granted there (512 without one)."""

    options: tuple[tuple[str, str], ...]
    data: bytes = b""

    def run(self, s: Session) -> None:
        if s.negotiate(self.options):
            size = int(dict(self.options).get("blksize", 512))
            s.send_blocks(blocks(self.data, size))


@dataclass(frozen=True)
class Oversize:
    """Send `data` in DATA packets `extra` bytes larger than agreed: after granting `grant`
    (None: the blksize asked for), or with `ignore_options`, without an OACK (512)."""

    data: bytes
    extra: int = 1
    grant: int | None = None
    ignore_options: bool = False

    def run(self, s: Session) -> None:
        if self.ignore_options:
            size = 512
        else:
            size = self.grant or s.request.blksize
            granted = [("blksize", str(size))] if "blksize" in s.request.options else []
            if not s.negotiate((*granted, ("tsize", str(len(self.data))))):
                return
        s.send_blocks(blocks(self.data, size + self.extra))


@dataclass(frozen=True)
class Fail:
    """Answer with ERROR `code` carrying the raw `message`, after `after` good blocks."""

    code: int
    message: bytes
    after: int = 0
    data: bytes = b"D" * 100_000

    def run(self, s: Session) -> None:
        if self.after and not s.negotiate(s.honest_options(len(self.data))):
            return
        s.send_blocks(blocks(self.data, s.request.blksize)[: self.after])
        s.send(error_packet(self.code, self.message))


Behaviour = Honest | Endless | WrongTsize | Trickle | Spoof | Grant | Oversize | Fail


# --- the server ----------------------------------------------------------------------------


def _text(packet: bytes) -> str:
    return packet[4:].split(b"\0", 1)[0].decode("ascii", "replace")


def _parse_request(packet: bytes) -> Request | None:
    if len(packet) < 2 or struct.unpack_from("!H", packet)[0] != RRQ:
        return None
    fields = [f.decode("ascii", "replace") for f in packet[2:].split(b"\0")[:-1]]
    if len(fields) < 2:
        return None
    options = dict(zip(fields[2::2], fields[3::2], strict=False))
    return Request(fields[0], {k.lower(): v for k, v in options.items()})


class _ServerThread(threading.Thread):
    def __init__(self, handle: EvilServer, listener: socket.socket, behaviour: Behaviour) -> None:
        super().__init__(name="evil-tftp-server", daemon=True)
        self.handle = handle
        self.listener = listener
        self.behaviour = behaviour
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.listener.settimeout(0.05)
            while not self.stop.is_set():
                try:
                    packet, client = self.listener.recvfrom(65536)
                except TimeoutError:
                    continue
                request = _parse_request(packet)
                if request is None:
                    continue
                self.handle.idle.clear()
                self.handle.requests.append(request)
                session = Session(self.handle, client, request, self.stop)
                try:
                    self.behaviour.run(session)
                finally:
                    session.close()
                    self.handle.idle.set()
        except BaseException as exc:  # reported when the servers stop
            self.error = exc
        finally:
            self.listener.close()


@contextlib.contextmanager
def evil_tftp_servers() -> Iterator[Callable[[Behaviour], EvilServer]]:
    """Factory: `start(behaviour)` runs a malicious server on 127.0.0.1 and returns its
    handle. Servers stop when the block ends; a crash of one fails there."""
    started: list[_ServerThread] = []

    def start(behaviour: Behaviour) -> EvilServer:
        listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        listener.bind((LOOPBACK, 0))
        handle = EvilServer(host=LOOPBACK, port=int(listener.getsockname()[1]))
        thread = _ServerThread(handle, listener, behaviour)
        thread.start()
        started.append(thread)
        return handle

    try:
        yield start
    finally:
        for thread in started:
            thread.stop.set()
        for thread in started:
            thread.join(timeout=10)
    assert not [t for t in started if t.is_alive()], "evil TFTP server thread did not stop"
    errors = [t.error for t in started if t.error is not None]
    assert not errors, f"evil TFTP server thread crashed: {errors!r}"
