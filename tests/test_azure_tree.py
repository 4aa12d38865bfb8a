"""Steps 1-5 of azure_vhd as plans: the commands each would run, decided without running any.

The plans are made against small stand-in trees (a few unit files, a locale-gen), so
these tests need no root, no pacstrap and no network; the real commands run in the
offline end-to-end build (test_azure_e2e.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from archkernel.azure import config as conf
from archkernel.azure import pacman, preflight, tree, users, workspace
from archkernel.errors import UserError
from archkernel.plan import Plan, Run, declared_settings, describe, execute
from archkernel.settings import AzureUser, Settings, validate

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHk0ZXN0a2V5Zm9yYXJjaGtlcm5lbHRlc3RzMDAwMDAw a@b"
HASH = "$6$saltsaltsalt$Qm9ndXNoYXNoZm9ydGVzdHNvbmx5LW5vdC1hLXJlYWwtcGFzc3dvcmQtaGFzaA"


def settings(tmp_path: Path, **azure: Any) -> Settings:
    return validate(Settings, {"workdir": str(tmp_path / "build"), "azure": azure})


def pacstrapped(s: Settings, *units: str, locale_gen: bool = True) -> Path:
    """A stand-in for step 2's tree: the unit files `units` and maybe a locale-gen."""
    root = workspace.paths(s).root
    (root / "usr/lib/systemd/system").mkdir(parents=True)
    for unit in units:
        (root / "usr/lib/systemd/system" / unit).write_text("[Unit]\n")
    if locale_gen:
        (root / "usr/bin").mkdir(parents=True)
        (root / "usr/bin/locale-gen").write_text("#!/bin/sh\n")
    return root


def snapshot(directory: Path) -> list[tuple[str, int]]:
    return sorted(
        (str(p.relative_to(directory)), p.stat().st_mtime_ns) for p in directory.rglob("*")
    )


# --- step 1 -----------------------------------------------------------------------------------


def test_preflight_with_a_given_pacman_conf_runs_no_command(tmp_path: Path) -> None:
    given = tmp_path / "pacman.conf"
    given.write_text("[options]\n")
    plan = preflight.preflight(settings(tmp_path, pacman_conf=str(given)))
    assert plan.commands() == []
    shown = "\n".join(describe(plan))
    assert f"copy it to {tmp_path}/build/azure/pacman.conf" in shown
    assert "prepare the build environment" not in shown
    assert not (tmp_path / "build").exists()


def test_preflight_from_a_mirror_makes_the_keyring_once(tmp_path: Path) -> None:
    s = settings(tmp_path)
    p = workspace.paths(s)
    staged = p.work / ".gnupg.tmp-new"
    assert preflight.preflight(s).commands() == [
        ("pacman-key", "--gpgdir", str(staged), "--init"),
        ("pacman-key", "--gpgdir", str(staged), "--populate", "archlinux"),
        ("gpgconf", "--homedir", str(staged), "--kill", "all"),
    ]
    p.gnupg.mkdir(parents=True)
    (p.gnupg / "pubring.kbx").write_bytes(b"")
    assert preflight.preflight(s).commands() == []


def test_preflight_of_a_container_build_prepares_then_enters_the_environment(
    tmp_path: Path,
) -> None:
    given = tmp_path / "pacman.conf"
    given.write_text("[options]\n")
    plan = preflight.preflight(settings(tmp_path, builder="container", pacman_conf=str(given)))
    shown = describe(plan)
    assert shown[0].startswith(f"# prepare the build environment under {tmp_path}/build/buildenv")
    assert shown[1] == "# enter the build environment: the build tools run in it from here on"
    assert shown[-1] == "# leave the build environment"


def test_preflight_declares_the_build_environments_and_the_firmwares_settings() -> None:
    declared = declared_settings(preflight.preflight)
    assert "azure.bootstrap_sha256" in declared and "azure.generation" in declared


# --- step 2 -----------------------------------------------------------------------------------


