"""Fetching from URLs: a time limit, a size cap, and one clear error for every failure.

urllib reports a failure as an HTTPError (the server answered with an error status), a
URLError (no connection: refused, unknown host, a missing `file:` path), a bare timeout
or OSError (the server went silent or away mid-answer) or a ValueError (a malformed URL).
Here each becomes a `FetchError`: a UserError saying which URL and why, that keeps the HTTP
status for callers that treat "not there" differently from "no answer".

    with open_url(url, timeout=20) as response:   # any failure: FetchError
        response.read(1)
    text = fetch_text(url, limit=4 << 20, timeout=60)
    sha256 = download(url, dest, limit=4 << 30, timeout=60)   # all or nothing
"""

from __future__ import annotations

import contextlib
import hashlib
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from archkernel.errors import UserError
from archkernel.host.files import atomic_path
from archkernel.log import log

SCHEMES = ("http://", "https://", "ftp://", "file:/")
CHUNK = 1 << 20


class FetchError(UserError):
    """A URL could not be had: `reason` says why, `status` is the HTTP error status (None
    when there was no answer). The message reads `cannot <action> <url>: <why>`."""

    def __init__(
        self,
        url: str,
        reason: str,
        *,
        status: int | None = None,
        action: str = "fetch",
        hint: str | None = None,
    ) -> None:
        why = f"HTTP {status} {reason}" if status is not None else reason
        super().__init__(f"cannot {action} {url}: {why}", hint)
        self.url = url
        self.reason = reason
        self.status = status


@contextlib.contextmanager
def open_url(url: str, *, timeout: float, action: str = "fetch") -> Iterator[Any]:
    """`url` opened for reading, each blocking step limited to `timeout` seconds.

    Failures while opening it and while reading it in the block (an OSError or ValueError
    the block raises) become a FetchError, so keep the block to reading. Only http(s), ftp
    and file URLs are opened.
    """
    if not url.startswith(SCHEMES):
        raise FetchError(url, "not an http(s), ftp or file URL", action=action)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (scheme checked)
            yield response
    except urllib.error.HTTPError as exc:
        exc.close()
        raise FetchError(url, str(exc.reason), status=exc.code, action=action) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        # URLError.reason is the underlying error (ConnectionRefusedError, TimeoutError ...).
        reason = getattr(exc, "reason", exc)
        raise FetchError(url, str(reason), action=action) from None


def _too_large(url: str, limit: int, action: str) -> FetchError:
    reason = f"it is larger than the {limit} bytes expected"
    return FetchError(url, reason, action=action, hint="check that the URL names the file meant")


def fetch_text(url: str, *, limit: int, timeout: float) -> str:
    """A text file of at most `limit` bytes (UTF-8, bad bytes replaced); FetchError when it
    cannot be had or is larger."""
    with open_url(url, timeout=timeout) as response:
        data: bytes = response.read(limit + 1)
    if len(data) > limit:
        raise _too_large(url, limit, "fetch")
    return data.decode("utf-8", "replace")


def download(url: str, dest: Path, *, limit: int, timeout: float) -> str:
    """Download `url` to `dest`, atomically (all or nothing: a failed download leaves
    `dest` as it was); returns its SHA-256. FetchError when it cannot be had, or is larger
    than `limit` bytes."""
    digest = hashlib.sha256()
    start = time.monotonic()
    size = 0
    # Writing inside open_url's block: a full disk is reported as this download's failure.
    with (
        open_url(url, timeout=timeout, action="download") as response,
        atomic_path(dest) as tmp,
        open(tmp, "wb") as out,
    ):
        while block := response.read(CHUNK):
            size += len(block)
            if size > limit:
                raise _too_large(url, limit, "download")
            digest.update(block)
            out.write(block)
    log.info("downloaded %s: %.1f MiB in %.1fs", url, size / (1 << 20), time.monotonic() - start)
    return digest.hexdigest()
