"""run(): argv only, minimal environment, failures explained; host tool checks."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from archkernel.errors import UserError
from archkernel.host.files import atomic_path, write_if_changed, write_text
from archkernel.host.processes import orphans
from archkernel.host.run import RUN_VARIABLE, check_tools, process_identity, run
from tests.support.processes import alive, wait_for

REPO = Path(__file__).resolve().parent.parent
WAIT = 30.0  # the longest any test here waits for a process to start or end


@pytest.mark.integration
def test_output_is_captured_and_argv_is_not_a_shell() -> None:
    result = run(["echo", "a b; echo c", "$HOME"], capture=True)
    assert result.stdout == "a b; echo c $HOME\n"


@pytest.mark.integration
def test_child_gets_a_minimal_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARCHKERNEL_SECRET_TOKEN", "x")
    env = run(["env"], capture=True).stdout
    assert "ARCHKERNEL_SECRET_TOKEN" not in env
    assert "LC_ALL=C.UTF-8" in env and "PATH=" in env


def test_missing_command_names_the_packages() -> None:
    with pytest.raises(UserError) as info:
        run(["mkimage-does-not-exist"])
    assert "command not found: mkimage-does-not-exist" in info.value.message
    with pytest.raises(UserError) as info:
        run([str(Path("/nonexistent/dir/pacstrap"))])
    assert "arch-install-scripts" in (info.value.hint or "")


def test_non_zero_exit_quotes_the_end_of_stderr() -> None:
    script = "import sys\nfor i in range(30): print('line', i, file=sys.stderr)\nsys.exit(3)"
    with pytest.raises(UserError) as info:
        run([sys.executable, "-c", script])
    message = info.value.message
    assert "failed with exit code 3" in message
    assert "line 29" in message and "line 5\n" not in message


def test_killed_by_a_signal_is_named() -> None:
    with pytest.raises(UserError, match="was killed by SIGKILL"):
        run([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])


@pytest.mark.integration
def test_check_false_returns_the_code() -> None:
    assert run(["false"], check=False).returncode == 1


def test_check_tools_lists_every_missing_tool_at_once() -> None:
    with pytest.raises(UserError) as info:
        check_tools(["sh", "no-such-tool-1", "mkimage-nope", "no-such-tool-2"], "the test")
    lines = info.value.message.splitlines()
    assert (
        lines[0] == "the test needs 3 missing tool(s): no-such-tool-1, mkimage-nope, no-such-tool-2"
    )
    assert [line.split(":")[0].strip() for line in lines[1:]] == [
        "no-such-tool-1",
        "mkimage-nope",
        "no-such-tool-2",
    ]
    check_tools(["sh", "true"], "nothing")  # present tools raise nothing


def test_atomic_path_keeps_the_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.img"
    write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.img"]


def test_atomic_directory_replacement(tmp_path: Path) -> None:
    target = tmp_path / "tree"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "a").write_text("1")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert os.listdir(tmp_path) == ["tree"]


def test_write_if_changed_keeps_mtime(tmp_path: Path) -> None:
    target = tmp_path / "f"
    assert write_if_changed(target, b"same")
    os.utime(target, ns=(1_000_000_000, 1_000_000_000))
    assert not write_if_changed(target, b"same")
    assert target.stat().st_mtime_ns == 1_000_000_000
    assert write_if_changed(target, b"new")
    assert target.read_bytes() == b"new"


# --- commands end with the run that started them ---------------------------------------------

# A run of archkernel in a process of its own: `run(ARGV)`, in a worker thread with --thread.
RUNNER = """
import sys, threading
from archkernel.host.run import run
argv = sys.argv[1:]
if argv[0] == "--thread":
    worker = threading.Thread(target=run, args=(argv[1:],))
    worker.start()
    worker.join()
else:
    run(argv)
