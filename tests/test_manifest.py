"""The build manifest: what step 9 records about the image, and `archkernel manifest diff`.

The pure parts (what the commands print, the comparison) are tested on hand-written text
and hand-made manifests; the last test builds an image from the offline repository and
checks the manifest's sha256s against the files themselves.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from archkernel.azure import buildenv, manifest, verify, workspace
from archkernel.demo import offline
from archkernel.demo.package import Staging, write_package
from archkernel.demo.standins import _stage_tzdata
from archkernel.plan import declared_settings
from archkernel.settings import AzureSettings, Settings
from tasks import cli
from tests.support.azure import Build

# --- what the commands print ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("package", "output", "version"),
    [
        ("grub", "grub-editenv (GRUB) 2:2.12.r292.g73d1c959e-1\n", "2:2.12.r292.g73d1c959e-1"),
        (
            "e2fsprogs",
            "\nmke2fs 1.47.2 (1-Jan-2025)\n\tUsing EXT2FS Library version 1.47.2\n",
            "1.47.2",
        ),
        ("util-linux", "sfdisk from util-linux 2.41\n", "2.41"),
        (
            "dosfstools",
            "mkfs.fat 4.2 (2021-01-31)\nNo device specified.\nUsage: mkfs.fat [OPTIONS] TARGET"
            " [BLOCKS]\nup to BLOCKS 1024 byte blocks\n",
            "4.2",
        ),
        (
            "mtools",
            "mcopy (GNU mtools) 4.0.48\nconfigured with the following options: 1\n",
            "4.0.48",
        ),
    ],
)
def test_each_tools_version_is_read_from_its_line(package: str, output: str, version: str) -> None:
    tool = next(t for t in manifest.tools_for("uefi") if t.package == package)
    found = manifest.tool_version(tool, output)
    assert found is not None and found["version"] == version
    assert manifest.tool_version(tool, "command not found\n") is None


def test_the_esp_tools_count_only_for_uefi_images() -> None:
    bios = [t.package for t in manifest.tools_for("bios")]
    assert bios == ["grub", "e2fsprogs", "util-linux"]
    assert [t.package for t in manifest.tools_for("hybrid")] == [*bios, "dosfstools", "mtools"]


def test_pacmans_print_format_gives_repository_version_and_location() -> None:
    out = (
        "core linux 6.12.1.arch1-1 file:///var/cache/pacman/pkg/linux-6.12.1.arch1-1-x86_64.pkg.tar.zst\n"
        "extra vim 9.1.0-1 https://geo.mirror.pkgbuild.com/extra/os/x86_64/vim-9.1.0-1-x86_64.pkg.tar.zst\n"
    )
    synced = manifest.parse_sync(out)
    assert synced == {
        "linux": (
            "core",
            "6.12.1.arch1-1",
            "file:///var/cache/pacman/pkg/linux-6.12.1.arch1-1-x86_64.pkg.tar.zst",
        ),
        "vim": (
            "extra",
            "9.1.0-1",
            "https://geo.mirror.pkgbuild.com/extra/os/x86_64/vim-9.1.0-1-x86_64.pkg.tar.zst",
        ),
    }


def test_packages_get_the_sha256_of_their_file_in_the_cache(tmp_path: Path) -> None:
    package = tmp_path / "linux-6.12.1-1-x86_64.pkg.tar.zst"
    package.write_bytes(b"package bytes")
    synced = {
        "linux": ("core", "6.12.1-1", f"file://{package}"),
        "vim": ("extra", "9.1.0-1", "https://m/extra/os/x86_64/vim-9.1.0-1-x86_64.pkg.tar.zst"),
        "sudo": ("core", "1.9.17-1", f"file://{tmp_path}/sudo-1.9.17-1-x86_64.pkg.tar.zst"),
    }
    installed = {"linux": "6.12.1-1", "vim": "9.1.0-1", "sudo": "1.9.16-1"}
    entries = manifest.package_entries(
        installed, synced, lambda loc: Path(loc[7:]) if loc.startswith("file://") else None
    )
    assert entries == [
        {
            "name": "linux",
            "version": "6.12.1-1",
            "repository": "core",
            "file": "linux-6.12.1-1-x86_64.pkg.tar.zst",
            "sha256": hashlib.sha256(b"package bytes").hexdigest(),
        },
        # Another version in the database than in the image: nothing is claimed.
        {"name": "sudo", "version": "1.9.16-1", "repository": None, "file": None, "sha256": None},
        # Not in the cache: its repository and file, no sha256.
        {
            "name": "vim",
            "version": "9.1.0-1",
            "repository": "extra",
            "file": "vim-9.1.0-1-x86_64.pkg.tar.zst",
            "sha256": None,
        },
    ]


def test_a_cache_in_the_build_environment_is_found_in_its_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # builder = container: pacman ran inside, so its default cache is the environment's.
    root, shared = tmp_path / "env/root", tmp_path / "shared"
    env = buildenv.BuildEnv(root, "0" * 64, "tarball", "chroot", None, (buildenv.Bind(shared),))
    monkeypatch.setattr(buildenv, "load", lambda az, workdir: env)
    settings = Settings(workdir=tmp_path / "w", azure=AzureSettings(builder="container"))
    (root / "var/cache/pacman/pkg").mkdir(parents=True)
    (root / "var/cache/pacman/pkg/base-3-2-any.pkg.tar.zst").write_bytes(b"base")
    locate = manifest.package_locator(settings)
    assert locate("file:///var/cache/pacman/pkg/base-3-2-any.pkg.tar.zst") == (
        root / "var/cache/pacman/pkg/base-3-2-any.pkg.tar.zst"
    )
    # A shared path (azure.package_cache, the work directory) is the same on the host.
    assert locate(f"file://{shared}/cache/vim-9.1-1-x86_64.pkg.tar.zst") == (
        shared / "cache/vim-9.1-1-x86_64.pkg.tar.zst"
    )
    assert locate("https://m/core/os/x86_64/base-3-2-any.pkg.tar.zst") is None
    host = manifest.package_locator(Settings(workdir=tmp_path / "w"))
    assert host("file:///var/cache/pacman/pkg/a%2Bb-1-1-any.pkg.tar.zst") == Path(
        "/var/cache/pacman/pkg/a+b-1-1-any.pkg.tar.zst"
    )


def test_the_images_local_database_gives_names_and_versions(tmp_path: Path) -> None:
    for name, version in (("base", "3-2"), ("linux", "6.12.1.arch1-1")):
        entry = tmp_path / "var/lib/pacman/local" / f"{name}-{version}"
        entry.mkdir(parents=True)
        (entry / "desc").write_text(
            f"%NAME%\n{name}\n\n%VERSION%\n{version}\n\n%BASE%\n{name}\n\n%DESC%\nx\n"
        )
    assert manifest.local_packages(tmp_path) == {"base": "3-2", "linux": "6.12.1.arch1-1"}


def test_the_source_names_the_snapshot_and_the_repositories_servers() -> None:
    text = (
        "[options]\nCacheDir = /c/\n\n[core]\n"
        "Server = https://archive.archlinux.org/repos/2026/11/30/$repo/os/$arch\n"
        "[extra]  # comment\nInclude = /etc/pacman.d/mirrorlist\n"
    )
    assert manifest.source(AzureSettings(archive_date="2026-11-30"), text) == {
        "archive_date": "2026-11-30",
        "repositories": {
            "core": ["https://archive.archlinux.org/repos/2026/11/30/$repo/os/$arch"],
            "extra": ["Include /etc/pacman.d/mirrorlist"],
        },
    }
    assert manifest.source(AzureSettings(), "")["mirror"] == (
        "https://geo.mirror.pkgbuild.com/$repo/os/$arch"
    )


def test_step_9_plans_the_manifests_commands(tmp_path: Path) -> None:
    settings = Settings(workdir=tmp_path / "w", azure=AzureSettings(generation=2))
    p = workspace.paths(settings)
    tree = p.work / "tmp/verify/tree"
    before = verify.verify(settings).commands()  # a dry run before step 2
    assert tuple(manifest.sync_argv(p.pacman_conf, tree, ["PACKAGES-FROM-STEP-2"])) in before
    p.work.mkdir(parents=True)
    p.packages.write_text("base 3-2\nlinux 6.12.1.arch1-1\n")
    commands = verify.verify(settings).commands()
    assert (
        "pacman",
        "--config",
        f"{p.work}/pacman.conf",
        "--root",
        f"{tree}",
        "--dbpath",
        f"{tree}/var/lib/pacman",
        "--noconfirm",
        "-Sp",
        "--print-format",
        "%r %n %v %l",
        "base",
        "linux",
    ) in commands
    for argv in (
        ("grub-editenv", "--version"),
        ("mke2fs", "-V"),
        ("sfdisk", "--version"),
        ("mkfs.fat", "-v"),
        ("mcopy", "--version"),
    ):
        assert argv in commands
    declared = declared_settings(verify.verify)
    assert {"azure.archive_date", "azure.mirror", "azure.pacman_conf", "azure.user"} <= set(
        declared
    )
    assert "azure.boottest_timeout" not in declared  # the boot test's: not the image's


# --- comparing two ----------------------------------------------------------------------------


def package(name: str, version: str, sha: str, repo: str = "core") -> dict[str, Any]:
    return {
        "name": name,
        "version": version,
        "repository": repo,
        "file": f"{name}-{version}-x86_64.pkg.tar.zst",
        "sha256": sha,
    }


MANIFEST: dict[str, Any] = {
    "manifest": 1,
    "archkernel": "0.1.0",
    "settings": {"azure.hostname": "archlinux", "azure.user": None},
    "source": {"archive_date": "2026-11-30", "repositories": {"core": ["https://a/$repo"]}},
    "packages": [
        package("base", "3-2", "11" * 32),
        package("linux", "6.12.1-1", "22" * 32),
        package("vim", "9.1.0-1", "33" * 32, "extra"),
    ],
    "tools": {"grub": {"command": "grub-editenv --version", "version": "2:2.12-1"}},
    "ids": {"root_uuid": "0b6d3c3e-5a8f-4f3e-9d7e-1c2b3a4d5e6f"},
    "outputs": {"archlinux-azure.vhd": {"size": 536871424, "sha256": "44" * 32}},
}


def test_manifests_of_the_same_build_do_not_differ() -> None:
    assert manifest.diff(MANIFEST, copy.deepcopy(MANIFEST)) == []


def test_one_package_version_changed_names_exactly_that_package() -> None:
    other = copy.deepcopy(MANIFEST)
    other["packages"][1] = package("linux", "6.12.2-1", "55" * 32)
    assert [d.line() for d in manifest.diff(MANIFEST, other)] == [
        f"package linux: 6.12.1-1 from core, sha256 {'22' * 32} -> "
        f"6.12.2-1 from core, sha256 {'55' * 32}"
    ]


def test_each_section_is_compared() -> None:
    other = copy.deepcopy(MANIFEST)
    other["archkernel"] = "0.2.0"
    other["settings"]["azure.hostname"] = "web"
    other["source"]["archive_date"] = "2026-12-01"
    del other["packages"][2]  # vim gone
    other["packages"].append(package("less", "1:668-1", "66" * 32))
    other["tools"]["grub"]["version"] = "2:2.12-2"
    other["ids"]["root_uuid"] = "11111111-2222-3333-4444-555555555555"
    other["outputs"]["archlinux-azure.vhd"]["sha256"] = "77" * 32
    lines = [d.line() for d in manifest.diff(MANIFEST, other)]
    assert lines == [
        "archkernel version: 0.1.0 -> 0.2.0",
        "settings azure.hostname: archlinux -> web",
        "source archive_date: 2026-11-30 -> 2026-12-01",
        f"package less: (none) -> 1:668-1 from core, sha256 {'66' * 32}",
        f"package vim: 9.1.0-1 from extra, sha256 {'33' * 32} -> (none)",
        'tool grub: {"command": "grub-editenv --version", "version": "2:2.12-1"} -> '
        '{"command": "grub-editenv --version", "version": "2:2.12-2"}',
        "id root_uuid: 0b6d3c3e-5a8f-4f3e-9d7e-1c2b3a4d5e6f -> "
        "11111111-2222-3333-4444-555555555555",
        f'output archlinux-azure.vhd: {{"sha256": "{"44" * 32}", "size": 536871424}} -> '
        f'{{"sha256": "{"77" * 32}", "size": 536871424}}',
    ]


def test_manifest_diff_exits_0_when_equal_1_when_different_2_when_unreadable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b, same = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "same.json"
    a.write_text(json.dumps(MANIFEST))
    same.write_text(json.dumps(MANIFEST, indent=2))
    other = copy.deepcopy(MANIFEST)
    other["packages"][0]["version"] = "3-3"
    b.write_text(json.dumps(other))
    assert cli.main(["manifest", "diff", str(a), str(same)]) == 0
    assert capsys.readouterr().out == f"{a} and {same} describe the same build\n"
    assert cli.main(["manifest", "diff", str(a), str(b)]) == 1
    assert capsys.readouterr().out == (
        f"package base: 3-2 from core, sha256 {'11' * 32} -> 3-3 from core, sha256 {'11' * 32}\n"
    )
    assert cli.main(["manifest", "diff", str(a), str(tmp_path / "missing.json")]) == 2
    (tmp_path / "not.json").write_text('{"checks": []}')
    assert cli.main(["manifest", "diff", str(a), str(tmp_path / "not.json")]) == 2
    err = capsys.readouterr().err
    assert f"cannot read the manifest {tmp_path / 'missing.json'}" in err
    assert f"{tmp_path / 'not.json'} is not an archkernel manifest" in err


# --- a real build -----------------------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.integration
@pytest.mark.root
def test_the_manifests_sha256s_match_the_files(repo: offline.OfflineRepo, tmp_path: Path) -> None:
    build = Build(repo, tmp_path / "w")
    result = build.run()
    written = build.azure / "manifest.json"
    assert written.is_file(), result.stderr[-5000:]
    made = json.loads(written.read_text())
    # The copy beside the VHD is the same file.
    assert (build.azure / "archlinux-azure.vhd.manifest.json").read_bytes() == written.read_bytes()
    assert made["outputs"] == {
        "archlinux-azure.vhd": {"size": build.vhd.stat().st_size, "sha256": sha256(build.vhd)}
    }
    # Every package of the image, as the repository has it, with its file's sha256.
    lines = (build.azure / "packages.txt").read_text().splitlines()
    installed = dict(line.split() for line in lines)
    assert {p["name"]: p["version"] for p in made["packages"]} == installed
    assert installed == {name: repo.packages[name] for name in installed}
    for entry in made["packages"]:
        assert entry["repository"] == offline.REPO_NAME
        package_file = repo.dir / "pkgcache" / entry["file"]  # the pacman.conf's CacheDir
        assert entry["sha256"] == sha256(package_file), entry
        assert entry["sha256"] == sha256(repo.repo / entry["file"])  # what the repository has
    assert made["ids"] == json.loads((build.azure / "ids.json").read_text())
    assert made["source"] == {
        "pacman_conf": str(repo.pacman_conf),
        "repositories": {offline.REPO_NAME: [repo.repo.as_uri()]},
    }
    assert made["settings"]["azure.pacman_conf"] == str(repo.pacman_conf)
    assert made["tools"]["mkinitcpio"]["version"] == repo.packages["mkinitcpio"]
    for tool in ("grub", "e2fsprogs", "util-linux"):
        assert made["tools"][tool]["version"], made["tools"][tool]
    # No time, no path of the work directory.
    assert str(build.workdir) not in written.read_text()


@pytest.mark.integration
@pytest.mark.root
def test_manifest_diff_of_two_builds_names_exactly_the_package_that_changed(
    repo: offline.OfflineRepo, tmp_path: Path
) -> None:
    # A second repository: the same packages, but tzdata rebuilt as 1.0-2.
    second = tmp_path / "second"
    (second / "pkgcache").mkdir(parents=True)
    shutil.copytree(repo.repo, second / "repo")
    for old in (second / "repo").glob("tzdata-*.pkg.tar.zst"):
        old.unlink()
    staging = Staging(tmp_path / "stage" / "tzdata")
    staging.root.mkdir(parents=True)
    pkg = dataclasses.replace(_stage_tzdata(staging), version="1.0-2")
    made = write_package(pkg, staging, second / "repo", tmp_path / "stage")
    subprocess.run(
        ["repo-add", "--quiet", f"{offline.REPO_NAME}.db.tar.gz", made.name],
        cwd=second / "repo",
        check=True,
        capture_output=True,
    )
    (second / "pacman.conf").write_text(offline.pacman_conf(second / "repo", second / "pkgcache"))
    shutil.copy2(repo.settings, second / "settings.toml")  # pacman_conf: relative to it

    first = Build(repo, tmp_path / "w1")
    other = Build(repo, tmp_path / "w2", settings=second / "settings.toml")
    for build in (first, other):
        result = build.run()
        assert result.returncode == 0, result.stderr[-5000:]
    a, b = (json.loads((x.azure / "manifest.json").read_text()) for x in (first, other))
    changed = [d for d in manifest.diff(a, b) if d.section == "package"]
    assert [d.key for d in changed] == ["tzdata"]
    assert changed[0].line().startswith("package tzdata: 1.0-1 from archkernel-test, sha256 ")
    assert " -> 1.0-2 from archkernel-test, sha256 " in changed[0].line()
