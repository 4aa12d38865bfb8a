"""Which settings a piece of code reads: a recording copy of the settings.

Each step declares the settings it reads (`archkernel.plan.reads`); they become its
up-to-date check, so a step that read an undeclared setting would stay "done" when that
setting changes. `recording(settings, seen)` returns a copy whose sections add the dotted
key of every value read (`azure.hostname`, `azure.user.name`) to `seen`; `undeclared()`
says which of those no declaration covers. The copies are instances of subclasses of the
real section classes, so methods, properties and isinstance() behave as usual.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, TypeVar, cast

T = TypeVar("T")

_recording_classes: dict[type, type] = {}


def _recording_class(cls: type) -> type:
    """A subclass of the section class `cls` that reports reads of its fields."""
    if cls not in _recording_classes:
        names = frozenset(f.name for f in dataclasses.fields(cls))

        def __getattribute__(self: Any, name: str) -> Any:
            value = object.__getattribute__(self, name)
            if name in names and not dataclasses.is_dataclass(value):
                prefix, seen = object.__getattribute__(self, "_audit")
                seen.add(prefix + name)
            return value

        _recording_classes[cls] = type(
            cls.__name__, (cls,), {"__getattribute__": __getattribute__, "__slots__": ()}
        )
    return _recording_classes[cls]


def recording(settings: T, seen: set[str], prefix: str = "") -> T:
    """A copy of the settings dataclass `settings` that adds each key read to `seen`."""
    copy: Any = object.__new__(_recording_class(type(settings)))
    for f in dataclasses.fields(settings):  # type: ignore[arg-type]
        value = getattr(settings, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = recording(value, seen, f"{prefix}{f.name}.")
        object.__setattr__(copy, f.name, value)
    object.__setattr__(copy, "_audit", (prefix, seen))
    return cast(T, copy)


def covered(key: str, declared: Iterable[str]) -> bool:
    """Whether `key` (`azure.user.name`) is declared itself or by a section around it."""
    parts = key.split(".")
    wanted = {".".join(parts[:n]) for n in range(1, len(parts) + 1)}
    return any(d in wanted for d in declared)


def undeclared(seen: Iterable[str], declared: Iterable[str]) -> list[str]:
    """The keys of `seen` that no declaration covers, sorted."""
    declared = list(declared)
    return sorted(k for k in set(seen) if not covered(k, declared))
