"""Settings: typed sections, one TOML file, environment overrides, and where each value came from.

Where the file comes from, first match wins: `archkernel --settings PATH`, `doit ...
settings=PATH`, `$ARCHKERNEL_SETTINGS`, `./settings.toml`, otherwise built-in defaults.
Any key can then be overridden as `ARCHKERNEL_<SECTION>__<KEY>` (`ARCHKERNEL_WORKDIR` at the
top level). Every value that ends up in a file or on a command line is validated here, and
all problems are reported at once, one line each.

The sections are frozen standard dataclasses; pydantic validates the raw TOML into them,
reading the `Annotated` checks below. pydantic is imported only when something is
validated: `archkernel run` keeps the validated values in the workdir
(`.settings-cache.json`, keyed by the file's text, the environment, and the versions of
this module, pydantic and Python), so the boot-time Scaleway run, whose settings never
change, does not pay for building validators.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import sys
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, TypeVar, get_type_hints

from archkernel import __version__
from archkernel.errors import UserError
from archkernel.host.files import write_text

if TYPE_CHECKING:
    from pydantic import ValidationError

ENV_PREFIX = "ARCHKERNEL_"
ENV_SETTINGS = "ARCHKERNEL_SETTINGS"
# Variables of the program itself, not settings overrides.
RESERVED_ENV = {
    ENV_SETTINGS,
    "ARCHKERNEL_VERBOSE",
    "ARCHKERNEL_EXTRA_WORKFLOWS",
    "ARCHKERNEL_TEST_CACHE",
}
DEFAULT_FILE = "settings.toml"
CACHE_FILE = ".settings-cache.json"
MiB = 1 << 20
GiB = 1 << 30
T = TypeVar("T")


# --- checks pydantic applies (read from `Annotated` metadata when it builds a validator) ----


class Check:
    """Run `func` on a value after pydantic has checked its type (before it, with `before`).

    `func` returns the value (possibly converted) or raises ValueError with a message that
    names the problem; it becomes one line of the settings error.
    """

    __slots__ = ("before", "func")

    def __init__(self, func: Callable[[Any], Any], *, before: bool = False) -> None:
        self.func = func
        self.before = before

    def __get_pydantic_core_schema__(self, source: Any, handler: Callable[[Any], Any]) -> Any:
        from pydantic_core import core_schema

        if self.before:
            return core_schema.no_info_before_validator_function(self.func, handler(source))
        return core_schema.no_info_after_validator_function(self.func, handler(source))


class Bounds:
    """Numeric bounds (`ge`, `le`, `gt`) for an int or float setting."""

    __slots__ = ("bounds",)

    def __init__(self, **bounds: float) -> None:
        self.bounds = bounds

    def __get_pydantic_core_schema__(self, source: Any, handler: Callable[[Any], Any]) -> Any:
        return {**handler(source), **self.bounds}


class Secret:
    """A secret string: shown as `**********`, digested in doit's state, never cached."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    def __str__(self) -> str:
        return "**********"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Callable[[Any], Any]) -> Any:
        from pydantic_core import core_schema

        return core_schema.no_info_after_validator_function(cls, core_schema.str_schema())


# --- validated scalar types --------------------------------------------------------------


def _text(value: str) -> str:
    if "\n" in value or "\r" in value or "\0" in value:
        raise ValueError("must be a single line without NUL characters")
    return value


