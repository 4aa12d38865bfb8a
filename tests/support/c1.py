"""A fake Scaleway C1 for the scaleway_kexec tests and benchmark: real parts, fake machine.

What a C1 looks like to the workflow, built under a temporary directory:

- `root/`: the system (`[scaleway] root`): `proc/cmdline` (a C1-style command line),
  `proc/net/pnp` naming 127.0.0.1 as bootserver, `proc/sys/kernel/kexec_load_disabled`,
  the shutdown initrd in `run/initramfs/` (old style: its script ends with a shell),
  `boot/zImage` (Debian's real amd64 kernel) and `usr/lib/modules/<version>/` with
  `pkgbase` and real modules of that kernel, compressed as `.ko.xz`, `.ko.zst` or left
  `.ko`, indexed by `depmod -b`. `lib` links to `usr/lib` as on Arch.
- `tftp/`: what the boot server hands out, served by Debian's `in.tftpd` on 127.0.0.1:
  `uboot.bootscript` (made by `mkimage -T script`, a multi-line script that loads a
  kernel, the initrd and a DTB) and `initrd/uInitrd-Linux-armv7l-v3.x` (made by
  `mkimage -T ramdisk -C none` from a gzip'd newc archive written by GNU cpio, holding a
  busybox-style `/init`, `/bin/busybox` with its applet links, a hard link and device
  nodes).
- `bin/`: stand-in `kexec` and `systemctl` (and `scw-metadata` when a test sets server
  tags), first on the PATH the workflow runs with; each appends its argv as one JSON
  line to `calls.jsonl`.
- `settings.toml`, `work/` (the workdir).

`c1_template()` builds the expensive parts once; `FakeC1.create()` copies them for each
test, and `serving()` runs in.tftpd over the copy. Plain functions, so `bench/` uses them
without pytest; the `c1_base` and `fake_c1` fixtures (tests/conftest.py) wrap them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.kernel import (
    copy_modules,
    debian_kernel_tree,
    kernel_image,
    kernel_version,
    module_dir,
)
from tests.support.tftp import TftpdHpa, running_tftpd_hpa

REPO = Path(__file__).resolve().parents[2]
VENV_ARCHKERNEL = REPO / ".venv" / "bin" / "archkernel"

# A C1's kernel command line as the provider's U-Boot sets it. NO_NTPDATE=0 is there so
# the kexec'd line must replace it, not add a second one.
CMDLINE = (
    "console=ttyS0,115200 ip=dhcp root=/dev/nbd0 nbd.max_parts=8 boot=local nousb "
    "noplymouth INITRD_DEBUG=0 NO_NTPDATE=0"
)
PNP = "#PROTO: DHCP\ndomain cloud.online.net\nnameserver 10.1.31.38\nbootserver 127.0.0.1\n"
INITRD_NAME = "initrd/uInitrd-Linux-armv7l-v3.x"
BOOTSCRIPT_NAME = "uboot.bootscript"
PKGBASE = "linux-armv7\n"

# Modules of the Debian kernel put into the fake tree: what the settings ask for (with
# their dependencies), one optional module that exists, and one nobody asks for.
REQUIRED_MODULES = ["virtio_net", "nbd"]
OPTIONAL_MODULES = ["mvneta_bm", "dummy"]  # mvneta_bm: not in an amd64 kernel (a warning)
UNREQUESTED_MODULES = ["virtio_blk"]

# The provider's /init. On the C1 it sets up the network and NBD and switches root; this
# one reports what a test needs to see and powers the machine off. `$$` is 1 only while
# it runs as PID 1, that is when the new /init sources it rather than running it.
PROVIDER_INIT = """\
#!/bin/sh
# Scaleway-style initrd init (test stand-in): mount, report, power off.
/bin/busybox mkdir -p /proc /sys /dev
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
echo "PROVIDER-INIT-OK pid=$$"
if grep -qw is_in_kexec=yes /proc/cmdline; then
\techo "PROVIDER-KEXEC=yes"
else
\techo "PROVIDER-KEXEC=no"
fi
echo "PROVIDER-CMDLINE: $(cat /proc/cmdline)"
for module in virtio_net net_failover failover virtio virtio_ring nbd dummy; do
\t[ -d "/sys/module/$module" ] && echo "PROVIDER-MODULE-LOADED $module"
done
echo "PROVIDER-INIT-DONE"
poweroff -f
"""

# The shutdown script kept in /run/initramfs: old initrds end it with a shell.
OLD_SHUTDOWN = """\
#!/bin/sh
# Shutdown script of the provider's initrd (old style).
echo "Detaching NBD devices"
for dev in /dev/nbd*; do
    xnbd-client -d "$dev" 2>/dev/null
