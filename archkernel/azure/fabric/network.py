"""The VM's network on the fabric, as Azure's virtual network looks from inside a VM.

One network namespace per boot holds all of it, so nothing leaves the machine and nothing
of the build machine's own network is touched:
- a tap device (`TAP`) with the gateway's address; QEMU, started in the namespace, puts
  the VM's NIC on it;
- the wireserver's and IMDS's fixed addresses (168.63.129.16, 169.254.169.254) on the
  namespace's loopback device, where the stand-in servers listen (their sockets are made
  inside the namespace: `namespace.listening_socket`);
- dnsmasq on the tap device, answering as Azure's DHCP does: the VM's address, option 121
  (classless static routes: the wireserver and IMDS through the gateway, and the default
  route, which replaces option 3 for a client that takes option 121), option 245 (the
  wireserver's address; waagent asks DHCP for it when it finds no route to it) and
  168.63.129.16 as the DNS server. Azure's leases are practically endless: `infinite`.

Everything here decides (pure); `namespace.py` acts on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from archkernel.azure.fabric import imds, wireserver

SUBNET = ("10.0.0.0", 24)
GATEWAY = "10.0.0.1"
GUEST = "10.0.0.4"  # the one VM's address, Azure's first usable one
NETMASK = "255.255.255.0"
MAC = "52:54:00:12:34:56"
TAP = "fabric0"
NETNS_PREFIX = "archkernel-fabric-"
# Azure's DHCP: classless static routes (121) and the wireserver's address (245).
ROUTES = (
    (f"{wireserver.ADDRESS}/32", GATEWAY),
    (f"{imds.ADDRESS}/32", GATEWAY),
    ("0.0.0.0/0", GATEWAY),
)
OPTION_CLASSLESS_ROUTES = 121
OPTION_WIRESERVER = 245


@dataclass(frozen=True)
class Network:
    """One boot's network: the namespace's name and the directory of dnsmasq's files."""

    netns: str
    directory: Path

    @property
    def leases(self) -> Path:
        return self.directory / "dnsmasq.leases"

    @property
    def dhcp_log(self) -> Path:
        return self.directory / "dnsmasq.log"

    @property
    def dhcp_pidfile(self) -> Path:
        return self.directory / "dnsmasq.pid"


def in_namespace(netns: str, argv: list[str]) -> list[str]:
    """`argv` run inside the network namespace `netns` (`ip netns exec` execs it, so the
    pid is the command's own)."""
    return ["ip", "netns", "exec", netns, *argv]


def setup_argv(netns: str) -> list[list[str]]:
    """The commands that make the namespace: loopback up with the fabric's two addresses,
    the tap device up with the gateway's address."""
    ip = ["ip", "-n", netns]
    return [
        ["ip", "netns", "add", netns],
        [*ip, "link", "set", "lo", "up"],
        [*ip, "address", "add", f"{wireserver.ADDRESS}/32", "dev", "lo"],
        [*ip, "address", "add", f"{imds.ADDRESS}/32", "dev", "lo"],
        [*ip, "tuntap", "add", "dev", TAP, "mode", "tap"],
        [*ip, "address", "add", f"{GATEWAY}/{SUBNET[1]}", "dev", TAP],
        [*ip, "link", "set", TAP, "up"],
    ]


def pids_argv(netns: str) -> list[str]:
    """The command that lists the processes running in the namespace `netns`."""
    return ["ip", "netns", "pids", netns]


def teardown_argv(netns: str) -> list[str]:
    """The command that removes the namespace (its tap device goes with it)."""
    return ["ip", "netns", "delete", netns]


def dhcp_options() -> list[str]:
    """dnsmasq's options for Azure's DHCP answer. `force`: sent whether or not the client
    asked for them, as Azure does (networkd does not ask for 245)."""
    routes = ",".join(f"{dest},{via}" for dest, via in ROUTES)
    return [
        f"--dhcp-option-force={OPTION_CLASSLESS_ROUTES},{routes}",
        f"--dhcp-option-force={OPTION_WIRESERVER},{wireserver.ADDRESS}",
        f"--dhcp-option=option:router,{GATEWAY}",
        f"--dhcp-option=option:dns-server,{wireserver.ADDRESS}",
    ]


def dnsmasq_argv(network: Network) -> list[str]:
    """dnsmasq in the namespace: DHCP only (no DNS: `--port=0`), on the tap device, one
    address for the one VM, in the foreground with its log and leases in the network's
    directory; no configuration file of the build machine is read."""
    return in_namespace(
        network.netns,
        [
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--port=0",
            f"--interface={TAP}",
            "--bind-interfaces",
            f"--dhcp-range={GUEST},{GUEST},{NETMASK},infinite",
            "--dhcp-authoritative",
            # Azure's DHCP gives no host name (option 12); dnsmasq would echo the client's.
            "--dhcp-ignore-names",
            "--no-ping",
            f"--dhcp-leasefile={network.leases}",
            f"--pid-file={network.dhcp_pidfile}",
            f"--log-facility={network.dhcp_log}",
            "--log-dhcp",
            # The namespace is ours alone; dnsmasq-base has no user of its own to drop to.
            # Nor a group: its default, dip, would change the egid, and the kernel then
            # clears PR_SET_PDEATHSIG: dnsmasq would outlive a run killed outright.
            "--user=root",
            "--group=root",
            *dhcp_options(),
        ],
    )


def netdev_argv(mac: str = MAC) -> list[str]:
    """QEMU options for one NIC (virtio, `mac`) on the namespace's tap device."""
    return [
        "-netdev", f"tap,id=fabric,ifname={TAP},script=no,downscript=no",
        "-device", f"virtio-net-pci,netdev=fabric,mac={mac}",
    ]  # fmt: skip
