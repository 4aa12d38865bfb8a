"""Upload a fixed VHD to a page blob: only its data, in parallel, resumable.

The file's data extents (SEEK_DATA/SEEK_HOLE) less what the page blob already holds (its
page ranges: what an interrupted run wrote) are sent in writes of at most 4 MiB
(`extents.to_send`), several at a time; a write whose bytes are all zero is skipped (the
service reads unwritten pages as zeros). The footer is always sent, last. A 403 (the SAS
expired) asks `Access.renew` for a new one and sends again; a throttled or failed request
(408, 429, 5xx, a dropped connection) is sent again after a back-off that doubles, or
after the service's Retry-After. What the SDKs raise never reaches the user unredacted.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO, TypeVar

from archkernel.azure.publish import extents
from archkernel.azure.publish.secrets import redact, redacted_first_line, sdk
from archkernel.errors import UserError
from archkernel.host.sparse import data_extents, pread_all
from archkernel.log import log
from archkernel.units import MiB

T = TypeVar("T")
RETRYABLE = frozenset({408, 429, 500, 502, 503, 504})
# SDK options for every BlobClient the engine uses: its own retries are off (ours count
# and back off, and know to renew the SAS), timeouts are short enough to notice a dead peer.
CLIENT_OPTIONS: dict[str, Any] = {"retry_total": 0, "connection_timeout": 30, "read_timeout": 120}
_ZEROS = bytes(extents.MAX_WRITE)


@dataclass
class Access:
    """How to reach the page blob: `connect()` makes a BlobClient (called again after a
    renewal); `renew()`, when there is one, gets a new SAS after a 403. `name` is what
    messages show (never a SAS); `refused` is the hint for a 403 with no renewal left."""

    connect: Callable[[], Any]
    name: str
    renew: Callable[[], None] | None = None
    most_renewals: int = 5
    refused: str = (
        "the SAS in azure.publish.blob_url expired or lacks a permission: make a new one "
        "that reads, creates and writes (sp=rcw; the upload asks which pages are written), "
        "or give no SAS and log in (DefaultAzureCredential)"
    )


@dataclass(frozen=True)
class Backoff:
    """How often and how long to wait before sending a failed request again."""

    tries: int = 8
    first: float = 1.0
    most: float = 60.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before try `attempt + 1` (0-based `attempt` failed)."""
        if retry_after is not None:
            return min(self.most, max(0.0, retry_after))
        return float(min(self.most, self.first * 2.0**attempt))


@dataclass
class Sent:
    """What an upload did: bytes and requests sent, bytes the blob held already, all-zero
    bytes not sent, retries and SAS renewals, seconds."""

    size: int = 0
    data_bytes: int = 0  # the file's allocated bytes (page-aligned)
    already: int = 0  # of those, what the blob held before this run
    bytes_sent: int = 0
    requests: int = 0
    zero_skipped: int = 0
    retries: int = 0
    renewals: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Progress:
    """Bytes sent of a total, rate and time left: one line redrawn on a terminal, a log
    line every `every` seconds otherwise."""

    def __init__(self, total: int, stream: TextIO | None = None, every: float = 10.0) -> None:
        self.total, self.done, self.start = total, 0, time.monotonic()
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.every = 0.2 if self.tty else every
        self._last = 0.0
        self._lock = threading.Lock()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-6)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = f"{left:.0f} s left" if left != float("inf") else "time left unknown"
        pct = 100 * self.done / self.total if self.total else 100.0
        return (
            f"upload: {self.done / MiB:.1f} of {self.total / MiB:.1f} MiB ({pct:.0f}%), "
            f"{rate / MiB:.1f} MiB/s, {eta}"
        )

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if now - self._last < self.every and self.done < self.total:
                return
            self._last = now
            if self.tty:
                print("\r" + self.line(), end="", file=self.stream, flush=True)
            else:
                log.info("%s", self.line())

    def close(self) -> None:
        if self.tty:
            print(file=self.stream, flush=True)


