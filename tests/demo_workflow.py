"""A small three-step workflow used to prove the step machinery with real doit.

Loaded through ARCHKERNEL_EXTRA_WORKFLOWS=tests.demo_workflow. Environment knobs:
DEMO_FAIL=N fails step N; DEMO_SLOW=1 makes step 2 write slowly (for kill tests);
DEMO_BIG=1 makes step 2's target a 20 GiB sparse file.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from archkernel.errors import UserError
from archkernel.host.files import atomic_path, write_text
from archkernel.settings import Loaded
from tasks.steps import Step, Workflow


def _record(workdir: Path, step: str) -> None:
    with open(workdir / "runs.log", "a", encoding="utf-8") as f:
        f.write(step + "\n")


def _fail_if(step: int) -> None:
    if os.environ.get("DEMO_FAIL") == str(step):
        raise UserError(f"demo step {step} failed on purpose", "unset DEMO_FAIL")


def build(loaded: Loaded) -> list[Step]:
    s = loaded.settings
    work = s.workdir / "demo"
    one, two, three = work / "one.txt", work / "two.img", work / "three.txt"

    def prepare() -> None:
        work.mkdir(parents=True, exist_ok=True)
        _record(s.workdir, "01")
        _fail_if(1)
        write_text(one, f"host {s.azure.hostname}\n")

    def grow() -> None:
        _record(s.workdir, "02")
        _fail_if(2)
        with atomic_path(two) as tmp, open(tmp, "wb") as f:
            if os.environ.get("DEMO_SLOW"):
                for _ in range(600):
                    f.write(b"x" * 65536)
                    f.flush()
                    time.sleep(0.05)
            f.write(one.read_bytes())
            if os.environ.get("DEMO_BIG"):
                f.truncate(20 << 30)

    def finish() -> None:
        _record(s.workdir, "03")
        _fail_if(3)
        write_text(three, f"{two.stat().st_size} {s.azure.timezone}\n")

    return [
        Step(
            1, "prepare", "write one.txt from the host name", prepare, [one], [], ["azure.hostname"]
        ),
        Step(
            2,
            "grow",
            "make two.img from one.txt",
            grow,
            [two],
            [one],
            [],
            commands=lambda: [["truncate", "-s", "20G", str(two)]],
        ),
        Step(
            3,
            "finish",
            "write three.txt from two.img and the time zone",
            finish,
            [three],
            [two],
            ["azure.timezone", *(["azure.user"] if os.environ.get("DEMO_SECRET") else [])],
        ),
    ]


WORKFLOWS = [Workflow("demo", "a three-step demo workflow (tests only)", build)]
