"""Steps 2-5 of azure_vhd: the root tree: pacstrap, configuration, agent, initramfs."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from archkernel.azure import config as conf
from archkernel.azure.workspace import (
    _json,
    build_environment,
    esp_volume,
    paths,
    root_uuid,
    tree_id,
)
from archkernel.errors import UserError
from archkernel.formats import initramfs
from archkernel.host import mounts
from archkernel.host.files import (
    atomic_path,
    remove_path,
    write_if_changed,
    write_text,
)
from archkernel.host.processes import release_stale_trees, release_tree, stop_processes_in
from archkernel.host.run import command_error, run
from archkernel.log import log
from archkernel.settings import AzureSettings, Settings

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
    from archkernel.formats.kmod import module_name

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
