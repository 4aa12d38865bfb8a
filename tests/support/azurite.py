"""Azurite, the Azure Storage emulator, serving page blobs on loopback for the publish tests
and bench/bench_publish.py.

`.ci/setup` installs it under `.venv/azurite` (npm, project-local); `ARCHKERNEL_AZURITE`
names another `azurite-blob`. `running(dir)` starts it on a free port with its well-known
development account and stops it (and waits for it) on exit.
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# Azurite's documented development account (public, the same in every installation).
ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def command() -> str | None:
    """The azurite-blob to run, or None when it is not installed."""
    given = os.environ.get("ARCHKERNEL_AZURITE")
    if given:
        return given
    local = ROOT / ".venv" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
    if local.exists():
        return str(local)
    return shutil.which("azurite-blob")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Azurite:
    """A running Azurite blob service."""

    port: int
    process: subprocess.Popen[bytes]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/{ACCOUNT}"

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};"
            f"BlobEndpoint={self.endpoint};"
        )

    def container(self, name: str) -> None:
        """Make the container `name` (no error when it exists)."""
        from azure.core.exceptions import ResourceExistsError
        from azure.storage.blob import BlobServiceClient

        service = BlobServiceClient.from_connection_string(self.connection_string)
        with contextlib.suppress(ResourceExistsError):
            service.create_container(name)

    def sas_url(self, container: str, blob: str, seconds: float = 3600, write: bool = True) -> str:
        """A blob SAS URL that expires in `seconds` (what grantAccess hands out)."""
        from azure.storage.blob import BlobSasPermissions, generate_blob_sas

        expiry = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds)
        permission = BlobSasPermissions(read=True, write=write, create=write)
        token = generate_blob_sas(
            ACCOUNT, container, blob, account_key=KEY, permission=permission, expiry=expiry
        )
        return f"{self.endpoint}/{container}/{blob}?{token}"

    def blob(self, container: str, blob: str) -> Any:
        """An SDK BlobClient with the account key, for the tests to read what was written."""
        from azure.storage.blob import BlobClient

        return BlobClient.from_connection_string(self.connection_string, container, blob)


def _wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"azurite-blob exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.1)
    raise RuntimeError(f"azurite-blob did not listen on port {port} in {timeout} s")


@contextlib.contextmanager
def running(location: Path, timeout: float = 30) -> Iterator[Azurite]:
    """Azurite's blob service on 127.0.0.1 (a free port), its data in `location`."""
    exe = command()
    if exe is None:
        raise RuntimeError("azurite-blob is not installed (run .ci/setup)")
    port = free_port()
    location.mkdir(parents=True, exist_ok=True)
    log = open(location / "azurite.log", "wb")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(
        [
            exe,
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            str(port),
            "--location",
            str(location),
            "--skipApiVersionCheck",
            "--silent",
            "--loose",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_listening(port, process, timeout)
        yield Azurite(port, process)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


# --- a proxy that fails chosen requests ------------------------------------------------------

# (method, path with query) -> a status and headers to answer instead, or None to forward.
Fault = Callable[[str, str], "tuple[int, dict[str, str]] | None"]


class _ProxyHandler(BaseHTTPRequestHandler):
    server: _ProxyServer
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDK expects

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _any(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        injected = self.server.fault(self.command, self.path)
        if injected is not None:
            status, headers = injected
            self.server.injected.append((self.command, self.path.split("?")[0], status))
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        conn = http.client.HTTPConnection("127.0.0.1", self.server.upstream, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
        headers["Host"] = f"127.0.0.1:{self.server.upstream}"
        conn.request(self.command, self.path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        self.send_response(response.status)
        for k, v in response.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _any


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: int, fault: Fault) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream, self.fault = upstream, fault
        self.injected: list[tuple[str, str, int]] = []


@contextlib.contextmanager
def faulty(azurite: Azurite, fault: Fault) -> Iterator[_ProxyServer]:
    """A proxy in front of `azurite` that answers `fault`'s status instead of forwarding
    when it says so; `.server_address[1]` is its port, `.injected` what it answered."""
    server = _ProxyServer(azurite.port, fault)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
