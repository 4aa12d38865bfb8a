"""The validated-settings cache: pydantic is imported only when something is validated.

`archkernel run` keeps the validated values in the workdir (`.settings-cache.json`), keyed
by the settings file's text, the environment overrides, the directory, and the versions of
this package's modules, pydantic and Python; so the boot-time Scaleway run, whose settings
never change, does not pay for building validators. Settings holding a secret are never
written out.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.util
import json
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from archkernel import __version__
from archkernel.errors import UserError
from archkernel.host.files import write_text
from archkernel.settings.schema import SECTIONS, Section, Settings
from archkernel.settings.types import Secret

if TYPE_CHECKING:
    from archkernel.settings.loading import Loaded

CACHE_FILE = ".settings-cache.json"


class _Uncacheable(Exception):
    """The settings hold a secret: they are validated on every run, never written out."""


def _rules() -> list[object]:
    """What the checks depend on besides the inputs: this package's modules, pydantic,
    Python.

    Files are identified by their stat (an upgraded or edited one has a new one), found
    without importing pydantic.
    """
    stamps: list[object] = [__version__, sys.version]
    # Every module of the package: the checks, the sections and the loading all decide
    # what a settings file becomes (this one is named even if the directory is not found).
    modules = glob.glob(os.path.join(glob.escape(os.path.dirname(__file__)), "*.py"))
    files = sorted({__file__, *modules})
    for package in ("pydantic", "pydantic_core"):
        spec = importlib.util.find_spec(package)
        files.append(spec.origin if spec is not None and spec.origin else package)
    for name in files:
        st = os.stat(name)
        stamps.append([name, st.st_ino, st.st_mtime_ns, st.st_size])
    return stamps


def cache_key(path: Path | None, text: str, env: list[tuple[str, str]], base: Path) -> str:
    """The key the validated settings are filed under; empty when the rules are unknown."""
    try:
        rules = _rules()
    except OSError:
        return ""  # not cached: validated every time
    inputs = [rules, str(path), text, env, str(base)]
    return hashlib.sha256(json.dumps(inputs).encode()).hexdigest()


def _encode(value: Any) -> Any:
    if isinstance(value, Section):
        out = {"$section": type(value).__name__}
        out.update((f.name, _encode(getattr(value, f.name))) for f in fields(value))
        return out
    if isinstance(value, Path):
        return {"$path": str(value)}
    if isinstance(value, Secret):
        raise _Uncacheable
    if isinstance(value, list):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if "$path" in value:
            return Path(value["$path"])
        cls = SECTIONS[value.pop("$section")]
        return cls(**{k: _decode(v) for k, v in value.items()})
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def read_cache(workdir: object, key: str) -> Settings | None:
    """The cached settings for `key`, or None (absent, stale, unreadable or not ours)."""
    if not isinstance(workdir, str):
        return None
    try:
        with open(os.path.join(workdir, CACHE_FILE), "rb") as f:
            st = os.fstat(f.fileno())
            # Only a file this user wrote and nobody else may change is trusted.
            if st.st_uid != os.geteuid() or st.st_mode & 0o022:
                return None
            saved = json.loads(f.read())
        if saved.get("key") != key:
            return None
        settings = _decode(saved["settings"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    return settings if isinstance(settings, Settings) else None


def remember(loaded: Loaded) -> None:
    """Keep settings loaded with `cache` and validated now for the next run to read.

    Written into the workdir only when it exists (after a run), never for settings that
    hold a secret; failing to write only means the next run validates again.
    """
    settings = loaded.settings
    if not loaded.cache_key or loaded.from_cache or not settings.workdir.is_dir():
        return
    try:
        encoded = _encode(settings)
    except _Uncacheable:
        return
    text = json.dumps({"key": loaded.cache_key, "settings": encoded})
    with contextlib.suppress(OSError, UserError):  # a cache: the next run validates again
        write_text(settings.workdir / CACHE_FILE, text, 0o600)
