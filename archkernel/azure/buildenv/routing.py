"""What runs where: the tools routed into the build environment, and the host commands
that run them there.

`BuildEnv` is the prepared environment; while it is active (`buildenv.activate`) it is
run()'s wrapper (`archkernel.host.run.wrapping`): `wrap` rewrites a command whose tool is in
`ROUTED_TOOLS` into the host command that runs it inside (`chroot_argv` through the
`exec.py` helper, or `container_argv` for docker and podman); other commands stay on the
host. Deciding only: nothing here runs a command, except `BuildEnv.run`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
import subprocess
import sys
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from archkernel.errors import UserError
from archkernel.host.files import is_under
from archkernel.host.run import PACKAGES, Command, minimal_env, run, run_identity, wrapping
from archkernel.log import log

Runtime = Literal["chroot", "docker", "podman"]
CONTAINER_LABEL = "archkernel.run"  # on every container: the run that started it

# Tools that run inside the environment while it is active (matched on argv[0]'s name).
ROUTED_TOOLS = frozenset(
    {
        # Arch's own tools: the reason the environment exists.
        "pacstrap",
        "pacman",
        "pacman-key",
        "arch-chroot",
        "genfstab",
        # gpg-agents of pacman-key are found through sockets the environment's gnupg chose.
        "gpgconf",
        # Offline configuration of the image: the versions of Arch's systemd and shadow.
        "systemctl",
        "useradd",
        "usermod",
        "groupadd",
        "bootctl",
        # Partitions and file systems: a file system is made, checked and read by one
        # e2fsprogs, whose features an older host's e2fsck or blkid may not know.
        "sfdisk",
        "sgdisk",
        "blkid",
        "mkfs.ext4",
        "mke2fs",
        "e2fsck",
        "fsck.ext4",
        "debugfs",
        "tune2fs",
        "dumpe2fs",
        "mkfs.fat",
        "mkfs.vfat",
        "mkdosfs",
        "fsck.fat",
        "mcopy",
        "mmd",
        "mdir",
        "mformat",
        # GRUB: core.img and the modules must come from one GRUB build.
        "grub-mkimage",
        "grub-bios-setup",
        "grub-install",
        "grub-mkstandalone",
        "grub-probe",
        "grub-editenv",
    }
)

# Where a tool is outside PATH (Debian keeps grub-bios-setup beside GRUB's modules).
TOOL_DIRS: dict[str, tuple[str, ...]] = {"grub-bios-setup": ("/usr/lib/grub/i386-pc",)}

# Arch packages for the tools step 1 installs into an Arch environment that lacks them.
ARCH_PACKAGES: dict[str, str] = {
    "gpgconf": "gnupg",
    "useradd": "shadow",
    "blkid": "util-linux",
    "sfdisk": "util-linux",
    "grub-bios-setup": "grub",
    "grub-mkimage": "grub",
    "mkfs.fat": "dosfstools",
    "mkfs.vfat": "dosfstools",
    "fsck.fat": "dosfstools",
    "mcopy": "mtools",
    "mmd": "mtools",
    "mdir": "mtools",
}

# PATH inside the environment, whatever the host's PATH holds.
ENV_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# The helper a chroot command starts in its private namespaces (run by path, not imported).
HELPER = Path(__file__).with_name("exec.py")


@dataclass(frozen=True, order=True)
class Bind:
    """A host path shared with the environment at the same absolute path."""

    path: Path
    read_only: bool = False


def merge_binds(binds: Iterable[Bind]) -> tuple[Bind, ...]:
    """The binds to make, parents first: absolute real paths that exist, each once
    (read-write wins), without those a same-mode bind of a parent already covers.

    UserError for a path that would hide the environment itself (`/`, /proc, /sys, /dev).
    """
    wanted: dict[Path, bool] = {}
    for bind in binds:
        path = Path(os.path.realpath(bind.path))
        if not os.path.exists(path):
            log.debug("not shared with the build environment (missing): %s", path)
            continue
        if path == Path("/") or any(is_under(path, api) for api in ("/proc", "/sys", "/dev")):
            raise UserError(
                f"{path} cannot be shared with the build environment at the same path: "
                "it would hide the environment's own system directories",
                "use a work directory (and temporary directory) elsewhere, e.g. /var/tmp/...",
            )
        wanted[path] = wanted.get(path, True) and bind.read_only
    merged: list[Bind] = []
    for path in sorted(wanted, key=lambda p: (len(p.parts), str(p))):
        read_only = wanted[path]
        covering = [b for b in merged if is_under(path, b.path)]
        if covering and covering[-1].read_only == read_only:
            continue
        merged.append(Bind(path, read_only))
    return tuple(merged)


def _repository_dir(url: str) -> Path | None:
    """The directory of a `file://` repository URL, up to its first `$repo`/`$arch`."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme != "file":
        return None
    path = urllib.parse.unquote(parsed.path)
    if "$" in path:
        path = path[: path.index("$")]
        path = path if path.endswith("/") else os.path.dirname(path)
    return Path(path) if path.startswith("/") else None


