"""The bootstrap build environment: obtaining, verifying, caching, and running inside it.

The first half decides (tarball names, signatures, binds, the commands a runtime runs) and
is tested with plain asserts. The second half runs for real: a build environment that is
not this host's userland (Debian made with debootstrap and packed like Arch's bootstrap
tarball, see tests/support/buildenv.py) is prepared once per module, and the tests prove
that commands run inside it, see the work directory at the same path, leave no mount and
no process behind (Ctrl-C and timeouts included), and that crashed runs are cleaned up.
Signatures are checked with a key the tests make. docker and podman are tested on the
commands they would be given: no container engine runs on these machines.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from archkernel.azure import bootstrap, buildenv, workspace
from archkernel.azure.buildenv import Bind, BuildEnv
from archkernel.azure.buildenv.prepare import in_tree
from archkernel.demo import offline
from archkernel.errors import UserError
from archkernel.host import mounts
from archkernel.host.files import remove_path, sha256_file, temporary_directory, write_text
from archkernel.host.run import (
    Command,
    minimal_env,
    missing_tools,
    run,
    run_identity,
    which,
    wrapping,
)
from archkernel.settings import AzureSettings, Settings, validate
from tests.support import buildenv as support
from tests.support.buildenv import env_processes
from tests.support.processes import wait_for
from tests.support.safety_net import safety_net
from tests.support.skips import skip_for_this_machine

REPO = Path(__file__).resolve().parent.parent
GOOD_STATUS = """\
[GNUPG:] NEWSIG
[GNUPG:] KEY_CONSIDERED 3E80CA1A8B89F69CBA57D98A76A5EF9054449A5C 0
[GNUPG:] SIG_ID abc 2025-01-01 1735689600
[GNUPG:] GOODSIG 76A5EF9054449A5C Pierre Schmitz <pierre@archlinux.org>
[GNUPG:] VALIDSIG 1111111111111111111111111111111111111111 2025-01-01 1735689600 0 4 0 22 10 00 3E80CA1A8B89F69CBA57D98A76A5EF9054449A5C
"""


def container(**values: object) -> AzureSettings:
    return validate(AzureSettings, {"builder": "container", **values})


# --- finding the newest tarball ---------------------------------------------------------------


def test_sha256sums_are_read_by_name() -> None:
    a, b = "a" * 64, "B" * 64
    sums = bootstrap.parse_sha256sums(
        f"{a}  archlinux-x86_64.iso\n{b} *./archlinux-bootstrap-x86_64.tar.zst\nnoise\n"
    )
    assert sums == {"archlinux-x86_64.iso": a, "archlinux-bootstrap-x86_64.tar.zst": "b" * 64}


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (f"{'c' * 64} *archlinux-bootstrap-x86_64.tar.zst", {"archlinux-bootstrap-x86_64.tar.zst"}),
        (f"  {'c' * 64}\t\tname with spaces  ", {"name with spaces"}),
        (f"{'c' * 64} * star then space", {"* star then space"}),
        (f"{'c' * 64} *", {"*"}),
        (f"{'c' * 64}name", set()),  # no space after the hash
        (f"{'c' * 63} name", set()),
        (f"{'c' * 63}g name", set()),
        (f"{'c' * 64}   ", set()),
    ],
)
def test_sha256sums_line_forms(line: str, expected: set[str]) -> None:
    sums = bootstrap.parse_sha256sums(line + "\n")
    assert set(sums) == expected
    assert all(digest == "c" * 64 for digest in sums.values())


def test_sha256sums_parsing_is_linear_on_long_runs_of_spaces() -> None:
    # A pattern with `\s+` then `.*?` took 5 s on a 30,000-space line; the list may be 4 MiB.
    digest = "d" * 64
    spaces = " " * (bootstrap.LIST_LIMIT - 200)
    text = f"{digest} x{spaces}y\n{digest}{spaces}\n{digest}  real.tar.zst\n"
    with safety_net(60):
        sums = bootstrap.parse_sha256sums(text)
    assert sums == {f"x{spaces}y": digest, "real.tar.zst": digest}


def test_the_newest_dated_tarball_is_picked_zstd_before_gzip() -> None:
    names = [
        "archlinux-2025.01.01-x86_64.iso",
        "archlinux-bootstrap-x86_64.tar.zst",
        "archlinux-bootstrap-2024.12.01-x86_64.tar.zst",
        "archlinux-bootstrap-2025.01.01-x86_64.tar.gz",
        "archlinux-bootstrap-2025.01.01-x86_64.tar.zst",
        "archlinux-bootstrap-2025.01.01-x86_64.tar.zst.sig",
    ]
    assert bootstrap.pick_tarball(names) == "archlinux-bootstrap-2025.01.01-x86_64.tar.zst"
    assert bootstrap.pick_tarball(names[:2]) == "archlinux-bootstrap-x86_64.tar.zst"
    assert bootstrap.pick_tarball(["archlinux-bootstrap-2020.01.01-x86_64.tar.gz"]) == (
        "archlinux-bootstrap-2020.01.01-x86_64.tar.gz"
    )
    assert bootstrap.pick_tarball(["archlinux-x86_64.iso", "b2sums.txt"]) is None


def test_a_directory_listing_gives_its_file_names() -> None:
    page = """<html><a href="../">../</a>
    <a href="archlinux-bootstrap-2025.01.01-x86_64.tar.zst">x</a>
    <A HREF='archlinux-bootstrap-x86_64.tar.zst.sig'>y</A>
    <a href="/iso/latest/arch/">arch/</a> <a href="sha256sums.txt?C=M">sort</a>
    <a href="archlinux-bootstrap-2025.02.01-x86%5F64.tar.zst">quoted</a>"""
    names = bootstrap.parse_listing(page)
    assert "archlinux-bootstrap-2025.01.01-x86_64.tar.zst" in names
    assert "archlinux-bootstrap-x86_64.tar.zst.sig" in names and "arch" in names
    assert bootstrap.pick_tarball(names) == "archlinux-bootstrap-2025.02.01-x86_64.tar.zst"


def test_gpgv_status_is_good_only_for_a_valid_signature_by_a_known_key() -> None:
    assert bootstrap.signature_verdict(GOOD_STATUS) == (
        "3E80CA1A8B89F69CBA57D98A76A5EF9054449A5C",
        "",
    )
    bad = "[GNUPG:] NEWSIG\n[GNUPG:] BADSIG 76A5EF9054449A5C Pierre\n"
    assert bootstrap.signature_verdict(bad)[1].endswith("(BAD signature)")
    unknown = "[GNUPG:] ERRSIG 0123456789ABCDEF 22 10 00 1735689600 9 -\n[GNUPG:] NO_PUBKEY 0123456789ABCDEF\n"
    assert (
        "0123456789ABCDEF, which is not in the keyring" in bootstrap.signature_verdict(unknown)[1]
    )
    revoked = GOOD_STATUS.replace("GOODSIG", "REVKEYSIG")
    assert bootstrap.signature_verdict(revoked) == (None, "it was made by a revoked key")
    expired = GOOD_STATUS.replace("GOODSIG", "EXPKEYSIG")
    assert bootstrap.signature_verdict(expired)[0] is None
    assert bootstrap.signature_verdict("[GNUPG:] NODATA 1\n")[0] is None
    assert bootstrap.signature_verdict("")[0] is None


def test_the_top_directory_of_an_arch_tarball_is_the_root(tmp_path: Path) -> None:
    arch = tmp_path / "arch"
    (arch / "root.x86_64/usr").mkdir(parents=True)
    assert bootstrap.tree_root(arch) == arch / "root.x86_64"
    flat = tmp_path / "flat"
    (flat / "usr").mkdir(parents=True)
    (flat / "etc").mkdir()
    assert bootstrap.tree_root(flat) == flat
    only_usr = tmp_path / "only-usr"
    (only_usr / "usr").mkdir(parents=True)
    assert bootstrap.tree_root(only_usr) == only_usr


# --- what the environment shares, and where tools are -----------------------------------------


def link_tree(root: Path, links: dict[str, str]) -> Path:
    """A tree with the directories `usr/bin`, `etc` and `srv/data` and the links `links`."""
    for name in ("usr/bin", "etc", "srv/data"):
        (root / name).mkdir(parents=True)
    for name, target in links.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).symlink_to(target)
    return root


def test_links_are_followed_from_the_environments_root_and_must_stay_in_it(
    tmp_path: Path,
) -> None:
    root = link_tree(
        tmp_path / "root",
        {
            "bin": "usr/bin",  # relative, inside
            "var/run": "/run",  # absolute: the environment's /run (Debian has it)
            "etc/resolv.conf": "/run/systemd/resolve/stub-resolv.conf",  # dangles inside
            "etc/os-release": "../usr/lib/os-release",
            "srv/deep": "../../../../../../../../../etc",  # climbs out from srv/
            "srv/loop": "/srv/loop",
            "srv/via": "/srv/deep/shadow",  # through a link that climbs out
            "srv/data/up": "../..",  # the root itself
            "srv/data/top": "../../..",  # one more: out
            "etc/ping": "pong",
            "etc/pong": "ping",
        },
    )
    assert bootstrap.leads_out(root, "bin") is None
    assert bootstrap.leads_out(root, "var/run") is None
    assert bootstrap.leads_out(root, "etc/resolv.conf") is None
    assert bootstrap.leads_out(root, "srv/data/up") is None
    climbs, loop = "climbs above the environment's root", "is a loop"
    assert sorted(bootstrap.links_leading_out(root)) == [
        ("etc/ping", "pong", loop),
        ("etc/pong", "ping", loop),
        ("srv/data/top", "../../..", climbs),
        ("srv/deep", "../../../../../../../../../etc", climbs),
        ("srv/loop", "/srv/loop", loop),
        ("srv/via", "/srv/deep/shadow", climbs),
    ]
    # The case: usr (or etc) pointing at the host's.
    other = link_tree(tmp_path / "other", {})
    (other / "usr").rename(other / "usr-real")
    (other / "usr").symlink_to("/usr")
    assert bootstrap.links_leading_out(other) == [("usr", "/usr", loop)]


def test_the_host_writes_into_the_environment_only_inside_it(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = link_tree(
        tmp_path / "root",
        {
            "etc/pacman.d": str(outside),  # the host would follow it to `outside`
            "var/lib": "/srv/data",
            "etc/gone": "/nowhere",
        },
    )
    (root / str(outside).lstrip("/")).mkdir(parents=True)
    # Links are followed from the root, so the path lies in the tree whatever they say.
    assert in_tree(root, "etc/pacman.d/mirrorlist") == (
        root / str(outside).lstrip("/") / "mirrorlist"
    )
    assert in_tree(root, "var/lib/pacman/db.lck") == root / "srv/data/pacman/db.lck"
    assert (root / "srv/data/pacman").is_dir()  # made, in the tree
    assert in_tree(root, "etc/mtab") == root / "etc/mtab"  # last name not followed
    with pytest.raises(UserError, match=r"^/etc/gone in the build environment .* is not a dir"):
        in_tree(root, "etc/gone/file")
    assert list(outside.iterdir()) == []


def test_binds_are_real_existing_paths_each_once_parents_first(tmp_path: Path) -> None:
    work, repo = tmp_path / "work", tmp_path / "repo"
    (work / "sub").mkdir(parents=True)
    (work / "ro").mkdir()
    repo.mkdir()
    (tmp_path / "link").symlink_to(work)
    merged = buildenv.merge_binds(
        [
            Bind(work / "sub"),  # covered by work (same mode)
            Bind(tmp_path / "link"),  # is work
            Bind(work, read_only=True),  # read-write wins
            Bind(repo, read_only=True),
            Bind(repo / "missing"),
            Bind(work / "ro", read_only=True),  # read-only inside read-write: kept
            Bind(work / "sub", read_only=True),  # also read-write above: read-write wins
        ]
    )
    assert merged == (Bind(repo, True), Bind(work), Bind(work / "ro", True))


@pytest.mark.parametrize("path", ["/", "/proc", "/dev/shm"])
def test_a_bind_that_would_hide_the_environment_is_refused(path: str) -> None:
    with pytest.raises(UserError, match="cannot be shared with the build environment"):
        buildenv.merge_binds([Bind(Path(path))])


def test_a_pacman_conf_shares_its_local_repositories_cache_and_keyring() -> None:
    text = """[options]
