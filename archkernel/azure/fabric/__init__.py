"""A stand-in for the Azure fabric on the build machine, in a network namespace of its own.

What Azure gives a booting Linux VM, so that its agent can provision it here as there:
the provisioning DVD (`media`, holding `ovf.ovf_env`), the wireserver (`wireserver`)
with its host agent plugin (`hostplugin`), the instance metadata service (`imds`), and a
network as Azure's looks from the VM, DHCP included (`network` decides it, `namespace`
makes it: a network namespace of the boot's own, so nothing leaves the machine).
`standing_fabric` sets all of it up for one boot and takes it down on any exit; it needs
root.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from archkernel.azure.fabric import hostplugin, imds, media, namespace, network, ovf, wireserver


@dataclass(frozen=True)
class Fabric:
    """A running fabric: the DVD image, the two servers and the VM's network."""

    spec: ovf.Provisioning
    dvd: Path
    wireserver: wireserver.Wireserver
    imds: imds.Imds
    network: network.Network
    hostplugin: hostplugin.HostPlugin | None = None

    def inside(self, argv: list[str]) -> list[str]:
        """`argv` run inside the VM's network (QEMU, and SSH to the VM)."""
        return network.in_namespace(self.network.netns, argv)


@contextlib.contextmanager
def standing_fabric(spec: ovf.Provisioning, directory: Path) -> Iterator[Fabric]:
    """The fabric for a VM `spec` describes: its DVD written to `directory/provision.iso`,
    the network namespace with its DHCP server, the wireserver (and its host plugin) and
    IMDS serving at their addresses in it. All of it is gone again after any exit."""
    dvd = media.write_media({"ovf-env.xml": ovf.ovf_env(spec)}, directory / "provision.iso")
    state = wireserver.GoalState(
        container_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"container:{spec.vm_id}")),
        instance_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"instance:{spec.vm_id}")),
        address=network.GUEST,
    )
    document = imds.instance_document(
        spec, mac=network.MAC, address=network.GUEST, subnet=network.SUBNET
    )
    with contextlib.ExitStack() as stack:
        # The servers' sockets keep the namespace alive: they close before it is deleted.
        net = stack.enter_context(namespace.fabric_network(directory / "network"))
        socks = [
            namespace.listening_socket(net.netns, address, port)
            for address, port in (
                (wireserver.ADDRESS, 80),
                (wireserver.ADDRESS, hostplugin.PORT),
                (imds.ADDRESS, 80),
            )
        ]
        for sock in socks:
            stack.callback(sock.close)
        wire = stack.enter_context(wireserver.Wireserver(state, sock=socks[0]))
        plugin = stack.enter_context(hostplugin.HostPlugin(socks[1]))
        metadata = stack.enter_context(imds.Imds(document, sock=socks[2]))
        yield Fabric(spec, dvd, wire, metadata, net, plugin)
