"""The project's wheel, built as `python -m build` builds it, from a copy of the checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def build_wheel(work: Path) -> Path:
    """Build the wheel into `work` from a copy of the checkout (the build writes build/ and
    *.egg-info next to the sources); returns its path."""
    src = work / "src"
    shutil.copytree(
        REPO,
        src,
        # archkernel-demo*: what `archkernel demo` (the README's first command) leaves
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "__pycache__", "build", "*.egg-info", "archkernel-demo*"
        ),
    )
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "-o", str(work)],
        cwd=src,
        check=True,
        capture_output=True,
    )
    shutil.rmtree(src)
    (wheel,) = work.glob("archkernel-*.whl")
    return wheel