CacheDir = /srv/cache/ /srv/cache2/
GPGDir = /srv/gnupg  # comment
Include = /srv/extra.conf
[local-test]
Server = file:///srv/repo
[core]
Server = file:///srv/mirror/$repo/os/$arch
Server = https://geo.mirror.pkgbuild.com/$repo/os/$arch
#Server = file:///commented
"""
    assert buildenv.pacman_conf_binds(text) == [
        Bind(Path("/srv/cache/")),
        Bind(Path("/srv/cache2/")),
        Bind(Path("/srv/gnupg")),
        Bind(Path("/srv/extra.conf"), True),
        Bind(Path("/srv/repo"), True),
        Bind(Path("/srv/mirror"), True),
    ]


def test_paths_resolve_as_inside_a_chroot(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")
    (root / "usr/bin/tool").write_text("")
    (root / "usr/bin/abs").symlink_to("/usr/bin/tool")  # absolute: inside root, not the host
    (root / "usr/bin/up").symlink_to("../../../../../etc/passwd")
    (root / "usr/bin/loop").symlink_to("loop")
    assert buildenv.resolve_in_root(root, "/bin/abs") == root / "usr/bin/tool"
    assert buildenv.resolve_in_root(root, "/bin/up") is None  # root/etc/passwd, not the host's
    assert buildenv.resolve_in_root(root, "/bin/loop") is None
    assert buildenv.resolve_in_root(root, "/bin/tool/x") is None


def fake_tree(root: Path, *tools: str) -> Path:
    for tool in tools:
        path = root / tool.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    (root / "bin").symlink_to("usr/bin")
    return root


def test_tools_are_found_on_the_environments_path_and_grubs_directory(tmp_path: Path) -> None:
    root = fake_tree(tmp_path, "/usr/bin/sfdisk", "/usr/lib/grub/i386-pc/grub-bios-setup")
    (root / "usr/bin/noexec").write_text("")
    assert buildenv.find_tool(root, "sfdisk") == "/usr/bin/sfdisk"
    assert buildenv.find_tool(root, "grub-bios-setup") == "/usr/lib/grub/i386-pc/grub-bios-setup"
    assert buildenv.find_tool(root, "noexec") is None
    assert buildenv.find_tool(root, "pacstrap") is None


def test_the_tools_required_follow_the_boot_mode() -> None:
    assert "grub-bios-setup" in buildenv.required_tools(AzureSettings())
    uefi = buildenv.required_tools(AzureSettings(generation=2))
    assert {"mkfs.fat", "mcopy", "mmd"} <= set(uefi) and "grub-bios-setup" not in uefi
    hybrid = buildenv.required_tools(AzureSettings(boot="hybrid"))
    assert {"grub-bios-setup", "mkfs.fat"} <= set(hybrid)
    assert set(buildenv.required_tools(AzureSettings())) <= buildenv.ROUTED_TOOLS


# --- the commands a runtime is given ------------------------------------------------------------


BINDS = (Bind(Path("/srv/work")), Bind(Path("/srv/repo"), True))


def test_chroot_commands_enter_a_private_namespace_through_the_helper() -> None:
    argv = buildenv.chroot_argv(
        Path("/w/env/root"), BINDS, "/srv/build/x", ["/usr/bin/sfdisk", "-l"]
    )
    assert argv == [
        "unshare",
        "--mount",
        "--pid",
        "--fork",
        "--kill-child",
        "--propagation",
        "private",
        "--",
        sys.executable,
        "-I",
        "-S",
        str(REPO / "archkernel/azure/buildenv/exec.py"),
        "--root",
        "/w/env/root",
        "--bind",
        "/srv/work",
        "--ro-bind",
        "/srv/repo",
        "--resolv-conf",
        "--path",
        buildenv.ENV_PATH,
        "--cwd",
        "/srv/build/x",
        "--",
        "/usr/bin/sfdisk",
        "-l",
    ]


@pytest.mark.parametrize("runtime", ["docker", "podman"])
def test_container_commands_share_the_same_paths_and_pass_variables_by_name(runtime: str) -> None:
    argv = buildenv.container_argv(
        runtime,
        "archkernel-buildenv:abc",
        BINDS,
        None,
        ["PATH", "LANG", "SECRET"],
        False,
        ["pacstrap", "-c"],
    )
    # The label names this run so that a later run can remove a killed run's container.
    label = argv.index("--label")
    name, _, run = argv[label + 1].partition("=")
    assert name == "archkernel.run" and run
    del argv[label : label + 2]
    assert argv == [
        runtime,
        "run",
        "--rm",
        "--privileged",
        "--network",
        "host",
        "--volume",
        "/dev:/dev",
        "--volume",
        "/srv/work:/srv/work",
        "--volume",
        "/srv/repo:/srv/repo:ro",
        "--env",
        f"PATH={buildenv.ENV_PATH}",
        "--env",
        "LANG",
        "--env",
        "SECRET",
        "archkernel-buildenv:abc",
        "pacstrap",
        "-c",
    ]
    with_input = buildenv.container_argv(
        runtime, "img", BINDS, "/srv/work", [], True, ["sfdisk", "x"]
    )
    assert "--label" in with_input
    assert [a for a in with_input[:9] if a != "--label" and "=" not in a] == [
        runtime,
        "run",
        "--rm",
        "--privileged",
        "--network",
        "host",
        "--interactive",
    ]
    workdir = with_input.index("--workdir")
    assert with_input[workdir + 1] == "/srv/work" and with_input[-3:] == ["img", "sfdisk", "x"]
    with pytest.raises(UserError, match="contains ':' or ','"):
        buildenv.container_argv(runtime, "img", [Bind(Path("/a:b"))], None, [], False, ["x"])


def fake_env(tmp_path: Path, runtime: buildenv.Runtime = "chroot") -> BuildEnv:
    root = fake_tree(tmp_path / "root", "/usr/bin/sfdisk", "/usr/bin/pacstrap")
    return BuildEnv(
        root=root,
        sha256="ab" * 32,
        name="archlinux-bootstrap-x86_64.tar.zst",
        runtime=runtime,
        image=None if runtime == "chroot" else "archkernel-buildenv:abab",
        binds=(Bind(tmp_path),),
    )


def command(argv: list[str], cwd: str | None = None, has_input: bool = False) -> Command:
    return Command(argv, minimal_env({"SOURCE_DATE_EPOCH": "0"}), cwd, has_input)


@pytest.mark.parametrize("runtime", ["chroot", "docker", "podman"])
def test_only_routed_tools_are_rewritten(tmp_path: Path, runtime: buildenv.Runtime) -> None:
    env = fake_env(tmp_path, runtime)
    host = command(["losetup", "--list"], cwd="/")
    assert env.wrap(host) is host
    wrapped = env.wrap(
        command(["sfdisk", "--json", str(tmp_path / "disk.img")], str(tmp_path), True)
    )
    assert wrapped.where == f"build environment {'ab' * 6}, {runtime}"
    assert wrapped.cwd is None and wrapped.env["PATH"] == minimal_env()["PATH"]
    assert wrapped.env["SOURCE_DATE_EPOCH"] == "0"
    inner = ["/usr/bin/sfdisk", "--json", str(tmp_path / "disk.img")]
    if runtime == "chroot":
        assert wrapped.argv == buildenv.chroot_argv(env.root, env.binds, str(tmp_path), inner)
    else:
        assert wrapped.argv == buildenv.container_argv(
            runtime, "archkernel-buildenv:abab", env.binds, str(tmp_path), wrapped.env, True, inner
        )
        assert "--env" in wrapped.argv and "SOURCE_DATE_EPOCH" in wrapped.argv
        assert not any("SOURCE_DATE_EPOCH=" in a for a in wrapped.argv)


def test_a_tool_missing_inside_is_a_clear_error(tmp_path: Path) -> None:
    env = fake_env(tmp_path)
    with pytest.raises(UserError) as info:
        env.wrap(command(["mkfs.ext4", "x"]))
    assert info.value.message == "command not found in the build environment: mkfs.ext4"
    assert "'e2fsprogs'" in (info.value.hint or "")
    with pytest.raises(UserError, match="not found in the build environment: /usr/lib/grub/"):
        env.wrap(command(["/usr/lib/grub/i386-pc/grub-bios-setup", "x"]))
    # A path in the tree as the host sees it is shared too (the tree is in the workdir).
    by_host_path = str(env.host_path("/usr/bin/sfdisk"))
    assert env.wrap(command([by_host_path, "-l"])).argv[-2:] == [by_host_path, "-l"]
    with pytest.raises(UserError, match="not shared with the build environment"):
        env.wrap(command(["sfdisk", "x"], cwd="/"))


def test_paths_map_between_host_and_environment(tmp_path: Path) -> None:
    env = fake_env(tmp_path)
    assert env.host_path("/etc/pacman.d/gnupg") == env.root / "etc/pacman.d/gnupg"
    assert env.inside_path(env.root / "usr/lib/grub") == "/usr/lib/grub"
    with pytest.raises(UserError):
        env.inside_path(tmp_path / "elsewhere")


class Recorder:
    """A wrapper that sends every command to `echo`, remembering what it was."""

    def __init__(self, tag: str) -> None:
        self.tag, self.seen = tag, []  # type: ignore[var-annotated]

    def wrap(self, cmd: Command) -> Command:
        self.seen.append(cmd)
        return Command(["echo", self.tag, *cmd.argv], cmd.env, None, cmd.has_input, where=self.tag)

    def which(self, tool: str) -> str | None:
        return f"/{self.tag}/{tool}" if tool != "absent" else None


@pytest.mark.integration
def test_run_hands_commands_to_the_innermost_wrapper_and_only_in_its_block() -> None:
    outer, inner = Recorder("outer"), Recorder("inner")
    with wrapping(outer):
        assert run(["printf", "a"], capture=True).stdout == "outer printf a\n"
        with wrapping(inner):
            assert run(["true"], capture=True, stdin="x", cwd="/tmp").stdout == "inner true\n"
            assert which("sfdisk") == "/inner/sfdisk"
            assert missing_tools(["sfdisk", "absent"]) == ["absent"]
        assert run(["true"], capture=True).stdout == "outer true\n"
    assert run(["printf", "a"], capture=True).stdout == "a"
    assert inner.seen[0].has_input and inner.seen[0].cwd == "/tmp"
    assert not outer.seen[0].has_input and outer.seen[0].env["LC_ALL"] == "C.UTF-8"


@pytest.mark.integration
def test_a_failing_wrapped_command_says_where_it_ran() -> None:
    class Failing(Recorder):
        def wrap(self, cmd: Command) -> Command:
            return Command(["false"], cmd.env, None, False, where="build environment x, chroot")

    with wrapping(Failing("f")), pytest.raises(UserError) as info:
        run(["sfdisk", "--json", "disk.img"])
    assert info.value.message == (
        "sfdisk --json disk.img (in build environment x, chroot) failed with exit code 1"
    )


def test_with_the_host_builder_nothing_is_prepared_or_wrapped(tmp_path: Path) -> None:
    az = AzureSettings()
    assert buildenv.prepare(az, tmp_path) is None
    with buildenv.activate(az, tmp_path) as env:
        assert env is None
        assert which("sfdisk") == shutil.which("sfdisk", path=minimal_env()["PATH"])
    assert not (tmp_path / "buildenv").exists()


def test_activating_an_environment_that_was_never_prepared_says_run_step_1(tmp_path: Path) -> None:
    with pytest.raises(UserError) as info, buildenv.activate(container(), tmp_path):
        pass
    assert "no build environment has been prepared" in info.value.message
    assert "--from 1" in (info.value.hint or "")


def test_the_image_name_follows_what_was_set_up() -> None:
    state = buildenv.State("cd" * 32, "x.tar.zst", "/x.tar.zst", None)
    first = state.image_tag()
    assert first.startswith("archkernel-buildenv:cdcdcdcdcdcdcdcd-")
    state.installed = ["grub"]
    assert state.image_tag() != first


# --- integration: helpers ----------------------------------------------------------------------


def mounts_in(directory: Path) -> list[str]:
    return mounts.mounts_under(mounts.MOUNTINFO.read_text(), os.path.realpath(directory))


def given(tarball: Path, **values: object) -> AzureSettings:
    return container(
        bootstrap_tarball=str(tarball), bootstrap_sha256=sha256_file(tarball), **values
    )


@pytest.fixture(scope="module")
def debian_tarball() -> Path:
    return support.environment_tarball()


@pytest.fixture(scope="module")
def prepared(
    debian_tarball: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[AzureSettings, Path, BuildEnv]]:
    """The Debian environment, prepared once: (settings, workdir, environment)."""
    workdir = tmp_path_factory.mktemp("buildenv") / "work"
    az = given(debian_tarball)
    env = buildenv.prepare(az, workdir)
    assert env is not None
    yield az, workdir, env
    remove_path(workdir)  # a few hundred MiB; refuses if a test left a mount inside


@pytest.fixture()
def active(prepared: tuple[AzureSettings, Path, BuildEnv]) -> Iterator[tuple[Path, BuildEnv]]:
    az, workdir, _ = prepared
    with buildenv.activate(az, workdir) as env:
        assert env is not None
        yield workdir, env
    assert mounts_in(workdir) == []
    assert env_processes(env.root) == []


# --- integration: commands run inside -----------------------------------------------------------


@pytest.mark.integration
@pytest.mark.root
def test_the_environment_is_unpacked_under_the_workdir_with_its_keyring(
    prepared: tuple[AzureSettings, Path, BuildEnv], debian_tarball: Path
) -> None:
    _, workdir, env = prepared
    sha = sha256_file(debian_tarball)
    assert env.root == workdir.resolve() / "buildenv" / sha[:16] / "root"
    assert (env.root / support.MARKER).read_text() == support.MARKER_TEXT
    assert not (env.root / "root.x86_64").exists()  # the top directory was stripped
    assert (env.root / "etc/pacman.d/gnupg/pubring.gpg").is_file()  # pacman-key ran inside
    state = json.loads(buildenv.state_file(workdir).read_text())
    assert state["sha256"] == sha and state["keyring"] is True and state["signer"] is None
    described = env.describe()
    assert described.startswith(f"{debian_tarball.name} (sha256 {sha[:16]}) in {env.root}")
    assert "run through chroot" in described and "shared at the same path: /tmp" in described


@pytest.mark.integration
@pytest.mark.root
def test_routed_tools_run_inside_and_write_the_workdir_at_the_same_path(
    active: tuple[Path, BuildEnv],
) -> None:
    workdir, env = active
    # A directory only the environment has: the host has no /srv/only-inside.
    only_inside = env.root / "srv/only-inside"
    only_inside.mkdir(parents=True, exist_ok=True)
    write_text(only_inside / "marker", "made inside\n")
    assert not Path("/srv/only-inside").exists()
    image = workdir / "fs.img"
    image.unlink(missing_ok=True)
    run(["mkfs.ext4", "-q", "-d", "/srv/only-inside", image, "8M"])
    # Unrouted tools still run on the host, and cannot see the environment's files.
    assert run(["cat", "/srv/only-inside/marker"], check=False).returncode != 0
    assert run(["cat", "/srv/only-inside/marker"], capture=True, check=False).stdout == ""
    assert env.run(["cat", "/srv/only-inside/marker"], capture=True).stdout == "made inside\n"
    # The image mkfs wrote at the workdir's path is on the host, at that path.
    dumped = run(["debugfs", "-R", "cat /marker", image], capture=True).stdout
    assert dumped == "made inside\n"


@pytest.mark.integration
@pytest.mark.root
def test_the_binaries_seen_inside_are_the_environments(active: tuple[Path, BuildEnv]) -> None:
    _, env = active
    inside = env.run(["stat", "-L", "-c", "%d:%i", "/usr/sbin/sfdisk"], capture=True).stdout.strip()
    tree = os.stat(env.root / "usr/sbin/sfdisk")
    host = os.stat("/usr/sbin/sfdisk")
    assert inside == f"{tree.st_dev}:{tree.st_ino}" != f"{host.st_dev}:{host.st_ino}"
    assert which("sfdisk") == "/usr/sbin/sfdisk" and which("losetup") == shutil.which(
        "losetup", path=minimal_env()["PATH"]
    )
    assert env.run(["cat", "/etc/archkernel-test-env"], capture=True).stdout == support.MARKER_TEXT
    assert run(["cat", "/etc/archkernel-test-env"], check=False).returncode == 1


@pytest.mark.integration
@pytest.mark.root
def test_sfdisk_reads_its_script_on_stdin_inside(active: tuple[Path, BuildEnv]) -> None:
    workdir, _ = active
    disk = workdir / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(16 << 20)
    run(["sfdisk", "--quiet", disk], stdin="label: gpt\nsize=4MiB\n")
    partitions = json.loads(run(["sfdisk", "--json", disk], capture=True).stdout)
    assert partitions["partitiontable"]["partitions"][0]["size"] == 8192


@pytest.mark.integration
@pytest.mark.root
def test_mounts_the_host_makes_while_active_are_seen_by_later_commands(
    active: tuple[Path, BuildEnv],
) -> None:
    """What grub-bios-setup needs: a loop device and a mount made on the host after the
    environment was entered, in the host's temporary directory."""
    workdir, env = active
    image = workdir / "late.img"
    image.unlink(missing_ok=True)
    source = workdir / "late-tree"
    source.mkdir(exist_ok=True)
    write_text(source / "hello", "from the loop mount\n")
    uuid = "0b0b6c7e-8d3a-4d36-a1bf-2f1c1c2d3e4f"
    run(["mkfs.ext4", "-q", "-U", uuid, "-d", source, image, "8M"])
    with (
        mounts.loop_device(image, read_only=True) as device,
        temporary_directory(prefix="archkernel-late-") as tmp,
        mounts.mounted(device, tmp / "mnt", fstype="ext4", options=("ro",)) as mnt,
    ):
        assert (
            run(["blkid", "-o", "value", "-s", "UUID", device], capture=True).stdout.strip() == uuid
        )
        assert env.run(["cat", f"{mnt}/hello"], capture=True).stdout == "from the loop mount\n"
    assert mounts_in(Path(tmp)) == []


