"""Provisioning proven end to end: real agents provision a VM made from the image.

The functional repository (Debian's real systemd, networkd, OpenSSH, cloud-init and
waagent under Arch's names) is built once; from it one image per agent setting, each by
`archkernel run azure_vhd` and then booted by `archkernel run azure_boottest` in
provision mode, in a separate process as a user runs them. The boot is on the stand-in
fabric: the DVD with ovf-env.xml, Azure's DHCP (routes to the wireserver and IMDS, option
245), the wireserver and IMDS, in a network namespace of the boot's own. Each test reads
the proofs the step wrote (`provision.json`) and asserts every one.

- waagent provisions by itself;
- cloud-init provisions with waagent installed beside it for extensions
  (`extensions = true`: waagent hands provisioning to cloud-init);
each image is hybrid and boots twice: generation 1 (SeaBIOS, the DVD on IDE) and
generation 2 (OVMF, the DVD on SCSI, the OS disk on NVMe).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from archkernel.azure import boottest
from archkernel.azure.fabric import boot as fabric_boot
from archkernel.azure.fabric import ovf
from archkernel.demo import functional
from archkernel.demo.offline import OfflineRepo
from archkernel.errors import UserError
from archkernel.host import qemu
from archkernel.settings import load
from tests.support.azure import archkernel as run_archkernel

pytestmark = [pytest.mark.integration, pytest.mark.vm, pytest.mark.root]

HOSTNAME = "provisioned-archkernel-test"  # boottest.provisioning: the image's, prefixed
TOOLS = ("qemu-system-x86_64", "dnsmasq", "ip", "pacstrap", "ssh")


def archkernel(settings: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """`archkernel --settings SETTINGS ARGS...` in a new process (the test cache kept)."""
    cache = {k: v for k, v in os.environ.items() if k == "ARCHKERNEL_TEST_CACHE"}
    return run_archkernel("--settings", str(settings), *args, env=cache, timeout=timeout)


@pytest.fixture(scope="session")
def functional_repo(tmp_path_factory: pytest.TempPathFactory) -> OfflineRepo:
    if os.geteuid() != 0:
        pytest.skip("needs root (pacstrap, loop devices, the fabric's network namespace)")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    try:
        return functional.build(tmp_path_factory.mktemp("functional"))
    except UserError as exc:
        pytest.skip(f"the functional repository cannot be built here: {exc}")


def built(repo: OfflineRepo, directory: Path, extra: str) -> Path:
    """An image built from `repo` in `directory` with the functional settings plus `extra`
    (TOML lines of [azure]); its settings file."""
    directory.mkdir()
    text = repo.settings.read_text().replace(
        'pacman_conf = "pacman.conf"', f'pacman_conf = "{repo.pacman_conf}"'
    )
    settings = directory / "settings.toml"
    settings.write_text(text + extra)
    done = archkernel(settings, "run", "azure_vhd", timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    return settings


def provisioned(settings: Path) -> list[tuple[dict[str, object], str]]:
    """The provisioning boot test run on the hybrid image `settings` built: its proofs and
    console, generation 1 (SeaBIOS, DVD on IDE) then generation 2 (OVMF, DVD on SCSI, the
    OS disk on NVMe)."""
    booted = archkernel(settings, "run", "azure_boottest", timeout=2400)
    work = settings.parent / "build" / "azure"
    assert booted.returncode == 0, booted.stderr[-6000:]
    generation = load(settings, env={}).settings.azure.generation
    first, other = ("", "-uefi") if generation == 1 else ("-bios", "")
    return [
        (
            json.loads((work / f"provision{suffix}.json").read_text()),
            (work / f"boottest{suffix}.log").read_text(errors="replace"),
        )
        for suffix in (first, other)
    ]


@pytest.fixture(scope="module")
def waagent_image(functional_repo: OfflineRepo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The waagent image (generation 1, booting BIOS and UEFI): provisioned below, and
    the seeds' base."""
    directory = tmp_path_factory.mktemp("waagent") / "image"
    extra = 'provisioning = "waagent"\ngeneration = 1\nboot = "hybrid"\n'
    return built(functional_repo, directory, extra)


