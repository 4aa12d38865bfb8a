"""The step machinery, proven with a three-step workflow, real doit and real files.

Every run is a separate process, as a user would start it: `archkernel ...` or `doit ...`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.cli import SETTINGS, plugin_env, run_archkernel

REPO = Path(__file__).resolve().parent.parent
PASSWORD_HASH = (
    "$6$rounds=5000$saltsalt$"
    "Zq3cXo8hNn7TjJ1b9bB0e5yR7s0bqkD4fV1m2n3o4p5q6r7s8t9u0v1w2x3y4z5A6B7C8D9E0F1G2H3I4J5K6L"
)


def _env(**extra: str) -> dict[str, str]:
    return plugin_env("tests.support.demo_workflow", **extra)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "settings.toml").write_text(SETTINGS)
    return tmp_path


def archkernel(project: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run_archkernel(project, "tests.support.demo_workflow", *args, **env)


def doit(project: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "-d", str(project), *args],
        cwd=project,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def runs(project: Path) -> list[str]:
    log = project / "build" / "runs.log"
    lines = log.read_text().split() if log.exists() else []
    log.unlink(missing_ok=True)
    return lines


def test_failure_at_step_2_then_rerun_skips_step_1(project: Path) -> None:
    failed = archkernel(project, "run", "demo", DEMO_FAIL="2")
    assert failed.returncode == 1
    assert "demo step 2 failed on purpose" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert runs(project) == ["01", "02"]
    assert not (project / "build/demo/two.img").exists()

    again = archkernel(project, "run", "demo")
    assert again.returncode == 0, again.stderr
    assert runs(project) == ["02", "03"]
    assert "demo:01_prepare: up to date" in again.stderr


def test_plain_doit_resumes_the_same_way(project: Path) -> None:
    assert doit(project, "run", "demo", DEMO_FAIL="3").returncode != 0
    assert runs(project) == ["01", "02", "03"]
    second = doit(project, "run", "demo")
    assert second.returncode == 0, second.stderr
    assert runs(project) == ["03"]


def test_from_forces_that_step_and_later(project: Path) -> None:
    assert archkernel(project, "run", "demo").returncode == 0
    runs(project)
    assert archkernel(project, "run", "demo").returncode == 0
    assert runs(project) == []
    result = archkernel(project, "run", "demo", "--from", "2")
    assert result.returncode == 0, result.stderr
    assert runs(project) == ["02", "03"]
    # plain doit: the `from` variable does the same
    assert doit(project, "run", "demo", "from=2").returncode == 0
    assert runs(project) == ["02", "03"]


def test_to_never_runs_later_steps(project: Path) -> None:
    result = archkernel(project, "run", "demo", "--to", "2")
    assert result.returncode == 0, result.stderr
    assert runs(project) == ["01", "02"]
    assert not (project / "build/demo/three.txt").exists()
    assert doit(project, "run", "demo", "to=2").returncode == 0
    assert runs(project) == []
    assert not (project / "build/demo/three.txt").exists()


def test_setting_read_only_by_step_3_reruns_only_step_3(project: Path) -> None:
    assert archkernel(project, "run", "demo").returncode == 0
    runs(project)
    steps = archkernel(project, "steps", "demo", ARCHKERNEL_AZURE__TIMEZONE="Europe/Paris")
    assert "demo:03_finish                           will re-run" in steps.stdout
    assert 'setting azure.timezone: "UTC" -> "Europe/Paris"' in steps.stdout
    assert "demo:01_prepare                          done" in steps.stdout
    rerun = archkernel(project, "run", "demo", ARCHKERNEL_AZURE__TIMEZONE="Europe/Paris")
    assert rerun.returncode == 0
    assert runs(project) == ["03"]
    assert "Europe/Paris" in (project / "build/demo/three.txt").read_text()


def test_setting_read_by_step_1_reruns_it_and_only_what_changed(project: Path) -> None:
    assert archkernel(project, "run", "demo").returncode == 0
    runs(project)
    result = archkernel(project, "run", "demo", ARCHKERNEL_AZURE__HOSTNAME="two")
    assert result.returncode == 0
    # one.txt changed, so two.img is rebuilt, and then three.txt.
    assert runs(project) == ["01", "02", "03"]


def test_sigkill_while_a_step_writes_leaves_no_target(project: Path) -> None:
    assert archkernel(project, "run", "demo", "--to", "1").returncode == 0
    runs(project)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tasks.cli", "run", "demo"],
        cwd=project,
        env=_env(DEMO_SLOW="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    demo = project / "build" / "demo"
    deadline = time.monotonic() + 60
    while not any(
        p.name.startswith(".two.img.tmp") and p.stat().st_size > 0 for p in demo.iterdir()
    ):
        assert time.monotonic() < deadline, "step 2 never started writing"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (demo / "two.img").exists()
    runs(project)
    again = archkernel(project, "run", "demo")
    assert again.returncode == 0, again.stderr
    assert runs(project) == ["02", "03"]  # step 1's state survived the kill
    assert (demo / "two.img").read_bytes() == (demo / "one.txt").read_bytes()
    assert not [p for p in demo.iterdir() if ".tmp" in p.name]


def _rchar(project: Path, *args: str, **env: str) -> int:
    """Bytes the process read through read() calls, from its own /proc/self/io at exit."""
    code = (
        "import atexit, runpy, sys\n"
        "def report():\n"
        "    io = dict(l.split(': ') for l in open('/proc/self/io').read().splitlines())\n"
        "    sys.stderr.write('RCHAR=' + io['rchar'] + '\\n')\n"
        "atexit.register(report)\n"
        f"sys.argv = ['archkernel', *{list(args)!r}]\n"
        "try:\n"
        "    runpy.run_module('tasks.cli', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=project, env=_env(**env), capture_output=True, text=True
    )
    line = [x for x in result.stderr.splitlines() if x.startswith("RCHAR=")]
    assert line, result.stderr
    return int(line[-1].removeprefix("RCHAR="))


def test_uptodate_check_of_a_20_gib_target_reads_none_of_it(project: Path) -> None:
    assert archkernel(project, "run", "demo", DEMO_BIG="1").returncode == 0
    assert (project / "build/demo/two.img").stat().st_size == 20 << 30
    runs(project)
    baseline = _rchar(project, "list")
    uptodate = _rchar(project, "run", "demo")
    assert runs(project) == []
    # Reading even 1% of the image would be 200 MiB; allow only noise over `list`.
    assert uptodate - baseline < 8 << 20, (baseline, uptodate)


def test_dry_run_changes_nothing_and_shows_commands(project: Path) -> None:
    result = archkernel(project, "run", "demo", "--dry-run", DEMO_BIG="1")
    assert result.returncode == 0
    assert "run   demo:02_grow" in result.stdout
    assert "+ truncate -s 20G" in result.stdout
    assert not (project / "build").exists()  # not even the workdir or doit's state
    steps = archkernel(project, "steps", "demo")
    assert steps.returncode == 0 and not (project / "build").exists()
    assert runs(project) == []


def test_steps_reports_pending_and_done(project: Path) -> None:
    out = archkernel(project, "steps", "demo").stdout
    assert [line.split()[-1] for line in out.splitlines() if line.startswith("demo:")] == [
        "pending"
    ] * 3
    archkernel(project, "run", "demo", "--to", "1")
    out = archkernel(project, "steps", "demo").stdout
    assert "demo:01_prepare                          done" in out
    assert "demo:02_grow                             pending" in out


def test_state_file_lives_in_workdir_whatever_the_cwd(project: Path, tmp_path_factory) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    result = archkernel(elsewhere, "--settings", str(project / "settings.toml"), "run", "demo")
    assert result.returncode == 0
    state = json.loads((project / "build" / ".doit.json").read_text())
    assert "demo:03_finish" in state
    assert not list(elsewhere.iterdir())


def test_secret_never_reaches_output_log_or_state(project: Path) -> None:
    settings = project / "settings.toml"
    settings.write_text(
        f'workdir = "build"\n[azure.user]\nname = "arch"\npassword_hash = "{PASSWORD_HASH}"\n'
    )
    run = archkernel(project, "-v", "run", "demo", DEMO_SECRET="1")
    assert run.returncode == 0, run.stderr
    show = archkernel(project, "settings", "show")
    state = (project / "build" / ".doit.json").read_text()
    for text in (run.stdout, run.stderr, show.stdout, show.stderr, state):
        assert PASSWORD_HASH not in text
        assert "saltsalt" not in text
    assert "**********" in show.stdout
    assert "sha256:" in state  # a digest stands in for it
    runs(project)
    # A changed secret still re-runs the step that reads it.
    settings.write_text(settings.read_text().replace("saltsalt", "pepperpe"))
    steps = archkernel(project, "steps", "demo", DEMO_SECRET="1")
    assert "demo:03_finish                           will re-run" in steps.stdout
    assert "saltsalt" not in steps.stdout and "pepperpe" not in steps.stdout
    assert archkernel(project, "run", "demo", DEMO_SECRET="1").returncode == 0
    assert runs(project) == ["03"]


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["steps", "--help"]])
def test_help_explains_with_examples(project: Path, args: list[str]) -> None:
    result = archkernel(project, *args)
    assert result.returncode == 0
    assert "examples:" in result.stdout
    assert "archkernel " in result.stdout.split("examples:")[1]


def test_unknown_workflow_and_bad_step_numbers_are_user_errors(project: Path) -> None:
    bad = archkernel(project, "run", "nope")
    assert bad.returncode == 1
    assert "no workflow named 'nope'" in bad.stderr and "demo" in bad.stderr
    bad = archkernel(project, "run", "demo", "--from", "x")
    assert bad.returncode == 1 and "not a step number" in bad.stderr
    bad = archkernel(project, "run", "demo", "--from", "3", "--to", "2")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr


def test_plain_doit_refuses_a_step_range_outside_the_workflow(project: Path) -> None:
    for variables in (["from=4"], ["from=0"], ["to=9"], ["from=3", "to=2"]):
        bad = doit(project, "run", "demo", *variables)
        assert bad.returncode != 0, variables
        assert "demo has steps 1 to 3" in bad.stderr or "is after" in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr
        assert runs(project) == [], variables  # no step ran


def test_every_run_tidies_up_first_plain_doit_too(project: Path) -> None:
    tidied = project / "build" / "housekeeping.log"
    assert doit(project, "run", "demo").returncode == 0
    assert archkernel(project, "run", "demo").returncode == 0  # every step up to date
    assert doit(project, "run", "demo:03_finish").returncode == 0
    # Once per run, before any step, even when none has anything to do.
    assert tidied.read_text().splitlines() == ["tidied"] * 3
    assert runs(project) == ["01", "02", "03"]


def test_doit_list_shows_numbered_steps_in_order(project: Path) -> None:
    out = doit(project, "list", "--all").stdout
    names = [line.split()[0] for line in out.splitlines() if line.startswith("demo:")]
    assert names == ["demo:01_prepare", "demo:02_grow", "demo:03_finish"]
    assert "make two.img from one.txt" in out
