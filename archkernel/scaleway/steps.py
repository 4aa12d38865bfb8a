"""The steps of scaleway_kexec: each returns its plan (`archkernel.plan`), which then runs.

One function per numbered step of `tasks/scaleway_kexec.py`, in order; each reads the
settings it declares with `@reads` and the files earlier steps wrote, and changes nothing
until its plan runs. What they decide comes from the pure modules beside this one
(`bootscript`, `modules`, `scripts`, `cmdline`, `metadata`).

Steps 1, 2, 7 and 8 run on every boot: they import and read little. The initrd's formats
(and libarchive) are imported only by the steps that rebuild the initrd.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from archkernel.errors import UserError
from archkernel.host import tftp
from archkernel.host.files import atomic_path, write_bytes, write_if_changed
from archkernel.host.run import check_tools, render
from archkernel.log import log
from archkernel.plan import Plan, Run, reads
from archkernel.scaleway import bootscript, cmdline, metadata, scripts
from archkernel.scaleway import kernel as kernel_choice
from archkernel.scaleway import modules as kernel_modules
from archkernel.scaleway.workspace import (
    CheckResult,
    Paths,
    current_cmdline,
    load_check,
    paths,
    planned_check,
    read_text,
)
from archkernel.settings import Settings

# The settings of every TFTP transfer (the server's address is step 1's finding).
TFTP_SETTINGS = (
    "scaleway.tftp_port",
    "scaleway.tftp_timeout",
    "scaleway.tftp_retries",
    "scaleway.tftp_blksize",
    "scaleway.tftp_max_size",
    "scaleway.tftp_deadline",
)
SHUTDOWN_SCRIPT = "/run/initramfs/shutdown"
SHUTDOWN_KEXEC = "/run/initramfs/sbin/kexec"
KEXEC_SWITCH = "/proc/sys/kernel/kexec_load_disabled"


def halted(settings: Settings) -> str | None:
    """Why a boot run has nothing to do: we are already running the Arch kernel."""
    try:
        line = current_cmdline(settings)
    except UserError:
        return None  # step 1 reports it
    if cmdline.already_kexeced(line):
        return "already running the Arch kernel ('archkernel' is on the command line)"
    return None


# --- 1 check ----------------------------------------------------------------------------------


@reads(
    "scaleway.root",
    "scaleway.kernel",
    "scaleway.kernel_version",
    "scaleway.tftp_server",
    "scaleway.fallback_tftp_server",
    "scaleway.disable_tag",
)
def check(settings: Settings) -> Plan:
    """check root, kexec, the kill switch; find the kernel, its version and the server."""
    cfg, p = settings.scaleway, paths(settings)
    plan = Plan()
    plan.do(f"create {p.work}", lambda: p.work.mkdir(parents=True, exist_ok=True))
    plan.do(
        f"check that we run as root, that {p.system(KEXEC_SWITCH)} reads 0, that kexec and "
        f"systemctl are installed and that the shutdown initrd has {p.system(SHUTDOWN_KEXEC)}",
        lambda: _preconditions(settings),
    )
    if shutil.which(metadata.COMMAND[0]) is None:
        plan.do(
            "skip the kill switch: scw-metadata is not installed",
            lambda: log.debug("scw-metadata not found; kill switch not checked"),
        )
    else:
        plan.ops.append(
            Run.of(
                metadata.COMMAND,
                check=False,
                capture=True,
                timeout=30,
                then=lambda proc: _kill_switch(proc, settings.scaleway.disable_tag),
                note=f"stop if the server has the tag {cfg.disable_tag!r}",
            )
        )
    plan.do(
        f"find the kernel {p.system(cfg.kernel)} and its modules' version in "
        f"{p.system('/usr/lib/modules')} (pacman's database: the package owning it, else "
        f"pkgbase, else the image's version) and the TFTP server; record them in {p.check}",
        lambda: _find(settings),
    )
    return plan


def _preconditions(settings: Settings) -> None:
    p = paths(settings)
    current_cmdline(settings)
    if os.geteuid() != 0:
        raise UserError(
            "scaleway_kexec must run as root", "run it from the systemd unit or with sudo"
        )
    disabled = p.system(KEXEC_SWITCH)
    value = read_text(disabled, "kexec switch", "this kernel was built without kexec support")
    if value.strip() != "0":
        raise UserError(
            f"kexec is disabled: {disabled} reads {value.strip()!r}",
            "it can only be re-enabled by a reboot; something set it after boot",
        )
    check_tools(["kexec", "systemctl"], "scaleway_kexec")
    if not p.system(SHUTDOWN_KEXEC).exists():
        raise UserError(
            f"the shutdown initrd has no kexec: {p.system(SHUTDOWN_KEXEC)} is missing",
            "the provider's initrd must keep a copy in /run/initramfs; check the boot script",
        )


def _kill_switch(proc: subprocess.CompletedProcess[str], disable_tag: str) -> None:
    if proc.returncode != 0:
        log.warning("scw-metadata failed (exit %d); kill switch not checked", proc.returncode)
        return
    error = metadata.kill_switch(proc.stdout, disable_tag)
    if error is not None:
        raise error


def _find(settings: Settings) -> None:
    cfg, p = settings.scaleway, paths(settings)
    line = current_cmdline(settings)
    kernel = p.system(cfg.kernel)
    if not kernel.is_file():
        raise UserError(
            f"kernel {kernel} does not exist", "install the Arch kernel, or set scaleway.kernel"
        )
    found = kernel_choice.find(p.root, cfg.kernel, cfg.kernel_version)
    for note in found.notes:
        log.info("kernel %s: %s", kernel, note)
    pnp = tftp.read_pnp(p.system("/proc/net/pnp"))
    server, origin = tftp.choose_server(cfg.tftp_server, pnp, cfg.fallback_tftp_server)
    result = CheckResult(
        str(kernel), found.version, server, origin, line, found.package or "", found.how
    )
    write_if_changed(p.check, result.to_json())
    log.info("kernel %s (%s; %s)", kernel, found.version, found.how)
    log.info("TFTP server %s (from %s)", server, origin)


# --- 2 and 3: TFTP ----------------------------------------------------------------------------


def _planned_server(settings: Settings) -> tftp.TftpServer | None:
    """The boot server step 1 chose, or None in a dry run before step 1 ran."""
    check = planned_check(paths(settings))
    return None if check is None else tftp.TftpServer(check.server, settings.scaleway.tftp_port)


def _fetching(settings: Settings, server: tftp.TftpServer | None, remote: str, dest: Path) -> str:
    """How a dry run shows a TFTP transfer: file, server, port and destination."""
    host = server.host if server else "(the server step 1 chooses)"
    port = settings.scaleway.tftp_port
    return (
        f"fetch {remote} over TFTP from server {host} port {port} into {dest}"
        " (rewritten only if it changed)"
    )


def _fetch(settings: Settings, server: tftp.TftpServer | None, remote: str, dest: Path) -> bool:
    """Fetch `remote` into `dest` (in-process, streamed to a temporary file beside it);
    True when `dest` changed."""
    cfg = settings.scaleway
    return tftp.fetch_to(
        server or _checked_server(settings),
        remote,
        dest,
        timeout=cfg.tftp_timeout,
        retries=cfg.tftp_retries,
        blksize=cfg.tftp_blksize,
        max_size=cfg.tftp_max_size,
        deadline=cfg.tftp_deadline,
    )


def _checked_server(settings: Settings) -> tftp.TftpServer:
    """The boot server step 1 chose (it has run when a plan runs)."""
    return tftp.TftpServer(load_check(paths(settings)).server, settings.scaleway.tftp_port)


@reads("scaleway.bootscript", *TFTP_SETTINGS)
def fetch_bootscript(settings: Settings) -> Plan:
    """fetch the U-Boot bootscript over TFTP."""
    p, name = paths(settings), settings.scaleway.bootscript
    server = _planned_server(settings)

    def fetch() -> None:
        changed = _fetch(settings, server, name, p.bootscript)
        shown = server or _checked_server(settings)
        log.info("bootscript %s from %s: %s", name, shown, "changed" if changed else "unchanged")

    return Plan().do(_fetching(settings, server, name, p.bootscript), fetch)


@reads(*TFTP_SETTINGS)
def fetch_initrd(settings: Settings) -> Plan:
    """find the initrd in the bootscript and fetch it over TFTP."""
    p = paths(settings)
    if not p.bootscript.is_file():
        raise UserError(f"step 2 has not fetched the bootscript yet ({p.bootscript})")
    name = bootscript.bootscript_initrd(p.bootscript)
    server = _planned_server(settings)

    def fetch() -> None:
        changed = _fetch(settings, server, name, p.uinitrd)
        write_if_changed(p.initrd_info, json.dumps({"name": name}).encode() + b"\n")
        log.info("initrd %s: %s", name, "fetched" if changed else "unchanged")

    plan = Plan(notes=[f"the bootscript {p.bootscript} boots the initrd {name}"])
    return plan.do(
        f"{_fetching(settings, server, name, p.uinitrd)}; record its name in {p.initrd_info}",
        fetch,
    )


# --- 4 unpack ---------------------------------------------------------------------------------


@reads("scaleway.max_initrd_unpacked", "scaleway.max_initrd_ratio")
def unpack(settings: Settings) -> Plan:
    """check the initrd's U-Boot header and every cpio entry."""
    p, limits = paths(settings), _limits(settings)
    return Plan().do(
        f"check the U-Boot header of {p.uinitrd}, its payload's compression and every cpio "
        f"entry; keep the payload in {p.payload} and what it holds in {p.listing}",
        lambda: _unpack(p, limits),
    )