class _Channel:
    """The engine's requests: a BlobClient per thread, renewed SAS, retries, back-off."""

    def __init__(self, access: Access, backoff: Backoff, sent: Sent) -> None:
        self.access, self.backoff, self.sent = access, backoff, sent
        self.generation = 0
        self.lock = threading.Lock()
        self.local = threading.local()
        self.stopping = threading.Event()
        core = sdk("azure.core.exceptions")
        self.http_error = core.HttpResponseError
        self.transport_errors = (core.ServiceRequestError, core.ServiceResponseError)

    def client(self) -> tuple[int, Any]:
        held = getattr(self.local, "held", None)
        if held is None or held[0] != self.generation:
            with self.lock:
                generation = self.generation
            try:
                made = self.access.connect()
            except ValueError as exc:  # the SDK quotes the URL it refuses, SAS included
                raise UserError(
                    f"{self.access.name}: not a blob URL the SDK accepts: {redact(str(exc))}",
                    "give the page blob's URL: https://ACCOUNT.../CONTAINER/BLOB.vhd[?SAS]",
                ) from None
            held = (generation, made)
            self.local.held = held
        return held

    def _renew(self, generation: int, reason: str) -> None:
        with self.lock:
            if generation != self.generation:
                return  # another thread renewed it already
            if self.access.renew is None:
                raise UserError(
                    f"{self.access.name} refused the request (403): {reason}",
                    self.access.refused,
                )
            if self.sent.renewals >= self.access.most_renewals:
                raise UserError(
                    f"{self.access.name} still refuses the request after "
                    f"{self.sent.renewals} new SAS: {reason}"
                )
            log.info("the access to %s expired (403): asking for a new SAS", self.access.name)
            self.access.renew()
            self.sent.renewals += 1
            self.generation += 1

    def call(self, what: str, fn: Callable[[Any], T]) -> T:
        """`fn(client)`, sent again after a retryable failure or a renewal."""
        attempt = 0
        while True:
            if self.stopping.is_set():
                raise UserError("the upload stopped")
            generation, client = self.client()
            try:
                return fn(client)
            except self.http_error as exc:
                status = getattr(exc, "status_code", None)
                reason = redact(str(getattr(exc, "reason", "") or "")) or f"HTTP {status}"
                if status == 403:
                    self._renew(generation, reason)
                    continue
                if status not in RETRYABLE:
                    raise UserError(
                        f"{what} to {self.access.name} failed: HTTP {status} "
                        f"{redacted_first_line(exc)}"
                    ) from None
                retry_after = _retry_after(exc)
            except self.transport_errors as exc:
                status, reason, retry_after = None, redact(str(exc)), None
            if attempt + 1 >= self.backoff.tries:
                raise UserError(
                    f"{what} to {self.access.name} failed {attempt + 1} times, last: {reason}",
                    "the service is throttling or unreachable: run the step again later; "
                    "it resumes where this run stopped",
                ) from None
            pause = self.backoff.delay(attempt, retry_after)
            log.debug("%s: %s; again in %.1f s", what, reason, pause)
            with self.lock:
                self.sent.retries += 1
            self.stopping.wait(pause)
            attempt += 1


def _retry_after(exc: Any) -> float | None:
    response = getattr(exc, "response", None)
    value = response.headers.get("Retry-After") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def written_ranges(channel: _Channel) -> list[extents.Range]:
    """What the page blob holds: its page ranges as [start, end)."""

    def ask(client: Any) -> list[extents.Range]:
        return [(r.start, r.end + 1) for r in client.list_page_ranges() if not r.cleared]

    return channel.call("listing the page ranges", ask)


# Blob metadata naming the VHD a page blob the engine created is for (its sha256): a
# resume into a blob holding another VHD's pages would mix the two.
IDENTITY = "archkernel_vhd_sha256"


