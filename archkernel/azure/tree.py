"""Steps 2-5 of azure_vhd: the root tree: pacstrap, configuration, agent, initramfs.

Each step function reads its settings and what the earlier steps made, and returns its
plan (`archkernel.plan`) without changing anything; its commands run in the build
environment (`workspace.build_environment`, the plan's context). Step 2 pacstraps into
`.root.tmp-new` beside `root` and puts the tree in place once it is whole; step 3 does the
same with a copy of it (`image-root`), which steps 4 and 5 then edit in place.
"""

from __future__ import annotations

import functools
import uuid
from pathlib import Path

from archkernel.azure import admins, ids, pacman, users
from archkernel.azure import config as conf
from archkernel.azure.workspace import (
    FIRMWARE_SETTINGS,
    PACKAGE_SETTINGS,
    ROUTING_SETTINGS,
    Paths,
    _json,
    build_environment,
    clear_leftovers,
    esp_volume,
    paths,
    put_in_place,
    root_uuid,
    staging,
    tree_id,
)
from archkernel.errors import UserError
from archkernel.formats import initramfs as initramfs_format
from archkernel.host import mounts
from archkernel.host.files import remove_path, write_if_changed, write_text
from archkernel.host.processes import release_tree
from archkernel.log import log
from archkernel.plan import Do, Plan, reads
from archkernel.settings import AzureSettings, Settings

# --- shared by the steps --------------------------------------------------------------------


def _owned_write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, text, mode)