@pytest.mark.integration
@pytest.mark.root
def test_arch_chroot_works_inside_and_leaves_nothing(active: tuple[Path, BuildEnv]) -> None:
    workdir, env = active
    out = run(["arch-chroot", env.root, "cat", "/etc/archkernel-test-env"], capture=True).stdout
    assert out == support.MARKER_TEXT
    assert mounts_in(workdir) == []


@pytest.mark.integration
@pytest.mark.root
def test_pacstrap_runs_inside_from_a_repository_outside_the_workdir(
    prepared: tuple[AzureSettings, Path, BuildEnv],
) -> None:
    """The Azure build's own use: pacstrap from a local repository that pacman.conf names
    (outside the work directory and the temporary directory: shared through the conf)."""
    az, workdir, _ = prepared
    outside = Path(tempfile.mkdtemp(prefix="archkernel-repo-", dir="/var/tmp"))
    try:
        repo, cache = outside / "repo", outside / "pkgcache"
        repo.mkdir()
        cache.mkdir()
        staging = offline.Staging(outside / "stage")
        staging.write("usr/share/hello/hello.txt", "hello from the repository\n")
        package = offline.write_package(
            offline.Package("hello", "1.0-1", "a test package"), staging, repo, outside
        )
        run(["repo-add", "--quiet", repo / f"{offline.REPO_NAME}.db.tar.gz", package])
        conf = write_text(outside / "pacman.conf", offline.pacman_conf(repo, cache))
        with_repo = dataclasses.replace(az, pacman_conf=conf)
        target = workdir / "pacstrapped"
        target.mkdir()
        with buildenv.activate(with_repo, workdir) as env:
            assert env is not None and Bind(repo, True) in env.binds
            run(["pacstrap", "-C", conf, "-c", "-G", "-M", target, "hello"])
            listing = run(["pacman", "--root", target, "-Q"], capture=True).stdout
        assert listing == "hello 1.0-1\n"
        text = (target / "usr/share/hello/hello.txt").read_text()
        assert text == "hello from the repository\n"
        assert (cache / package.name).is_file()  # pacman's cache is the host's directory
        assert mounts_in(workdir) == []
    finally:
        shutil.rmtree(outside)


