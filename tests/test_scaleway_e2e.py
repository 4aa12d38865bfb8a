"""scaleway_kexec end to end, against a fake Scaleway C1 (tests/support/c1.py).

Read this as the workflow's documentation. On a C1 the unit runs `archkernel run
scaleway_kexec`; it asks the boot server (here Debian's in.tftpd on 127.0.0.1) for the
bootscript, follows it to the provider's initrd, appends the Arch kernel's network and NBD
modules (here real modules of Debian's amd64 kernel: the C1's mvneta is not in it) and a
new /init, and kexecs. kexec cannot run on the test machine, so a stand-in `kexec` and
`systemctl` record what they were asked; test_scaleway_vm.py runs the real thing in QEMU.

Every run is a separate process, as systemd or a user starts it. The first run is shared
by the tests that only look at its results; tests that change the machine get their own.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from archkernel.formats.cpio import padding_for
from archkernel.formats.kmod import module_name
from tests.support.c1 import (
    BOOTSCRIPT_NAME,
    INITRD_NAME,
    OLD_SHUTDOWN,
    PACKAGE,
    PROVIDER_INIT,
    FakeC1,
    Template,
    add_package,
    archkernel_command,
    bootscript_text,
    mkimage,
    modprobe_show_depends,
    provider_initrd,
    script_image,
    serving,
    tool,
)
from tests.support.tftp import Short, TftpyServer, Truncate, free_udp_port

pytestmark = [pytest.mark.integration, pytest.mark.root]

EXTRA = "is_in_kexec=yes NO_SIGNAL_STATE=1 DONT_FETCH_KERNEL_MODULES=1 NO_NTPDATE=1 archkernel"
# The fake C1's command line (tests.support.c1.CMDLINE) as the workflow kexecs it: its
# ip=:::::eth0: left off (drop_cmdline), NO_NTPDATE=0 replaced, the extra tokens appended.
KEXEC_CMDLINE = (
    "console=ttyS0,115200 root=/dev/nbd0 nbd.max_parts=8 nbd.nbds_max=3 boot=local nousb "
    f"noplymouth INITRD_DEBUG=0 {EXTRA}"
)
# What the new /init loads: the settings' modules, their dependencies, the optional
# module that exists (mvneta_bm does not), nothing else from the tree (virtio_blk).
LOADED = [
    "virtio_ring",
    "virtio",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "nbd",
    "dummy",
]


def expected_kexec(c1: FakeC1) -> list[list[str]]:
    return [
        [
            "kexec",
            "-l",
            str(c1.kernel),
            f"--initrd={c1.output}",
            f"--command-line={KEXEC_CMDLINE}",
        ],
        ["systemctl", "kexec"],
    ]


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


def ran(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The steps that ran (not 'up to date'), by number and verb."""
    return re.findall(r"^scaleway_kexec:(\d\d_\w+): done in", result.stderr, re.MULTILINE)


# --- the output initrd, read with independent tools ------------------------------------------


def split_output(output: bytes, payload: bytes) -> bytes:
    """The archive appended to the provider's payload, which must come first, byte for byte."""
    assert output[: len(payload)] == payload, "the provider's payload is not kept byte for byte"
    pad = padding_for(len(payload))
    assert output[len(payload) : len(payload) + len(pad)] == pad
    return output[len(payload) + len(pad) :]


def bsdtar_names(archive: bytes) -> list[str]:
    return tool(["bsdtar", "-tf", "-"], archive).decode().splitlines()


def cpio_names(archive: bytes) -> list[str]:
    return tool(["cpio", "-it", "--quiet"], gzip.decompress(archive)).decode().splitlines()


def extract(archive: bytes, dest: Path) -> None:
    """GNU cpio unpacks over `dest` as the kernel does: later entries replace earlier ones."""
    dest.mkdir(exist_ok=True)
    tool(
        ["cpio", "-idmu", "--quiet", "--no-absolute-filenames"],
        gzip.decompress(archive),
        cwd=dest,
    )


