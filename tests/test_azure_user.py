"""azure_vhd with a build-time administrator: the user in the image, and the secret nowhere else.

One offline build with `[azure.user]` (an SSH key and a password hash); the image's files
are read back from the finished VHD with debugfs (no mount), and the build's log, doit's
state file and `settings show` are searched for the hash.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from archkernel.demo import offline
from archkernel.image import disk, ext4
from tests.support.azure import archkernel, outcomes

pytestmark = [pytest.mark.integration, pytest.mark.root]

KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHk0ZXN0a2V5Zm9yYXJjaGtlcm5lbHRlc3RzMDAwMDAw admin@example"
)
HASH = "$6$saltsaltsalt$Qm9ndXNoYXNoZm9ydGVzdHNvbmx5LW5vdC1hLXJlYWwtcGFzc3dvcmQtaGFzaDEyMzQ1Njc4OTA"


@pytest.fixture(scope="module")
def built(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """(settings file, the build's process) for an offline build with a user."""
    project = tmp_path_factory.mktemp("azure-user")
    offline.main([str(project)])
    settings = project / "settings.toml"
    settings.write_text(
        settings.read_text() + f'\n[azure.user]\nname = "admin"\nssh_authorized_keys = ["{KEY}"]\n'
        f'password_hash = "{HASH}"\n'
    )
    result = archkernel("-v", "run", "azure_vhd", "--settings", str(settings))
    assert result.returncode == 0, result.stderr[-4000:]
    return settings, result


def image_file(settings: Path, path: str) -> bytes:
    """A file of the image's root file system, read from the VHD with debugfs."""
    work = settings.parent / "build" / "azure"
    layout = json.loads((work / "disk.json").read_text())
    (root,) = [p for p in layout["partitions"] if p["role"] == "root"]
    part = disk.Partition(root["number"], root["start"], root["size"], "", "", "root")
    return ext4.read_ext4_file(work / "archlinux-azure.vhd", part, path)


def test_every_step_ran(built: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    _, result = built
    assert set(outcomes(result.stderr).values()) == {"done in"}


def test_user_is_in_wheel_with_its_key(
    built: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    settings, _ = built
    passwd = image_file(settings, "/etc/passwd").decode()
    (entry,) = [line for line in passwd.splitlines() if line.startswith("admin:")]
    uid, gid, home = entry.split(":")[2], entry.split(":")[3], entry.split(":")[5]
    assert home == "/home/admin" and int(uid) >= 1000
    group = image_file(settings, "/etc/group").decode()
    wheel = next(line for line in group.splitlines() if line.startswith("wheel:"))
    assert "admin" in wheel.split(":")[3].split(",")
    keys = image_file(settings, "/home/admin/.ssh/authorized_keys").decode()
    assert keys == KEY + "\n"
    sudoers = image_file(settings, "/etc/sudoers.d/10-wheel").decode()
    assert "%wheel ALL=(ALL:ALL) ALL" in sudoers
    stat = subprocess.run(
        ["debugfs", "-R", "stat /home/admin/.ssh/authorized_keys", _device(settings)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert re.search(rf"User:\s+{uid}\s+Group:\s+{gid}\b", stat), stat
    assert re.search(r"Mode:\s+0600\b", stat), stat


def _device(settings: Path) -> str:
    work = settings.parent / "build" / "azure"
    layout = json.loads((work / "disk.json").read_text())
    (root,) = [p for p in layout["partitions"] if p["role"] == "root"]
    return f"{work / 'archlinux-azure.vhd'}?offset={root['start']}"


def test_password_hash_in_shadow_and_root_locked(
    built: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    settings, _ = built
    shadow = image_file(settings, "/etc/shadow").decode()
    fields = {line.split(":")[0]: line.split(":")[1] for line in shadow.splitlines()}
    assert fields["admin"] == HASH
    assert fields["root"] == "!*"


def test_keys_given_so_no_password_login(
    built: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    settings, _ = built
    dropin = image_file(settings, "/etc/ssh/sshd_config.d/10-archkernel-azure.conf").decode()
    assert "PasswordAuthentication no" in dropin.splitlines()
    assert "PermitRootLogin no" in dropin.splitlines()
    assert "ClientAliveInterval 180" in dropin.splitlines()


def test_the_hash_is_in_no_log_state_or_output(
    built: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    settings, result = built
    state = (settings.parent / "build" / ".doit.json").read_text()
    show = archkernel("--settings", str(settings), "settings", "show", timeout=60)
    assert show.returncode == 0, show.stderr
    for text in (result.stdout, result.stderr, state, show.stdout, show.stderr):
        assert HASH not in text
        assert "saltsaltsalt" not in text
    assert "sha256:" in state  # a digest stands in for it, so a change re-runs step 3