def assert_provisioned(proofs: dict[str, object], agent: str) -> None:
    assert proofs["agent"] == agent
    assert proofs["hostname"] == HOSTNAME  # the running host name, from the DVD
    assert proofs["static_hostname"] == HOSTNAME
    assert proofs["user_login"] is True
    assert proofs["sudo"] is True
    # The login session's groups: cloud-init gives Arch's default user's; waagent's user
    # joins wheel through the image's path unit.
    assert proofs["in_wheel"] is True
    assert proofs["wrong_key_refused"] is True
    assert proofs["password_login_refused"] is True
    assert proofs["ready_reported"] is True
    assert proofs["dhcp_lease"] is True
    assert proofs["client_alive_interval"] == 180
    assert proofs["fresh_identity"] is True
    # waagent took the goal state: provisioning itself, or beside cloud-init.
    assert proofs["waagent_goal_state"] is True
    assert proofs["ok"] is True


def test_waagent_provisions_both_generations(waagent_image: Path) -> None:
    for proofs, console in provisioned(waagent_image):
        assert_provisioned(proofs, "waagent")
        # It found the wireserver by the route DHCP gave (option 121), provisioned itself.
        assert "Route to 168.63.129.16 exists" in console
        assert "Using waagent for provisioning" in console


def test_cloud_init_provisions_both_generations_with_waagent_beside_it(
    functional_repo: OfflineRepo, tmp_path: Path
) -> None:
    extra = 'generation = 2\nboot = "hybrid"\nextensions = true\n'
    settings = built(functional_repo, tmp_path / "cloud-init", extra)
    for proofs, console in provisioned(settings):
        assert_provisioned(proofs, "cloud-init")
        # waagent, installed for extensions, left provisioning to cloud-init.
        assert "Using cloud-init for provisioning" in console


# --- the old scripts' failures, brought back on purpose ---------------------------------------
# The waagent image (generation 1: the agent of the old scripts, and the one that needs the
# DVD: cloud-init 22.4 provisions from IMDS's osProfile when it cannot read the DVD); each
# seed is a copy of its VHD changed by debugfs (no mount), booted on the fabric by the
# library as the boot test does. Each must fail the proof that names it, for its own reason.

SEED_TIMEOUT = 240.0  # the unchanged image provisions in ~70-120 s on 2 cores under TCG


@pytest.fixture(scope="module")
def seed_base(waagent_image: Path) -> Path:
    return waagent_image.parent / "build" / "azure" / "archlinux-azure.vhd"


def root_fs(vhd: Path) -> str:
    """debugfs's name for the root file system inside `vhd` (the partition named root)."""
    table = json.loads(
        subprocess.run(["sfdisk", "--json", vhd], capture_output=True, check=True).stdout
    )
    (root,) = [p for p in table["partitiontable"]["partitions"] if p.get("name") == "root"]
    return f"{vhd}?offset={root['start'] * 512}"


def debugfs_read(vhd: Path, request: str) -> str:
    done = subprocess.run(
        ["debugfs", "-R", request, root_fs(vhd)], capture_output=True, text=True, check=True
    )
    return done.stdout