def snapshot(tree: Path) -> dict[str, tuple[object, ...]]:
    """Every path under `tree`: type, mode, owner, contents or target, device, link count."""
    found: dict[str, tuple[object, ...]] = {}
    for path in sorted(tree.rglob("*")):
        st = path.lstat()
        if stat.S_ISREG(st.st_mode):
            what: object = hashlib.sha256(path.read_bytes()).hexdigest()
        elif stat.S_ISLNK(st.st_mode):
            what = os.readlink(path)
        else:
            what = os.major(st.st_rdev), os.minor(st.st_rdev)
        nlink = st.st_nlink if stat.S_ISREG(st.st_mode) else None
        key = path.relative_to(tree).as_posix()
        found[key] = (stat.filemode(st.st_mode), st.st_uid, st.st_gid, what, nlink)
    return found


def hard_link_sets(tree: Path) -> set[frozenset[str]]:
    groups: dict[int, set[str]] = {}
    for path in tree.rglob("*"):
        st = path.lstat()
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            groups.setdefault(st.st_ino, set()).add(path.relative_to(tree).as_posix())
    return {frozenset(g) for g in groups.values()}


def insmod_order(init: str) -> list[str]:
    return re.findall(r"^insmod /archkernel/modules/(\S+)\.ko\b", init, re.MULTILINE)


# --- the first boot, shared by the tests that read its results ------------------------------------


class FirstBoot:
    """A fake C1 after one `archkernel run scaleway_kexec`, unpacked for inspection."""

    def __init__(self, c1: FakeC1, result: subprocess.CompletedProcess[str], work: Path) -> None:
        self.c1 = c1
        self.result = result
        self.calls = c1.calls()
        self.output = c1.output.read_bytes()
        self.payload = c1.template.payload.read_bytes()
        self.added = split_output(self.output, self.payload)
        self.original = work / "original"
        self.patched = work / "patched"
        extract(self.payload, self.original)
        extract(self.payload, self.patched)
        extract(self.added, self.patched)


@pytest.fixture(scope="module")
def first_boot(c1_base: Template, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FirstBoot]:
    base = tmp_path_factory.mktemp("first-boot")
    c1 = FakeC1.create(base / "c1", c1_base)
    with serving(c1):
        result = c1.archkernel()
    yield FirstBoot(c1, result, base)


def test_first_boot_exits_0_and_kexecs_the_arch_kernel(first_boot: FirstBoot) -> None:
    ok(first_boot.result)
    assert first_boot.calls == expected_kexec(first_boot.c1)
    assert ran(first_boot.result) == [
        "01_check",
        "02_fetch_bootscript",
        "03_fetch_initrd",
        "04_unpack",
        "05_modules",
        "06_pack",
        "07_shutdown",
        "08_kexec",
    ]


def test_first_boot_log_tells_the_story(first_boot: FirstBoot) -> None:
    log = first_boot.result.stderr
    c1 = first_boot.c1
    package = f"{PACKAGE} {c1.version.split('-')[0]}-1"
    for line in [
        # found through pacman's database: the fake root has no pkgbase, as linux-armv7
        f"kernel {c1.kernel} ({c1.version}; pacman: {package} owns /boot/zImage)",
        "TFTP server 127.0.0.1 (from /proc/net/pnp)",
        f"bootscript {BOOTSCRIPT_NAME} from 127.0.0.1:{c1.port}: changed",
        f"initrd {INITRD_NAME}: fetched",
        f"warning: optional module mvneta_bm is not in {c1.version}; going on without it",
        f"modules for {c1.version}: {' '.join(LOADED)}",
        # nbd.nbds_max=3 of the command line; nbd has no max_parts (it has max_part)
        "warning: module nbd has no parameter max_parts=8; not passed",
        "module nbd: insmod gets nbds_max=3",
        f"initrd {c1.output}: rebuilt ({len(first_boot.output)} bytes)",
        f"shutdown script {c1.shutdown}: its `kexec)` branch runs kexec -e (line 18); "
        "left as it is",
        f"kexec: kexec -l {c1.kernel} --initrd={c1.output} '--command-line={KEXEC_CMDLINE}'",
        "kexec loaded; systemctl kexec",
    ]:
        assert line in log


def test_output_starts_with_the_provider_payload_byte_for_byte(first_boot: FirstBoot) -> None:
    # split_output asserted it; the provider's archive reads the same with both tools.
    part = first_boot.output[: len(first_boot.payload)]
    assert bsdtar_names(part) == bsdtar_names(first_boot.payload)
    assert cpio_names(part) == cpio_names(first_boot.payload)
    assert "init" in cpio_names(part) and "dev/console" in cpio_names(part)