def _symlink(path: Path, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.exists():
        path.unlink()
    path.symlink_to(target)


def units_in(root: Path) -> set[str]:
    """The names of the systemd units (and unit directories) a root tree ships."""
    found: set[str] = set()
    for base in conf.UNIT_DIRS:
        directory = root / base
        if directory.is_dir():
            found.update(p.name for p in directory.iterdir())
    return found


def _enable(plan: Plan, root: Path, units: list[str]) -> None:
    """`systemctl --root` enable `units` in the image (their [Install] sections), if any."""
    if units:
        plan.run(["systemctl", f"--root={root}", "enable", *units])


def _undo_killed_run(p: Paths, target: Path | None = None) -> Do:
    """Housekeeping before a step: what a killed run left is undone (a killed arch-chroot
    leaves its API mounts in the tree; a killed pacstrap, its pacman still writing)."""

    def undo() -> None:
        if target is not None:
            clear_leftovers(target)
        mounts.cleanup_stale(p.work)

    beside = ""
    if target is not None:
        beside = f"stop what still works in {staging(target).name} and remove it; "
    return Do(
        f"undo what a killed run left: {beside}undo the mounts and loop devices under "
        f"{p.work} (runs umount or losetup only then)",
        undo,
    )


def _with_environment(settings: Settings) -> Plan:
    return Plan(context=functools.partial(build_environment, settings))


def _pacstrapped(p: Paths) -> Path:
    """The pacstrapped tree, which step 3 copies: UserError before step 2 made it."""
    if not p.root.is_dir():
        # No hint: a dry run shows the message as the reason it cannot plan the step yet.
        raise UserError(f"there is no root tree {p.root} yet: step 2 (pacstrap) makes it")
    return p.root


# --- step 2 -----------------------------------------------------------------------------------


@reads(*PACKAGE_SETTINGS, *ROUTING_SETTINGS, ids.EPOCH_SETTING)
def pacstrap(settings: Settings) -> Plan:
    """pacstrap the packages into a directory; write the package manifest.

    With an epoch, pacman's hooks get it as SOURCE_DATE_EPOCH (systemd-sysusers dates
    /etc/shadow by it).
    """
    az, p = settings.azure, paths(settings)
    staged = staging(p.root)
    packages = az.all_packages()
    epoch = ids.source_date_epoch(settings)
    listing: list[str] = []
    plan = _with_environment(settings)
    plan.ops.append(_undo_killed_run(p, p.root))
    plan.do(f"make the empty directory {staged}", staged.mkdir)
    plan.run(
        pacman.pacstrap_argv(p.pacman_conf, staged, packages),
        timeout=3 * 3600,
        error=pacman.pacstrap_error,
        env=ids.epoch_env(epoch),
    )
    plan.run(pacman.stop_gpg_agent_argv(staged / pacman.KEYRING_DIR))
    plan.do(
        f"stop the processes still working in {staged}; undo any mount left in it",
        lambda: release_tree(staged),
    )
    plan.run(
        pacman.installed_argv(staged),
        capture=True,
        then=lambda proc: listing.append(proc.stdout),
    )
    plan.do(f"put {staged} in place of {p.root}", lambda: put_in_place(staged, p.root))

    def manifest() -> None:
        write_if_changed(p.packages, listing[0].encode())
        log.info("installed %d packages; manifest %s", len(listing[0].splitlines()), p.packages)

    plan.do(f"write the package manifest {p.packages}", manifest)
    plan.cleanup.append(_discard(staged, "pacstrap"))
    return plan


def _discard(staged: Path, what: str) -> Do:
    """Remove `staged` if it is still there (the step failed or was interrupted), after
    stopping what works in it: pacman ignores Ctrl-C while it unpacks and outlives pacstrap."""

    def discard() -> None:
        if staged.exists():
            release_tree(staged)
            remove_path(staged)

    return Do(
        f"if {staged} is still there ({what} failed or was interrupted): stop the processes "
        "working in it, undo its mounts, remove it",
        discard,
    )


# --- step 3 -----------------------------------------------------------------------------------


@reads(
    "azure.hostname",
    "azure.locale",
    "azure.timezone",
    "azure.keymap",
    "azure.user",
    *FIRMWARE_SETTINGS,
    *ROUTING_SETTINGS,
    ids.EPOCH_SETTING,
)
def configure(settings: Settings) -> Plan:
    """host name, locale, time, fstab by UUID, network, sshd, users, clean-up."""
    az, p = settings.azure, paths(settings)
    epoch = ids.source_date_epoch(settings)
    dated = ids.epoch_env(epoch)
    source = _pacstrapped(p)
    tree = staging(p.image_root)
    etc = tree / "etc"
    uefi = az.firmware != "bios"
    # What the copy will hold, known from the tree it copies (step 3 adds pacman-init).
    units = conf.configured_units(units_in(source) | {conf.PACMAN_INIT_UNIT})
    has_locale_gen = (source / "usr/bin/locale-gen").exists()
    plan = _with_environment(settings)
    plan.ops.append(_undo_killed_run(p, p.image_root))
    plan.run(["cp", "-a", "--reflink=auto", source, tree])
    plan.do(
        f"check that the image has /usr/share/zoneinfo/{az.timezone}",
        lambda: _check_timezone(tree, az.timezone),
    )
    files = conf.system_files(az, "ROOT-UUID", "ESP-ID" if uefi else None)
    plan.do(
        f"write {', '.join(f.path for f in files)} (root and ESP by the IDs step 1 chose); "
        f"link {', '.join(conf.system_links(az.timezone))}"
        + (f"; make {conf.ESP_MOUNT}" if uefi else ""),
        lambda: _write_system_files(tree, az, p),
    )
    if has_locale_gen:
        plan.run(["arch-chroot", tree, "locale-gen"], timeout=600, env=dated)
        plan.do(f"stop what locale-gen left running in {tree}", lambda: release_tree(tree))
    else:
        plan.do(
            f"warn: the image has no locale-gen; {az.locale} is not compiled",
            lambda: log.warning("the image has no locale-gen; %s is not compiled", az.locale),
        )
    plan.do("lock root's password in etc/shadow", lambda: _lock_root(etc / "shadow"))
    if az.user is not None:
        user = az.user
        plan.run(users.useradd_argv(tree, user.name), env=dated)  # dates /etc/shadow
        if user.password_hash is not None:
            plan.do(
                f"set {user.name}'s password hash in etc/shadow",
                lambda: users.set_password(tree, user),
            )
        plan.do(
            f"write /home/{user.name}/.ssh/authorized_keys ({len(user.ssh_authorized_keys)} "
            "key(s)), owned by the user",
            lambda: users.install_keys(tree, user),
        )
    installed = f"; set each package's install date to {epoch}" if epoch is not None else ""
    plan.do(
        "remove what is the build host's: empty etc/machine-id, no SSH host keys, no "
        f"{pacman.KEYRING_DIR}, no {pacman.LOG_FILE}{installed}",
        lambda: _forget_build_host(etc, epoch),
    )
    _enable(plan, tree, units)
    plan.do(f"put {tree} in place of {p.image_root}", lambda: put_in_place(tree, p.image_root))
    plan.do(
        f"write {p.configured}",
        lambda: _configured(p, az, units),
    )
    plan.cleanup.append(_discard(tree, "the configuration"))
    return plan


def _check_timezone(tree: Path, timezone: str) -> None:
    if not (tree / "usr/share/zoneinfo" / timezone).exists():
        raise UserError(
            f"azure.timezone: {timezone!r} is not in the image's /usr/share/zoneinfo",
            "use a name such as UTC or Europe/Paris (the tzdata package must be installed)",
        )


def _write_system_files(tree: Path, az: AzureSettings, p: Paths) -> None:
    esp_id = esp_volume(p) if az.firmware != "bios" else None
    for file in conf.system_files(az, root_uuid(p), esp_id):
        _owned_write(tree / file.path, file.text, file.mode)
    for path, target in conf.system_links(az.timezone).items():
        _symlink(tree / path, target)
    if esp_id is not None:
        (tree / conf.ESP_MOUNT.lstrip("/")).mkdir(mode=0o755, exist_ok=True)


def _lock_root(shadow: Path) -> None:
    write_text(shadow, conf.lock_root(shadow.read_text()), 0o600)


def _forget_build_host(etc: Path, epoch: int | None = None) -> None:
    """Nothing of the build host may stay: identity, host keys, keyring secrets, pacman's
    log (the build's times and the host's path of the tree). With an epoch, the packages
    are dated by it rather than by the build."""
    root = etc.parent
    write_text(etc / "machine-id", "", 0o444)
    for key in etc.glob("ssh/ssh_host_*"):
        key.unlink()
    remove_path(root / pacman.KEYRING_DIR)
    remove_path(root / pacman.LOG_FILE)
    if epoch is not None:
        for desc in sorted(root.glob(f"{pacman.LOCAL_DB}/*/desc")):
            text = desc.read_text()
            dated = pacman.with_install_date(text, epoch)
            if dated != text:
                write_text(desc, dated, desc.stat().st_mode & 0o7777)


def _configured(p: Paths, az: AzureSettings, units: list[str]) -> None:
    uid = root_uuid(p)
    esp_id = esp_volume(p) if az.firmware != "bios" else None
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


# --- step 4 -----------------------------------------------------------------------------------


def _configured_tree(p: Paths) -> tuple[Path, set[str]]:
    """The tree step 3 made and its units. Before step 3 ran (a dry run), the tree it copies
    stands in for it: it has the same packages' files and units, and pacman-init."""
    if p.image_root.is_dir():
        return p.image_root, units_in(p.image_root)
    source = _pacstrapped(p)
    return source, units_in(source) | {conf.PACMAN_INIT_UNIT}


@reads("azure.provisioning", "azure.extensions", *ROUTING_SETTINGS)
def agent(settings: Settings) -> Plan:
    """configure and enable cloud-init or the Azure Linux Agent."""
    az, p = settings.azure, paths(settings)
    tree = p.image_root
    found, available = _configured_tree(p)
    wants_agent = az.provisioning == "waagent" or az.extensions
    plan = _with_environment(settings)
    # It edits the tree in place: a run killed from here on must find step 4 not done.
    plan.do(f"drop {p.agent.name}", lambda: p.agent.unlink(missing_ok=True))
    if az.provisioning == "cloud-init":
        if not (found / "etc/cloud").is_dir():
            raise UserError(
                "provisioning is cloud-init but the image has no /etc/cloud",
                f"install {az.cloud_init_package} (azure.cloud_init_package)",
            )
        plan.do(
            f"write {conf.CLOUD_INIT_DROPIN} (Azure's datasource only)",
            lambda: _owned_write(tree / conf.CLOUD_INIT_DROPIN, conf.cloud_init_cfg()),
        )
        for dropin in conf.CLOUD_INIT_DBUS_DROPINS:
            plan.do(
                f"write {dropin} (after D-Bus: hostnamectl)",
                functools.partial(_owned_write, tree / dropin, conf.cloud_init_dbus_dropin()),
            )
    if wants_agent:
        if not (found / conf.WAAGENT_CONF).is_file() or conf.WAAGENT_UNIT not in available:
            raise UserError(
                f"the image has no Azure Linux Agent ({tree / conf.WAAGENT_CONF} or "
                f"{conf.WAAGENT_UNIT} missing)",
                f"azure.agent_package ({az.agent_package}) must provide them; it is not in "
                "Arch's official repositories: build it from the AUR into a local repository",
            )
        values = conf.waagent_values(az.provisioning)
        plan.do(
            f"set {', '.join(values)} in {conf.WAAGENT_CONF}; write {conf.WAAGENT_DROPIN} "
            f"and {admins.PATH_UNIT} (its administrators join wheel)",
            lambda: _configure_waagent(tree, values),
        )
    units = conf.agent_units(az, available)
    if az.provisioning == "cloud-init" and not any(u in conf.CLOUD_INIT_UNITS for u in units):
        raise UserError(
            "the image has no cloud-init units to enable",
            f"install {az.cloud_init_package} (azure.cloud_init_package)",
        )
    _enable(plan, tree, units)

    def stamp() -> None:
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

    plan.do(f"write {p.agent}", stamp)
    return plan


def _configure_waagent(tree: Path, values: dict[str, str]) -> None:
    agent_conf = tree / conf.WAAGENT_CONF
    write_text(agent_conf, conf.set_conf_values(agent_conf.read_text(), values))
    _owned_write(tree / conf.WAAGENT_DROPIN, conf.waagent_dropin())
    for path, (text, mode) in admins.files().items():
        _owned_write(tree / path, text, mode)


# --- step 5 -----------------------------------------------------------------------------------


def initramfs_modules(image: Path) -> set[str]:
    """Module names (no suffix) inside an initramfs image."""
    from archkernel.formats.kmod import module_name

    data = image.read_bytes()
    entries = initramfs_format.read_entries(data, source=str(image))
    return {
        module_name(e.path)
        for e in entries
        if e.type == "file"
        and any(e.path.endswith(s) for s in (".ko", ".ko.gz", ".ko.xz", ".ko.zst"))
    }


@reads("azure.initramfs_modules", *ROUTING_SETTINGS, ids.EPOCH_SETTING)
def initramfs(settings: Settings) -> Plan:
    """mkinitcpio -P in the image with the Hyper-V drivers, checked.

    mkinitcpio dates the archive's entries by SOURCE_DATE_EPOCH, given the epoch.
    """
    az, p = settings.azure, paths(settings)
    epoch = ids.source_date_epoch(settings)
    tree = p.image_root
    modules = list(az.initramfs_modules)
    plan = _with_environment(settings)
    plan.ops.append(_undo_killed_run(p))
    # It edits the tree in place: a run killed from here on must find step 5 not done.
    plan.do(f"drop {p.initramfs.name}", lambda: p.initramfs.unlink(missing_ok=True))
    plan.do(
        f"set MODULES=({' '.join(modules)}) and HOOKS without autodetect in "
        "etc/mkinitcpio.conf; remove the old boot/initramfs-*.img",
        lambda: _prepare_mkinitcpio(tree, modules),
    )
    plan.run(["arch-chroot", tree, "mkinitcpio", "-P"], timeout=1800, env=ids.epoch_env(epoch))
    plan.do(
        f"check that each boot/initramfs-*.img holds {' '.join(modules)}; write {p.initramfs}",
        lambda: _check_initramfs(p, modules),
    )
    return plan


def _prepare_mkinitcpio(tree: Path, modules: list[str]) -> None:
    config = tree / "etc/mkinitcpio.conf"
    if not config.is_file():
        raise UserError(
            "the image has no /etc/mkinitcpio.conf", "install mkinitcpio (azure.packages)"
        )
    write_text(config, conf.mkinitcpio_conf(config.read_text(), modules))
    for old in tree.glob("boot/initramfs-*.img"):
        old.unlink()


def _check_initramfs(p: Paths, wanted: list[str]) -> None:
    images = sorted(p.image_root.glob("boot/initramfs-*.img"))
    if not images:
        raise UserError("mkinitcpio -P made no /boot/initramfs-*.img", "see its output above")
    found: dict[str, list[str]] = {}
    for image in images:
        modules = initramfs_modules(image)
        missing = [m for m in wanted if m.replace("-", "_") not in modules]
        if missing:
            raise UserError(
                f"{image.name} lacks {', '.join(missing)} although mkinitcpio.conf asks for them",
                "the image's mkinitcpio ignored MODULES; check /etc/mkinitcpio.conf in the image",
            )
        found[image.name] = sorted(m for m in modules if m in wanted)
    _json(p.initramfs, {"images": found, "tree": tree_id(p.agent)})
    log.info("initramfs %s holds %s", ", ".join(found), " ".join(wanted))
