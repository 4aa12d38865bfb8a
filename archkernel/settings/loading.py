"""Loading the settings: find the file, read it, apply environment overrides, validate.

Where the file comes from, first match wins: `archkernel --settings PATH`, `doit ...
settings=PATH`, `$ARCHKERNEL_SETTINGS`, `./settings.toml`, otherwise built-in defaults.
Any key can then be overridden as `ARCHKERNEL_<SECTION>__<KEY>` (`ARCHKERNEL_WORKDIR` at the
top level). All problems are reported at once, one line each.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from archkernel.errors import UserError
from archkernel.settings.cache import cache_key, read_cache
from archkernel.settings.display import section_keys
from archkernel.settings.schema import Settings

if TYPE_CHECKING:
    from pydantic import ValidationError

ENV_PREFIX = "ARCHKERNEL_"
ENV_SETTINGS = "ARCHKERNEL_SETTINGS"
# Variables of the program itself, not settings overrides.
RESERVED_ENV = {
    ENV_SETTINGS,
    "ARCHKERNEL_VERBOSE",
    "ARCHKERNEL_EXTRA_WORKFLOWS",
    "ARCHKERNEL_AUDIT_SETTINGS",
    "ARCHKERNEL_TEST_CACHE",
    "ARCHKERNEL_RUN",  # archkernel.host.run.RUN_VARIABLE: in every command archkernel runs
}
DEFAULT_FILE = "settings.toml"
# The reproducible-builds.org variable: the default of build.source_date_epoch.
ENV_EPOCH = "SOURCE_DATE_EPOCH"
EPOCH_KEY = ["build", "source_date_epoch"]
# Settings nest four levels at most (`azure.user.ssh_authorized_keys` and its items). The TOML
# parser, pydantic and repr() recurse once per level, so far deeper input (500 `[`) would
# end in RecursionError: it is refused first, as a settings error.
MAX_NESTING = 32
T = TypeVar("T")

_FIX_HINT = "fix the values above; settings.toml.example lists every key with its default"
_ADAPTERS: dict[type, Any] = {}  # pydantic's validator of each section, built on first use


def validate(cls: type[T], data: Mapping[str, Any]) -> T:
    """`data` (as read from TOML) checked and converted into a `cls` section.

    Raises pydantic's ValidationError listing every problem.
    """
    from pydantic import TypeAdapter

    adapter = _ADAPTERS.get(cls)
    if adapter is None:
        adapter = _ADAPTERS[cls] = TypeAdapter(cls)
    result: T = adapter.validate_python(data)
    return result


@dataclass
class Loaded:
    """Effective settings plus where they, and each value, came from."""

    settings: Settings
    path: Path | None
    path_origin: str
    origins: dict[str, str] = field(default_factory=dict)
    base_dir: Path = field(default_factory=Path.cwd)
    from_cache: bool = False  # validated by an earlier run with the same inputs
    cache_key: str = ""  # what `remember` files the validated settings under


def find_settings_file(
    cli_path: str | os.PathLike[str] | None,
    doit_var: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> tuple[Path | None, str]:
    """Pick the settings file.

    First match wins: --settings, doit's settings=, $ARCHKERNEL_SETTINGS, ./settings.toml.
    """
    env = os.environ if env is None else env
    cwd = Path.cwd() if cwd is None else cwd
    if cli_path:
        return Path(cli_path), "--settings"
    if doit_var:
        return Path(doit_var), "doit settings="
    if env.get(ENV_SETTINGS):
        return Path(env[ENV_SETTINGS]), f"${ENV_SETTINGS}"
    if (cwd / DEFAULT_FILE).is_file():
        return cwd / DEFAULT_FILE, f"./{DEFAULT_FILE}"
    return None, "built-in defaults"


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(
            f"settings file {path} does not exist",
            "create it from settings.toml.example, or point --settings at an existing file",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read settings file {path}: {exc}") from None


def _parse_toml(path: Path, text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(
            f"{path}: TOML syntax error: {exc}",
            "fix the line and column named above; settings.toml.example shows the syntax",
        ) from None
    except RecursionError:
        raise UserError(
            f"invalid settings ({path}):\n  lists or tables nested more than {MAX_NESTING} "
            "levels deep",
            _FIX_HINT,
        ) from None


def _env_value(raw: str, key: str, var: str) -> Any:
    if raw[:1] in "[{":
        try:
            return tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            return raw
        except RecursionError:
            raise UserError(
                f"invalid settings (the environment):\n  {key}: lists or tables nested more "
                f"than {MAX_NESTING} levels deep (set by {var})",
                "fix or unset the variables named above",
            ) from None
    return raw


def _deepest(data: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The key path of a value nested more than MAX_NESTING levels deep in `data`, if
    any (walked without recursion: the input may be as deep as the parser allowed)."""
    todo: list[tuple[tuple[str, ...], Any]] = [((), data)]
    while todo:
        loc, value = todo.pop()
        if len(loc) > MAX_NESTING:
            return loc
        if isinstance(value, Mapping):
            todo += [((*loc, str(k)), v) for k, v in value.items()]
        elif isinstance(value, list):
            todo += [((*loc, str(i)), v) for i, v in enumerate(value)]
    return None


