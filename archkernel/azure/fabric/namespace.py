"""Acting on `network`: the namespace, its DHCP server and sockets inside it.

`fabric_network(directory)` makes one boot's namespace (`network.setup_argv`), runs
dnsmasq in it and removes both on any exit, Ctrl-C included: dnsmasq stopped, then the
namespace deleted (its tap device with it). A namespace left by a run that was killed
outright (SIGKILL) is removed by the next one: its name carries the pid that made it.
`listening_socket` makes a TCP socket inside the namespace, so a server in this process
answers there.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

from archkernel.azure.fabric import network
from archkernel.errors import UserError
from archkernel.host.background import Background
from archkernel.host.processes import terminate
from archkernel.host.run import check_tools, run
from archkernel.log import log

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
TOOLS = ("ip", "dnsmasq")
START_WAIT = 10.0
STOP_GRACE = 5.0


def require() -> None:
    """UserError unless this process may make the fabric's network: root, `ip`, `dnsmasq`."""
    if os.geteuid() != 0:
        raise UserError(
            "the provisioning boot test needs root: the VM's network is a network namespace "
            "of its own with a tap device and a DHCP server",
            'run it as root, or set azure.boottest_mode = "console"',
        )
    check_tools(TOOLS, "the provisioning boot test's network")


def namespace_name(pid: int | None = None) -> str:
    """A name for a new namespace: the prefix, the pid making it, a random part."""
    return f"{network.NETNS_PREFIX}{pid or os.getpid()}-{secrets.token_hex(3)}"


def stale_namespaces(names: list[str], alive: set[int]) -> list[str]:
    """The fabric namespaces among `names` whose maker is no longer running (pure)."""
    pattern = re.compile(re.escape(network.NETNS_PREFIX) + r"(\d+)-[0-9a-f]+")
    stale = []
    for name in names:
        match = pattern.fullmatch(name)
        if match and int(match.group(1)) not in alive:
            stale.append(name)
    return stale


def _remove_stale() -> None:
    try:
        names = [p.name for p in NETNS_DIR.iterdir()]
    except OSError:
        return
    alive = {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()}
    for name in stale_namespaces(names, alive):
        log.info("removing the network namespace %s left by a killed run", name)
        _stop_inside(name)
        run(network.teardown_argv(name), check=False)


def _stop_inside(netns: str) -> None:
    """End what still runs in `netns` (it would keep the namespace alive after `ip netns
    delete`): a backstop, as dnsmasq and QEMU die with the run that started them."""
    listed = run(network.pids_argv(netns), check=False, capture=True)
    terminate([int(word) for word in listed.stdout.split() if word.isdigit()], STOP_GRACE)


@contextlib.contextmanager
def fabric_network(directory: Path, *, limit: float = 3600.0) -> Iterator[network.Network]:
    """One boot's network namespace with dnsmasq in it, removed on any exit. `limit`
    (seconds) is the longest dnsmasq may run at all."""
    require()
    _remove_stale()
    directory.mkdir(parents=True, exist_ok=True)
    net = network.Network(namespace_name(), directory)
    with contextlib.ExitStack() as stack:
        stack.callback(run, network.teardown_argv(net.netns), check=False)
        stack.callback(_stop_inside, net.netns)
        for argv in network.setup_argv(net.netns):
            run(argv)
        dhcp = Background("dnsmasq", network.dnsmasq_argv(net), net.dhcp_pidfile, limit)
        stack.callback(dhcp.stop)
        dhcp.start(wait=START_WAIT)
        yield net


def _libc_setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def listening_socket(netns: str, address: str, port: int) -> socket.socket:
    """A TCP socket listening on `address`:`port` inside the namespace `netns`.

    A socket belongs to the namespace of the thread that made it, for good: a short-lived
    thread enters the namespace, makes it and ends; this process stays where it was.
    """
    made: list[socket.socket] = []
    failed: list[BaseException] = []

    def make() -> None:
        try:
            with open(NETNS_DIR / netns) as handle:
                _libc_setns(handle.fileno())
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, port))
            sock.listen(16)
            made.append(sock)
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=make, name=f"enter {netns}")
    thread.start()
    thread.join()
    if failed:
        raise UserError(
            f"cannot listen on {address}:{port} in the network namespace {netns}: {failed[0]}",
            "the provisioning boot test needs root",
        )
    return made[0]