def test_appended_archive_holds_init_init_scw_and_the_modules(first_boot: FirstBoot) -> None:
    expected = {"init", "init.scw", "archkernel", "archkernel/modules"}
    expected |= {f"archkernel/modules/{name}.ko" for name in LOADED}
    assert set(bsdtar_names(first_boot.added)) == expected
    assert set(cpio_names(first_boot.added)) == expected
    assert first_boot.added.startswith(b"\x1f\x8b")  # compressed on its own (gzip)


def test_every_original_entry_is_unchanged(first_boot: FirstBoot) -> None:
    before = snapshot(first_boot.original)
    after = snapshot(first_boot.patched)
    assert len(before) > 30
    for path, value in before.items():
        if path != "init":
            assert after[path] == value, path
    assert hard_link_sets(first_boot.patched) >= hard_link_sets(first_boot.original)
    assert hard_link_sets(first_boot.original) == {frozenset({"etc/issue", "etc/issue.net"})}
    kinds = {str(value[0])[0] for value in before.values()}
    assert kinds == {"-", "d", "l", "c", "b"}  # files, dirs, symlinks, char and block devices


def test_init_scw_is_the_original_init(first_boot: FirstBoot) -> None:
    init_scw = first_boot.patched / "init.scw"
    assert init_scw.read_text() == PROVIDER_INIT
    assert (first_boot.original / "init").read_bytes() == init_scw.read_bytes()
    assert stat.S_IMODE(init_scw.stat().st_mode) == 0o755


def test_modules_are_the_decompressed_originals(first_boot: FirstBoot) -> None:
    template = first_boot.c1.template
    modules = first_boot.patched / "archkernel/modules"
    compressed = {module_name(new): (new, old) for new, old in template.compressed.items()}
    suffixes = set()
    for name in LOADED:
        new, old = compressed[name]
        suffixes.add(new.rsplit(".", 1)[-1])
        original = (template.kernel_tree / "lib/modules" / template.version / old).read_bytes()
        assert (modules / f"{name}.ko").read_bytes() == original, name
    assert suffixes == {"xz", "zst", "ko"}  # every kind was decompressed


def test_new_init_loads_in_modprobe_order(first_boot: FirstBoot, tmp_path: Path) -> None:
    c1 = first_boot.c1
    empty = tmp_path / "modprobe.d"
    empty.mkdir()
    expected: list[str] = []
    for name in ["virtio_net", "virtio_pci", "nbd", "dummy"]:  # required, then optional
        for path in modprobe_show_depends(c1.root, c1.version, empty, name):
            if module_name(path) not in expected:
                expected.append(module_name(path))
    init = (first_boot.patched / "init").read_text()
    assert insmod_order(init) == expected == LOADED
    assert init.rstrip().splitlines()[-1] == ". /init.scw"
    assert stat.S_IMODE((first_boot.patched / "init").stat().st_mode) == 0o755


def test_current_shutdown_script_with_its_kexec_branch_is_left_alone(
    first_boot: FirstBoot,
) -> None:
    text = first_boot.c1.shutdown.read_text()
    assert text == (first_boot.patched / "shutdown").read_text()  # the initrd's own copy
    assert "    kexec)\n        kexec -e\n" in text and text.endswith("\n/bin/sh\n")


def test_old_shutdown_script_now_ends_with_kexec(c1_base: Template, tmp_path: Path) -> None:
    c1 = FakeC1.create(tmp_path / "c1", c1_base, shutdown=OLD_SHUTDOWN)
    with serving(c1):
        result = ok(c1.archkernel())
    lines = c1.shutdown.read_text().splitlines()
    assert lines[-1] == "kexec -e"
    assert lines[:-1] == OLD_SHUTDOWN.splitlines()[:-1]
    assert OLD_SHUTDOWN.splitlines()[-1] == "/bin/sh"
    assert os.access(c1.shutdown, os.X_OK)
    assert (
        f"shutdown script {c1.shutdown}: its last command '/bin/sh' (line 7) replaced with "
        "`kexec -e`"
    ) in result.stderr
    assert c1.calls() == expected_kexec(c1)


def test_the_root_looks_like_arch_linux_arm(first_boot: FirstBoot) -> None:
    root, version = first_boot.c1.root, first_boot.c1.version
    assert not (root / "usr/lib/modules" / version / "pkgbase").exists()
    (entry,) = [
        e for e in (root / "var/lib/pacman/local").iterdir() if e.name.startswith(PACKAGE + "-6")
    ]
    files = (entry / "files").read_text().splitlines()
    assert files[0] == "%FILES%"
    assert "boot/zImage" in files and f"usr/lib/modules/{version}/" in files


