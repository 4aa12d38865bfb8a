"""The build manifest of the Azure image: what went into it, and what differs between two.

Step 9 (archkernel.azure.verify) writes `workdir/azure/manifest.json`, and the same file
beside the VHD as `<vhd>.manifest.json`, each atomically, once the checks have run (the
report, not the manifest, says whether the image passed). It holds:

- `archkernel`: the version that built the image;
- `settings`: every `[azure]` setting that makes the image (`SETTINGS`), as the steps see
  them: secrets as digests; of `[azure.publish]`, the disk controllers it supports. The
  work directory is where the build ran, not an input;
- `source`: where the packages came from: the Arch Linux Archive's snapshot of
  azure.archive_date, azure.mirror, or the pacman.conf given, with each repository's
  servers as the pacman.conf of the build names them;
- `packages`: each package of pacman's local database in the image (name, version), the
  repository pacman took it from, and the name and sha256 of its package file in the
  cache pacstrap used. `pacman -Sp --print-format` over the image's own databases says
  both: it prints a cached package's location as `file://CACHE/FILE`;
- `tools`: the tools that wrote bytes of the image, with their versions: GRUB,
  e2fsprogs, util-linux (sfdisk) and, for an EFI system partition, dosfstools and mtools,
  as the build ran them (host or build environment); mkinitcpio, which ran inside the
  image, from its package;
- `ids`: every identifier the image carries (workdir/azure/ids.json);
- `outputs`: the VHD's name, size and sha256.

It holds no time, and no path of the work directory that no setting names: the same
inputs give the same manifest. `diff` says what differs between two (`archkernel manifest
diff A B`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from archkernel import __version__
from archkernel.azure import buildenv
from archkernel.azure.workspace import Paths
from archkernel.errors import UserError
from archkernel.host.files import is_under, sha256_file, write_text
from archkernel.log import log
from archkernel.plan import Op, Run
from archkernel.settings import AzureSettings, Settings, subset

FORMAT = 1
# The settings the manifest records: the [azure] section, but for what only the boot test
# reads (it makes nothing of the image).
SETTINGS = (
    *(
        f"azure.{f.name}"
        for f in fields(AzureSettings)
        if f.name not in ("boottest_marker", "boottest_timeout", "publish")
    ),
    # The disk controllers the image is made for (verify's NVMe rules; publish declares it).
    "azure.publish.disk_controller_types",
)
# Where pacman keeps its databases in a root tree.
DB_DIR = "var/lib/pacman"
# In a plan made before step 2 wrote packages.txt (a dry run).
PLANNED_PACKAGES = "PACKAGES-FROM-STEP-2"
# Ran inside the image (arch-chroot): its version is its package's.
IMAGE_TOOLS = ("mkinitcpio",)


# --- what the commands say ------------------------------------------------------------------


@dataclass(frozen=True)
class Tool:
    """A tool that writes bytes of the image: its package, the command that prints its
    version, and the line of that output that names the version (a regex)."""

    package: str
    argv: tuple[str, ...]
    line: str
    note: str = ""


# Each asks a program of the package that wrote the bytes: GRUB's programs are one build
# (grub-editenv beside grub-mkimage and grub-bios-setup), mkfs.ext4 is mke2fs.
TOOLS = (
    Tool("grub", ("grub-editenv", "--version"), r"\(GRUB\)"),
    Tool("e2fsprogs", ("mke2fs", "-V"), r"^mke2fs\s"),
    Tool("util-linux", ("sfdisk", "--version"), r"\butil-linux\b"),
)
ESP_TOOLS = (
    # dosfstools 4.2 has no --version; -v prints it, and without a target nothing is made.
    Tool(
        "dosfstools",
        ("mkfs.fat", "-v"),
        r"^mkfs\.fat\s",
        note="prints its version; with no target it makes nothing",
    ),
    Tool("mtools", ("mcopy", "--version"), r"\(GNU mtools\)"),
)
_VERSION = re.compile(r"(?<![\w.-])(\d[\w.+:~-]*)")


def tools_for(firmware: str) -> tuple[Tool, ...]:
    """The tools that write bytes of an image for `firmware` (an ESP only with UEFI)."""
    return TOOLS + (ESP_TOOLS if firmware != "bios" else ())


def tool_version(tool: Tool, output: str) -> dict[str, str] | None:
    """The version `tool` printed (`{"version": "1.47.0", "reported": "mke2fs 1.47.0
    (5-Feb-2023)"}`), or None when its output names none."""
    for raw in output.splitlines():
        line = raw.strip()
        if re.search(tool.line, line):
            found = _VERSION.search(line)
            return {"version": found[1] if found else "", "reported": line}
    return None


def sync_argv(pacman_conf: Path, tree: Path, names: Sequence[str]) -> list[str]:
    """The pacman command that prints `repository name version location` for the packages
    `names`, from the databases of the root tree `tree` (the image's, copied out of it):
    the repository each came from, and where its package file is (`file://` in the cache)."""
    return [
        "pacman",
        "--config",
        os.fspath(pacman_conf),
        "--root",
        os.fspath(tree),
        "--dbpath",
        os.fspath(tree / DB_DIR),
        "--noconfirm",
        "-Sp",
        "--print-format",
        "%r %n %v %l",
        *names,
    ]


def parse_sync(stdout: str) -> dict[str, tuple[str, str, str]]:
    """name -> (repository, version, location) from the output of `sync_argv`."""
    found: dict[str, tuple[str, str, str]] = {}
    for line in stdout.splitlines():
        words = line.split(" ", 3)
        if len(words) == 4:
            repo, name, version, location = words
            found[name] = (repo, version, location.strip())
    return found


def local_packages(tree: Path) -> dict[str, str]:
    """name -> version of the packages pacman's local database in the tree `tree` lists."""
    found: dict[str, str] = {}
    for desc in sorted((tree / DB_DIR / "local").glob("*/desc")):
        values: dict[str, str] = {}
        key = ""
        for line in desc.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("%") and line.endswith("%"):
                key = line
            elif key and line and key not in values:
                values[key] = line
        if "%NAME%" in values and "%VERSION%" in values:
            found[values["%NAME%"]] = values["%VERSION%"]
    return found


def installed_names(packages_txt: Path) -> list[str]:
    """The package names of step 2's packages.txt (`name version` lines); a stand-in
    before step 2 wrote it."""
    try:
        lines = packages_txt.read_text().splitlines()
    except FileNotFoundError:
        return [PLANNED_PACKAGES]
    return [line.split()[0] for line in lines if line.strip()]


def repositories(pacman_conf: str) -> dict[str, list[str]]:
    """Each repository of a pacman.conf with its `Server`s (and `Include`s, as such)."""
    found: dict[str, list[str]] = {}
    section = ""
    for raw in pacman_conf.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
            if section != "options":
                found.setdefault(section, [])
        elif section and section != "options" and "=" in line:
            key, value = (part.strip() for part in line.split("=", 1))
            if key == "Server":
                found[section].append(value)
            elif key == "Include":
                found[section].append(f"Include {value}")
    return found


# --- making it ------------------------------------------------------------------------------


@dataclass
class Gathered:
    """What the commands of `gathering_ops` printed."""

    sync: str = ""
    sync_error: str = ""
    tools: dict[str, str] = field(default_factory=dict)  # package -> its output


def gathering_ops(
    pacman_conf: Path, tree: Path, names: Sequence[str], firmware: str, into: Gathered
) -> list[Op]:
    """The commands whose output the manifest needs, read into `into`: pacman over the
    image's databases in `tree`, and each tool's version. None fails the step."""

    def sync(proc: subprocess.CompletedProcess[str]) -> None:
        into.sync = proc.stdout
        if proc.returncode != 0:
            into.sync_error = proc.stderr.strip() or f"pacman exited with {proc.returncode}"

    ops: list[Op] = [
        Run.of(sync_argv(pacman_conf, tree, names), check=False, capture=True, then=sync)
    ]
    for tool in tools_for(firmware):

        def keep(proc: subprocess.CompletedProcess[str], package: str = tool.package) -> None:
            into.tools[package] = f"{proc.stdout}\n{proc.stderr}"

        ops.append(Run.of(tool.argv, check=False, capture=True, then=keep, note=tool.note))
    return ops


def package_locator(settings: Settings) -> Callable[[str], Path | None]:
    """Where a `file://` location pacman printed is on the host: the same path, or, for a
    path of the build environment that is not shared with the host, its file in the
    environment's tree."""
    env = (
        buildenv.load(settings.azure, settings.workdir)
        if settings.azure.builder == "container"
        else None
    )

    def locate(location: str) -> Path | None:
        if not location.startswith("file://"):
            return None
        path = urllib.parse.unquote(location.removeprefix("file://"))
        if env is None or any(is_under(path, b.path) for b in env.binds):
            return Path(path)
        return buildenv.resolve_in_root(env.root, path)

    return locate


def package_entries(
    installed: dict[str, str],
    synced: dict[str, tuple[str, str, str]],
    locate: Callable[[str], Path | None],
) -> list[dict[str, Any]]:
    """One entry per installed package, by name: its version, and the repository, package
    file and sha256 pacman's databases and cache give for that version (None when they do
    not have it: a package pacstrap took from a repository that has changed since, or a
    package file gone from the cache)."""
    entries = []
    for name, version in sorted(installed.items()):
        entry: dict[str, Any] = {
            "name": name,
            "version": version,
            "repository": None,
            "file": None,
            "sha256": None,
        }
        if name in synced and synced[name][1] == version:
            repo, _, location = synced[name]
            entry["repository"] = repo
            entry["file"] = urllib.parse.unquote(location.rsplit("/", 1)[-1])
            path = locate(location)
            if path is not None and path.is_file():
                entry["sha256"] = sha256_file(path)
        entries.append(entry)
    return entries


def source(az: AzureSettings, pacman_conf: str) -> dict[str, Any]:
    """Where the packages came from, and the repositories of the build's pacman.conf."""
    if az.pacman_conf is not None:
        origin: dict[str, Any] = {"pacman_conf": os.fspath(az.pacman_conf)}
    elif az.archive_date is not None:
        origin = {"archive_date": az.archive_date}
    else:
        origin = {"mirror": az.mirror}
    return {**origin, "repositories": repositories(pacman_conf)}


def output_entry(path: Path) -> dict[str, Any]:
    """A file's size and sha256."""
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def make(
    settings: Settings,
    p: Paths,
    tree: Path,
    gathered: Gathered,
    locate: Callable[[str], Path | None],
) -> dict[str, Any]:
    """The manifest of the VHD `p.vhd`, whose root file system was copied to `tree`, from
    what `gathering_ops` gathered into `gathered`."""
    az = settings.azure
    installed = local_packages(tree)
    synced = parse_sync(gathered.sync)
    packages = package_entries(installed, synced, locate)
    if gathered.sync_error:
        log.warning(
            "the manifest: pacman could not say where the packages came from: %s",
            gathered.sync_error,
        )
    missing = [e["name"] for e in packages if e["sha256"] is None]
    if missing:
        log.warning(
            "the manifest has no sha256 for %d package(s) (not in the package cache, or not "
            "in their repository's database any more): %s",
            len(missing),
            " ".join(missing),
        )
    tools: dict[str, Any] = {}
    for tool in tools_for(az.firmware):
        found = tool_version(tool, gathered.tools.get(tool.package, ""))
        tools[tool.package] = {"command": " ".join(tool.argv), **(found or {"version": None})}
    for name in IMAGE_TOOLS:
        tools[name] = {"source": "its package in the image", "version": installed.get(name)}
    conf_text = p.pacman_conf.read_text(errors="replace") if p.pacman_conf.is_file() else ""
    ids = json.loads(p.ids.read_text()) if p.ids.is_file() else {}
    return {
        "manifest": FORMAT,
        "archkernel": __version__,
        "settings": subset(settings, list(SETTINGS)),
        "source": source(az, conf_text),
        "packages": packages,
        "tools": tools,
        "ids": ids,
        "outputs": {p.vhd.name: output_entry(p.vhd)},
    }


def write(manifest: dict[str, Any], targets: Iterable[Path]) -> None:
    """Write `manifest` to each of `targets`, each atomically."""
    text = json.dumps(manifest, indent=2) + "\n"
    for target in targets:
        write_text(target, text)


# --- comparing two --------------------------------------------------------------------------


@dataclass(frozen=True)
class Difference:
    """One thing two manifests say differently: in `section`, of `key`; None: absent."""

    section: str
    key: str
    old: Any
    new: Any

    def line(self) -> str:
        return f"{self.section} {self.key}: {_shown(self.old)} -> {_shown(self.new)}"


def _shown(value: Any) -> str:
    if value is None:
        return "(none)"
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def load(path: Path) -> dict[str, Any]:
    """A manifest file; UserError when it cannot be read or is not a manifest."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UserError(
            f"cannot read the manifest {path}: {exc.strerror}",
            "step 9 of azure_vhd writes workdir/azure/manifest.json and <vhd>.manifest.json",
        ) from None
    except ValueError as exc:
        raise UserError(f"{path} is not JSON: {exc}", "give a manifest.json step 9 wrote") from None
    if not isinstance(data, dict) or "manifest" not in data:
        raise UserError(
            f"{path} is not an archkernel manifest", "give a manifest.json step 9 wrote"
        )
    return data


def _package(entry: dict[str, Any]) -> str:
    sha = entry.get("sha256") or "unknown"
    return f"{entry.get('version')} from {entry.get('repository')}, sha256 {sha}"


def _by_key(old: Any, new: Any, section: str) -> list[Difference]:
    old = old if isinstance(old, dict) else {}
    new = new if isinstance(new, dict) else {}
    return [
        Difference(section, key, old.get(key), new.get(key))
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]


def diff(a: dict[str, Any], b: dict[str, Any]) -> list[Difference]:
    """What the manifests `a` and `b` say differently, section by section: archkernel's
    version, the settings, the source, each package (its version, repository or file),
    the tools, the IDs and each output."""
    found: list[Difference] = []
    if a.get("archkernel") != b.get("archkernel"):
        found.append(Difference("archkernel", "version", a.get("archkernel"), b.get("archkernel")))
    found += _by_key(a.get("settings"), b.get("settings"), "settings")
    found += _by_key(a.get("source"), b.get("source"), "source")
    old, new = (
        {e.get("name"): _package(e) for e in m.get("packages", []) if isinstance(e, dict)}
        for m in (a, b)
    )
    found += _by_key(old, new, "package")
    found += _by_key(a.get("tools"), b.get("tools"), "tool")
    found += _by_key(a.get("ids"), b.get("ids"), "id")
    found += _by_key(a.get("outputs"), b.get("outputs"), "output")
    return found