@pytest.mark.integration
@pytest.mark.root
def test_the_environments_files_have_the_same_path_inside_and_outside(
    active: tuple[Path, BuildEnv],
) -> None:
    """So GRUB's modules of the environment can be named by one path on both sides."""
    _, env = active
    boot_img = env.host_path("/usr/lib/grub/i386-pc/boot.img")
    assert boot_img.is_file()
    inside = env.run(["stat", "-c", "%i", boot_img], capture=True).stdout.strip()
    assert inside == str(boot_img.stat().st_ino)
    assert env.which("grub-bios-setup") == "/usr/lib/grub/i386-pc/grub-bios-setup"


@pytest.mark.integration
@pytest.mark.root
def test_failures_inside_are_explained(active: tuple[Path, BuildEnv]) -> None:
    _, env = active
    with pytest.raises(UserError) as info:
        run(["sgdisk", "--version"])  # routed; Debian's gdisk is not in the environment
    assert info.value.message == "command not found in the build environment: sgdisk"
    with pytest.raises(UserError) as info:
        run(["e2fsck", "-n", "/nonexistent.img"])
    assert info.value.message.startswith(
        f"e2fsck -n /nonexistent.img (in build environment {env.sha256[:12]}, chroot) failed"
    )
    assert "No such file or directory" in info.value.message


