"""The VM's network on the fabric: QEMU user networking holding Azure's fixed addresses.

slirp accepts a `guestfwd` address only inside its own network, so the network is
168.0.0.0/7: it holds the wireserver (168.63.129.16) and IMDS (169.254.169.254) both.
The guest gets its address by DHCP from 168.63.129.100 on; each connection to port 80 of
either address runs the relay (`relay.py`), which hands it to the stand-in server on
127.0.0.1; `hostfwd` gives the host an SSH port. `restrict=on`: nothing else leaves the
guest (the explicit forwards still work).

`netdev_argv` decides the options (pure); nothing here starts anything.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from archkernel.azure.fabric import imds, wireserver

NETWORK = ("168.0.0.0", 7)
HOST = "168.63.129.2"  # slirp's gateway and DNS
DHCP_START = "168.63.129.100"  # the one guest's address
MAC = "52:54:00:12:34:56"
RELAY = Path(__file__).with_name("relay.py")


@dataclass(frozen=True)
class Ports:
    """Loopback ports: the wireserver's, IMDS's, and the host's end of the guest's SSH."""

    wireserver: int
    imds: int
    ssh: int


def _opt(value: str) -> str:
    # QEMU option values escape a literal ',' as ',,'.
    return value.replace(",", ",,")


def relay_command(port: int, python: str | None = None) -> str:
    """The shell command QEMU runs per connection to relay it to 127.0.0.1:`port`."""
    return shlex.join([python or sys.executable, str(RELAY), str(port)])


def netdev_argv(ports: Ports, *, python: str | None = None, mac: str = MAC) -> list[str]:
    """QEMU options for one NIC (virtio, `mac`) on the fabric's user network."""
    netdev = ",".join(
        [
            "user",
            "id=fabric",
            "restrict=on",
            f"net={NETWORK[0]}/{NETWORK[1]}",
            f"host={HOST}",
            f"dhcpstart={DHCP_START}",
            f"guestfwd=tcp:{wireserver.ADDRESS}:80-cmd:"
            + _opt(relay_command(ports.wireserver, python)),
            f"guestfwd=tcp:{imds.ADDRESS}:80-cmd:" + _opt(relay_command(ports.imds, python)),
            f"hostfwd=tcp:127.0.0.1:{ports.ssh}-:22",
        ]
    )
    return ["-netdev", netdev, "-device", f"virtio-net-pci,netdev=fabric,mac={mac}"]
