"""waagent's administrators join wheel: the image's program, run here with the host's real
shell, sed, id and gpasswd (Debian's shadow, the functional image's), and its units checked
by systemd-analyze. That it works in a booted image, beside the real agent, is proven by the
provisioning boot test (tests/test_provision_vm.py: `in_wheel` for waagent)."""

from __future__ import annotations

import pwd
import shutil
import subprocess
from pathlib import Path

import pytest

from archkernel.azure import admins

SUDOERS_LINES = [
    "root ALL=(ALL) ALL",  # the lines waagent writes: with a password ...
    "nobody ALL=(ALL) NOPASSWD: ALL",  # ... and without
    "daemon\tALL = (ALL:ALL) NOPASSWD:ALL",  # blanks around `=`, as other tools write
    "%wheel ALL=(ALL) ALL",  # a group, not a user
    "x$(touch /tmp/x) ALL=(ALL) ALL",
    "-h ALL=(ALL) ALL",  # would be an option to gpasswd
    "root ALL=(ALL) ALL extra",
    "a*b ALL=(ALL) ALL",
    "0 ALL=(ALL) ALL",  # a number: id would take it for root's uid
    "ghost ALL=(ALL) ALL",  # no such user
    "Defaults env_reset",
    "nobody ALL=(ALL) ALL",  # a second line for one account
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
    state = tmp_path / "state"
    result = subprocess.run(
        ["sh", str(program), "--dry-run", str(sudoers(tmp_path, SUDOERS_LINES)), str(state)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    # On a Debian host root, nobody and daemon are in no group called wheel; each once.
    assert result.stdout.splitlines() == [
        "gpasswd -a daemon wheel",
        "gpasswd -a nobody wheel",
        "gpasswd -a root wheel",
    ]
    assert result.stderr.splitlines() == [
        f"{tmp_path / 'waagent'} names ghost, which is no user: left alone"
    ]
    assert not state.exists()  # a dry run writes nothing


def dry_run(tmp_path: Path, lines: list[str], state: Path) -> subprocess.CompletedProcess[str]:
    program = written(tmp_path / "root")
    argv = ["sh", str(program), "--dry-run", str(sudoers(tmp_path, lines)), str(state)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


@pytest.mark.integration
def test_an_account_recorded_but_out_of_wheel_already_is_left_alone(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.write_text(f"nobody:{uid('nobody')}\n")  # put in wheel here once, taken out by hand since
    result = dry_run(tmp_path, [], state)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@pytest.mark.integration
@pytest.mark.parametrize(
    "line",
    ["nobody", "nobody:", "0:0", "nobody:65534 extra", "-h:1"],
    ids=["old-format", "no-uid", "a-number-for-a-name", "trailing", "an-option"],
)
def test_a_state_line_that_is_no_record_changes_nothing(tmp_path: Path, line: str) -> None:
    # Not this program's state: whom it put in wheel is unknown.
    state = tmp_path / "state"
    state.write_text(f"root:0\n{line}\n")
    result = dry_run(tmp_path, ["nobody ALL=(ALL) ALL"], state)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"{state} has a line that is no NAME:UID: wheel left as it is\n"


@pytest.mark.integration
def test_an_unreadable_state_changes_nothing(tmp_path: Path) -> None:
    # Who joined here is unknown: no account may join (it could never leave) or leave.
    state = tmp_path / "state"
    state.mkdir()
    result = dry_run(tmp_path, ["root ALL=(ALL) ALL"], state)
    assert (result.returncode, result.stdout) == (1, "")
    assert "Is a directory" in result.stderr


@pytest.mark.integration
def test_without_the_file_there_is_nothing_to_do(tmp_path: Path) -> None:
    program = written(tmp_path / "root")
    state = tmp_path / "state"
    result = subprocess.run(
        ["sh", str(program), str(tmp_path / "missing"), str(state)], capture_output=True, text=True
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert state.read_text() == ""


@pytest.mark.integration
@pytest.mark.root
def test_a_named_user_joins_wheel_once_and_leaves_with_its_line(tmp_path: Path) -> None:
    """The file names nobody and daemon, in wheel already: the program puts nobody in
    wheel, a second run does nothing, and once the file is emptied nobody leaves wheel;
    daemon, which was there before, stays."""
    etc = etc_with_wheel(tmp_path)
    file = sudoers(tmp_path, ["nobody ALL=(ALL) NOPASSWD: ALL", "daemon ALL=(ALL) ALL"])
    result = in_namespace(tmp_path, etc, THREE_RUNS, file)
    assert result.returncode == 0, result.stderr
    daemon = "daemon wheel"  # Debian's daemon: its own group, and wheel
    joined = f"nobody:{uid('nobody')}"  # the state: who joined here, and its uid
    assert result.stdout.splitlines() == [
        "Adding user nobody to group wheel",  # gpasswd, on the first run only
        f"nogroup wheel / {daemon} / {joined}",
        f"nogroup wheel / {daemon} / {joined}",
        "Removing user nobody from group wheel",
        f"nogroup / {daemon} / ",
    ]
    assert (etc / "group").read_text().splitlines()[-1].startswith("wheel:x:")
    assert (etc / "group").read_text().splitlines()[-1].endswith(":daemon")
    assert "wheel" not in run_id("nobody")  # the host's /etc is untouched


@pytest.mark.integration
@pytest.mark.root
@pytest.mark.parametrize("same_account", [True, False], ids=["recorded-uid", "another-uid"])
def test_only_the_account_that_joined_here_leaves(tmp_path: Path, same_account: bool) -> None:
    """daemon, in wheel, is recorded as put there: with its own uid it leaves once the file
    no longer names it. With another uid, the recorded account was deleted and daemon is a
    later one of the same name, in wheel some other way: it stays, the record goes."""
    etc = etc_with_wheel(tmp_path)
    recorded = uid("daemon") if same_account else uid("daemon") + 4000
    (tmp_path / "state").write_text(f"daemon:{recorded}\n")
    script = 'sh "$2" "$3" "$4"; echo "$(id -nG daemon) / $(cat "$4")"'
    result = in_namespace(tmp_path, etc, script, sudoers(tmp_path, []))
    assert result.returncode == 0, result.stderr
    if same_account:
        assert result.stdout.splitlines() == ["Removing user daemon from group wheel", "daemon / "]
    else:
        assert result.stdout.splitlines() == ["daemon wheel / "]


@pytest.mark.integration
@pytest.mark.root
def test_a_line_written_after_the_unit_started_is_read(tmp_path: Path) -> None:
    """The unit starts as waagent creates the file, maybe before its line is in it (and
    systemd drops the events while the service runs): the program reads the file again
    until it stays unchanged."""
    etc = etc_with_wheel(tmp_path)
    file = sudoers(tmp_path, [])
    result = in_namespace(tmp_path, etc, LATE_LINE, file)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["Adding user nobody to group wheel", "nogroup wheel"]


@pytest.mark.integration
@pytest.mark.root
def test_nobody_joins_when_the_state_cannot_be_written(tmp_path: Path) -> None:
    # Else the account would be in wheel unrecorded, and never leave it.
    etc = etc_with_wheel(tmp_path)
    (tmp_path / "not-a-directory").write_text("")
    state = tmp_path / "not-a-directory" / "state"
    file = sudoers(tmp_path, ["nobody ALL=(ALL) NOPASSWD: ALL"])
    result = in_namespace(tmp_path, etc, ONE_RUN, file, state)
    assert result.stdout.splitlines() == ["1", "nogroup"]
    assert f"cannot write {state}: wheel left as it is" in result.stderr


@pytest.mark.integration
@pytest.mark.root
def test_a_failed_gpasswd_fails_the_run_and_records_nobody(tmp_path: Path) -> None:
    etc = etc_with_wheel(tmp_path)
    failing = tmp_path / "bin"
    failing.mkdir()
    (failing / "gpasswd").write_text(
        "#!/bin/sh\necho 'gpasswd: cannot lock /etc/group' >&2\nexit 1\n"
    )
    (failing / "gpasswd").chmod(0o755)
    file = sudoers(tmp_path, ["nobody ALL=(ALL) NOPASSWD: ALL"])
    result = in_namespace(tmp_path, etc, f'PATH="{failing}:$PATH"\n' + ONE_RUN, file)
    assert result.stdout.splitlines() == ["1", "nogroup"]
    assert "gpasswd: cannot lock /etc/group" in result.stderr
    assert (tmp_path / "state").read_text() == ""


ONE_RUN = """
status=0
sh "$2" "$3" "$4" || status=$?
echo "$status"
id -nG nobody
"""
THREE_RUNS = """
sh "$2" "$3" "$4"; echo "$(id -nG nobody) / $(id -nG daemon) / $(cat "$4")"
sh "$2" "$3" "$4"; echo "$(id -nG nobody) / $(id -nG daemon) / $(cat "$4")"
: >"$3"
sh "$2" "$3" "$4"; echo "$(id -nG nobody) / $(id -nG daemon) / $(cat "$4")"
"""
LATE_LINE = """
sh "$2" "$3" "$4" & program=$!
sleep 0.3
echo "nobody ALL=(ALL) NOPASSWD: ALL" >>"$3"
wait "$program"
id -nG nobody
"""


def etc_with_wheel(tmp_path: Path) -> Path:
    """A copy of the host's /etc with a wheel group (a gid of its own) holding daemon."""
    etc = tmp_path / "etc"
    shutil.copytree("/etc", etc, symlinks=True)
    gid = free_gid(etc / "group")
    for name, line in (("group", f"wheel:x:{gid}:daemon"), ("gshadow", "wheel:!::daemon")):
        kept = [x for x in (etc / name).read_text().splitlines() if not x.startswith("wheel:")]
        (etc / name).write_text("\n".join([*kept, line]) + "\n")
    return etc


def in_namespace(
    tmp_path: Path, etc: Path, script: str, file: Path, state: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`script` run by sh in a mount namespace of its own where `etc` is /etc, with the
    program, the sudoers file and the state file (`tmp_path/state`) as $2, $3 and $4."""
    program = written(tmp_path / "root")
    argv = [str(etc), str(program), str(file), str(state or tmp_path / "state")]
    inside = 'set -e\nmount --bind "$1" /etc\n' + script
    return subprocess.run(
        ["unshare", "--mount", "--propagation=private", "sh", "-c", inside, "sh", *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )


def free_gid(group: Path) -> int:
    taken = {line.split(":")[2] for line in group.read_text().splitlines() if line}
    return next(n for n in range(4711, 5000) if str(n) not in taken)


def uid(user: str) -> int:
    return pwd.getpwnam(user).pw_uid


def run_id(user: str) -> str:
    return subprocess.run(["id", "-nG", user], capture_output=True, text=True).stdout
