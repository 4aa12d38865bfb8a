"""Scaleway C1: boot the Arch kernel by patching the provider's initrd and kexec'ing.

Deciding functions (command lines, bootscript parsing, the new /init, the shutdown patch)
are pure; the `step_*` functions act, one per numbered step of `tasks/scaleway_kexec.py`.
Every system path is taken under `settings.root`, so tests run against a directory tree.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from archkernel.errors import UserError
from archkernel.host import tftp
from archkernel.host.files import atomic_path, write_bytes, write_if_changed
from archkernel.host.run import check_tools, render, run
from archkernel.log import log
from archkernel.settings import ScalewaySettings, Settings

if TYPE_CHECKING:
    from archkernel.formats import initramfs

MARKER = "archkernel"
MODULE_DIR = "archkernel/modules"  # inside the initrd; a directory the provider never has
# A final shell, as old shutdown scripts end: `sh`, `exec /bin/sh`, `busybox sh`,
# `exec setsid cttyhack sh` (busybox's way of giving the shell a controlling tty) ...
SHELL_ENDINGS = re.compile(
    r"^\s*(exec\s+)?(setsid\s+)?(cttyhack\s+)?(/usr)?(/s?bin/)?(ba|busybox\s+|a)?sh(\s+-[a-z]+)*\s*$"
)

# --- paths -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Paths:
    """Where the workflow reads and writes: system paths under root, outputs under workdir."""

    root: Path
    work: Path

    def system(self, path: str) -> Path:
        """`path` (absolute on the target system) taken under root."""
        return self.root / path.lstrip("/")

    @property
    def check(self) -> Path:
        return self.work / "check.json"

    @property
    def bootscript(self) -> Path:
        return self.work / "uboot.bootscript"

    @property
    def uinitrd(self) -> Path:
        return self.work / "uInitrd"

    @property
    def initrd_info(self) -> Path:
        return self.work / "initrd.json"

    @property
    def payload(self) -> Path:
        return self.work / "initrd.payload"

    @property
    def listing(self) -> Path:
        return self.work / "initrd.list.json"

    @property
    def modules(self) -> Path:
        return self.work / "modules"

    @property
    def modules_manifest(self) -> Path:
        return self.work / "modules.json"

    @property
    def packed(self) -> Path:
        return self.work / "pack.json"

    @property
    def kexec_record(self) -> Path:
        return self.work / "kexec.json"


def paths(settings: Settings) -> Paths:
    """The workflow's paths for these settings."""
    return Paths(settings.scaleway.root, settings.workdir / "scaleway")


# --- deciding ---------------------------------------------------------------------------------


def split_cmdline(text: str) -> list[str]:
    """Kernel command-line tokens; double quotes group words as the kernel's parser does."""
    tokens: list[str] = []
    current: list[str] = []
    quoted = False
    started = False
    for ch in text.strip():
        if ch == '"':
            quoted = not quoted
            current.append(ch)
            started = True
        elif ch.isspace() and not quoted:
            if started:
                tokens.append("".join(current))
                current, started = [], False
        else:
            current.append(ch)
            started = True
    if started:
        tokens.append("".join(current))
    return tokens


def _key(token: str) -> str:
    return token.split("=", 1)[0]


def already_kexeced(cmdline: str) -> bool:
    """True when the running kernel was started by us (the marker token is present)."""
    return MARKER in split_cmdline(cmdline)


def kexec_cmdline(current: str, extra: str) -> str:
    """The current command line plus `extra`, with no flag twice (extra's value wins)."""
    added = split_cmdline(extra)
    keys = {_key(t) for t in added}
    kept = [t for t in split_cmdline(current) if _key(t) not in keys]
    return " ".join([*kept, *added])


def kexec_argv(kernel: Path, initrd: Path, cmdline: str, dtb: Path | None) -> list[str]:
    """`kexec -l KERNEL --initrd=... [--dtb=...] --command-line=...` as an argv list."""
    argv = ["kexec", "-l", str(kernel), f"--initrd={initrd}"]
    if dtb is not None:
        argv.append(f"--dtb={dtb}")
    argv.append(f"--command-line={cmdline}")
    return argv


def tags_from_metadata(text: str) -> list[str]:
    """Server tags from `scw-metadata` output (`TAGS_<n>=<tag>` lines, n of any length)."""
    tags = []
    for line in text.splitlines():
        m = re.fullmatch(r"TAGS_(\d+)=(.*)", line.strip())
        if m:
            tags.append(m.group(2).strip().strip("'\""))
    return tags


