"""Step 1 prepares the build environment; every later step loads and activates it.

`prepare` obtains the bootstrap tarball (from `azure.bootstrap_mirror`, verified by its
signature, or `azure.bootstrap_tarball` checked by its SHA-256; see
`archkernel.azure.bootstrap`), unpacks it under `workdir/buildenv/<sha256 prefix>/root`,
points its pacman at `azure.mirror`, initialises its pacman keyring and installs build
tools it lacks, and records all that (`state`). `load` finds it again, `activate` makes
run() send the routed tools into it for the length of a block.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import tempfile
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from archkernel.azure import bootstrap
from archkernel.azure.buildenv.routing import (
    ARCH_PACKAGES,
    Bind,
    BuildEnv,
    Runtime,
    find_tool,
    merge_binds,
    pacman_conf_binds,
    resolve_in_root,
)
from archkernel.azure.buildenv.state import (
    ENV_DIR,
    State,
    directory,
    locked,
    read_state,
    root_of,
    write_state,
)
from archkernel.errors import UserError
from archkernel.host import mounts
from archkernel.host.files import atomic_path, remove_path, write_if_changed
from archkernel.host.run import PACKAGES, run, wrapping
from archkernel.log import complete_step, log
from archkernel.settings import AzureSettings, default_of

# The settings that make up the environment (for a step's config_changed): the tarball,
# where it runs, the mirror its pacman uses, the pacman.conf whose paths it shares and the
# package cache it shares.
SETTINGS = (
    "azure.builder",
    "azure.container_runtime",
    "azure.bootstrap_mirror",
    "azure.bootstrap_tarball",
    "azure.bootstrap_sha256",
    "azure.bootstrap_keyring",
    "azure.mirror",
    "azure.pacman_conf",
    "azure.package_cache",
)
# What every later step reads to enter the environment step 1 prepared (`activate`). They
# only find it: a change to any of them re-runs step 1, whose new record (a shared input of
# every step) then re-runs the rest.
ACTIVATION_SETTINGS = (
    "azure.builder",
    "azure.container_runtime",
    "azure.bootstrap_tarball",
    "azure.bootstrap_sha256",
    "azure.pacman_conf",
    "azure.package_cache",
)


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
    directory, what `azure.pacman_conf` points at (a local repository, its cache), the
    package cache `azure.package_cache` (read-write), and `extra`."""
    binds = [Bind(Path(workdir)), Bind(Path(tempfile.gettempdir()))]
    if az.pacman_conf is not None and az.pacman_conf.is_file():
        binds.append(Bind(az.pacman_conf, read_only=True))
        binds += pacman_conf_binds(az.pacman_conf.read_text(errors="replace"))
    if az.package_cache is not None:
        binds.append(Bind(Path(os.path.abspath(az.package_cache))))
    return merge_binds([*binds, *extra])


def _env(az: AzureSettings, workdir: Path, state: State, extra: Iterable[Bind]) -> BuildEnv:
    base = directory(workdir)
    runtime: Runtime = az.container_runtime
    return BuildEnv(
        root=root_of(base, state),
        sha256=state.sha256,
        name=state.name,
        runtime=runtime,
        image=state.images.get(runtime) if runtime != "chroot" else None,
        binds=shared_paths(az, base.parent, extra),
    )


def _is_url(text: str) -> bool:
    return bool(re.match(r"(https?|ftp|file)://", text))


def _usable(base: Path, state: State | None, sha256: str | None) -> State | None:
    if state is not None and state.sha256 == sha256 and root_of(base, state).is_dir():
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
        if old is not None and same_mirror and root_of(base, old).is_dir():
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


def in_tree(root: Path, inside: str) -> Path:
    """Where the host writes (or removes) `inside`, a path in the environment `root`: its
    directories taken as the environment's programs take them (links followed from `root`,
    `resolve_in_root`) and made if missing, its last name not followed (a file there is
    replaced, not written through). However the tree's links point, it lies in `root`."""
    *directories, name = [p for p in inside.split("/") if p not in ("", ".")]
    where = root
    for index, part in enumerate(directories):
        found = resolve_in_root(root, "/".join(directories[: index + 1]))
        if found is None and not (where / part).is_symlink():
            found = where / part
            found.mkdir()
        if found is None or not found.is_dir():
            raise UserError(
                f"/{'/'.join(directories[: index + 1])} in the build environment {root} is "
                "not a directory",
                "use Arch's bootstrap tarball, or a tarball that is a root file system",
            )
        where = found
    return where / name