def _limits(settings: Settings) -> tuple[int, int]:
    """How far the provider's initrd may unpack (a bomb is refused, not unpacked): the
    most bytes, and the most times its packed size."""
    return settings.scaleway.max_initrd_unpacked, settings.scaleway.max_initrd_ratio


def _unpack(p: Paths, limits: tuple[int, int]) -> None:
    # libarchive and friends: only when the initrd is rebuilt, not on every boot
    from archkernel.formats import cpio, initramfs, uimage
    from archkernel.formats.compression import detect_compression

    name = json.loads(p.initrd_info.read_text())["name"]
    source = f"initrd {name}"
    _, payload = uimage.parse(p.uinitrd.read_bytes(), expect_type=uimage.RAMDISK, source=source)
    compression = detect_compression(payload, source=source)
    entries = initramfs.read_entries(
        payload, source=source, max_unpacked=limits[0], max_ratio=limits[1]
    )
    init = cpio.original_init(entries)
    listing = {
        "name": name,
        "compression": compression,
        "entries": len(entries),
        "init": {"type": init.type, "mode": init.mode, "size": init.size},
    }
    write_if_changed(p.payload, payload)
    write_if_changed(p.listing, json.dumps(listing, indent=2).encode() + b"\n")
    log.info("initrd %s: %s-compressed cpio, %d entries, checked", name, compression, len(entries))