def test_pacstrap_plans_the_commands_into_the_staging_tree(tmp_path: Path) -> None:
    s = settings(tmp_path, packages=["base", "linux"], extra_packages=["vim"])
    p = workspace.paths(s)
    staged = p.work / ".root.tmp-new"
    plan = tree.pacstrap(s)
    packages = ("base", "linux", "vim", "cloud-init")
    assert plan.commands() == [
        ("pacstrap", "-C", str(p.pacman_conf), "-c", "-G", "-M", str(staged), *packages),
        ("gpgconf", "--homedir", f"{staged}/etc/pacman.d/gnupg", "--kill", "all"),
        ("pacman", "--root", str(staged), "-Q"),
    ]
    assert describe(plan)[-1].startswith(f"# if {staged} is still there")
    assert not (tmp_path / "build").exists()


def test_pacstrap_failure_names_pacmans_reason() -> None:
    error = pacman.pacstrap_error(["pacstrap"], 1, "error: target not found: nosuchpkg\n")
    assert error.message == "pacstrap could not install the packages: target not found: nosuchpkg"


# --- step 3 -----------------------------------------------------------------------------------


def test_configure_copies_the_tree_and_enables_the_units_it_has(tmp_path: Path) -> None:
    s = settings(tmp_path)
    pacstrapped(s, "sshd.service", "systemd-networkd.service", "getty@.service")
    p = workspace.paths(s)
    staged = p.work / ".image-root.tmp-new"
    before = snapshot(tmp_path)
    plan = tree.configure(s)
    assert plan.commands() == [
        ("cp", "-a", "--reflink=auto", str(p.root), str(staged)),
        ("arch-chroot", str(staged), "locale-gen"),
        (
            "systemctl",
            f"--root={staged}",
            "enable",
            "systemd-networkd.service",
            "sshd.service",
            "pacman-init.service",
        ),
    ]
    assert snapshot(tmp_path) == before  # making the plan changed nothing


def test_configure_adds_the_user_without_its_password_on_any_command_line(tmp_path: Path) -> None:
    user = {"name": "admin", "ssh_authorized_keys": [KEY], "password_hash": HASH}
    s = settings(tmp_path, user=user)
    pacstrapped(s, "sshd.service", locale_gen=False)
    staged = workspace.paths(s).work / ".image-root.tmp-new"
    plan = tree.configure(s)
    assert (
        "useradd",
        "--root",
        str(staged),
        "--create-home",
        "--user-group",
        "--groups",
        "wheel",
        "--shell",
        "/bin/bash",
        "admin",
    ) in plan.commands()
    assert not any(argv[0] == "arch-chroot" for argv in plan.commands())
    shown = "\n".join(describe(plan))
    assert "the image has no locale-gen" in shown
    assert "set admin's password hash in etc/shadow" in shown
    assert HASH not in shown and "saltsalt" not in shown


def test_configure_before_pacstrap_cannot_be_planned(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="step 2"):
        tree.configure(settings(tmp_path))


def test_system_files_of_a_uefi_image_mount_the_esp(tmp_path: Path) -> None:
    az = settings(tmp_path, generation=2).azure
    files = {f.path: f for f in conf.system_files(az, "UUID-1", "1234-ABCD")}
    assert "UUID=1234-ABCD\t/efi\tvfat" in files["etc/fstab"].text
    assert files["etc/sudoers.d/10-wheel"].mode == 0o440
    assert files["etc/hostname"].text == "archlinux\n"
    assert "usr/lib/systemd/system/pacman-init.service" in files


# --- step 4 -----------------------------------------------------------------------------------


def configured(s: Settings, *units: str, cloud: bool = True, waagent: bool = False) -> Path:
    """A stand-in for step 3's tree."""
    root = workspace.paths(s).image_root
    (root / "usr/lib/systemd/system").mkdir(parents=True)
    for unit in units:
        (root / "usr/lib/systemd/system" / unit).write_text("[Unit]\n")
    if cloud:
        (root / "etc/cloud").mkdir(parents=True)
    if waagent:
        (root / "etc").mkdir(exist_ok=True)
        (root / "etc/waagent.conf").write_text("Provisioning.Agent=auto\n")
    return root


def test_agent_enables_cloud_init_units(tmp_path: Path) -> None:
    s = settings(tmp_path)
    root = configured(s, "sshd.service", "cloud-init.service", "cloud-final.service")
    assert tree.agent(s).commands() == [
        ("systemctl", f"--root={root}", "enable", "cloud-init.service", "cloud-final.service")
    ]