def seeded(vhd: Path, tmp_path: Path, commands: str, files: dict[str, str] | None = None) -> Path:
    """A sparse copy of `vhd` whose root file system had debugfs `commands` run on it
    (run in `tmp_path`, where `files` are written first for debugfs's `write`)."""
    copy = tmp_path / "seeded.vhd"
    subprocess.run(["cp", "--sparse=always", vhd, copy], check=True)
    for name, text in (files or {}).items():
        (tmp_path / name).write_text(text)
    script = tmp_path / "debugfs.cmds"
    script.write_text(commands)
    done = subprocess.run(
        ["debugfs", "-w", "-f", script, root_fs(copy)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "not found" not in done.stderr and "Could not" not in done.stderr, done.stderr
    return copy


def seed_boot(
    disk: Path, tmp_path: Path, timeout: float = SEED_TIMEOUT, *, user_on_dvd: bool = True
) -> fabric_boot.ProvisionFailed:
    """Boot `disk` on the fabric as the boot test does (waagent, generation 1), its key
    for the boot test's user, who is named on the DVD unless `user_on_dvd` is false; the
    failure it must end in."""
    key = fabric_boot.make_key(tmp_path / "key")
    console = tmp_path / "console.log"
    spec = ovf.Provisioning.with_key(HOSTNAME, boottest.USER, Path(f"{key}.pub").read_text())
    boot = fabric_boot.ProvisionBoot(
        qemu=qemu.qemu_argv(disk=disk, disk_format="vpc", serial_log=console, memory=1024),
        generation=1,
        console=console,
        spec=spec if user_on_dvd else dataclasses.replace(spec, username=None),
        key=key,
        agent="waagent",
        timeout=timeout,
        scratch=tmp_path / "scratch",
        user=boottest.USER,
    )
    (tmp_path / "scratch").mkdir()
    with pytest.raises(fabric_boot.ProvisionFailed) as failed:
        fabric_boot.provision_boot(boot)
    assert failed.value.result is not None
    return failed.value


def test_without_the_dvd_modules_nobody_is_provisioned(seed_base: Path, tmp_path: Path) -> None:
    modules = "/usr/lib/modules"
    listing = debugfs_read(seed_base, f"ls {modules}")
    (version,) = {w for w in listing.split() if w[:1].isdigit() and "." in w and "-" in w}
    udf = f"{modules}/{version}/kernel/fs/udf/udf.ko"
    disk = seeded(seed_base, tmp_path, f"rm {udf}\n")
    failed = seed_boot(disk, tmp_path)
    result = failed.result
    assert result is not None
    assert not result.user_login and result.hostname != HOSTNAME
    assert "user_login" in str(failed) and "udf" in str(failed)
    # The VM did boot, the DVD was not read: the failure is the modules', not a slow boot.
    assert "login:" in (tmp_path / "console.log").read_text(errors="replace")


def test_without_client_alive_interval_the_proof_fails(seed_base: Path, tmp_path: Path) -> None:
    dropin = "/etc/ssh/sshd_config.d/10-archkernel-azure.conf"
    shown = debugfs_read(seed_base, f"cat {dropin}")
    assert "ClientAliveInterval 180" in shown
    kept = "".join(line + "\n" for line in shown.splitlines() if "ClientAlive" not in line)
    disk = seeded(
        seed_base,
        tmp_path,
        f"rm {dropin}\ncd /etc/ssh/sshd_config.d\nwrite 10-archkernel-azure.conf "
        "10-archkernel-azure.conf\n",
        {"10-archkernel-azure.conf": kept},
    )
    failed = seed_boot(disk, tmp_path, timeout=900.0)  # ends at the login
    result = failed.result
    assert result is not None
    assert result.user_login and result.hostname == HOSTNAME and result.ready_reported
    assert result.client_alive_interval != 180
    assert "client_alive_interval failed" in str(failed)


def test_with_the_agent_disabled_nothing_is_reported(seed_base: Path, tmp_path: Path) -> None:
    wants = "/etc/systemd/system/multi-user.target.wants"
    assert "waagent.service" in debugfs_read(seed_base, f"ls {wants}")
    disk = seeded(seed_base, tmp_path, f"rm {wants}/waagent.service\n")
    failed = seed_boot(disk, tmp_path)
    result = failed.result
    assert result is not None
    assert not result.ready_reported and not result.user_login
    assert "ready_reported" in str(failed)
    assert "(the VM asked neither the wireserver nor IMDS)" in str(failed)
    assert "login:" in (tmp_path / "console.log").read_text(errors="replace")


def test_without_a_user_on_the_dvd_or_in_the_image_nobody_logs_in(
    seed_base: Path, tmp_path: Path
) -> None:
    # The image has no build-time user ([azure.user] unset): no account but the system's.
    passwd = debugfs_read(seed_base, "cat /etc/passwd").splitlines()
    accounts = [line.split(":") for line in passwd if line.count(":") == 6]
    assert accounts and not [a[0] for a in accounts if 1000 <= int(a[2]) < 65534]
    disk = seeded(seed_base, tmp_path, "")  # the image unchanged, as a copy to boot
    failed = seed_boot(disk, tmp_path, user_on_dvd=False)
    result = failed.result
    assert result is not None
    # The key is this boot's own, so no account of the image could take it: the passwd
    # check above is what shows the image has nobody else to log in as.
    assert not result.user_login and not result.ready_reported
    assert "user_login" in str(failed)
    assert failed.hint is not None and "[azure.user]" in failed.hint
    # waagent read the DVD, found no user and said so to the wireserver (NotReady).
    assert (
        "the agent reported to the wireserver: ProvisioningFailed: [ProtocolError] "
        "Failed to validate OVF: UserName not found"
    ) in str(failed)
