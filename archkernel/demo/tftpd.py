"""Debian's in.tftpd on loopback: the boot server of the fake C1 (and of the tests).

`running_tftpd_hpa(root)` runs the real server the provider runs, on 127.0.0.1 on a free
port, until its block ends; then the server and every transfer it forked are stopped and
waited for.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from archkernel.errors import UserError
from archkernel.host.run import package_hint, render
from archkernel.log import log

LOOPBACK = "127.0.0.1"
# Where Debian installs in.tftpd: not on a user's PATH.
SBIN = "/usr/sbin:/sbin"


def free_udp_port(host: str = LOOPBACK) -> int:
    """A UDP port on `host` that nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def probe(host: str, port: int, timeout: float = 0.1) -> bool:
    """Whether a TFTP server answers on host:port (any reply to a read request counts)."""
    request = b"\x00\x01" + b"archkernel-probe-no-such-file\x00octet\x00"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(request, (host, port))
            reply, _ = sock.recvfrom(1024)
        except OSError:  # timeout, or ICMP port unreachable
            return False
    return len(reply) >= 4


@dataclass(frozen=True)
class TftpdHpa:
    """A running `in.tftpd` serving `root` on host:port."""

    root: Path
    port: int
    host: str = LOOPBACK

    def put(self, name: str, data: bytes, mode: int = 0o644) -> Path:
        """Store `data` as `name` (may contain `/`) under the root, readable by the server."""
        path = self.root / name
        for parent in reversed(path.relative_to(self.root).parents):
            (self.root / parent).mkdir(exist_ok=True)
            (self.root / parent).chmod(0o755)
        path.write_bytes(data)
        path.chmod(mode)
        return path


class TftpdUnavailable(UserError):
    """in.tftpd cannot run here: not installed, or not root."""


def tftpd_binary() -> str | None:
    """Where in.tftpd is: on PATH, else in the sbin directories."""
    return shutil.which("in.tftpd") or shutil.which("in.tftpd", path=SBIN)


@contextlib.contextmanager
def running_tftpd_hpa(root: Path, host: str = LOOPBACK) -> Iterator[TftpdHpa]:
    """Run `in.tftpd -L -a HOST:PORT -s ROOT` on a free port until the block ends.

    in.tftpd chroots into ROOT as root and then drops privileges, so ROOT and its files
    must be world-readable (ROOT is made 0755 here, `put` writes 0644); the directories
    above ROOT need not be traversable. It forks one child per transfer: the whole
    process group is ended on exit.
    """
    binary = tftpd_binary()
    if binary is None:
        raise TftpdUnavailable("in.tftpd is not installed", package_hint("in.tftpd"))
    if os.geteuid() != 0:
        raise TftpdUnavailable(
            "in.tftpd -s must start as root (it chroots into its directory)", "run as root"
        )
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    for _attempt in range(5):
        port = free_udp_port(host)
        argv = [binary, "-L", "-a", f"{host}:{port}", "-s", str(root)]
        log.debug("+ %s &", render(argv))
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            if _wait_until_answering(proc, host, port):
                yield TftpdHpa(root=root, port=port, host=host)
                return
        finally:
            _stop_group(proc)
    raise UserError(f"in.tftpd did not start on {host} after 5 attempts")


def _wait_until_answering(proc: subprocess.Popen[bytes], host: str, port: int) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False  # lost the port to someone else, most likely
        if probe(host, port):
            return True
    raise UserError(f"in.tftpd on {host}:{port} did not answer within 5s")


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # Children still sending an abandoned transfer are in the group we created.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