def _check_nesting(data: Mapping[str, Any], path: Path | None, origins: Mapping[str, str]) -> None:
    loc = _deepest(data)
    if loc is None:
        return
    # Name the setting (its keys before the first list index), not 33 levels of it.
    keys = loc[: next((i for i, k in enumerate(loc) if k.isdigit()), len(loc))]
    named = ".".join(keys[:3]) or "the top level"
    origin = _origin(loc, origins) or ""
    if origin.startswith("env "):
        source, credit = "the environment", f" (set by {origin.removeprefix('env ')})"
        hint = "fix or unset the variables named above"
    else:
        source, credit, hint = f"{path}", "", _FIX_HINT
    raise UserError(
        f"invalid settings ({source}):\n  {named}: lists or tables nested more than "
        f"{MAX_NESTING} levels deep{credit}",
        hint,
    )


def _env_overrides(env: Mapping[str, str]) -> Iterator[tuple[list[str], Any, str]]:
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or name in RESERVED_ENV:
            continue
        keys = [k.lower() for k in name[len(ENV_PREFIX) :].split("__")]
        if all(keys):
            yield keys, _env_value(env[name], ".".join(keys), name), name


def _source_date_epoch(
    data: Mapping[str, Any], overrides: list[tuple[list[str], Any, str]], env: Mapping[str, str]
) -> list[tuple[list[str], Any, str]]:
    """SOURCE_DATE_EPOCH (reproducible-builds.org) as the override of build.source_date_epoch
    when neither the file nor ARCHKERNEL_BUILD__SOURCE_DATE_EPOCH sets that key."""
    value = env.get(ENV_EPOCH, "")
    section = data.get("build")
    in_file = isinstance(section, Mapping) and "source_date_epoch" in section
    if not value or in_file or any(keys == EPOCH_KEY for keys, _, _ in overrides):
        return []
    return [(list(EPOCH_KEY), value, ENV_EPOCH)]


