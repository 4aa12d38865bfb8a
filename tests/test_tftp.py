"""archkernel.host.tftp: name checks and server choice as tables; fetches against real servers.

The last part runs the client against a malicious server (tests/support/evil_tftp.py),
one test per protection of issue 11 (items 8-12): size cap, deadline, transfer ID
pinning, block size limits, cleaned server text.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypedDict

import pytest

from archkernel.errors import UserError
from archkernel.host.tftp import (
    MAX_REMOTE_LENGTH,
    TftpServer,
    bootserver_from_pnp,
    check_remote,
    choose_server,
    fetch,
    fetch_to,
    read_pnp,
)
from tests.support.evil_tftp import (
    OTHER_LOOPBACK,
    Behaviour,
    Endless,
    EvilServer,
    Fail,
    Grant,
    Honest,
    Oversize,
    Spoof,
    Trickle,
    WrongTsize,
)
from tests.support.tftp import (
    LOOPBACK,
    Short,
    Stall,
    TftpdHpa,
    Truncate,
    free_udp_port,
)


class Options(TypedDict):
    timeout: float
    retries: int
    blksize: int


FAST: Options = {"timeout": 0.5, "retries": 1, "blksize": 1468}
MiB = 1 << 20
EvilStarter = Callable[[Behaviour], EvilServer]


# ------------------------------------------------------------------------ file names


@pytest.mark.parametrize(
    "name",
    [
        "uboot.bootscript",
        "initrd/uInitrd-Linux-armv7l-v3.2.34-std-4",
        "a..b",
        "...",
        ".hidden",
        "a/./b",
        "x" * MAX_REMOTE_LENGTH,
    ],
)
def test_check_remote_accepts_relative_names(name: str) -> None:
    assert check_remote(name) == name


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "empty"),
        ("/initrd/uInitrd", "absolute path"),
        ("\\boot\\x", "absolute path"),
        ("..", "'..' component"),
        ("../etc/passwd", "'..' component"),
        ("initrd/../../etc/shadow", "'..' component"),
        ("initrd/..", "'..' component"),
        ("initrd\\..\\x", "'..' component"),
        ("a\x00b", "'\\x00'"),
        ("uboot.bootscript\n", "'\\n'"),
        ("a\rb", "'\\r'"),
        ("initrd/é", "'é'"),
        ("x" * (MAX_REMOTE_LENGTH + 1), "longer than"),
    ],
)
def test_check_remote_refuses_unsafe_names(name: str, why: str) -> None:
    with pytest.raises(UserError) as info:
        check_remote(name)
    assert why in info.value.message
    assert info.value.hint
    assert "\n" not in info.value.message


@pytest.fixture
def silent_udp() -> Iterator[socket.socket]:
    """A bound UDP socket that never answers: records what a client sends."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((LOOPBACK, 0))
        sock.settimeout(0.05)  # loopback delivers within sendto(): no need to wait long
        yield sock


@pytest.mark.parametrize("name", ["/etc/passwd", "../x", "a\nb", "a\x00b"])
def test_fetch_refuses_bad_names_before_sending(silent_udp: socket.socket, name: str) -> None:
    server = TftpServer(LOOPBACK, silent_udp.getsockname()[1])
    with pytest.raises(UserError, match="refusing to fetch"):
        fetch(server, name, **FAST)
    with pytest.raises(TimeoutError):
        silent_udp.recvfrom(1024)


