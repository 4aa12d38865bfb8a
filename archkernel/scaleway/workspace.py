"""Where scaleway_kexec reads and writes, and the record step 1 leaves for the later steps.

System paths are taken under `settings.scaleway.root` (so tests run against a directory
tree); the workflow's own files live under `workdir/scaleway`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from archkernel.errors import UserError
from archkernel.settings import Settings


@dataclass(frozen=True)
class Paths:
    """Where the workflow reads and writes: system paths under root, outputs under workdir."""

    root: Path
    work: Path

    def system(self, path: str) -> Path:
        """`path` (absolute on the target system) taken under root."""
        return self.root / path.lstrip("/")

    @property
    def check(self) -> Path:
        return self.work / "check.json"

    @property
    def bootscript(self) -> Path:
        return self.work / "uboot.bootscript"

    @property
    def uinitrd(self) -> Path:
        return self.work / "uInitrd"

    @property
    def initrd_info(self) -> Path:
        return self.work / "initrd.json"

    @property
    def payload(self) -> Path:
        return self.work / "initrd.payload"

    @property
    def listing(self) -> Path:
        return self.work / "initrd.list.json"

    @property
    def modules(self) -> Path:
        return self.work / "modules"

    @property
    def modules_manifest(self) -> Path:
        return self.work / "modules.json"

    @property
    def packed(self) -> Path:
        return self.work / "pack.json"

    @property
    def kexec_record(self) -> Path:
        return self.work / "kexec.json"


def paths(settings: Settings) -> Paths:
    """The workflow's paths for these settings."""
    return Paths(settings.scaleway.root, settings.workdir / "scaleway")


@dataclass
class CheckResult:
    """What step 1 found; later steps read it from check.json."""

    kernel: str
    kernel_version: str
    server: str
    server_origin: str
    cmdline: str
    kernel_package: str = ""  # `linux-armv7 6.2.10-1` when pacman's database says so
    kernel_found_by: str = ""

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2).encode() + b"\n"


def load_check(p: Paths) -> CheckResult:
    """check.json written by step 1."""
    return CheckResult(**json.loads(p.check.read_text()))


def planned_check(p: Paths) -> CheckResult | None:
    """check.json when step 1 wrote it, else None (a dry run before step 1 ran)."""
    return load_check(p) if p.check.is_file() else None


def read_text(path: Path, what: str, hint: str) -> str:
    """The text of `path`; a missing or unreadable file is a UserError about `what`."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}", hint) from None
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror}", hint) from None


def current_cmdline(settings: Settings) -> str:
    """The running kernel's command line."""
    path = paths(settings).system("/proc/cmdline")
    return read_text(path, "kernel command line", "is /proc mounted?").strip()
