"""A fake Scaleway C1: real parts, fake machine. `archkernel demo scaleway_kexec` and the
tests run the workflow against it.

What a C1 looks like to the workflow, built under a directory of its own:

- `root/`: the system (`[scaleway] root`), laid out as Arch Linux ARM's: `proc/cmdline`
  (a C1-style command line), `proc/net/pnp` naming 127.0.0.1 as bootserver,
  `proc/sys/kernel/kexec_load_disabled`, the shutdown initrd in `run/initramfs/` (the
  provider's current script, whose `kexec)` branch runs kexec -e; `create(shutdown=
  OLD_SHUTDOWN)` gives the older one that ends in a shell), `boot/zImage` (Debian's real
  amd64 kernel) and `usr/lib/modules/<version>/` with real modules of that kernel,
  compressed as `.ko.xz`, `.ko.zst` or left `.ko`, indexed by `depmod -b`, and that
  kernel's config as `build/.config`. No `pkgbase`: pacman's local database
  (`var/lib/pacman/local/`) says that `linux-armv7` owns the kernel and the modules and
  `linux-armv7-headers` the config, as on a real system. `lib` links to `usr/lib`.
- `tftp/`: what the boot server hands out (`archkernel.demo.provider`), served by Debian's
  `in.tftpd` on 127.0.0.1 (`serving`): `uboot.bootscript` and
  `initrd/uInitrd-Linux-armv7l-v3.x`.
- `bin/`: stand-in `kexec` and `systemctl` (and `scw-metadata` when a test sets server
  tags), to be put first on the PATH the workflow runs with (`path`); each appends its
  argv as one JSON line to `calls.jsonl`.
- `settings.toml`, `work/` (the workdir).

`c1_template()` builds the expensive parts once; `FakeC1.create()` copies them for each
machine, and `serving()` runs in.tftpd over the copy. Making one needs root (device nodes
in the initrd, in.tftpd's chroot) and the tools in `TOOLS`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from archkernel.demo.debian import (
    copy_modules,
    debian_kernel_tree,
    kernel_image,
    kernel_version,
    module_dir,
)
from archkernel.demo.provider import (
    BOOTSCRIPT_NAME,
    INITRD_NAME,
    SHUTDOWN,
    bootscript_text,
    provider_initrd,
    script_image,
    tempdir,
)
from archkernel.demo.tftpd import TftpdHpa, running_tftpd_hpa, tftpd_binary
from archkernel.errors import UserError
from archkernel.host.run import check_tools, run

# A C1's kernel command line as the provider's U-Boot sets it (`ip=:::::eth0:`, which the
# kexec line leaves off), with a module parameter for the new /init to pass to insmod.
# NO_NTPDATE=0 is there so the kexec'd line must replace it, not add a second one.
CMDLINE = (
    "console=ttyS0,115200 ip=:::::eth0: root=/dev/nbd0 nbd.max_parts=8 nbd.nbds_max=3 "
    "boot=local nousb noplymouth INITRD_DEBUG=0 NO_NTPDATE=0"
)
PNP = "#PROTO: DHCP\ndomain cloud.online.net\nnameserver 10.1.31.38\nbootserver 127.0.0.1\n"
PACKAGE = "linux-armv7"  # the kernel package pacman's database names

# Modules of the Debian kernel put into the fake tree: what the settings ask for (with
# their dependencies; virtio_pci because Debian's config has the transport as a module),
# one optional module that exists, and one nobody asks for.
REQUIRED_MODULES = ["virtio_net", "virtio_pci", "nbd"]
OPTIONAL_MODULES = ["mvneta_bm", "dummy"]  # mvneta_bm: not in an amd64 kernel (a warning)
UNREQUESTED_MODULES = ["virtio_blk"]

# Making a fake C1: the provider's images, the modules, the boot server.
TOOLS = ("mkimage", "cpio", "gzip", "find", "xz", "zstd", "depmod", "modprobe", "busybox")
TOOLS_WITH_SERVER = (*TOOLS, "in.tftpd")

# The shutdown script kept in /run/initramfs: old initrds (v3.12.3) end it with a shell.
OLD_SHUTDOWN = """\
#!/bin/sh
# Shutdown script of the provider's initrd (old style).
echo "Detaching NBD devices"
for dev in /dev/nbd*; do
    xnbd-client -d "$dev" 2>/dev/null
