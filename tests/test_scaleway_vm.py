"""The real kexec, in QEMU: the initrd scaleway_kexec patched boots and hands over.

The end-to-end tests prove the command line the workflow gives kexec; this one proves the
result boots. The workflow runs against the fake C1 (tests/support/c1.py), whose kernel
is Debian's amd64 kernel and whose modules come from the same kernel, and the stand-in
kexec records what it was asked. Then QEMU (TCG) boots that kernel with a plain
"provider-style" initrd carrying busybox, Debian's kexec and its libraries, the C1's
kernel and the patched initrd at the paths they have on the C1. Its /init runs exactly
the recorded `kexec -l ...` (host paths made C1 paths again) and `kexec -e`. In the second
kernel the patched initrd's /init must load the injected modules, nbd with the
`nbds_max=3` of the command line, and source the provider-style init (shaped like the
provider's: `. /functions`, `cp -rf / /initramfs`, `. ./boot-local`), which reports that
it runs from `/` as PID 1 on the kexec'd command line with the modules loaded and its
relative `./boot-local` found, and powers off.

The serial console is kept in the test's tmp_path (pytest keeps the last runs).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
from pathlib import Path

import pytest

from archkernel.errors import UserError
from archkernel.host import console as screen
from archkernel.host import qemu
from tests.support.c1 import FakeC1, Template, serving, tool, write_executable

pytestmark = [pytest.mark.vm, pytest.mark.integration, pytest.mark.root]

BOOT_LIMIT = 600.0  # seconds QEMU may take for both boots; it is always stopped after
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
DONE = "PROVIDER-INIT-DONE"


def shared_libraries(binary: str) -> list[Path]:
    """The libraries `ldd` lists for `binary`, the dynamic loader included."""
    out = tool(["ldd", binary]).decode()
    return [Path(p) for p in re.findall(r"(/\S+) \(0x[0-9a-f]+\)", out)]


def first_boot_init(kexec_load: list[str]) -> str:
    """The plain initrd's /init: mount, the recorded kexec -l, kexec -e."""
    return "\n".join(
        [
            "#!/bin/busybox sh",
            "/bin/busybox mkdir -p /proc /sys /usr/bin /usr/sbin",
            "/bin/busybox --install -s",
            "export PATH=/sbin:/bin:/usr/sbin:/usr/bin",
            "mount -t proc proc /proc",
            "mount -t sysfs sysfs /sys",
            'echo "FIRST-BOOT: loading the Arch kernel"',
            f"{shlex.join(kexec_load)} || {{ echo 'FIRST-BOOT: kexec -l failed'; poweroff -f; }}",
            'echo "FIRST-BOOT: kexec -e"',
            "kexec -e",
            'echo "FIRST-BOOT: kexec -e returned"',
            "poweroff -f",
            "",
        ]
    )


def to_c1_paths(argv: list[str], root: Path) -> list[str]:
    """The recorded argv with the fake C1's host paths turned back into C1 paths.

    Only the kernel and --initrd (and --dtb) are paths; the command line stays untouched.
    """
    prefix = str(root)
    rewritten = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if arg.startswith(prefix + "/"):
            arg = arg[len(prefix) :]
        elif eq and flag in ("--initrd", "--dtb") and value.startswith(prefix + "/"):
            arg = f"{flag}={value[len(prefix) :]}"
        rewritten.append(arg)
    assert sum(a != b for a, b in zip(argv, rewritten, strict=True)) == 2, rewritten
    return rewritten