def test_the_initrd_starts_with_a_dot_entry_and_the_providers_files(first_boot: FirstBoot) -> None:
    names = cpio_names(first_boot.payload)
    assert names[0] == "."
    assert {"init", "functions", "boot-local", "shutdown"} <= set(names)
    init = (first_boot.original / "init").read_text()
    assert "\n. /functions\n" in init and "\n        . ./boot-local\n" in init
    assert "\ncp -rf / /initramfs 2>/dev/null\n" in init


def test_new_init_passes_the_command_lines_module_parameters(first_boot: FirstBoot) -> None:
    init = (first_boot.patched / "init").read_text()
    assert (
        "insmod /archkernel/modules/nbd.ko nbds_max=3 || { echo 'archkernel: loading nbd with "
        "nbds_max=3 failed; again without'; insmod /archkernel/modules/nbd.ko || "
        "echo 'archkernel: loading nbd failed'; }"
    ) in init.splitlines()
    assert "max_parts" not in init  # nbd declares no such parameter


def test_plain_doit_gives_the_same_result(first_boot: FirstBoot, fake_c1: FakeC1) -> None:
    result = ok(fake_c1.doit())
    assert fake_c1.calls() == expected_kexec(fake_c1)
    assert "scaleway_kexec:08_kexec: done" in result.stderr
    # Same inputs, another machine and workdir: the same bytes (the pack is reproducible).
    assert fake_c1.output.read_bytes() == first_boot.output


# --- later boots ----------------------------------------------------------------------------------


def test_second_boot_rebuilds_nothing_and_kexecs_again(fake_c1: FakeC1) -> None:
    ok(fake_c1.archkernel())
    cache = fake_c1.workdir / ".settings-cache.json"  # the first boot's validated settings
    written = [cache, fake_c1.output, fake_c1.workdir / ".doit.json", fake_c1.workdir / "scaleway"]
    written += sorted((fake_c1.workdir / "scaleway").iterdir())
    before = {path: path.stat() for path in written}
    fake_c1.calls(clear=True)
    second = ok(fake_c1.archkernel())
    assert ran(second) == ["01_check", "02_fetch_bootscript", "07_shutdown", "08_kexec"]
    for step in ("03_fetch_initrd", "04_unpack", "05_modules", "06_pack"):
        assert f"scaleway_kexec:{step}: up to date" in second.stderr
    assert f"bootscript {BOOTSCRIPT_NAME} from 127.0.0.1:{fake_c1.port}: unchanged" in second.stderr
    assert "its `kexec)` branch runs kexec -e (line 18); left as it is" in second.stderr
    # Nothing is rewritten, not even doit's state: no writes, no fsyncs on an NBD root.
    for path, old in before.items():
        new = path.stat()
        assert (new.st_ino, new.st_mtime_ns) == (old.st_ino, old.st_mtime_ns), path
    assert sorted((fake_c1.workdir / "scaleway").iterdir()) == sorted(written[4:])
    assert fake_c1.calls() == expected_kexec(fake_c1)


CACHED_BOOT = """\
import sys
from tasks.cli import main
code = main(sys.argv[1:])
heavy = ("pydantic", "pydantic_core", "libarchive")
print(sorted(name for name in sys.modules if name.split(".")[0] in heavy))
sys.exit(code)
"""


