"""A dry run prints exactly the commands a run then executes, for both workflows.

Each step makes its plan (archkernel.plan) and then runs it, and `--dry-run` prints the
same plan: so, after a build, `archkernel run W --from 1 --dry-run` must list, step by
step, the very commands that `archkernel -v run W --from 1` then logs as `+ cmd`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from archkernel.demo import offline
from tests.support.azure import Build
from tests.support.c1 import FakeC1

pytestmark = [pytest.mark.integration, pytest.mark.root]

_TASK = re.compile(r"^(?P<task>\w+:\d\d_\w+): ")
_DRY_STEP = re.compile(r"^(?P<what>run|skip)\s+(?P<task>\w+:\d\d_\w+)")


def with_commands(found: dict[str, list[str]]) -> dict[str, list[str]]:
    """Only the steps that run a command (others log `up to date` or in-process work)."""
    return {task: commands for task, commands in found.items() if commands}


def logged_commands(log: str) -> dict[str, list[str]]:
    """The `+ cmd` lines of a `-v` run, by the step that logged them."""
    found: dict[str, list[str]] = {}
    current = None
    for line in log.splitlines():
        if m := _TASK.match(line):
            current = m["task"]
            found.setdefault(current, [])
        elif line.startswith("+ ") and current is not None:
            found[current].append(line)
    return found


def planned_commands(dry_run: str) -> dict[str, list[str]]:
    """The `+ cmd` lines of a dry run, by the step it plans them for."""
    found: dict[str, list[str]] = {}
    current = None
    for line in dry_run.splitlines():
        if m := _DRY_STEP.match(line):
            current = m["task"] if m["what"] == "run" else None
            if current is not None:
                found[current] = []
        elif line.strip().startswith("+ ") and current is not None:
            found[current].append(line.strip())
    return found


def test_parsers_read_what_the_commands_print() -> None:
    dry = (
        "dry run of w: nothing is changed\n"
        "run   w:01_a: first\n        because forced\n        + ls -l\n        # a file\n"
        "skip  w:02_b (up to date)\n"
        "run   w:03_c: third\n        + true\n"
    )
    assert planned_commands(dry) == {"w:01_a": ["+ ls -l"], "w:03_c": ["+ true"]}
    log = "w:01_a: first\n+ ls -l\nw:01_a: done in 0.1s\nw:03_c: third\n+ true\n"
    assert logged_commands(log) == {"w:01_a": ["+ ls -l"], "w:03_c": ["+ true"]}


@pytest.fixture(scope="module")
def azure_build(repo: offline.OfflineRepo) -> Build:
    build = Build(repo, repo.dir / "dry-run")
    first = build.run()
    assert first.returncode == 0, first.stderr[-5000:]
    return build


def test_azure_vhd_runs_exactly_what_its_dry_run_shows(azure_build: Build) -> None:
    dry = azure_build.run("--from", "1", "--dry-run")
    assert dry.returncode == 0, dry.stderr[-3000:]
    planned = planned_commands(dry.stdout)
    assert len(planned) == 9, dry.stdout
    run = azure_build.archkernel("-v", "run", "azure_vhd", "--from", "1")
    assert run.returncode == 0, run.stderr[-5000:]
    logged = logged_commands(run.stderr)
    assert logged == planned
    # The disk and bootloader steps are not in-process only: their commands were compared.
    assert any(c.startswith("+ sfdisk") for c in planned["azure_vhd:06_disk"])
    assert any(c.startswith("+ pacstrap") for c in planned["azure_vhd:02_pacstrap"])


def test_azure_boottest_runs_exactly_what_its_dry_run_shows(azure_build: Build) -> None:
    dry = azure_build.archkernel("run", "azure_boottest", "--dry-run")
    assert dry.returncode == 0, dry.stderr[-3000:]
    planned = planned_commands(dry.stdout)
    run = azure_build.archkernel("-v", "run", "azure_boottest", timeout=900)
    assert run.returncode == 0, run.stderr[-5000:]
    assert with_commands(logged_commands(run.stderr)) == with_commands(planned)
    assert [c.split()[1] for c in planned["azure_boottest:01_boot"]] == ["qemu-system-x86_64"]


@pytest.fixture
def booted_once(fake_c1: FakeC1) -> Iterator[FakeC1]:
    first = fake_c1.archkernel()
    assert first.returncode == 0, first.stderr[-3000:]
    fake_c1.calls(clear=True)
    yield fake_c1


def test_scaleway_kexec_runs_exactly_what_its_dry_run_shows(booted_once: FakeC1) -> None:
    c1 = booted_once
    dry = c1.archkernel("--from", "1", "--dry-run")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert c1.calls() == []  # the dry run started neither kexec nor systemctl
    planned = planned_commands(dry.stdout)
    assert len(planned) == 8, dry.stdout
    run = c1.archkernel("-v", "--from", "1")
    assert run.returncode == 0, run.stderr[-3000:]
    assert logged_commands(run.stderr) == planned
    kexec = planned["scaleway_kexec:08_kexec"]
    assert [c.split()[1:3] for c in kexec] == [["kexec", "-l"], ["systemctl", "kexec"]]
    assert [call[:2] for call in c1.calls()] == [["kexec", "-l"], ["systemctl", "kexec"]]


def test_scaleway_kexec_dry_run_before_any_run_prints_the_kexec_commands(
    fake_c1: FakeC1,
) -> None:
    dry = fake_c1.archkernel("--dry-run")
    assert dry.returncode == 0, dry.stderr[-3000:]
    planned = planned_commands(dry.stdout)
    root = fake_c1.root
    line = (
        "console=ttyS0,115200 root=/dev/nbd0 nbd.max_parts=8 nbd.nbds_max=3 boot=local nousb "
        "noplymouth INITRD_DEBUG=0 is_in_kexec=yes NO_SIGNAL_STATE=1 "
        "DONT_FETCH_KERNEL_MODULES=1 NO_NTPDATE=1 archkernel"
    )  # the fake C1's line, its ip= left off
    assert planned["scaleway_kexec:08_kexec"] == [
        f"+ kexec -l {root}/boot/zImage --initrd={root}/boot/initramfs-archkernel.img "
        f"'--command-line={line}'",
        "+ systemctl kexec",
    ]
    assert fake_c1.calls() == []
    assert not (fake_c1.workdir / "scaleway").exists()


def test_no_step_plan_writes_anything(tmp_path: Path, booted_once: FakeC1) -> None:
    c1 = booted_once
    before = sorted((p, p.stat().st_mtime_ns) for p in c1.workdir.rglob("*"))
    assert c1.archkernel("--from", "1", "--dry-run").returncode == 0
    assert sorted((p, p.stat().st_mtime_ns) for p in c1.workdir.rglob("*")) == before
