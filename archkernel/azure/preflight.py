"""Step 1 of azure_vhd: the build environment, the tools, pacman.conf and the IDs."""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

from archkernel.azure import buildenv, ids, pacman
from archkernel.azure import config as conf
from archkernel.azure.workspace import (
    FIRMWARE_SETTINGS,
    HOST_TOOLS,
    UEFI_TOOLS,
    Paths,
    _json,
    build_environment,
    clear_leftovers,
    grub_dirs,
    paths,
    put_in_place,
    record_ids,
    root_uuid,
    staging,
)
from archkernel.errors import UserError
from archkernel.host.download import FetchError, open_url
from archkernel.host.files import remove_path, write_if_changed
from archkernel.host.processes import stop_processes_in
from archkernel.host.run import check_tools
from archkernel.image import grub
from archkernel.log import log
from archkernel.plan import Do, Plan, reads
from archkernel.settings import AzureSettings, Settings

# --- step 1 -------------------------------------------------------------------------------


def _probe_mirror(mirror: str, timeout: float = 20.0) -> None:
    url = conf.mirror_probe_url(mirror)
    if not url.startswith(("http://", "https://", "ftp://")):
        return
    try:
        with open_url(url, timeout=timeout) as response:
            response.read(1)
    except FetchError as exc:
        raise UserError(
            f"the mirror {mirror} does not answer ({url}: {exc.reason})",
            "check the network, or set azure.mirror to a reachable mirror, or azure.pacman_conf "
            "to a pacman.conf for a local mirror or cache; with no Arch mirror at all, "
            "`archkernel demo azure_vhd` builds from an offline repository of its own "
            "(README: Offline build)",
        ) from None


def preflight_tools(az: AzureSettings) -> list[str]:
    """The tools the build runs, for these settings (with builder = container, the build
    environment's tools count for the routed ones)."""
    tools = list(HOST_TOOLS)
    if az.pacman_conf is None:
        tools += ["pacman-key", "gpgconf"]
    if az.firmware != "bios":
        tools += UEFI_TOOLS
    if az.builder == "container":
        tools.append("unshare" if az.container_runtime == "chroot" else az.container_runtime)
    return list(dict.fromkeys(tools))


@dataclass
class _Environment:
    """The build environment as step 1 uses it: prepared by one op, entered by the next
    (it does not exist before), left when the plan ends."""

    stack: contextlib.ExitStack[bool | None] = field(default_factory=contextlib.ExitStack)
    env: buildenv.BuildEnv | None = None

    def enter(self, settings: Settings) -> None:
        self.env = self.stack.enter_context(build_environment(settings))


@reads(*buildenv.SETTINGS, *FIRMWARE_SETTINGS, "azure.archive_date", *ids.ID_SETTINGS)
def preflight(settings: Settings) -> Plan:
    """prepare the build environment, check tools, prepare pacman.conf, derive the IDs."""
    az, p = settings.azure, paths(settings)
    tools = preflight_tools(az)
    firmware = az.firmware
    environment = _Environment()
    plan = Plan()
    cache = None if az.package_cache is None else os.path.abspath(az.package_cache)
    if cache is not None:
        # Made before the build environment, which shares it only if it exists.
        plan.do(
            f"make the package cache {cache} (azure.package_cache) if it does not exist",
            functools.partial(os.makedirs, cache, exist_ok=True),
        )
    if az.builder == "container":
        plan.do(
            f"prepare the build environment under {buildenv.directory(settings.workdir)}: "
            "obtain the bootstrap tarball and check its signature (or reuse the one "
            "unpacked), unpack it, set up its mirror, keyring and tools "
            f"({az.container_runtime}); the commands this runs (gpg, pacman-key, pacman, "
            "bsdtar, the container runtime) only prepare the environment itself",
            functools.partial(buildenv.prepare, az, settings.workdir),
        )
        plan.do(
            "enter the build environment: the build tools run in it from here on",
            functools.partial(environment.enter, settings),
        )
        where = " (on the host or in the build environment)"
    else:
        where = ""

    def check() -> None:
        check_tools(tools, f"azure_vhd{where}")
        bios_lib, efi_lib = grub_dirs(environment.env)
        grub.check_platforms(firmware, bios_lib=bios_lib, efi_lib=efi_lib)

    plan.do(
        f"check that these tools are present{where}: {' '.join(tools)}; and GRUB's "
        f"modules for {firmware}",
        check,
    )
    if az.pacman_conf is not None:
        given = az.pacman_conf
        plan.do(
            f"check {given} (azure.pacman_conf) and copy it to {p.pacman_conf}",
            lambda: _copy_pacman_conf(given, p),
        )
    else:
        mirror = conf.repository_server(az)  # azure.mirror, or the archive's snapshot
        plan.do(
            f"check that the mirror answers ({conf.mirror_probe_url(mirror)})",
            lambda: _probe_mirror(mirror),
        )
        _keyring(plan, p)
        text = conf.pacman_conf(mirror, str(p.gnupg), cache)
        cached = f" and the package cache {cache}" if cache is not None else ""
        plan.do(
            f"write {p.pacman_conf} for {mirror}, with the keyring {p.gnupg}{cached}",
            lambda: write_if_changed(p.pacman_conf, text.encode()),
        )
    image_ids = ids.image_ids(settings)
    source = "azure.seed" if az.seed is not None else "a digest of the image's settings"
    plan.do(
        f"write {p.ids}: every ID of the image ({', '.join(image_ids.identifiers())}), "
        f"derived from the seed ({source})",
        lambda: record_ids(p, image_ids),
    )

    def record() -> None:
        _json(p.preflight, {"tools": sorted(tools), "pacman_conf": str(p.pacman_conf)})
        log.info("tools present; pacman.conf %s; root UUID %s", p.pacman_conf, root_uuid(p))

    plan.do(f"write {p.preflight}", record)
    if az.builder == "container":
        plan.cleanup.append(Do("leave the build environment", environment.stack.close))
    return plan


def _copy_pacman_conf(given: Path, p: Paths) -> None:
    if not given.is_file():
        raise UserError(
            f"azure.pacman_conf: {given} does not exist",
            "point it at an existing pacman.conf, or remove it to use azure.mirror",
        )
    text = given.read_text(encoding="utf-8", errors="replace")
    if "[options]" not in text:
        raise UserError(
            f"azure.pacman_conf: {given} has no [options] section",
            "give a complete pacman.conf (see pacman.conf(5))",
        )
    write_if_changed(p.pacman_conf, text.encode())


def _keyring(plan: Plan, p: Paths) -> None:
    """The ops that make a pacman keyring for the build, in workdir, from the host's (or the
    build environment's) Arch Linux keyring; none when it is made already."""
    if (p.gnupg / "pubring.gpg").exists() or (p.gnupg / "pubring.kbx").exists():
        return
    staged = staging(p.gnupg)

    def start() -> None:
        clear_leftovers(p.gnupg)
        staged.mkdir(mode=0o700, parents=True)

    plan.do(f"make the empty directory {staged} (mode 0700)", start)
    for argv in pacman.keyring_argvs(staged):
        plan.run(argv, timeout=600)
    plan.run(pacman.stop_gpg_agent_argv(staged))
    plan.do(f"put {staged} in place of {p.gnupg}", lambda: put_in_place(staged, p.gnupg))

    def discard() -> None:
        if staged.exists():
            stop_processes_in(staged)  # its gpg-agent
            remove_path(staged)

    plan.cleanup.append(
        Do(f"if {staged} is still there (unfinished): stop its gpg-agent, remove it", discard)
    )
