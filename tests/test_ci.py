"""The CI scripts' own logic."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from archkernel.settings import load

REPO = Path(__file__).resolve().parent.parent


def _have_lists(directory: Path) -> bool:
    script = '. .ci/lib.sh; have_package_lists "$1"'
    done = subprocess.run(["bash", "-c", script, "-", str(directory)], cwd=REPO, check=False)
    return done.returncode == 0


@pytest.mark.parametrize(
    "name",
    [
        "deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages",
        "deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages.lz4",
        "archive.ubuntu.com_ubuntu_dists_noble_main_binary-amd64_Packages.zst",
    ],
)
@pytest.mark.integration
def test_package_lists_are_found_compressed_or_not(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"lists")
    assert _have_lists(tmp_path)


@pytest.mark.integration
def test_no_package_lists_means_an_update(tmp_path: Path) -> None:
    assert not _have_lists(tmp_path)
    (tmp_path / "lock").write_bytes(b"")
    (tmp_path / "deb.debian.org_debian_dists_bookworm_InRelease").write_bytes(b"x")
    assert not _have_lists(tmp_path)
    (tmp_path / "x_Packages.lz4").write_bytes(b"")  # empty: a failed download
    assert not _have_lists(tmp_path)


# --- the Azure image workflow (.github/workflows/azure-image.yml) ------------------------------

WORKFLOW = REPO / ".github/workflows/azure-image.yml"
CI_DIR = Path("/var/tmp/archkernel-ci")
CACHE = CI_DIR / "pacman-cache"


def _workflow() -> dict:
    yaml = pytest.importorskip("yaml")
    data = yaml.safe_load(WORKFLOW.read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as true
    return data


def _ci_section() -> str:
    readme = (REPO / "README.md").read_text()
    return readme.split("\n## CI image builds\n", 1)[1].split("\n## ", 1)[0]


def _commands(script: str) -> list[str]:
    """The archkernel and .ci/ commands of a run: script, as `program subcommand...`: the
    words up to the first argument that is a variable, a quoted value or a file."""
    found = []
    words = shlex.split(script.replace("\\\n", " "), posix=False)
    for i, word in enumerate(words):
        program = word.removeprefix("/src/").removeprefix(".venv/bin/")
        if program == "archkernel" or program.startswith(".ci/"):
            command = [program]
            for arg in words[i + 1 :]:
                if arg in ("&&", "||", ";", "|") or arg.startswith(('"', "'", "$", ".ci/")):
                    break
                command.append(arg)
            found.append(" ".join(command))
    return found


def test_the_workflow_runs_on_push_pull_requests_tags_and_weekly() -> None:
    on = _workflow()["on"]
    assert on["push"]["branches"] == ["main"] and on["push"]["tags"] == ["v*"]
    assert "pull_request" in on
    assert on["schedule"] == [{"cron": "17 4 * * 1"}]


def test_the_workflow_runs_only_commands_the_readme_documents() -> None:
    steps = _workflow()["jobs"]["image"]["steps"]
    commands = [c for step in steps if "run" in step for c in _commands(step["run"])]
    assert commands == [
        ".ci/setup",
        ".ci/aur-package",
        "archkernel run azure_vhd --settings",
        ".ci/prune-package-cache",
        "archkernel run azure_boottest --settings",
        ".ci/azure-artifacts",
    ]
    section = _ci_section()
    for command in commands:
        assert command in section, f"{command!r} is not in the README's CI image builds"
        if command.startswith(".ci/"):
            assert os.access(REPO / command, os.X_OK), command


def test_the_publish_job_runs_on_tags_with_oidc_and_commands_the_readme_documents() -> None:
    job = _workflow()["jobs"]["publish"]
    assert job["if"] == "startsWith(github.ref, 'refs/tags/v')" and job["needs"] == "image"
    assert job["permissions"]["id-token"] == "write"
    uses = [step.get("uses", "") for step in job["steps"]]
    assert any(u.startswith("azure/login@") for u in uses)
    login = next(s for s in job["steps"] if s.get("uses", "").startswith("azure/login@"))
    assert set(login["with"]) == {"client-id", "tenant-id", "subscription-id"}
    assert "secrets." not in WORKFLOW.read_text().split("\n  publish:\n", 1)[1]
    commands = [c for step in job["steps"] if "run" in step for c in _commands(step["run"])]
    assert commands == [
        ".ci/setup",
        ".ci/azure/restore-artifact",
        "archkernel run azure_publish --settings",
    ]
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Publishing\n", 1)[1].split("\n## ", 1)[0]
    for command in commands:
        assert command in section, f"{command!r} is not in the README's Publishing"
        if command.startswith(".ci/"):
            assert os.access(REPO / command, os.X_OK), command


def test_each_variant_has_valid_settings_that_build_in_the_bootstrap_environment() -> None:
    job = _workflow()["jobs"]["image"]
    variants = [entry["variant"] for entry in job["strategy"]["matrix"]["include"]]
    assert variants == ["gen1-cloud-init", "gen2", "hybrid-waagent"]
    assert sorted(p.stem for p in (REPO / ".ci/azure").glob("*.toml")) == sorted(variants)
    expected = {
        "gen1-cloud-init": (1, "bios", "cloud-init"),
        "gen2": (2, "uefi", "cloud-init"),
        "hybrid-waagent": (2, "hybrid", "waagent"),
    }
    for variant in variants:
        path = REPO / ".ci/azure" / f"{variant}.toml"
        az = load(path, env={}, cwd=REPO).settings.azure  # raises UserError if invalid
        assert (az.generation, az.firmware, az.provisioning) == expected[variant], variant
        assert az.builder == "container" and az.container_runtime == "chroot"
        assert load(path, env={}, cwd=REPO).settings.workdir == CI_DIR / variant
        # The package cache the workflow keeps: the setting, or CacheDir of a pacman.conf.
        if az.pacman_conf is None:
            assert az.package_cache == CACHE
        else:
            assert f"CacheDir = {CACHE}/" in az.pacman_conf.read_text().splitlines()
    assert job["env"]["PACKAGE_CACHE"] == str(CACHE)
    cached = [s["with"]["path"] for s in job["steps"] if "actions/cache" in s.get("uses", "")]
    assert cached == [str(CACHE), str(CACHE)]  # restored, then saved


def test_the_waagent_variant_uses_the_repository_aur_package_makes() -> None:
    conf = (REPO / ".ci/azure/hybrid-waagent.pacman.conf").read_text()
    assert (
        "[ci-aur]\nSigLevel = Optional TrustAll\nServer = file:///var/tmp/archkernel-ci/aur\n"
        in conf
    )
    assert "[core]" in conf and "[extra]" in conf
    (entry,) = [
        e for e in _workflow()["jobs"]["image"]["strategy"]["matrix"]["include"] if e["aur"]
    ]
    assert entry == {"variant": "hybrid-waagent", "aur": "walinuxagent"}
    aur = load(REPO / ".ci/azure/hybrid-waagent.toml", env={}, cwd=REPO).settings.azure
    assert aur.agent_package == "walinuxagent"


@pytest.mark.integration
def test_actionlint_passes_on_the_workflows() -> None:
    actionlint = REPO / ".venv/bin/actionlint"
    if not actionlint.exists():
        pytest.skip("actionlint is not installed (.ci/setup installs it)")
    done = subprocess.run([actionlint], cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def _bash(script: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", f". .ci/lib.sh; {script}", "-", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )


SRCINFO = """\
pkgbase = walinuxagent
\tpkgdesc = Microsoft Azure Linux Guest Agent
\tpkgver = 2.12.0.4
\tpkgrel = 1
\tarch = any
\tmakedepends = python-setuptools
\tmakedepends = python-build>=1.0
\tdepends = python
\tdepends = openssl
\tdepends = iproute2
\tdepends = python
\tdepends_x86_64 = sudo
\tvalidpgpkeys = 0123456789ABCDEF0123456789ABCDEF01234567