# --- 5 modules --------------------------------------------------------------------------------


@reads(
    "scaleway.modules",
    "scaleway.optional_modules",
    "scaleway.module_options",
    "scaleway.extra_cmdline",
    "scaleway.drop_cmdline",
)
def modules(settings: Settings) -> Plan:
    """resolve the modules' dependencies, decompress them, write the new /init."""
    from archkernel.scaleway import kconfig, modparams

    cfg, p = settings.scaleway, paths(settings)
    check = planned_check(p)
    if check is None:
        raise UserError("step 1 has not found the kernel version yet")
    moddir = p.system("/usr/lib/modules") / check.kernel_version
    found = kconfig.read_config(moddir)
    config = found[1] if found else None
    chosen = kernel_modules.select(
        moddir, check.kernel_version, cfg.modules, cfg.optional_modules, config
    )
    # The parameters of the command line the new kernel runs under, and the setting's.
    line = cmdline.kexec_cmdline(check.cmdline, cfg.extra_cmdline, cfg.drop_cmdline)
    params = {
        name: modparams.insmod_args(given)
        for name, given in modparams.for_modules(chosen.names, line, cfg.module_options).items()
    }
    missing = [(name, kconfig.why_missing(name, config)) for name in chosen.missing]
    soc = kconfig.soc_warning(config)
    notes = [f"optional module {name} is not in {moddir}" for name in chosen.missing]
    notes += [soc] if soc else []
    notes.append(f"kernel config: {found[0]}" if found else f"no kernel config in {moddir}")
    plan = Plan(notes=notes)
    loads = " ".join(
        " ".join([name, *params.get(name, [])]) if name in params else name for name in chosen.names
    )
    return plan.do(
        f"decompress {len(chosen.order)} modules of {moddir} ({loads}; a parameter the "
        f"module does not declare is left out) and write the new /init into {p.modules}; "
        f"list them in {p.modules_manifest}",
        lambda: _prepare_modules(p, chosen, params, missing, soc),
    )


def _prepare_modules(
    p: Paths,
    chosen: kernel_modules.Selection,
    params: dict[str, list[str]],
    missing: list[tuple[str, str | None]],
    soc: str | None,
) -> None:
    from archkernel.formats import kmod
    from archkernel.host.decompress import decompress_module
    from archkernel.scaleway import modparams

    params = dict(params)
    for name, why in missing:
        because = f" ({why})" if why else ""
        log.warning(
            "optional module %s is not in %s%s; going on without it", name, chosen.version, because
        )
    for note in chosen.notes:
        log.info("%s", note)
    if soc:
        log.warning("%s", soc)
    listed: list[dict[str, object]] = []
    with atomic_path(p.modules) as tmp:
        tmp.mkdir()
        for relpath in chosen.order:
            data = decompress_module((chosen.moddir / relpath).read_bytes(), relpath)
            name = kmod.module_name(relpath)
            stray = modparams.unknown(params.get(name, []), data)
            if stray:
                log.warning("module %s has no parameter %s; not passed", name, ", ".join(stray))
                params[name] = [w for w in params[name] if w not in stray]
                if not params[name]:
                    del params[name]
            (tmp / f"{name}.ko").write_bytes(data)
            listed.append(
                {"name": name, "path": relpath, "size": len(data), "params": params.get(name, [])}
            )
        (tmp / "init").write_text(scripts.init_script(chosen.order, chosen.version, params))
    write_if_changed(p.modules_manifest, kernel_modules.manifest(chosen.version, listed))
    log.info("modules for %s: %s", chosen.version, " ".join(str(m["name"]) for m in listed))
    for name, words in params.items():
        log.info("module %s: insmod gets %s", name, " ".join(words))