@pytest.mark.parametrize(
    ("options", "what"),
    [
        ({"blksize": 7}, "blksize"),
        ({"blksize": 65465}, "blksize"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": -1.0}, "timeout"),
        ({"timeout": float("nan")}, "timeout"),
        ({"retries": -1}, "retries"),
    ],
)
def test_fetch_refuses_bad_options(
    silent_udp: socket.socket, options: dict[str, Any], what: str
) -> None:
    server = TftpServer(LOOPBACK, silent_udp.getsockname()[1])
    with pytest.raises(UserError, match=f"invalid TFTP {what}"):
        fetch(server, "uboot.bootscript", **{**FAST, **options})
    with pytest.raises(TimeoutError):
        silent_udp.recvfrom(1024)


@pytest.mark.parametrize(
    ("server", "what"),
    [
        (TftpServer("::1"), "not an IPv4 address"),
        (TftpServer("127.0.0.1", 0), "invalid TFTP server port"),
        (TftpServer("127.0.0.1", 65536), "invalid TFTP server port"),
    ],
)
def test_fetch_refuses_bad_servers(server: TftpServer, what: str) -> None:
    with pytest.raises(UserError, match=what):
        fetch(server, "uboot.bootscript", **FAST)


def test_server_prints_as_host_and_port() -> None:
    assert str(TftpServer("10.1.31.34")) == "10.1.31.34:69"
    assert str(TftpServer("127.0.0.1", 6969)) == "127.0.0.1:6969"


# ------------------------------------------------------------------ choosing a server

PNP_DHCP = """#PROTO: DHCP
domain cloud.online.net
nameserver 10.1.31.38
nameserver 10.1.31.39
bootserver 10.1.31.34
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (PNP_DHCP, "10.1.31.34"),
        ("bootserver 192.168.1.1", "192.168.1.1"),  # no trailing newline
        ("#PROTO: DHCP\n  bootserver\t10.0.0.7  \n", "10.0.0.7"),
        ("#PROTO: DHCP\nnameserver 10.1.31.38\n", None),  # no bootserver line
        ("bootserver 0.0.0.0\n", None),  # the kernel's "none"
        ("bootserver 10.1.31.300\n", None),  # not an address
        ("bootserver\n", None),
        ("bootserver fe80::1\n", None),  # IPv6: not for an IPv4 client
        ("#bootserver 10.0.0.1\nbootservers 10.0.0.2\n", None),
        ("nameserver 10.0.0.1\ndomain bootserver\n", None),
        ("bootserver junk\nbootserver 10.0.0.9\n", "10.0.0.9"),  # first valid one
        ("", None),
    ],
)
def test_bootserver_from_pnp(text: str, expected: str | None) -> None:
    assert bootserver_from_pnp(text) == expected


@pytest.mark.parametrize(
    ("configured", "pnp", "expected"),
    [
        ("10.9.9.9", PNP_DHCP, ("10.9.9.9", "settings")),
        (" 10.9.9.9 ", None, ("10.9.9.9", "settings")),
        (None, PNP_DHCP, ("10.1.31.34", "/proc/net/pnp")),
        ("", PNP_DHCP, ("10.1.31.34", "/proc/net/pnp")),
        (None, "bootserver 0.0.0.0\n", ("10.1.31.34", "fallback")),
        (None, "#PROTO: DHCP\n", ("10.1.31.34", "fallback")),
        (None, None, ("10.1.31.34", "fallback")),
    ],
)
def test_choose_server(configured: str | None, pnp: str | None, expected: tuple[str, str]) -> None:
    assert choose_server(configured, pnp, "10.1.31.34") == expected


def test_read_pnp(tmp_path: Path) -> None:
    assert read_pnp(tmp_path / "missing") is None
    (tmp_path / "pnp").write_text(PNP_DHCP)
    assert read_pnp(tmp_path / "pnp") == PNP_DHCP


# ------------------------------------------------------------------- against in.tftpd


def _hpa(server: TftpdHpa) -> TftpServer:
    return TftpServer(server.host, server.port)


@pytest.mark.integration
@pytest.mark.root
def test_fetch_small_file(tftpd_hpa: TftpdHpa) -> None:
    script = b"'V\x05\x19 fake bootscript\ntftp 0x1000000 initrd/uInitrd-Linux-armv7l-v3.2.34\n"
    tftpd_hpa.put("uboot.bootscript", script)
    assert fetch(_hpa(tftpd_hpa), "uboot.bootscript", **FAST) == script


@pytest.mark.integration
@pytest.mark.parametrize("blksize", [512, 1468, 65464])
@pytest.mark.root
def test_fetch_3mib_file(tftpd_hpa: TftpdHpa, blksize: int) -> None:
    data = os.urandom(3 * MiB + 123)
    tftpd_hpa.put(f"initrd/uInitrd-{blksize}", data)
    got = fetch(_hpa(tftpd_hpa), f"initrd/uInitrd-{blksize}", timeout=2, retries=2, blksize=blksize)
    assert len(got) == len(data)
    assert got == data


@pytest.mark.integration
@pytest.mark.parametrize("size", [0, 1468, 3 * 1468])
@pytest.mark.root
def test_fetch_sizes_ending_on_a_block_boundary(tftpd_hpa: TftpdHpa, size: int) -> None:
    # A file of whole blocks ends with an empty block; an empty file is one.
    data = os.urandom(size)
    tftpd_hpa.put(f"whole-{size}", data)
    assert fetch(_hpa(tftpd_hpa), f"whole-{size}", **FAST) == data


@pytest.mark.integration
@pytest.mark.root
def test_fetch_missing_file(tftpd_hpa: TftpdHpa) -> None:
    with pytest.raises(UserError) as info:
        fetch(_hpa(tftpd_hpa), "initrd/uInitrd-missing", **FAST)
    message = info.value.message
    assert message.startswith("initrd/uInitrd-missing not found on TFTP server ")
    assert f"127.0.0.1:{tftpd_hpa.port}" in message
    assert "TFTP error 1" in message
    assert info.value.hint


@pytest.mark.integration
@pytest.mark.root
def test_fetch_unreadable_file_reports_the_servers_message(tftpd_hpa: TftpdHpa) -> None:
    tftpd_hpa.put("secret", b"x", mode=0o600)  # in.tftpd runs as an unprivileged user
    with pytest.raises(UserError) as info:
        fetch(_hpa(tftpd_hpa), "secret", **FAST)
    assert f"TFTP server 127.0.0.1:{tftpd_hpa.port} refused secret" in info.value.message
    assert "TFTP error 0: Permission denied" in info.value.message


@pytest.mark.integration
@pytest.mark.root
def test_fetch_to_keeps_mtime_when_unchanged(tftpd_hpa: TftpdHpa, tmp_path: Path) -> None:
    tftpd_hpa.put("keep", b"version 1\n")
    dest = tmp_path / "boot" / "uboot.bootscript"
    assert fetch_to(_hpa(tftpd_hpa), "keep", dest, **FAST) is True
    assert dest.read_bytes() == b"version 1\n"
    os.utime(dest, (1_000_000_000, 1_000_000_000))

    assert fetch_to(_hpa(tftpd_hpa), "keep", dest, **FAST) is False
    assert dest.stat().st_mtime == 1_000_000_000

    tftpd_hpa.put("keep", b"version 2\n")
    assert fetch_to(_hpa(tftpd_hpa), "keep", dest, **FAST) is True
    assert dest.read_bytes() == b"version 2\n"
    assert dest.stat().st_mtime > 1_000_000_000
    assert sorted(p.name for p in dest.parent.iterdir()) == ["uboot.bootscript"]


@pytest.mark.integration
@pytest.mark.root
def test_fetch_to_leaves_dest_alone_on_failure(tftpd_hpa: TftpdHpa, tmp_path: Path) -> None:
    dest = tmp_path / "uInitrd"
    dest.write_bytes(b"old initrd")
    os.utime(dest, (1_000_000_000, 1_000_000_000))
    with pytest.raises(UserError, match="not found"):
        fetch_to(_hpa(tftpd_hpa), "no-such-initrd", dest, **FAST)
    assert dest.read_bytes() == b"old initrd"
    assert dest.stat().st_mtime == 1_000_000_000
    assert [p.name for p in tmp_path.iterdir()] == ["uInitrd"]


# ------------------------------------------------------------- silence and bad servers


@pytest.mark.integration
@pytest.mark.parametrize(("timeout", "retries"), [(0.4, 0), (0.3, 2)])
def test_fetch_from_a_server_that_is_down(timeout: float, retries: int) -> None:
    port = free_udp_port()
    start = time.monotonic()
    with pytest.raises(UserError) as info:
        fetch(
            TftpServer(LOOPBACK, port),
            "uboot.bootscript",
            timeout=timeout,
            retries=retries,
            blksize=1468,
        )
    elapsed = time.monotonic() - start
    budget = timeout * (retries + 1)
    assert budget - 0.05 <= elapsed <= budget + 5  # slack for a loaded machine
    assert info.value.message.startswith(f"no answer from 127.0.0.1:{port} for uboot.bootscript")
    assert f"within {timeout:g}s ({retries} retr" in info.value.message


@pytest.mark.integration
def test_fetch_from_tftpy_server(tftpy_server) -> None:
    data = os.urandom(100_000)
    server = tftpy_server({"initrd/uInitrd": data})
    assert fetch(TftpServer(server.host, server.port), "initrd/uInitrd", **FAST) == data
    assert server.requests == ["initrd/uInitrd"]


@pytest.mark.integration
def test_fetch_missing_file_from_tftpy_server(tftpy_server) -> None:
    server = tftpy_server({})
    with pytest.raises(UserError, match=r"^nope not found on TFTP server .*TFTP error 1"):
        fetch(TftpServer(server.host, server.port), "nope", **FAST)


@pytest.mark.integration
def test_fetch_server_that_never_answers(tftpy_server) -> None:
    server = tftpy_server({"uboot.bootscript": Stall()})
    start = time.monotonic()
    with pytest.raises(UserError, match=r"^no answer from 127\.0\.0\.1:\d+ for uboot\.bootscript"):
        fetch(
            TftpServer(server.host, server.port),
            "uboot.bootscript",
            timeout=0.3,
            retries=1,
            blksize=1468,
        )
    assert time.monotonic() - start < 0.6 + 5
    assert server.requests  # it was asked, and chose not to answer


@pytest.mark.integration
@pytest.mark.parametrize(("blksize", "after", "received"), [(512, 5000, 4608), (1468, 1000, 0)])
def test_fetch_transfer_interrupted(tftpy_server, blksize: int, after: int, received: int) -> None:
    server = tftpy_server({"initrd/uInitrd": Truncate(os.urandom(20_000), after=after)})
    start = time.monotonic()
    with pytest.raises(UserError) as info:
        fetch(
            TftpServer(server.host, server.port),
            "initrd/uInitrd",
            timeout=0.3,
            retries=1,
            blksize=blksize,
        )
    assert time.monotonic() - start < 0.6 + 5
    assert info.value.message == (
        f"transfer of initrd/uInitrd from 127.0.0.1:{server.port} interrupted after "
        f"{received} bytes: no data within 0.3s (1 retry)"
    )


@pytest.mark.integration
def test_fetch_transfer_ending_short(tftpy_server) -> None:
    server = tftpy_server({"initrd/uInitrd": Short(os.urandom(20_000), after=7000)})
    with pytest.raises(UserError) as info:
        fetch(TftpServer(server.host, server.port), "initrd/uInitrd", **FAST)
    assert info.value.message == (
        f"transfer of initrd/uInitrd from 127.0.0.1:{server.port} truncated: "
        "got 7000 of 20000 bytes the server announced"
    )


@pytest.mark.integration
def test_fetch_to_leaves_dest_alone_when_interrupted(tftpy_server, tmp_path: Path) -> None:
    server = tftpy_server({"uInitrd": Truncate(os.urandom(20_000), after=10_000)})
    dest = tmp_path / "uInitrd"
    with pytest.raises(UserError, match="interrupted"):
        fetch_to(
            TftpServer(server.host, server.port),
            "uInitrd",
            dest,
            timeout=0.3,
            retries=0,
            blksize=512,
        )
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def repeating_server() -> Iterator[int]:
    """A broken server that answers a read request with block 1, again and again.

    Packets keep coming, so tftpy never times out; only the stall limit ends it.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind((LOOPBACK, 0))
    listener.settimeout(0.05)
    stop = threading.Event()

    def serve() -> None:
        with listener, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tid:
            tid.bind((LOOPBACK, 0))
            client = None
            while not stop.is_set():
                if client is None:
                    try:
                        _, client = listener.recvfrom(1024)
                    except TimeoutError:
                        continue
                tid.sendto(b"\x00\x03\x00\x01" + b"x" * 512, client)
                stop.wait(0.1)

    thread = threading.Thread(target=serve, name="repeating-tftp-server")
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        assert not thread.is_alive()


@pytest.mark.integration
def test_fetch_gives_up_on_a_transfer_that_makes_no_progress(repeating_server: int) -> None:
    start = time.monotonic()
    with pytest.raises(UserError) as info:
        fetch(
            TftpServer(LOOPBACK, repeating_server), "uInitrd", timeout=0.3, retries=1, blksize=512
        )
    assert time.monotonic() - start < 0.6 + 5
    assert info.value.message == (
        f"transfer of uInitrd from 127.0.0.1:{repeating_server} interrupted after "
        "512 bytes: no new data for 0.6s"
    )


# ----------------------------------------------- hostile servers (issue 11, items 8-12)


def _evil(server: EvilServer) -> TftpServer:
    return TftpServer(server.host, server.port)


# 8. A size cap, checked against tsize as the bytes come, streamed to a temporary file.

STREAMED = bytes(range(256)) * 29 + b"tail"  # 7428 bytes: 5 blocks of 1468, then 88
TMP = f".uInitrd.tmp-{os.getpid()}"  # fetch_to's temporary file (atomic_path names it)


@pytest.mark.integration
def test_fetch_refuses_a_file_past_the_size_cap(evil_tftp: EvilStarter) -> None:
    server = evil_tftp(Endless(tsize=None))  # no tsize: only counting the bytes catches it
    with pytest.raises(UserError) as info:
        fetch(_evil(server), "initrd/uInitrd", **FAST, max_size=10_000)
    assert info.value.message == (
        f"refusing initrd/uInitrd from 127.0.0.1:{server.port}: "
        "it is larger than the limit of 10000 bytes"
    )
    assert info.value.hint == (
        "if the file really is that large, raise the limit (scaleway.tftp_max_size)"
    )
    # Six blocks of 1468 bytes (8808) fit, the seventh (10276) does not: it is refused
    # unacknowledged and the server is told to stop.
    assert server.settled().acked == 6
    assert server.client_errors == [("transfer", 3, "File too large")]


@pytest.mark.integration
def test_fetch_refuses_an_announced_size_past_the_cap(evil_tftp: EvilStarter) -> None:
    server = evil_tftp(Endless(tsize=1 << 30))
    with pytest.raises(UserError) as info:
        fetch(_evil(server), "initrd/uInitrd", **FAST, max_size=MiB)
    assert info.value.message == (
        f"refusing initrd/uInitrd from 127.0.0.1:{server.port}: "
        "the server announced 1024 MiB, more than the limit of 1 MiB"
    )
    assert server.settled().acked == 0  # refused at the OACK, before any data
    assert server.client_errors == [("transfer", 3, "File too large")]


@pytest.mark.integration
@pytest.mark.parametrize(
    "behaviour",
    [Endless(tsize=5000), WrongTsize(b"w" * 20_000, tsize=5000)],
    ids=["endless", "longer-than-tsize"],
)
def test_fetch_stops_as_soon_as_the_data_outgrows_tsize(
    evil_tftp: EvilStarter, behaviour: Behaviour
) -> None:
    server = evil_tftp(behaviour)
    with pytest.raises(UserError) as info:
        fetch(_evil(server), "initrd/uInitrd", **FAST)
    assert info.value.message == (
        f"transfer of initrd/uInitrd from 127.0.0.1:{server.port} is longer than announced: "
        "got 5872 bytes, the server announced 5000"
    )
    assert server.settled().acked == 3  # 4404 bytes; the fourth block would make 5872
    assert server.client_errors == [("transfer", 4, "More data than the announced size")]


@pytest.mark.integration
def test_fetch_to_streams_into_a_temporary_file_beside_dest(
    evil_tftp: EvilStarter, tmp_path: Path
) -> None:
    dest = tmp_path / "uInitrd"
    seen: list[list[str]] = []
    data = os.urandom(5 * 1468 + 7)
    server = evil_tftp(Honest(data, on_ack=lambda _: seen.append(_names(tmp_path))))
    assert fetch_to(_evil(server), "uInitrd", dest, **FAST) is True
    assert dest.read_bytes() == data
    # During the transfer only the temporary file exists; dest appears complete, at the end.
    assert seen == [[TMP]] * 5
    assert _names(tmp_path) == ["uInitrd"]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("old", "seen", "changed"),
    [
        # Identical: no temporary file, no write at all.
        (STREAMED, [["uInitrd"]] * 5, False),
        # Differs in the last block: the temporary file starts there.
        (STREAMED[:-1] + b"X", [["uInitrd"]] * 5, True),
        # Shorter: the bytes run out in block 3 (2936-4404), the temporary file starts.
        (STREAMED[:3000], [["uInitrd"]] * 2 + [[TMP, "uInitrd"]] * 3, True),
        # Longer: all the new bytes agree; the end shows it differs.
        (STREAMED + b"more", [["uInitrd"]] * 5, True),
    ],
    ids=["identical", "last-block-differs", "old-shorter", "old-longer"],
)
def test_fetch_to_writes_only_from_the_first_difference(
    evil_tftp: EvilStarter, tmp_path: Path, old: bytes, seen: list[list[str]], changed: bool
) -> None:
    dest = tmp_path / "uInitrd"
    dest.write_bytes(old)
    os.utime(dest, (1_000_000_000, 1_000_000_000))
    os.utime(tmp_path, (1_000_000_000, 1_000_000_000))
    inode = dest.stat().st_ino
    names: list[list[str]] = []
    server = evil_tftp(Honest(STREAMED, on_ack=lambda _: names.append(_names(tmp_path))))
    assert fetch_to(_evil(server), "uInitrd", dest, **FAST) is changed
    assert names == seen
    assert dest.read_bytes() == STREAMED
    assert _names(tmp_path) == ["uInitrd"]
    if not changed:  # not even the directory was written to
        assert dest.stat().st_ino == inode
        assert dest.stat().st_mtime == tmp_path.stat().st_mtime == 1_000_000_000
    else:
        assert dest.stat().st_ino != inode