def test_later_boots_do_not_validate_unchanged_settings_again(fake_c1: FakeC1) -> None:
    ok(fake_c1.archkernel())
    fake_c1.calls(clear=True)
    args = ["run", "scaleway_kexec", "--settings", str(fake_c1.settings)]

    def boot(argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv,
            cwd=fake_c1.base,
            env=fake_c1.env(**env),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    later = ok(boot([sys.executable, "-c", CACHED_BOOT, "-v", *args]))
    # Validating means building pydantic's validators: the boot path no longer pays for it;
    # nor does it load libarchive, which only the steps that rebuild the initrd need.
    assert later.stdout.strip() == "[]"
    assert "settings: unchanged since validated" in later.stderr
    assert fake_c1.calls() == expected_kexec(fake_c1)
    # A changed setting is validated (and refused) before anything runs.
    fake_c1.calls(clear=True)
    bad = boot(
        [*archkernel_command(), *args], ARCHKERNEL_SCALEWAY__EXTRA_CMDLINE="archkernel; reboot"
    )
    assert bad.returncode == 1
    assert "scaleway.extra_cmdline: 'archkernel; reboot' may hold only" in bad.stderr
    assert fake_c1.calls() == []


def test_forced_repack_gives_identical_bytes(fake_c1: FakeC1) -> None:
    ok(fake_c1.archkernel())
    first = fake_c1.output.read_bytes()
    before = fake_c1.output.stat()
    again = ok(fake_c1.archkernel("--from", "4"))
    assert ran(again)[2:5] == ["04_unpack", "05_modules", "06_pack"]
    assert f"initrd {fake_c1.output}: reused" in again.stderr
    assert fake_c1.output.read_bytes() == first
    assert fake_c1.output.stat().st_mtime_ns == before.st_mtime_ns


def test_new_initrd_version_on_the_server_rebuilds(fake_c1: FakeC1) -> None:
    ok(fake_c1.archkernel())
    fake_c1.calls(clear=True)
    newer = "initrd/uInitrd-Linux-armv7l-v3.y"
    uinitrd, payload = provider_initrd(fake_c1.base, extra={"etc/provider-release": b"v3.y\n"})
    fake_c1.put(newer, uinitrd)
    fake_c1.put(BOOTSCRIPT_NAME, script_image(bootscript_text(newer), fake_c1.base))

    result = ok(fake_c1.archkernel())
    assert ran(result) == [
        "01_check",
        "02_fetch_bootscript",
        "03_fetch_initrd",
        "04_unpack",
        "06_pack",
        "07_shutdown",
        "08_kexec",
    ]
    assert "scaleway_kexec:05_modules: up to date" in result.stderr
    assert f"initrd {newer}: fetched" in result.stderr
    output = fake_c1.output.read_bytes()
    added = split_output(output, payload)
    assert "etc/provider-release" in cpio_names(output[: len(payload)])
    assert "archkernel/modules/nbd.ko" in bsdtar_names(added)
    assert fake_c1.calls() == expected_kexec(fake_c1)


def test_new_kernel_version_in_the_tree_rebuilds(fake_c1: FakeC1, tmp_path: Path) -> None:
    ok(fake_c1.archkernel())
    old_output = fake_c1.output.read_bytes()
    fake_c1.calls(clear=True)
    # What a kernel upgrade does: a new module directory replaces the old, a new zImage,
    # and pacman's database names the new package.
    new_version = "6.9.1-1-ARCH"
    fake_c1.moddir.rename(fake_c1.moddir.with_name(new_version))
    with fake_c1.kernel.open("ab") as kernel:
        kernel.write(b"\0" * 16)
    local = fake_c1.root / "var/lib/pacman/local"
    for entry in local.glob(f"{PACKAGE}-6*"):
        shutil.rmtree(entry)
    add_package(
        fake_c1.root,
        PACKAGE,
        "6.9.1-1",
        ["boot/zImage", f"usr/lib/modules/{new_version}/kernel/x.ko"],
    )

    result = ok(fake_c1.archkernel())
    assert ran(result) == [
        "01_check",
        "02_fetch_bootscript",
        "05_modules",
        "06_pack",
        "07_shutdown",
        "08_kexec",
    ]
    assert (
        f"kernel {fake_c1.kernel} ({new_version}; pacman: {PACKAGE} 6.9.1-1 owns /boot/zImage)"
        in result.stderr
    )
    assert f"initrd {fake_c1.output}: rebuilt" in result.stderr
    added = split_output(fake_c1.output.read_bytes(), fake_c1.template.payload.read_bytes())
    assert added != split_output(old_output, fake_c1.template.payload.read_bytes())
    extract(added, tmp_path / "added")
    init = (tmp_path / "added/init").read_text()
    assert new_version in init
    assert insmod_order(init) == LOADED
    assert fake_c1.calls() == expected_kexec(fake_c1)


def test_already_running_the_arch_kernel_does_nothing(
    fake_c1: FakeC1, tftpy_server: Callable[..., TftpyServer]
) -> None:
    server = tftpy_server({BOOTSCRIPT_NAME: (fake_c1.tftp / BOOTSCRIPT_NAME).read_bytes()})
    fake_c1.write_settings(tftp_port=server.port)
    (fake_c1.root / "proc/cmdline").write_text(f"{KEXEC_CMDLINE}\n")
    result = ok(fake_c1.archkernel())
    assert "already running the Arch kernel ('archkernel' is on the command line)" in result.stderr
    assert server.requests == []  # nothing fetched
    assert fake_c1.calls() == []  # no kexec, no systemctl
    assert not fake_c1.output.exists()
    assert fake_c1.shutdown.read_text().splitlines()[-1] == "/bin/sh"


# --- bad input: refuse, say why in one line, change nothing, never kexec ----------------------


def flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1 :]


