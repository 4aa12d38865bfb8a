"""azure_vhd with `builder = "container"`: the offline build, run with a build environment's tools.

No Arch mirror here, so the bootstrap build environment is the tests' own (see
tests/support/buildenv.py): Debian bookworm made by debootstrap, with Debian's pacman,
pacstrap, e2fsprogs, fdisk, GRUB, dosfstools and mtools, packed like Arch's bootstrap
tarball and given by path with its SHA-256, exactly as a user gives their own tarball:

    [azure]
    builder = "container"
    container_runtime = "chroot"
    bootstrap_tarball = "/path/to/buildenv-debian-bookworm-....tar.zst"
    bootstrap_sha256 = "..."

The build must show that its tools ran inside the environment, not on the host. Three
independent proofs:
- the build runs with a host PATH that has *none* of the tools routed into the
  environment (pacstrap, pacman, sfdisk, mkfs.ext4, grub-mkimage, mkfs.fat ...): it can
  only succeed if they came from elsewhere;
- after step 1, the environment's own pacstrap, sfdisk, mkfs.ext4, grub-mkimage, mkfs.fat
  and mcopy are replaced by wrappers that append a line to a log in the work directory
  (shared at the same path) naming the tool, its arguments and the content of
  /etc/archkernel-test-env (a file only the environment has), then run the real tool;
- with -v, the log says where each command ran.
Then the image verifies and boots with SeaBIOS like any other. The first tests need no
build: what step 1 makes and checks in container mode, and which steps read its record.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

import pytest

from archkernel.azure import buildenv, preflight
from archkernel.demo import offline
from archkernel.host.files import write_text
from archkernel.settings import AzureSettings, load, validate
from tasks import azure_vhd
from tasks.steps import Step
from tests.support import buildenv as support
from tests.support.azure import (
    STEPS,
    WORKFLOW,
    Build,
    archkernel,
    boot_facts,
    environment,
    outcomes,
    path_without,
    run_boottest,
)
from tests.support.buildenv import env_processes
from tests.support.kernel_state import leftovers

pytestmark = pytest.mark.integration

# The environment's tools replaced by logging wrappers, and where the real ones go.
WRAPPED = ("pacstrap", "sfdisk", "mkfs.ext4", "grub-mkimage", "mkfs.fat", "mcopy")
REAL_DIR = "/usr/libexec/archkernel-test-real"
WRAPPER = """\
#!/bin/sh
# archkernel test: record that {tool} ran, and what /etc/archkernel-test-env says where it
# ran (only the test build environment has that file), then run the real {tool}.
printf '%s\\t%s\\t%s\\n' {tool} "$(cat /etc/{marker} 2>/dev/null || echo none)" "$*" >> {log}
exec {real}/{tool} "$@"
"""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def install_wrappers(root: Path, log: Path, tools: Iterable[str]) -> None:
    """Replace each of `tools` in the environment `root` by a wrapper that logs to `log`."""
    real = root / REAL_DIR.lstrip("/")
    real.mkdir(parents=True, exist_ok=True)
    for tool in tools:
        inside = buildenv.find_tool(root, tool)
        assert inside is not None, f"the environment has no {tool}"
        entry = root / inside.lstrip("/")
        target = buildenv.resolve_in_root(root, inside)
        assert target is not None
        if entry.is_symlink():
            # mkfs.ext4 -> mke2fs, mcopy -> mtools: they tell what to do by their name.
            (real / tool).symlink_to("/" + str(target.relative_to(root)))
            entry.unlink()
        else:
            os.rename(entry, real / tool)
        marker = support.MARKER.removeprefix("etc/")
        write_text(entry, WRAPPER.format(tool=tool, marker=marker, log=log, real=REAL_DIR), 0o755)


def ran_inside(log: Path) -> list[tuple[str, str, str]]:
    """(tool, what /etc/archkernel-test-env said, arguments) for each wrapped command run."""
    lines = log.read_text().splitlines() if log.exists() else []
    return [(t, m, a) for t, m, a in (line.split("\t", 2) for line in lines)]


@pytest.fixture(scope="module")
def env_tarball() -> Path:
    return support.environment_tarball()


@pytest.fixture(scope="module")
def host_bin(repo: offline.OfflineRepo) -> Path:
    """A PATH directory with every host program except the tools routed into the environment."""
    return Path(path_without(repo.dir / "host-bin-without-build-tools", *buildenv.ROUTED_TOOLS))


def container_env(tarball: Path, host_bin: Path) -> dict[str, str]:
    return {
        "ARCHKERNEL_AZURE__BUILDER": "container",
        "ARCHKERNEL_AZURE__CONTAINER_RUNTIME": "chroot",
        "ARCHKERNEL_AZURE__BOOTSTRAP_TARBALL": str(tarball),
        "ARCHKERNEL_AZURE__BOOTSTRAP_SHA256": sha256_file(tarball),
        "PATH": str(host_bin),
    }


@pytest.fixture(scope="module")
def prepared(
    repo: offline.OfflineRepo, env_tarball: Path, host_bin: Path
) -> tuple[Build, subprocess.CompletedProcess[str]]:
    """Step 1 (the environment unpacked and set up), then the wrappers put into it."""
    build = Build(repo, repo.dir / "build-container", container_env(env_tarball, host_bin))
    step1 = build.run("--to", "1")
    assert step1.returncode == 0, step1.stderr[-5000:]
    install_wrappers(env_root(build), wrapper_log(build), WRAPPED)
    return build, step1


@pytest.fixture(scope="module")
def finished(
    prepared: tuple[Build, subprocess.CompletedProcess[str]],
) -> tuple[Build, subprocess.CompletedProcess[str]]:
    """Steps 2-9, run with -v: every command logged with where it ran."""
    build, _ = prepared
    result = archkernel(
        "-v", "run", WORKFLOW, "--settings", str(build.settings_path), env=build.all_env
    )
    assert result.returncode == 0, result.stderr[-5000:]
    return build, result


@pytest.fixture(scope="module")
def container(finished: tuple[Build, subprocess.CompletedProcess[str]]) -> Build:
    return finished[0]


def env_root(build: Build) -> Path:
    az = load(build.settings_path, env=environment(**build.all_env)).settings.azure
    return buildenv.load(az, build.workdir).root


def wrapper_log(build: Build) -> Path:
    return build.workdir / "ran-inside.log"


# --- the steps, without building ----------------------------------------------------------------


def step_list(tmp_path: Path, **env: str) -> list[Step]:
    values = {"ARCHKERNEL_WORKDIR": str(tmp_path / "build"), **env}
    return azure_vhd.WORKFLOWS[0].steps(load(None, env=values, cwd=tmp_path))


CONTAINER = {
    "ARCHKERNEL_AZURE__BUILDER": "container",
    "ARCHKERNEL_AZURE__BOOTSTRAP_TARBALL": "/srv/bootstrap.tar.zst",
    "ARCHKERNEL_AZURE__BOOTSTRAP_SHA256": "0" * 64,
}


def test_step_1_makes_the_environment_and_every_later_step_reads_it(tmp_path: Path) -> None:
    steps = step_list(tmp_path, **CONTAINER)
    state = buildenv.state_file(tmp_path / "build")
    assert state in steps[0].targets
    assert set(buildenv.SETTINGS) <= set(steps[0].settings)
    assert [s.id for s in steps if state in s.file_dep] == [s.id for s in steps[1:]]
    # With builder = "host" there is no environment to read.
    host = step_list(tmp_path)
    assert not [s.id for s in host if state in s.targets or state in s.file_dep]


@pytest.mark.parametrize(("runtime", "tool"), [("chroot", "unshare"), ("podman", "podman")])
def test_step_1_checks_the_runtimes_own_tool_on_the_host(runtime: str, tool: str) -> None:
    az = validate(AzureSettings, {"builder": "container", "container_runtime": runtime})
    assert tool in preflight.preflight_tools(az)
    assert tool not in preflight.preflight_tools(AzureSettings())


# --- the build ----------------------------------------------------------------------------------


@pytest.mark.root
def test_step_1_unpacks_the_given_tarball_under_the_workdir(prepared, env_tarball: Path) -> None:
    build, step1 = prepared
    sha = sha256_file(env_tarball)
    assert f"Unpacking {env_tarball.name} into {build.workdir / 'buildenv' / sha[:16]}" in (
        step1.stderr
    )
    assert outcomes(step1.stderr) == {"01_preflight": "done in"}
    state = json.loads(buildenv.state_file(build.workdir).read_text())
    assert state["sha256"] == sha and state["origin"] == str(env_tarball)
    assert env_root(build) == build.workdir / "buildenv" / sha[:16] / "root"


@pytest.mark.root
def test_the_build_finishes_and_the_image_verifies(finished) -> None:
    build, result = finished
    assert "Traceback" not in result.stderr
    assert outcomes(result.stderr) == {
        step: "up to date" if step == "01_preflight" else "done in" for step in STEPS
    }
    report = build.report()
    assert report["ok"] is True, [c for c in report["checks"] if not c["ok"]]
    assert archkernel("vhd", "check", str(build.vhd)).returncode == 0


@pytest.mark.root
def test_the_host_path_offers_none_of_the_build_tools(container: Build) -> None:
    host_path = container.env["PATH"]
    assert [t for t in buildenv.ROUTED_TOOLS if shutil.which(t, path=host_path)] == []
    # What stays on the host is there: the namespace tool, loop devices and mounts.
    for tool in ("unshare", "losetup", "mount", "umount", "cp"):
        assert shutil.which(tool, path=host_path), tool


@pytest.mark.root
def test_the_image_was_made_by_the_environments_tools(container: Build) -> None:
    records = ran_inside(wrapper_log(container))
    assert not Path("/", support.MARKER).exists()  # the host has no such file
    assert {marker for _, marker, _ in records} == {support.MARKER_TEXT.strip()}
    tools = {tool for tool, _, _ in records}
    assert {"pacstrap", "sfdisk", "mkfs.ext4", "grub-mkimage"} <= tools
    assert not {"mkfs.fat", "mcopy"} & tools  # a BIOS image has no ESP
    azure = container.azure
    (mkfs,) = [args for tool, _, args in records if tool == "mkfs.ext4"]
    assert f"-U {container.root_uuid()}" in mkfs and f"-d {azure}/image-root" in mkfs
    (pacstrap,) = [args for tool, _, args in records if tool == "pacstrap"]
    assert pacstrap.startswith(f"-C {azure}/pacman.conf -c -G -M {azure}/.root.tmp-")
    grub_lib = env_root(container) / "usr/lib/grub/i386-pc"
    (mkimage,) = [args for tool, _, args in records if tool == "grub-mkimage"]
    assert f"--format i386-pc --directory {grub_lib} " in mkimage  # the environment's GRUB


@pytest.mark.root
def test_the_log_says_where_each_command_ran(finished) -> None:
    build, result = finished
    sha = sha256_file(Path(build.env["ARCHKERNEL_AZURE__BOOTSTRAP_TARBALL"]))
    inside = f" (in build environment {sha[:12]}, chroot)"
    commands = [line[2:] for line in result.stderr.splitlines() if line.startswith("+ ")]

    def ran(tool: str) -> set[bool]:
        """For each logged command of `tool`: did it run inside?"""
        found = {c.endswith(inside) for c in commands if re.match(rf"(\S*/)?{tool} ", c)}
        assert found, f"no {tool} command in the log"
        return found

    for tool in ("pacstrap", "pacman", "arch-chroot", "systemctl", "sfdisk", "mkfs.ext4"):
        assert ran(tool) == {True}, tool
    for tool in ("e2fsck", "grub-mkimage", "grub-bios-setup", "blkid"):
        assert ran(tool) == {True}, tool
    # The host's kernel state, the host's cp (step 7 lets `mount -o loop` make its loop device).
    for tool in ("mount", "umount", "cp"):
        assert ran(tool) == {False}, tool


@pytest.mark.vm
@pytest.mark.root
def test_the_image_boots_with_seabios(container: Build) -> None:
    run_boottest(container)
    facts = boot_facts(container.console())
    assert facts["rootuuid"] == facts["fstab"] == container.root_uuid()
    assert facts["root"] == "/dev/sda2"
    assert facts["hostname"] == offline.HOSTNAME


@pytest.mark.root
def test_a_rerun_reuses_everything_and_runs_nothing(container: Build) -> None:
    state = buildenv.state_file(container.workdir)
    before = state.stat().st_mtime_ns
    again = container.run()
    assert again.returncode == 0, again.stderr[-3000:]
    assert outcomes(again.stderr) == {step: "up to date" for step in STEPS}
    assert state.stat().st_mtime_ns == before


@pytest.mark.root
def test_nothing_stays_mounted_attached_or_running(container: Build) -> None:
    assert leftovers(container.workdir) == []
    assert env_processes(env_root(container)) == []


@pytest.mark.root
def test_switching_to_hybrid_makes_the_esp_with_the_environments_tools_too(
    container: Build,
) -> None:
    """Last: it changes the build the tests above looked at."""
    hybrid = Build(
        container.repo,
        container.workdir,
        {
            **container.env,
            "ARCHKERNEL_AZURE__BOOT": "hybrid",
            "ARCHKERNEL_AZURE__DISK_SIZE": "1GiB",
        },
    )
    log = wrapper_log(hybrid)
    log.unlink()
    result = hybrid.run()
    assert result.returncode == 0, result.stderr[-5000:]
    done = outcomes(result.stderr)
    assert done["01_preflight"] == "done in" and done["02_pacstrap"] == "up to date"
    assert "reusing the build environment" in result.stderr
    records = ran_inside(log)
    assert {marker for _, marker, _ in records} == {support.MARKER_TEXT.strip()}
    tools = [tool for tool, _, _ in records]
    assert tools.count("grub-mkimage") == 2  # i386-pc and x86_64-efi
    assert {"mkfs.fat", "mcopy", "sfdisk", "mkfs.ext4"} <= set(tools)
    assert "pacstrap" not in tools
    checks = {c["name"]: c["ok"] for c in hybrid.report()["checks"]}
    assert checks["UEFI: boot loader at EFI/BOOT/BOOTX64.EFI"] is True
    assert checks["BIOS: boot code in the MBR"] is True
    assert all(checks.values())
    assert leftovers(hybrid.workdir) == []
