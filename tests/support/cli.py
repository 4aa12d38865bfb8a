"""Running `archkernel` as a user would, in a new process, with extra workflow modules."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# A project whose settings name a host name the demo workflows read.
SETTINGS = 'workdir = "build"\n[azure]\nhostname = "one"\n'


def plugin_env(workflows: str, **extra: str) -> dict[str, str]:
    """Our environment without any ARCHKERNEL_*/DEMO_* of the caller, with the workflow
    modules `workflows` loaded (ARCHKERNEL_EXTRA_WORKFLOWS), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ARCHKERNEL_", "DEMO_"))}
    env["ARCHKERNEL_EXTRA_WORKFLOWS"] = workflows
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def run_archkernel(
    project: Path, workflows: str, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    """`archkernel ARGS...` in `project`, with the workflow modules `workflows`."""
    return subprocess.run(
        [sys.executable, "-m", "tasks.cli", *args],
        cwd=project,
        env=plugin_env(workflows, **env),
        capture_output=True,
        text=True,
        timeout=120,
    )