def _script_commands(text: str) -> list[list[str]]:
    """U-Boot script commands as word lists: lines, `;` separators, comments dropped."""
    import shlex  # only when a bootscript is parsed, not on every boot

    commands = []
    for line in text.replace("\r", "\n").splitlines():
        if line.lstrip().startswith("#"):
            continue
        for part in re.split(r";(?=(?:[^'\"]|'[^']*'|\"[^\"]*\")*$)", line):
            try:
                words = shlex.split(part, comments=False)
            except ValueError:
                words = part.split()
            if words:
                commands.append(words)
    return commands


def _expand(word: str, env: dict[str, str]) -> str:
    """`word` with the script's own variables expanded.

    Variables the script does not set (U-Boot's `${ramdisk_addr_r}` ...) stay as written:
    they still tell two load addresses apart, where expanding them to nothing would make
    every address equal.
    """

    def value(m: re.Match[str]) -> str:
        return env.get(m.group(1) or m.group(2), m.group(0))

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, word)


def _same_address(a: str, b: str) -> bool:
    try:
        return int(a, 16) == int(b, 16)
    except ValueError:
        return a.strip().lower() == b.strip().lower()


def initrd_from_bootscript(text: str, *, source: str = "the bootscript") -> str:
    """The initrd path the bootscript fetches by TFTP.

    Picks the `tftp`/`tftpboot` whose load address `bootm`/`bootz` uses as the initrd; if
    the script boots differently, the one load whose file name says initrd. Variables set
    with `setenv` are expanded; whitespace and tabs may vary.
    """
    env: dict[str, str] = {}
    loads: list[tuple[str | None, str]] = []
    initrd_addr: str | None = None
    for words in _script_commands(text):
        cmd, args = words[0], [_expand(w, env) for w in words[1:]]
        if cmd == "setenv" and args:
            env[args[0]] = " ".join(args[1:])
        elif cmd == "env" and len(args) >= 2 and args[0] == "set":
            env[args[1]] = " ".join(args[2:])
        elif cmd in ("tftp", "tftpboot") and args:
            address, name = (args[0], args[1]) if len(args) >= 2 else (None, args[0])
            if ":" in name and re.match(r"^\d+\.\d+\.\d+\.\d+:", name):
                name = name.split(":", 1)[1]
            loads.append((address, name))
        elif cmd in ("bootm", "bootz", "booti") and len(args) >= 2 and args[1] != "-":
            initrd_addr = args[1].split(":", 1)[0]
    chosen: list[str] = []
    if initrd_addr is not None:
        chosen = [n for a, n in loads if a is not None and _same_address(a, initrd_addr)]
    if not chosen:
        chosen = [n for _, n in loads if re.search(r"initrd|initramfs", n, re.IGNORECASE)]
    if not chosen:
        names = ", ".join(n for _, n in loads) or "no tftp command at all"
        raise UserError(
            f"{source} names no initrd to fetch (it loads: {names})",
            "check the server's bootscript; set scaleway.bootscript if it has another name",
        )
    name = chosen[-1]
    if name.startswith("/") or ".." in name.split("/") or not name.strip():
        raise UserError(
            f"{source} names an unsafe initrd path {name!r}",
            "the path must be relative and must not contain '..'",
        )
    return name


def init_script(modules: list[str], version: str) -> str:
    """The new /init: busybox applets, the modules in order, then the provider's init.

    It sources /init.scw so the provider's script keeps running as PID 1.
    """
    from archkernel.formats import kmod

    lines = [
        "#!/bin/sh",
        f"# archkernel: load the modules of the Arch kernel {version} the root needs,",
        "# then hand over to the provider's init (sourced, so it stays PID 1).",
        "/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys",
        "/bin/busybox --install -s",
    ]
    for relpath in modules:
        name = kmod.module_name(relpath)
        lines.append(f'echo "archkernel: loading {name}"')
        lines.append(f'insmod /{MODULE_DIR}/{name}.ko || echo "archkernel: loading {name} failed"')
    lines += ['echo "archkernel: starting the provider init"', ". /init.scw", ""]
    return "\n".join(lines)


