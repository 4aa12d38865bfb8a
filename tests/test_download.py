"""Downloads (archkernel.host.download) against a real HTTP server on 127.0.0.1: each
failure is one clear error naming the URL, and a download is all or nothing."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from archkernel.host.download import CHUNK, FetchError, download, fetch_text, open_url

# More than two read chunks, not a multiple of one.
BODY = bytes(range(256)) * (2 * CHUNK // 256) + b"the end\n"


class _Handler(http.server.BaseHTTPRequestHandler):
    release: threading.Event  # set when the server stops: a silent request then returns

    def do_GET(self) -> None:
        if self.path == "/body":
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)
        elif self.path == "/silent":
            self.release.wait(30)  # accepts the request and never answers in time
        else:
            self.send_error(404)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """The base URL of a server: /body answers BODY, /silent nothing, the rest 404."""
    release = threading.Event()
    handler = type("Handler", (_Handler,), {"release": release})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def test_a_good_download_writes_every_byte_and_returns_its_sha256(
    server: str, tmp_path: Path
) -> None:
    dest = tmp_path / "dir" / "body.bin"
    dest.parent.mkdir()
    dest.write_bytes(b"an older version")
    digest = download(f"{server}/body", dest, limit=len(BODY), timeout=10)
    assert dest.read_bytes() == BODY
    assert digest == hashlib.sha256(BODY).hexdigest()
    assert [p.name for p in dest.parent.iterdir()] == ["body.bin"]  # no temporary left


def test_text_is_fetched_whole(server: str) -> None:
    assert fetch_text(f"{server}/body", limit=len(BODY), timeout=10).endswith("the end\n")


def test_an_http_error_names_the_url_and_keeps_the_status(server: str, tmp_path: Path) -> None:
    url = f"{server}/missing"
    with pytest.raises(FetchError) as info:
        fetch_text(url, limit=1000, timeout=10)
    assert info.value.message == f"cannot fetch {url}: HTTP 404 Not Found"
    assert info.value.status == 404
    dest = tmp_path / "missing"
    with pytest.raises(FetchError) as info:
        download(url, dest, limit=1000, timeout=10)
    assert info.value.message == f"cannot download {url}: HTTP 404 Not Found"
    assert list(tmp_path.iterdir()) == []


def test_a_refused_connection_is_explained() -> None:
    # A bound socket that does not listen: connecting to its port is refused.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/file"
        with pytest.raises(FetchError) as info:
            fetch_text(url, limit=1000, timeout=10)
    assert info.value.message.startswith(f"cannot fetch {url}: ")
    assert "Connection refused" in info.value.message
    assert info.value.status is None


def test_a_silent_server_fails_within_the_time_limit(server: str, tmp_path: Path) -> None:
    url = f"{server}/silent"
    started = time.monotonic()
    with pytest.raises(FetchError) as info, open_url(url, timeout=0.5) as response:
        response.read(1)
    assert time.monotonic() - started < 10
    assert info.value.message == f"cannot fetch {url}: timed out"
    with pytest.raises(FetchError) as info:
        download(url, tmp_path / "silent", limit=1000, timeout=0.5)
    assert info.value.message == f"cannot download {url}: timed out"
    assert list(tmp_path.iterdir()) == []


def test_a_body_over_the_cap_is_refused_and_nothing_is_kept(server: str, tmp_path: Path) -> None:
    url = f"{server}/body"
    limit = len(BODY) - 1
    with pytest.raises(FetchError) as info:
        fetch_text(url, limit=limit, timeout=10)
    assert info.value.message == f"cannot fetch {url}: it is larger than the {limit} bytes expected"
    dest = tmp_path / "body.bin"
    dest.write_bytes(b"kept")
    with pytest.raises(FetchError) as info:
        download(url, dest, limit=CHUNK + 1, timeout=10)
    assert info.value.message == (
        f"cannot download {url}: it is larger than the {CHUNK + 1} bytes expected"
    )
    assert dest.read_bytes() == b"kept"  # all or nothing: the old file stays
    assert [p.name for p in tmp_path.iterdir()] == ["body.bin"]


def test_only_http_ftp_and_file_urls_are_opened() -> None:
    with pytest.raises(FetchError) as info:
        fetch_text("gopher://127.0.0.1/x", limit=1000, timeout=10)
    assert (
        info.value.message == "cannot fetch gopher://127.0.0.1/x: not an http(s), ftp or file URL"
    )
