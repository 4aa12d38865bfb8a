"""Debian's real provisioning agents on the host, to drive against the fabric stand-in.

`debian_agents()` is cloud-init and waagent (WALinuxAgent) from Debian's packages with the
Python libraries they import, unpacked into one cached tree (archkernel.demo.debian).
`run_agent_code(tree, code)` runs a Python snippet with that tree first on the path, in a
child process (the agents' logging and module state stay out of pytest), and returns
what the snippet printed as JSON on its last line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from archkernel.azure.fabric import proofs
from archkernel.demo import debian
from archkernel.errors import UserError

AGENT_PACKAGES = (
    "cloud-init",
    "waagent",
    # what their modules import
    *("python3-requests", "python3-urllib3", "python3-idna", "python3-certifi"),
    *("python3-charset-normalizer", "python3-chardet", "python3-yaml", "python3-configobj"),
    *("python3-six", "python3-jinja2", "python3-markupsafe", "python3-jsonpatch"),
    *("python3-json-pointer", "python3-jsonschema", "python3-attr", "python3-pyrsistent"),
    *("python3-oauthlib", "python3-netifaces", "python3-serial", "python3-distro"),
)


def debian_agents() -> Path:
    """The unpacked tree (skips the test when APT cannot fetch the packages)."""
    try:
        return debian.unpacked_packages("agents", AGENT_PACKAGES)
    except UserError as exc:
        pytest.skip(f"Debian's agent packages are not available: {exc}")


def run_agent_code(tree: Path, code: str, tmp_path: Path) -> Any:
    """Run `code` with the agents importable; the JSON its last output line holds."""
    script = tmp_path / "agent_code.py"
    script.write_text(textwrap.dedent(code))
    site = tree / "usr" / "lib" / "python3" / "dist-packages"
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, f"agent code failed:\n{result.stderr[-3000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def passing_proofs(**changes: object) -> proofs.Proofs:
    """Proofs of a VM that cloud-init provisioned fully (host name "h"), with `changes`."""
    values: dict[str, object] = {
        "hostname": "h",
        "static_hostname": "h",
        "user_login": True,
        "in_wheel": True,
        "wrong_key_refused": True,
        "password_login_refused": True,
        "ready_reported": True,
        "dhcp_lease": True,
        "client_alive_interval": 180,
        "fresh_identity": True,
        "agent": "cloud-init",
        "seconds": 1.0,
        "sudo": True,
        "waagent_goal_state": None,
    }
    values.update(changes)
    return proofs.Proofs(**values)  # type: ignore[arg-type]