def patch_shutdown(text: str) -> str | None:
    """The shutdown script made to end with `kexec -e`, or None when it already does.

    Old provider initrds end their shutdown script with a plain shell; that last line
    becomes `kexec -e`. A script that ends another way is an error (nothing to guess).
    """
    lines = text.rstrip("\n").split("\n")
    commands = [
        (i, ln) for i, ln in enumerate(lines) if ln.strip() and not ln.lstrip().startswith("#")
    ]
    if any(re.search(r"(^|[\s/;])kexec\s+-e\b", ln) for _, ln in commands):
        return None
    if commands and SHELL_ENDINGS.match(commands[-1][1]):
        index = commands[-1][0]
        indent = lines[index][: len(lines[index]) - len(lines[index].lstrip())]
        lines[index] = f"{indent}kexec -e"
        return "\n".join(lines) + "\n"
    last = commands[-1][1].strip() if commands else "(empty)"
    raise UserError(
        f"the shutdown script does not end with a shell or `kexec -e` (it ends with {last!r})",
        "check /run/initramfs/shutdown by hand; a plain shell last line is what we replace",
    )


def find_kernel_version(moddirs: Path, kernel: Path, configured: str | None) -> str:
    """The module directory version for `kernel`: the setting, else the one with pkgbase.

    Several Arch kernels installed and no way to tell which is `kernel` is an error that
    lists them.
    """
    if configured:
        if not (moddirs / configured).is_dir():
            raise UserError(
                f"kernel_version {configured!r}: {moddirs / configured} does not exist",
                "set scaleway.kernel_version to one of the directories there, or remove it",
            )
        return configured
    candidates = sorted(p.parent.name for p in moddirs.glob("*/pkgbase"))
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise UserError(
            f"no Arch kernel found: no {moddirs}/*/pkgbase",
            "install the Arch kernel package (e.g. linux-armv7), or set scaleway.kernel_version",
        )
    # Several: the one shipping a copy of the kernel we boot.
    size = kernel.stat().st_size
    same = [
        v
        for v in candidates
        for image in ("vmlinuz", "zImage")
        if (moddirs / v / image).is_file()
        and (moddirs / v / image).stat().st_size == size
        and (moddirs / v / image).read_bytes() == kernel.read_bytes()
    ]
    if len(same) == 1:
        return same[0]
    raise UserError(
        f"several kernels are installed ({', '.join(candidates)}) and none is known to be {kernel}",
        "set scaleway.kernel_version to the one to boot",
    )


# --- acting: one function per step ------------------------------------------------------------


@dataclass
class CheckResult:
    """What step 1 found; later steps read it from check.json."""

    kernel: str
    kernel_version: str
    server: str
    server_origin: str
    cmdline: str


def _read(path: Path, what: str, hint: str) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}", hint) from None
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror}", hint) from None


def _kill_switch(cfg: ScalewaySettings) -> None:
    if shutil.which("scw-metadata") is None:
        log.debug("scw-metadata not found; kill switch not checked")
        return
    result = run(["scw-metadata"], capture=True, check=False, timeout=30)
    if result.returncode != 0:
        log.warning("scw-metadata failed (exit %d); kill switch not checked", result.returncode)
        return
    if cfg.disable_tag in tags_from_metadata(result.stdout):
        raise UserError(
            f"kill switch set: the server has the tag {cfg.disable_tag!r}; doing nothing",
            f"remove the tag {cfg.disable_tag!r} from the server to boot the Arch kernel again",
        )


def current_cmdline(settings: Settings) -> str:
    """The running kernel's command line."""
    path = paths(settings).system("/proc/cmdline")
    return _read(path, "kernel command line", "is /proc mounted?").strip()


def halted(settings: Settings) -> str | None:
    """Why a boot run has nothing to do: we are already running the Arch kernel."""
    try:
        cmdline = current_cmdline(settings)
    except UserError:
        return None  # step 1 reports it
    if already_kexeced(cmdline):
        return "already running the Arch kernel ('archkernel' is on the command line)"
    return None


def load_check(p: Paths) -> CheckResult:
    """check.json written by step 1."""
    return CheckResult(**json.loads(p.check.read_text()))


