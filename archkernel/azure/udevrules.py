"""A small evaluator of udev rules over a recorded device, for verify and the tests.

udev itself needs the device in sysfs; what the image's rules do on Azure's disks, clock
and virtual functions (which no build machine has) is found here by running the rules over
the properties and sysfs attributes such a device shows udev (`Device`). It knows the keys
archkernel's rules and the common persistent-storage rules use: ACTION, SUBSYSTEM, KERNEL,
DRIVER, ENV{}, ATTR{}, the parent keys KERNELS, SUBSYSTEMS, DRIVERS, ATTRS{} (all matched,
with `==` or `!=`, on one device of the chain, as udev does), SYMLINK, GOTO and LABEL,
with the `%n` `%k` `$env{}` `$kernel` `$number` substitutions. Any other key raises
`UnsupportedRule`: a rule it cannot judge is never silently passed over. Not `strict` (for
a whole image's rules: the distribution's use PROGRAM, IMPORT, RUN ...), a rule that
matches on a key it does not know is skipped, and assignments it does not know (RUN, TAG,
OPTIONS, IMPORT) are left out; `Device.skipped` counts the rules so skipped.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

MATCH_OPS = ("==", "!=")
ASSIGN_OPS = ("=", "+=", "-=", ":=")
_TOKEN = re.compile(
    r'\s*([A-Z_]+)(?:\{([^}]*)\})?\s*(==|!=|\+=|-=|:=|=)\s*"((?:[^"\\]|\\.)*)"\s*,?'
)
_PARENT_KEYS = ("KERNELS", "SUBSYSTEMS", "DRIVERS", "ATTRS")


class UnsupportedRule(ValueError):
    """A rule line with a key or form the evaluator does not know."""


@dataclass
class Node:
    """One device of the chain: its kernel name, subsystem, driver and sysfs attributes."""

    kernel: str
    subsystem: str = ""
    driver: str = ""
    attrs: dict[str, str] = field(default_factory=dict)


@dataclass
class Device:
    """A device as udev sees it on an event: itself (`node`), its parents nearest first,
    the properties earlier rules set (`env`: DEVTYPE, ID_SERIAL_SHORT, ...)."""

    node: Node
    parents: list[Node] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    action: str = "add"
    symlinks: list[str] = field(default_factory=list)
    skipped: int = 0


@dataclass(frozen=True)
class Key:
    name: str
    arg: str | None
    op: str
    value: str


def parse(text: str, strict: bool = True) -> list[list[Key]]:
    """The rules of a rules file: one list of keys per rule line (continuations joined).
    Not `strict`, a line it cannot read is left out."""
    rules: list[list[Key]] = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keys: list[Key] = []
        pos = 0
        while pos < len(line):
            m = _TOKEN.match(line, pos)
            if m is None and not strict:
                keys = []
                break
            if m is None:
                raise UnsupportedRule(f"cannot read {line[pos:]!r} in {line!r}")
            keys.append(Key(m[1], m[2], m[3], m[4]))
            pos = m.end()
        if keys:
            rules.append(keys)
    return rules


def _glob(pattern: str, value: str | None) -> bool:
    if value is None:
        value = ""
    return any(fnmatch.fnmatchcase(value, alt) for alt in pattern.split("|"))


def _attr_matches(pattern: str, value: str | None) -> bool:
    # udev ignores an attribute's trailing blanks unless the pattern ends in one.
    if value is not None and not pattern.endswith(" "):
        value = value.rstrip()
    return value is not None and _glob(pattern, value)


def _number(kernel: str) -> str:
    m = re.search(r"(\d+)$", kernel)
    return m[1] if m else ""


def substitute(value: str, dev: Device) -> str:
    """udev's substitutions in an assigned value."""
    value = re.sub(r"\$env\{([^}]*)\}", lambda m: dev.env.get(m[1], ""), value)
    value = value.replace("$kernel", dev.node.kernel).replace("%k", dev.node.kernel)
    return value.replace("$number", _number(dev.node.kernel)).replace(
        "%n", _number(dev.node.kernel)
    )


def _own_match(key: Key, dev: Device) -> bool:
    n = dev.node
    if key.name == "ACTION":
        found: str | None = dev.action
    elif key.name == "SUBSYSTEM":
        found = n.subsystem
    elif key.name == "KERNEL":
        found = n.kernel
    elif key.name == "DRIVER":
        found = n.driver
    elif key.name == "ENV" and key.arg is not None:
        found = dev.env.get(key.arg)
    elif key.name == "ATTR" and key.arg is not None:
        value = n.attrs.get(key.arg)
        if value is None:  # udev: a missing attribute matches neither == nor !=
            return False
        hit = _attr_matches(key.value, value)
        return hit if key.op == "==" else not hit
    else:
        raise UnsupportedRule(f"{key.name} {key.op} is not supported")
    hit = _glob(key.value, found)
    return hit if key.op == "==" else not hit


def _parent_match(keys: list[Key], dev: Device) -> bool:
    """All parent keys match on one device of the chain (the device itself first)."""
    if not keys:
        return True
    for node in [dev.node, *dev.parents]:
        ok = True
        for key in keys:
            if key.name == "ATTRS":
                value = node.attrs.get(key.arg or "")
                if value is None:  # no such attribute: neither == nor != matches
                    ok = False
                    break
                hit = _attr_matches(key.value, value)
            else:
                found = {"KERNELS": node.kernel, "SUBSYSTEMS": node.subsystem}.get(
                    key.name, node.driver
                )
                hit = _glob(key.value, found)
            # `!=`: this device of the chain must not match (udev's own rule).
            ok = hit if key.op == "==" else not hit
            if not ok:
                break
        if ok:
            return True
    return False


def _assign(key: Key, dev: Device) -> None:
    value = substitute(key.value, dev)
    if key.name == "ENV" and key.arg is not None and key.op in ("=", ":="):
        dev.env[key.arg] = value
    elif key.name == "SYMLINK" and key.op in ("+=", "=", ":="):
        if key.op != "+=":
            dev.symlinks.clear()
        dev.symlinks += value.split()
    else:
        raise UnsupportedRule(f"{key.name}{key.op} is not supported")


OWN_KEYS = ("ACTION", "SUBSYSTEM", "KERNEL", "DRIVER", "ENV", "ATTR")


def apply(rules_texts: list[str], dev: Device, strict: bool = True) -> Device:
    """Run the rules files `rules_texts` (in udev's order) over `dev`; returns it, with
    the properties and symlinks they set."""
    for text in rules_texts:
        rules = parse(text, strict)
        labels = {i: k.value for i, rule in enumerate(rules) for k in rule if k.name == "LABEL"}
        goto: str | None = None
        for i, rule in enumerate(rules):
            if goto is not None:
                if labels.get(i) == goto:
                    goto = None
                else:
                    continue
            matches = [k for k in rule if k.op in MATCH_OPS]
            if not strict and any(k.name not in (*OWN_KEYS, *_PARENT_KEYS) for k in matches):
                dev.skipped += 1
                continue
            own = [k for k in matches if k.name not in _PARENT_KEYS]
            if not all(_own_match(k, dev) for k in own):
                continue
            if not _parent_match([k for k in matches if k.name in _PARENT_KEYS], dev):
                continue
            for key in rule:
                if key.name == "GOTO":
                    goto = key.value
                elif key.name != "LABEL" and key.op in ASSIGN_OPS:
                    try:
                        _assign(key, dev)
                    except UnsupportedRule:
                        if strict:
                            raise
    return dev
