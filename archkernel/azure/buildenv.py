"""The bootstrap build environment: the Azure build's tools from Arch's own userland.

With `azure.builder = "container"` the Azure workflow does not use the build host's
pacstrap, mkfs, sfdisk and GRUB but those of an Arch root file system made from Arch's
bootstrap tarball (see `archkernel.azure.bootstrap` for obtaining and verifying it), as the old
scripts did with a privileged Docker container, but without needing a daemon:

    env = buildenv.prepare(settings.azure, settings.workdir)        # step 1
    with buildenv.activate(settings.azure, settings.workdir) as env:  # every step
        run(["pacstrap", ...])       # runs inside the environment
        run(["losetup", ...])        # still runs on the host

`prepare` obtains the tarball, unpacks it under `workdir/buildenv/<sha256 prefix>/root`,
points its pacman at `azure.mirror`, initialises its pacman keyring and installs build
tools it lacks (both inside the environment, when it is an Arch one), and records all that
in `workdir/buildenv/buildenv.json`. A second build with the same tarball reuses the
tree; a different tarball replaces it. `activate` installs a `run()` wrapper
(`archkernel.host.run.wrapping`) so that every command whose tool is in `ROUTED_TOOLS` runs
inside; the others stay on the host.

Where the environment's commands run (`azure.container_runtime`):
- `chroot` (default): each command gets its own private mount namespace and PID namespace
  (`unshare`, then `buildenv_exec.py`), in which the work directory, the temporary
  directory and any other shared path are bind-mounted at the *same absolute path*, plus
  /proc, /sys, /dev and /run; then it is chrooted into the tree. Paths need no
  translation, mounts the host makes meanwhile (a loop-mounted image) are seen, and when
  the command ends the kernel removes its mounts and ends its leftover processes (a
  gpg-agent): nothing is mounted in the host's namespace, so Ctrl-C or `kill -9` cannot
  leave anything behind.
- `docker` / `podman`: the tree is imported once as an image (`archkernel-buildenv:...`)
  and each command is `docker run --rm --privileged` with the same paths as volumes.

Only tools that build the image run inside (the Arch tools, and the file system, partition
and boot loader tools whose versions must match what they make). Tools that act on the
host kernel's state stay on the host: `losetup`, `partx`, `mount` and `umount` (a mount
made in a command's private namespace would vanish with it), and so do the container
runtimes themselves, gpgv (it checks the environment before there is one), bsdtar, cp and
qemu.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from archkernel.azure import bootstrap
from archkernel.errors import UserError
from archkernel.host import mounts
from archkernel.host.files import atomic_path, remove_path, write_if_changed
from archkernel.host.run import PACKAGES, Command, minimal_env, run, wrapping
from archkernel.log import complete_step, log
from archkernel.settings import AzureSettings, default_of

Runtime = Literal["chroot", "docker", "podman"]

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

# The settings that make up the environment (for a step's config_changed): the tarball,
# where it runs, the mirror its pacman uses and the pacman.conf whose paths it shares.
SETTINGS = (
    "azure.builder",
    "azure.container_runtime",
    "azure.bootstrap_mirror",
    "azure.bootstrap_tarball",
    "azure.bootstrap_sha256",
    "azure.bootstrap_keyring",
    "azure.mirror",
    "azure.pacman_conf",
)

STATE = "buildenv.json"
HELPER = Path(__file__).with_name("buildenv_exec.py")
IMAGE_REPOSITORY = "archkernel-buildenv"
_ENV_DIR = re.compile(r"[0-9a-f]{16}")


# --- what runs where ------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Bind:
    """A host path shared with the environment at the same absolute path."""

    path: Path
    read_only: bool = False


def _is_under(path: str | Path, directory: str | Path) -> bool:
    p, d = os.fspath(path), os.fspath(directory).rstrip("/")
    return p == d or p.startswith(d + "/") or d == ""


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
        if path == Path("/") or any(_is_under(path, api) for api in ("/proc", "/sys", "/dev")):
            raise UserError(
                f"{path} cannot be shared with the build environment at the same path: "
                "it would hide the environment's own system directories",
                "use a work directory (and temporary directory) elsewhere, e.g. /var/tmp/...",
            )
        wanted[path] = wanted.get(path, True) and bind.read_only
    merged: list[Bind] = []
    for path in sorted(wanted, key=lambda p: (len(p.parts), str(p))):
        read_only = wanted[path]
        covering = [b for b in merged if _is_under(path, b.path)]
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
    out = [runtime, "run", "--rm", "--privileged", "--network", "host"]
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
                shared = any(_is_under(argv0, b.path) for b in self.binds)
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
            if not any(_is_under(cwd, b.path) for b in self.binds):
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


# --- what step 1 recorded ---------------------------------------------------------------------


@dataclass
class State:
    """`buildenv.json`: the tarball the environment came from and what was set up in it."""

    sha256: str
    name: str
    origin: str  # URL or path of the tarball
    signer: str | None  # fingerprint of the key that signed it (mirror downloads)
    keyring: bool = False  # its pacman keyring is initialised
    mirror: str | None = None  # the Server its mirrorlist names
    installed: list[str] = field(default_factory=list)  # packages step 1 added
    images: dict[str, str] = field(default_factory=dict)  # runtime -> image

    @property
    def directory(self) -> str:
        return self.sha256[:16]

    def image_tag(self) -> str:
        """The docker/podman image name for the tree as it is now set up."""
        setup = json.dumps([self.keyring, self.mirror, sorted(self.installed)])
        digest = hashlib.sha256(setup.encode()).hexdigest()[:8]
        return f"{IMAGE_REPOSITORY}:{self.directory}-{digest}"


def directory(workdir: Path) -> Path:
    """Where build environments live: `workdir/buildenv`."""
    return Path(os.path.realpath(workdir)) / "buildenv"


def state_file(workdir: Path) -> Path:
    """Step 1's record of the environment (a target for the step)."""
    return directory(workdir) / STATE