pkgname = walinuxagent
"""


@pytest.mark.integration
def test_an_aur_packages_needs_are_read_from_its_srcinfo(tmp_path: Path) -> None:
    (tmp_path / ".SRCINFO").write_text(SRCINFO)
    needs = _bash('srcinfo_needs "$1"', tmp_path / ".SRCINFO")
    assert needs.stdout.split() == [
        "iproute2",
        "openssl",
        "python",
        "python-build",
        "python-setuptools",
        "sudo",
    ]
    keys = _bash('srcinfo_field validpgpkeys "$1"', tmp_path / ".SRCINFO")
    assert keys.stdout == "0123456789ABCDEF0123456789ABCDEF01234567\n"


@pytest.mark.integration
def test_the_package_cache_keeps_only_what_the_build_installed(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    names = [
        "linux-6.17.1.arch1-1-x86_64.pkg.tar.zst",
        "linux-6.17.1.arch1-1-x86_64.pkg.tar.zst.sig",
        "linux-6.16.9.arch1-1-x86_64.pkg.tar.zst",  # the version before: goes
        "linux-6.16.9.arch1-1-x86_64.pkg.tar.zst.sig",
        "ffmpeg-2:7.1-3-x86_64.pkg.tar.zst",  # an epoch in the name
        "ffmpeg-2:7.0-1-x86_64.pkg.tar.zst",
        "ca-certificates-20240618-1-any.pkg.tar.zst",
        "walinuxagent-2.12.0.4-1-any.pkg.tar.xz",
        "linux-headers-6.17.1.arch1-1-x86_64.pkg.tar.zst",  # not installed
    ]
    for name in names:
        (cache / name).write_bytes(b"p")
    (cache / "download-AbC123").mkdir()  # an interrupted download
    (cache / "download-AbC123/linux-firmware.part").write_bytes(b"x")
    manifest = tmp_path / "packages.txt"
    manifest.write_text("linux 6.17.1.arch1-1\nffmpeg 2:7.1-3\nca-certificates 20240618-1\n")
    agent = tmp_path / "agent.txt"
    agent.write_text("walinuxagent 2.12.0.4-1\n")
    done = _bash('prune_package_cache "$@"', cache, manifest, agent)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in cache.iterdir()) == [
        "ca-certificates-20240618-1-any.pkg.tar.zst",
        "ffmpeg-2:7.1-3-x86_64.pkg.tar.zst",
        "linux-6.17.1.arch1-1-x86_64.pkg.tar.zst",
        "linux-6.17.1.arch1-1-x86_64.pkg.tar.zst.sig",
        "walinuxagent-2.12.0.4-1-any.pkg.tar.xz",
    ]


@pytest.mark.integration
def test_the_artifacts_hold_the_vhd_sparse_and_compressed_with_the_reports(
    tmp_path: Path,
) -> None:
    work = tmp_path / "work/azure"
    work.mkdir(parents=True)
    vhd = work / "archlinux-azure.vhd"
    with vhd.open("wb") as f:  # 256 MiB with 3.5 KiB of data: a sparse file
        f.truncate(256 << 20)
        f.seek(1 << 20)
        f.write(b"\xeb\x63\x90" * 1000)
        f.seek((256 << 20) - 512)
        f.write(b"conectix" + bytes(504))
    (work / "verify.txt").write_text("PASS vhd.footer\n")
    (work / "verify.json").write_text('{"passed": true}\n')
    (work / "packages.txt").write_text("base 3-2\n")
    (work / "manifest.json").write_text('{"packages": {"base": "3-2"}}\n')
    (work / "boottest.log").write_text("archlinux login: \n")
    settings = tmp_path / "ci.toml"
    settings.write_text('workdir = "work"\n[azure]\ndisk_size = "256MiB"\n')
    out = tmp_path / "dist"
    done = subprocess.run(
        [REPO / ".ci/azure-artifacts", settings, out], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    archive = out / "archlinux-azure.vhd.tar.zst"
    assert sorted(p.name for p in out.iterdir()) == [
        "SHA256SUMS",
        "archlinux-azure.vhd.tar.zst",
        "boottest.log",
        "manifest.json",
        "packages.txt",
        "verify.json",
        "verify.txt",
    ]
    assert archive.stat().st_size < 64 * 1024  # the holes are not in it
    sums = (out / "SHA256SUMS").read_text().splitlines()
    assert [line.split()[1] for line in sums] == [
        "archlinux-azure.vhd.tar.zst",
        "boottest.log",
        "manifest.json",
        "packages.txt",
        "verify.json",
        "verify.txt",
    ]
    subprocess.run(["sha256sum", "--check", "--quiet", "SHA256SUMS"], cwd=out, check=True)
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    subprocess.run(["tar", "-xf", archive, "-C", unpacked], check=True)
    again = unpacked / "archlinux-azure.vhd"
    assert again.stat().st_size == 256 << 20
    assert again.stat().st_blocks * 512 < 1 << 20  # sparse again
    subprocess.run(["cmp", again, vhd], check=True)

    vhd.unlink()  # a failed build: the rest is still collected, and it says so
    failed = subprocess.run(
        [REPO / ".ci/azure-artifacts", settings, tmp_path / "failed"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert failed.returncode == 1 and "no VHD at" in failed.stderr
    assert (tmp_path / "failed/verify.txt").read_text() == "PASS vhd.footer\n"


SKIPPING = """
import pytest
from tests.support.skips import skip_for_this_machine

