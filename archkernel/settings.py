"""Settings: pydantic models, one TOML file, environment overrides, and where each value came from.

Where the file comes from, first match wins: `archkernel --settings PATH`, `doit ...
settings=PATH`, `$ARCHKERNEL_SETTINGS`, `./settings.toml`, otherwise built-in defaults.
Any key can then be overridden as `ARCHKERNEL_<SECTION>__<KEY>` (`ARCHKERNEL_WORKDIR` at the
top level). Every value that ends up in a file or on a command line is validated here, and
all problems are reported at once, one line each.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from archkernel.errors import UserError

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
MiB = 1 << 20
GiB = 1 << 30


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


def _pattern(regex: str, what: str) -> AfterValidator:
    compiled = re.compile(regex)

    def check(value: str) -> str:
        _text(value)
        if not compiled.fullmatch(value):
            raise ValueError(f"{value!r} is not {what}")
        return value

    return AfterValidator(check)


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


def _cmdline(value: str) -> str:
    _text(value)
    bad = sorted(set(value) & set("\"'`$;\\{}<>|&"))
    if bad or not value.isprintable():
        raise ValueError(
            f"{value!r} may hold only printable characters without quotes or shell/GRUB "
            f"metacharacters (found {''.join(bad) or 'non-printable characters'})"
        )
    return value


Text = Annotated[str, AfterValidator(_text)]
Size = Annotated[
    int,
    BeforeValidator(_size),
    PlainSerializer(format_size, return_type=str, when_used="json"),
]
HostName = Annotated[str, AfterValidator(_hostname)]
IPv4 = Annotated[str, AfterValidator(_ipv4)]
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
RelativeName = Annotated[str, AfterValidator(_relative_name)]
SystemPath = Annotated[str, AfterValidator(_system_path)]
Cmdline = Annotated[str, AfterValidator(_cmdline)]
FileName = Annotated[
    str, _pattern(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}", "a plain file name (no directories)")
]


class PasswordHash(SecretStr):
    """A crypt(3) hash such as `$6$salt$...` or `$y$...`; never a plain password."""


def _password_hash(value: SecretStr) -> SecretStr:
    raw = value.get_secret_value()
    if not re.fullmatch(r"\$(1|5|6|y|gy|2[abxy]|7)\$[./A-Za-z0-9$=,]+", raw):
        raise ValueError(
            "is not a crypt(3) password hash; make one with `openssl passwd -6` or `mkpasswd`"
        )
    return value


class Model(BaseModel):
    """Base of every settings section: unknown keys are errors, values are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)


# --- sections -----------------------------------------------------------------------------


class ScalewaySettings(Model):
    """`[scaleway]`: boot the Arch kernel on a Scaleway C1 by kexec."""

    root: Path = Field(Path("/"), description="the system every path below is taken under")
    tftp_server: IPv4 | None = Field(
        None, description="TFTP server; default: the bootserver line of /proc/net/pnp"
    )
    fallback_tftp_server: IPv4 = Field("10.1.31.34", description="used when pnp names none")
    tftp_port: int = Field(69, ge=1, le=65535, description="TFTP port")
    tftp_timeout: float = Field(5.0, gt=0, le=300, description="seconds to wait for a packet")
    tftp_retries: int = Field(3, ge=0, le=20, description="retries after a timeout")
    tftp_blksize: int = Field(1468, ge=8, le=65464, description="TFTP block size (RFC 2348)")
    bootscript: RelativeName = Field("uboot.bootscript", description="bootscript name on TFTP")
    kernel: SystemPath = Field("/boot/zImage", description="the Arch kernel to kexec")
    kernel_version: Text | None = Field(
        None, description="default: found from /usr/lib/modules/*/pkgbase"
    )
    modules: list[ModuleName] = Field(
        ["mvneta", "nbd"], description="modules added to the initrd, with their dependencies"
    )
    optional_modules: list[ModuleName] = Field(
        ["mvneta_bm"], description="added when the kernel has them; a warning otherwise"
    )
    output_initrd: SystemPath = Field(
        "/boot/initramfs-archkernel.img", description="where the patched initrd is written"
    )
    compression: Literal["gzip", "xz", "zstd", "lz4", "none"] = Field(
        "gzip", description="compression of the added archive"
    )
    extra_cmdline: Cmdline = Field(
        "is_in_kexec=yes NO_SIGNAL_STATE=1 DONT_FETCH_KERNEL_MODULES=1 NO_NTPDATE=1 archkernel",
        description="appended to the current command line",
    )
    dtb: SystemPath | None = Field(None, description="device tree for kexec --dtb (optional)")
    disable_tag: Tag = Field("archkernel_disabled", description="server tag that disables us")

    @field_validator("root")
    @classmethod
    def _root_absolute(cls, value: Path, info: ValidationInfo) -> Path:
        _text(str(value))
        return value


