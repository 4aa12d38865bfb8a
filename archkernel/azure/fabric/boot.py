"""A VM booted on the fabric, and the proof that its agent provisioned it.

`provision_argv` decides what the fabric adds to the boot's QEMU command (pure): the DVD
where Azure attaches it (IDE for generation 1, SCSI for generation 2), the NIC on the
fabric's network, and Azure's SMBIOS chassis asset tag (cloud-init's Azure datasource
runs only where it finds it) and VM id. `provision_boot` stands the fabric up, boots
QEMU inside the fabric's network namespace, waits until the provisioned user logs in over
SSH (from inside the namespace too), runs the probes (`proofs`) and takes everything down
again on any exit: QEMU first, then the servers, DHCP and the namespace.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from archkernel.azure.fabric import Fabric, network, ovf, proofs, standing_fabric
from archkernel.errors import UserError
from archkernel.formats.text import clean_text
from archkernel.host import qemu
from archkernel.host.console import BootProgress, console_tail
from archkernel.host.run import run
from archkernel.log import log

AZURE_ASSET_TAG = "7783-7084-3265-9085-8269-3286-77"
POLL = 3.0
# After the user first logs in, how long the VM still has to report Ready.
READY_GRACE = 60.0
SSH_TIMEOUT = 60.0
# How much of each line the VM wrote a failure quotes.
QUOTE_WIDTH = 200
WAAGENT = "WALinuxAgent"  # its User-Agent's product name


def _drive(path: Path) -> str:
    return str(path).replace(",", ",,")


def dvd_argv(dvd: Path, generation: int) -> list[str]:
    """The provisioning DVD as Azure attaches it: an ATAPI drive on IDE (generation 1)
    or a SCSI CD-ROM (generation 2)."""
    medium = f"file={_drive(dvd)},format=raw,media=cdrom,readonly=on"
    if generation == 1:
        return ["-drive", f"{medium},if=ide,index=2"]
    return [
        "-device", "virtio-scsi-pci,id=fabric-scsi",
        "-drive", f"{medium},if=none,id=fabric-dvd",
        "-device", "scsi-cd,drive=fabric-dvd,bus=fabric-scsi.0",
    ]  # fmt: skip


def provision_argv(base: list[str], fabric: Fabric, generation: int) -> list[str]:
    """`base` (the boot test's QEMU command) on `fabric`."""
    return [
        *base,
        *dvd_argv(fabric.dvd, generation),
        *network.netdev_argv(),
        "-smbios", f"type=3,asset={AZURE_ASSET_TAG}",
        "-uuid", fabric.spec.vm_id,
    ]  # fmt: skip


def make_key(path: Path) -> Path:
    """A new ed25519 key pair `path` and `path.pub`, no passphrase (never logged)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "archkernel-boottest", "-f", path])
    return path


@dataclass(frozen=True)
class ProvisionBoot:
    """One provisioning boot: what to boot, as whom, and where its files go."""

    qemu: list[str]  # the boot test's command, without the fabric
    generation: int
    console: Path
    spec: ovf.Provisioning
    key: Path  # the private key whose .pub is in spec
    agent: str
    timeout: float
    scratch: Path
    image_root: Path | None = None
    label: str = "provisioning boot"
    # waagent installed beside cloud-init for extensions: it must take the goal state too.
    extensions: bool = False
    # Who logs in with the key: the user ovf-env.xml names, unless set (needed when the
    # DVD names nobody).
    user: str | None = None

    def __post_init__(self) -> None:
        if not (self.user or self.spec.username):
            raise UserError(
                f"{self.label}: nobody to log in as",
                "name the user in the provisioning document (ovf-env.xml) or the boot",
            )

    @property
    def login(self) -> str:
        return self.user or self.spec.username or ""


def _waagent_expected(boot: ProvisionBoot) -> bool:
    return boot.agent == "waagent" or boot.extensions


def _ssh(argv: list[str], timeout: float = SSH_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return run(argv, check=False, capture=True, stdin=b"", timeout=timeout)


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


@contextlib.contextmanager
def _booted(boot: ProvisionBoot) -> Iterator[tuple[Fabric, qemu.QemuProcess]]:
    with standing_fabric(boot.spec, boot.scratch) as fabric:
        argv = fabric.inside(provision_argv(boot.qemu, fabric, boot.generation))
        boot.console.unlink(missing_ok=True)
        with qemu.qemu_process(
            argv, limit=boot.timeout + 300, pidfile=boot.scratch / "qemu.pid"
        ) as vm:
            yield fabric, vm


def _wait_for_login(boot: ProvisionBoot, fabric: Fabric, vm: qemu.QemuProcess) -> str | None:
    """Wait until the user logs in with the key (then, briefly, until Ready is reported
    and, where waagent runs, it took the goal state); None if they did, else why not."""
    start, logged_in = time.monotonic(), None
    progress = BootProgress(boot.label)
    login = fabric.inside(proofs.ssh_argv(boot.key, network.GUEST, boot.login, "true"))
    try:
        while True:
            elapsed = time.monotonic() - start
            progress.update(elapsed, _read(boot.console))
            if not vm.running:
                vm.raise_error()
                return f"QEMU exited after {elapsed:.0f}s"
            if logged_in is None and _ssh(login, timeout=30).returncode == 0:
                logged_in = elapsed
            settled = fabric.wireserver.ready_reported and (
                not _waagent_expected(boot) or fabric.wireserver.asked_by(WAAGENT)
            )
            if logged_in is not None and (settled or elapsed > logged_in + READY_GRACE):
                return None
            if elapsed > boot.timeout:
                return f"the user did not log in within {boot.timeout:g}s"
            time.sleep(POLL)
    finally:
        progress.close()


def _prove(boot: ProvisionBoot, fabric: Fabric, seconds: float) -> proofs.Proofs:
    host, user = network.GUEST, boot.login
    probed = _ssh(fabric.inside(proofs.ssh_argv(boot.key, host, user, proofs.PROBE)))
    found = proofs.parse_probe(probed.stdout) if probed.returncode == 0 else {}
    wrong = make_key(boot.scratch / "wrong_key")
    wrong_login = _ssh(fabric.inside(proofs.ssh_argv(wrong, host, user, "true")))
    password = _ssh(fabric.inside(proofs.password_probe_argv(host, user)))
    return proofs.Proofs(
        hostname=found.get("hostname", ""),
        static_hostname=found.get("static_hostname", ""),
        user_login=probed.returncode == 0,
        in_wheel="wheel" in found.get("groups", "").split(),
        wrong_key_refused=wrong_login.returncode != 0,
        password_login_refused=proofs.password_refused(password.stderr),
        ready_reported=fabric.wireserver.ready_reported,
        dhcp_lease=proofs.has_lease(found, network.GUEST),
        client_alive_interval=proofs.client_alive_interval(found),
        fresh_identity=proofs.fresh_identity(found, boot.image_root),
        agent=boot.agent,
        seconds=round(seconds, 1),
        sudo=found.get("sudo") == "yes",
        waagent_goal_state=(
            fabric.wireserver.asked_by(WAAGENT) if _waagent_expected(boot) else None
        ),
    )


def agent_log(boot: ProvisionBoot, fabric: Fabric) -> str:
    """The agent's last log lines, read over SSH; the console's lines naming it when SSH
    does not work."""
    logs = "/var/log/cloud-init.log" if boot.agent == "cloud-init" else "/var/log/waagent.log"
    tail = f"sudo -n tail -n 15 {logs}"
    got = _ssh(fabric.inside(proofs.ssh_argv(boot.key, network.GUEST, boot.login, tail)),
               timeout=30)  # fmt: skip
    if got.returncode == 0 and got.stdout.strip():
        return got.stdout.rstrip()
    words = ("cloud-init", "waagent", "WALinuxAgent", "Azure")
    lines = [line for line in console_tail(_read(boot.console), 400).splitlines()
             if any(w in line for w in words)]  # fmt: skip
    return "\n".join(lines[-15:]) or "(no agent lines on the console)"


def fabric_log(fabric: Fabric) -> str:
    """What the VM asked of the wireserver, its host plugin and IMDS, one request a line."""
    servers = [("wireserver", fabric.wireserver), ("hostplugin", fabric.hostplugin),
               ("imds", fabric.imds)]  # fmt: skip
    asked = [
        f"{name} {r.method} {r.target} -> {r.status}"
        for name, server in servers
        if server is not None
        for r in server.requests
    ]
    return "\n".join(asked[-20:]) or "(the VM asked neither the wireserver nor IMDS)"


def dhcp_log(fabric: Fabric) -> str:
    """What the fabric's DHCP server answered, its last exchanges."""
    # dnsmasq's exchanges: `... dnsmasq-dhcp[PID]: XID DHCPACK(fabric0) 10.0.0.4 MAC`
    exchange = re.compile(r"\]: (\d+ )?DHCP[A-Z]+\(")
    lines = [line for line in _read(fabric.network.dhcp_log).splitlines()
             if exchange.search(line)]  # fmt: skip
    return "\n".join(lines[-6:]) or "(the VM asked nothing of DHCP)"


def _indent(text: str) -> str:
    """Lines the VM wrote (its console, its agent's log, what it asked), indented, each
    made safe to show (`clean_text`: no escape sequences, no control characters)."""
    return "\n".join(f"    {clean_text(line, QUOTE_WIDTH)}" for line in text.splitlines()) or (
        "    (nothing)"
    )


def provision_boot(boot: ProvisionBoot) -> proofs.Proofs:
    """Boot on the fabric and prove the provisioning; UserError naming the failed proofs
    (or why no proof could be made), with the console's and the agent's last lines.
    The failed proofs are in the error's `result`."""
    start = time.monotonic()
    with _booted(boot) as (fabric, vm):
        why = _wait_for_login(boot, fabric, vm)
        result = _prove(boot, fabric, time.monotonic() - start)
        for name, value in result.record().items():
            log.info("provision proof %s: %s", name, value)
        failed = result.failed(
            expected_hostname=boot.spec.hostname, refuse_password=boot.spec.disable_password_auth
        )
        if not failed and why is None:
            return result
        # The agent's own account, when it reported its provisioning failed (NotReady).
        reported = "; ".join(fabric.wireserver.failures_reported())
        details = (
            (f"the agent reported to the wireserver: {reported}\n  " if reported else "")
            + f"console, last lines ({boot.console}):\n"
            f"{_indent(console_tail(_read(boot.console)))}\n"
            f"  agent ({boot.agent}), last lines:\n{_indent(agent_log(boot, fabric))}\n"
            f"  asked of the fabric:\n{_indent(fabric_log(fabric))}\n"
            f"  DHCP ({fabric.network.dhcp_log}):\n{_indent(dhcp_log(fabric))}"
        )
    named = [
        f"hostname (running {result.hostname!r}, /etc/hostname {result.static_hostname!r}, "
        f"ovf-env.xml {boot.spec.hostname!r})"
        if name == "hostname"
        else name
        for name in failed
    ]
    hint = (
        "the proofs are in the log above; see the whole console log and check the agent's "
        "configuration, the DVD modules (udf, sr_mod, cdrom, ata_piix) and sshd_config"
    )
    if "user_login" in failed and boot.spec.username is None:
        hint += (
            "; ovf-env.xml named no user: only a build-time administrator ([azure.user] "
            "with an SSH key) could have logged in"
        )
    error = ProvisionFailed(
        f"provisioning not proven: {', '.join(named) or 'no proof'} failed"
        + (f" ({why})" if why else "")
        + f"\n  {details}",
        hint,
    )
    error.result = result
    raise error


class ProvisionFailed(UserError):
    """A provisioning boot whose proofs did not all pass; `result` says which."""

    result: proofs.Proofs | None = None
