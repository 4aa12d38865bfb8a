"""A small three-step workflow used to prove the step machinery with real doit.

Loaded through ARCHKERNEL_EXTRA_WORKFLOWS=tests.support.demo_workflow. Environment knobs:
DEMO_FAIL=N fails step N; DEMO_SLOW=1 makes step 2 write slowly (for kill tests);
DEMO_BIG=1 makes step 2's target a 20 GiB sparse file.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from archkernel.errors import UserError
from archkernel.host.files import atomic_path, write_text
from archkernel.plan import Plan, reads
from archkernel.settings import Settings
from tasks.steps import Step, Workflow


def _record(workdir: Path, step: str) -> None:
    with open(workdir / "runs.log", "a", encoding="utf-8") as f:
        f.write(step + "\n")


def _fail_if(step: int) -> None:
    if os.environ.get("DEMO_FAIL") == str(step):
        raise UserError(f"demo step {step} failed on purpose", "unset DEMO_FAIL")


def _paths(s: Settings) -> tuple[Path, Path, Path]:
    work = s.workdir / "demo"
    return work / "one.txt", work / "two.img", work / "three.txt"


@reads("azure.hostname")
def prepare(s: Settings) -> Plan:
    """write one.txt from the host name"""
    one, _, _ = _paths(s)

    def write() -> None:
        one.parent.mkdir(parents=True, exist_ok=True)
        _record(s.workdir, "01")
        _fail_if(1)
        write_text(one, f"host {s.azure.hostname}\n")

    return Plan().do(f"write {one}", write)


def grow(s: Settings) -> Plan:
    """make two.img from one.txt"""
    one, two, _ = _paths(s)

    def copy() -> None:
        _record(s.workdir, "02")
        _fail_if(2)
        with atomic_path(two) as tmp, open(tmp, "wb") as f:
            if os.environ.get("DEMO_SLOW"):
                for _ in range(600):
                    f.write(b"x" * 65536)
                    f.flush()
                    time.sleep(0.05)
            f.write(one.read_bytes())

    plan = Plan().do(f"copy {one} to {two}", copy)
    if os.environ.get("DEMO_BIG"):
        plan.run(["truncate", "-s", "20G", two])
    return plan


@reads("azure.timezone")
def finish(s: Settings) -> Plan:
    """write three.txt from two.img and the time zone"""
    _, two, three = _paths(s)

    def write() -> None:
        _record(s.workdir, "03")
        _fail_if(3)
        write_text(three, f"{two.stat().st_size} {s.azure.timezone}\n")

    return Plan().do(f"write {three}", write)


@reads("azure.timezone", "azure.user")
def finish_with_secret(s: Settings) -> Plan:
    """write three.txt from two.img and the time zone"""
    return finish(s)


def build(s: Settings) -> list[Step]:
    one, two, three = _paths(s)
    last = finish_with_secret if os.environ.get("DEMO_SECRET") else finish
    return [
        Step.of(prepare, targets=[one]),
        Step.of(grow, targets=[two], file_dep=[one]),
        Step.of(last, verb="finish", targets=[three], file_dep=[two]),
    ]


def housekeeping(s: Settings) -> None:
    """Counts its calls in workdir/housekeeping.log (the real ones undo killed runs)."""
    s.workdir.mkdir(parents=True, exist_ok=True)
    with open(s.workdir / "housekeeping.log", "a", encoding="utf-8") as f:
        f.write("tidied\n")


WORKFLOWS = [
    Workflow("demo", "a three-step demo workflow (tests only)", build, housekeeping=housekeeping)
]
