"""run(): argv only, minimal environment, failures explained; host tool checks."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from archkernel.errors import UserError
from archkernel.host.files import atomic_path, write_if_changed, write_text
from archkernel.host.run import check_tools, run


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