def test_cloud_init_sets_the_host_name_after_d_bus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arch's cloud-init runs `hostnamectl --transient set-hostname`: it needs the bus.
    s = settings(tmp_path)
    root = configured(s, "sshd.service", "cloud-init.service")
    monkeypatch.setattr(tree, "_enable", lambda plan, tree_, units: None)
    execute(tree.agent(s))
    for unit in ("cloud-init.service", "cloud-init-network.service"):
        dropin = root / f"etc/systemd/system/{unit}.d/10-archkernel-dbus.conf"
        lines = dropin.read_text().splitlines()
        assert "[Unit]" in lines
        assert "After=dbus.socket" in lines and "Wants=dbus.socket" in lines


def test_agent_enables_waagent_for_extensions(tmp_path: Path) -> None:
    s = settings(tmp_path, extensions=True)
    root = configured(s, "cloud-init.service", "waagent.service", waagent=True)
    (command,) = tree.agent(s).commands()
    assert command[-3:] == (
        "cloud-init.service",
        "waagent.service",
        "archkernel-waagent-wheel.path",
    )
    assert str(root) in command[1]


def test_waagents_administrators_join_wheel_through_a_path_unit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = settings(tmp_path, provisioning="waagent")
    root = configured(s, "sshd.service", "waagent.service", cloud=False, waagent=True)
    (command,) = tree.agent(s).commands()
    assert command[3:] == ("waagent.service", "archkernel-waagent-wheel.path")
    monkeypatch.setattr(tree, "_enable", lambda plan, tree_, units: None)
    execute(tree.agent(s))
    units = root / "etc/systemd/system"
    assert "PathChanged=/etc/sudoers.d/waagent" in (
        (units / "archkernel-waagent-wheel.path").read_text().splitlines()
    )
    program, sudoers, state = (
        "/usr/local/lib/archkernel/waagent-wheel",
        "/etc/sudoers.d/waagent",
        "/var/lib/archkernel/waagent-wheel",
    )
    assert f"ExecStart={program} {sudoers} {state}" in (
        (units / "archkernel-waagent-wheel.service").read_text().splitlines()
    )
    written = root / program.lstrip("/")
    assert written.read_text().startswith("#!/bin/sh\n")
    assert written.stat().st_mode & 0o777 == 0o755


def test_agent_without_cloud_init_in_the_image_is_an_error(tmp_path: Path) -> None:
    s = settings(tmp_path)
    configured(s, "sshd.service", cloud=False)
    with pytest.raises(UserError, match="no /etc/cloud"):
        tree.agent(s)


def test_agent_before_step_3_is_planned_from_the_pacstrapped_tree(tmp_path: Path) -> None:
    s = settings(tmp_path)
    root = pacstrapped(s, "cloud-init.service")
    (root / "etc/cloud").mkdir(parents=True)
    image_root = workspace.paths(s).image_root
    assert tree.agent(s).commands() == [
        ("systemctl", f"--root={image_root}", "enable", "pacman-init.service", "cloud-init.service")
    ]


# --- step 5 -----------------------------------------------------------------------------------


def test_initramfs_runs_mkinitcpio_in_the_image(tmp_path: Path) -> None:
    s = settings(tmp_path, initramfs_modules=["hv_vmbus"])
    image_root = workspace.paths(s).image_root
    plan = tree.initramfs(s)
    assert plan.commands() == [("arch-chroot", str(image_root), "mkinitcpio", "-P")]
    assert "MODULES=(hv_vmbus)" in "\n".join(describe(plan))


# --- the epoch: what the tree steps date by it --------------------------------------------------


def dated(tmp_path: Path, **azure: Any) -> Settings:
    return validate(
        Settings,
        {
            "workdir": str(tmp_path / "build"),
            "build": {"source_date_epoch": 1_700_000_000},
            "azure": azure,
        },
    )


def run_envs(plan: Plan) -> dict[str, dict[str, str]]:
    return {op.argv[0]: dict(op.env or {}) for op in plan.ops if isinstance(op, Run)}