def _flatten(data: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and key in ("build", "scaleway", "azure", "user", "publish"):
            yield from _flatten(value, dotted + ".")
        else:
            yield dotted


def _origin(loc: tuple[str, ...], origins: Mapping[str, str]) -> str | None:
    """What set the value at `loc` (`file ...`, `env VAR`): the origin of `loc` or of its
    nearest parent key, else of a key under it (an unknown section set from the
    environment)."""
    for end in range(len(loc), 0, -1):
        origin = origins.get(".".join(loc[:end]))
        if origin is not None:
            return origin
    prefix = ".".join(loc) + "."
    under = [origin for key, origin in origins.items() if key.startswith(prefix)]
    return next((o for o in under if o.startswith("env ")), under[0] if under else None)


def _known_key(loc: tuple[str, ...]) -> tuple[str, str, bool] | None:
    """For an unknown key at `loc`: (section, key) of the key meant, and whether it is the
    same name in another section; None when nothing is close."""
    import difflib

    *parents, name = loc
    here = ".".join(parents)
    sections = section_keys()
    for section, keys in sections.items():
        if name in keys and section != here:
            return section, name, True
    # The section the key is in first, then the others.
    for section in [here, *(s for s in sections if s != here)]:
        close = difflib.get_close_matches(name, sections.get(section, []), n=1)
        if close:
            return section, close[0], False
    return None


def _unknown_key(loc: tuple[str, ...], env_var: str | None) -> str:
    """Advice for an unknown key: the section it belongs in, or the closest known key
    (as a variable name when the environment set it)."""
    known = _known_key(loc)
    if known is None:
        return "see settings.toml.example for the keys"
    section, key, moved = known
    path = [*section.split("."), key] if section else [key]
    if env_var is not None:
        # The variable with the wrong part of its name put right.
        rest = env_var.removeprefix(ENV_PREFIX).split("__")[len(loc) :]
        return f"did you mean {ENV_PREFIX}{'__'.join([*path, *rest]).upper()}?"
    if ".".join(path) in section_keys():
        return f"did you mean [{'.'.join(path)}]?"
    if moved:
        where = f"[{section}]" if section else "the top level, before any [section]"
        return f"{key} belongs in {where}"
    if section == ".".join(loc[:-1]):
        return f"did you mean {key}?"
    return f"did you mean {key} in [{section}]?" if section else f"did you mean top-level {key}?"


def _list_advice(value: object, env_var: str) -> str:
    """How to write a list in an environment override: TOML/JSON syntax."""
    import json
    import re

    items = [i for i in re.split(r"[\s,]+", str(value).strip("[]")) if i]
    items = [i.strip("'\"") for i in items] or ["a", "b"]
    return f"a list from the environment takes TOML/JSON syntax: {env_var}='{json.dumps(items)}'"


def _format_errors(
    exc: ValidationError, path: Path | None, origins: Mapping[str, str] | None = None
) -> str:
    """One line per problem, each credited to the environment variable that set it."""
    origins = origins or {}
    lines = []
    from_file = from_env = False
    for err in exc.errors():
        loc_parts = tuple(str(p) for p in err["loc"])
        loc = ".".join(loc_parts)
        kind = err["type"]
        value = err.get("input")
        origin = _origin(loc_parts, origins) or ""
        env_var = origin.removeprefix("env ") if origin.startswith("env ") else None
        from_env = from_env or env_var is not None
        from_file = from_file or env_var is None
        set_by = f" (set by {env_var})" if env_var else ""
        if kind in ("extra_forbidden", "unexpected_keyword_argument"):
            advice = _unknown_key(loc_parts, env_var)
            lines.append(f"{loc}: unknown key (typo?); {advice}{set_by}")
            continue
        if kind == "missing":
            lines.append(f"{loc}: required key is missing")
            continue
        msg = err["msg"].removeprefix("Value error, ")
        shown = "****" if "password" in loc else repr(value)
        if kind == "value_error" and msg.startswith(("'", '"')):
            line = f"{loc}: {msg}"
        elif kind == "value_error" and isinstance(value, dict):
            line = f"{loc}: {msg}"  # a rule across keys: the message names them
        elif kind == "value_error":
            line = f"{loc}: {shown} {msg}"
        else:
            line = f"{loc}: {shown} is not valid: {msg[:1].lower() + msg[1:]}"
        if env_var and kind == "list_type":
            line += f"; {_list_advice(value, env_var)}"
        lines.append(line + set_by)
    if from_env and not from_file:
        source = "the environment"
    elif path is None:
        source = "defaults and environment"
    else:
        source = f"{path} and the environment" if from_env else f"{path}"
    return f"invalid settings ({source}):\n" + "\n".join(f"  {line}" for line in lines)


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Make relative file paths relative to the settings file's directory."""

    def fix(section: dict[str, Any], key: str) -> None:
        value = section.get(key)
        if isinstance(value, str) and value and "\0" not in value and "\n" not in value:
            section[key] = str((base / value) if not os.path.isabs(value) else Path(value))

    fix(data, "workdir")
    if isinstance(data.get("azure"), dict):
        fix(data["azure"], "pacman_conf")
        fix(data["azure"], "package_cache")
    if isinstance(data.get("scaleway"), dict):
        fix(data["scaleway"], "root")


def load(
    cli_path: str | os.PathLike[str] | None = None,
    *,
    doit_var: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    cache: bool = False,
) -> Loaded:
    """Find, read, override from the environment and validate the settings.

    With `cache`, values validated by an earlier run from the same file text, environment
    overrides and directory are taken from the workdir's cache (see `remember`).
    """
    env = os.environ if env is None else env
    cwd = Path.cwd() if cwd is None else cwd
    path, how = find_settings_file(cli_path, doit_var, env, cwd)
    data: dict[str, Any] = {}
    origins: dict[str, str] = {}
    text = ""
    if path is not None:
        path = (cwd / path) if not path.is_absolute() else path
        text = _read_text(path)
        data = _parse_toml(path, text)
        _check_nesting(data, path, {})
        for key in _flatten(data):
            origins[key] = f"file {path}"
    base = path.parent if path is not None else cwd
    overrides = list(_env_overrides(env))
    overrides += _source_date_epoch(data, overrides, env)
    for keys, value, var in overrides:
        node = data
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise UserError(f"{var}: {'.'.join(keys[:-1])} is not a section")
            node = child
        node[keys[-1]] = value
        origins[".".join(keys)] = f"env {var}"
    _check_nesting(data, path, origins)  # again, with the environment's values
    _resolve_paths(data, base)
    data.setdefault("workdir", str(base / "build"))
    key = ""
    if cache:
        key = cache_key(path, text, [(var, env[var]) for _, _, var in overrides], base)
        cached = read_cache(data["workdir"], key) if key else None
        if cached is not None:
            return Loaded(cached, path, how, origins, base, from_cache=True, cache_key=key)
    from pydantic import ValidationError

    try:
        settings = validate(Settings, data)
    except ValidationError as exc:
        message = _format_errors(exc, path, origins)
        hint = _FIX_HINT
        if message.startswith("invalid settings (the environment)"):
            hint = "fix or unset the variables named above"
        raise UserError(message, hint) from None
    return Loaded(settings, path, how, origins, base, cache_key=key)
