"""A stand-in for the Azure fabric on the build machine, loopback only.

What Azure gives a booting Linux VM, so that its agent can provision it here as there:
the provisioning DVD (`media`, holding `ovf.ovf_env`), the wireserver (`wireserver`),
the instance metadata service (`imds`), and a QEMU network that puts both at their fixed
addresses (`network`). `standing_fabric` sets all of it up for one boot and takes it down
on any exit.
"""

from __future__ import annotations

import contextlib
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from archkernel.azure.fabric import imds, media, network, ovf, wireserver


@dataclass(frozen=True)
class Fabric:
    """A running fabric: the DVD image, the two servers and the VM's network options."""

    spec: ovf.Provisioning
    dvd: Path
    wireserver: wireserver.Wireserver
    imds: imds.Imds
    ports: network.Ports

    def netdev_argv(self) -> list[str]:
        """The QEMU options of the VM's NIC on this fabric."""
        return network.netdev_argv(self.ports)


def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now (for QEMU's hostfwd)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def standing_fabric(spec: ovf.Provisioning, directory: Path) -> Iterator[Fabric]:
    """The fabric for a VM `spec` describes: its DVD written to `directory/provision.iso`,
    the wireserver and IMDS serving on loopback. Both servers stop on any exit."""
    dvd = media.write_media({"ovf-env.xml": ovf.ovf_env(spec)}, directory / "provision.iso")
    state = wireserver.GoalState(
        container_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"container:{spec.vm_id}")),
        instance_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"instance:{spec.vm_id}")),
    )
    document = imds.instance_document(
        spec, mac=network.MAC, address=network.DHCP_START, subnet=network.NETWORK
    )
    with contextlib.ExitStack() as stack:
        wire = stack.enter_context(wireserver.Wireserver(state))
        metadata = stack.enter_context(imds.Imds(document))
        ports = network.Ports(wire.port, metadata.port, free_port())
        yield Fabric(spec, dvd, wire, metadata, ports)