class AzureUser(Model):
    """`[azure.user]`: an administrator created at build time (root stays locked)."""

    name: UserName = Field(description="login name; member of wheel")
    ssh_authorized_keys: list[SSHKey] = Field([], description="public keys for ~/.ssh")
    password_hash: PasswordHash | None = Field(
        None, description="crypt(3) hash; omit for key-only login"
    )

    @field_validator("password_hash")
    @classmethod
    def _check_hash(cls, value: PasswordHash | None) -> PasswordHash | None:
        return None if value is None else PasswordHash(_password_hash(value).get_secret_value())


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


class AzureSettings(Model):
    """`[azure]`: build an Arch Linux image that Azure accepts."""

    disk_size: Size = Field(30 * GiB, description="virtual disk size, a whole number of MiB")
    partition_table: Literal["gpt", "mbr"] = Field("gpt", description="gpt (BIOS boot) or mbr")
    filesystem: Literal["ext4"] = Field("ext4", description="root file system")
    hostname: HostName = Field("archlinux", description="host name of the image")
    locale: Locale = Field("en_US.UTF-8", description="system locale")
    timezone: TimeZone = Field("UTC", description="time zone under /usr/share/zoneinfo")
    keymap: Keymap = Field("us", description="console keymap")
    mirror: MirrorURL = Field(
        "https://geo.mirror.pkgbuild.com/$repo/os/$arch",
        description="Arch mirror used when pacman_conf is not given",
    )
    pacman_conf: Path | None = Field(
        None, description="a pacman.conf used as given (local mirror, cache, test repository)"
    )
    packages: list[PackageName] = Field(
        DEFAULT_PACKAGES, description="packages installed by pacstrap"
    )
    extra_packages: list[PackageName] = Field([], description="installed in addition")
    provisioning: Literal["cloud-init", "waagent"] = Field(
        "cloud-init", description="what provisions host name, user and keys"
    )
    extensions: bool = Field(False, description="also install waagent for VM extensions")
    agent_package: PackageName = Field(
        "walinuxagent", description="package of the Azure Linux Agent (AUR or your repository)"
    )
    cloud_init_package: PackageName = Field("cloud-init", description="package of cloud-init")
    kernel_cmdline: Cmdline = Field(
        "console=ttyS0,115200 earlyprintk=ttyS0 rootdelay=300 net.ifnames=0",
        description="kernel command line after root=UUID=...",
    )
    initramfs_modules: list[ModuleName] = Field(
        ["hv_vmbus", "hv_storvsc", "hv_netvsc", "hv_utils"],
        description="modules forced into the initramfs",
    )
    output: FileName = Field("archlinux-azure.vhd", description="VHD file name under workdir")
    boottest_marker: Text = Field("login:", description="console text azure_boottest waits for")
    boottest_timeout: float = Field(
        600.0, gt=0, le=7200, description="seconds azure_boottest waits for the marker"
    )
    generation: int = Field(1, ge=1, le=2, description="Azure VM generation: 1 (BIOS) or 2 (UEFI)")
    boot: Literal["bios", "uefi", "hybrid"] | None = Field(
        None, description="firmware the image boots with; default bios (gen 1), uefi (gen 2)"
    )
    builder: Literal["host", "container"] = Field(
        "host", description="run build tools on the host, or in an Arch bootstrap environment"
    )
    container_runtime: Literal["chroot", "docker", "podman"] = Field(
        "chroot", description="how the bootstrap environment runs (builder = container)"
    )
    bootstrap_mirror: MirrorURL = Field(
        "https://geo.mirror.pkgbuild.com/iso/latest",
        description="where the newest Arch bootstrap tarball and its signature are found",
    )
    bootstrap_tarball: Text | None = Field(
        None, description="a bootstrap tarball by path or URL instead (needs bootstrap_sha256)"
    )
    bootstrap_sha256: Annotated[str, _pattern(r"[0-9a-f]{64}", "a SHA-256 hex digest")] | None = (
        Field(None, description="SHA-256 of bootstrap_tarball")
    )
    bootstrap_keyring: Path = Field(
        Path("/usr/share/keyrings/archlinux.gpg"),
        description="OpenPGP keys that may sign the bootstrap tarball (Arch's master keys)",
    )
    user: AzureUser | None = Field(None, description="optional build-time administrator")

    @model_validator(mode="after")
    def _boot_modes(self) -> AzureSettings:
        boot = self.firmware
        if self.generation == 1 and boot == "uefi":
            raise ValueError("generation 1 VMs boot BIOS: use boot = 'bios' or 'hybrid'")
        if self.generation == 2 and boot == "bios":
            raise ValueError("generation 2 VMs boot UEFI: use boot = 'uefi' or 'hybrid'")
        if boot != "bios" and self.partition_table != "gpt":
            raise ValueError(f"boot = {boot!r} needs partition_table = 'gpt' (an EFI partition)")
        if self.bootstrap_tarball is not None and self.bootstrap_sha256 is None:
            raise ValueError("bootstrap_tarball needs bootstrap_sha256 to check it")
        return self

    @property
    def firmware(self) -> str:
        """The effective boot mode: `boot`, or the generation's default."""
        return self.boot or ("bios" if self.generation == 1 else "uefi")

    @field_validator("disk_size")
    @classmethod
    def _disk_size(cls, value: int) -> int:
        if value % MiB:
            raise ValueError(f"'{value}' bytes is not a whole number of MiB (Azure requires it)")
        if value > 1023 * GiB:
            raise ValueError(f"'{format_size(value)}' is larger than Azure's 1023GiB")
        if value < 64 * MiB:
            raise ValueError(f"'{format_size(value)}' is too small; use at least 64MiB")
        return value

    def all_packages(self) -> list[str]:
        """Every package pacstrap installs, in order, without duplicates."""
        names = [*self.packages, *self.extra_packages]
        if self.provisioning == "cloud-init":
            names.append(self.cloud_init_package)
        if self.provisioning == "waagent" or self.extensions:
            names.append(self.agent_package)
        return list(dict.fromkeys(names))


