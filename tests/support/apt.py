"""Debian packages for the tests, from the host's APT.

An APT command fails when the host has no package lists yet (a fresh container). Then, as
root, `apt-get update` runs once and the command is tried again; without root the failure
says what to do instead.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from archkernel.errors import UserError
from archkernel.host.files import temporary_directory
from archkernel.host.run import run

APT_HINT = "run `apt-get update` as root, or fill $ARCHKERNEL_TEST_CACHE"


def apt(
    argv: Sequence[str],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    capture: bool = False,
    timeout: float = 900,
) -> subprocess.CompletedProcess[str]:
    """Run an APT command; if it fails, `apt-get update` (as root) and run it once more."""
    result = run(argv, cwd=cwd, env=env, capture=capture, check=False, timeout=timeout)
    if result.returncode == 0:
        return result
    if os.geteuid() != 0:
        raise UserError(f"{' '.join(argv)} failed with exit code {result.returncode}", APT_HINT)
    run(["apt-get", "update", "-q"], env=env, timeout=900)
    return run(argv, cwd=cwd, env=env, capture=capture, timeout=timeout)


def apt_download(package: str, directory: Path) -> Path:
    """`package`'s .deb in `directory`: one already there, else what `apt-get download` gets.

    The download goes to a temporary directory first, so a killed download leaves no
    partial .deb that a later run would take for a whole one.
    """
    debs = sorted(directory.glob(f"{package}_*.deb"))
    if debs:
        return debs[-1]
    directory.mkdir(parents=True, exist_ok=True)
    with temporary_directory(prefix=".download-", parent=str(directory)) as work:
        apt(["apt-get", "download", package], cwd=work, timeout=1800)
        fetched = sorted(work.glob("*.deb"))
        if len(fetched) != 1:
            raise UserError(f"apt-get download {package} left {[p.name for p in fetched]}")
        dest = directory / fetched[0].name
        os.replace(fetched[0], dest)
    return dest
