"""azure_vhd as a user runs it: builds from the offline repository, and what they left.

Every run is a separate process (`archkernel ...` or plain `python -m doit`), with none of
the caller's ARCHKERNEL_* settings. A `Build` is one workdir with its settings overrides;
its outputs are read back from `build/azure` (the VHD, `verify.json`, `ids.json`, the serial
console of a boot), and the image's own files from the VHD with debugfs, without mounting.

The stand-in init in the offline image prints, on the serial console,
`ARCHKERNEL-TEST-BOOT hostname=H root=DEV rootuuid=U fstab=F` and `H login:`: U is read
from the superblock of the file system the initramfs mounted as root, F is /'s entry in the
image's /etc/fstab. `boot_facts` reads that line.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from archkernel.demo import offline
from archkernel.host.run import minimal_env
from archkernel.settings import load

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = "azure_vhd"
STEPS = [
    "01_preflight",
    "02_pacstrap",
    "03_configure",
    "04_agent",
    "05_initramfs",
    "06_disk",
    "07_bootloader",
    "08_vhd",
    "09_verify",
]
BUILD_TIMEOUT = 900
BOOT_TIMEOUT = 600
OUTCOME = re.compile(
    r"^(?P<wf>azure_vhd|azure_boottest):(?P<step>\d\d_\w+): "
    r"(?P<what>done in|up to date|failed after|interrupted after)",
    re.MULTILINE,
)
_BOOT_LINE = re.compile(r"ARCHKERNEL-TEST-BOOT (.*)")


# --- running the tools, as a user would -----------------------------------------------------


def environment(**extra: str) -> dict[str, str]:
    """Our environment without any ARCHKERNEL_* setting of the caller, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARCHKERNEL_")}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def archkernel(
    *args: str, env: dict[str, str] | None = None, timeout: float = BUILD_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """`archkernel ARGS...` in a new process."""
    return subprocess.run(
        [sys.executable, "-m", "tasks.cli", *args],
        cwd=REPO,
        env=environment(**(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def doit(
    project: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m doit -f REPO/dodo.py -d PROJECT ARGS...`: plain doit over the same tasks."""
    return subprocess.run(
        [sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "-d", str(project), *args],
        cwd=project,
        env=environment(**(env or {})),
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
    )


def outcomes(log: str, workflow: str = WORKFLOW) -> dict[str, str]:
    """Each step's last outcome in a run's log: `done in`, `up to date`, `failed after` ..."""
    return {m["step"]: m["what"] for m in OUTCOME.finditer(log) if m["wf"] == workflow}


def error_line(log: str) -> str:
    """The line that says why a run failed (the first `error:` line)."""
    lines = [ln for ln in log.splitlines() if ln.startswith("error: ")]
    assert lines, log
    return lines[0]


def boot_facts(console: str) -> dict[str, str]:
    """The key=value pairs of the stand-in init's ARCHKERNEL-TEST-BOOT line."""
    found = _BOOT_LINE.findall(console)
    assert len(found) == 1, console[-3000:]
    return dict(pair.split("=", 1) for pair in found[0].split())


def run_boottest(build: Build) -> subprocess.CompletedProcess[str]:
    """`archkernel run azure_boottest`: QEMU (TCG) boots the VHD through SeaBIOS and GRUB."""
    result = build.archkernel("run", "azure_boottest", timeout=BOOT_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


# --- one build ------------------------------------------------------------------------------


@dataclass
class Build:
    """One azure_vhd build: its settings, its overrides and where its outputs are."""

    repo: offline.OfflineRepo
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    settings: Path | None = None  # default: the offline repository's settings.toml

    @property
    def settings_path(self) -> Path:
        return self.settings or self.repo.settings

    @property
    def all_env(self) -> dict[str, str]:
        return {"ARCHKERNEL_WORKDIR": str(self.workdir), **self.env}

    @property
    def azure(self) -> Path:
        return self.workdir / "azure"

    @property
    def vhd(self) -> Path:
        return self.azure / "archlinux-azure.vhd"

    @property
    def disk_size(self) -> int:
        """azure.disk_size as the settings (file and environment) give it."""
        env = environment(**self.all_env)
        return load(self.settings_path, env=env).settings.azure.disk_size

    def archkernel(
        self, *args: str, timeout: float = BUILD_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """`archkernel ARGS... --settings SETTINGS` with this build's overrides."""
        command, *rest = args
        return archkernel(
            command, *rest, "--settings", str(self.settings_path), env=self.all_env, timeout=timeout
        )

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`archkernel run azure_vhd ARGS...`."""
        return self.archkernel("run", WORKFLOW, *args)

    def report(self) -> dict[str, Any]:
        return dict(json.loads((self.azure / "verify.json").read_text()))

    def root_uuid(self) -> str:
        return str(json.loads((self.azure / "ids.json").read_text())["root_uuid"])

    def console(self) -> str:
        return (self.azure / "boottest.log").read_bytes().decode("utf-8", "replace")


def built(repo: offline.OfflineRepo, name: str, **env: str) -> Build:
    """A finished build in `repo.dir / name` with the settings overrides `env`."""
    build = Build(repo, repo.dir / name, env)
    result = build.run()
    assert result.returncode == 0, result.stderr[-5000:]
    return build


def image_file(build: Build, path: str) -> str:
    """A file of the image's root file system, read with debugfs from the VHD itself."""
    table = json.loads(
        subprocess.run(
            ["sfdisk", "--json", str(build.vhd)], capture_output=True, text=True, check=True
        ).stdout
    )
    root = table["partitiontable"]["partitions"][-1]
    device = f"{build.vhd}?offset={int(root['start']) * 512}"
    out = subprocess.run(
        ["debugfs", "-R", f"cat {path}", device], capture_output=True, text=True, check=True
    )
    return out.stdout


def path_without(tmp: Path, *tools: str) -> str:
    """A PATH of symlinks to every program on the usual PATH except `tools`."""
    tmp.mkdir(parents=True, exist_ok=True)
    for directory in minimal_env()["PATH"].split(":"):
        if not os.path.isdir(directory):
            continue
        for entry in os.scandir(directory):
            link = tmp / entry.name
            if entry.name not in tools and not link.exists() and os.access(entry.path, os.X_OK):
                link.symlink_to(entry.path)
    return str(tmp)