@pytest.mark.integration
def test_fetch_to_leaves_dest_alone_past_the_size_cap(
    evil_tftp: EvilStarter, tmp_path: Path
) -> None:
    dest = tmp_path / "uInitrd"
    dest.write_bytes(b"old initrd")
    os.utime(dest, (1_000_000_000, 1_000_000_000))
    server = evil_tftp(Endless())
    with pytest.raises(UserError, match="larger than the limit of 1 MiB"):
        fetch_to(_evil(server), "uInitrd", dest, **FAST, max_size=MiB)
    assert dest.read_bytes() == b"old initrd"
    assert dest.stat().st_mtime == 1_000_000_000
    assert _names(tmp_path) == ["uInitrd"]


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# 9. A deadline for the whole transfer.


@pytest.mark.integration
def test_fetch_gives_up_on_a_trickling_server_at_the_deadline(evil_tftp: EvilStarter) -> None:
    # A block every 0.05s never trips the 0.5s timeout; 100 blocks would take 5s.
    server = evil_tftp(Trickle(os.urandom(100 * 512), interval=0.05))
    with pytest.raises(UserError) as info:
        fetch(_evil(server), "slow", timeout=0.5, retries=1, blksize=512, deadline=0.3)
    assert re.fullmatch(
        rf"transfer of slow from 127\.0\.0\.1:{server.port} did not finish within the 0\.3s "
        r"deadline \(got \d+ bytes\)",
        info.value.message,
    ), info.value.message
    assert info.value.hint == (
        "the server sends too slowly; check the network, or raise the deadline "
        "(scaleway.tftp_deadline)"
    )
    assert server.settled().client_errors == [("transfer", 0, "Transfer deadline exceeded")]


