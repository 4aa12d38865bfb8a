"""Benchmark: archkernel.host.tftp's client against tftp-hpa's `tftp`, the old service's client.

Both download the same random file from Debian's in.tftpd on loopback, interleaved,
several times, every check of the hardened client on: `fetch` into memory at each block
size, and `fetch_to` at the default one, into a file as `tftp` does (streamed into a
temporary file beside the destination, fsync'd and renamed: the step's real path). The
output is the best and median wall time of each, how many times faster than `tftp` ours
is (by median), and the client's CPU time, which depends less on what else the machine
is doing. Run as root from the repository root:

    python -m bench.bench_tftp [--size-mib 30] [--reps 5] [--blksize 1468 512 65464]

tftp-hpa's client cannot negotiate a block size, so it always moves 512-byte blocks;
ours requests `blksize` (RFC 2348). 512 is the like-for-like row, 1468 the default
(largest block that crosses an Ethernet LAN unfragmented), 65464 the protocol's limit
(fine on loopback, fragmented on a real network).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from archkernel.errors import UserError
from archkernel.host.run import check_tools, run
from archkernel.host.tftp import DEFAULT_BLKSIZE, MAX_BLKSIZE, TftpServer, fetch, fetch_to
from tests.support.tftp import TftpdUnavailable, running_tftpd_hpa

NAME = "bench.bin"


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its waited-for children so far."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_once(action: Callable[[], bytes]) -> tuple[float, float, bytes]:
    """Run `action` once; return its wall time, the client's CPU time and its result.

    The server's CPU time is not counted: in.tftpd's transfer processes are its own
    children, not ours.
    """
    start, start_cpu = time.perf_counter(), cpu_seconds()
    data = action()
    return time.perf_counter() - start, cpu_seconds() - start_cpu, data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=30, help="file size (default 30)")
    parser.add_argument("--reps", type=int, default=5, help="runs of each client (default 5)")
    parser.add_argument(
        "--blksize",
        type=int,
        nargs="+",
        default=[DEFAULT_BLKSIZE, 512, MAX_BLKSIZE],
        help=f"block sizes to try with ours (default {DEFAULT_BLKSIZE} 512 {MAX_BLKSIZE})",
    )
    args = parser.parse_args(argv)

    try:
        check_tools(["tftp", "in.tftpd"], "the TFTP benchmark")
    except UserError as exc:
        print(exc, file=sys.stderr)
        return 1
    data = os.urandom(args.size_mib << 20)
    load_before = f"{os.getloadavg()[0]:.2f}"
    with tempfile.TemporaryDirectory(prefix="bench-tftp-") as tmp:
        work = Path(tmp)
        try:
            with running_tftpd_hpa(work / "root") as tftpd:
                tftpd.put(NAME, data)
                server = TftpServer(tftpd.host, tftpd.port)
                out = work / "tftp-hpa.out"

                def tftp_hpa() -> bytes:
                    out.unlink(missing_ok=True)
                    argv = ["tftp", "-m", "binary", tftpd.host, str(tftpd.port)]
                    run([*argv, "-c", "get", NAME, str(out)], capture=True)
                    return out.read_bytes()

                def ours(blksize: int) -> Callable[[], bytes]:
                    return lambda: fetch(server, NAME, timeout=5, retries=2, blksize=blksize)

                dest = work / "archkernel.out"

                def ours_to_file() -> bytes:
                    dest.unlink(missing_ok=True)
                    fetch_to(server, NAME, dest, timeout=5, retries=2, blksize=DEFAULT_BLKSIZE)
                    return dest.read_bytes()

                clients: dict[str, Callable[[], bytes]] = {"tftp-hpa tftp (512)": tftp_hpa}
                for blksize in args.blksize:
                    clients[f"archkernel fetch, blksize {blksize}"] = ours(blksize)
                clients[f"archkernel fetch_to, blksize {DEFAULT_BLKSIZE}"] = ours_to_file
                times: dict[str, list[float]] = {label: [] for label in clients}
                cpu: dict[str, list[float]] = {label: [] for label in clients}
                # Interleaved, so a slow moment of the machine hits every client alike.
                for _rep in range(args.reps):
                    for label, action in clients.items():
                        elapsed, used, got = time_once(action)
                        if got != data:
                            print(f"{label}: wrong data ({len(got)} bytes)", file=sys.stderr)
                            return 1
                        times[label].append(elapsed)
                        cpu[label].append(used)
        except TftpdUnavailable as exc:
            print(f"cannot run in.tftpd: {exc}", file=sys.stderr)
            return 1

    print(f"{args.size_mib} MiB from in.tftpd on loopback, {args.reps} runs each")
    reference = statistics.median(times["tftp-hpa tftp (512)"])
    print(f"load average before: {load_before}, after: {os.getloadavg()[0]:.2f}")
    header = f"{'client':34} {'best':>7} {'median':>7} {'MiB/s':>7} {'vs tftp':>8}"
    print(f"{header} {'client CPU':>11}")
    for label, runs in times.items():
        median = statistics.median(runs)
        print(
            f"{label:34} {min(runs):6.2f}s {median:6.2f}s {args.size_mib / median:7.1f}"
            f" {reference / median:7.2f}x {statistics.median(cpu[label]):10.2f}s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