"""
# A command that starts a process of its own and says both pids: what pacstrap does.
PARENT_AND_CHILD = "echo $$ > parent.pid; sleep 300 & echo $! > child.pid; wait"


def pid_in(path: Path) -> int:
    wait_for(lambda: path.exists() and path.read_text().strip(), f"{path.name} written")
    return int(path.read_text())


@pytest.fixture
def runs(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Start archkernel runs (`runner(...)`) in `tmp_path`; each is killed at the end."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def runner(runs: list[subprocess.Popen[bytes]], cwd: Path, *argv: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(RUN_VARIABLE, None)
    proc = subprocess.Popen(
        [sys.executable, "-c", RUNNER, *argv], cwd=cwd, env=env, stderr=subprocess.DEVNULL
    )
    runs.append(proc)
    return proc


@pytest.mark.integration
@pytest.mark.parametrize("thread", [False, True], ids=["main-thread", "worker-thread"])
def test_a_killed_runs_command_dies_with_it_and_the_next_run_ends_the_rest(
    tmp_path: Path, runs: list[subprocess.Popen[bytes]], thread: bool
) -> None:
    first = runner(runs, tmp_path, *(["--thread"] if thread else []), "sh", "-c", PARENT_AND_CHILD)
    parent, child = pid_in(tmp_path / "parent.pid"), pid_in(tmp_path / "child.pid")
    first.kill()  # SIGKILL to the run alone, as `kill -9 PID` does
    first.wait()
    # The command it ran dies with it (PR_SET_PDEATHSIG), whichever thread started it.
    wait_for(lambda: not alive(parent), "the command of the killed run ended")
    # What the command started is an orphan now, still carrying the killed run's mark.
    assert alive(child)
    environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
    assert any(e.startswith(f"{RUN_VARIABLE}={first.pid}:".encode()) for e in environ)
    # The next run ends it before its first command.
    second = runner(runs, tmp_path, "true")
    assert second.wait(WAIT) == 0
    assert not alive(child)


@pytest.mark.integration
def test_a_timeout_ends_the_command_and_what_it_started(tmp_path: Path) -> None:
    # 5 s: time for sh to start its child and write both pids, even on a loaded machine.
    with pytest.raises(UserError, match="did not finish within 5s"):
        run(["sh", "-c", PARENT_AND_CHILD], cwd=tmp_path, timeout=5)
    parent, child = pid_in(tmp_path / "parent.pid"), pid_in(tmp_path / "child.pid")
    wait_for(lambda: not alive(parent) and not alive(child), "the command and its child ended")


@pytest.mark.integration
def test_ctrl_c_ends_the_command_and_what_it_started_even_if_they_ignore_it(
    tmp_path: Path, runs: list[subprocess.Popen[bytes]]
) -> None:
    # Like pacman, which ignores SIGINT while it unpacks: it gets SIGKILL after a grace time.
    script = f"trap '' INT; {PARENT_AND_CHILD}"
    first = runner(runs, tmp_path, "sh", "-c", script)
    parent, child = pid_in(tmp_path / "parent.pid"), pid_in(tmp_path / "child.pid")
    first.send_signal(signal.SIGINT)  # to the run only: its commands are in their own group
    assert first.wait(WAIT) != 0  # KeyboardInterrupt
    # SIGKILL is sent, not awaited: on a busy machine the group may take a moment to die.
    wait_for(lambda: not alive(parent) and not alive(child), "the command and its child ended")


@pytest.mark.integration
def test_commands_carry_the_run_that_started_them_and_read_no_terminal() -> None:
    env = run(["env"], capture=True).stdout.splitlines()
    assert f"{RUN_VARIABLE}={process_identity(os.getpid())}" in env
    assert run(["readlink", "/proc/self/fd/0"], capture=True).stdout == "/dev/null\n"
    # Its own process group, of which it is the leader.
    out = run(["sh", "-c", "echo $$; ps -o pgid= -p $$"], capture=True).stdout.split()
    assert out[0] == out[1]


def test_orphans_are_the_processes_whose_run_is_gone() -> None:
    table = [(10, "1:100"), (11, None), (12, "2:200"), (13, "1:100"), (14, "1:999")]
    alive = {"1:100": True, "2:200": False, "1:999": False}
    assert orphans(table, alive.__getitem__) == [(12, "2:200"), (14, "1:999")]


# A tool that shows the cursor again when interrupted, as pacman does, even into a file.
SHOWS_CURSOR = (
    r"stop() { printf '\033[?25hinterrupted\n'; exit 130; }; trap stop INT;"
    r" printf 'working \033[1mhard\033[0m\n'; echo $$ > parent.pid; sleep 300 & wait"
)


def _run_into(tmp_path: Path, stdout: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(RUN_VARIABLE, None)
    return subprocess.Popen(
        [sys.executable, "-c", RUNNER, "sh", "-c", SHOWS_CURSOR],
        cwd=tmp_path,
        env=env,
        stdout=stdout,
        stderr=subprocess.DEVNULL,
    )


@pytest.mark.integration
def test_a_plain_log_gets_the_tools_output_without_terminal_control_sequences(
    tmp_path: Path,
) -> None:
    log_file = tmp_path / "build.log"
    with open(log_file, "wb") as out:
        proc = _run_into(tmp_path, out.fileno())
    try:
        pid_in(tmp_path / "parent.pid")
        proc.send_signal(signal.SIGINT)  # Ctrl-C in the middle of the tool
        assert proc.wait(WAIT) != 0
    finally:
        proc.kill()
        proc.wait()
    assert log_file.read_bytes() == b"working hard\ninterrupted\n"


@pytest.mark.integration
def test_a_terminal_gets_the_tools_output_as_it_is(tmp_path: Path) -> None:
    import pty

    master, slave = pty.openpty()
    try:
        proc = _run_into(tmp_path, slave)
        os.close(slave)
        pid_in(tmp_path / "parent.pid")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(WAIT) != 0
        seen = b""
        with contextlib.suppress(OSError):  # EIO once the last writer is gone
            while chunk := os.read(master, 4096):
                seen += chunk
    finally:
        os.close(master)
    assert b"\x1b[1mhard\x1b[0m" in seen and b"\x1b[?25h" in seen