def initrd_with_names(c1: FakeC1, names: list[str], cwd: Path) -> bytes:
    """A uInitrd whose cpio (GNU cpio, names as given, read relative to `cwd`) is gzip'd."""
    archive = tool(["cpio", "-o", "-H", "newc", "--quiet"], "\n".join(names).encode(), cwd=cwd)
    return mkimage("ramdisk", gzip.compress(archive, mtime=0), "initrd", c1.base)


def evil_dotdot(c1: FakeC1) -> None:
    stage = c1.base / "evil"
    (stage / "x/y").mkdir(parents=True)
    (stage / "etc").mkdir()
    (stage / "etc/passwd").write_text("root::0:0::/root:/bin/sh\n")
    (stage / "x/y/init").write_text(PROVIDER_INIT)
    c1.put(INITRD_NAME, initrd_with_names(c1, ["init", "../../etc/passwd"], stage / "x/y"))


def evil_absolute(c1: FakeC1) -> None:
    stage = c1.base / "evil"
    stage.mkdir()
    (stage / "init").write_text(PROVIDER_INIT)
    (stage / "hostname").write_text("pwned\n")
    c1.put(INITRD_NAME, initrd_with_names(c1, ["init", str(stage / "hostname")], stage))


def not_cpio(c1: FakeC1) -> None:
    c1.put(INITRD_NAME, mkimage("ramdisk", b"this is not an archive\n" * 40, "initrd", c1.base))


def gzip_not_cpio(c1: FakeC1) -> None:
    data = gzip.compress(b"#!/bin/sh\necho not a cpio\n" * 40, mtime=0)
    c1.put(INITRD_NAME, mkimage("ramdisk", data, "initrd", c1.base))


def bootscript(c1: FakeC1) -> bytes:
    return (c1.tftp / BOOTSCRIPT_NAME).read_bytes()


def uinitrd(c1: FakeC1) -> bytes:
    return (c1.tftp / INITRD_NAME).read_bytes()


def second_kernel(c1: FakeC1) -> None:
    """Two kernel packages both claiming /boot/zImage (installed with --overwrite), and an
    image whose version cannot be read (an lz4 zImage, say): nothing to choose by."""
    other = "6.3.0-rc1-1-ARCH"
    shutil.copytree(c1.moddir, c1.moddir.with_name(other), symlinks=True)
    add_package(
        c1.root, f"{PACKAGE}-rc", "6.3.0rc1-1", ["boot/zImage", f"usr/lib/modules/{other}/"]
    )
    c1.kernel.write_bytes(b"\x00\x01" * 4096)


def kill_switch(c1: FakeC1) -> None:
    c1.stand_in(
        "scw-metadata",
        stdout="COMMERCIAL_TYPE=C1\nTAGS=2\nTAGS_0=web\nTAGS_1=archkernel_disabled\n",
    )


