"""The fake Scaleway C1 of `archkernel.demo.c1`, as the tests and benchmarks drive it.

The machine itself (its tree, the provider's images, in.tftpd, the recording stand-ins)
is the product's, so `archkernel demo scaleway_kexec` and the tests run against the same
one; read `archkernel/demo/c1.py` for what it holds. This module adds what only tests do:
run the workflow in a separate process as systemd or a user would (`FakeC1.archkernel`,
`FakeC1.doit`), skip a test where no fake C1 can be made (`needs_c1_tools`), and a
`tool()` that runs any program for a test. The `c1_base` and `fake_c1` fixtures
(tests/conftest.py) wrap these.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from archkernel.demo import c1 as demo_c1
from archkernel.demo.c1 import (
    CMDLINE,
    CURRENT_SHUTDOWN,
    OLD_SHUTDOWN,
    OPTIONAL_MODULES,
    PACKAGE,
    PNP,
    REQUIRED_MODULES,
    UNREQUESTED_MODULES,
    Template,
    add_package,
    compress_modules,
    modprobe_show_depends,
    modules_closure,
    serving,
    write_executable,
)
from archkernel.demo.provider import (
    APPLETS,
    BOOTSCRIPT_NAME,
    INITRD_NAME,
    PROVIDER_INIT,
    SBIN_APPLETS,
    bootscript_text,
    mkimage,
    provider_initrd,
    provider_tree,
    script_image,
    tempdir,
)
from archkernel.demo.tftpd import tftpd_binary
from archkernel.host.run import missing_tools
from tests.support.kernel import debian_kernel_tree

__all__ = [
    "APPLETS",
    "BOOTSCRIPT_NAME",
    "CMDLINE",
    "CURRENT_SHUTDOWN",
    "INITRD_NAME",
    "OLD_SHUTDOWN",
    "OPTIONAL_MODULES",
    "PACKAGE",
    "PNP",
    "PROVIDER_INIT",
    "REQUIRED_MODULES",
    "SBIN_APPLETS",
    "UNREQUESTED_MODULES",
    "FakeC1",
    "Template",
    "add_package",
    "archkernel_command",
    "bootscript_text",
    "c1_template",
    "compress_modules",
    "mkimage",
    "modprobe_show_depends",
    "modules_closure",
    "needs_c1_tools",
    "provider_initrd",
    "provider_tree",
    "script_image",
    "serving",
    "tempdir",
    "tool",
    "write_executable",
]

REPO = Path(__file__).resolve().parents[2]
VENV_ARCHKERNEL = REPO / ".venv" / "bin" / "archkernel"


def tool(argv: Sequence[str | os.PathLike[str]], data: bytes | None = None, **kw: Any) -> bytes:
    """Run a real tool, fail loudly, return its stdout."""
    result = subprocess.run(
        [os.fspath(a) for a in argv], input=data, capture_output=True, check=False, **kw
    )
    if result.returncode != 0:
        raise RuntimeError(f"{shlex.join(map(str, argv))} failed: {result.stderr.decode()}")
    return bytes(result.stdout)


def c1_template(base: Path, kernel_tree: Path | None = None) -> Template:
    """`archkernel.demo.c1.c1_template`, skipping the test where Debian's kernel cannot be
    had."""
    tree = kernel_tree if kernel_tree is not None else debian_kernel_tree()
    return demo_c1.c1_template(base, tree)


class FakeC1(demo_c1.FakeC1):
    """The product's fake C1, plus running the workflow on it in a new process."""

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a run: stand-ins first on PATH, no ARCHKERNEL_* leaking in."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("ARCHKERNEL_")}
        env["PATH"] = self.path(env.get("PATH", os.defpath))
        env["PYTHONPATH"] = str(REPO)
        env.update(extra)
        return env

    def archkernel(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """`archkernel run scaleway_kexec --settings S ARGS...` in a new process."""
        argv = [*archkernel_command(), "run", "scaleway_kexec", "--settings", str(self.settings)]
        return self._run([*argv, *args], timeout)

    def doit(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """`doit run scaleway_kexec settings=S ARGS...` with the project's dodo.py."""
        argv = [sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "-d", str(self.base)]
        argv += ["run", "scaleway_kexec", f"settings={self.settings}"]
        return self._run([*argv, *args], timeout)

    def _run(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv,
            cwd=self.base,
            # Every step fails if it reads a setting its @reads does not declare.
            env=self.env(ARCHKERNEL_AUDIT_SETTINGS="1"),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def archkernel_command() -> list[str]:
    """The installed `archkernel` command, else the module run by this interpreter."""
    if VENV_ARCHKERNEL.is_file():
        return [str(VENV_ARCHKERNEL)]
    return [sys.executable, "-m", "tasks.cli"]


def needs_c1_tools() -> None:
    """Skip unless this machine can stand up a fake C1 (root, the tools)."""
    if os.geteuid() != 0:
        pytest.skip("the fake C1 needs root (in.tftpd chroots, device nodes)")
    missing = missing_tools(demo_c1.TOOLS)
    if tftpd_binary() is None:
        missing.append("in.tftpd")
    if missing or not Path("/bin/busybox").is_file():
        pytest.skip(f"the fake C1 needs {', '.join(missing) or 'busybox-static'}")
