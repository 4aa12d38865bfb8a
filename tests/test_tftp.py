"""archkernel.host.tftp: name checks and server choice as tables; fetches against real servers."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
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
    assert budget - 0.05 <= elapsed <= budget + 1
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
    assert time.monotonic() - start < 0.6 + 1
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
    assert time.monotonic() - start < 0.6 + 1
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
    assert time.monotonic() - start < 0.6 + 0.5
    assert info.value.message == (
        f"transfer of uInitrd from 127.0.0.1:{repeating_server} interrupted after "
        "512 bytes: no new data for 0.6s"
    )