@pytest.mark.integration
def test_fetch_deadline_also_bounds_a_silent_server(silent_udp: socket.socket) -> None:
    # 5s timeout and 3 retries would wait 20s: the deadline ends it first.
    server = TftpServer(LOOPBACK, silent_udp.getsockname()[1])
    with pytest.raises(UserError) as info:
        fetch(server, "uboot.bootscript", timeout=5, retries=3, blksize=1468, deadline=0.2)
    assert info.value.message == (
        f"no answer from {server} for uboot.bootscript within the 0.2s deadline"
    )


# 10. Packets only from the server's address and the transfer ID of its first reply.

REAL = bytes(range(256)) * 20  # 5120 bytes: 4 blocks of 1468 and a short one
FORGED = b"#!/bin/sh\nreboot -f\n"  # short: accepted, it would end the transfer with it


@pytest.mark.integration
@pytest.mark.parametrize(
    "behaviour",
    [
        Spoof(REAL, FORGED, address=LOOPBACK),  # another port, after the ID is fixed
        Spoof(REAL, FORGED, address=LOOPBACK, block=3),  # ... in the middle of the file
        Spoof(REAL, FORGED, address=OTHER_LOOPBACK),  # another address
        Spoof(REAL, FORGED, address=OTHER_LOOPBACK, before_reply=True),  # before any reply
    ],
    ids=["other-port", "other-port-block-3", "other-address", "before-first-reply"],
)
def test_fetch_refuses_spoofed_data_and_answers_unknown_transfer_id(
    evil_tftp: EvilStarter, behaviour: Behaviour, caplog: pytest.LogCaptureFixture
) -> None:
    server = evil_tftp(behaviour)
    with caplog.at_level(logging.WARNING, logger="archkernel"):
        assert fetch(_evil(server), "initrd/uInitrd", **FAST) == REAL
    # RFC 1350: the stray sender gets ERROR 5, the transfer goes on undisturbed.
    assert server.settled().client_errors == [("spoofer", 5, "Unknown transfer ID")]
    assert server.acked == 4
    assert [r.getMessage() for r in caplog.records] == [
        f"tftp: ignored 1 packet(s) for initrd/uInitrd from senders other than "
        f"127.0.0.1:{server.transfer_ports[0]} (they were told 'unknown transfer ID')"
    ]