def test_the_tree_steps_give_their_tools_the_epoch(tmp_path: Path) -> None:
    s = dated(tmp_path, user={"name": "arch", "ssh_authorized_keys": [KEY]})
    pacstrapped(s, "sshd.service")
    epoch = {"SOURCE_DATE_EPOCH": "1700000000"}
    assert run_envs(tree.pacstrap(s))["pacstrap"] == epoch  # for pacman's hooks
    configured = run_envs(tree.configure(s))
    assert configured["useradd"] == epoch and configured["arch-chroot"] == epoch
    assert run_envs(tree.initramfs(s))["arch-chroot"] == epoch
    # Without an epoch, nothing is added.
    assert run_envs(tree.initramfs(settings(tmp_path)))["arch-chroot"] == {}
    for step in (tree.pacstrap, tree.configure, tree.initramfs):
        assert "build.source_date_epoch" in declared_settings(step)


def test_install_dates_in_pacmans_database_are_set() -> None:
    desc = "%NAME%\nbase\n\n%INSTALLDATE%\n1796237189\n\n%SIZE%\n0\n\n"
    assert pacman.with_install_date(desc, 1_700_000_000) == desc.replace("1796237189", "1700000000")
    assert pacman.with_install_date("%NAME%\nbase\n", 1) == "%NAME%\nbase\n"


def test_configure_leaves_no_pacman_log_and_dates_the_packages(tmp_path: Path) -> None:
    root = tmp_path / "image-root"
    (root / "etc/ssh").mkdir(parents=True)
    (root / "etc/ssh/ssh_host_ed25519_key").write_text("secret")
    (root / "var/log").mkdir(parents=True)
    (root / "var/log/pacman.log").write_text(f"[2026-12-02T18:46:00+0000] {tmp_path}/root\n")
    local = root / "var/lib/pacman/local/base-1.0-1"
    local.mkdir(parents=True)
    (local / "desc").write_text("%NAME%\nbase\n\n%INSTALLDATE%\n1796237189\n\n")
    os.chmod(local / "desc", 0o644)
    tree._forget_build_host(root / "etc", 1_700_000_000)
    assert sorted(p.name for p in (root / "var/log").iterdir()) == []
    assert (local / "desc").read_text() == "%NAME%\nbase\n\n%INSTALLDATE%\n1700000000\n\n"
    assert (local / "desc").stat().st_mode & 0o777 == 0o644
    assert not (root / "etc/ssh/ssh_host_ed25519_key").exists()
    # Without an epoch the install dates stay: they are the build's time, as the image's.
    (root / "var/log/pacman.log").write_text("again\n")
    (local / "desc").write_text("%INSTALLDATE%\n1796237189\n")
    tree._forget_build_host(root / "etc")
    assert not (root / "var/log/pacman.log").exists()
    assert (local / "desc").read_text() == "%INSTALLDATE%\n1796237189\n"


# --- the user ---------------------------------------------------------------------------------


def test_password_login_only_for_a_user_with_a_hash_and_no_keys() -> None:
    assert users.password_login(None) is False
    assert users.password_login(validate(AzureUser, {"name": "a", "password_hash": HASH}))
    with_keys = {"name": "a", "password_hash": HASH, "ssh_authorized_keys": [KEY]}
    assert users.password_login(validate(AzureUser, with_keys)) is False


def test_password_goes_into_the_users_shadow_line_only() -> None:
    shadow = "root:!*:1::::::\nadmin:!:1::::::\n"
    assert users.with_password(shadow, "admin", "$6$x") == "root:!*:1::::::\nadmin:$6$x:1::::::\n"
    assert users.passwd_ids("admin:x:1000:1001::/home/admin:/bin/bash\n", "admin") == (1000, 1001)
    with pytest.raises(UserError):
        users.passwd_ids("root:x:0:0::/root:/bin/bash\n", "admin")


# --- trees made beside their place ------------------------------------------------------------


def test_a_staged_tree_replaces_the_old_one_and_leftovers_go(tmp_path: Path) -> None:
    target = tmp_path / "root"
    (target / "old").mkdir(parents=True)
    staged = workspace.staging(target)
    assert staged == tmp_path / ".root.tmp-new"
    (staged / "new").mkdir(parents=True)
    workspace.put_in_place(staged, target)
    assert os.listdir(target) == ["new"] and sorted(os.listdir(tmp_path)) == ["root"]
    # What a killed run leaves: its staging tree, and an older version's temporary tree.
    (staged / "half").mkdir(parents=True)
    (tmp_path / ".root.tmp-999999999").mkdir()
    workspace.clear_leftovers(target)
    assert sorted(os.listdir(tmp_path)) == ["root"]
