"""Benchmark: azure_publish's upload against the Azure SDK's own page-blob upload, to Azurite.

    python -m bench.bench_publish [--size-gib 30] [--data-mib 1024] [--parallel 8]

Builds a sparse fixed VHD of `--size-gib` holding `--data-mib` of random data in scattered
4 MiB chunks, starts Azurite (tests/support/azurite.py; `.ci/setup` installs it) on
loopback, and in the same run uploads the VHD twice: with `upload.upload` (data extents
only) and with `BlobClient.upload_blob(blob_type="PageBlob")` (reads every byte, skips
all-zero chunks). The bytes each sends are counted from the requests themselves (a
request hook), not from either uploader's own count. Targets: ours sends at most 1.1x the
allocated bytes and is at least 5x faster. Needs the `azure` extra; everything is written
under a temporary directory that is removed afterwards.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

from archkernel.azure.publish import upload
from archkernel.formats import vhd_file
from archkernel.host.files import temporary_directory
from archkernel.host.sparse import data_extents
from archkernel.units import GiB, MiB
from tests.support import azurite as emulator

CHUNK = 4 * MiB


def make_vhd(path: Path, size: int, data: int, seed: int) -> int:
    """A sparse fixed VHD of a `size`-byte disk with `data` bytes of random data; returns
    its allocated bytes (SEEK_DATA)."""
    rng = random.Random(seed)
    slots = rng.sample(range(size // (2 * CHUNK)), data // CHUNK)
    with open(path, "wb") as f:
        f.truncate(size)
        for slot in sorted(slots):
            f.seek(slot * 2 * CHUNK + rng.randrange(0, CHUNK, 512))
            f.write(os.urandom(CHUNK))
    vhd_file.append_footer(path, timestamp=0)
    fd = os.open(path, os.O_RDONLY)
    try:
        return sum(end - start for start, end in data_extents(fd, os.fstat(fd).st_size))
    finally:
        os.close(fd)


class Counter:
    """Requests a client sent and their bodies' bytes, by Content-Length (a `raw_request_hook`)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.requests = 0
        self.lock = threading.Lock()  # the uploads' threads share it

    def __call__(self, request: Any) -> None:
        length = int(request.http_request.headers.get("Content-Length") or 0)
        with self.lock:
            self.requests += 1
            self.bytes += length


def ours(az: emulator.Azurite, vhd: Path, parallel: int) -> tuple[float, Counter]:
    from azure.storage.blob import BlobClient

    counter = Counter()
    url = az.sas_url("bench", "ours.vhd")
    access = upload.Access(
        connect=lambda: BlobClient.from_blob_url(
            url, raw_request_hook=counter, **upload.CLIENT_OPTIONS
        ),
        name="ours.vhd",
    )
    start = time.perf_counter()
    upload.upload(vhd, access, create=True, workers=parallel)
    return time.perf_counter() - start, counter


def sdk(az: emulator.Azurite, vhd: Path, parallel: int) -> tuple[float, Counter]:
    from azure.storage.blob import BlobClient

    counter = Counter()
    client = BlobClient.from_blob_url(az.sas_url("bench", "sdk.vhd"), raw_request_hook=counter)
    start = time.perf_counter()
    with open(vhd, "rb") as f:
        client.upload_blob(
            f, blob_type="PageBlob", length=os.path.getsize(vhd), max_concurrency=parallel
        )
    return time.perf_counter() - start, counter


def same_content(az: emulator.Azurite, vhd: Path, name: str) -> bool:
    """Whether the blob reads back as the VHD (compared in 64 MiB pieces)."""
    blob = az.blob("bench", name)
    size = os.path.getsize(vhd)
    with open(vhd, "rb") as f:
        for offset in range(0, size, 64 * MiB):
            length = min(64 * MiB, size - offset)
            if blob.download_blob(offset=offset, length=length).readall() != f.read(length):
                return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=int, default=30)
    parser.add_argument("--data-mib", type=int, default=1024)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--dir", type=Path, default=None, help="where the VHD and Azurite go")
    parser.add_argument("--verify", action="store_true", help="read both blobs back")
    args = parser.parse_args(argv)
    if emulator.command() is None:
        print("azurite-blob is not installed: run .ci/setup", file=sys.stderr)
        return 2
    parent = str(args.dir) if args.dir else None
    with temporary_directory(prefix="bench-publish-", parent=parent) as tmp:
        vhd = tmp / "bench.vhd"
        allocated = make_vhd(vhd, args.size_gib * GiB, args.data_mib * MiB, seed=1)
        print(f"VHD: {args.size_gib} GiB disk, {allocated / MiB:.0f} MiB allocated")
        with emulator.running(tmp / "azurite") as az:
            az.container("bench")
            ours_s, ours_n = ours(az, vhd, args.parallel)
            print(
                f"ours: {ours_s:.1f} s, {ours_n.bytes / MiB:.1f} MiB in {ours_n.requests} requests"
            )
            sdk_s, sdk_n = sdk(az, vhd, args.parallel)
            print(f"SDK upload_blob(PageBlob): {sdk_s:.1f} s, {sdk_n.bytes / MiB:.1f} MiB "
                  f"in {sdk_n.requests} requests")  # fmt: skip
            if args.verify:
                print(f"read back equal: ours {same_content(az, vhd, 'ours.vhd')}, "
                      f"SDK {same_content(az, vhd, 'sdk.vhd')}")  # fmt: skip
    sent_ratio = ours_n.bytes / allocated
    speedup = sdk_s / ours_s
    print(f"ours sent / allocated: {sent_ratio:.3f} (target <= 1.1)")
    print(f"speed-up over the SDK: {speedup:.1f}x (target >= 5x)")
    return 0 if sent_ratio <= 1.1 and speedup >= 5 else 1


if __name__ == "__main__":
    sys.exit(main())
