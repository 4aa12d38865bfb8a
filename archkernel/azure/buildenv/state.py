"""What step 1 recorded: `workdir/buildenv/buildenv.json`, and the lock around changing it.

The record names the tarball the environment came from (its SHA-256 is also the name of
the environment's directory) and what was set up in it, so a later step finds the same
environment and a second build with the same tarball reuses it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from archkernel.host.files import write_if_changed
from archkernel.log import log

STATE = "buildenv.json"
IMAGE_REPOSITORY = "archkernel-buildenv"
# An environment's directory: the first 16 hex digits of its tarball's SHA-256.
ENV_DIR = re.compile(r"[0-9a-f]{16}")


@dataclass
class State:
    """`buildenv.json`: the tarball the environment came from and what was set up in it."""

    sha256: str
    name: str
    origin: str  # URL or path of the tarball
    signer: str | None  # fingerprint of the key that signed it (mirror downloads)
    keyring: bool = False  # its pacman keyring is initialised
    mirror: str | None = None  # the Server its mirrorlist names
    installed: list[str] = field(default_factory=list)  # packages step 1 added
    images: dict[str, str] = field(default_factory=dict)  # runtime -> image

    @property
    def directory(self) -> str:
        return self.sha256[:16]

    def image_tag(self) -> str:
        """The docker/podman image name for the tree as it is now set up."""
        setup = json.dumps([self.keyring, self.mirror, sorted(self.installed)])
        digest = hashlib.sha256(setup.encode()).hexdigest()[:8]
        return f"{IMAGE_REPOSITORY}:{self.directory}-{digest}"


def directory(workdir: Path) -> Path:
    """Where build environments live: `workdir/buildenv`."""
    return Path(os.path.realpath(workdir)) / "buildenv"


def state_file(workdir: Path) -> Path:
    """Step 1's record of the environment (a target for the step)."""
    return directory(workdir) / STATE


def root_of(base: Path, state: State) -> Path:
    """The environment's tree under `base` (`workdir/buildenv`)."""
    return base / state.directory / "root"


def read_state(base: Path) -> State | None:
    """The record under `base`; None when there is none (or it cannot be read)."""
    path = base / STATE
    try:
        data = json.loads(path.read_text())
        return State(**data)
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:
        log.warning("ignoring unreadable %s (%s); the environment is made again", path, exc)
        return None


def write_state(base: Path, state: State) -> None:
    """Write the record under `base` (atomically)."""
    text = json.dumps(dataclasses.asdict(state), indent=2, sort_keys=True) + "\n"
    write_if_changed(base / STATE, text.encode())


@contextlib.contextmanager
def locked(base: Path) -> Iterator[None]:
    """One process at a time prepares the environments of a work directory."""
    with open(base / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
