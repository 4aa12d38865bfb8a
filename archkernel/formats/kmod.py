"""Kernel module dependencies: which modules to insmod, in which order, for an initramfs.

`ModulesDep` reads what `depmod` wrote into `/usr/lib/modules/<version>/` and answers
"what must be loaded, in order, for these modules", the way kmod's `modprobe` (version 30)
does. Its rules, checked against `modprobe --show-depends`:

- `modules.dep` lists a module's whole dependency closure; kmod loads it reversed
  (deepest first), then the module.
- Every module in that sequence is preceded by its own `pre:` soft dependencies and
  followed by its `post:` ones. A soft dependency is loaded with its own dependencies and
  soft dependencies, and at most once per request.
- A module's `pre:` soft dependencies come *after* its hard dependencies, right before
  the module itself.
- Only the first `softdep` line matching a module counts (kmod ignores the rest).
- Soft dependency names are looked up like `modprobe` arguments: a module name first,
  then the patterns of `modules.alias` (every matching module, in `modules.alias`
  order: `crypto-crc32c` gives both `crc32c_intel` and `crc32c_generic`), then
  `modules.builtin`. Built-in modules need no insmod and produce nothing; names that
  resolve to nothing are skipped, as kmod does.

Every path in modules.dep must name a module file inside the module directory (relative,
no '..', a module name of letters, digits, '_' and '-'): the names end up in the initrd's
/init script, the paths are read from the module tree.

The host's `/etc/modprobe.d` is deliberately not consulted: the answer depends only on the
module directory, so it is the same on any build machine.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from archkernel.errors import UserError

ELF_MAGIC = b"\x7fELF"
MODULE_SUFFIXES = (".ko", ".ko.gz", ".ko.xz", ".ko.zst")

_GLOB_CHARS = re.compile(r"[*?\[]")
# What a module's name can be: the kernel's KBUILD_MODNAME is a C identifier made of the
# file name ('-' and ',' become '_'); the names here end up in shell scripts and paths.
_MODULE_NAME = re.compile(r"[A-Za-z0-9_-]+")
# A module path as depmod writes it: relative, no NUL, a module name and suffix at the end.
_MODULE_PATH = re.compile(r"(?:[^/\0]+/)*[A-Za-z0-9_-]+\.ko(?:\.gz|\.xz|\.zst)?")
# Work allowed, far above any real kernel's, so that a tangled index ends in bounded time:
# steps of one name's probe list (a module visited, placed or emitted), and wildcard
# softdep patterns tried in all (modules.softdep from depmod has no wildcards).
MAX_PROBE_STEPS = 1_000_000
MAX_PATTERN_TESTS = 1_000_000
_PROBE, _WITH_SOFT, _EMIT = range(3)  # the kinds of step of a probe list


def normalize(name: str) -> str:
    """A module name in kmod's canonical form: '-' and '_' are the same character."""
    return name.replace("-", "_")


def _normalize_alias(alias: str) -> str:
    """kmod's alias normalisation: '-' becomes '_' except inside [...] groups."""
    if "[" not in alias:  # most aliases: no group, so every '-'
        return alias.replace("-", "_")
    out: list[str] = []
    in_group = False
    for char in alias:
        if char == "[":
            in_group = True
        elif char == "]":
            in_group = False
        out.append("_" if char == "-" and not in_group else char)
    return "".join(out)


def module_name(relpath: str) -> str:
    """The module name of a module file path: 'kernel/fs/ext4/ext4.ko.zst' -> 'ext4'."""
    base = relpath.rsplit("/", 1)[-1]
    for suffix in sorted(MODULE_SUFFIXES, key=len, reverse=True):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return normalize(base)


def is_module_name(name: str) -> bool:
    """True if `name` can be a module's name: letters, digits, '_' and '-' only."""
    return _MODULE_NAME.fullmatch(name) is not None


def check_module_path(relpath: str, *, where: str = "modules.dep") -> str:
    """`relpath` if it can name a module file inside the module directory, else UserError.

    A module path is relative, has no '..', ends in a module suffix, and its module name
    is letters, digits, '_' and '-': the name goes into the initrd's /init script.
    """
    if _MODULE_PATH.fullmatch(relpath) and ".." not in relpath.split("/"):
        return relpath  # every real one: one pattern and one split
    problem = None
    if relpath.startswith("/"):
        problem = "is an absolute path"
    elif ".." in relpath.split("/"):
        problem = "has a '..' component"
    elif "\0" in relpath:
        problem = "has a NUL byte"
    elif not relpath.endswith(MODULE_SUFFIXES):
        problem = f"does not end in {', '.join(MODULE_SUFFIXES)}"
    elif not is_module_name(module_name(relpath)):
        problem = "is not a module name (letters, digits, '_' and '-' only)"
    if problem is None:
        return relpath
    raise UserError(
        f"{where} names the module file {relpath[:200]!r}, which {problem}",
        "modules.dep lists paths below the module directory such as "
        "kernel/fs/ext4/ext4.ko.zst; regenerate it with `depmod -b ROOT VERSION`",
    )


