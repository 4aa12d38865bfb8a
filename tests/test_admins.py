"""waagent's administrators join wheel: the image's program, run here with the host's real
shell, sed, id and gpasswd (Debian's shadow, the functional image's), and its units checked
by systemd-analyze. That it works in a booted image, beside the real agent, is proven by the
provisioning boot test (tests/test_provision_vm.py: `in_wheel` for waagent)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from archkernel.azure import admins

SUDOERS_LINES = [
    "root ALL=(ALL) ALL",  # the lines waagent writes: without a password ...
    "nobody ALL=(ALL) NOPASSWD: ALL",  # ... and with none
    "%wheel ALL=(ALL) ALL",  # a group, not a user
    "x$(touch /tmp/archkernel-pwned) ALL=(ALL) ALL",
    "-h ALL=(ALL) ALL",  # would be an option to gpasswd
    "root ALL=(ALL) ALL extra",
    "a*b ALL=(ALL) ALL",
    "ghost ALL=(ALL) ALL",  # no such user
    "x" * 33 + " ALL=(ALL) ALL",  # longer than a user name
    "Defaults env_reset",
]


def written(root: Path) -> Path:
    """The files the build writes, under `root`; the program's path."""
    for path, (text, mode) in admins.files().items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)
    return root / admins.SCRIPT.lstrip("/")


def sudoers(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "waagent"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.integration
def test_the_program_passes_shellcheck_as_posix_sh(tmp_path: Path) -> None:
    result = subprocess.run(
        ["shellcheck", "--shell=sh", str(written(tmp_path))], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout


@pytest.mark.integration
def test_the_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    written(tmp_path)
    # The targets they order against, from the host's systemd.
    shutil.copytree("/usr/lib/systemd/system", tmp_path / "usr/lib/systemd/system", symlinks=True)
    result = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            "--man=no",
            f"--root={tmp_path}",
            admins.PATH_UNIT,
            admins.SERVICE_UNIT,
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "archkernel" not in result.stderr  # no warning about our files either
    path_unit = (tmp_path / "etc/systemd/system" / admins.PATH_UNIT).read_text().splitlines()
    assert "PathChanged=/etc/sudoers.d/waagent" in path_unit
    assert "WantedBy=paths.target" in path_unit


@pytest.mark.integration
def test_only_the_accounts_waagents_lines_name_are_put_in_wheel(tmp_path: Path) -> None:
    program = written(tmp_path / "root")
    result = subprocess.run(
        ["sh", str(program), "--dry-run", str(sudoers(tmp_path, SUDOERS_LINES))],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    # The host's root and nobody are in no group called wheel.
    assert result.stdout.splitlines() == ["gpasswd -a root wheel", "gpasswd -a nobody wheel"]
    assert "names ghost, which is no user: left alone" in result.stderr
    assert not Path("/tmp/archkernel-pwned").exists()


@pytest.mark.integration
def test_without_the_file_there_is_nothing_to_do(tmp_path: Path) -> None:
    program = written(tmp_path / "root")
    result = subprocess.run(
        ["sh", str(program), str(tmp_path / "missing")], capture_output=True, text=True
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@pytest.mark.integration
@pytest.mark.root
def test_the_user_joins_wheel_once_with_the_real_gpasswd(tmp_path: Path) -> None:
    """In a mount namespace of its own, over a copy of the host's /etc that has a wheel
    group: the program run twice puts `nobody` in wheel, and the second run does nothing."""
    program = written(tmp_path / "root")
    etc = tmp_path / "etc"
    shutil.copytree("/etc", etc, symlinks=True)
    taken = {line.split(":")[2] for line in (etc / "group").read_text().splitlines() if line}
    gid = next(str(n) for n in range(4711, 5000) if str(n) not in taken)
    with (etc / "group").open("a") as group:
        group.write(f"wheel:x:{gid}:\n")
    with (etc / "gshadow").open("a") as gshadow:
        gshadow.write("wheel:!::\n")
    file = sudoers(tmp_path, ["nobody ALL=(ALL) NOPASSWD: ALL"])
    inside = (
        'mount --bind "$1" /etc && sh "$2" "$3" && echo "first: $(id -nG nobody)" '
        '&& sh "$2" "$3" && echo "second: $(id -nG nobody)"'
    )
    result = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation=private",
            "sh",
            "-c",
            inside,
            "sh",
            str(etc),
            str(program),
            str(file),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "Adding user nobody to group wheel"  # gpasswd, once
    assert lines[1:] == ["first: nogroup wheel", "second: nogroup wheel"]
    assert (etc / "group").read_text().splitlines()[-1] == f"wheel:x:{gid}:nobody"
    assert (
        "wheel"
        not in subprocess.run(["id", "-nG", "nobody"], capture_output=True, text=True).stdout
    )
