"""Provisioning proven end to end: real agents provision a VM made from the image.

The functional repository (Debian's real systemd, networkd, OpenSSH, cloud-init and
waagent under Arch's names) is built once; from it one image per agent setting, each by
`archkernel run azure_vhd` and then booted by `archkernel run azure_boottest` in
provision mode, in a separate process as a user runs them. The boot is on the stand-in
fabric: the DVD with ovf-env.xml, Azure's DHCP (routes to the wireserver and IMDS, option
245), the wireserver and IMDS, in a network namespace of the boot's own. Each test reads
the proofs the step wrote (`provision.json`) and asserts every one.

- waagent provisions by itself, generation 1 (SeaBIOS, the DVD on IDE);
- cloud-init provisions with waagent installed beside it for extensions
  (`extensions = true`: waagent hands provisioning to cloud-init), generation 2 (OVMF,
  the DVD on SCSI).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from archkernel.demo import functional
from archkernel.demo.offline import OfflineRepo
from archkernel.errors import UserError

pytestmark = [pytest.mark.integration, pytest.mark.vm, pytest.mark.root]

REPO = Path(__file__).resolve().parent.parent
HOSTNAME = "provisioned-archkernel-test"  # boottest.provisioning: the image's, prefixed
TOOLS = ("qemu-system-x86_64", "dnsmasq", "ip", "pacstrap", "ssh")


def archkernel(settings: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """`archkernel --settings SETTINGS ARGS...` in a new process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARCHKERNEL_")}
    if "ARCHKERNEL_TEST_CACHE" in os.environ:
        env["ARCHKERNEL_TEST_CACHE"] = os.environ["ARCHKERNEL_TEST_CACHE"]
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "tasks.cli", "--settings", str(settings), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


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


def provisioned(repo: OfflineRepo, directory: Path, extra: str) -> tuple[dict[str, object], str]:
    """Build an image from `repo` with the functional settings plus `extra` (TOML lines of
    [azure]) and run the provisioning boot test on it; its provision.json and console."""
    directory.mkdir()
    text = repo.settings.read_text().replace(
        'pacman_conf = "pacman.conf"', f'pacman_conf = "{repo.pacman_conf}"'
    )
    settings = directory / "settings.toml"
    settings.write_text(text + extra)
    built = archkernel(settings, "run", "azure_vhd", timeout=1200)
    assert built.returncode == 0, built.stderr[-4000:]
    booted = archkernel(settings, "run", "azure_boottest", timeout=1500)
    work = directory / "build" / "azure"
    console = (work / "boottest.log").read_text(errors="replace")
    assert booted.returncode == 0, booted.stderr[-6000:]
    return json.loads((work / "provision.json").read_text()), console


def assert_provisioned(proofs: dict[str, object], agent: str) -> None:
    assert proofs["agent"] == agent
    assert proofs["hostname"] == HOSTNAME  # the running host name, from the DVD
    assert proofs["static_hostname"] == HOSTNAME
    assert proofs["user_login"] is True
    assert proofs["sudo"] is True
    # cloud-init gives Arch's default user's groups; waagent grants sudo in sudoers.d only.
    assert proofs["in_wheel"] is (agent == "cloud-init")
    assert proofs["wrong_key_refused"] is True
    assert proofs["password_login_refused"] is True
    assert proofs["ready_reported"] is True
    assert proofs["dhcp_lease"] is True
    assert proofs["client_alive_interval"] == 180
    assert proofs["fresh_identity"] is True
    # waagent took the goal state: provisioning itself, or beside cloud-init.
    assert proofs["waagent_goal_state"] is True
    assert proofs["ok"] is True


def test_waagent_provisions_generation_1(functional_repo: OfflineRepo, tmp_path: Path) -> None:
    proofs, console = provisioned(
        functional_repo, tmp_path / "waagent", 'provisioning = "waagent"\ngeneration = 1\n'
    )
    assert_provisioned(proofs, "waagent")
    # It found the wireserver by the route DHCP gave (option 121) and provisioned itself.
    assert "Route to 168.63.129.16 exists" in console
    assert "Using waagent for provisioning" in console


def test_cloud_init_provisions_generation_2_with_waagent_beside_it(
    functional_repo: OfflineRepo, tmp_path: Path
) -> None:
    proofs, console = provisioned(
        functional_repo, tmp_path / "cloud-init", "generation = 2\nextensions = true\n"
    )
    assert_provisioned(proofs, "cloud-init")
    # waagent, installed for extensions, left provisioning to cloud-init.
    assert "Using cloud-init for provisioning" in console