def build_first_boot_initrd(c1: FakeC1, kexec_load: list[str], stage: Path) -> bytes:
    """A plain newc archive (GNU cpio) of busybox, kexec and its libraries, the C1's files."""
    for d in ("bin", "sbin", "dev", "boot"):
        (stage / d).mkdir(parents=True)
    shutil.copy2("/bin/busybox", stage / "bin/busybox")
    kexec = shutil.which("kexec") or "/usr/sbin/kexec"
    shutil.copy2(kexec, stage / "sbin/kexec")
    for lib in shared_libraries(kexec):
        dest = stage / lib.relative_to("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(lib.resolve(), dest)
    os.mknod(stage / "dev/console", stat.S_IFCHR | 0o600, os.makedev(5, 1))
    os.mknod(stage / "dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    # The files kexec loads, where the workflow found them on the C1.
    kernel, initrd = kexec_load[2], kexec_load[3].removeprefix("--initrd=")
    shutil.copy2(c1.kernel, stage / kernel.lstrip("/"))
    shutil.copy2(c1.output, stage / initrd.lstrip("/"))
    write_executable(stage / "init", first_boot_init(kexec_load))
    names = tool(["find", "."], cwd=stage)
    return tool(["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"], names, cwd=stage)


def test_patched_initrd_boots_after_a_real_kexec(c1_base: Template, tmp_path: Path) -> None:
    if shutil.which(qemu.QEMU) is None:
        pytest.skip(f"{qemu.QEMU} is not installed")
    c1 = FakeC1.create(tmp_path / "c1", c1_base)
    with serving(c1):
        result = c1.archkernel()
    assert result.returncode == 0, result.stderr
    calls = c1.calls()
    assert [call[0] for call in calls] == ["kexec", "systemctl"]
    recorded = calls[0]
    kexec_load = to_c1_paths(recorded, c1.root)
    assert kexec_load[:4] == [
        "kexec",
        "-l",
        "/boot/zImage",
        "--initrd=/boot/initramfs-archkernel.img",
    ]
    cmdline = recorded[-1].removeprefix("--command-line=")

    initrd = tmp_path / "first-boot.cpio"
    initrd.write_bytes(build_first_boot_initrd(c1, kexec_load, tmp_path / "first-boot"))
    shutil.rmtree(tmp_path / "first-boot")
    serial = tmp_path / "serial.log"
    argv = qemu.qemu_argv(
        kernel=c1.kernel,  # the first kernel is the same one: a C1 boots the provider's
        initrd=initrd,
        append="console=ttyS0 panic=-1",
        memory=1024,
        serial_log=serial,
    )
    try:
        boot = qemu.boot_and_wait(argv, serial, DONE, BOOT_LIMIT)
    except UserError as exc:
        pytest.fail(f"the kexec'd system did not come up: {exc}")
    console = screen.clean_console(serial.read_bytes().decode("utf-8", "replace"))
    print(f"both boots: {boot.elapsed:.1f}s; serial console: {serial}")

    where = f"(serial console: {serial})"
    assert console.count("Linux version ") == 2, where  # two kernels booted
    first, second = console.split("FIRST-BOOT: kexec -e\n", 1)
    assert "FIRST-BOOT: loading the Arch kernel" in first, where
    assert "kexec -l failed" not in first and "returned" not in second, where
    assert "Linux version " in second, where

    # The patched /init: each module logged and loaded, in order, then the provider's init.
    logged = re.findall(r"^archkernel: loading (\S+)(?: with .*)?$", second, re.MULTILINE)
    assert logged == LOADED, where
    assert "failed" not in "".join(re.findall(r"^archkernel: .*$", second, re.MULTILINE)), where
    handover = second.index("archkernel: starting the provider init")
    provider = second[handover:]
    assert "PROVIDER-INIT-OK pid=1" in provider, where  # sourced: still PID 1
    assert "PROVIDER-KEXEC=yes" in provider, where
    assert f"PROVIDER-CMDLINE: {cmdline}" in provider, where  # the command line given to kexec
    for name in LOADED:
        assert f"PROVIDER-MODULE-LOADED {name}" in provider, where
    # nbd.nbds_max=3 of the command line reached insmod: the module has 3 devices.
    assert "archkernel: loading nbd with nbds_max=3" in second, where
    assert "PROVIDER-NBDS-MAX=3" in provider, where
    assert "PROVIDER-INITRAMFS-COPY=yes" in provider, where  # cp -rf / /initramfs
    assert "PROVIDER-BOOT-LOCAL-OK root=/dev/nbd0 cwd=/" in provider, where  # . ./boot-local