class Settings(Model):
    """The whole settings file."""

    workdir: Path = Field(Path("build"), description="step outputs and doit's state")
    scaleway: ScalewaySettings = Field(default_factory=ScalewaySettings)
    azure: AzureSettings = Field(default_factory=AzureSettings)


# --- loading --------------------------------------------------------------------------------


@dataclass
class Loaded:
    """Effective settings plus where they, and each value, came from."""

    settings: Settings
    path: Path | None
    path_origin: str
    origins: dict[str, str] = field(default_factory=dict)
    base_dir: Path = field(default_factory=Path.cwd)


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


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(
            f"settings file {path} does not exist",
            "create it from settings.toml.example, or point --settings at an existing file",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read settings file {path}: {exc}") from None
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


def _format_errors(exc: ValidationError, data: Mapping[str, Any], source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        kind = err["type"]
        value = err.get("input")
        if kind == "extra_forbidden":
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
) -> Loaded:
    """Find, read, override from the environment and validate the settings."""
    env = os.environ if env is None else env
    cwd = Path.cwd() if cwd is None else cwd
    path, how = find_settings_file(cli_path, doit_var, env, cwd)
    data: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if path is not None:
        path = (cwd / path) if not path.is_absolute() else path
        data = _read_toml(path)
        for key in _flatten(data):
            origins[key] = f"file {path}"
    base = path.parent if path is not None else cwd
    for keys, value, var in _env_overrides(env):
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
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        source = f"{path}" if path is not None else "defaults and environment"
        raise UserError(
            _format_errors(exc, data, source),
            "fix the values above; settings.toml.example lists every key with its default",
        ) from None
    return Loaded(settings, path, how, origins, base)


# --- views for steps and for `settings show` --------------------------------------------------


def digest(secret: str) -> str:
    """A short digest that tells a changed secret without revealing it."""
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()[:16]


def _plain(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return digest(value.get_secret_value())
    if isinstance(value, BaseModel):
        return {k: _plain(getattr(value, k)) for k in type(value).model_fields}
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

    def walk(model: BaseModel, prefix: str) -> None:
        for name in type(model).model_fields:
            value = getattr(model, name)
            key = f"{prefix}{name}"
            if isinstance(value, BaseModel) and not isinstance(value, SecretStr):
                walk(value, key + ".")
                continue
            if isinstance(value, SecretStr):
                shown = "**********"
            elif key == "azure.disk_size":
                shown = format_size(value)
            else:
                shown = json.dumps(_plain(value))
            rows.append((key, shown, loaded.origins.get(key, "default")))

    walk(loaded.settings, "")
    return rows


def field_docs() -> dict[str, tuple[Any, str]]:
    """Every leaf key with its default and description (for the example file and its test)."""
    docs: dict[str, tuple[Any, str]] = {}

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            ann = info.annotation
            sub = _model_of(ann)
            if sub is not None:
                walk(sub, f"{prefix}{name}.")
                continue
            default = info.get_default(call_default_factory=True)
            docs[f"{prefix}{name}"] = (default, info.description or "")

    walk(Settings, "")
    return docs


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None