@pytest.mark.integration
@pytest.mark.root
def test_a_timeout_ends_the_command_and_everything_it_started(
    active: tuple[Path, BuildEnv],
) -> None:
    _, env = active
    start = time.monotonic()
    with pytest.raises(UserError, match="did not finish within 1s"):
        env.run(["sh", "-c", "sleep 300 & sleep 300"], timeout=1)
    assert time.monotonic() - start < 60  # not sleep's 300 s
    wait_for(lambda: not env_processes(env.root), "the build environment's processes ended")


@pytest.mark.integration
@pytest.mark.root
def test_a_background_daemon_ends_with_its_command(active: tuple[Path, BuildEnv]) -> None:
    _, env = active
    env.run(["sh", "-c", "sleep 300 & echo started"])
    assert env_processes(env.root) == []


# --- integration: Ctrl-C and crashes ------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.root
def test_keyboard_interrupt_inside_the_block_leaves_no_mount_and_no_wrapper(
    prepared: tuple[AzureSettings, Path, BuildEnv],
) -> None:
    az, workdir, env = prepared
    with pytest.raises(KeyboardInterrupt), buildenv.activate(az, workdir):
        run(["sfdisk", "--version"])
        with mounts.mounted(
            "tmpfs", env.root / "run", fstype="tmpfs"
        ):  # as arch-chroot on the host
            raise KeyboardInterrupt
    assert mounts_in(workdir) == []
    assert which("sfdisk") == shutil.which("sfdisk", path=minimal_env()["PATH"])


@pytest.mark.integration
@pytest.mark.root
def test_mounts_left_by_a_killed_run_are_undone_at_the_next_activate(
    prepared: tuple[AzureSettings, Path, BuildEnv],
) -> None:
    az, workdir, env = prepared
    # What a process killed with SIGKILL while it had the environment set up would leave.
    run(["mount", "--bind", "/dev", env.root / "dev"])
    run(["mount", "-t", "tmpfs", "tmpfs", env.root / "run"])
    assert len(mounts_in(workdir)) == 2
    with buildenv.activate(az, workdir) as active_env:
        assert active_env is not None
        assert mounts_in(workdir) == []
    assert Path("/dev/null").exists()


@pytest.mark.integration
@pytest.mark.root
def test_mounts_left_behind_are_undone_by_prepare_which_reuses_the_tree(
    prepared: tuple[AzureSettings, Path, BuildEnv], caplog: pytest.LogCaptureFixture
) -> None:
    az, workdir, env = prepared
    run(["mount", "--bind", "/dev", env.root / "dev"])
    inode = os.stat(env.root).st_ino
    with caplog.at_level(logging.INFO, logger="archkernel"):
        again = buildenv.prepare(az, workdir)
    assert again == env and os.stat(env.root).st_ino == inode
    assert mounts_in(workdir) == []
    assert "reusing the build environment" in caplog.text
    assert "Unpacking" not in caplog.text and "keyring" not in caplog.text.lower()


CTRL_C_SCRIPT = """
import sys
from pathlib import Path
from archkernel.azure import buildenv
from archkernel.settings import AzureSettings
az = AzureSettings(builder="container", bootstrap_tarball=sys.argv[2], bootstrap_sha256=sys.argv[3])
with buildenv.activate(az, Path(sys.argv[1])) as env:
    print("entered", flush=True)
    env.run(["sh", "-c", "sleep 300 & exec sleep 300"])
"""