# --- 6 pack -----------------------------------------------------------------------------------


@reads(
    "scaleway.output_initrd",
    "scaleway.compression",
    "scaleway.max_initrd_unpacked",
    "scaleway.max_initrd_ratio",
)
def pack(settings: Settings) -> Plan:
    """append the modules and the new /init to the initrd, written atomically."""
    cfg, p, limits = settings.scaleway, paths(settings), _limits(settings)
    output, compression = p.system(cfg.output_initrd), cfg.compression
    return Plan().do(
        f"append a {compression} archive of /init, /init.scw (the provider's /init) and the "
        f"modules of {p.modules} to {p.payload}; write it to {output} (atomically, only if it "
        f"changed) and its size to {p.packed}",
        lambda: _pack(p, output, compression, limits),
    )


def _pack(p: Paths, output: Path, compression: str, limits: tuple[int, int]) -> None:
    from archkernel.formats import initramfs  # libarchive: only when the initrd is rebuilt

    payload = p.payload.read_bytes()
    source = f"initrd {json.loads(p.listing.read_text())['name']}"
    original_init = initramfs.read_file(
        payload, "init", source, max_unpacked=limits[0], max_ratio=limits[1]
    )
    manifest = json.loads(p.modules_manifest.read_text())
    if not (p.modules / "init").is_file():
        raise UserError(
            f"the prepared modules in {p.modules} are gone",
            "run again with --from 5 to prepare them",
        )
    prepared = [
        (m["name"], (p.modules / f"{m['name']}.ko").read_bytes()) for m in manifest["modules"]
    ]
    entries = kernel_modules.archive_entries(
        (p.modules / "init").read_bytes(), original_init, prepared
    )
    data = initramfs.patch(
        payload,
        entries,
        source=source,
        compression=compression,
        max_unpacked=limits[0],
        max_ratio=limits[1],
    )
    changed = write_if_changed(output, data)
    write_bytes(p.packed, json.dumps({"output": str(output), "size": len(data)}).encode() + b"\n")
    log.info("initrd %s: %s (%d bytes)", output, "rebuilt" if changed else "reused", len(data))


# --- 7 shutdown -------------------------------------------------------------------------------


@reads()
def shutdown(settings: Settings) -> Plan:
    """make sure the shutdown initrd runs kexec -e."""
    script = paths(settings).system(SHUTDOWN_SCRIPT)
    text = read_text(script, "shutdown script", "the provider's initrd keeps it in /run/initramfs")
    found = scripts.examine_shutdown(text)
    said = f"shutdown script {script}: {found.describe()}"
    patched = found.patched
    if patched is None:
        return Plan().do(f"{script}: {found.describe()}", lambda: log.info(said))

    def write() -> None:
        write_bytes(script, patched.encode(), mode=script.stat().st_mode & 0o7777)
        log.info("%s", said)

    return Plan().do(
        f"replace the last command of {script} ({found.found!r}) with `kexec -e`", write
    )


# --- 8 kexec ----------------------------------------------------------------------------------


@reads(
    "scaleway.extra_cmdline",
    "scaleway.drop_cmdline",
    "scaleway.dtb",
    "scaleway.kernel",
    "scaleway.output_initrd",
)
def kexec(settings: Settings) -> Plan:
    """kexec -l the Arch kernel with the patched initrd, then systemctl kexec."""
    cfg, p = settings.scaleway, paths(settings)
    line = cmdline.kexec_cmdline(current_cmdline(settings), cfg.extra_cmdline, cfg.drop_cmdline)
    dtb = p.system(cfg.dtb) if cfg.dtb else None
    load = cmdline.kexec_argv(p.system(cfg.kernel), p.system(cfg.output_initrd), line, dtb)

    def loaded(_: subprocess.CompletedProcess[str]) -> None:
        # Unchanged on a cached boot: nothing written, nothing fsynced (the root may be NBD).
        write_if_changed(p.kexec_record, json.dumps({"load": load}).encode() + b"\n")
        log.info("kexec: %s", render(load))
        log.info("kexec loaded; %s", render(cmdline.REBOOT))

    # A failing kexec -l stops the plan there: no systemctl kexec without a loaded kernel.
    return Plan().run(load, timeout=120, then=loaded).run(cmdline.REBOOT, timeout=120)