BAD_INPUT: dict[str, tuple[Callable[[FakeC1], object], str, str]] = {
    # case: (what to break, the step that refuses, its one-line reason)
    "kill switch set": (
        kill_switch,
        "01_check",
        r"kill switch set: the server has the tag 'archkernel_disabled'; doing nothing",
    ),
    "bootscript not found": (
        lambda c1: (c1.tftp / BOOTSCRIPT_NAME).unlink(),
        "02_fetch_bootscript",
        r"uboot\.bootscript not found on TFTP server 127\.0\.0\.1:\d+ \(TFTP error 1: ",
    ),
    "bootscript with a bad magic": (
        lambda c1: c1.put(BOOTSCRIPT_NAME, gzip.compress(bootscript_text().encode(), mtime=0)),
        "03_fetch_initrd",
        r"bootscript uboot\.bootscript is not a U-Boot legacy image \(magic 0x1f8b0800",
    ),
    "bootscript with a bad header CRC": (
        lambda c1: c1.put(BOOTSCRIPT_NAME, flip(bootscript(c1), 8)),
        "03_fetch_initrd",
        r"bootscript uboot\.bootscript has a bad U-Boot header CRC",
    ),
    "bootscript with a bad data CRC": (
        lambda c1: c1.put(BOOTSCRIPT_NAME, flip(bootscript(c1), 100)),
        "03_fetch_initrd",
        r"bootscript uboot\.bootscript has a bad payload CRC",
    ),
    "bootscript naming no initrd": (
        lambda c1: c1.put(
            BOOTSCRIPT_NAME,
            script_image(
                "tftp 0x200000 kernel/zImage\ntftp 0x1f00000 dtb/c1.dtb\nbootz 0x200000 - 0x1f00000\n",
                c1.base,
            ),
        ),
        "03_fetch_initrd",
        r"bootscript uboot\.bootscript names no initrd to fetch \(it loads: kernel/zImage, dtb/c1\.dtb\)",
    ),
    "initrd not found": (
        lambda c1: (c1.tftp / INITRD_NAME).unlink(),
        "03_fetch_initrd",
        r"initrd/uInitrd-Linux-armv7l-v3\.x not found on TFTP server 127\.0\.0\.1:\d+",
    ),
    "initrd file cut short on the server": (
        lambda c1: c1.put(INITRD_NAME, uinitrd(c1)[:-1000]),
        "04_unpack",
        r"initrd initrd/uInitrd-Linux-armv7l-v3\.x is truncated: its header announces \d+ "
        r"payload bytes but only \d+ follow \(1000 bytes missing\)",
    ),
    "initrd with a bad CRC": (
        lambda c1: c1.put(INITRD_NAME, flip(uinitrd(c1), 64 + 5000)),
        "04_unpack",
        r"initrd initrd/uInitrd-Linux-armv7l-v3\.x has a bad payload CRC",
    ),
    "payload that is not compressed": (
        not_cpio,
        "04_unpack",
        r"payload of initrd initrd/uInitrd-Linux-armv7l-v3\.x is not a compressed cpio archive "
        r"\(starts with 74 68 69 73",
    ),
    "payload that is gzip but no cpio": (
        gzip_not_cpio,
        "04_unpack",
        r"payload of initrd initrd/uInitrd-Linux-armv7l-v3\.x is corrupt or truncated "
        r"\(gzip data at byte 0: it does not hold newc cpio archives\)",
    ),
    "cpio entry ../../etc/passwd": (
        evil_dotdot,
        "04_unpack",
        r"entry '\.\./\.\./etc/passwd' in initrd initrd/uInitrd-Linux-armv7l-v3\.x has a '\.\.' component",
    ),
    "cpio entry with an absolute path": (
        evil_absolute,
        "04_unpack",
        r"entry '/\S+/evil/hostname' in initrd initrd/uInitrd-Linux-armv7l-v3\.x is an absolute path",
    ),
    "two kernels and nothing to choose between them": (
        second_kernel,
        "01_check",
        r"several kernels are installed \(6\.1\.\S+ \(linux-armv7 6\.1\.\S+\), "
        r"6\.3\.0-rc1-1-ARCH \(linux-armv7-rc 6\.3\.0rc1-1\)\) and none is known to be "
        r"/boot/zImage",
    ),
    "NIC without its virtio transport": (
        lambda c1: c1.write_settings(modules=["virtio_net", "nbd"]),
        "05_modules",
        r"kernel 6\.\S+: virtio_net needs virtio_pci or virtio_mmio \(CONFIG_VIRTIO_PCI=m, "
        r"CONFIG_VIRTIO_MMIO=m\), which modules\.dep does not name",
    ),
    "missing required module": (
        lambda c1: c1.write_settings(modules=["mvneta", "nbd"]),
        "05_modules",
        r"module 'mvneta' is not in 6\.\S+'s modules\.dep",
    ),
}

PREVIOUS = b"the initrd a previous boot prepared\n"