def _remove_others(base: Path, keep: State, old: State | None) -> None:
    """Remove environments (and their images) other than `keep`'s."""
    for entry in sorted(base.iterdir()):
        if entry.is_dir() and ENV_DIR.fullmatch(entry.name) and entry.name != keep.directory:
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
        atomic_path(in_tree(env.root, "etc/pacman.d/gnupg")) as tmp,
    ):
        tmp.mkdir(mode=0o700)
        gpgdir = env.inside_path(tmp)
        # gpg-agent started here ends with the command's namespace.
        env.run(["pacman-key", "--gpgdir", gpgdir, "--init"], timeout=600)
        env.run(["pacman-key", "--gpgdir", gpgdir, "--populate", "archlinux"], timeout=600)


def _install_tools(env: BuildEnv, az: AzureSettings, missing: list[str]) -> list[str]:
    packages = sorted({ARCH_PACKAGES.get(t) or PACKAGES.get(t, (t, ""))[0] for t in missing})
    lock = in_tree(env.root, "var/lib/pacman/db.lck")
    if lock.exists():
        # No pacman can still run: each command's processes end with its namespace.
        log.warning("removing %s left by an interrupted pacman", lock)
        lock.unlink()
    argv = ["pacman", "--sync", "--refresh", "--needed", "--noconfirm"]
    if az.pacman_conf is not None:
        argv += ["--config", os.fspath(Path(az.pacman_conf).resolve())]
    if az.package_cache is not None:
        # Its tools come from the same mirror as the image's packages: one cache for both.
        argv += ["--cachedir", os.path.abspath(az.package_cache)]
    with complete_step(f"Installing {' '.join(packages)} into the build environment"):
        env.run([*argv, *packages], timeout=3600)
    return packages


def _set_up(env: BuildEnv, az: AzureSettings, state: State, tools: Sequence[str]) -> State:
    """Mirror, keyring and tools of the environment (each done once, or when it changed)."""
    # Everything written from here goes through `in_tree`: never through a link out of it.
    root = env.root
    resolv = in_tree(root, "etc/resolv.conf")
    if not resolv.exists() and not resolv.is_symlink():
        # Something for the host's resolv.conf to be bind-mounted onto.
        write_if_changed(resolv, b"")
    mtab = in_tree(root, "etc/mtab")
    if not mtab.exists() and not mtab.is_symlink():
        # pacman's CheckSpace reads the mounts there (Arch's filesystem package has it).
        mtab.symlink_to("../proc/self/mounts")
    arch = (root / "etc/arch-release").exists()
    if arch and state.mirror != az.mirror:
        text = f"# Written by archkernel from azure.mirror.\nServer = {az.mirror}\n"
        write_if_changed(in_tree(root, "etc/pacman.d/mirrorlist"), text.encode())
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
    with locked(base), complete_step("Preparing the build environment"):
        mounts.cleanup_stale(base)
        old = read_state(base)
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
        write_state(base, state)
        _remove_others(base, state, old)
        env = _env(az, workdir, state, binds)
        state = _set_up(env, az, state, required_tools(az) if tools is None else tools)
        if env.runtime != "chroot":
            env = _ensure_image(env, state, base)
        write_state(base, state)
    log.info("build environment: %s", env.describe())
    return env


# --- every step ---------------------------------------------------------------------------------


def load(az: AzureSettings, workdir: Path, *, binds: Iterable[Bind] = ()) -> BuildEnv:
    """The environment step 1 prepared, for these settings; UserError if there is none."""
    base = directory(workdir)
    state = read_state(base)
    if state is None or not root_of(base, state).is_dir():
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
        state = read_state(base)
        assert state is not None  # load() found it
        with locked(base):
            env = _ensure_image(env, state, base)
            write_state(base, state)
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