@pytest.mark.integration
@pytest.mark.root
def test_ctrl_c_during_a_command_leaves_no_process_and_no_mount(
    prepared: tuple[AzureSettings, Path, BuildEnv],
) -> None:
    az, workdir, env = prepared
    assert az.bootstrap_tarball is not None and az.bootstrap_sha256 is not None
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CTRL_C_SCRIPT,
            str(workdir),
            az.bootstrap_tarball,
            az.bootstrap_sha256,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"entered\n"
        deadline = time.monotonic() + 20
        while len(env_processes(env.root)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(env_processes(env.root)) == 2  # the command and its daemon
        os.killpg(child.pid, signal.SIGINT)  # what Ctrl-C does
        _, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    assert child.returncode != 0 and b"KeyboardInterrupt" in err
    wait_for(lambda: not env_processes(env.root), "the build environment's processes ended")
    assert mounts_in(workdir) == []


# --- integration: obtaining and caching ---------------------------------------------------------


@pytest.fixture()
def tarballs(tmp_path: Path) -> tuple[Path, Path]:
    """Two small, different root tarballs (nothing to run in them: tools=() below)."""
    first = support.make_tarball(tmp_path / "first.tar.zst", {"etc/release": "first\n"})
    second = support.make_tarball(
        tmp_path / "second.tar.zst", {"etc/release": "second\n"}, top=None
    )
    return first, second


@pytest.mark.integration
def test_the_same_tarball_is_reused_and_a_new_one_replaces_it(
    tmp_path: Path, tarballs: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    first, second = tarballs
    workdir = tmp_path / "work"
    env1 = buildenv.prepare(given(first), workdir, tools=())
    assert env1 is not None and (env1.root / "etc/release").read_text() == "first\n"
    stamp = os.stat(env1.root / "etc/release")
    first.unlink()  # a reuse needs only the SHA-256 the settings give
    with caplog.at_level(logging.INFO, logger="archkernel"):
        again = buildenv.prepare(
            container(bootstrap_tarball=str(first), bootstrap_sha256=env1.sha256), workdir, tools=()
        )
    assert again == env1 and os.stat(env1.root / "etc/release").st_ino == stamp.st_ino
    assert "reusing the build environment first.tar.zst" in caplog.text
    # A different tarball replaces it; the old one goes, through no mount of the crash it had.
    run(["mount", "--bind", "/dev", env1.root / "dev"])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="archkernel"):
        env2 = buildenv.prepare(given(second), workdir, tools=())
    assert env2 is not None and (env2.root / "etc/release").read_text() == "second\n"
    assert "the bootstrap tarball changed: first.tar.zst" in caplog.text
    assert not env1.root.parent.exists() and Path("/dev/null").exists()
    assert sorted(p.name for p in (workdir / "buildenv").iterdir()) == sorted(
        [".lock", "buildenv.json", env2.sha256[:16]]
    )
    assert json.loads(buildenv.state_file(workdir).read_text())["sha256"] == env2.sha256
    assert mounts_in(workdir) == []


@pytest.mark.integration
def test_activate_refuses_an_environment_of_another_tarball(
    tmp_path: Path, tarballs: tuple[Path, Path]
) -> None:
    first, second = tarballs
    buildenv.prepare(given(first), tmp_path / "work", tools=())
    with pytest.raises(UserError) as info, buildenv.activate(given(second), tmp_path / "work"):
        pass
    assert "not the tarball azure.bootstrap_sha256 names" in info.value.message
    assert "--from 1" in (info.value.hint or "")


@pytest.mark.integration
def test_a_wrong_sha256_stops_before_anything_is_unpacked(
    tmp_path: Path, tarballs: tuple[Path, Path]
) -> None:
    first, _ = tarballs
    az = container(bootstrap_tarball=str(first), bootstrap_sha256="0" * 64)
    with pytest.raises(UserError) as info:
        buildenv.prepare(az, tmp_path / "work", tools=())
    assert f"has SHA-256 {sha256_file(first)}, not the expected {'0' * 64}" in info.value.message
    assert not buildenv.state_file(tmp_path / "work").exists()
    missing = container(bootstrap_tarball=str(tmp_path / "nope.tar"), bootstrap_sha256="0" * 64)
    with pytest.raises(UserError, match="does not exist"):
        buildenv.prepare(missing, tmp_path / "work", tools=())


@pytest.mark.integration
def test_a_tarball_by_url_is_downloaded_and_checked(
    tmp_path: Path, tarballs: tuple[Path, Path]
) -> None:
    first, _ = tarballs
    az = container(bootstrap_tarball=first.as_uri(), bootstrap_sha256=sha256_file(first))
    env = buildenv.prepare(az, tmp_path / "work", tools=())
    assert env is not None and (env.root / "etc/release").read_text() == "first\n"
    assert not (tmp_path / "work/buildenv/download").exists()  # the download is not kept
    bad = container(bootstrap_tarball=first.as_uri(), bootstrap_sha256="1" * 64)
    with pytest.raises(UserError, match="not the expected 1111"):
        buildenv.prepare(bad, tmp_path / "work2", tools=())


@pytest.mark.integration
def test_entries_escaping_the_directory_are_refused(tmp_path: Path) -> None:
    import tarfile

    evil = tmp_path / "evil.tar"
    outside = tmp_path / "outside"
    with tarfile.open(evil, "w") as tar:
        for name in ("root.x86_64/", "root.x86_64/usr/"):
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        link = tarfile.TarInfo("root.x86_64/usr/link")
        link.type, link.linkname = tarfile.SYMTYPE, str(outside)
        tar.addfile(link)
        for name in ("root.x86_64/../../escaped", "root.x86_64/usr/link/through"):
            data = tarfile.TarInfo(name)
            data.size = 0
            tar.addfile(data)
    outside.mkdir()
    with pytest.raises(UserError, match="bsdtar"):
        buildenv.prepare(given(evil), tmp_path / "work", tools=())
    assert list(outside.iterdir()) == [] and not (tmp_path / "escaped").exists()
    assert not buildenv.state_file(tmp_path / "work").exists()


STAND_IN_PACMAN = """#!/bin/sh
# pacman as step 1 calls it to add tools: records its arguments, "installs" mtools.
echo "$@" > /var/log/pacman-args
for package in "$@"; do
    if [ "$package" = mtools ]; then
        printf '#!/bin/sh\\n' > /usr/bin/mcopy
        chmod 755 /usr/bin/mcopy
    fi
done
"""


def arch_like_tarball(
    tmp_path: Path, links: dict[str, str] | None = None, extra: tuple[str, ...] = ()
) -> Path:
    """A tiny Arch-like root (busybox for a shell) whose pacman is a stand-in; each of
    `links` (path -> target) replaces what is at its path; `extra` are more files."""
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("needs busybox-static (.ci/setup installs it)")
    tree = tmp_path / "arch" / bootstrap.TOP_DIRECTORY
    for name in ("usr/bin", "etc/pacman.d", "var/lib/pacman", "var/log", "proc", "sys", "dev"):
        (tree / name).mkdir(parents=True)
    for name in ("run", "tmp"):
        (tree / name).mkdir()
    shutil.copy(busybox, tree / "usr/bin/busybox")
    for applet in ("sh", "chmod", "cat"):
        (tree / "usr/bin" / applet).symlink_to("busybox")
    (tree / "bin").symlink_to("usr/bin")
    write_text(tree / "usr/bin/pacman", STAND_IN_PACMAN, 0o755)
    write_text(tree / "etc/arch-release", "")
    write_text(tree / "etc/pacman.d/mirrorlist", "#Server = https://geo.mirror.pkgbuild.com/\n")
    write_text(tree / "var/lib/pacman/db.lck", "")  # an interrupted pacman's
    for name in extra:
        write_text(tree / name, "")
    for name, target in (links or {}).items():
        remove_path(tree / name)
        (tree / name).symlink_to(target)
    tarball = tmp_path / "arch.tar.zst"
    run(["bsdtar", "--numeric-owner", "--zstd", "-cf", tarball, "-C", tree.parent, tree.name])
    return tarball


@pytest.mark.integration
def test_an_arch_environment_gets_the_mirror_and_the_tools_it_lacks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tarball = arch_like_tarball(tmp_path)
    mirror = "https://mirror.example.invalid/archlinux/$repo/os/$arch"
    az = given(tarball, mirror=mirror)
    workdir = tmp_path / "work"
    with caplog.at_level(logging.INFO, logger="archkernel"):
        env = buildenv.prepare(az, workdir, tools=["pacman", "mcopy"])
    assert env is not None
    root = env.root
    assert (root / "etc/pacman.d/mirrorlist").read_text().endswith(f"\nServer = {mirror}\n")
    assert (root / "var/log/pacman-args").read_text() == (
        "--sync --refresh --needed --noconfirm mtools\n"
    )
    assert not (root / "var/lib/pacman/db.lck").exists()
    assert "left by an interrupted pacman" in caplog.text
    state = json.loads(buildenv.state_file(workdir).read_text())
    assert state["installed"] == ["mtools"] and state["mirror"] == mirror
    assert state["keyring"] is False  # no pacman-key in it: nothing to initialise
    assert (root / "etc/mtab").readlink() == Path("../proc/self/mounts")
    # Set up once: the next build installs nothing.
    (root / "var/log/pacman-args").unlink()
    assert buildenv.prepare(az, workdir, tools=["pacman", "mcopy"]) == env
    assert not (root / "var/log/pacman-args").exists()


@pytest.mark.integration
@pytest.mark.parametrize(
    ("name", "target", "problem"),
    [
        ("etc", "{outside}", "holds no root file system (its etc is a symbolic link)"),
        ("usr", "/usr", "holds no root file system (its usr is a symbolic link)"),
        (
            "etc/pacman.d",
            "../../../../../../../../../../../../..{outside}",
            "has symbolic links that lead out of the environment: etc/pacman.d -> ",
        ),
        (
            "var/lib/pacman",
            "/var/lib/pacman",
            "has symbolic links that lead out of the environment: var/lib/pacman -> "
            "/var/lib/pacman is a loop",
        ),
    ],
    ids=["etc-to-a-host-directory", "usr-to-the-hosts", "climbing-out", "loop"],
)
def test_a_tarball_with_links_out_of_the_tree_is_refused(
    tmp_path: Path, name: str, target: str, problem: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    tarball = arch_like_tarball(tmp_path, {name: target.format(outside=outside)})
    with pytest.raises(UserError) as info:
        buildenv.prepare(given(tarball), tmp_path / "work", tools=["pacman", "mcopy"])
    assert info.value.message.startswith(f"arch.tar.zst {problem}"), info.value.message
    assert list(outside.iterdir()) == []
    assert not buildenv.state_file(tmp_path / "work").exists()
    assert not list((tmp_path / "work/buildenv").glob("*/root"))


@pytest.mark.integration
def test_no_step_writes_through_a_link_of_the_environment(tmp_path: Path) -> None:
    # Absolute links are the environment's own (Debian's var/run -> /run): accepted, and
    # everything the host writes into the tree lands where the environment sees it.
    outside = tmp_path / "outside"
    outside.mkdir()
    keep = write_text(outside / "db.lck", "not pacman's: must stay\n")
    inside = str(outside).lstrip("/")
    tarball = arch_like_tarball(
        tmp_path,
        {"etc/pacman.d": str(outside), "var/lib/pacman": str(outside)},
        extra=(f"{inside}/mirrorlist",),
    )
    mirror = "https://mirror.example.invalid/archlinux/$repo/os/$arch"
    env = buildenv.prepare(given(tarball, mirror=mirror), tmp_path / "work", tools=["mcopy"])
    assert env is not None
    assert sorted(p.name for p in outside.iterdir()) == ["db.lck"]
    assert keep.read_text() == "not pacman's: must stay\n"
    assert (env.root / inside / "mirrorlist").read_text().endswith(f"\nServer = {mirror}\n")
    assert (env.root / "var/log/pacman-args").read_text() == (
        "--sync --refresh --needed --noconfirm mtools\n"
    )


@pytest.mark.integration
def test_an_environment_without_the_required_tools_is_refused(
    tmp_path: Path, tarballs: tuple[Path, Path]
) -> None:
    first, _ = tarballs
    with pytest.raises(UserError) as info:
        buildenv.prepare(given(first), tmp_path / "work")
    assert info.value.message.startswith(
        "the build environment first.tar.zst lacks pacstrap, pacman"
    )


# --- integration: signatures, with a key the tests make ----------------------------------------


@pytest.fixture(scope="module")
def release_key(tmp_path_factory: pytest.TempPathFactory) -> Iterator[support.SigningKey]:
    key = support.signing_key(tmp_path_factory.mktemp("keys") / "release")
    yield key
    support.stop_agent(key.home)


@pytest.fixture(scope="module")
def other_key(tmp_path_factory: pytest.TempPathFactory) -> Iterator[support.SigningKey]:
    key = support.signing_key(tmp_path_factory.mktemp("keys") / "other")
    yield key
    support.stop_agent(key.home)


DATED = "archlinux-bootstrap-2025.01.01-x86_64.tar.zst"
UNDATED = "archlinux-bootstrap-x86_64.tar.zst"


def make_release(
    mirror: Path, key: support.SigningKey, content: str = "release\n", *, sums: bool = True
) -> Path:
    """A release directory as Arch's iso/latest: dated and undated tarball, signatures,
    sha256sums.txt."""
    mirror.mkdir(parents=True, exist_ok=True)
    tarball = support.make_tarball(mirror / DATED, {"etc/release": content})
    key.sign(tarball)
    shutil.copyfile(tarball, mirror / UNDATED)
    shutil.copyfile(mirror / (DATED + ".sig"), mirror / (UNDATED + ".sig"))
    write_text(mirror / "archlinux-2025.01.01-x86_64.iso", "not an iso\n")
    if sums:
        sha = sha256_file(tarball)
        lines = [f"{sha256_file(mirror / n)}  {n}" for n in ("archlinux-2025.01.01-x86_64.iso",)]
        lines += [f"{sha}  {DATED}", f"{sha}  {UNDATED}"]
        write_text(mirror / "sha256sums.txt", "\n".join(lines) + "\n")
    return tarball


def from_mirror(mirror: str, key: support.SigningKey) -> AzureSettings:
    return container(bootstrap_mirror=mirror, bootstrap_keyring=key.keyring)


@pytest.mark.integration
def test_a_release_with_a_good_signature_is_used_and_then_reused(
    tmp_path: Path, release_key: support.SigningKey
) -> None:
    mirror = tmp_path / "mirror"
    tarball = make_release(mirror, release_key)
    az = from_mirror(mirror.as_uri(), release_key)
    env = buildenv.prepare(az, tmp_path / "work", tools=())
    assert env is not None and env.name == DATED and (env.root / "etc/release").is_file()
    state = json.loads(buildenv.state_file(tmp_path / "work").read_text())
    assert state["signer"] == release_key.fingerprint and state["sha256"] == sha256_file(tarball)
    assert state["origin"] == f"{mirror.as_uri()}/{DATED}"
    # The next build learns from sha256sums.txt that it has this release: no download.
    (mirror / DATED).unlink()
    assert buildenv.prepare(az, tmp_path / "work", tools=()) == env


@pytest.mark.integration
def test_a_tampered_tarball_stops_the_build(
    tmp_path: Path, release_key: support.SigningKey
) -> None:
    mirror = tmp_path / "mirror"
    tarball = make_release(mirror, release_key)
    with open(tarball, "ab") as f:
        f.write(b"\0")
    sha = sha256_file(tarball)  # sha256sums.txt agrees: only the signature can tell
    write_text(mirror / "sha256sums.txt", f"{sha}  {DATED}\n")
    with pytest.raises(UserError) as info:
        buildenv.prepare(from_mirror(mirror.as_uri(), release_key), tmp_path / "work", tools=())
    assert info.value.message == (
        f"the signature of {DATED} is not good: the signature does not match the file "
        "(BAD signature)"
    )
    assert not buildenv.state_file(tmp_path / "work").exists()
    # Nothing unverified is kept.
    assert [p.name for p in (tmp_path / "work/buildenv").iterdir()] == [".lock"]


@pytest.mark.integration
def test_a_signature_by_a_key_not_in_the_keyring_stops_the_build(
    tmp_path: Path, release_key: support.SigningKey, other_key: support.SigningKey
) -> None:
    mirror = tmp_path / "mirror"
    make_release(mirror, other_key)
    with pytest.raises(UserError) as info:
        buildenv.prepare(from_mirror(mirror.as_uri(), release_key), tmp_path / "work", tools=())
    assert "which is not in the keyring" in info.value.message
    assert str(release_key.keyring) in (info.value.hint or "")


@pytest.mark.integration
def test_a_missing_signature_stops_the_build(
    tmp_path: Path, release_key: support.SigningKey
) -> None:
    mirror = tmp_path / "mirror"
    make_release(mirror, release_key)
    (mirror / (DATED + ".sig")).unlink()
    with pytest.raises(UserError) as info:
        buildenv.prepare(from_mirror(mirror.as_uri(), release_key), tmp_path / "work", tools=())
    assert info.value.message.startswith(f"no signature for {DATED}")


@pytest.mark.integration
def test_a_missing_keyring_is_named(tmp_path: Path, release_key: support.SigningKey) -> None:
    mirror = tmp_path / "mirror"
    make_release(mirror, release_key)
    az = container(bootstrap_mirror=mirror.as_uri(), bootstrap_keyring=tmp_path / "none.gpg")
    with pytest.raises(UserError) as info:
        buildenv.prepare(az, tmp_path / "work", tools=())
    assert "none.gpg does not exist" in info.value.message
    assert "archlinux-keyring" in (info.value.hint or "")


@pytest.mark.integration
def test_a_tarball_that_disagrees_with_sha256sums_stops_the_build(
    tmp_path: Path, release_key: support.SigningKey
) -> None:
    mirror = tmp_path / "mirror"
    make_release(mirror, release_key)
    write_text(mirror / "sha256sums.txt", f"{'e' * 64}  {DATED}\n")
    with pytest.raises(UserError, match=r"but sha256sums\.txt says eeee"):
        buildenv.prepare(from_mirror(mirror.as_uri(), release_key), tmp_path / "work", tools=())


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.mark.integration
def test_over_http_a_release_without_sha256sums_is_found_in_the_listing(
    tmp_path: Path, release_key: support.SigningKey, caplog: pytest.LogCaptureFixture
) -> None:
    mirror = tmp_path / "mirror"
    make_release(mirror, release_key, sums=False)

    def handler(*args: object) -> _Quiet:
        return _Quiet(*args, directory=str(mirror))  # type: ignore[arg-type]

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        env = buildenv.prepare(from_mirror(url, release_key), tmp_path / "work", tools=())
        assert env is not None and env.name == DATED
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    # The mirror is gone: the environment verified earlier is used, with a warning.
    with caplog.at_level(logging.WARNING, logger="archkernel"):
        again = buildenv.prepare(from_mirror(url, release_key), tmp_path / "work", tools=())
    assert again == env
    assert "using the build environment from " + DATED in caplog.text


# --- docker and podman: the commands they are given -------------------------------------------------


STAND_IN = """#!/bin/sh
# A stand-in for docker/podman: records its arguments, one per line, a blank line after.
record=RECORD
for a in "$@"; do printf '%s\\n' "$a"; done >> "$record"
echo >> "$record"
case "$1 $2" in
  "image inspect") test -e "$record.imported" ;;
  "image rm") exit 0 ;;
  "import "*) touch "$record.imported" ;;
  "version "*) echo "stand-in" ;;
  "run "*) cat >/dev/null; echo ran ;;
esac
"""


def calls(record: Path) -> list[list[str]]:
    return [block.splitlines() for block in record.read_text().split("\n\n") if block.strip()]


@pytest.mark.integration
@pytest.mark.parametrize("runtime", ["docker", "podman"])
def test_container_runtimes_import_the_tree_once_and_run_commands_with_the_same_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, runtime: str
) -> None:
    bin_dir, record = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    # run() gives children PATH but not our other variables: the record's path is baked in.
    write_text(bin_dir / runtime, STAND_IN.replace("RECORD", str(record)), 0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    tarball = support.make_tarball(tmp_path / "t.tar.zst", {"usr/bin/sfdisk": "#!/bin/sh\n"})
    workdir = tmp_path / "work"
    az = given(tarball, container_runtime=runtime)
    env = buildenv.prepare(az, workdir, tools=())
    assert env is not None and env.image is not None
    assert env.image.startswith(f"archkernel-buildenv:{env.sha256[:16]}-")
    inspect, version, imported = calls(record)
    assert inspect == ["image", "inspect", "--format", "{{.Id}}", env.image]
    assert version == ["version"]
    message = f"archkernel build environment from t.tar.zst (sha256 {env.sha256})"
    archive = workdir.resolve() / "buildenv/image.tar"
    assert imported == ["import", "--message", message, str(archive), env.image]
    assert not archive.exists()
    (env.root / "usr/bin/sfdisk").chmod(0o755)
    record.unlink()
    with buildenv.activate(az, workdir) as active_env:
        assert active_env == env
        out = run(["sfdisk", "--json", workdir / "disk.img"], capture=True, stdin="x", cwd=workdir)
        assert out.stdout == "ran\n"
        run(["losetup", "--version"], capture=True)  # on the host: not recorded
    inspect, ran = calls(record)
    assert inspect == ["image", "inspect", "--format", "{{.Id}}", env.image]
    shared = f"{tmp_path.resolve()}:{tmp_path.resolve()}"  # tmp_path is in /tmp: one volume
    assert ran == [
        "run",
        "--rm",
        "--privileged",
        "--network",
        "host",
        "--label",
        f"archkernel.run={run_identity()}",  # a killed run's container is found by it
        "--interactive",
        "--volume",
        "/dev:/dev",
        "--volume",
        ran[11],
        "--workdir",
        str(workdir.resolve()),
        "--env",
        f"PATH={buildenv.ENV_PATH}",
        *[x for name in sorted(set(minimal_env()) - {"PATH"}) for x in ("--env", name)],
        env.image,
        "/usr/bin/sfdisk",
        "--json",
        str(workdir / "disk.img"),
    ]
    assert ran[11] in (shared, "/tmp:/tmp")


# docker ps --format '{{.ID}} {{.Label "archkernel.run"}}' of a stand-in daemon.
PS_STAND_IN = """#!/bin/sh
for a in "$@"; do printf '%s\\n' "$a"; done >> RECORD
echo >> RECORD
case "$1" in
  ps) printf '%s\\n' "aaa111 LIVE" "bbb222 4194305:1" "ccc333 " ;;
esac
"""


@pytest.mark.integration
@pytest.mark.parametrize("runtime", ["docker", "podman"])
def test_the_next_run_removes_the_containers_of_a_killed_run_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, runtime: str
) -> None:
    # docker's client dies with a killed build; its container does not.
    bin_dir, record = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    script = PS_STAND_IN.replace("RECORD", str(record)).replace("LIVE", run_identity())
    write_text(bin_dir / runtime, script, 0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    settings = Settings(
        workdir=tmp_path / "work",
        azure=AzureSettings(builder="container", container_runtime=runtime),
    )
    workspace.undo_killed_runs(settings)
    listing, removal = calls(record)
    assert listing[:5] == ["ps", "--all", "--no-trunc", "--filter", "label=archkernel.run"]
    # bbb222's run is gone (no pid is that high); aaa111's is this one;
    # ccc333 has no run and is not ours to remove.
    assert removal == ["rm", "--force", "bbb222"]


@pytest.mark.integration
def test_docker_without_a_daemon_is_explained(tmp_path: Path, tarballs: tuple[Path, Path]) -> None:
    if which("docker") is None:
        skip_for_this_machine("no docker client")
    if run(["docker", "version"], capture=True, check=False).returncode == 0:
        skip_for_this_machine("a docker engine answers")
    first, _ = tarballs
    with pytest.raises(UserError) as info:
        buildenv.prepare(given(first, container_runtime="docker"), tmp_path / "work", tools=())
    assert info.value.message.startswith("docker does not answer: ")
    assert "container_runtime = 'chroot'" in (info.value.hint or "")
