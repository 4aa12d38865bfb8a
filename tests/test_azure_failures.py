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

Rebuilds: a finished image is built again (`--from N`, as after a settings change) and the
rebuild is killed at points of steps 2, 5, 6 and 8: pacman unpacking, mkinitcpio running
in the image, mkfs.ext4 writing, and, where a step does its work in-process, at function
boundaries the run is made to wait at (`PAUSED`: the new disk renamed into place, before
the VHD footer, after it, after the rename onto the VHD's name). Right after the kill the
previous VHD (or, past step 8's rename, the new one) is there and Azure would take it; the
same command run again finishes a new image that verifies, and no process of the killed
run is still alive (every command carries the run that started it, RUN_VARIABLE).

Bad input: each run exits non-zero, its first `error:` line names the problem, there is
no traceback and nothing under the workdir is mounted or attached.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from archkernel.azure import workspace
from archkernel.azure.pacman import pacman_errors, pacstrap_error
from archkernel.demo import offline
from archkernel.host.processes import processes_in
from archkernel.host.run import RUN_VARIABLE, proc_stat, process_identity
from archkernel.settings import load
from tasks.azure_vhd import build_boottest
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
from tests.support.processes import alive, wait_for

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
    result = kill_at(build, Point(step, step, IN_STEP[step]), sig, group, *args).result
    # The signal landed inside the step: it neither finished nor wrote its target.
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


# --- killing a rebuild: the last good VHD stays until a new one replaces it -------------------


def _mkinitcpio_is_running(azure: Path) -> bool:
    """mkinitcpio runs chrooted into the image (arch-chroot's API mounts are up)."""
    tree = str(azure / "image-root")
    for entry in Path("/proc").iterdir():
        try:
            if os.readlink(entry / "root") == tree:
                return b"mkinitcpio" in (entry / "cmdline").read_bytes()
        except OSError:
            continue
    return False


@dataclass(frozen=True)
class Point:
    """Where in a step a rebuild is killed: when `reached` sees it in the work directory,
    or once the run waits at `pause` (module, function, before or after it). The rebuild
    runs `--from` the step, or from `start` (step 8 makes a new VHD only of a new disk.img,
    which step 7 copies out of the old VHD). `resumes`: the step a plain run after the kill
    starts from (None: nothing was undone, every step is up to date)."""

    step: str
    resumes: str | None
    reached: Callable[[Path], bool] | None = None
    pause: tuple[str, str, str] | None = None
    start: str | None = None

    @property
    def first(self) -> str:
        """The first step the rebuild runs (`07_bootloader`)."""
        return self.start or self.step


POINTS = {
    # Step 2 pacstraps beside the tree: the old one is whole, and so is everything after.
    "02-pacman-unpacking": Point("02_pacstrap", None, _pacstrap_is_unpacking),
    # Steps 5 and 6 drop their records before they change anything.
    "05-mkinitcpio-running": Point("05_initramfs", "05_initramfs", _mkinitcpio_is_running),
    "06-mkfs-writing": Point("06_disk", "06_disk", _mkfs_is_writing),
    "06-new-disk-renamed": Point(
        "06_disk", "06_disk", pause=("archkernel.azure.diskimage", "_put_disk_in_place", "after")
    ),
    # Step 7 finished: doit's record of step 8 names the bootloader.json before it.
    "08-before-the-footer": Point(
        "08_vhd",
        "08_vhd",
        pause=("archkernel.formats.vhd_file", "append_footer", "before"),
        start="07_bootloader",
    ),
    "08-footer-appended": Point(
        "08_vhd",
        "08_vhd",
        pause=("archkernel.formats.vhd_file", "append_footer", "after"),
        start="07_bootloader",
    ),
    "08-renamed-onto-the-vhd": Point(
        "08_vhd",
        "08_vhd",
        pause=("archkernel.azure.diskimage", "_replace_vhd", "after"),
        start="07_bootloader",
    ),
}
# The run, made to wait at a function boundary: `python -c PAUSED MODULE FUNCTION
# before|after FLAG ARGS...` runs `archkernel ARGS...` and, when it gets there, writes FLAG
# and sleeps (Ctrl-C interrupts the sleep as it would the work).
PAUSED = """
import functools, importlib, sys, time
module, name, when, flag, *argv = sys.argv[1:]
module = importlib.import_module(module)
real = getattr(module, name)
def pause():
    open(flag, "w").close()
    time.sleep(3600)
@functools.wraps(real)
def paused(*args, **kwargs):
    if when == "before":
        pause()
    result = real(*args, **kwargs)
    if when == "after":
        pause()
    return result
setattr(module, name, paused)
from tasks.cli import main
sys.exit(main(argv))
"""


def marked(run: str) -> list[str]:
    """The processes that carry the run `run` (`PID:START`) in RUN_VARIABLE: it, and
    whatever its commands started."""
    mark = f"{RUN_VARIABLE}={run}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if mark in (entry / "environ").read_bytes().split(b"\0"):
                found.append(f"{entry.name} {(entry / 'comm').read_text().strip()}")
        except OSError:
            continue
    return found


def process_tree(pid: int) -> list[str]:
    """`pid` and every process below it (by parent pid), as `PID:START` identities."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        fields = proc_stat(int(entry.name)) if entry.name.isdigit() else []
        if fields:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return [i for i in map(process_identity, found) if i is not None]


def _parent(identity: str) -> int | None:
    fields = proc_stat(int(identity.split(":")[0]))
    return int(fields[1]) if fields else None


def running(identities: list[str]) -> list[str]:
    """Those of the processes `identities` (`PID:START`) that still run (a zombie has
    ended), with their command names."""
    found = []
    for identity in identities:
        pid = int(identity.split(":")[0])
        if process_identity(pid) == identity and alive(pid):
            try:
                name = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue  # ended just now
            found.append(f"{identity} {name}")
    return found


@dataclass
class Killed:
    """A run killed in the middle of a step: how it ended, its log, which run it was and
    the processes it had when the signal came (itself and all below it)."""

    result: subprocess.CompletedProcess[str]
    run: str  # its RUN_VARIABLE value
    processes: list[str]  # `PID:START` of each
    commands: list[str]  # those it had started itself (its children)

    def survivors(self) -> list[str]:
        """Its processes still alive: those it had, and any carrying its mark."""
        return running(self.processes) + marked(self.run)


def kill_at(build: Build, point: Point, sig: signal.Signals, group: bool, *args: str) -> Killed:
    """`archkernel run azure_vhd ARGS` started, `sig` sent when it is at `point`; waited for."""
    log = build.workdir.parent / f"{build.workdir.name}-killed.log"
    flag = build.workdir.parent / f"paused-{build.workdir.name}"
    flag.unlink(missing_ok=True)
    cli = ["run", WORKFLOW, *args, "--settings", str(build.settings_path)]
    if point.pause is not None:
        argv = [sys.executable, "-c", PAUSED, *point.pause, str(flag), *cli]
        reached: Callable[[Path], bool] = lambda _: flag.exists()  # noqa: E731
    else:
        assert point.reached is not None
        argv, reached = [sys.executable, "-m", "tasks.cli", *cli], point.reached
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            argv,
            env=environment(**build.all_env),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,  # its own process group, like a job in a shell
        )
        try:
            run = process_identity(proc.pid)
            assert run is not None
            deadline = time.monotonic() + KILL_TIMEOUT
            while not (build.azure.is_dir() and reached(build.azure)):
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, f"{point} never came"
                time.sleep(0.01)
            processes = process_tree(proc.pid)
            commands = [i for i in processes if _parent(i) == proc.pid]
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
    assert outcomes(result.stderr).get(point.step) != "done in", result.stderr[-3000:]
    return Killed(result, run, processes, commands)


@dataclass(frozen=True)
class Image:
    """What identifies a VHD file: its footer's unique id (from vhd.json; the same for a
    rebuild when the IDs are derived from the settings) and the file itself."""

    id: str
    inode: int
    mtime_ns: int


def image_of(build: Build) -> Image:
    st = build.vhd.stat()
    return Image(
        json.loads((build.azure / "vhd.json").read_text())["id"], st.st_ino, st.st_mtime_ns
    )


def footer_id(vhd: Path) -> str:
    """The unique id in the VHD's footer: its bytes 68-84 (the VHD specification)."""
    with open(vhd, "rb") as f:
        f.seek(-512, os.SEEK_END)
        return str(uuid.UUID(bytes=f.read(512)[68:84]))


@pytest.fixture(scope="module")
def finished(repo: offline.OfflineRepo) -> Build:
    """One finished build that every rebuild test kills and then finishes again."""
    return built(repo, "rebuilt")


REBUILD_KILLS = [
    (point, kill)
    for point in POINTS
    for kill in KILLS
    # A step working in-process has no command running: the whole group is the run alone.
    if POINTS[point].pause is None or kill.id != "sigkill-group"
]


@pytest.mark.parametrize(
    ("point", "sig", "group"),
    [pytest.param(point, *kill.values, id=f"{point}-{kill.id}") for point, kill in REBUILD_KILLS],
)
@pytest.mark.root
def test_a_killed_rebuild_leaves_the_last_good_vhd_and_finishes_when_run_again(
    finished: Build, point: str, sig: signal.Signals, group: bool
) -> None:
    build = finished
    ready = build.run()  # a finished image, whatever an earlier test left
    assert ready.returncode == 0, ready.stderr[-5000:]
    old = image_of(build)
    step = POINTS[point].step
    number = POINTS[point].first[:2].lstrip("0")
    killed = kill_at(build, POINTS[point], sig, group, "--from", number)
    if sig == signal.SIGINT:
        assert killed.result.returncode == 130, killed.result.stderr[-3000:]
        assert f"{WORKFLOW}:{step}: interrupted after" in killed.result.stderr
        assert "Traceback" not in killed.result.stderr
        assert leftovers(build.workdir) == []
        assert killed.survivors() == []  # Ctrl-C: the run ended everything it started
    else:
        # The commands it was running end with it, at once (PR_SET_PDEATHSIG).
        wait_for(
            lambda: not running(killed.commands),
            lambda: f"the run's commands ending with it ({running(killed.commands)} still run)",
            timeout=KILL_TIMEOUT,
        )
    # A VHD Azure takes is there: the old one untouched, or past step 8's rename the new one.
    assert archkernel("vhd", "check", str(build.vhd)).returncode == 0
    if point == "08-renamed-onto-the-vhd":
        assert build.vhd.stat().st_ino != old.inode  # the new disk.img, renamed
        assert not (build.azure / "verify.json").exists()  # the old report went before it
    else:
        now = build.vhd.stat()
        assert (footer_id(build.vhd), now.st_ino, now.st_mtime_ns) == (
            old.id,
            old.inode,
            old.mtime_ns,
        )
        assert build.report()["ok"] is True  # its report, still about it
    # A plain run redoes what the kill left undone, and only that.
    resumes = POINTS[point].resumes
    again = build.run()
    assert again.returncode == 0, again.stderr[-5000:]
    assert "Traceback" not in again.stderr
    assert outcomes(again.stderr) == {
        s: "done in" if resumes is not None and s >= resumes else "up to date" for s in STEPS
    }
    assert build.report()["ok"] is True
    assert archkernel("vhd", "check", str(build.vhd)).returncode == 0
    assert image_of(build).id == footer_id(build.vhd)
    assert (image_of(build) == old) == (resumes is None)
    assert leftovers(build.workdir) == []
    assert [p.name for p in build.azure.iterdir() if ".tmp-" in p.name or ".old-" in p.name] == []
    assert still_working_in(build.workdir) == []
    assert killed.survivors() == []


@pytest.mark.root
def test_the_boot_test_boots_only_a_vhd_that_passed_verify(finished: Build) -> None:
    build = finished
    ready = build.run()
    assert ready.returncode == 0, ready.stderr[-5000:]
    report = build.azure / "verify.json"
    passed = report.read_text()
    try:
        failing = json.loads(passed)
        failing["ok"] = False
        report.write_text(json.dumps(failing))
        refused = build.archkernel("run", "azure_boottest")
        assert refused.returncode == 1, refused.stderr[-3000:]
        assert error_line(refused.stderr) == (
            "error: step azure_boottest:01_boot failed: "
            f"{build.vhd} failed verification: the boot test does not boot it"
        )
        assert not (build.azure / "boottest.log").exists()  # QEMU never started
    finally:
        report.write_text(passed)


def test_each_boot_reads_the_verify_report(repo: offline.OfflineRepo) -> None:
    # So a new report (step 9 ran again) boots again, and none boots nothing.
    s = load(
        repo.settings, env={"ARCHKERNEL_AZURE__BOOT": "hybrid", "ARCHKERNEL_AZURE__GENERATION": "2"}
    ).settings
    p = workspace.paths(s)
    assert [(step.verb, list(step.file_dep)) for step in build_boottest(s)] == [
        ("boot", [p.work / "vhd.json", p.work / "verify.json"]),
        ("boot_bios", [p.work / "vhd.json", p.work / "verify.json"]),
    ]


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
    # Another disk is another image, with IDs of its own (issue 13): the tree is configured
    # again for them, but the packages are not installed again.
    assert outcomes(again.stderr)["02_pacstrap"] == "up to date"
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