def test_needs_a_tool():
    pytest.skip("no such tool")

def test_on_a_machine_with_a_docker_engine():
    skip_for_this_machine("a docker engine answers")

@pytest.mark.xfail(reason="a known bug", strict=True)
def test_known_to_fail():
    assert False

def test_passes():
    assert True
"""


@pytest.mark.integration
@pytest.mark.parametrize("strict", [True, False])
def test_in_ci_a_skipped_test_fails_the_run(tmp_path: Path, strict: bool) -> None:
    """With TESTS_FAIL_ON_SKIP=1, which .ci/run sets, a skip fails the run and is named,
    a whole module's too; a skip about the machine and an xfail do not. Without it a skip
    is only reported."""
    (tmp_path / "test_skips.py").write_text(SKIPPING)
    (tmp_path / "test_module_skipped.py").write_text(
        "import pytest\npytest.importorskip('no_such_module_here')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TESTS_FAIL_ON_SKIP"}
    if strict:
        env["TESTS_FAIL_ON_SKIP"] = "1"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.conftest",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            str(tmp_path),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "1 passed, 3 skipped, 1 xfailed" in done.stdout, done.stdout
    assert done.returncode == (1 if strict else 0), done.stdout
    section = done.stdout.partition("skipped tests fail this run (TESTS_FAIL_ON_SKIP=1)")[2]
    named = [line for line in section.splitlines()[1:] if not line.startswith("=")]
    if strict:
        assert [line for line in named if line] == [
            "test_module_skipped.py: Skipped: could not import 'no_such_module_here': "
            "No module named 'no_such_module_here'",
            "test_skips.py::test_needs_a_tool: Skipped: no such tool",
        ], done.stdout
    else:
        assert section == ""


def test_ci_runs_the_tests_with_skips_failing() -> None:
    script = (REPO / ".ci/run").read_text()
    assert "export TESTS_FAIL_ON_SKIP=1\n" in script
    assert script.index("export TESTS_FAIL_ON_SKIP=1") < script.index("\n.venv/bin/pytest\n")