def _prepare(
    channel: _Channel, size: int, create: bool, identity: str | None
) -> list[extents.Range]:
    """Make sure the page blob exists with `size` bytes (and, with `identity`, is this
    VHD's); return what it holds."""
    core = sdk("azure.core.exceptions")

    def properties(client: Any) -> Any:
        try:
            return client.get_blob_properties()
        except core.ResourceNotFoundError:
            return None

    found = channel.call("reading the blob's properties", properties)
    if found is None:
        if not create:
            raise UserError(f"{channel.access.name} does not exist")
        metadata = {IDENTITY: identity} if identity else None
        channel.call(
            "creating the page blob", lambda c: c.create_page_blob(size, metadata=metadata)
        )
        return []
    kind = str(getattr(found, "blob_type", ""))
    if "page" not in kind.lower() or found.size != size:
        raise UserError(
            f"{channel.access.name} exists as a {kind or 'blob'} of {found.size} bytes, "
            f"not a page blob of {size} bytes (the VHD's size)",
            "delete it, or name another blob",
        )
    if identity and (found.metadata or {}).get(IDENTITY) != identity:
        raise UserError(
            f"{channel.access.name} exists and holds another VHD's upload (or one made "
            "elsewhere): its pages would mix with this VHD's",
            "delete it, or name another blob",
        )
    return written_ranges(channel)


def upload(
    vhd: Path,
    access: Access,
    *,
    create: bool = False,
    identity: str | None = None,
    workers: int = 8,
    backoff: Backoff | None = None,
    progress: Callable[[int], Progress] | None = None,
) -> Sent:
    """Upload the fixed VHD `vhd` to the page blob `access` reaches (made, with `create`,
    when missing): only the data the blob does not hold yet, then the footer. With
    `identity` (the VHD's sha256), the blob is marked as this VHD's when made, and an
    existing blob without that mark is refused."""
    start = time.monotonic()
    sent = Sent()
    channel = _Channel(access, backoff or Backoff(), sent)
    fd = os.open(vhd, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        sent.size = size
        written = _prepare(channel, size, create, identity)
        data = extents.to_pages(data_extents(fd, size), size)
        sent.data_bytes = extents.total(data)
        sent.already = extents.total(extents.subtract(data, extents.subtract(data, written)))
        plan = extents.to_send(data, written, size)
        bar = progress(extents.total(plan)) if progress else None
        _send_all(fd, channel, plan[:-1], workers, bar)
        _send_all(fd, channel, plan[-1:], 1, bar)  # the footer, once the rest is there
        if bar is not None:
            bar.close()
    finally:
        os.close(fd)
    sent.seconds = round(time.monotonic() - start, 3)
    return sent


def _send_all(
    fd: int, channel: _Channel, pieces: Iterable[extents.Range], workers: int, bar: Progress | None
) -> None:
    footer_start = extents.footer(channel.sent.size)[0]
    zeros = memoryview(_ZEROS)

    def send(piece: extents.Range) -> None:
        begin, end = piece
        data = pread_all(fd, end - begin, begin)
        if len(data) != end - begin:
            raise UserError(f"{channel.access.name}: the VHD shrank while it was uploaded")
        if begin != footer_start and zeros[: len(data)] == data:
            with channel.lock:
                channel.sent.zero_skipped += len(data)
        else:
            channel.call(
                f"writing bytes {begin}-{end - 1}",
                lambda c: c.upload_page(data, offset=begin, length=len(data)),
            )
            with channel.lock:
                channel.sent.bytes_sent += len(data)
                channel.sent.requests += 1
        if bar is not None:
            bar.add(len(data))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(send, p) for p in pieces]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in done if f.exception() is not None), None)
            if failed is not None:
                raise failed.exception()  # type: ignore[misc]
        finally:
            if any(not f.done() for f in futures):
                channel.stopping.set()  # a failure or Ctrl-C: the running writes stop early
            for f in futures:
                f.cancel()