def _size(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size; write e.g. 30GiB or 30720MiB")
    if isinstance(value, int):
        return value
    text = str(value)
    m = re.fullmatch(r"\s*(\d+)\s*(MiB|GiB)\s*", text)
    if not m:
        raise ValueError(f"{text!r} is not a size; write e.g. 30GiB or 30720MiB")
    return int(m.group(1)) * (GiB if m.group(2) == "GiB" else MiB)


def format_size(size: int) -> str:
    """Bytes as the settings file writes them: `30GiB`, `3072MiB`."""
    if size % GiB == 0:
        return f"{size // GiB}GiB"
    if size % MiB == 0:
        return f"{size // MiB}MiB"
    return str(size)


def _pattern(regex: str, what: str) -> Check:
    # Compiled on first use (re caches it): importing this module compiles nothing.
    def check(value: str) -> str:
        _text(value)
        if not re.fullmatch(regex, value):
            raise ValueError(f"{value!r} is not {what}")
        return value

    return Check(check)


def _hostname(value: str) -> str:
    _text(value)
    labels = value.split(".")
    ok = len(value) <= 253 and all(
        re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", label) for label in labels
    )
    if not ok:
        raise ValueError(
            f"{value!r} is not a valid host name (RFC 1123: letters, digits and '-', "
            "labels of 1-63 characters not starting or ending with '-')"
        )
    return value


def _ipv4(value: str) -> str:
    import ipaddress

    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 address") from None
    return value


def _relative_name(value: str) -> str:
    _text(value)
    if not value or value.startswith("/") or ".." in value.split("/"):
        raise ValueError(f"{value!r} must be a relative path without '..'")
    return value


def _system_path(value: str) -> str:
    _text(value)
    if not value.startswith("/") or ".." in value.split("/"):
        raise ValueError(f"{value!r} must be an absolute path without '..'")
    return value


def _path_text(value: Path) -> Path:
    _text(str(value))
    return value


def _cmdline(value: str) -> str:
    _text(value)
    bad = sorted(set(value) & set("\"'`$;\\{}<>|&"))
    if bad or not value.isprintable():
        raise ValueError(
            f"{value!r} may hold only printable characters without quotes or shell/GRUB "
            f"metacharacters (found {''.join(bad) or 'non-printable characters'})"
        )
    return value


def _password_hash(value: Secret) -> Secret:
    raw = value.get_secret_value()
    if not re.fullmatch(r"\$(1|5|6|y|gy|2[abxy]|7)\$[./A-Za-z0-9$=,]+", raw):
        raise ValueError(
            "is not a crypt(3) password hash; make one with `openssl passwd -6` or `mkpasswd`"
        )
    return value


def _azure_disk_size(value: int) -> int:
    if value % MiB:
        raise ValueError(f"'{value}' bytes is not a whole number of MiB (Azure requires it)")
    if value > 1023 * GiB:
        raise ValueError(f"'{format_size(value)}' is larger than Azure's 1023GiB")
    if value < 64 * MiB:
        raise ValueError(f"'{format_size(value)}' is too small; use at least 64MiB")
    return value


Text = Annotated[str, Check(_text)]
HostName = Annotated[str, Check(_hostname)]
IPv4 = Annotated[str, Check(_ipv4)]
UserName = Annotated[
    str,
    _pattern(r"[a-z_][a-z0-9_-]{0,30}\$?", "a valid user name (useradd: lower case, digits, _ -)"),
]
PackageName = Annotated[
    str,
    _pattern(r"[a-z0-9@_+][a-z0-9@._+-]{0,127}", "a valid pacman package name"),
]
ModuleName = Annotated[str, _pattern(r"[A-Za-z0-9_-]{1,64}", "a kernel module name")]
Locale = Annotated[
    str, _pattern(r"[A-Za-z]{2,3}(_[A-Za-z]{2})?(\.[A-Za-z0-9-]+)?(@\w+)?|C|POSIX", "a locale")
]
TimeZone = Annotated[
    str,
    _pattern(r"[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+)*", "a time zone such as Europe/Paris"),
]
Keymap = Annotated[str, _pattern(r"[A-Za-z0-9_.-]{1,64}", "a console keymap name such as us")]
Tag = Annotated[str, _pattern(r"[A-Za-z0-9_.:=-]{1,128}", "a tag name")]
MirrorURL = Annotated[
    str,
    _pattern(r"(https?|ftp|file)://[A-Za-z0-9._~:/?#@!*+,=%$-]+", "an http(s), ftp or file URL"),
]
SSHKey = Annotated[
    str,
    _pattern(
        r"(ssh-(rsa|ed25519|dss)|ecdsa-sha2-nistp(256|384|521)|sk-[a-z0-9@.-]+) "
        r"[A-Za-z0-9+/]+={0,3}( [^\n\r\0]*)?",
        "an SSH public key line (type, base64 key, optional comment)",
    ),
]
SHA256 = Annotated[str, _pattern(r"[0-9a-f]{64}", "a SHA-256 hex digest")]
RelativeName = Annotated[str, Check(_relative_name)]
SystemPath = Annotated[str, Check(_system_path)]
Cmdline = Annotated[str, Check(_cmdline)]
FileName = Annotated[
    str, _pattern(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}", "a plain file name (no directories)")
]
OneLinePath = Annotated[Path, Check(_path_text)]
DiskSize = Annotated[int, Check(_size, before=True), Check(_azure_disk_size)]
# A crypt(3) hash such as `$6$salt$...` or `$y$...`; never a plain password.
PasswordHash = Annotated[Secret, Check(_password_hash)]


def setting(default: Any, doc: str) -> Any:
    """A settings field: its default and the description `settings.toml.example` shows."""
    if isinstance(default, list):
        return field(default_factory=default.copy, metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


def required(doc: str) -> Any:
    """A settings field without a default."""
    return field(metadata={"doc": doc})


class Section:
    """Base of every settings section: unknown keys are errors, defaults are validated too.

    A section built directly (`AzureSettings(generation=2)`) is not validated, only its
    rules across keys are checked: values from users go through `validate` (or `load`).
    """

    __pydantic_config__: ClassVar[dict[str, Any]] = {"extra": "forbid", "validate_default": True}
    __dataclass_fields__: ClassVar[dict[str, Any]]  # every section is a dataclass


# --- sections -----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ScalewaySettings(Section):
    """`[scaleway]`: boot the Arch kernel on a Scaleway C1 by kexec."""

    root: OneLinePath = setting(Path("/"), "the system every path below is taken under")
    tftp_server: IPv4 | None = setting(
        None, "TFTP server; default: the bootserver line of /proc/net/pnp"
    )
    fallback_tftp_server: IPv4 = setting("10.1.31.34", "used when pnp names none")
    tftp_port: Annotated[int, Bounds(ge=1, le=65535)] = setting(69, "TFTP port")
    tftp_timeout: Annotated[float, Bounds(gt=0, le=300)] = setting(
        5.0, "seconds to wait for a packet"
    )
    tftp_retries: Annotated[int, Bounds(ge=0, le=20)] = setting(3, "retries after a timeout")
    tftp_blksize: Annotated[int, Bounds(ge=8, le=65464)] = setting(
        1468, "TFTP block size (RFC 2348)"
    )
    bootscript: RelativeName = setting("uboot.bootscript", "bootscript name on TFTP")
    kernel: SystemPath = setting("/boot/zImage", "the Arch kernel to kexec")
    kernel_version: Text | None = setting(None, "default: found from /usr/lib/modules/*/pkgbase")
    modules: list[ModuleName] = setting(
        ["mvneta", "nbd"], "modules added to the initrd, with their dependencies"
    )
    optional_modules: list[ModuleName] = setting(
        ["mvneta_bm"], "added when the kernel has them; a warning otherwise"
    )
    output_initrd: SystemPath = setting(
        "/boot/initramfs-archkernel.img", "where the patched initrd is written"
    )
    compression: Literal["gzip", "xz", "zstd", "lz4", "none"] = setting(
        "gzip", "compression of the added archive"
    )
    extra_cmdline: Cmdline = setting(
        "is_in_kexec=yes NO_SIGNAL_STATE=1 DONT_FETCH_KERNEL_MODULES=1 NO_NTPDATE=1 archkernel",
        "appended to the current command line",
    )
    dtb: SystemPath | None = setting(None, "device tree for kexec --dtb (optional)")
    disable_tag: Tag = setting("archkernel_disabled", "server tag that disables us")


@dataclass(frozen=True, kw_only=True)
class AzureUser(Section):
    """`[azure.user]`: an administrator created at build time (root stays locked)."""

    name: UserName = required("login name; member of wheel")
    ssh_authorized_keys: list[SSHKey] = setting([], "public keys for ~/.ssh")
    password_hash: PasswordHash | None = setting(None, "crypt(3) hash; omit for key-only login")


DEFAULT_PACKAGES = [
    "base",
    "linux",
    "mkinitcpio",
    "grub",
    "openssh",
    "sudo",
    "cloud-init",
    "python",
    "which",
    "less",
    "vim",
]
DEFAULT_KEYRING = Path("/usr/share/keyrings/archlinux.gpg")


@dataclass(frozen=True, kw_only=True)
class AzureSettings(Section):
    """`[azure]`: build an Arch Linux image that Azure accepts."""

    disk_size: DiskSize = setting(30 * GiB, "virtual disk size, a whole number of MiB")
    partition_table: Literal["gpt", "mbr"] = setting("gpt", "gpt (BIOS boot) or mbr")
    filesystem: Literal["ext4"] = setting("ext4", "root file system")
    hostname: HostName = setting("archlinux", "host name of the image")
    locale: Locale = setting("en_US.UTF-8", "system locale")
    timezone: TimeZone = setting("UTC", "time zone under /usr/share/zoneinfo")
    keymap: Keymap = setting("us", "console keymap")
    mirror: MirrorURL = setting(
        "https://geo.mirror.pkgbuild.com/$repo/os/$arch",
        "Arch mirror used when pacman_conf is not given",
    )
    pacman_conf: OneLinePath | None = setting(
        None, "a pacman.conf used as given (local mirror, cache, test repository)"
    )
    packages: list[PackageName] = setting(DEFAULT_PACKAGES, "packages installed by pacstrap")
    extra_packages: list[PackageName] = setting([], "installed in addition")
    provisioning: Literal["cloud-init", "waagent"] = setting(
        "cloud-init", "what provisions host name, user and keys"
    )
    extensions: bool = setting(False, "also install waagent for VM extensions")
    agent_package: PackageName = setting(
        "walinuxagent", "package of the Azure Linux Agent (AUR or your repository)"
    )
    cloud_init_package: PackageName = setting("cloud-init", "package of cloud-init")
    kernel_cmdline: Cmdline = setting(
        "console=ttyS0,115200 earlyprintk=ttyS0 rootdelay=300 net.ifnames=0",
        "kernel command line after root=UUID=...",
    )
    initramfs_modules: list[ModuleName] = setting(
        ["hv_vmbus", "hv_storvsc", "hv_netvsc", "hv_utils"], "modules forced into the initramfs"
    )
    output: FileName = setting("archlinux-azure.vhd", "VHD file name under workdir")
    boottest_marker: Text = setting("login:", "console text azure_boottest waits for")
    boottest_timeout: Annotated[float, Bounds(gt=0, le=7200)] = setting(
        600.0, "seconds azure_boottest waits for the marker"
    )
    generation: Annotated[int, Bounds(ge=1, le=2)] = setting(
        1, "Azure VM generation: 1 (BIOS) or 2 (UEFI)"
    )
    boot: Literal["bios", "uefi", "hybrid"] | None = setting(
        None, "firmware the image boots with; default bios (gen 1), uefi (gen 2)"
    )
    builder: Literal["host", "container"] = setting(
        "host", "run build tools on the host, or in an Arch bootstrap environment"
    )
    container_runtime: Literal["chroot", "docker", "podman"] = setting(
        "chroot", "how the bootstrap environment runs (builder = container)"
    )
    bootstrap_mirror: MirrorURL = setting(
        "https://geo.mirror.pkgbuild.com/iso/latest",
        "where the newest Arch bootstrap tarball and its signature are found",
    )
    bootstrap_tarball: Text | None = setting(
        None, "a bootstrap tarball by path or URL instead (needs bootstrap_sha256)"
    )
    bootstrap_sha256: SHA256 | None = setting(None, "SHA-256 of bootstrap_tarball")
    bootstrap_keyring: Path = setting(
        DEFAULT_KEYRING, "OpenPGP keys that may sign the bootstrap tarball (Arch's master keys)"
    )
    user: AzureUser | None = setting(None, "optional build-time administrator")

    def __post_init__(self) -> None:
        # Rules across keys; pydantic reports a ValueError here as an error of `azure`.
        boot = self.firmware
        if self.generation == 1 and boot == "uefi":
            raise ValueError("generation 1 VMs boot BIOS: use boot = 'bios' or 'hybrid'")
        if self.generation == 2 and boot == "bios":
            raise ValueError("generation 2 VMs boot UEFI: use boot = 'uefi' or 'hybrid'")
        if boot != "bios" and self.partition_table != "gpt":
            raise ValueError(f"boot = {boot!r} needs partition_table = 'gpt' (an EFI partition)")
        if self.bootstrap_tarball is not None and self.bootstrap_sha256 is None:
            raise ValueError("bootstrap_tarball needs bootstrap_sha256 to check it")

    @property
    def firmware(self) -> str:
        """The effective boot mode: `boot`, or the generation's default."""
        return self.boot or ("bios" if self.generation == 1 else "uefi")

    def all_packages(self) -> list[str]:
        """Every package pacstrap installs, in order, without duplicates."""
        names = [*self.packages, *self.extra_packages]
        if self.provisioning == "cloud-init":
            names.append(self.cloud_init_package)
        if self.provisioning == "waagent" or self.extensions:
            names.append(self.agent_package)
        return list(dict.fromkeys(names))


@dataclass(frozen=True, kw_only=True)
class Settings(Section):
    """The whole settings file."""

    workdir: Path = setting(Path("build"), "step outputs and doit's state")
    scaleway: ScalewaySettings = field(default_factory=ScalewaySettings)
    azure: AzureSettings = field(default_factory=AzureSettings)


SECTIONS: dict[str, type[Section]] = {
    cls.__name__: cls for cls in (Settings, ScalewaySettings, AzureSettings, AzureUser)
}

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


# --- loading --------------------------------------------------------------------------------


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


def _env_value(raw: str) -> Any:
    if raw[:1] in "[{":
        try:
            return tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            return raw
    return raw


def _env_overrides(env: Mapping[str, str]) -> Iterator[tuple[list[str], Any, str]]:
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or name in RESERVED_ENV:
            continue
        keys = [k.lower() for k in name[len(ENV_PREFIX) :].split("__")]
        if all(keys):
            yield keys, _env_value(env[name]), name


def _flatten(data: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and key in ("scaleway", "azure", "user"):
            yield from _flatten(value, dotted + ".")
        else:
            yield dotted


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        kind = err["type"]
        value = err.get("input")
        if kind in ("extra_forbidden", "unexpected_keyword_argument"):
            lines.append(f"{loc}: unknown key (typo?); see settings.toml.example for the keys")
            continue
        if kind == "missing":
            lines.append(f"{loc}: required key is missing")
            continue
        msg = err["msg"].removeprefix("Value error, ")
        shown = "****" if "password" in loc else repr(value)
        if kind == "value_error" and msg.startswith(("'", '"')):
            lines.append(f"{loc}: {msg}")
        elif kind == "value_error" and isinstance(value, dict):
            lines.append(f"{loc}: {msg}")  # a rule across keys: the message names them
        elif kind == "value_error":
            lines.append(f"{loc}: {shown} {msg}")
        else:
            lines.append(f"{loc}: {shown} is not valid: {msg[:1].lower() + msg[1:]}")
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
        for key in _flatten(data):
            origins[key] = f"file {path}"
    base = path.parent if path is not None else cwd
    overrides = list(_env_overrides(env))
    for keys, value, var in overrides:
        node = data
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise UserError(f"{var}: {'.'.join(keys[:-1])} is not a section")
            node = child
        node[keys[-1]] = value
        origins[".".join(keys)] = f"env {var}"
    _resolve_paths(data, base)
    data.setdefault("workdir", str(base / "build"))
    key = ""
    if cache:
        key = _cache_key(path, text, [(var, env[var]) for _, _, var in overrides], base)
        cached = _read_cache(data["workdir"], key) if key else None
        if cached is not None:
            return Loaded(cached, path, how, origins, base, from_cache=True, cache_key=key)
    from pydantic import ValidationError

    try:
        settings = validate(Settings, data)
    except ValidationError as exc:
        source = f"{path}" if path is not None else "defaults and environment"
        raise UserError(
            _format_errors(exc, source),
            "fix the values above; settings.toml.example lists every key with its default",
        ) from None
    return Loaded(settings, path, how, origins, base, cache_key=key)


# --- the validated-settings cache -------------------------------------------------------------


class _Uncacheable(Exception):
    """The settings hold a secret: they are validated on every run, never written out."""


def _rules() -> list[object]:
    """What the checks depend on besides the inputs: this module, pydantic, Python.

    Files are identified by their stat (an upgraded or edited one has a new one), found
    without importing pydantic.
    """
    stamps: list[object] = [__version__, sys.version]
    files = [__file__]
    for package in ("pydantic", "pydantic_core"):
        spec = importlib.util.find_spec(package)
        files.append(spec.origin if spec is not None and spec.origin else package)
    for name in files:
        st = os.stat(name)
        stamps.append([name, st.st_ino, st.st_mtime_ns, st.st_size])
    return stamps


def _cache_key(path: Path | None, text: str, env: list[tuple[str, str]], base: Path) -> str:
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


def _read_cache(workdir: object, key: str) -> Settings | None:
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


# --- views for steps and for `settings show` --------------------------------------------------


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


def effective(loaded: Loaded) -> list[tuple[str, str, str]]:
    """(key, value for display, origin) for every setting; secrets are masked."""
    rows: list[tuple[str, str, str]] = []

    def walk(section: Section, prefix: str) -> None:
        for f in fields(section):
            value = getattr(section, f.name)
            key = f"{prefix}{f.name}"
            if isinstance(value, Section):
                walk(value, key + ".")
                continue
            if isinstance(value, Secret):
                shown = str(value)
            elif key == "azure.disk_size":
                shown = format_size(value)
            else:
                shown = json.dumps(_plain(value))
            rows.append((key, shown, loaded.origins.get(key, "default")))

    walk(loaded.settings, "")
    return rows


def default_of(cls: type[Section], name: str) -> Any:
    """The default value of `cls`'s field `name` (None for a required field)."""
    for f in fields(cls):
        if f.name == name:
            if f.default_factory is not MISSING:
                return f.default_factory()
            return None if f.default is MISSING else f.default
    raise KeyError(name)


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