# 11. No larger block than requested, no DATA larger than agreed.


@pytest.mark.integration
@pytest.mark.parametrize(
    ("blksize", "options", "why"),
    [
        (
            1468,
            (("blksize", "1469"), ("tsize", "10")),
            "granted blksize 1469, larger than the 1468 requested",
        ),
        (1468, (("blksize", "65464"),), "granted blksize 65464, larger than the 1468 requested"),
        (512, (("blksize", "1468"),), "acknowledged option 'blksize', which was not requested"),
        (1468, (("blksize", "4"),), "granted blksize 4, below the minimum 8"),
        (1468, (("blksize", "1e3"),), "granted blksize '1e3', not a number"),
        (1468, (("tsize", "-1"),), "granted tsize '-1', not a number"),
        (1468, (("timeout", "1"),), "acknowledged option 'timeout', which was not requested"),
        (
            1468,
            (("\x1b[2Jwindowsize", "8"),),
            "acknowledged option '\\x1b[2jwindowsize', which was not requested",
        ),
    ],
)
def test_fetch_refuses_options_beyond_the_request(
    evil_tftp: EvilStarter, blksize: int, options: tuple[tuple[str, str], ...], why: str
) -> None:
    server = evil_tftp(Grant(options, data=b"g" * 3000))
    with pytest.raises(UserError) as info:
        fetch(_evil(server), "boot", timeout=0.5, retries=1, blksize=blksize)
    assert info.value.message == (
        f"TFTP server 127.0.0.1:{server.port} broke option negotiation for boot: the server {why}"
    )
    assert server.settled().acked == 0
    assert server.client_errors == [("transfer", 8, "Option negotiation refused")]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("behaviour", "blksize", "sent", "agreed"),
    [
        (Oversize(b"o" * 5000), 1468, 1469, 1468),
        (Oversize(b"o" * 70_000, extra=64000), 1468, 65468, 1468),
        (Oversize(b"o" * 5000, grant=1024), 1468, 1025, 1024),  # granted less, sent more
        (Oversize(b"o" * 5000, ignore_options=True), 1468, 513, 512),  # no OACK: 512
        (Oversize(b"o" * 5000), 512, 513, 512),
    ],
)
def test_fetch_refuses_data_larger_than_agreed(
    evil_tftp: EvilStarter, behaviour: Behaviour, blksize: int, sent: int, agreed: int
) -> None:
    server = evil_tftp(behaviour)
    with pytest.raises(UserError) as info:
        fetch(_evil(server), "boot", timeout=0.5, retries=1, blksize=blksize)
    assert info.value.message == (
        f"TFTP server 127.0.0.1:{server.port} sent boot in a DATA packet of {sent} bytes, "
        f"larger than the agreed blksize {agreed}"
    )
    assert server.settled().acked == 0
    assert server.client_errors == [("transfer", 4, "DATA larger than the block size")]