def step_check(settings: Settings) -> None:
    """Step 1: preconditions, the kill switch, the kernel and its version, the server."""
    cfg, p = settings.scaleway, paths(settings)
    p.work.mkdir(parents=True, exist_ok=True)
    cmdline = current_cmdline(settings)
    if os.geteuid() != 0:
        raise UserError(
            "scaleway_kexec must run as root", "run it from the systemd unit or with sudo"
        )
    disabled = p.system("/proc/sys/kernel/kexec_load_disabled")
    value = _read(disabled, "kexec switch", "this kernel was built without kexec support")
    if value.strip() != "0":
        raise UserError(
            f"kexec is disabled: {disabled} reads {value.strip()!r}",
            "it can only be re-enabled by a reboot; something set it after boot",
        )
    check_tools(["kexec", "systemctl"], "scaleway_kexec")
    if not p.system("/run/initramfs/sbin/kexec").exists():
        raise UserError(
            f"the shutdown initrd has no kexec: {p.system('/run/initramfs/sbin/kexec')} is missing",
            "the provider's initrd must keep a copy in /run/initramfs; check the boot script",
        )
    _kill_switch(cfg)
    kernel = p.system(cfg.kernel)
    if not kernel.is_file():
        raise UserError(
            f"kernel {kernel} does not exist", "install the Arch kernel, or set scaleway.kernel"
        )
    version = find_kernel_version(p.system("/usr/lib/modules"), kernel, cfg.kernel_version)
    pnp = tftp.read_pnp(p.system("/proc/net/pnp"))
    server, origin = tftp.choose_server(cfg.tftp_server, pnp, cfg.fallback_tftp_server)
    result = CheckResult(str(kernel), version, server, origin, cmdline)
    write_if_changed(p.check, json.dumps(asdict(result), indent=2).encode() + b"\n")
    log.info("kernel %s (%s); TFTP server %s (from %s)", kernel, version, server, origin)


def _server(settings: Settings) -> tftp.TftpServer:
    return tftp.TftpServer(load_check(paths(settings)).server, settings.scaleway.tftp_port)


def _fetch(settings: Settings, remote: str, dest: Path) -> bool:
    cfg = settings.scaleway
    return tftp.fetch_to(
        _server(settings),
        remote,
        dest,
        timeout=cfg.tftp_timeout,
        retries=cfg.tftp_retries,
        blksize=cfg.tftp_blksize,
    )


def step_fetch_bootscript(settings: Settings) -> None:
    """Step 2: the bootscript, rewritten only when its content changed."""
    p = paths(settings)
    changed = _fetch(settings, settings.scaleway.bootscript, p.bootscript)
    log.info(
        "bootscript %s from %s: %s",
        settings.scaleway.bootscript,
        _server(settings),
        "changed" if changed else "unchanged",
    )


def bootscript_initrd(path: Path) -> str:
    """The initrd path named by the bootscript image at `path`."""
    from archkernel.formats import uimage

    source = f"bootscript {path.name}"
    _, payload = uimage.parse(path.read_bytes(), expect_type=uimage.SCRIPT, source=source)
    return initrd_from_bootscript(uimage.script_text(payload, source), source=source)


def step_fetch_initrd(settings: Settings) -> None:
    """Step 3: find the initrd in the bootscript and fetch it."""
    p = paths(settings)
    name = bootscript_initrd(p.bootscript)
    changed = _fetch(settings, name, p.uinitrd)
    write_if_changed(p.initrd_info, json.dumps({"name": name}).encode() + b"\n")
    log.info("initrd %s: %s", name, "fetched" if changed else "unchanged")


def step_unpack(settings: Settings) -> None:
    """Step 4: check the uImage, read and check every cpio entry, keep the payload."""
    # libarchive and friends: only when the initrd is rebuilt, not on every boot
    from archkernel.formats import initramfs, uimage

    p = paths(settings)
    name = json.loads(p.initrd_info.read_text())["name"]
    source = f"initrd {name}"
    _, payload = uimage.parse(p.uinitrd.read_bytes(), expect_type=uimage.RAMDISK, source=source)
    compression = initramfs.detect_compression(payload, source=source)
    entries = initramfs.read_entries(payload, source=source)
    init = initramfs.original_init(entries)
    listing = {
        "name": name,
        "compression": compression,
        "entries": len(entries),
        "init": {"type": init.type, "mode": init.mode, "size": init.size},
    }
    write_if_changed(p.payload, payload)
    write_if_changed(p.listing, json.dumps(listing, indent=2).encode() + b"\n")
    log.info("initrd %s: %s-compressed cpio, %d entries, checked", name, compression, len(entries))


