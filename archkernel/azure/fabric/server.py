"""What the fabric's HTTP servers share: a loopback server in a thread that records every
request it answers.

`Recorded` is one request as the guest sent it. `FabricServer` runs a
`ThreadingHTTPServer` on 127.0.0.1 (port chosen by the kernel), or on a listening socket
it is given (the fabric's: inside the VM's network namespace), in a daemon thread from
`start()` to `stop()` (or as a context manager); its handler class answers through
`respond(request) -> Reply`, which each server (wireserver, IMDS) defines.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Self
from urllib.parse import parse_qs, urlsplit

# The most a request body may hold: health reports and telemetry are a few KiB.
MAX_BODY = 1 << 20


@dataclass(frozen=True)
class Recorded:
    """One request: method, path with query, headers (names lowercased), body."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    status: int = 0

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, str]:
        """The query's parameters, the last value of each."""
        return {k: v[-1] for k, v in parse_qs(urlsplit(self.target).query).items()}


@dataclass(frozen=True)
class Reply:
    """An answer: status, content type, body."""

    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"


@dataclass
class Log:
    """The requests a server answered, in order; safe to read while it serves."""

    entries: list[Recorded] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, entry: Recorded) -> None:
        with self.lock:
            self.entries.append(entry)

    def snapshot(self) -> list[Recorded]:
        with self.lock:
            return list(self.entries)


Responder = Callable[[Recorded], Reply]


def _handler(respond: Responder, log: Log, name: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = name
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(min(length, MAX_BODY)) if length > 0 else b""
            request = Recorded(
                self.command,
                self.path,
                {k.lower(): v for k, v in self.headers.items()},
                body,
            )
            try:
                reply = respond(request)
            except Exception as exc:  # a bug in the stand-in: answer, record, go on
                reply = Reply(500, f"{type(exc).__name__}: {exc}".encode())
            log.add(Recorded(request.method, request.target, request.headers, body, reply.status))
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(reply.body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(reply.body)
            self.close_connection = True

        do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _serve

        def log_message(self, format: str, *args: object) -> None:
            pass  # the Log is the record; nothing on stderr

    return Handler


class FabricServer:
    """An HTTP server that answers with `respond` and records into `log`: on `sock` (a
    listening socket, closed by `stop`) or else on 127.0.0.1."""

    name = "fabric"

    def __init__(self, sock: socket.socket | None = None) -> None:
        self.log = Log()
        handler = _handler(self.respond, self.log, self.name)
        if sock is None:
            self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        else:
            self._server = ThreadingHTTPServer(sock.getsockname(), handler, bind_and_activate=False)
            self._server.socket.close()
            self._server.socket = sock
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=self.name, daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def respond(self, request: Recorded) -> Reply:
        raise NotImplementedError

    @property
    def requests(self) -> list[Recorded]:
        """Every request answered so far, in order."""
        return self.log.snapshot()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