def refused(c1: FakeC1, step: str, reason: str, result: subprocess.CompletedProcess[str]) -> None:
    """Non-zero exit, one line naming the step and the reason, then the hint; nothing done."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "crashed" not in result.stderr
    lines = result.stderr.splitlines()
    failed = [i for i, line in enumerate(lines) if line.startswith("error: step ")]
    assert len(failed) == 1, result.stderr
    line = lines[failed[0]]
    assert line.startswith(f"error: step scaleway_kexec:{step} failed: "), result.stderr
    assert re.search(reason, line), line
    assert lines[failed[0] + 1].startswith("  hint: ")  # the reason is one line
    assert c1.output.read_bytes() == PREVIOUS  # output_initrd untouched
    assert [call for call in c1.calls() if call[0] in ("kexec", "systemctl")] == []


@pytest.fixture
def prepared(fake_c1: FakeC1) -> FakeC1:
    """A C1 with an output_initrd left by an earlier boot, which a failure must not touch."""
    fake_c1.output.write_bytes(PREVIOUS)
    return fake_c1


@pytest.mark.parametrize(("damage", "step", "reason"), BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_is_refused(
    prepared: FakeC1, damage: Callable[[FakeC1], object], step: str, reason: str
) -> None:
    damage(prepared)
    refused(prepared, step, reason, prepared.archkernel())


def test_server_down_fails_within_the_configured_timeout(prepared: FakeC1) -> None:
    port = free_udp_port()  # nothing listens there
    prepared.write_settings(tftp_port=port, tftp_timeout=1.5, tftp_retries=1)
    start = time.monotonic()
    result = prepared.archkernel()
    elapsed = time.monotonic() - start
    refused(
        prepared,
        "02_fetch_bootscript",
        rf"no answer from 127\.0\.0\.1:{port} for uboot\.bootscript within 1\.5s \(1 retry\)",
        result,
    )
    assert 3.0 <= elapsed < 3.0 + 10, elapsed  # 1.5 s x 2 tries, plus start-up


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (
            Short,
            r"transfer of initrd/uInitrd-Linux-armv7l-v3\.x from 127\.0\.0\.1:\d+ truncated: "
            r"got \d+ of \d+ bytes the server announced",
        ),
        (
            Truncate,
            r"transfer of initrd/uInitrd-Linux-armv7l-v3\.x from 127\.0\.0\.1:\d+ interrupted "
            r"after \d+ bytes",
        ),
    ],
    ids=["short", "stalled"],
)
def test_truncated_transfer_is_refused(
    prepared: FakeC1,
    tftpy_server: Callable[..., TftpyServer],
    fault: type[Short] | type[Truncate],
    reason: str,
) -> None:
    data = uinitrd(prepared)
    server = tftpy_server(
        {BOOTSCRIPT_NAME: bootscript(prepared), INITRD_NAME: fault(data, after=len(data) // 2)}
    )
    prepared.write_settings(tftp_port=server.port, tftp_timeout=0.5, tftp_retries=1)
    refused(prepared, "03_fetch_initrd", reason, prepared.archkernel())
    assert server.requests == [BOOTSCRIPT_NAME, INITRD_NAME]


def test_failing_kexec_load_means_no_systemctl(fake_c1: FakeC1) -> None:
    fake_c1.stand_in("kexec", exit_code=1, stderr="kexec_load failed: Operation not permitted\n")
    result = fake_c1.archkernel()
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert re.search(
        r"^error: step scaleway_kexec:08_kexec failed: kexec -l .* failed with exit code 1",
        result.stderr,
        re.MULTILINE,
    )
    assert "kexec_load failed: Operation not permitted" in result.stderr
    assert [call[0] for call in fake_c1.calls()] == ["kexec"]  # and no systemctl


def test_prepared_modules_deleted_by_hand_is_a_clear_error(fake_c1: FakeC1) -> None:
    ok(fake_c1.archkernel())
    before = fake_c1.output.read_bytes()
    shutil.rmtree(fake_c1.workdir / "scaleway" / "modules")
    fake_c1.calls(clear=True)
    result = fake_c1.archkernel("--from", "6")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "crashed" not in result.stderr
    assert re.search(
        r"^error: step scaleway_kexec:06_pack failed: the prepared modules in .* are gone",
        result.stderr,
        re.MULTILINE,
    )
    assert "--from 5" in result.stderr
    assert fake_c1.output.read_bytes() == before
    assert fake_c1.calls() == []
    steps = ran(ok(fake_c1.archkernel("--from", "5")))
    assert "05_modules" in steps and "06_pack" in steps
    assert "03_fetch_initrd" not in steps and "04_unpack" not in steps