def step_modules(settings: Settings) -> None:
    """Step 5: the modules and their dependencies, decompressed, and the new /init."""
    from archkernel.formats import kmod

    cfg, p = settings.scaleway, paths(settings)
    check = load_check(p)
    moddir = p.system("/usr/lib/modules") / check.kernel_version
    index = kmod.ModulesDep.load(moddir)
    order, missing = index.resolve(cfg.modules, cfg.optional_modules)
    for name in missing:
        log.warning(
            "optional module %s is not in %s; going on without it", name, check.kernel_version
        )
    manifest: list[dict[str, Any]] = []
    with atomic_path(p.modules) as tmp:
        tmp.mkdir()
        for relpath in order:
            data = kmod.decompress_module((moddir / relpath).read_bytes(), relpath)
            name = kmod.module_name(relpath)
            (tmp / f"{name}.ko").write_bytes(data)
            manifest.append({"name": name, "path": relpath, "size": len(data)})
        (tmp / "init").write_text(init_script(order, check.kernel_version))
    write_if_changed(
        p.modules_manifest,
        json.dumps({"version": check.kernel_version, "modules": manifest}, indent=2).encode()
        + b"\n",
    )
    log.info("modules for %s: %s", check.kernel_version, " ".join(m["name"] for m in manifest))


def additions(p: Paths, original_init: bytes) -> list[initramfs.Entry]:
    """What the appended archive holds: /init, /init.scw and the modules."""
    from archkernel.formats import initramfs  # libarchive: only when the initrd is rebuilt

    manifest = json.loads(p.modules_manifest.read_text())
    if not (p.modules / "init").is_file():
        raise UserError(
            f"the prepared modules in {p.modules} are gone",
            "run again with --from 5 to prepare them",
        )
    entries = [
        initramfs.Entry.file("init", (p.modules / "init").read_bytes(), mode=0o755),
        initramfs.Entry.file("init.scw", original_init, mode=0o755),
        initramfs.Entry.directory("archkernel"),
        initramfs.Entry.directory(MODULE_DIR),
    ]
    for module in manifest["modules"]:
        data = (p.modules / f"{module['name']}.ko").read_bytes()
        entries.append(initramfs.Entry.file(f"{MODULE_DIR}/{module['name']}.ko", data, mode=0o644))
    return entries


def step_pack(settings: Settings) -> None:
    """Step 6: the original payload plus our archive, written atomically to output_initrd."""
    from archkernel.formats import initramfs  # libarchive: only when the initrd is rebuilt

    cfg, p = settings.scaleway, paths(settings)
    payload = p.payload.read_bytes()
    source = f"initrd {json.loads(p.listing.read_text())['name']}"
    init = initramfs.read_file(payload, "init", source)
    data = initramfs.patch(payload, additions(p, init), source=source, compression=cfg.compression)
    output = p.system(cfg.output_initrd)
    changed = write_if_changed(output, data)
    write_bytes(p.packed, json.dumps({"output": str(output), "size": len(data)}).encode() + b"\n")
    log.info("initrd %s: %s (%d bytes)", output, "rebuilt" if changed else "reused", len(data))


def step_shutdown(settings: Settings) -> None:
    """Step 7: make /run/initramfs/shutdown end with `kexec -e` (old scripts end in a shell)."""
    p = paths(settings)
    script = p.system("/run/initramfs/shutdown")
    text = _read(script, "shutdown script", "the provider's initrd keeps it in /run/initramfs")
    patched = patch_shutdown(text)
    if patched is None:
        log.info("shutdown script already ends with kexec -e")
        return
    write_bytes(script, patched.encode(), mode=script.stat().st_mode & 0o7777)
    log.info("shutdown script patched to end with kexec -e")


def kexec_plan(settings: Settings) -> list[list[str]]:
    """The two commands step 8 runs, from check.json and the settings."""
    cfg, p = settings.scaleway, paths(settings)
    check = load_check(p)
    dtb = p.system(cfg.dtb) if cfg.dtb else None
    cmdline = kexec_cmdline(check.cmdline, cfg.extra_cmdline)
    return [
        kexec_argv(Path(check.kernel), p.system(cfg.output_initrd), cmdline, dtb),
        ["systemctl", "kexec"],
    ]


def step_kexec(settings: Settings) -> None:
    """Step 8: load the Arch kernel with the patched initrd, then reboot into it."""
    load, reboot = kexec_plan(settings)
    log.info("kexec: %s", render(load))
    run(load, timeout=120)
    # Unchanged on a cached boot: nothing written, nothing fsynced (the root may be NBD).
    write_if_changed(paths(settings).kexec_record, json.dumps({"load": load}).encode() + b"\n")
    log.info("kexec loaded; %s", render(reboot))
    run(reboot, timeout=120)
