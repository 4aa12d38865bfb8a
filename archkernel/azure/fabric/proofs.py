"""What the provisioning boot test proves, and how it asks the VM over SSH.

The boot test logs in with the throwaway key the fabric handed the VM and runs one small
script (`PROBE`) that prints what it found, one `key=value` per line; `parse_probe` reads
it (pure). Password login is probed with the client refusing keys: the methods sshd
offers in its refusal (`Permission denied (publickey).`) say whether a password would
have been accepted, without ever sending one. `Proofs` is what `provision.json` holds.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

SSH_OPTIONS = (
    "-F", "/dev/null",  # no user configuration of the build machine
    "-o", "BatchMode=yes",
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "LogLevel=ERROR",
    "-o", "ConnectTimeout=15",
    "-o", "IdentitiesOnly=yes",
)  # fmt: skip

# Run as the provisioned user. sshd -T needs root (host keys): sudo -n, as Azure's
# provisioned users may; its secure_path finds sshd in sbin or bin.
PROBE = r"""
echo "hostname=$(cat /proc/sys/kernel/hostname)"
echo "static_hostname=$(cat /etc/hostname 2>/dev/null)"
echo "groups=$(id -nG)"
echo "sudo=$(sudo -n true 2>/dev/null && echo yes)"
echo "clientaliveinterval=$(sudo -n sshd -T 2>/dev/null | sed -n 's/^clientaliveinterval //p')"
echo "lease=$(cat /run/systemd/netif/leases/* 2>/dev/null | sed -n 's/^ADDRESS=//p' | head -n 1)"
echo "networkctl=$(networkctl status eth0 --no-pager 2>/dev/null | grep -c 'DHCP4')"
echo "machine_id=$(cat /etc/machine-id 2>/dev/null)"
echo "host_key=$(cat /etc/ssh/ssh_host_ed25519_key.pub 2>/dev/null | cut -d' ' -f2)"
"""


def ssh_argv(key: Path, host: str, user: str, command: str) -> list[str]:
    """Log in to the VM at `host` (port 22) as `user` with `key` and run `command`."""
    return [
        "ssh", *SSH_OPTIONS, "-o", "PasswordAuthentication=no", "-i", os.fspath(key),
        f"{user}@{host}", command,
    ]  # fmt: skip


def password_probe_argv(host: str, user: str) -> list[str]:
    """Ask sshd for password login without offering a key; never sends a password
    (BatchMode): sshd's refusal lists the methods it still offers."""
    return [
        "ssh", *SSH_OPTIONS, "-o", "PubkeyAuthentication=no",
        "-o", "PreferredAuthentications=password,keyboard-interactive",
        f"{user}@{host}", "true",
    ]  # fmt: skip


def offered_methods(stderr: str) -> set[str] | None:
    """The methods in ssh's `Permission denied (a,b).`, or None when there is none."""
    match = re.search(r"Permission denied \(([^)]*)\)", stderr)
    return set(match.group(1).split(",")) if match else None


def password_refused(stderr: str) -> bool:
    """Whether sshd's refusal offers neither password nor keyboard-interactive login."""
    methods = offered_methods(stderr)
    return methods is not None and not methods & {"password", "keyboard-interactive"}


def parse_probe(output: str) -> dict[str, str]:
    """`PROBE`'s output as a dict (the last value of a key wins)."""
    found: dict[str, str] = {}
    for line in output.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            found[key.strip()] = value.strip()
    return found


def client_alive_interval(probe: dict[str, str]) -> int:
    """sshd's effective ClientAliveInterval, or -1 when it could not be read."""
    value = probe.get("clientaliveinterval", "")
    return int(value) if value.isdigit() else -1


def has_lease(probe: dict[str, str], address: str) -> bool:
    """Whether networkd holds a DHCP lease: its lease file names `address`, or
    networkctl shows a DHCPv4 address on eth0."""
    return probe.get("lease") == address or probe.get("networkctl", "0") not in ("", "0")


@dataclass(frozen=True)
class Proofs:
    """What provision.json says; each bool is one proof."""

    hostname: str  # the running one (the kernel's)
    static_hostname: str  # /etc/hostname: what the next boot takes
    user_login: bool
    in_wheel: bool
    wrong_key_refused: bool
    password_login_refused: bool
    ready_reported: bool
    dhcp_lease: bool
    client_alive_interval: int
    fresh_identity: bool
    agent: str
    seconds: float
    # The user may act as root (`sudo -n true`). After the fields above so that records
    # made without it still construct; `boot` always sets it.
    sudo: bool = True
    # Where waagent runs (its own provisioning, or beside cloud-init for extensions):
    # whether it took the goal state from the wireserver; None where it does not run.
    waagent_goal_state: bool | None = None

    def failed(self, *, expected_hostname: str, refuse_password: bool) -> list[str]:
        """The names of the proofs that failed."""
        checks = {
            "hostname": self.hostname == expected_hostname,
            "user_login": self.user_login,
            # cloud-init gives Arch's default user's groups; waagent's user joins wheel
            # through the image's path unit (archkernel.azure.admins).
            "in_wheel": self.in_wheel,
            "sudo": self.sudo,
            "waagent_goal_state": self.waagent_goal_state is not False,
            "wrong_key_refused": self.wrong_key_refused,
            "password_login_refused": self.password_login_refused or not refuse_password,
            "ready_reported": self.ready_reported,
            "dhcp_lease": self.dhcp_lease,
            "client_alive_interval": self.client_alive_interval == 180,
            "fresh_identity": self.fresh_identity,
        }
        return [name for name, ok in checks.items() if not ok]

    def record(self) -> dict[str, object]:
        return asdict(self)


def fresh_identity(probe: dict[str, str], image_root: Path | None) -> bool:
    """Whether the VM's machine-id and SSH host key were made on this boot: both exist
    and neither is the one in the tree the image was made from (`image_root`, when kept)."""
    machine_id, host_key = probe.get("machine_id", ""), probe.get("host_key", "")
    if not re.fullmatch(r"[0-9a-f]{32}", machine_id) or not host_key:
        return False
    if image_root is None:
        return True
    shipped_id = _read(image_root / "etc" / "machine-id").strip()
    shipped_key = _read(image_root / "etc" / "ssh" / "ssh_host_ed25519_key.pub").split()
    return machine_id != shipped_id and host_key not in shipped_key


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return ""