done
/bin/sh
"""
CURRENT_SHUTDOWN = """\
#!/bin/sh
# Shutdown script of the provider's initrd (current).
echo "Detaching NBD devices"
xnbd-client -d /dev/nbd0
if [ "$1" = "kexec" ]; then
    kexec -e
fi
poweroff -f
"""

APPLETS = ["sh", "ash", "mount", "umount", "mkdir", "cat", "grep", "insmod", "echo", "ls"]
SBIN_APPLETS = ["poweroff", "reboot", "switch_root", "modprobe"]


def bootscript_text(initrd: str = INITRD_NAME) -> str:
    """A U-Boot script like the C1's: a kernel, the initrd and a DTB over TFTP, bootm.

    The initrd is neither the first nor the last file fetched, addresses come from
    variables, separators are tabs and runs of spaces: a parser must follow `bootm`.
    """
    return (
        "# Scaleway C1 boot script\n"
        "echo 'Booting from ${serverip}'\n"
        'setenv bootargs "console=ttyS0,115200 ip=dhcp root=/dev/nbd0 nbd.max_parts=8"\n'
        "setenv kernel_addr  0x00200000\n"
        "setenv\tinitrd_addr\t0x02000000\n"
        "setenv fdt_addr 0x01f00000\n"
        "setenv kernel_path kernel/armv7l-mainline-lts-4.9-4.9.93-rev1\n"
        "# tftp ${initrd_addr} initrd/uInitrd-Linux-armv7l-v2.x   (before 2016)\n"
        "tftp ${kernel_addr} ${kernel_path}\n"
        f"tftpboot\t${{initrd_addr}}   {initrd}\n"
        "tftp ${fdt_addr} dtb/armada-xp-scaleway-c1.dtb\n"
        "bootm ${kernel_addr} ${initrd_addr} ${fdt_addr}\n"
    )


def tool(argv: Sequence[str | os.PathLike[str]], data: bytes | None = None, **kw: Any) -> bytes:
    """Run a real tool, fail loudly, return its stdout."""
    result = subprocess.run(
        [os.fspath(a) for a in argv], input=data, capture_output=True, check=False, **kw
    )
    if result.returncode != 0:
        raise RuntimeError(f"{shlex.join(map(str, argv))} failed: {result.stderr.decode()}")
    return bytes(result.stdout)


def mkimage(kind: str, payload: bytes, name: str, work: Path) -> bytes:
    """`mkimage -A arm -O linux -T KIND -C none` over `payload` (fixed timestamp)."""
    src, out = work / f".{kind}.in", work / f".{kind}.img"
    src.write_bytes(payload)
    env = {**os.environ, "SOURCE_DATE_EPOCH": "1500000000"}
    tool(
        [
            "mkimage",
            "-A",
            "arm",
            "-O",
            "linux",
            "-T",
            kind,
            "-C",
            "none",
            "-n",
            name,
            "-d",
            src,
            out,
        ],
        env=env,
    )
    data = out.read_bytes()
    src.unlink()
    out.unlink()
    return data


def script_image(text: str, work: Path) -> bytes:
    """A U-Boot script image of `text`, made by mkimage."""
    return mkimage("script", text.encode(), "boot script", work)


def gnu_cpio_gzip(tree: Path) -> bytes:
    """`find . | sort | cpio -o -H newc -R 0:0 | gzip -9 -n` of `tree`."""
    names = tool(["find", "."], cwd=tree)
    ordered = b"\n".join(sorted(names.splitlines())) + b"\n"
    archive = tool(["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"], ordered, cwd=tree)
    return tool(["gzip", "-9", "-n", "-c"], archive)


def provider_tree(tree: Path, init: str = PROVIDER_INIT, extra: Mapping[str, bytes] = {}) -> None:
    """A busybox initrd tree like the provider's: /init, busybox links, devices, a hard link."""
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "etc", "proc", "sys", "run", "lib"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2("/bin/busybox", tree / "bin/busybox")
    for applet in APPLETS:
        (tree / "bin" / applet).symlink_to("busybox")
    for applet in SBIN_APPLETS:
        (tree / "sbin" / applet).symlink_to("../bin/busybox")
    (tree / "init").write_text(init)
    (tree / "init").chmod(0o755)
    (tree / "etc/issue").write_text("Scaleway initrd (test)\n")
    os.link(tree / "etc/issue", tree / "etc/issue.net")
    (tree / "etc/functions").write_text('log_begin_msg() { echo "$@"; }\n')
    (tree / "etc/functions").chmod(0o600)
    os.mknod(tree / "dev/console", stat.S_IFCHR | 0o600, os.makedev(5, 1))
    os.mknod(tree / "dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(tree / "dev/nbd0", stat.S_IFBLK | 0o660, os.makedev(43, 0))
    for name, data in extra.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(data)


def provider_initrd(work: Path, extra: Mapping[str, bytes] = {}) -> tuple[bytes, bytes]:
    """The provider's uInitrd and its payload (gzip'd newc cpio written by GNU cpio)."""
    with tempdir(work, "provider-tree") as tree:
        provider_tree(tree, extra=extra)
        payload = gnu_cpio_gzip(tree)
    return mkimage("ramdisk", payload, "initrd", work), payload


@contextlib.contextmanager
def tempdir(parent: Path, name: str) -> Iterator[Path]:
    path = parent / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def compress_modules(moddir: Path) -> dict[str, str]:
    """Compress the modules under `moddir` in turn with xz, zstd, or not at all.

    Returns {new relative path: original relative path}.
    """
    renamed: dict[str, str] = {}
    modules = sorted(p.relative_to(moddir).as_posix() for p in moddir.rglob("*.ko"))
    for i, rel in enumerate(modules):
        kind = i % 3
        if kind == 0:
            tool(["xz", "--check=crc32", moddir / rel])
            renamed[rel + ".xz"] = rel
        elif kind == 1:
            tool(["zstd", "-q", "--rm", moddir / rel])
            renamed[rel + ".zst"] = rel
        else:
            renamed[rel] = rel
    return renamed


def modules_closure(src_moddir: Path, names: Sequence[str]) -> list[str]:
    """Module files (relative) that `modprobe --show-depends` loads for `names`."""
    root = src_moddir.parents[2]
    found: list[str] = []
    with tempdir(Path(os.environ.get("TMPDIR", "/tmp")), f".c1-modprobe-{os.getpid()}") as conf:
        for name in names:
            for line in modprobe_show_depends(root, src_moddir.name, conf, name):
                rel = str(Path(line).relative_to(src_moddir))
                if rel not in found:
                    found.append(rel)
    return found


def modprobe_show_depends(root: Path, version: str, config: Path, name: str) -> list[str]:
    """The insmod paths `modprobe -C CONFIG -d ROOT -S VERSION --show-depends NAME` prints.

    `config` should be an empty directory: it keeps the host's modprobe.d out.
    """
    out = tool(
        ["modprobe", "-C", config, "-d", root, "-S", version, "--show-depends", name]
    ).decode()
    paths = []
    for line in out.splitlines():
        words = line.split()
        if words and words[0] == "insmod":
            paths.append(os.path.normpath(words[1]))
    return paths


@dataclass(frozen=True)
class Template:
    """What every fake C1 copies: the system tree and the provider's images."""

    base: Path
    version: str
    kernel_tree: Path
    compressed: dict[str, str]  # module file in the fake tree -> file in Debian's tree

    @property
    def root(self) -> Path:
        return self.base / "root"

    @property
    def uinitrd(self) -> Path:
        return self.base / "uInitrd"

    @property
    def payload(self) -> Path:
        return self.base / "initrd.payload"


def c1_template(base: Path, kernel_tree: Path | None = None) -> Template:
    """Build the parts of a fake C1 that take time, once: modules, kernel, initrd."""
    tree = kernel_tree if kernel_tree is not None else debian_kernel_tree()
    version = kernel_version(tree)
    src = module_dir(tree)
    base.mkdir(parents=True, exist_ok=True)
    root = base / "root"
    moddir = root / "usr/lib/modules" / version
    wanted = REQUIRED_MODULES + OPTIONAL_MODULES[1:] + UNREQUESTED_MODULES
    copy_modules(src, moddir, modules_closure(src, wanted))
    compressed = compress_modules(moddir)
    (root / "lib").symlink_to("usr/lib")
    tool(["depmod", "-b", root, version])
    (moddir / "pkgbase").write_text(PKGBASE)
    (root / "boot").mkdir()
    shutil.copy2(kernel_image(tree), root / "boot/zImage")
    uinitrd, payload = provider_initrd(base)
    (base / "uInitrd").write_bytes(uinitrd)
    (base / "initrd.payload").write_bytes(payload)
    return Template(base, version, tree, compressed)


@dataclass
class FakeC1:
    """One fake C1: its tree, TFTP directory, stand-ins, settings and workdir."""

    base: Path
    template: Template
    port: int = 0
    settings_overrides: dict[str, Any] = field(default_factory=dict)

    # --- layout ----------------------------------------------------------------------

    @property
    def root(self) -> Path:
        return self.base / "root"

    @property
    def tftp(self) -> Path:
        return self.base / "tftp"

    @property
    def bin(self) -> Path:
        return self.base / "bin"

    @property
    def calls_file(self) -> Path:
        return self.base / "calls.jsonl"

    @property
    def settings(self) -> Path:
        return self.base / "settings.toml"

    @property
    def workdir(self) -> Path:
        return self.base / "work"

    @property
    def output(self) -> Path:
        return self.root / "boot/initramfs-archkernel.img"

    @property
    def kernel(self) -> Path:
        return self.root / "boot/zImage"

    @property
    def version(self) -> str:
        return self.template.version

    @property
    def moddir(self) -> Path:
        return self.root / "usr/lib/modules" / self.version

    @property
    def shutdown(self) -> Path:
        return self.root / "run/initramfs/shutdown"

    # --- building ----------------------------------------------------------------------

    @classmethod
    def create(cls, base: Path, template: Template) -> FakeC1:
        """A fresh C1 under `base` (which must not exist) from `template`."""
        c1 = cls(base, template)
        shutil.copytree(template.root, c1.root, symlinks=True)
        proc = c1.root / "proc"
        (proc / "net").mkdir(parents=True)
        (proc / "sys/kernel").mkdir(parents=True)
        (proc / "cmdline").write_text(CMDLINE + "\n")
        (proc / "net/pnp").write_text(PNP)
        (proc / "sys/kernel/kexec_load_disabled").write_text("0\n")
        (c1.root / "run/initramfs/sbin").mkdir(parents=True)
        write_executable(c1.root / "run/initramfs/sbin/kexec", "#!/bin/sh\nexit 0\n")
        write_executable(c1.shutdown, OLD_SHUTDOWN)
        c1.tftp.mkdir()
        c1.put(BOOTSCRIPT_NAME, script_image(bootscript_text(), base))
        c1.put(INITRD_NAME, template.uinitrd.read_bytes())
        c1.bin.mkdir()
        c1.stand_in("kexec")
        c1.stand_in("systemctl")
        c1.workdir.mkdir()
        c1.write_settings()
        return c1

    def put(self, name: str, data: bytes) -> Path:
        """Serve `data` as `name` over TFTP (world-readable, as in.tftpd needs)."""
        path = self.tftp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(self.tftp).parents:
            (self.tftp / parent).chmod(0o755)
        path.write_bytes(data)
        path.chmod(0o644)
        return path

    def stand_in(
        self, name: str, *, exit_code: int = 0, stdout: str = "", stderr: str = ""
    ) -> Path:
        """A stand-in `name` first on PATH: records its argv, prints, exits with `exit_code`."""
        script = (
            f"#!{sys.executable} -IS\n"
            "import json, sys\n"
            f"with open({str(self.calls_file)!r}, 'a') as record:\n"
            f"    record.write(json.dumps([{name!r}, *sys.argv[1:]]) + '\\n')\n"
            f"sys.stdout.write({stdout!r})\n"
            f"sys.stderr.write({stderr!r})\n"
            f"sys.exit({exit_code})\n"
        )
        path = self.bin / name
        write_executable(path, script)
        return path

    def write_settings(self, **scaleway: Any) -> None:
        """settings.toml: the tree, the server's port, short timeouts, test modules."""
        self.settings_overrides.update(scaleway)
        values: dict[str, Any] = {
            "root": str(self.root),
            "tftp_port": self.port,
            "tftp_timeout": 1.0,
            "tftp_retries": 1,
            "modules": REQUIRED_MODULES,
            "optional_modules": OPTIONAL_MODULES,
            **self.settings_overrides,
        }
        lines = [f"workdir = {json.dumps(str(self.workdir))}", "", "[scaleway]"]
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
        self.settings.write_text("\n".join(lines) + "\n")

    # --- running -------------------------------------------------------------------------

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a run: stand-ins first on PATH, no ARCHKERNEL_* leaking in."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("ARCHKERNEL_")}
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', os.defpath)}"
        env["PYTHONPATH"] = str(REPO)
        env.update(extra)
        return env

    def archkernel(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """`archkernel run scaleway_kexec --settings S ARGS...` in a new process."""
        argv = [*archkernel_command(), "run", "scaleway_kexec", "--settings", str(self.settings)]
        return self._run([*argv, *args], timeout)

    def doit(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """`doit run scaleway_kexec settings=S ARGS...` with the project's dodo.py."""
        argv = [sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "-d", str(self.base)]
        argv += ["run", "scaleway_kexec", f"settings={self.settings}"]
        return self._run([*argv, *args], timeout)

    def _run(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv,
            cwd=self.base,
            # Every step fails if it reads a setting its @reads does not declare.
            env=self.env(ARCHKERNEL_AUDIT_SETTINGS="1"),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def calls(self, *, clear: bool = False) -> list[list[str]]:
        """The stand-ins' recorded calls, oldest first: ["kexec", "-l", ...] each."""
        try:
            text = self.calls_file.read_text()
        except FileNotFoundError:
            return []
        if clear:
            self.calls_file.unlink()
        return [json.loads(line) for line in text.splitlines()]


def archkernel_command() -> list[str]:
    """The installed `archkernel` command, else the module run by this interpreter."""
    if VENV_ARCHKERNEL.is_file():
        return [str(VENV_ARCHKERNEL)]
    return [sys.executable, "-m", "tasks.cli"]


def write_executable(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


@contextlib.contextmanager
def serving(c1: FakeC1) -> Iterator[TftpdHpa]:
    """in.tftpd serving the C1's TFTP directory; the settings name its port."""
    with running_tftpd_hpa(c1.tftp) as server:
        c1.port = server.port
        c1.write_settings()
        yield server


def needs_c1_tools() -> None:
    """Skip unless this machine can stand up a fake C1 (root, the tools)."""
    if os.geteuid() != 0:
        pytest.skip("the fake C1 needs root (in.tftpd chroots, device nodes)")
    tools = ["mkimage", "cpio", "gzip", "xz", "zstd", "depmod", "modprobe", "in.tftpd"]
    missing = [
        t
        for t in tools
        if shutil.which(t) is None and shutil.which(t, path="/usr/sbin:/sbin") is None
    ]
    if missing or not Path("/bin/busybox").is_file():
        pytest.skip(f"the fake C1 needs {', '.join(missing) or 'busybox-static'}")
