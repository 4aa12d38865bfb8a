"""TFTP servers for tests: Debian's in.tftpd, and a tftpy server that injects faults.

`running_tftpd_hpa(root)` runs the real server the provider runs (put files with
`.put(name, data)`; it is `archkernel.demo.tftpd`'s, which the fake C1 of `archkernel
demo` uses too); `tftpy_servers(...)` starts in-process servers whose files may
misbehave (`Truncate`, `Short`, `Stall`). Every server listens on 127.0.0.1 on a free port
and is stopped, and its process or thread waited for, when its block ends. The fixtures
`tftpd_hpa` and `tftpy_server` (tests/conftest.py) wrap them.
"""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tftpy

from archkernel.demo.tftpd import (
    LOOPBACK,
    TftpdHpa,
    TftpdUnavailable,
    free_udp_port,
    probe,
    running_tftpd_hpa,
)

__all__ = [
    "LOOPBACK",
    "Content",
    "Short",
    "Stall",
    "TftpdHpa",
    "TftpdUnavailable",
    "TftpyServer",
    "Truncate",
    "free_udp_port",
    "probe",
    "running_tftpd_hpa",
    "tftpy_servers",
]

# ----------------------------------------------------------------- tftpy with faults


@dataclass(frozen=True)
class Truncate:
    """Serve `data` but go silent after the last whole block below `after` bytes.

    The client gets no end-of-file and no error: it times out mid-transfer.
    """

    data: bytes
    after: int


@dataclass(frozen=True)
class Short:
    """Announce `len(data)` as tsize but end cleanly (short block) after `after` bytes."""

    data: bytes
    after: int


@dataclass(frozen=True)
class Stall:
    """Never answer a request for this file."""


Content = bytes | Truncate | Short | Stall


class InjectedFault(tftpy.TftpException):  # type: ignore[misc]  # tftpy is untyped
    """Raised inside the tftpy server: it drops the session without a word."""


class _LimitedFile(io.FileIO):
    """A real file (tftpy locks it and reads `.name`) that stops after `limit` bytes.

    With `silent`, the read that would cross the limit raises InjectedFault, so the
    server stops sending; otherwise reads return b"" there, a clean short end.
    """

    def __init__(self, path: Path, limit: int, *, silent: bool) -> None:
        super().__init__(path, "rb")
        self.limit = limit
        self.silent = silent

    def read(self, size: int | None = -1) -> bytes:
        pos = self.tell()
        if size is None or size < 0:
            size = max(self.limit - pos, 0)
        if pos + size > self.limit:
            if self.silent:
                raise InjectedFault(f"injected: stop sending at {pos} bytes")
            size = max(self.limit - pos, 0)
        return super().read(size)


@dataclass
class TftpyServer:
    """A tftpy server running in a thread; `requests` lists the file names asked for."""

    host: str
    port: int
    root: Path
    requests: list[str] = field(default_factory=list)


class _ServerThread(threading.Thread):
    def __init__(self, server: tftpy.TftpServer, host: str, timeout: float) -> None:
        super().__init__(name="tftpy-test-server", daemon=True)
        self.server = server
        self.host = host
        self.timeout = timeout
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            # `timeout` is also how often the thread looks for its stop: short, so a client
            # of a loaded machine gets many resends before a session is dropped.
            self.server.listen(self.host, 0, timeout=self.timeout, retries=40)
        except BaseException as exc:  # reported by the fixture's teardown
            self.error = exc
            self.server.is_running.set()  # do not leave the starter waiting


def _dyn_file_func(
    files: Mapping[str, Content], store: Path, requests: list[str]
) -> Callable[..., io.FileIO | None]:
    def open_file(name: str, **_peer: Any) -> io.FileIO | None:
        requests.append(name)
        content = files.get(name)
        if content is None:
            return None  # tftpy answers "File not found" (error 1)
        if isinstance(content, Stall):
            raise InjectedFault("injected: ignore the request")
        data = content if isinstance(content, bytes) else content.data
        path = store / f"{len(requests)}.data"
        path.write_bytes(data)
        if isinstance(content, Truncate):
            return _LimitedFile(path, content.after, silent=True)
        if isinstance(content, Short):
            return _LimitedFile(path, content.after, silent=False)
        return io.FileIO(path, "rb")

    return open_file


@contextlib.contextmanager
def tftpy_servers(new_dir: Callable[[], Path]) -> Iterator[Callable[..., TftpyServer]]:
    """Factory: `start({"name": bytes | Truncate | Short | Stall}, timeout=0.25)`.

    Unknown names get TFTP error 1. `timeout` is the server's per-packet timeout and
    how often it checks for shutdown; keep it short. Each server keeps its files in a new
    directory from `new_dir()`. Servers stop when the block ends, and a crash of a
    listener thread fails there (AssertionError).
    """
    started: list[tuple[tftpy.TftpServer, _ServerThread]] = []

    def start(files: Mapping[str, Content], *, timeout: float = 0.25) -> TftpyServer:
        base = new_dir()
        root, store = base / "root", base / "store"
        root.mkdir()
        store.mkdir()
        handle = TftpyServer(host=LOOPBACK, port=0, root=root)
        server = tftpy.TftpServer(
            str(root), dyn_file_func=_dyn_file_func(dict(files), store, handle.requests)
        )
        thread = _ServerThread(server, LOOPBACK, timeout)
        thread.start()
        started.append((server, thread))
        if not server.is_running.wait(5) or thread.error is not None:
            raise RuntimeError(f"tftpy server did not start: {thread.error!r}")
        handle.port = int(server.listenport)
        return handle

    try:
        yield start
    finally:
        for server, thread in started:
            server.stop(now=True)
            thread.join(timeout=10)
    assert not [t for _, t in started if t.is_alive()], "tftpy server thread did not stop"
    errors = [t.error for _, t in started if t.error is not None]
    assert not errors, f"tftpy server thread crashed: {errors!r}"
