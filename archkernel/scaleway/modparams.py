"""Module parameters for the modules the new /init loads with busybox `insmod`.

The kernel applies `module.param=value` from its command line only to modules that
`modprobe` loads (kmod reads /proc/cmdline) or that are built in; busybox `insmod` reads
neither, so a parameter given for a module the new /init loads would be lost. The /init
passes them to `insmod` itself: those of the command line the new kernel runs under (the
kexec line), and those of the `scaleway.module_options` setting
(`["nbd nbds_max=3 max_part=8"]`, each a modprobe.d `options` line). Where both
name a parameter, the command line wins, as with modprobe.

Pure functions of text. Names and values are checked (no control characters, no `"`
inside a value: the kernel's parser has no escape for it), and `insmod_args` gives the
words for `insmod` as the kernel reads them (a value with spaces in double quotes);
shell-quoting them is the script's job.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from archkernel.errors import UserError

_PARAM_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_MODULE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_VALUE = 1024


def normalize(name: str) -> str:
    """Module and parameter names as the kernel compares them: '-' and '_' are one."""
    return name.replace("-", "_")


@dataclass(frozen=True)
class Param:
    """One module parameter: `nbds_max=3`, or a bare `flag` (value None)."""

    name: str
    value: str | None

    def insmod_arg(self) -> str:
        """The word `insmod` gets: `name`, `name=value`, or `name="a value"`."""
        if self.value is None:
            return self.name
        if any(c.isspace() for c in self.value):
            return f'{self.name}="{self.value}"'
        return f"{self.name}={self.value}"


def _problem(name: str, value: str | None) -> str | None:
    if not _PARAM_NAME.fullmatch(name):
        return f"parameter name {name!r} is not letters, digits, '_', '.' and '-'"
    if value is not None:
        if len(value) > MAX_VALUE:
            return f"the value of {name} is longer than {MAX_VALUE} characters"
        if '"' in value:
            return f"the value of {name} holds a '\"', which the kernel cannot take"
        if not value.isprintable():
            return f"the value of {name} holds control characters"
    return None


def _unquote(token: str) -> tuple[str, str | None]:
    """`key`, `value` of one command-line word, quotes removed as the kernel does."""
    if token.startswith('"'):
        token = token[1:]
    key, eq, value = token.partition("=")
    if not eq:
        return key.removesuffix('"'), None
    if value.startswith('"'):
        value = value[1:]
    return key, value.removesuffix('"')


def parse_options(text: str) -> list[Param]:
    """The parameters of an options text (`nbds_max=3 name="a b"`); ValueError if bad."""
    from archkernel.scaleway.cmdline import split_cmdline

    if "\n" in text or "\r" in text or "\0" in text:
        raise ValueError("must be one line")
    if text.count('"') % 2:
        raise ValueError(f"{text!r} has an unbalanced '\"'")
    params = []
    for token in split_cmdline(text):
        name, value = _unquote(token)
        problem = _problem(name, value)
        if problem:
            raise ValueError(problem)
        params.append(Param(name, value))
    return params


def parse_options_line(line: str) -> tuple[str, list[Param]]:
    """`nbd nbds_max=3 max_part=8` -> ("nbd", [...]); ValueError if it is bad."""
    module, _, rest = line.strip().partition(" ")
    if not _MODULE_NAME.fullmatch(module):
        raise ValueError(f"{line!r} does not start with a kernel module name")
    try:
        params = parse_options(rest)
    except ValueError as exc:
        raise ValueError(f"{module}: {exc}") from None
    if not params:
        raise ValueError(f"{line!r} names no parameter for {module}")
    return module, params


def check_options_line(line: str) -> str:
    """The settings' check of one `module_options` line (ValueError if it is bad)."""
    parse_options_line(line)
    return line


def from_cmdline(line: str, only: Iterable[str] | None = None) -> dict[str, list[Param]]:
    """`module.param[=value]` words of a kernel command line, by normalised module name
    (of the modules in `only`, when given).

    A word whose parameter is not a valid name or value is a UserError (the new /init
    would otherwise pass it on to insmod); words for other modules are not judged.
    """
    from archkernel.scaleway.cmdline import split_cmdline

    wanted = None if only is None else {normalize(m) for m in only}
    found: dict[str, list[Param]] = {}
    for token in split_cmdline(line):
        key, value = _unquote(token)
        module, dot, name = key.partition(".")
        if not dot or not name or not _MODULE_NAME.fullmatch(module):
            continue
        if wanted is not None and normalize(module) not in wanted:
            continue
        problem = _problem(name, value)
        if problem:
            raise UserError(
                f"the kernel command line's {token[:80]!r}: {problem}",
                "correct it on the command line (extra_cmdline, or the provider's)",
            )
        found.setdefault(normalize(module), []).append(Param(name, value))
    return found


def merge(*sources: Iterable[Param]) -> list[Param]:
    """One parameter per name (compared as the kernel does); a later source's value wins,
    each name keeps the place of its first appearance."""
    merged: dict[str, Param] = {}
    for source in sources:
        for param in source:
            merged[normalize(param.name)] = param
    return list(merged.values())


def for_modules(
    modules: Iterable[str], cmdline: str, options: Iterable[str]
) -> dict[str, list[Param]]:
    """The parameters of each module in `modules` (names as in modules.dep), from the
    `module_options` lines, then the command line; modules without any are left out."""
    modules = list(modules)
    line = from_cmdline(cmdline, modules)
    configured: dict[str, list[Param]] = {}
    for text in options:
        module, params = parse_options_line(text)
        configured.setdefault(normalize(module), []).extend(params)
    result = {}
    for module in modules:
        key = normalize(module)
        params = merge(configured.get(key, []), line.get(key, []))
        if params:
            result[module] = params
    return result


_PARMTYPE = re.compile(rb"(?:^|\0)parmtype=([A-Za-z0-9_.-]{1,64}):")


def declared(module: bytes) -> set[str]:
    """The parameters a module object declares (its .modinfo `parmtype=NAME:TYPE`
    strings), names normalised."""
    return {normalize(m.decode()) for m in _PARMTYPE.findall(module)}


def unknown(words: Iterable[str], module: bytes) -> list[str]:
    """The insmod words naming a parameter `module` does not declare: the kernel would
    ignore them with a warning (older kernels refuse the module)."""
    names = declared(module)
    return [w for w in words if normalize(w.split("=", 1)[0]) not in names]


def insmod_args(params: Iterable[Param]) -> list[str]:
    """The words after the module's path on its `insmod` line."""
    return [p.insmod_arg() for p in params]