@pytest.mark.integration
def test_fetch_accepts_a_smaller_blksize_than_requested(evil_tftp: EvilStarter) -> None:
    data = os.urandom(3000)
    server = evil_tftp(Grant((("blksize", "1000"), ("tsize", "3000")), data=data))
    assert fetch(_evil(server), "boot", **FAST) == data
    assert server.settled().acked == 4  # 1000, 1000, 1000 and the empty block that ends the file


# 12. Server text is cleaned before it reaches a log or a terminal.

HOSTILE = b"\x1b[31mdisk\x1b[0m on fire\r\nroot# \x07\x1b]0;owned\x07" + b"A" * 600


@pytest.mark.integration
@pytest.mark.parametrize(
    ("behaviour", "expected"),
    [
        (
            Fail(0, HOSTILE),
            "TFTP server 127.0.0.1:{port} refused boot "
            "(TFTP error 0: disk on fire root# " + "A" * 178 + "...)",
        ),
        (
            Fail(2, b"Access\x00 hidden after NUL"),
            "TFTP server 127.0.0.1:{port} refused boot (TFTP error 2: Access)",
        ),
        (
            Fail(1, b"\r\n\x1b[2J\x00"),  # nothing printable left: the code's name instead
            "boot not found on TFTP server 127.0.0.1:{port} (TFTP error 1: file not found)",
        ),
        (
            Fail(0, b"\xe2\x80\xaeevil\xff\nlog line", after=2),  # RLO, a bad byte, LF
            "transfer of boot from 127.0.0.1:{port} aborted after 2936 bytes "
            "(TFTP error 0: evil\ufffd log line)",
        ),
    ],
    ids=["escapes-and-length", "nul", "only-controls", "mid-transfer"],
)
def test_fetch_cleans_the_servers_error_text(
    evil_tftp: EvilStarter, behaviour: Behaviour, expected: str
) -> None:
    server = evil_tftp(behaviour)
    with pytest.raises(UserError) as info:
        fetch(_evil(server), "boot", **FAST)
    assert info.value.message == expected.format(port=server.port)
    assert all(c.isprintable() for c in info.value.message)


@pytest.mark.integration
@pytest.mark.root
def test_fetch_block_numbers_wrap_around(tftpd_hpa: TftpdHpa) -> None:
    # 8-byte blocks: more than 65535 of them, so block numbers roll over to 0.
    data = os.urandom(65536 * 8 + 100)
    tftpd_hpa.put("rollover", data)
    assert fetch(_hpa(tftpd_hpa), "rollover", timeout=2, retries=2, blksize=8) == data