def pacman_conf_binds(text: str) -> list[Bind]:
    """Host paths a pacman.conf names that commands inside need to see: `file://`
    repositories (read-only), CacheDir and GPGDir (read-write), included files
    (read-only)."""
    found: list[Bind] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if "=" not in line:
            continue
        key, value = (part.strip() for part in line.split("=", 1))
        if key == "Server":
            directory = _repository_dir(value)
            if directory is not None:
                found.append(Bind(directory, read_only=True))
        elif key in ("CacheDir", "GPGDir"):
            found += [Bind(Path(v)) for v in value.split() if v.startswith("/")]
        elif key == "Include" and value.startswith("/"):
            found.append(Bind(Path(value), read_only=True))
    return found


def resolve_in_root(root: Path, path: str) -> Path | None:
    """The host path of `path` as a process chrooted into `root` would see it: symbolic
    links followed inside `root` (an absolute link is relative to `root`, `..` stops at
    it). None if it does not exist."""
    todo = [p for p in path.split("/") if p not in ("", ".")]
    done: list[str] = []
    links = 0
    while todo:
        part = todo.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        candidate = root.joinpath(*done, part)
        try:
            st = os.lstat(candidate)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > 40:
                return None
            target = os.readlink(candidate)
            if target.startswith("/"):
                done = []
            todo = [p for p in target.split("/") if p not in ("", ".")] + todo
            continue
        done.append(part)
    return root.joinpath(*done)


def find_tool(root: Path, tool: str) -> str | None:
    """Where `tool` is inside the tree `root` (its path there), or None."""
    for directory in [*ENV_PATH.split(":"), *TOOL_DIRS.get(tool, ())]:
        inside = f"{directory}/{tool}"
        host = resolve_in_root(root, inside)
        if host is not None and host.is_file() and os.access(host, os.X_OK):
            return inside
    return None


def chroot_argv(
    root: Path, binds: Sequence[Bind], cwd: str | None, argv: Sequence[str]
) -> list[str]:
    """The host command that runs `argv` in the tree `root` (chroot runtime)."""
    out = ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--propagation", "private"]
    out += ["--", sys.executable or "python3", "-I", "-S", os.fspath(HELPER)]
    out += ["--root", os.fspath(root)]
    for bind in binds:
        out += ["--ro-bind" if bind.read_only else "--bind", os.fspath(bind.path)]
    out += ["--resolv-conf", "--path", ENV_PATH]
    if cwd is not None:
        out += ["--cwd", cwd]
    return [*out, "--", *argv]


def container_argv(
    runtime: str,
    image: str,
    binds: Sequence[Bind],
    cwd: str | None,
    env_names: Iterable[str],
    has_input: bool,
    argv: Sequence[str],
) -> list[str]:
    """The host command that runs `argv` in a docker or podman container of `image`.

    The values of the variables in `env_names` are passed by name (`--env NAME`), so they
    come from the client's environment and never appear on a command line.
    """
    # The label names our run: a container left by a killed run is found and removed by
    # the next one (`containers.stop_orphan_containers`).
    out = [runtime, "run", "--rm", "--privileged", "--network", "host"]
    out += ["--label", f"{CONTAINER_LABEL}={run_identity()}"]
    if has_input:
        out.append("--interactive")
    # Loop devices attached after the container started are only seen through the host's /dev.
    out += ["--volume", "/dev:/dev"]
    for bind in binds:
        path = os.fspath(bind.path)
        if ":" in path or "," in path:
            raise UserError(
                f"{path} cannot be given to {runtime} as a volume (it contains ':' or ',')",
                "use a work directory whose path has neither, or container_runtime = 'chroot'",
            )
        out += ["--volume", f"{path}:{path}" + (":ro" if bind.read_only else "")]
    if cwd is not None:
        out += ["--workdir", cwd]
    out += ["--env", f"PATH={ENV_PATH}"]
    for name in sorted(set(env_names) - {"PATH"}):
        out += ["--env", name]
    return [*out, image, *argv]


