"""The `archkernel` command as a newcomer meets it, proven on a three-step workflow.

This module is also that workflow's plugin module: the commands under test load it through
ARCHKERNEL_EXTRA_WORKFLOWS=tests.test_cli. `tiny` plants a tree (an intermediate: only
step 2 reads it), grows a sparse image from it (the final output), and writes a note with
the time zone. Every command runs as a separate process, as a user would start it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from archkernel.errors import UserError
from archkernel.host.files import write_text
from archkernel.plan import Plan, reads
from archkernel.settings import Settings
from archkernel.units import MiB
from tasks import clean, cli
from tasks.steps import Step, Workflow
from tests.support.cli import SETTINGS, plugin_env, run_archkernel

REPO = Path(__file__).resolve().parent.parent

# --- the workflow the commands run -----------------------------------------------------------


def _work(s: Settings) -> Path:
    return s.workdir.resolve() / "tiny"


def _record(s: Settings, step: str) -> None:
    s.workdir.mkdir(parents=True, exist_ok=True)
    with open(s.workdir / "runs.log", "a", encoding="utf-8") as f:
        f.write(step + "\n")


@reads("azure.hostname")
def plant(s: Settings) -> Plan:
    """plant a tree holding the host name"""
    work = _work(s)

    def go() -> None:
        _record(s, "01")
        (work / "tree").mkdir(parents=True, exist_ok=True)
        write_text(work / "tree" / "host.txt", s.azure.hostname)
        write_text(work / "tree.json", json.dumps({"host": s.azure.hostname}))

    return Plan().do("plant the tree", go)


def grow(s: Settings) -> Plan:
    """grow a 3 MiB image from the tree"""
    work = _work(s)
    staged = work / ".image.img.tmp"

    def name_it() -> None:
        _record(s, "02")
        host = (work / "tree" / "host.txt").read_bytes()  # fails once the tree is gone
        with open(staged, "r+b") as f:
            f.write(host)
        os.replace(staged, work / "image.img")

    return Plan().run(["truncate", "-s", "3M", staged]).do("name the image", name_it)


@reads("azure.timezone")
def finish(s: Settings) -> Plan:
    """write a note with the time zone"""

    def go() -> None:
        _record(s, "03")
        write_text(_work(s) / "note.txt", s.azure.timezone)

    return Plan().do("write the note", go)


def build(s: Settings) -> list[Step]:
    work = _work(s)
    return [
        Step.of(plant, targets=[work / "tree.json"]),
        Step.of(grow, targets=[work / "image.img"], file_dep=[work / "tree.json"]),
        Step.of(finish, targets=[work / "note.txt"], file_dep=[work / "image.img"]),
    ]


WORKFLOWS = [
    Workflow(
        "tiny",
        "a three-step workflow (tests only)",
        build,
        intermediates=lambda s: [_work(s) / "tree"],
        outputs=lambda s: [_work(s) / "image.img"],
    )
]

# --- running the command ---------------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    return plugin_env("tests.test_cli", **extra)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "settings.toml").write_text(SETTINGS)
    return tmp_path


def archkernel(project: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run_archkernel(project, "tests.test_cli", *args, **env)


def runs(project: Path) -> list[str]:
    log = project / "build" / "runs.log"
    lines = log.read_text().split() if log.exists() else []
    log.unlink(missing_ok=True)
    return lines


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stderr
    return result


# --- 3. a step that runs again says why --------------------------------------------------------


def test_run_says_why_a_finished_step_runs_again(project: Path) -> None:
    first = ok(archkernel(project, "run", "tiny"))
    assert "runs again" not in first.stderr  # nothing had finished before
    runs(project)

    steps = ok(archkernel(project, "steps", "tiny", ARCHKERNEL_AZURE__TIMEZONE="Europe/Paris"))
    because = 'setting azure.timezone: "UTC" -> "Europe/Paris"'
    assert because in steps.stdout
    again = ok(archkernel(project, "run", "tiny", ARCHKERNEL_AZURE__TIMEZONE="Europe/Paris"))
    assert f"tiny:03_finish: runs again because {because}\n" in again.stderr
    assert "tiny:01_plant: runs again" not in again.stderr
    assert runs(project) == ["03"]

    renamed = ok(archkernel(project, "run", "tiny", ARCHKERNEL_AZURE__HOSTNAME="two"))
    stamp = project / "build" / "tiny" / "tree.json"
    assert 'tiny:01_plant: runs again because setting azure.hostname: "one" -> "two"\n' in (
        renamed.stderr
    )
    assert f"tiny:02_grow: runs again because input changed: {stamp}\n" in renamed.stderr
    runs(project)

    forced = ok(archkernel(project, "run", "tiny", "--from", "3", ARCHKERNEL_AZURE__HOSTNAME="two"))
    assert "tiny:03_finish: runs again because forced by --from\n" in forced.stderr


# --- 4. a reader that goes away ----------------------------------------------------------------


@pytest.mark.parametrize("args", [["steps", "tiny"], ["settings", "show"], ["list"]])
def test_a_closed_pipe_ends_quietly(project: Path, args: list[str]) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `| head` that has already exited: every write fails
    try:
        result = subprocess.run(
            [sys.executable, "-m", "tasks.cli", *args],
            cwd=project,
            env=_env(),
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert result.stderr == ""
    assert result.returncode == 141  # as if killed by SIGPIPE, as `yes | head` is


# --- 5. -v and -q after the command ------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "verbose", "quiet"),
    [
        (["run", "azure_vhd", "-v"], 1, False),
        (["run", "azure_vhd", "-vv"], 2, False),
        (["-v", "run", "azure_vhd"], 1, False),
        (["run", "azure_vhd", "--quiet"], 0, True),
        (["-q", "steps", "azure_vhd"], 0, True),
        (["steps", "azure_vhd", "-q"], 0, True),
        (["settings", "show", "-v"], 1, False),
        (["vhd", "check", "disk.vhd", "-q"], 0, True),
        (["clean", "azure_vhd", "-v"], 1, False),
    ],
)
def test_verbosity_options_go_before_or_after_the_command(
    argv: list[str], verbose: int, quiet: bool
) -> None:
    args = cli._parser().parse_args(argv)
    assert (args.verbose, args.quiet) == (verbose, quiet)


def test_quiet_and_verbose_after_run_change_what_it_logs(project: Path) -> None:
    quiet = ok(archkernel(project, "run", "tiny", "-q"))
    assert quiet.stderr == ""
    verbose = ok(archkernel(project, "run", "tiny", "--from", "2", "-v"))
    staged = project / "build" / "tiny" / ".image.img.tmp"
    assert f"+ truncate -s 3M {staged}\n" in verbose.stderr


# --- 6. step numbers outside the workflow ------------------------------------------------------


@pytest.mark.parametrize(
    "args", [["--from", "4"], ["--from", "0"], ["--to", "10"], ["--to", "0"], ["--from", "04_x"]]
)
def test_step_numbers_outside_the_workflow_are_refused(project: Path, args: list[str]) -> None:
    result = archkernel(project, "run", "tiny", *args)
    assert result.returncode == 1
    option, value = args[0], int(args[1].split("_")[0])
    assert f"error: {option} {value}: tiny has steps 1 to 3\n" in result.stderr
    assert "hint: give a step number from 1 to 3" in result.stderr
    assert not (project / "build").exists()
    dry = archkernel(project, "run", "tiny", "--dry-run", *args)
    assert dry.returncode == 1 and "tiny has steps 1 to 3" in dry.stderr


# --- 9. where the output goes -----------------------------------------------------------------


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"]])
def test_help_says_how_to_capture_the_whole_log(project: Path, args: list[str]) -> None:
    out = ok(archkernel(project, *args)).stdout
    assert "archkernel run azure_vhd > build.log 2>&1" in out
    assert "stderr" in out and "stdout" in out


# --- 10. settings show pastes back -------------------------------------------------------------


def test_settings_show_prints_toml_that_loads_back_to_the_same_settings(project: Path) -> None:
    shown = ok(archkernel(project, "settings", "show", ARCHKERNEL_AZURE__DISK_SIZE="8GiB"))
    data = tomllib.loads(shown.stdout)
    assert data["azure"]["disk_size"] == "8GiB"
    assert data["azure"]["hostname"] == "one"
    assert data["scaleway"]["modules"] == ["mvneta", "nbd"]
    assert "tftp_server" not in data["scaleway"]  # not set: shown commented out
    assert re.search(r"^azure.disk_size +=.*# env ARCHKERNEL_AZURE__DISK_SIZE$", shown.stdout, re.M)
    (project / "pasted.toml").write_text(shown.stdout)
    pasted = ok(archkernel(project, "--settings", "pasted.toml", "settings", "show"))
    assert tomllib.loads(pasted.stdout) == data


# --- 11. vhd from-raw does not overwrite by accident -------------------------------------------


def test_vhd_from_raw_needs_force_to_replace_a_file(tmp_path: Path) -> None:
    raw, out = tmp_path / "disk.raw", tmp_path / "disk.vhd"
    with open(raw, "wb") as f:
        f.truncate(MiB)
    out.write_bytes(b"precious")
    refused = archkernel(tmp_path, "vhd", "from-raw", str(raw), str(out))
    assert refused.returncode == 1
    assert f"error: {out} exists" in refused.stderr and "--force" in refused.stderr
    assert out.read_bytes() == b"precious"
    ok(archkernel(tmp_path, "vhd", "from-raw", str(raw), str(out), "--force"))
    assert out.stat().st_size == MiB + 512


def test_vhd_from_raw_explains_its_arguments(tmp_path: Path) -> None:
    out = ok(archkernel(tmp_path, "vhd", "from-raw", "--help")).stdout
    assert re.search(r"raw +the raw disk image", out), out
    assert re.search(r"vhd +the VHD file to write", out), out
    assert re.search(r"--force +replace VHD if it exists", out), out


def test_vhd_check_prints_the_fix_for_a_truncated_image(tmp_path: Path) -> None:
    disk = tmp_path / "disk.vhd"
    head = bytearray(1024)
    head[446 + 4] = 0x83  # one Linux partition: sectors 2048 to 16383, an 8 MiB disk
    head[446 + 8 : 446 + 16] = (2048).to_bytes(4, "little") + (14336).to_bytes(4, "little")
    head[510:512] = b"\x55\xaa"
    with open(disk, "wb") as f:
        f.write(head)
        f.truncate(5 * MiB)  # cut short: 3 MiB and the footer are gone
    result = archkernel(tmp_path, "vhd", "check", str(disk))
    assert result.returncode == 1
    assert "it looks truncated" in result.stdout
    assert "from-raw" not in result.stdout.split("hint:")[0]
    assert "  hint: copy or download the file again" in result.stdout


# --- 12. --json ----------------------------------------------------------------------------------


def test_steps_json(project: Path) -> None:
    ok(archkernel(project, "run", "tiny", "--to", "1"))
    result = ok(archkernel(project, "steps", "tiny", "--json"))
    assert json.loads(result.stdout) == {
        "workflow": "tiny",
        "steps": [
            {
                "task": "tiny:01_plant",
                "number": 1,
                "name": "plant",
                "doc": "plant a tree holding the host name",
                "state": "done",
                "reasons": [],
            },
            {
                "task": "tiny:02_grow",
                "number": 2,
                "name": "grow",
                "doc": "grow a 3 MiB image from the tree",
                "state": "pending",
                "reasons": ["not finished yet"],
            },
            {
                "task": "tiny:03_finish",
                "number": 3,
                "name": "finish",
                "doc": "write a note with the time zone",
                "state": "pending",
                "reasons": [
                    "not finished yet",
                    f"input not there yet: {project / 'build/tiny/image.img'}",
                ],
            },
        ],
    }


def test_settings_show_json(project: Path) -> None:
    result = ok(archkernel(project, "settings", "show", "--json", ARCHKERNEL_AZURE__KEYMAP="de"))
    shown = json.loads(result.stdout)
    settings_file = str(project / "settings.toml")
    assert shown["file"] == settings_file and shown["file_origin"] == "./settings.toml"
    values = shown["settings"]
    assert values["azure.hostname"] == {"value": "one", "origin": f"file {settings_file}"}
    assert values["azure.keymap"] == {"value": "de", "origin": "env ARCHKERNEL_AZURE__KEYMAP"}
    assert values["azure.disk_size"] == {"value": "30GiB", "origin": "default"}
    assert values["scaleway.tftp_server"] == {"value": None, "origin": "default"}
    assert values["scaleway.tftp_port"] == {"value": 69, "origin": "default"}


def test_vhd_check_json(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(MiB)
    ok(archkernel(tmp_path, "vhd", "from-raw", str(raw), str(tmp_path / "disk.vhd")))
    good = json.loads(ok(archkernel(tmp_path, "vhd", "check", "disk.vhd", "--json")).stdout)
    assert good["ok"] is True and good["truncated"] is False and good["hint"] is None
    assert good["path"] == "disk.vhd" and good["file_size"] == MiB + 512
    assert [r["rule"] for r in good["rules"]] == [
        "cookie",
        "checksum",
        "disk-type",
        "data-offset",
        "whole-mib",
        "azure-max",
        "file-size",
        "original-size",
    ]
    assert all(r["ok"] for r in good["rules"])
    bad = archkernel(tmp_path, "vhd", "check", "disk.raw", "--json")
    assert bad.returncode == 1
    report = json.loads(bad.stdout)
    assert report["ok"] is False
    assert [(r["rule"], r["ok"]) for r in report["rules"]] == [("cookie", False)]


# --- 13. the last line, clean, --version ---------------------------------------------------------


def test_a_finished_run_ends_naming_its_output_and_size(project: Path) -> None:
    partial = ok(archkernel(project, "run", "tiny", "--to", "2"))
    image = project / "build" / "tiny" / "image.img"
    assert f"tiny: {image}" not in partial.stderr  # the run did not finish the workflow
    done = ok(archkernel(project, "run", "tiny"))
    last = done.stderr.splitlines()[-1]
    assert re.fullmatch(rf"tiny: {re.escape(str(image))} \(3 MiB, [0-9.]+ (bytes|KiB) used\)", last)


def test_clean_removes_the_tree_keeps_the_image_and_the_next_run_rebuilds(project: Path) -> None:
    ok(archkernel(project, "run", "tiny"))
    runs(project)
    tree, image = project / "build/tiny/tree", project / "build/tiny/image.img"
    before = image.read_bytes()

    cleaned = ok(archkernel(project, "clean", "tiny"))
    assert not tree.exists()
    assert image.read_bytes() == before
    assert f"removed {tree} (" in cleaned.stdout
    assert f"kept    {image}\n" in cleaned.stdout
    states = json.loads(ok(archkernel(project, "steps", "tiny", "--json")).stdout)["steps"]
    assert [s["state"] for s in states] == ["pending", "pending", "pending"]

    # Step 2 reads the tree: a run trusting the old record would skip step 1 and leave
    # step 2 nothing to read the next time it runs.
    ok(archkernel(project, "run", "tiny"))
    assert runs(project) == ["01", "02", "03"]
    assert (tree / "host.txt").read_text() == "one"
    again = ok(archkernel(project, "clean", "tiny"))
    assert again.stdout.startswith(f"removed {tree}")
    assert ok(archkernel(project, "clean", "tiny")).stdout == (
        "tiny: no intermediate trees to remove\n"
    )


def test_clean_of_a_workflow_without_intermediates_removes_nothing(project: Path) -> None:
    result = ok(archkernel(project, "clean", "azure_boottest"))
    assert result.stdout == "azure_boottest keeps no intermediate trees: nothing to remove\n"


def test_version_names_the_commit_of_a_checkout(project: Path) -> None:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs git and a checkout")
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short=7", "HEAD"],
        capture_output=True,
        text=True,
    )
    if head.returncode != 0:
        pytest.skip(f"git cannot read the checkout: {head.stderr}")
    out = ok(archkernel(project, "--version")).stdout
    assert re.fullmatch(r"archkernel \S+ \(git \S+\)\n", out), out
    assert head.stdout.strip() in out


def test_version_without_a_checkout_or_git_names_no_commit(tmp_path: Path) -> None:
    copy = tmp_path / "installed"
    for package in ("archkernel", "tasks"):
        shutil.copytree(REPO / package, copy / package)
    result = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "--version"],
        cwd=tmp_path,
        env={**_env(), "PYTHONPATH": str(copy)},
        capture_output=True,
        text=True,
    )
    assert re.fullmatch(r"archkernel [0-9][^ ]*\n", result.stdout), result
    no_git = ok(archkernel(tmp_path, "--version", PATH=str(tmp_path / "no-tools")))
    assert re.fullmatch(r"archkernel [0-9][^ ]*\n", no_git.stdout), no_git


def test_git_commit_is_none_outside_a_checkout(tmp_path: Path) -> None:
    assert cli.git_commit(tmp_path) is None


def test_clean_refuses_a_tree_outside_the_workdir(tmp_path: Path) -> None:
    from archkernel.settings import load

    loaded = load(None, env={}, cwd=tmp_path)
    outside = Workflow("bad", "", build, intermediates=lambda s: [tmp_path / "elsewhere"])
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(UserError, match="not inside the workdir"):
        clean.clean_workflow(loaded, outside)
    assert (tmp_path / "elsewhere").exists()