def _root(base: Path, state: State) -> Path:
    return base / state.directory / "root"


def _read_state(base: Path) -> State | None:
    path = base / STATE
    try:
        data = json.loads(path.read_text())
        return State(**data)
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:
        log.warning("ignoring unreadable %s (%s); the environment is made again", path, exc)
        return None


def _write_state(base: Path, state: State) -> None:
    text = json.dumps(dataclasses.asdict(state), indent=2, sort_keys=True) + "\n"
    write_if_changed(base / STATE, text.encode())


@contextlib.contextmanager
def _locked(base: Path) -> Iterator[None]:
    """One process at a time prepares the environments of a work directory."""
    with open(base / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- step 1 -------------------------------------------------------------------------------------


def required_tools(az: AzureSettings) -> list[str]:
    """The routed tools the Azure workflow runs, for these settings."""
    tools = ["pacstrap", "pacman", "pacman-key", "arch-chroot", "gpgconf", "systemctl"]
    tools += ["useradd", "sfdisk", "blkid", "mkfs.ext4", "e2fsck", "debugfs", "grub-mkimage"]
    if az.firmware in ("bios", "hybrid"):
        tools.append("grub-bios-setup")
    if az.firmware in ("uefi", "hybrid"):
        # The ESP: made, filled, listed (step 9) and checked.
        tools += ["mkfs.fat", "mcopy", "mmd", "mdir", "fsck.fat"]
    return tools


def shared_paths(az: AzureSettings, workdir: Path, extra: Iterable[Bind] = ()) -> tuple[Bind, ...]:
    """What the environment shares with the host: the work directory, the temporary
    directory, what `azure.pacman_conf` points at (a local repository, its cache), and
    `extra`."""
    binds = [Bind(Path(workdir)), Bind(Path(tempfile.gettempdir()))]
    if az.pacman_conf is not None and az.pacman_conf.is_file():
        binds.append(Bind(az.pacman_conf, read_only=True))
        binds += pacman_conf_binds(az.pacman_conf.read_text(errors="replace"))
    return merge_binds([*binds, *extra])


def _env(az: AzureSettings, workdir: Path, state: State, extra: Iterable[Bind]) -> BuildEnv:
    base = directory(workdir)
    runtime: Runtime = az.container_runtime
    return BuildEnv(
        root=_root(base, state),
        sha256=state.sha256,
        name=state.name,
        runtime=runtime,
        image=state.images.get(runtime) if runtime != "chroot" else None,
        binds=shared_paths(az, base.parent, extra),
    )


def _is_url(text: str) -> bool:
    return bool(re.match(r"(https?|ftp|file)://", text))


def _usable(base: Path, state: State | None, sha256: str | None) -> State | None:
    if state is not None and state.sha256 == sha256 and _root(base, state).is_dir():
        return state
    return None


def _keyring(az: AzureSettings) -> Path:
    """azure.bootstrap_keyring; for the default (Debian's path), Arch's own path on Arch."""
    keyring = az.bootstrap_keyring
    default = default_of(AzureSettings, "bootstrap_keyring")
    arch = Path("/usr/share/pacman/keyrings/archlinux.gpg")
    if keyring == default and not keyring.exists() and arch.is_file():
        return arch
    return keyring


def _download_verified(
    az: AzureSettings, base: Path, release: bootstrap.Release, tarball: Path
) -> tuple[str, str]:
    """Download `release` and its signature; (SHA-256, signer) once both are checked."""
    signature = tarball.with_name(tarball.name + ".sig")
    log.info("downloading %s", release.url)
    try:
        bootstrap.download(release.signature_url, signature)
    except UserError as exc:
        raise UserError(
            f"no signature for {release.name}: {exc.message}",
            f"the tarball must come with its signature ({release.signature_url}); or give a "
            "tarball you checked yourself with azure.bootstrap_tarball and bootstrap_sha256",
        ) from None
    sha256 = bootstrap.download(release.url, tarball)
    signer = bootstrap.verify_signature(tarball, signature, _keyring(az), base)
    log.info("%s: good signature by %s", release.name, signer)
    if release.sha256 is not None and sha256 != release.sha256:
        raise UserError(
            f"{release.name} has SHA-256 {sha256}, but {bootstrap.SUMS} says {release.sha256}",
            "the mirror is being updated or damaged; try again later or another mirror",
        )
    return sha256, signer


def _obtain(az: AzureSettings, base: Path, old: State | None) -> tuple[State, Path | None]:
    """The state of the environment to use, and a tarball to unpack for it (None: the one
    unpacked already is it)."""
    downloads = base / "download"
    if az.bootstrap_tarball is not None:
        expected = az.bootstrap_sha256
        assert expected is not None  # the settings require it with bootstrap_tarball
        given = az.bootstrap_tarball
        reused = _usable(base, old, expected)
        if reused is not None:
            return reused, None
        if _is_url(given):
            name = os.path.basename(urllib.parse.urlparse(given).path) or "bootstrap.tar"
            tarball = downloads / name
            found = bootstrap.download(given, tarball)
            if found != expected:
                raise UserError(
                    f"{given} has SHA-256 {found}, not the expected {expected}",
                    "the download is damaged or not the tarball meant; check "
                    "azure.bootstrap_tarball and azure.bootstrap_sha256",
                )
        else:
            tarball = Path(given).expanduser()
            if not tarball.is_file():
                raise UserError(
                    f"azure.bootstrap_tarball: {tarball} does not exist",
                    "give the path or URL of a bootstrap tarball",
                )
            bootstrap.check_sha256(tarball, expected, "azure.bootstrap_tarball")
        return State(expected, tarball.name, given, None), tarball
    mirror = az.bootstrap_mirror
    try:
        release = bootstrap.newest(mirror)
    except UserError as exc:
        same_mirror = old is not None and old.origin.startswith(mirror.rstrip("/") + "/")
        if old is not None and same_mirror and _root(base, old).is_dir():
            # Verified when it was downloaded: an offline re-run can go on with it.
            log.warning("%s; using the build environment from %s", exc.message, old.name)
            return old, None
        raise
    reused = _usable(base, old, release.sha256)
    if reused is not None:
        return reused, None
    tarball = downloads / release.name
    try:
        sha256, signer = _download_verified(az, base, release, tarball)
    except BaseException:
        remove_path(downloads)  # nothing unverified stays behind
        raise
    reused = _usable(base, old, sha256)
    if reused is not None:
        return reused, None
    return State(sha256, release.name, release.url, signer), tarball


def _unpack(base: Path, state: State, tarball: Path) -> None:
    """Unpack `tarball` as the environment `state` names (all or nothing)."""
    with (
        complete_step(f"Unpacking {tarball.name} into {base / state.directory}"),
        atomic_path(base / state.directory) as tmp,
    ):
        tmp.mkdir()
        tree = bootstrap.unpack(tarball, tmp / "unpacked")
        os.rename(tree, tmp / "root")
        if (tmp / "unpacked").exists():
            os.rmdir(tmp / "unpacked")


def _remove_others(base: Path, keep: State, old: State | None) -> None:
    """Remove environments (and their images) other than `keep`'s."""
    for entry in sorted(base.iterdir()):
        if entry.is_dir() and _ENV_DIR.fullmatch(entry.name) and entry.name != keep.directory:
            log.info("removing the old build environment %s", entry)
            remove_path(entry)  # refuses to delete through a mount
    if old is not None:
        for runtime, image in old.images.items():
            if image not in keep.images.values() and shutil.which(runtime):
                run([runtime, "image", "rm", image], check=False)
    remove_path(base / "download")


def _keyring_source(root: Path) -> bool:
    return any(
        (root / d / "archlinux.gpg").is_file()
        for d in ("usr/share/pacman/keyrings", "usr/share/keyrings")
    )


def _init_keyring(env: BuildEnv) -> None:
    """`pacman-key --init` and `--populate archlinux`, inside, all or nothing."""
    with (
        complete_step("Initialising the build environment's pacman keyring"),
        atomic_path(env.root / "etc/pacman.d/gnupg") as tmp,
    ):
        tmp.mkdir(mode=0o700)
        gpgdir = env.inside_path(tmp)
        # gpg-agent started here ends with the command's namespace.
        env.run(["pacman-key", "--gpgdir", gpgdir, "--init"], timeout=600)
        env.run(["pacman-key", "--gpgdir", gpgdir, "--populate", "archlinux"], timeout=600)


def _install_tools(env: BuildEnv, az: AzureSettings, missing: list[str]) -> list[str]:
    packages = sorted({ARCH_PACKAGES.get(t) or PACKAGES.get(t, (t, ""))[0] for t in missing})
    lock = env.root / "var/lib/pacman/db.lck"
    if lock.exists():
        # No pacman can still run: each command's processes end with its namespace.
        log.warning("removing %s left by an interrupted pacman", lock)
        lock.unlink()
    argv = ["pacman", "--sync", "--refresh", "--needed", "--noconfirm"]
    if az.pacman_conf is not None:
        argv += ["--config", os.fspath(Path(az.pacman_conf).resolve())]
    with complete_step(f"Installing {' '.join(packages)} into the build environment"):
        env.run([*argv, *packages], timeout=3600)
    return packages


def _set_up(env: BuildEnv, az: AzureSettings, state: State, tools: Sequence[str]) -> State:
    """Mirror, keyring and tools of the environment (each done once, or when it changed)."""
    root = env.root
    resolv = root / "etc/resolv.conf"
    if not resolv.exists() and not resolv.is_symlink():
        # Something for the host's resolv.conf to be bind-mounted onto.
        write_if_changed(resolv, b"")
    mtab = root / "etc/mtab"
    if not mtab.exists() and not mtab.is_symlink():
        # pacman's CheckSpace reads the mounts there (Arch's filesystem package has it).
        mtab.symlink_to("../proc/self/mounts")
    arch = (root / "etc/arch-release").exists()
    mirrorlist = root / "etc/pacman.d/mirrorlist"
    if arch and state.mirror != az.mirror:
        text = f"# Written by archkernel from azure.mirror.\nServer = {az.mirror}\n"
        write_if_changed(mirrorlist, text.encode())
        state.mirror = az.mirror
    if not state.keyring and find_tool(root, "pacman-key") and _keyring_source(root):
        _init_keyring(env)
        state.keyring = True
    missing = [t for t in dict.fromkeys(tools) if find_tool(root, t) is None]
    if missing and arch and find_tool(root, "pacman"):
        state.installed = sorted({*state.installed, *_install_tools(env, az, missing)})
        missing = [t for t in missing if find_tool(root, t) is None]
    if missing:
        raise UserError(
            f"the build environment {state.name} lacks {', '.join(missing)}",
            "use Arch's bootstrap tarball (step 1 installs what it lacks), or a tarball "
            "that has these tools",
        )
    return state


def _ensure_image(env: BuildEnv, state: State, base: Path) -> BuildEnv:
    """The environment with its docker/podman image, imported from the tree if missing."""
    runtime = env.runtime
    tag = state.image_tag()
    probe = run(
        [runtime, "image", "inspect", "--format", "{{.Id}}", tag], capture=True, check=False
    )
    if probe.returncode != 0:
        answer = run([runtime, "version"], capture=True, check=False)
        if answer.returncode != 0:
            last = (answer.stderr.strip().splitlines() or ["no answer"])[-1]
            raise UserError(
                f"{runtime} does not answer: {last}",
                f"start {runtime} (e.g. systemctl start {runtime}), or set "
                "azure.container_runtime = 'chroot', which needs no daemon",
            )
        archive = base / "image.tar"
        message = f"archkernel build environment from {state.name} (sha256 {state.sha256})"
        with complete_step(f"Importing the build environment into {runtime} as {tag}"):
            try:
                run(["bsdtar", "--numeric-owner", "-cf", archive, "-C", env.root, "."])
                run([runtime, "import", "--message", message, archive, tag], timeout=3600)
            finally:
                archive.unlink(missing_ok=True)
    state.images[runtime] = tag
    return dataclasses.replace(env, image=tag)


def prepare(
    az: AzureSettings,
    workdir: Path,
    *,
    tools: Sequence[str] | None = None,
    binds: Iterable[Bind] = (),
) -> BuildEnv | None:
    """Step 1: obtain, verify, unpack (or reuse) and set up the build environment.

    None when `azure.builder` is "host". `tools` defaults to `required_tools(az)`; each
    must be in the environment (an Arch one gets what it lacks from `azure.mirror`).
    Leftover mounts under `workdir/buildenv` (from a crash) are undone first.
    """
    if az.builder != "container":
        return None
    base = directory(workdir)
    base.mkdir(parents=True, exist_ok=True)
    with _locked(base), complete_step("Preparing the build environment"):
        mounts.cleanup_stale(base)
        old = _read_state(base)
        state, tarball = _obtain(az, base, old)
        if tarball is None:
            log.info("reusing the build environment %s (sha256 %s)", state.name, state.sha256)
        else:
            if old is not None:
                log.info(
                    "the bootstrap tarball changed: %s (sha256 %s) -> %s (sha256 %s); "
                    "replacing the build environment",
                    old.name,
                    old.sha256[:16],
                    state.name,
                    state.sha256[:16],
                )
            _unpack(base, state, tarball)
        _write_state(base, state)
        _remove_others(base, state, old)
        env = _env(az, workdir, state, binds)
        state = _set_up(env, az, state, required_tools(az) if tools is None else tools)
        if env.runtime != "chroot":
            env = _ensure_image(env, state, base)
        _write_state(base, state)
    log.info("build environment: %s", env.describe())
    return env


# --- every step ---------------------------------------------------------------------------------


def load(az: AzureSettings, workdir: Path, *, binds: Iterable[Bind] = ()) -> BuildEnv:
    """The environment step 1 prepared, for these settings; UserError if there is none."""
    base = directory(workdir)
    state = _read_state(base)
    if state is None or not _root(base, state).is_dir():
        raise UserError(
            f"no build environment has been prepared in {base}",
            "run step 1 first (archkernel run azure_vhd --from 1)",
        )
    if az.bootstrap_tarball is not None and az.bootstrap_sha256 != state.sha256:
        raise UserError(
            f"the build environment in {base} is {state.name} (sha256 {state.sha256[:16]}), "
            f"not the tarball azure.bootstrap_sha256 names ({az.bootstrap_sha256})",
            "run step 1 again (archkernel run azure_vhd --from 1)",
        )
    return _env(az, workdir, state, binds)


@contextlib.contextmanager
def activate(
    az: AzureSettings, workdir: Path, *, binds: Iterable[Bind] = ()
) -> Iterator[BuildEnv | None]:
    """Run the build-environment commands of this block inside the environment.

    Yields the environment (None when `azure.builder` is "host": then nothing changes).
    Mounts a crashed run left under `workdir/buildenv` are undone on entry, and anything
    mounted there meanwhile on exit, Ctrl-C included.
    """
    if az.builder != "container":
        yield None
        return
    base = directory(workdir)
    env = load(az, workdir, binds=binds)
    mounts.cleanup_stale(base)
    if env.runtime != "chroot":
        state = _read_state(base)
        assert state is not None  # load() found it
        with _locked(base):
            env = _ensure_image(env, state, base)
            _write_state(base, state)
    log.debug("build environment: %s", env.describe())
    try:
        with wrapping(env):
            yield env
    except BaseException:
        try:
            mounts.cleanup_stale(base)
        except UserError as exc:
            log.warning("could not undo the mounts under %s: %s", base, exc.message)
        raise
    mounts.cleanup_stale(base)
