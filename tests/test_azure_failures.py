"""azure_vhd when things go wrong: killed builds resume, bad input fails in one clear line.

Kills: the build is started as its own process group and signalled while step 2 (pacstrap)
or step 6 (disk) is demonstrably half done, never just "after some time":

- step 2: pacstrap's API mounts (`/proc` ...) are up in the temporary tree and pacman is
  unpacking the kernel's modules into it (`.root.tmp-PID/usr/lib/modules/*/kernel`);
- step 6: mkfs.ext4 has written more than 8 MiB into the temporary `.disk.img.tmp-PID`.

The test then checks that the step really did not finish (no `done in` line, no target),
runs the same command again and checks the image verifies, that nothing stays mounted or
attached, and that no process still works in the workdir. Three ways to be killed:
Ctrl-C in a terminal (SIGINT to the process group), a supervisor's SIGKILL to the whole
group (systemd stopping a unit), and `kill -9 PID` of the build process alone, which leaves
its children running (pacman ignores Ctrl-C while it unpacks and outlives pacstrap).

Bad input: each run exits non-zero, its first `error:` line names the problem, there is
no traceback and nothing under the workdir is mounted or attached.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from archkernel.azure.pacman import pacman_errors, pacstrap_error
from archkernel.host.processes import processes_in
from tests import offline
from tests.support.azure import (
    STEPS,
    WORKFLOW,
    Build,
    archkernel,
    boot_facts,
    built,
    environment,
    error_line,
    outcomes,
    path_without,
    run_boottest,
)
from tests.support.kernel_state import leftovers

pytestmark = pytest.mark.integration

MiB = 1 << 20
KILL_TIMEOUT = 120


# --- killing a build in the middle of a step ------------------------------------------------


def _pacstrap_is_unpacking(azure: Path) -> bool:
    mounted = f"{azure}/.root.tmp-" in Path("/proc/mounts").read_text()
    return mounted and bool(list(azure.glob(".root.tmp-*/usr/lib/modules/*/kernel")))


def _mkfs_is_writing(azure: Path) -> bool:
    return any(p.stat().st_blocks * 512 > 8 * MiB for p in azure.glob(".disk.img.tmp-*"))


IN_STEP: dict[str, Callable[[Path], bool]] = {
    "02_pacstrap": _pacstrap_is_unpacking,
    "06_disk": _mkfs_is_writing,
}
TARGET = {"02_pacstrap": "packages.txt", "06_disk": "disk.json"}


def kill_during(
    build: Build, step: str, sig: signal.Signals, group: bool, *args: str
) -> subprocess.CompletedProcess[str]:
    """Start `archkernel run azure_vhd ARGS`, send `sig` while `step` is half done, wait."""
    log = build.workdir.parent / f"{build.workdir.name}-killed.log"
    settings = str(build.settings_path)
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tasks.cli", "run", WORKFLOW, *args, "--settings", settings],
            env=environment(**build.all_env),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,  # its own process group, like a job in a shell
        )
        try:
            deadline = time.monotonic() + KILL_TIMEOUT
            while not (build.azure.is_dir() and IN_STEP[step](build.azure)):
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, f"{step} never got going"
                time.sleep(0.005)
            if group:
                os.killpg(proc.pid, sig)
            else:
                os.kill(proc.pid, sig)
            code = proc.wait(KILL_TIMEOUT)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    result = subprocess.CompletedProcess(proc.args, code, "", log.read_text())
    # The signal landed inside the step: it neither finished nor wrote its target.
    assert outcomes(result.stderr).get(step) != "done in", result.stderr[-3000:]
    assert not (build.azure / TARGET[step]).exists()
    return result


def still_working_in(directory: Path) -> list[str]:
    """Processes whose command line names `directory` (pacman -r TREE, mkfs IMAGE ...)."""
    found = subprocess.run(["pgrep", "-a", "-f", str(directory)], capture_output=True, text=True)
    return found.stdout.splitlines()


def assert_resumed_and_valid(build: Build, step: str) -> None:
    """`archkernel run azure_vhd` again: earlier steps kept, the rest runs, all is clean."""
    again = build.run()
    assert again.returncode == 0, again.stderr[-5000:]
    assert "Traceback" not in again.stderr
    assert outcomes(again.stderr) == {s: "up to date" if s < step else "done in" for s in STEPS}
    assert build.report()["ok"] is True
    assert archkernel("vhd", "check", str(build.vhd)).returncode == 0
    assert leftovers(build.workdir) == []
    assert [p.name for p in build.azure.iterdir() if ".tmp-" in p.name or ".old-" in p.name] == []
    assert still_working_in(build.workdir) == []


@pytest.fixture(scope="module")
def resumed() -> dict[str, Build]:
    """Builds that were killed and then finished, by test id (for the boot test)."""
    return {}


KILLS = [
    pytest.param(signal.SIGINT, True, id="ctrl-c"),
    pytest.param(signal.SIGKILL, True, id="sigkill-group"),
    pytest.param(signal.SIGKILL, False, id="sigkill-build-process-only"),
]


@pytest.mark.parametrize("step", ["02_pacstrap", "06_disk"])
@pytest.mark.parametrize(("sig", "group"), KILLS)
@pytest.mark.root
def test_killed_during_a_step_then_run_again_finishes_a_valid_image(
    repo: offline.OfflineRepo, resumed, step: str, sig: signal.Signals, group: bool
) -> None:
    name = f"killed-{sig.name}-{'group' if group else 'process'}-{step}"
    build = Build(repo, repo.dir / name)
    killed = kill_during(build, step, sig, group)
    if sig == signal.SIGINT:
        # Ctrl-C: the step cleans up after itself at once and says how to go on.
        assert killed.returncode == 130, killed.stderr[-3000:]
        assert f"{WORKFLOW}:{step}: interrupted after" in killed.stderr
        assert "run the same command to resume" in killed.stderr
        assert "Traceback" not in killed.stderr
        assert leftovers(build.workdir) == []
    else:
        assert killed.returncode == -signal.SIGKILL
    assert_resumed_and_valid(build, step)
    resumed[name] = build


@pytest.mark.vm
@pytest.mark.root
def test_an_image_finished_after_a_kill_boots(repo: offline.OfflineRepo, resumed) -> None:
    build = resumed.get("killed-SIGKILL-group-06_disk")
    if build is None:  # this test run alone: make one
        build = Build(repo, repo.dir / "killed-for-boot")
        kill_during(build, "06_disk", signal.SIGKILL, True)
        assert_resumed_and_valid(build, "06_disk")
    run_boottest(build)
    facts = boot_facts(build.console())
    assert facts["rootuuid"] == facts["fstab"] == build.root_uuid()
    assert facts["hostname"] == offline.HOSTNAME


@pytest.mark.root
def test_killed_during_a_forced_rerun_of_step_6_then_a_plain_run_finishes(
    repo: offline.OfflineRepo,
) -> None:
    # The earlier disk was already thrown away when the kill came; doit still remembers
    # step 6's earlier success, so the step must not look done.
    build = built(repo, "forced-then-killed")
    kill_during(build, "06_disk", signal.SIGKILL, True, "--from", "6")
    steps = build.archkernel("steps", WORKFLOW)
    assert re.search(rf"^{WORKFLOW}:06_disk\s+will re-run$", steps.stdout, re.MULTILINE), (
        steps.stdout
    )
    assert_resumed_and_valid(build, "06_disk")


def test_processes_in_a_tree_are_found_by_argument_or_chroot() -> None:
    # What the steps use to stop a killed run's pacman before they remove its tree.
    tree = Path("/w/azure/.root.tmp-42")
    table = [
        (1, ["unshare", "--fork", "--pid", "pacman", "-r", str(tree), "-S", "base"], "/"),
        (2, ["pacman", f"--cachedir={tree}/var/cache/pacman/pkg"], "/"),
        (3, ["mkinitcpio", "-P"], f"{tree}"),  # a hook, chrooted into the tree
        (4, ["pacman", "-r", "/w/azure/.root.tmp-421"], "/"),  # another tree
        (5, ["less", "/w/azure/verify.txt"], "/"),
    ]
    assert processes_in(tree, table) == [1, 2, 3]


def test_pacstrap_failure_reason_is_pacmans_error_lines() -> None:
    stderr = (
        ":: Synchronizing package databases...\n"
        "error: target not found: nosuchpkg\n"
        "error: target not found: other\n"
        "==> ERROR: Failed to install packages to new root\n"
    )
    assert pacman_errors(stderr) == ["target not found: nosuchpkg", "target not found: other"]
    error = pacstrap_error(["pacstrap", "x"], 1, stderr)
    assert error.message == (
        "pacstrap could not install the packages: target not found: nosuchpkg; "
        "target not found: other"
    )
    assert "azure.packages" in (error.hint or "")
    # Killed, or no words from pacman: the command and its last output, as for any command.
    assert "was killed by SIGKILL" in pacstrap_error(["pacstrap"], -9, stderr).message
    assert "failed with exit code 1" in pacstrap_error(["pacstrap"], 1, "boom\n").message


# --- bad input ------------------------------------------------------------------------------


def fails(build: Build) -> tuple[str, str]:
    """Run the build, expect a clean failure; return (the error line, the whole log)."""
    result = build.run()
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert leftovers(build.workdir) == []
    return error_line(result.stderr), result.stderr


@pytest.mark.root
def test_disk_too_small_for_the_root_tree_says_how_much_is_needed(
    repo: offline.OfflineRepo,
) -> None:
    build = Build(repo, repo.dir / "small-disk", {"ARCHKERNEL_AZURE__DISK_SIZE": "64MiB"})
    line, log = fails(build)
    m = re.fullmatch(
        rf"error: step {WORKFLOW}:06_disk failed: disk_size 64 MiB is too small for the root "
        rf"tree {build.azure}/image-root: it needs at least (\d+) MiB",
        line,
    )
    assert m is not None, line
    needed = int(m[1])
    assert f"hint: set disk_size to {needed}MiB or more" in log
    assert not build.vhd.exists()
    # The figure is enough: with it, the build goes on from step 6 and verifies.
    build.env["ARCHKERNEL_AZURE__DISK_SIZE"] = f"{needed}MiB"
    again = build.run()
    assert again.returncode == 0, again.stderr[-3000:]
    assert outcomes(again.stderr)["05_initramfs"] == "up to date"
    assert build.report()["ok"] is True


@pytest.mark.root
def test_unknown_package_shows_pacmans_words(repo: offline.OfflineRepo) -> None:
    env = {"ARCHKERNEL_AZURE__EXTRA_PACKAGES": '["nosuchpkg"]'}
    build = Build(repo, repo.dir / "unknown-package", env)
    line, _ = fails(build)
    assert line == (
        f"error: step {WORKFLOW}:02_pacstrap failed: "
        "pacstrap could not install the packages: target not found: nosuchpkg"
    )
    assert sorted(p.name for p in build.azure.iterdir()) == [
        "ids.json",
        "pacman.conf",
        "preflight.json",
    ]


@pytest.mark.root
def test_pacman_conf_that_does_not_exist(repo: offline.OfflineRepo) -> None:
    missing = repo.dir / "no-such-pacman.conf"
    env = {"ARCHKERNEL_AZURE__PACMAN_CONF": str(missing)}
    line, _ = fails(Build(repo, repo.dir / "no-pacman-conf", env))
    assert line == (
        f"error: step {WORKFLOW}:01_preflight failed: azure.pacman_conf: {missing} does not exist"
    )


def mirror_settings(repo: offline.OfflineRepo, name: str, mirror: str) -> Build:
    """A build from `mirror` (no pacman_conf): what a user without a local mirror runs."""
    path = repo.dir / f"{name}.toml"
    path.write_text(f'workdir = "{name}"\n[azure]\nmirror = "{mirror}"\n')
    return Build(repo, repo.dir / name, settings=path)


@pytest.mark.root
def test_unreachable_mirror_fails_fast(repo: offline.OfflineRepo) -> None:
    # Port 9 (discard) on the loopback: nothing listens, the connection is refused.
    build = mirror_settings(repo, "mirror-refused", "http://127.0.0.1:9/$repo/os/$arch")
    started = time.monotonic()
    line, log = fails(build)
    assert time.monotonic() - started < 60
    assert line.startswith(
        f"error: step {WORKFLOW}:01_preflight failed: the mirror "
        "http://127.0.0.1:9/$repo/os/$arch does not answer (http://127.0.0.1:9/core/os/x86_64/"
    )
    assert "Connection refused" in line
    assert "azure.pacman_conf" in log  # the hint names the way out


@pytest.mark.root
def test_silent_mirror_fails_within_its_time_limit(repo: offline.OfflineRepo) -> None:
    # A server that accepts connections and never answers: only a timeout ends the wait.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        build = mirror_settings(repo, "mirror-silent", f"http://127.0.0.1:{port}/$repo/os/$arch")
        started = time.monotonic()
        line, _ = fails(build)
        elapsed = time.monotonic() - started
    assert elapsed < 60, elapsed
    assert f"the mirror http://127.0.0.1:{port}/$repo/os/$arch does not answer" in line
    assert "timed out" in line


@pytest.mark.parametrize("tools", [["pacstrap"], ["pacstrap", "sfdisk"]])
@pytest.mark.root
def test_missing_host_tools_are_named_all_at_once(repo: offline.OfflineRepo, tools) -> None:
    name = "no-" + "-".join(tools)
    path = path_without(repo.dir / f"{name}-bin", *tools)
    build = Build(repo, repo.dir / name, {"PATH": path})
    line, log = fails(build)
    assert line == (
        f"error: step {WORKFLOW}:01_preflight failed: azure_vhd needs {len(tools)} missing tool(s): {', '.join(tools)}"
    )
    assert "pacstrap: install 'arch-install-scripts'" in log
    assert not (build.azure / "ids.json").exists()
