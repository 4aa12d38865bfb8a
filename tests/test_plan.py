"""archkernel.plan: a plan runs what it describes, in order, and cleans up on any exit."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest

from archkernel.errors import UserError
from archkernel.plan import Do, Plan, Run, declared_settings, describe, execute, reads


def test_describe_shows_commands_and_work_in_order(tmp_path: Path) -> None:
    plan = Plan(notes=["in the build environment"])
    plan.run(["mkfs.ext4", "-d", tmp_path / "a b", "disk.img"], note="reads the tree")
    plan.do("write stamp.json", lambda: None)
    plan.cleanup.append(Do("remove the scratch directory", lambda: None))
    assert describe(plan) == [
        "# in the build environment",
        f"+ mkfs.ext4 -d '{tmp_path}/a b' disk.img",
        "  (reads the tree)",
        "# write stamp.json",
        "# then, whatever happened:",
        "# remove the scratch directory",
    ]
    assert plan.commands() == [("mkfs.ext4", "-d", f"{tmp_path}/a b", "disk.img")]


@pytest.mark.integration
def test_execute_runs_the_ops_in_order_and_feeds_output_to_then(tmp_path: Path) -> None:
    seen: list[str] = []
    plan = Plan()
    plan.do("first", lambda: seen.append("do"))
    plan.run(
        ["sh", "-c", "cat; echo two"],
        stdin="one\n",
        capture=True,
        then=lambda proc: seen.append(proc.stdout),
    )
    plan.run(["touch", tmp_path / "made"])
    execute(plan)
    assert seen == ["do", "one\ntwo\n"]
    assert (tmp_path / "made").exists()


@pytest.mark.integration
def test_a_failing_command_stops_the_plan_and_cleanup_still_runs(tmp_path: Path) -> None:
    seen: list[str] = []
    plan = Plan()
    plan.run(["sh", "-c", "echo broken >&2; exit 3"])
    plan.do("never", lambda: seen.append("after"))
    plan.cleanup.append(Do("clean", lambda: seen.append("cleanup")))
    with pytest.raises(UserError) as failure:
        execute(plan)
    assert "exit code 3" in failure.value.message
    assert "broken" in failure.value.message
    assert seen == ["cleanup"]


@pytest.mark.integration
def test_error_callback_explains_the_failure() -> None:
    def explain(argv: list[str], code: int, stderr: str) -> UserError:
        return UserError(f"{argv[0]} said {stderr.strip()} ({code})", "fix it")

    plan = Plan().run(["sh", "-c", "echo nope >&2; exit 1"], error=explain)
    with pytest.raises(UserError, match=r"sh said nope \(1\)"):
        execute(plan)


def test_cleanup_runs_on_keyboard_interrupt() -> None:
    seen: list[str] = []

    def interrupt() -> None:
        raise KeyboardInterrupt

    plan = Plan().do("interrupted", interrupt)
    plan.cleanup.append(Do("clean", lambda: seen.append("cleanup")))
    with pytest.raises(KeyboardInterrupt):
        execute(plan)
    assert seen == ["cleanup"]


def test_context_is_entered_around_ops_and_cleanup() -> None:
    import contextlib

    seen: list[str] = []

    @contextlib.contextmanager
    def around():  # type: ignore[no-untyped-def]
        seen.append("enter")
        yield
        seen.append("exit")

    plan = Plan(context=around).do("work", lambda: seen.append("work"))
    plan.cleanup.append(Do("clean", lambda: seen.append("cleanup")))
    execute(plan)
    assert seen == ["enter", "work", "cleanup", "exit"]


@pytest.mark.integration
def test_commands_are_logged_as_the_dry_run_shows_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    plan = Plan().run(["touch", tmp_path / "with space"]).run(["true"])
    with caplog.at_level(logging.DEBUG, logger="archkernel"):
        execute(plan)
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("+ ")]
    assert logged == [line for line in describe(plan) if line.startswith("+ ")]


@pytest.mark.integration
def test_run_of_keeps_paths_as_strings(tmp_path: Path) -> None:
    op = Run.of(["ls", tmp_path])
    assert op.argv == ("ls", str(tmp_path))
    assert isinstance(op.argv[1], str)
    assert subprocess.run(op.argv, check=False).returncode == 0


def test_reads_declares_settings_once_and_in_order() -> None:
    @reads("azure.hostname", "azure.locale")
    @reads("azure.hostname", "azure.user")
    def step(settings: object) -> Plan:
        return Plan()

    assert declared_settings(step) == ("azure.hostname", "azure.user", "azure.locale")

    def undeclared(settings: object) -> Plan:
        return Plan()

    assert declared_settings(undeclared) == ()


@pytest.mark.integration
def test_an_unchecked_command_hands_its_failure_to_then() -> None:
    seen: list[int] = []
    plan = Plan().run(["sh", "-c", "exit 4"], check=False, then=lambda p: seen.append(p.returncode))
    execute(plan)
    assert seen == [4]