done
/bin/sh
"""
CURRENT_SHUTDOWN = SHUTDOWN  # the provider's since v3.12.4: a `kexec)` branch


def check_c1_tools(purpose: str, *, server: bool = True) -> None:
    """Raise the usual UserError naming the packages of every tool a fake C1 needs that is
    missing (with `server`, in.tftpd too: it may be outside PATH, in /usr/sbin)."""
    tools = TOOLS_WITH_SERVER if server else TOOLS
    check_tools([t for t in tools if not (t == "in.tftpd" and tftpd_binary())], purpose)


def compress_modules(moddir: Path) -> dict[str, str]:
    """Compress the modules under `moddir` in turn with xz, zstd, or not at all.

    Returns {new relative path: original relative path}.
    """
    renamed: dict[str, str] = {}
    modules = sorted(p.relative_to(moddir).as_posix() for p in moddir.rglob("*.ko"))
    for i, rel in enumerate(modules):
        kind = i % 3
        if kind == 0:
            run(["xz", "--check=crc32", moddir / rel])
            renamed[rel + ".xz"] = rel
        elif kind == 1:
            run(["zstd", "-q", "--rm", moddir / rel])
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
    argv: list[str | Path] = ["modprobe", "-C", config, "-d", root, "-S", version]
    argv += ["--show-depends", name]
    out = run(argv, capture=True).stdout
    paths = []
    for line in out.splitlines():
        words = line.split()
        if words and words[0] == "insmod":
            paths.append(os.path.normpath(words[1]))
    return paths


def add_package(root: Path, name: str, version: str, files: Sequence[str]) -> Path:
    """An entry of pacman's local database under `root` saying package `name` `version`
    owns `files` (relative paths) and their parent directories, as pacman writes it."""
    entry = root / "var/lib/pacman/local" / f"{name}-{version}"
    entry.mkdir(parents=True)
    listed: set[str] = set()
    for path in files:
        parts = path.split("/")
        listed.update("/".join(parts[:i]) + "/" for i in range(1, len(parts)))
        listed.add(path)
    (entry / "desc").write_text(
        f"%NAME%\n{name}\n\n%VERSION%\n{version}\n\n%BASE%\n{name.removesuffix('-headers')}\n\n"
        f"%DESC%\nThe Linux Kernel and modules - ARMv7 multi-platform\n\n%ARCH%\narmv7h\n\n"
    )
    (entry / "files").write_text("%FILES%\n" + "".join(f"{p}\n" for p in sorted(listed)) + "\n")
    return entry


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
    """Build the parts of a fake C1 that take time, once: modules, kernel, initrd.

    `kernel_tree`: an unpacked Debian kernel (default: `debian_kernel_tree()`, downloaded
    into the cache on first use).
    """
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
    run(["depmod", "-b", root, version])
    (root / "boot").mkdir()
    shutil.copy2(kernel_image(tree), root / "boot/zImage")
    owned = ["boot/zImage", *(f"{moddir.relative_to(root)}/{m}" for m in compressed)]
    owned += [
        p.relative_to(root).as_posix()
        for p in moddir.glob("modules.*")
        if p.name in ("modules.builtin", "modules.order", "modules.builtin.modinfo")
    ]
    pkgver = f"{version.split('-')[0]}-1"
    add_package(root, PACKAGE, pkgver, owned)
    config = tree / "boot" / f"config-{version}"
    if config.is_file():
        (moddir / "build").mkdir()
        shutil.copy2(config, moddir / "build/.config")
        add_package(
            root, f"{PACKAGE}-headers", pkgver, [f"{moddir.relative_to(root)}/build/.config"]
        )
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
    def create(cls, base: Path, template: Template, *, shutdown: str = CURRENT_SHUTDOWN) -> Self:
        """A fresh C1 under `base` (which must not exist) from `template`, whose shutdown
        initrd holds the script `shutdown`."""
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
        write_executable(c1.shutdown, shutdown)
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
        """A stand-in `name` in `bin/`: records its argv, prints, exits with `exit_code`."""
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

    def path(self, path: str | None = None) -> str:
        """A PATH with the stand-ins first, then `path` (default: ours)."""
        rest = os.environ.get("PATH", os.defpath) if path is None else path
        return f"{self.bin}{os.pathsep}{rest}"

    def calls(self, *, clear: bool = False) -> list[list[str]]:
        """The stand-ins' recorded calls, oldest first: ["kexec", "-l", ...] each."""
        try:
            text = self.calls_file.read_text()
        except FileNotFoundError:
            return []
        if clear:
            self.calls_file.unlink()
        return [json.loads(line) for line in text.splitlines()]


def write_executable(path: Path, text: str) -> None:
    """Write the program `text` to `path` (parents made), mode 0755."""
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


def needs_root(purpose: str) -> None:
    """A UserError unless we run as root, which a fake C1 needs."""
    if os.geteuid() != 0:
        raise UserError(
            f"{purpose} needs root: in.tftpd chroots into its directory, and the provider's "
            "initrd holds device nodes",
            "run it as root",
        )
