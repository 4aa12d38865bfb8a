"""azure_vhd: an Arch Linux image that Azure accepts, one function per numbered step.

Build-environment tools (pacstrap, sfdisk, mkfs, GRUB's installer) run on the build host,
or with `azure.builder = "container"` in the bootstrap build environment step 1 prepares
(`archkernel.buildenv`: every step runs in `buildenv.activate`, which routes those tools
into it); tools that must match the image (mkinitcpio, unit enabling) act on the image's
root (`arch-chroot`, `systemctl --root`). What the files say is decided in `azureconf`.

The firmware the image boots with (`azure.firmware`: bios for generation 1, uefi for
generation 2, or hybrid) decides the partition layout (`disk.plan_layout`), the GRUB
platforms staged and installed (`grub`), and whether there is an EFI system partition,
made FAT by `esp` and mounted at /efi by fstab.

Trees and images are large, so steps record small JSON stamps as their doit targets and
write the big outputs under temporary names, renamed when complete. The raw disk image
becomes the VHD by appending a footer and renaming (O(1)); a re-run of an earlier disk step
takes it back the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from archkernel import azureconf as conf
from archkernel import buildenv, disk, esp, grub, initramfs, mounts, qemu, vhd
from archkernel.errors import UserError
from archkernel.fileio import (
    atomic_path,
    remove_path,
    write_if_changed,
    write_text,
)
from archkernel.log import log
from archkernel.run import check_tools, command_error, render, run
from archkernel.settings import AzureSettings, Settings, format_size

KERNEL = "/boot/vmlinuz-linux"
INITRD = "/boot/initramfs-linux.img"
HOST_TOOLS = [
    "pacman",
    "pacstrap",
    "arch-chroot",
    "systemctl",
    "useradd",
    "sfdisk",
    "mkfs.ext4",
    "e2fsck",
    "blkid",
    "losetup",
    "mount",
    "umount",
    "grub-mkimage",
    "cp",
]
# The EFI system partition (uefi, hybrid): made, filled, listed and checked without a
# mount; core.efi is read back from the root file system with debugfs.
UEFI_TOOLS = ["mkfs.fat", "mcopy", "mdir", "fsck.fat", "debugfs"]


@dataclass(frozen=True)
class Paths:
    """The workflow's files under `workdir/azure`."""

    work: Path
    output_name: str

    @property
    def pacman_conf(self) -> Path:
        return self.work / "pacman.conf"

    @property
    def gnupg(self) -> Path:
        return self.work / "gnupg"

    @property
    def ids(self) -> Path:
        return self.work / "ids.json"

    @property
    def preflight(self) -> Path:
        return self.work / "preflight.json"

    @property
    def root(self) -> Path:
        return self.work / "root"

    @property
    def packages(self) -> Path:
        return self.work / "packages.txt"

    @property
    def image_root(self) -> Path:
        return self.work / "image-root"

    @property
    def configured(self) -> Path:
        return self.work / "configure.json"

    @property
    def agent(self) -> Path:
        return self.work / "agent.json"

    @property
    def initramfs(self) -> Path:
        return self.work / "initramfs.json"

    @property
    def raw(self) -> Path:
        return self.work / "disk.img"

    @property
    def disk(self) -> Path:
        return self.work / "disk.json"

    @property
    def bootloader(self) -> Path:
        return self.work / "bootloader.json"

    @property
    def vhd(self) -> Path:
        return self.work / self.output_name

    @property
    def vhd_stamp(self) -> Path:
        return self.work / "vhd.json"

    @property
    def report(self) -> Path:
        return self.work / "verify.json"

    @property
    def summary(self) -> Path:
        return self.work / "verify.txt"

    @property
    def console(self) -> Path:
        return self.work / "boottest.log"

    @property
    def boottest(self) -> Path:
        return self.work / "boottest.json"


def paths(settings: Settings) -> Paths:
    """The workflow's paths for these settings."""
    return Paths(settings.workdir.resolve() / "azure", settings.azure.output)