@dataclass(frozen=True)
class Softdep:
    """One `softdep` line: a module-name pattern and the names to load before and after."""

    pattern: str
    pre: tuple[str, ...]
    post: tuple[str, ...]


def parse_softdeps(text: str) -> list[Softdep]:
    """The `softdep` lines of a modprobe.d-style text (modules.softdep), in order.

    Names that follow neither `pre:` nor `post:` are ignored, as kmod ignores them.
    """
    softdeps: list[Softdep] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 2 or words[0] != "softdep":
            continue
        pre: list[str] = []
        post: list[str] = []
        current: list[str] | None = None
        for word in words[2:]:
            if word == "pre:":
                current = pre
            elif word == "post:":
                current = post
            elif current is not None:
                current.append(word)
        softdeps.append(Softdep(_normalize_alias(words[1]), tuple(pre), tuple(post)))
    return softdeps


def parse_aliases(text: str) -> list[tuple[str, str]]:
    """The (pattern, module name) pairs of a modules.alias text, in file order."""
    aliases: list[tuple[str, str]] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) == 3 and words[0] == "alias":
            aliases.append((_normalize_alias(words[1]), normalize(words[2])))
    return aliases


class ModulesDep:
    """A kernel's module index: paths, hard and soft dependencies, aliases, built-ins."""

    def __init__(
        self,
        paths: dict[str, str],
        deps: dict[str, tuple[str, ...]],
        softdeps: Sequence[Softdep] = (),
        aliases: Sequence[tuple[str, str]] = (),
        builtin: Iterable[str] = (),
        version: str = "",
    ) -> None:
        """Prefer `parse` or `load`; `paths` and `deps` are keyed by normalised name."""
        self.version = version
        self._paths = paths
        self._deps = deps
        self._softdeps = tuple(softdeps)
        self._builtin = frozenset(normalize(n) for n in builtin) - paths.keys()
        # Exact aliases are a dictionary look-up; only patterns need fnmatch, and only
        # when the name starts with the pattern's literal prefix (compiling all ~20000
        # patterns of a distribution kernel takes seconds). The rank is the module's
        # position in modules.alias, which is kmod's order for several matches.
        self._exact_aliases: dict[str, list[tuple[int, str]]] = {}
        self._glob_aliases: list[tuple[str, int, str, str]] = []
        priority: dict[str, int] = {}
        for pattern, module in aliases:
            rank = priority.setdefault(module, len(priority))
            wildcard = _GLOB_CHARS.search(pattern)
            if wildcard:
                prefix = pattern[: wildcard.start()]
                self._glob_aliases.append((prefix, rank, pattern, module))
            else:
                self._exact_aliases.setdefault(pattern, []).append((rank, module))
        self._lookups: dict[str, tuple[str, ...]] = {}
        self._softdep_cache: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
        # Softdep lines as aliases: the first line of each literal pattern by name, the
        # patterns with wildcards (few, usually none) tried in order after their prefix.
        self._exact_softdeps: dict[str, int] = {}
        self._glob_softdeps: list[tuple[int, str, str]] = []
        for index, softdep in enumerate(self._softdeps):
            wildcard = _GLOB_CHARS.search(softdep.pattern)
            if wildcard:
                prefix = softdep.pattern[: wildcard.start()]
                self._glob_softdeps.append((index, prefix, softdep.pattern))
            else:
                self._exact_softdeps.setdefault(softdep.pattern, index)
        self._pattern_tests = 0

    @classmethod
    def parse(
        cls,
        dep_text: str,
        softdep_text: str = "",
        builtin_text: str = "",
        *,
        alias_text: str = "",
        version: str = "",
    ) -> ModulesDep:
        """Build from the texts of modules.dep, .softdep, .builtin and .alias (pure).

        `version` only names the kernel in error messages.
        """
        where = f"{version}'s modules.dep" if version else "modules.dep"
        paths: dict[str, str] = {}
        deps: dict[str, tuple[str, ...]] = {}
        for number, line in enumerate(dep_text.splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            path, colon, rest = line.partition(":")
            path = path.strip()
            if not colon or not path:
                raise UserError(
                    f"{where} line {number} is not 'module: dependencies': {line[:80]!r}",
                    "regenerate the index with `depmod -b ROOT VERSION`",
                )
            line_deps = tuple(rest.split())
            for relpath in (path, *line_deps):
                check_module_path(relpath, where=f"{where} line {number}")
            name = module_name(path)
            if name in paths:  # depmod writes one line per name; keep the first like kmod
                continue
            paths[name] = path
            deps[name] = line_deps
        builtin = [module_name(line.strip()) for line in builtin_text.splitlines() if line.strip()]
        return cls(
            paths,
            deps,
            parse_softdeps(softdep_text),
            parse_aliases(alias_text),
            builtin,
            version,
        )

    @classmethod
    def load(cls, moddir: Path) -> ModulesDep:
        """Read the index depmod wrote in `moddir` (`.../lib/modules/<version>`).

        modules.dep is required; modules.softdep, modules.alias and modules.builtin are
        read when present.
        """
        moddir = Path(moddir)
        version = moddir.name
        texts: dict[str, str] = {}
        for name in ("modules.dep", "modules.softdep", "modules.alias", "modules.builtin"):
            try:
                texts[name] = (moddir / name).read_text(encoding="utf-8", errors="replace")
            except FileNotFoundError:
                if name == "modules.dep":
                    raise UserError(
                        f"{moddir / name} does not exist",
                        f"generate it with `depmod -b {_root_of(moddir)} {version}`",
                    ) from None
                texts[name] = ""
            except OSError as exc:
                raise UserError(
                    f"cannot read {moddir / name}: {exc.strerror}",
                    "check the path and its permissions",
                ) from exc
        return cls.parse(
            texts["modules.dep"],
            texts["modules.softdep"],
            texts["modules.builtin"],
            alias_text=texts["modules.alias"],
            version=version,
        )

    def names(self) -> list[str]:
        """Every loadable module's name, sorted."""
        return sorted(self._paths)

    def is_builtin(self, name: str) -> bool:
        """True if `name` is compiled into the kernel (nothing to insmod)."""
        return normalize(name) in self._builtin

    def path(self, name: str) -> str:
        """The module's file, relative to the module directory."""
        try:
            return self._paths[normalize(name)]
        except KeyError:
            raise self._missing_error([name]) from None

    def suggest(self, name: str, count: int = 5) -> list[str]:
        """The existing module names closest to `name`, best first, for error messages."""
        candidates = list(self._paths) + sorted(self._builtin)
        return difflib.get_close_matches(normalize(name), candidates, n=count, cutoff=0.6)

    def lookup(self, name: str) -> list[str]:
        """What `modprobe NAME` would load: module names, built-in ones included.

        Same order as kmod: a module of that name, else every module with a matching
        alias, else a built-in of that name; [] if nothing matches.
        """
        key = _normalize_alias(name)
        cached = self._lookups.get(key)
        if cached is None:
            cached = tuple(self._lookup(key))
            self._lookups[key] = cached
        return list(cached)

    def _lookup(self, key: str) -> list[str]:
        if key in self._paths:
            return [key]
        matches = list(self._exact_aliases.get(key, []))
        matches += [
            (rank, module)
            for prefix, rank, pattern, module in self._glob_aliases
            if key.startswith(prefix) and fnmatchcase(key, pattern)
        ]
        if matches:
            matches.sort(key=lambda m: m[0])
            return list(dict.fromkeys(mod for _, mod in matches))
        if key in self._builtin:
            return [key]
        return []

    def _softdep_of(self, name: str) -> Softdep | None:
        """The first softdep line whose pattern matches `name` (kmod uses only that one)."""
        first = self._exact_softdeps.get(name)
        for index, prefix, pattern in self._glob_softdeps:
            if first is not None and index > first:
                break
            if name.startswith(prefix):
                self._pattern_tests += 1
                if self._pattern_tests > MAX_PATTERN_TESTS:
                    raise self._tangled_error(name)
                if fnmatchcase(name, pattern):
                    first = index
                    break
        return None if first is None else self._softdeps[first]

    def _soft(self, name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The (pre, post) soft dependencies of module `name`, resolved to module names."""
        cached = self._softdep_cache.get(name)
        if cached is not None:
            return cached
        result: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
        softdep = self._softdep_of(name)
        if softdep is not None:
            pre = tuple(m for n in softdep.pre for m in self.lookup(n))
            post = tuple(m for n in softdep.post for m in self.lookup(n))
            result = (pre, post)
        self._softdep_cache[name] = result
        return result

    def _probe_order(self, name: str) -> list[str]:
        """kmod's probe list for one module, duplicates included, built-ins skipped.

        kmod recurses: probing a module probes its dependencies, each preceded by its
        `pre:` and followed by its `post:` soft dependencies, each probed the same way.
        Here that is a loop over a stack of what is left to do (a chain of soft
        dependencies as long as the module list must not exhaust Python's stack), of at
        most MAX_PROBE_STEPS steps.
        """
        order: list[str] = []
        visited: set[str] = set()
        # (what, module): _PROBE a module and its dependencies once; _WITH_SOFT a module
        # with its soft dependencies around it; _EMIT a module into the order.
        todo: list[tuple[int, str]] = [(_PROBE, name)]
        steps = 0
        while todo:
            steps += 1
            if steps > MAX_PROBE_STEPS:
                raise self._tangled_error(name)
            what, module = todo.pop()
            if what == _PROBE:
                if module in visited:
                    continue
                visited.add(module)
                # Pushed in reverse: the deepest dependency is done first, the module last.
                todo.append((_WITH_SOFT, module))
                todo.extend((_WITH_SOFT, module_name(dep)) for dep in self._deps.get(module, ()))
            elif what == _WITH_SOFT:
                pre, post = self._soft(module)
                todo.extend((_PROBE, soft) for soft in reversed(post))
                todo.append((_EMIT, module))
                todo.extend((_PROBE, soft) for soft in reversed(pre))
            elif module not in self._builtin:
                order.append(module)
        return order

    def _tangled_error(self, name: str) -> UserError:
        where = f"{self.version}'s modules.softdep" if self.version else "modules.softdep"
        return UserError(
            f"resolving module '{name}' takes too much work: "
            f"{where} or modules.dep is tangled beyond any real kernel's",
            "regenerate the index with `depmod -b ROOT VERSION`; check the kernel package",
        )

    def resolve(
        self, required: Sequence[str], optional: Sequence[str] = ()
    ) -> tuple[list[str], list[str]]:
        """Module paths to insmod, in order, for `required` then `optional` names.

        The order is `modprobe --show-depends` for each name in turn, with repeats
        dropped. Raises UserError listing every missing required name; returns the
        optional names that do not exist so the caller can warn about them.
        """
        missing = [n for n in required if not self.lookup(n)]
        if missing:
            raise self._missing_error(missing)
        missing_optional = [n for n in optional if not self.lookup(n)]
        order: dict[str, None] = {}
        for name in [*required, *optional]:
            for module in self.lookup(name):
                for dep in self._probe_order(module):
                    order.setdefault(self._path_of(dep), None)
        return list(order), missing_optional

    def closure(self, names: Sequence[str]) -> list[str]:
        """Module paths to insmod, in order, so that every one of `names` is loaded.

        Exactly the `insmod` lines `modprobe --show-depends` prints for each name in
        turn, first occurrences kept; built-in modules produce nothing. Every name must
        exist (see `resolve` for optional ones).
        """
        return self.resolve(names)[0]

    def _path_of(self, name: str) -> str:
        path = self._paths.get(name)
        if path is not None:
            return path
        # A dependency listed in modules.dep without a line of its own: find its path in
        # the lines that mention it.
        for deps in self._deps.values():
            for dep in deps:
                if module_name(dep) == name:
                    return dep
        raise self._missing_error([name])

    def _missing_error(self, names: Sequence[str]) -> UserError:
        where = f"{self.version}'s modules.dep" if self.version else "modules.dep"
        closest = {name: ", ".join(self.suggest(name)) for name in names}
        if len(names) == 1:
            name = names[0]
            message = f"module '{name}' is not in {where}"
            if closest[name]:
                message += f"; closest: {closest[name]}"
        else:
            parts = [f"'{n}'" + (f" (closest: {closest[n]})" if closest[n] else "") for n in names]
            message = f"modules {', '.join(parts)} are not in {where}"
        return UserError(
            message,
            "check the spelling; the kernel may not build this driver, or build it in "
            "(see modules.builtin)",
        )


def _root_of(moddir: Path) -> str:
    """The depmod -b root for a module directory `.../[usr/]lib/modules/<version>`."""
    parts = moddir.parts
    if len(parts) >= 3 and parts[-3:-1] == ("lib", "modules"):
        root = moddir.parents[2]
        if root.name == "usr":
            root = root.parent
        return str(root)
    return "ROOT"


__all__ = [
    "ELF_MAGIC",
    "MAX_PROBE_STEPS",
    "MODULE_SUFFIXES",
    "ModulesDep",
    "Softdep",
    "check_module_path",
    "is_module_name",
    "module_name",
    "normalize",
    "parse_aliases",
    "parse_softdeps",
]