@dataclass(frozen=True)
class BuildEnv:
    """A prepared build environment; while active (`activate`) it is run()'s wrapper."""

    root: Path  # the tree on the host
    sha256: str  # of the tarball it was unpacked from
    name: str  # the tarball's file name
    runtime: Runtime
    image: str | None  # docker/podman image made from the tree
    binds: tuple[Bind, ...]  # host paths shared at the same path
    routed: frozenset[str] | None = ROUTED_TOOLS  # None: every command

    @property
    def where(self) -> str:
        """Where commands run, for log lines and errors."""
        return f"build environment {self.sha256[:12]}, {self.runtime}"

    def describe(self) -> str:
        """One line for the log: what the environment is and how commands reach it."""
        how = f"{self.runtime} image {self.image}" if self.image else self.runtime
        shared = ", ".join(os.fspath(b.path) + (" (ro)" if b.read_only else "") for b in self.binds)
        return (
            f"{self.name} (sha256 {self.sha256[:16]}) in {self.root}, run through {how}; "
            f"shared at the same path: {shared}"
        )

    def routes(self, tool: str) -> bool:
        """Whether run() runs `tool` (a name or path) inside while this is active."""
        return self.routed is None or os.path.basename(tool) in self.routed

    def which(self, tool: str) -> str | None:
        """Where run() would find `tool`: inside (its path there) or on the host."""
        if not self.routes(tool):
            return shutil.which(tool, path=minimal_env()["PATH"])
        return find_tool(self.root, tool)

    def host_path(self, inside: str) -> Path:
        """The host path of a path inside the environment (symbolic links not followed)."""
        return self.root / inside.lstrip("/")

    def inside_path(self, host: Path) -> str:
        """The path inside the environment of a host path in its tree."""
        try:
            return "/" + os.fspath(Path(host).relative_to(self.root))
        except ValueError:
            raise UserError(f"{host} is not inside the build environment {self.root}") from None

    def _program(self, argv0: str) -> str:
        if "/" in argv0:
            found = None
            if argv0.startswith("/"):
                # The tree's own path, or a shared one (`host_path(...)`: the tree lies in
                # the shared work directory, so its files have that path inside too).
                shared = any(is_under(argv0, b.path) for b in self.binds)
                host = Path(argv0) if shared else resolve_in_root(self.root, argv0)
                if host is not None and host.is_file() and os.access(host, os.X_OK):
                    found = argv0
        else:
            found = find_tool(self.root, argv0)
        if found is None:
            tool = os.path.basename(argv0)
            package = ARCH_PACKAGES.get(tool) or PACKAGES.get(tool, (tool, ""))[0]
            raise UserError(
                f"command not found in the build environment: {argv0}",
                f"{self.root} has no {tool}: step 1 installs '{package}' into an Arch "
                "environment (run it again), or use a bootstrap tarball that has it",
            )
        return found

    def wrap(self, command: Command) -> Command:
        """run()'s hook: `command` rewritten to run inside, if its tool is routed."""
        if not self.routes(command.argv[0]):
            return command
        argv = [self._program(command.argv[0]), *command.argv[1:]]
        cwd = command.cwd
        if cwd is not None:
            cwd = os.path.realpath(cwd)
            if not any(is_under(cwd, b.path) for b in self.binds):
                raise UserError(
                    f"cannot run {argv[0]} in {cwd}: that directory is not shared with the "
                    "build environment",
                    "run it in the work directory or the temporary directory",
                )
        # The host's PATH finds unshare or docker; the command inside gets ENV_PATH.
        if self.runtime == "chroot":
            outer = chroot_argv(self.root, self.binds, cwd, argv)
        else:
            if self.image is None:
                raise UserError(f"no {self.runtime} image for {self.where}", "run step 1 again")
            outer = container_argv(
                self.runtime, self.image, self.binds, cwd, command.env, command.has_input, argv
            )
        return Command(outer, command.env, None, command.has_input, where=self.where)

    def run(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        check: bool = True,
        capture: bool = False,
        stdin: bytes | str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        timeout: float | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """run() any command inside the environment, routed tool or not."""
        with wrapping(dataclasses.replace(self, routed=None)):
            return run(
                argv, check=check, capture=capture, stdin=stdin, env=env, cwd=cwd, timeout=timeout
            )