def _json(path: Path, data: Any) -> bool:
    return write_if_changed(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def tree_id(stamp: Path) -> str | None:
    """Which copy of the image tree a stamp of steps 3-5 describes.

    Step 3 makes a new copy of the tree each time it runs; steps 4 and 5 edit that copy.
    Their stamps carry the copy's identity, so a new copy changes them and doit runs the
    later steps on it (an unchanged configuration would otherwise leave them "up to date"
    with their work gone with the old copy)."""
    try:
        value = json.loads(stamp.read_text()).get("tree")
    except (OSError, ValueError):
        return None
    return str(value) if value is not None else None


def root_uuid(p: Paths) -> str:
    """The root file system's UUID, chosen once by step 1 and kept."""
    return str(json.loads(p.ids.read_text())["root_uuid"])


def esp_volume(p: Paths) -> str:
    """The EFI system partition's FAT volume ID (`1234-ABCD`), chosen once by step 1."""
    return str(json.loads(p.ids.read_text())["esp_volume"])


def choose_ids(p: Paths, az: AzureSettings) -> None:
    """Choose the image's IDs that are not chosen yet: the root file system's UUID, and
    for a UEFI image the ESP's volume ID. Chosen ones never change (fstab, the file
    systems and GRUB's core images are made with them)."""
    chosen = json.loads(p.ids.read_text()) if p.ids.exists() else {}
    new = {"root_uuid": str(uuid.uuid4())}
    if az.firmware != "bios":
        volume = uuid.uuid4().hex[:8].upper()
        new["esp_volume"] = f"{volume[:4]}-{volume[4:]}"
    # Unchanged IDs leave the file as it is: the steps that read it stay up to date.
    _json(p.ids, {**new, **chosen})


def build_environment(settings: Settings) -> AbstractContextManager[buildenv.BuildEnv | None]:
    """The block in which build tools run in the bootstrap build environment (builder =
    container; it yields it) or, for builder = host, on the host (it yields None)."""
    return buildenv.activate(settings.azure, settings.workdir)


def grub_dirs(env: buildenv.BuildEnv | None) -> tuple[Path, Path]:
    """GRUB's i386-pc and x86_64-efi directories: the build environment's (as host paths:
    modules and core images must come from the GRUB build that runs), or the host's."""
    if env is None:
        return grub.GRUB_I386_PC, grub.GRUB_X86_64_EFI
    bios, efi = (
        buildenv.resolve_in_root(env.root, os.fspath(d)) or env.host_path(os.fspath(d))
        for d in (grub.GRUB_I386_PC, grub.GRUB_X86_64_EFI)
    )
    return bios, efi


# --- step 1 -------------------------------------------------------------------------------


def _probe_mirror(mirror: str, timeout: float = 20.0) -> None:
    url = conf.mirror_probe_url(mirror)
    if not url.startswith(("http://", "https://", "ftp://")):
        return
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (checked scheme)
            response.read(1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(
            f"the mirror {mirror} does not answer ({url}: {reason})",
            "check the network, or set azure.mirror to a reachable mirror, or azure.pacman_conf "
            "to a pacman.conf for a local mirror or cache",
        ) from None


def _init_keyring(p: Paths) -> None:
    """A pacman keyring for the build, in workdir, from the host's Arch Linux keyring."""
    if (p.gnupg / "pubring.gpg").exists() or (p.gnupg / "pubring.kbx").exists():
        return
    with atomic_path(p.gnupg) as tmp:
        tmp.mkdir(mode=0o700)
        try:
            run(["pacman-key", "--gpgdir", tmp, "--init"], timeout=600)
            run(["pacman-key", "--gpgdir", tmp, "--populate", "archlinux"], timeout=600)
        finally:
            run(["gpgconf", "--homedir", tmp, "--kill", "all"], check=False)


def preflight_tools(az: AzureSettings) -> list[str]:
    """The tools the build runs, for these settings (with builder = container, the build
    environment's tools count for the routed ones)."""
    tools = list(HOST_TOOLS)
    if az.pacman_conf is None:
        tools += ["pacman-key", "gpgconf"]
    if az.firmware != "bios":
        tools += UEFI_TOOLS
    if az.builder == "container":
        tools.append("unshare" if az.container_runtime == "chroot" else az.container_runtime)
    return list(dict.fromkeys(tools))


def step_preflight(settings: Settings) -> None:
    """Step 1: the build environment ready (builder = container), every tool present, the
    pacman.conf ready, the image's IDs chosen."""
    az, p = settings.azure, paths(settings)
    tools = preflight_tools(az)
    buildenv.prepare(az, settings.workdir)  # None with builder = "host"
    with build_environment(settings) as env:
        where = "" if env is None else " (on the host or in the build environment)"
        check_tools(tools, f"azure_vhd{where}")
        bios_lib, efi_lib = grub_dirs(env)
        grub.check_platforms(az.firmware, bios_lib=bios_lib, efi_lib=efi_lib)
        _prepare_pacman_conf(az, p)
    choose_ids(p, az)
    _json(p.preflight, {"tools": sorted(tools), "pacman_conf": str(p.pacman_conf)})
    log.info("tools present; pacman.conf %s; root UUID %s", p.pacman_conf, root_uuid(p))


def _prepare_pacman_conf(az: AzureSettings, p: Paths) -> None:
    p.work.mkdir(parents=True, exist_ok=True)
    if az.pacman_conf is not None:
        if not az.pacman_conf.is_file():
            raise UserError(
                f"azure.pacman_conf: {az.pacman_conf} does not exist",
                "point it at an existing pacman.conf, or remove it to use azure.mirror",
            )
        text = az.pacman_conf.read_text(encoding="utf-8", errors="replace")
        if "[options]" not in text:
            raise UserError(
                f"azure.pacman_conf: {az.pacman_conf} has no [options] section",
                "give a complete pacman.conf (see pacman.conf(5))",
            )
        write_if_changed(p.pacman_conf, text.encode())
    else:
        _probe_mirror(az.mirror)
        _init_keyring(p)
        write_if_changed(p.pacman_conf, conf.pacman_conf(az.mirror, str(p.gnupg)).encode())


# --- processes left working in a tree ------------------------------------------------------


def _is_under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def processes_in(tree: Path, table: Iterable[tuple[int, list[str], str]]) -> list[int]:
    """Of the processes (pid, argv, root directory) in `table`, those working in `tree`:
    an argument names it or a path below it (`pacman -r TREE`, `--cachedir=TREE/...`), or
    they are chrooted inside it."""
    base = os.path.realpath(tree)
    found = []
    for pid, argv, root in table:
        paths = [arg.split("=", 1)[-1] for arg in argv]
        if any(_is_under(x, base) for x in paths) or _is_under(root, base):
            found.append(pid)
    return found


def _process_table() -> Iterator[tuple[int, list[str], str]]:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
            root = os.readlink(entry / "root")
        except OSError:  # gone meanwhile, or a kernel thread
            continue
        yield int(entry.name), [os.fsdecode(a) for a in raw.split(b"\0") if a], root


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"  # a zombie no longer runs


def stop_processes_in(tree: Path, timeout: float = 10.0) -> list[int]:
    """SIGKILL the processes still working in `tree` and wait until they are gone.

    pacstrap runs pacman as PID 1 of a new PID namespace (`unshare --fork --pid`), and
    pacman ignores Ctrl-C while it unpacks packages: killing pacstrap leaves it writing
    into the tree, so the tree could be neither removed nor trusted.
    """
    pids = processes_in(tree, _process_table())
    for pid in pids:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            name = "?"
        log.info("stopping process %d (%s), still working in %s", pid, name, tree)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while not all(_gone(pid) for pid in pids):
        if time.monotonic() > deadline:
            raise UserError(
                f"processes {pids} still work in {tree} after SIGKILL",
                "wait for them to end (they may be stuck on a file system), then run again",
            )
        time.sleep(0.05)
    return pids


def release_tree(tree: Path) -> None:
    """Stop what still works in `tree` and undo the mounts inside it (after a chroot)."""
    stop_processes_in(tree)
    mounts.cleanup_stale(tree)


def release_stale_trees(target: Path) -> None:
    """Release the temporary trees of `target` left by killed runs (their owner is gone)."""
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        owner = tmp.name.rsplit("-", 1)[-1]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            release_tree(tmp)


# --- step 2 -------------------------------------------------------------------------------


def _kill_gpg_agents(root: Path) -> None:
    for home in (root / "etc/pacman.d/gnupg",):
        if home.is_dir():
            run(["gpgconf", "--homedir", home, "--kill", "all"], check=False)


def pacman_errors(output: str) -> list[str]:
    """pacman's own `error: ...` lines in `output` (what went wrong, in its words), once each."""
    found = [
        line.strip().removeprefix("error: ")
        for line in output.splitlines()
        if line.strip().startswith("error: ")
    ]
    return list(dict.fromkeys(found))


def pacstrap_error(argv: list[str], code: int, stderr: str) -> UserError:
    """The UserError for a failed pacstrap: pacman's reasons on the first line, if it gave any."""
    errors = pacman_errors(stderr)
    if code < 0 or not errors:
        return command_error(argv, code, stderr)
    if any(e.startswith("target not found") for e in errors):
        hint = "check the names in azure.packages and azure.extra_packages (pacman -Sl lists them)"
    else:
        hint = "see pacman's output above; check azure.mirror or azure.pacman_conf"
    return UserError(f"pacstrap could not install the packages: {'; '.join(errors)}", hint)


def pacstrap_argv(pacman_conf: Path, root: Path, packages: list[str]) -> list[str]:
    """The pacstrap command that installs `packages` into `root` (the host's cache, no
    keyring copied, no mirror list copied)."""
    return ["pacstrap", "-C", str(pacman_conf), "-c", "-G", "-M", str(root), *packages]


def step_pacstrap(settings: Settings) -> None:
    """Step 2: pacstrap the packages into a directory; write the package manifest."""
    az, p = settings.azure, paths(settings)
    release_stale_trees(p.root)  # a killed run's pacman may still be writing
    mounts.cleanup_stale(p.work)
    packages = az.all_packages()
    log.info("pacstrap: %s", " ".join(packages))
    with build_environment(settings), atomic_path(p.root) as tmp:
        tmp.mkdir()
        try:
            argv = pacstrap_argv(p.pacman_conf, tmp, packages)
            proc = run(argv, check=False, timeout=3 * 3600)
            if proc.returncode != 0:
                raise pacstrap_error(argv, proc.returncode, proc.stderr)
        finally:
            # Also on Ctrl-C and errors, before atomic_path removes the tree.
            stop_processes_in(tmp)
            _kill_gpg_agents(tmp)
            mounts.cleanup_stale(tmp)
        listing = run(["pacman", "--root", tmp, "-Q"], capture=True).stdout
    write_if_changed(p.packages, listing.encode())
    log.info("installed %d packages; manifest %s", len(listing.splitlines()), p.packages)


# --- step 3 -------------------------------------------------------------------------------


def _owned_write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, text, mode)


def _symlink(path: Path, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.exists():
        path.unlink()
    path.symlink_to(target)


def _passwd_ids(root: Path, user: str) -> tuple[int, int]:
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return int(fields[2]), int(fields[3])
    raise UserError(f"user {user} was not created in the image", "see useradd's output above")


def _add_user(root: Path, az: AzureSettings) -> None:
    user = az.user
    if user is None:
        return
    run(
        [
            "useradd",
            "--root",
            root,
            "--create-home",
            "--user-group",
            "--groups",
            "wheel",
            "--shell",
            "/bin/bash",
            user.name,
        ]
    )
    shadow = root / "etc/shadow"
    if user.password_hash is not None:
        # Written here rather than with `usermod -p`, so the hash is on no command line.
        lines = []
        for line in shadow.read_text().splitlines():
            fields = line.split(":")
            if fields[0] == user.name:
                fields[1] = user.password_hash.get_secret_value()
            lines.append(":".join(fields))
        write_text(shadow, "\n".join(lines) + "\n", 0o600)
    uid, gid = _passwd_ids(root, user.name)
    home = root / "home" / user.name
    ssh = home / ".ssh"
    ssh.mkdir(mode=0o700, parents=True, exist_ok=True)
    keys = ssh / "authorized_keys"
    write_text(keys, "".join(k + "\n" for k in user.ssh_authorized_keys), 0o600)
    for path in (home, ssh, keys):
        os.chown(path, uid, gid)
    log.info("user %s (wheel) with %d SSH key(s)", user.name, len(user.ssh_authorized_keys))


def _units_available(root: Path) -> set[str]:
    found: set[str] = set()
    for base in ("usr/lib/systemd/system", "etc/systemd/system"):
        directory = root / base
        if directory.is_dir():
            found.update(p.name for p in directory.iterdir())
    return found


def enable_units(root: Path, units: list[str]) -> None:
    """`systemctl --root` enable `units` in the image (their [Install] sections)."""
    if units:
        run(["systemctl", f"--root={root}", "enable", *units])


def step_configure(settings: Settings) -> None:
    """Step 3: a fresh copy of the tree, configured: names, network, sshd, users, clean-up."""
    az, p = settings.azure, paths(settings)
    # A killed arch-chroot (locale-gen) leaves its API mounts in the temporary tree.
    release_stale_trees(p.image_root)
    mounts.cleanup_stale(p.work)
    uid = root_uuid(p)
    # A UEFI image mounts its EFI system partition (its volume ID chosen by step 1).
    esp_id = esp_volume(p) if az.firmware != "bios" else None
    with build_environment(settings), atomic_path(p.image_root) as tree:
        run(["cp", "-a", "--reflink=auto", p.root, tree])
        etc = tree / "etc"
        _owned_write(etc / "hostname", az.hostname + "\n")
        _owned_write(etc / "locale.gen", conf.locale_gen(az.locale))
        _owned_write(etc / "locale.conf", f"LANG={az.locale}\n")
        _owned_write(etc / "vconsole.conf", f"KEYMAP={az.keymap}\n")
        zone = tree / "usr/share/zoneinfo" / az.timezone
        if not zone.exists():
            raise UserError(
                f"azure.timezone: {az.timezone!r} is not in the image's /usr/share/zoneinfo",
                "use a name such as UTC or Europe/Paris (the tzdata package must be installed)",
            )
        _symlink(etc / "localtime", f"/usr/share/zoneinfo/{az.timezone}")
        if (tree / "usr/bin/locale-gen").exists():
            try:
                run(["arch-chroot", tree, "locale-gen"], timeout=600)
            finally:
                release_tree(tree)  # so atomic_path can remove the tree if this failed
        else:
            log.warning("the image has no locale-gen; %s is not compiled", az.locale)
        _owned_write(etc / "fstab", conf.fstab(uid, esp_id))
        if esp_id is not None:
            (tree / conf.ESP_MOUNT.lstrip("/")).mkdir(mode=0o755, exist_ok=True)
        _owned_write(etc / "systemd/network/20-eth0.network", conf.networkd_eth0())
        _symlink(etc / "resolv.conf", "/run/systemd/resolve/stub-resolv.conf")
        password_login = az.user is not None and az.user.password_hash is not None
        if az.user is not None and az.user.ssh_authorized_keys:
            password_login = False
        _owned_write(tree / conf.SSHD_DROPIN, conf.sshd_dropin(password_login))
        _owned_write(etc / "sudoers.d/10-wheel", conf.sudoers_wheel(), 0o440)
        _owned_write(etc / "modules-load.d/azure-provisioning.conf", conf.modules_load())
        _owned_write(tree / "usr/lib/systemd/system/pacman-init.service", conf.pacman_init_unit())
        shadow = etc / "shadow"
        write_text(shadow, conf.lock_root(shadow.read_text()), 0o600)
        _add_user(tree, az)
        # Nothing of the build host may stay: identity, host keys, keyring secrets.
        write_text(etc / "machine-id", "", 0o444)
        for key in etc.glob("ssh/ssh_host_*"):
            key.unlink()
        remove_path(etc / "pacman.d/gnupg")
        units = [u for u in conf.BASE_UNITS + conf.OPTIONAL_UNITS if u in _units_available(tree)]
        enable_units(tree, units)
    _json(
        p.configured,
        {
            "hostname": az.hostname,
            "root_uuid": uid,
            "esp_volume": esp_id,
            "units": units,
            "locale": az.locale,
            "tree": str(uuid.uuid4()),  # this copy of the tree (see tree_id)
        },
    )
    log.info("configured %s: host %s, units %s", p.image_root, az.hostname, " ".join(units))


# --- step 4 -------------------------------------------------------------------------------


def step_agent(settings: Settings) -> None:
    """Step 4: cloud-init for Azure, or waagent, configured and enabled."""
    az, p = settings.azure, paths(settings)
    tree = p.image_root
    available = _units_available(tree)
    wants_agent = az.provisioning == "waagent" or az.extensions
    if az.provisioning == "cloud-init":
        if not (tree / "etc/cloud").is_dir():
            raise UserError(
                "provisioning is cloud-init but the image has no /etc/cloud",
                f"install {az.cloud_init_package} (azure.cloud_init_package)",
            )
        _owned_write(tree / "etc/cloud/cloud.cfg.d/90-archkernel-azure.cfg", conf.cloud_init_cfg())
    if wants_agent:
        agent_conf = tree / "etc/waagent.conf"
        if not agent_conf.is_file() or conf.WAAGENT_UNIT not in available:
            raise UserError(
                f"the image has no Azure Linux Agent ({agent_conf} or {conf.WAAGENT_UNIT} missing)",
                f"azure.agent_package ({az.agent_package}) must provide them; it is not in "
                "Arch's official repositories: build it from the AUR into a local repository",
            )
        values = conf.waagent_values(az.provisioning)
        write_text(agent_conf, conf.set_conf_values(agent_conf.read_text(), values))
        _owned_write(tree / conf.WAAGENT_DROPIN, conf.waagent_dropin())
    units = [u for u in conf.units_to_enable(az, available) if u not in conf.BASE_UNITS]
    if az.provisioning == "cloud-init" and not any(u in conf.CLOUD_INIT_UNITS for u in units):
        raise UserError(
            "the image has no cloud-init units to enable",
            f"install {az.cloud_init_package} (azure.cloud_init_package)",
        )
    with build_environment(settings):
        enable_units(tree, units)
    _json(
        p.agent,
        {
            "provisioning": az.provisioning,
            "extensions": az.extensions,
            "units": units,
            "tree": tree_id(p.configured),
        },
    )
    log.info("provisioning by %s; enabled %s", az.provisioning, " ".join(units))


# --- step 5 -------------------------------------------------------------------------------


def initramfs_modules(image: Path) -> set[str]:
    """Module names (no suffix) inside an initramfs image."""
    from archkernel.kmod import module_name

    data = image.read_bytes()
    entries = initramfs.read_entries(data, source=str(image))
    return {
        module_name(e.path)
        for e in entries
        if e.type == "file"
        and any(e.path.endswith(s) for s in (".ko", ".ko.gz", ".ko.xz", ".ko.zst"))
    }


def step_initramfs(settings: Settings) -> None:
    """Step 5: mkinitcpio -P inside the image, with the Hyper-V modules and no autodetect."""
    az, p = settings.azure, paths(settings)
    tree = p.image_root
    mounts.cleanup_stale(p.work)
    config = tree / "etc/mkinitcpio.conf"
    if not config.is_file():
        raise UserError(
            "the image has no /etc/mkinitcpio.conf", "install mkinitcpio (azure.packages)"
        )
    write_text(config, conf.mkinitcpio_conf(config.read_text(), az.initramfs_modules))
    for old in tree.glob("boot/initramfs-*.img"):
        old.unlink()
    with build_environment(settings):
        run(["arch-chroot", tree, "mkinitcpio", "-P"], timeout=1800)
    images = sorted(tree.glob("boot/initramfs-*.img"))
    if not images:
        raise UserError("mkinitcpio -P made no /boot/initramfs-*.img", "see its output above")
    found: dict[str, list[str]] = {}
    for image in images:
        modules = initramfs_modules(image)
        missing = [m for m in az.initramfs_modules if m.replace("-", "_") not in modules]
        if missing:
            raise UserError(
                f"{image.name} lacks {', '.join(missing)} although mkinitcpio.conf asks for them",
                "the image's mkinitcpio ignored MODULES; check /etc/mkinitcpio.conf in the image",
            )
        found[image.name] = sorted(m for m in modules if m in az.initramfs_modules)
    _json(p.initramfs, {"images": found, "tree": tree_id(p.agent)})
    log.info("initramfs %s holds %s", ", ".join(found), " ".join(az.initramfs_modules))


# --- step 6 -------------------------------------------------------------------------------


def layout_for(az: AzureSettings) -> disk.Layout:
    """The partition layout of the image, for the firmware it boots with."""
    return disk.plan_layout(az.disk_size, az.partition_table, boot=az.firmware)


def unstage_other_platforms(rootdir: Path, boot: str) -> None:
    """Remove GRUB platform directories an earlier run of step 6 staged for another boot
    mode: the image gets only what its firmware uses."""
    wanted = {"bios": {"i386-pc"}, "uefi": {"x86_64-efi"}}.get(boot, {"i386-pc", "x86_64-efi"})
    for platform in ("i386-pc", "x86_64-efi"):
        if platform not in wanted:
            remove_path(rootdir / grub.PREFIX.lstrip("/") / platform)


def take_back_raw(p: Paths) -> None:
    """Make disk.img the raw image again if step 8 already turned it into the VHD."""
    if p.raw.exists() or not p.vhd.exists():
        return
    size = vhd.strip_footer(p.vhd)
    os.rename(p.vhd, p.raw)
    p.vhd_stamp.unlink(missing_ok=True)
    log.info("took the raw image (%s) back from %s", format_size(size), p.vhd.name)


def step_disk(settings: Settings) -> None:
    """Step 6: sparse disk, partition table, GRUB files and ext4 root from the tree, and
    the EFI system partition's FAT (uefi, hybrid)."""
    az, p = settings.azure, paths(settings)
    mounts.cleanup_stale(p.work)
    uid = root_uuid(p)
    layout = layout_for(az)
    esp_id = esp_volume(p) if layout.boots_uefi else None
    with build_environment(settings) as env:
        bios_lib, efi_lib = grub_dirs(env)
        cfg = grub.grub_cfg(uid, KERNEL, INITRD, az.kernel_cmdline)
        unstage_other_platforms(p.image_root, layout.boot)
        grub.stage_grub_files(
            p.image_root, layout.boot, cfg, root_uuid=uid, bios_lib=bios_lib, efi_lib=efi_lib
        )
        # With GRUB's files: they go into the root file system too.
        disk.check_disk_size(p.image_root, az.disk_size, az.partition_table, boot=layout.boot)
        # From here on the old disk is destroyed: drop the stamps that describe it first, so
        # a run killed from now on re-runs this step rather than finding it done (a re-run
        # after `--from 6` keeps doit's record of the earlier success).
        p.disk.unlink(missing_ok=True)
        p.bootloader.unlink(missing_ok=True)
        p.vhd.unlink(missing_ok=True)  # any earlier VHD holds an older disk
        p.vhd_stamp.unlink(missing_ok=True)
        unlink_outputs(p)  # and so does the verify report about it
        with atomic_path(p.raw) as tmp:
            disk.create_disk(tmp, layout)
            disk.make_ext4(tmp, layout.root, p.image_root, uuid=uid)
            disk.check_ext4(tmp, layout.root)
            if esp_id is not None:
                esp.make_fat(tmp, layout.esp, volume=esp_id)
    _json(
        p.disk,
        {
            "size": az.disk_size,
            "table": az.partition_table,
            "boot": layout.boot,
            "root_uuid": uid,
            "esp_volume": esp_id,
            "partitions": [
                {"number": x.number, "role": x.role, "start": x.start, "size": x.size}
                for x in layout.partitions
            ],
        },
    )
    log.info(
        "disk %s: %s %s for %s, root UUID %s",
        p.raw,
        format_size(az.disk_size),
        az.partition_table,
        layout.boot,
        uid,
    )


# --- step 7 -------------------------------------------------------------------------------


def step_bootloader(settings: Settings) -> None:
    """Step 7: GRUB for the image's firmware: boot code and core.img (BIOS), core.efi at
    the ESP's removable path EFI/BOOT/BOOTX64.EFI (UEFI), or both (hybrid)."""
    az, p = settings.azure, paths(settings)
    mounts.cleanup_stale(p.work)
    p.bootloader.unlink(missing_ok=True)  # killed while writing boot code: not done
    take_back_raw(p)
    if not p.raw.exists():
        raise UserError(f"the disk image {p.raw} is gone", "run again with --from 6")
    p.vhd.unlink(missing_ok=True)
    layout = layout_for(az)
    with build_environment(settings) as env:
        bios_lib, _ = grub_dirs(env)
        installed = grub.install_grub(p.raw, layout, root_uuid=root_uuid(p), bios_lib=bios_lib)
        if layout.boots_uefi:
            esp.check_fat(p.raw, layout.esp)
    _json(
        p.bootloader,
        {
            "grub": installed,
            "boot": layout.boot,
            "root_uuid": root_uuid(p),
            "table": az.partition_table,
        },
    )
    log.info("GRUB %s installed in %s", " and ".join(installed), p.raw)


# --- step 8 -------------------------------------------------------------------------------


def step_vhd(settings: Settings) -> None:
    """Step 8: append the fixed-VHD footer and rename: O(1), whatever the disk size."""
    p = paths(settings)
    if not p.raw.exists():
        if p.vhd.exists():
            vhd.check_or_raise(p.vhd)
            log.info("%s is already the VHD of the current disk", p.vhd)
        else:
            raise UserError(f"the disk image {p.raw} is gone", "run again with --from 6")
    else:
        footer = vhd.append_footer(p.raw)
        os.replace(p.raw, p.vhd)
        log.info(
            "VHD %s: %s fixed, unique id %s",
            p.vhd,
            format_size(footer.current_size),
            footer.unique_id,
        )
    footer = vhd.check_or_raise(p.vhd)
    _json(
        p.vhd_stamp, {"vhd": str(p.vhd), "size": footer.current_size, "id": str(footer.unique_id)}
    )


def unlink_outputs(p: Paths) -> None:
    """Remove outputs an earlier step makes stale (used when a step re-runs)."""
    for path in (p.report, p.summary):
        path.unlink(missing_ok=True)


# --- what steps 6-8 would run (for --dry-run; nothing here runs or writes) ------------------

Planned = list[list[str] | str]  # argv lists, and descriptions of what is not a command


def _planned_ids(p: Paths) -> tuple[str, str]:
    """The IDs step 1 chose, or placeholders before it ran."""
    try:
        return root_uuid(p), esp_volume(p)
    except (OSError, ValueError, KeyError):
        return "ROOT-UUID-FROM-STEP-1", "0000-0000"


def _planned_tmp(name: str) -> Path:
    return Path(tempfile.gettempdir()) / "archkernel-grub-XXXXXXXX" / name


def _in_environment(az: AzureSettings) -> Planned:
    if az.builder != "container":
        return []
    return [f"build tools run in the bootstrap build environment ({az.container_runtime})"]


def disk_commands(settings: Settings) -> Planned:
    """What step 6 runs: GRUB's core images staged into the tree, the partition table,
    ext4 from the tree, e2fsck, and the ESP's FAT (uefi, hybrid)."""
    az, p = settings.azure, paths(settings)
    uid, volume = _planned_ids(p)
    layout = layout_for(az)
    early = _planned_tmp("early.cfg")
    grub_dir = p.image_root / grub.PREFIX.lstrip("/")
    planned: Planned = _in_environment(az)
    if layout.boots_bios:
        planned.append(f"copy GRUB's i386-pc modules from {grub.GRUB_I386_PC} to {grub_dir}")
        planned.append(grub.mkimage_argv(grub.GRUB_I386_PC, grub_dir / "i386-pc/core.img", early))
    if layout.boots_uefi:
        planned.append(f"copy GRUB's x86_64-efi modules from {grub.GRUB_X86_64_EFI} to {grub_dir}")
        core = grub_dir / "x86_64-efi" / grub.EFI_CORE
        planned.append(grub.efi_mkimage_argv(grub.GRUB_X86_64_EFI, core, early))
    planned.append(f"write {grub_dir}/grub.cfg: root=UUID={uid} {az.kernel_cmdline}")
    planned.append(f"create the sparse file {p.raw} of {format_size(az.disk_size)}")
    script = "; ".join(line for line in disk.sfdisk_script(layout).splitlines() if line)
    planned += [disk.create_argv(p.raw), f"sfdisk reads: {script}"]
    planned.append(disk.mkfs_argv(p.raw, layout.root, p.image_root, uuid=uid, label="archroot"))
    planned.append(disk.e2fsck_argv(p.raw, layout.root))
    if layout.boots_uefi:
        planned.append(esp.mkfs_argv(p.raw, layout.esp, volume=volume))
    return planned


def bootloader_commands(settings: Settings) -> Planned:
    """What step 7 runs: grub-bios-setup from the staged files (bios, hybrid); core.efi
    copied to the ESP's removable path and the FAT checked (uefi, hybrid)."""
    az, p = settings.azure, paths(settings)
    layout = layout_for(az)
    planned: Planned = _in_environment(az)
    if layout.boots_bios:
        mnt = _planned_tmp("root")
        planned.append(
            f"attach partition {layout.root.number} of {p.raw} read-only to a loop device and "
            f"mount it read-only on {mnt}"
        )
        grub_dir = mnt / grub.PREFIX.lstrip("/") / "i386-pc"
        tool = Path("grub-bios-setup")
        planned.append(grub.bios_setup_argv(tool, grub_dir, _planned_tmp("device.map"), p.raw))
    if layout.boots_uefi:
        core = f"{grub.PREFIX}/x86_64-efi/{grub.EFI_CORE}"
        planned.append(f"read {core} from the root file system with debugfs")
        staged = _planned_tmp("esp")
        planned.append(f"copy it to {staged}/{esp.REMOVABLE_PATH_X64}")
        planned.append(esp.copy_argv(p.raw, layout.esp, [staged / "EFI"]))
        planned.append(
            f"copy the ESP to a sparse file and check it: {render(esp.fsck_argv(Path('esp.img')))}"
        )
    return planned


def vhd_commands(settings: Settings) -> Planned:
    """What step 8 does: no command, an append and a rename."""
    az, p = settings.azure, paths(settings)
    return [
        f"append the 512-byte fixed-VHD footer ({format_size(az.disk_size)}) to {p.raw} and "
        f"rename it to {p.vhd}: no data is copied, the file stays sparse"
    ]


# --- azure_boottest -------------------------------------------------------------------------


@dataclass(frozen=True)
class BootTest:
    """One boot of the VHD in QEMU: the firmware, the step's verb, its console log and its
    stamp."""

    firmware: Literal["bios", "uefi"]
    verb: str
    console: Path
    stamp: Path

    @property
    def firmware_name(self) -> str:
        return "SeaBIOS" if self.firmware == "bios" else "OVMF (UEFI)"


def boot_tests(settings: Settings) -> list[BootTest]:
    """The boots azure_boottest makes: first with the firmware of the VM generation the
    image is for (SeaBIOS for 1, OVMF for 2), into `boottest.log`; a hybrid image then
    also with the other one, into `boottest-bios.log` or `boottest-uefi.log`."""
    az, p = settings.azure, paths(settings)
    first: Literal["bios", "uefi"] = "bios" if az.generation == 1 else "uefi"
    tests = [BootTest(first, "boot", p.console, p.boottest)]
    if az.firmware == "hybrid":
        other: Literal["bios", "uefi"] = "uefi" if first == "bios" else "bios"
        log_file, stamp = p.work / f"boottest-{other}.log", p.work / f"boottest-{other}.json"
        tests.append(BootTest(other, f"boot_{other}", log_file, stamp))
    return tests


def boottest_argv(settings: Settings, test: BootTest, firmware: qemu.Firmware | None) -> list[str]:
    """The QEMU command of `test` (`firmware`: OVMF for a UEFI boot)."""
    p = paths(settings)
    return qemu.qemu_argv(
        disk=p.vhd, disk_format="vpc", serial_log=test.console, memory=1024, firmware=firmware
    )


def boottest_commands(settings: Settings, test: BootTest) -> Planned:
    """What `test` runs (for --dry-run)."""
    try:
        firmware = qemu.find_ovmf() if test.firmware == "uefi" else None
    except UserError as exc:
        return [f"{exc.message} ({exc.hint})"]
    return [boottest_argv(settings, test, firmware)]


def run_boottest(settings: Settings, test: BootTest) -> qemu.BootResult:
    """Boot the VHD as `test` says and wait for `azure.boottest_marker`; writes its stamp."""
    az = settings.azure
    firmware = qemu.find_ovmf() if test.firmware == "uefi" else None
    argv = boottest_argv(settings, test, firmware)
    result = qemu.boot_and_wait(argv, test.console, az.boottest_marker, az.boottest_timeout)
    stamp = {"marker": az.boottest_marker, "seconds": result.elapsed, "firmware": test.firmware}
    _json(test.stamp, stamp)
    log.info(
        "%r on the console after %.1fs with %s; log %s",
        az.boottest_marker,
        result.elapsed,
        test.firmware_name,
        test.console,
    )
    return result
