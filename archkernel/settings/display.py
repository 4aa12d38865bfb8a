"""Views of the settings: the values a step reads (for doit's state), the effective
settings with their origins (for `settings show`), the documented keys (for the example
file). Secrets are shown masked, or as digests that tell a change without revealing it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_type_hints

from archkernel.settings.schema import Section, Settings, default_of
from archkernel.settings.types import Secret, format_size

if TYPE_CHECKING:
    from archkernel.settings.loading import Loaded


def digest(secret: str) -> str:
    """A short digest that tells a changed secret without revealing it."""
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()[:16]


def _plain(value: Any) -> Any:
    if isinstance(value, Secret):
        return digest(value.get_secret_value())
    if isinstance(value, Section):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def lookup(settings: Settings, dotted: str) -> Any:
    """The value at `azure.hostname`-style key paths."""
    node: Any = settings
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def subset(settings: Settings, keys: list[str]) -> dict[str, Any]:
    """Exactly the values of `keys`, JSON-safe, secrets replaced by digests (for doit state)."""
    out = {key: _plain(lookup(settings, key)) for key in keys}
    if any(k in ("azure.disk_size",) for k in keys):
        out["azure.disk_size"] = format_size(settings.azure.disk_size)
    return out


@dataclass(frozen=True)
class Value:
    """One effective setting as the settings file would write it (`30GiB`, paths as text;
    None when unset), with where it came from. A secret's value is never kept here."""

    key: str
    value: Any
    origin: str
    secret: bool = False


def values(loaded: Loaded) -> list[Value]:
    """Every leaf setting in the schema's order, secrets masked (their value is None)."""
    rows: list[Value] = []

    def walk(section: Section, prefix: str) -> None:
        for f in fields(section):
            value = getattr(section, f.name)
            key = f"{prefix}{f.name}"
            origin = loaded.origins.get(key, "default")
            if isinstance(value, Section):
                walk(value, key + ".")
            elif isinstance(value, Secret):
                rows.append(Value(key, None, origin, secret=True))
            elif key == "azure.disk_size":
                rows.append(Value(key, format_size(value), origin))
            else:
                rows.append(Value(key, _plain(value), origin))

    walk(loaded.settings, "")
    return rows


def effective(loaded: Loaded) -> list[tuple[str, str, str]]:
    """(key, value for display, origin) for every setting; secrets are masked."""
    rows: list[tuple[str, str, str]] = []
    for v in values(loaded):
        if v.secret:
            shown = "**********"
        elif v.key == "azure.disk_size":
            shown = str(v.value)
        else:
            shown = json.dumps(v.value)
        rows.append((v.key, shown, v.origin))
    return rows


def toml_lines(loaded: Loaded) -> list[str]:
    """The effective settings as TOML that pastes back into a settings file, each line
    with its origin: dotted keys, quoted strings; unset values and secrets commented out."""
    rows = values(loaded)
    width = max(len(v.key) for v in rows)
    lines = []
    for v in rows:
        if v.secret:
            text = f"# {v.key} = ********** (a secret: not shown)"
        elif v.value is None:
            text = f"# {v.key} = (not set)"
        else:
            # JSON's strings, numbers, booleans and arrays are TOML's too.
            text = f"{v.key:<{width}} = {json.dumps(v.value)}"
        lines.append(f"{text:<{width + 43}} # {v.origin}")
    return lines


def section_keys() -> dict[str, list[str]]:
    """The keys each section takes, by the section's dotted path ('' is the top level)."""
    sections: dict[str, list[str]] = {}

    def walk(cls: type[Section], path: str) -> None:
        hints = get_type_hints(cls)
        sections[path] = [f.name for f in fields(cls)]
        for f in fields(cls):
            sub = _section_of(hints[f.name])
            if sub is not None:
                walk(sub, f"{path}.{f.name}" if path else f.name)

    walk(Settings, "")
    return sections


def field_docs() -> dict[str, tuple[Any, str]]:
    """Every leaf key with its default and description (for the example file and its test)."""
    docs: dict[str, tuple[Any, str]] = {}

    def walk(cls: type[Section], prefix: str) -> None:
        hints = get_type_hints(cls)
        for f in fields(cls):
            sub = _section_of(hints[f.name])
            if sub is not None:
                walk(sub, f"{prefix}{f.name}.")
                continue
            docs[f"{prefix}{f.name}"] = (default_of(cls, f.name), f.metadata.get("doc", ""))

    walk(Settings, "")
    return docs


def _section_of(annotation: Any) -> type[Section] | None:
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(candidate, type) and issubclass(candidate, Section):
            return candidate
    return None
