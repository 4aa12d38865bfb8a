"""Step 1 of azure_vhd: the build environment, the tools, pacman.conf and the IDs."""

from __future__ import annotations

import urllib.error
import urllib.request

from archkernel.azure import buildenv
from archkernel.azure import config as conf
from archkernel.azure.workspace import (
    HOST_TOOLS,
    UEFI_TOOLS,
    Paths,
    _json,
    build_environment,
    choose_ids,
    grub_dirs,
    paths,
    root_uuid,
)
from archkernel.errors import UserError
from archkernel.host.files import (
    atomic_path,
    write_if_changed,
)
from archkernel.host.run import check_tools, run
from archkernel.image import grub
from archkernel.log import log
from archkernel.settings import AzureSettings, Settings

# --- step 1 -------------------------------------------------------------------------------


def _probe_mirror(mirror: str, timeout: float = 20.0) -> None:
    url = conf.mirror_probe_url(mirror)
    if not url.startswith(("http://", "https://", "ftp://")):
        return
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (checked scheme)
            response.read(1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(
            f"the mirror {mirror} does not answer ({url}: {reason})",
            "check the network, or set azure.mirror to a reachable mirror, or azure.pacman_conf "
            "to a pacman.conf for a local mirror or cache",
        ) from None


def _init_keyring(p: Paths) -> None:
    """A pacman keyring for the build, in workdir, from the host's Arch Linux keyring."""
    if (p.gnupg / "pubring.gpg").exists() or (p.gnupg / "pubring.kbx").exists():
        return
    with atomic_path(p.gnupg) as tmp:
        tmp.mkdir(mode=0o700)
        try:
            run(["pacman-key", "--gpgdir", tmp, "--init"], timeout=600)
            run(["pacman-key", "--gpgdir", tmp, "--populate", "archlinux"], timeout=600)
        finally:
            run(["gpgconf", "--homedir", tmp, "--kill", "all"], check=False)


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


def step_preflight(settings: Settings) -> None:
    """Step 1: the build environment ready (builder = container), every tool present, the
    pacman.conf ready, the image's IDs chosen."""
    az, p = settings.azure, paths(settings)
    tools = preflight_tools(az)
    buildenv.prepare(az, settings.workdir)  # None with builder = "host"
    with build_environment(settings) as env:
        where = "" if env is None else " (on the host or in the build environment)"
        check_tools(tools, f"azure_vhd{where}")
        bios_lib, efi_lib = grub_dirs(env)
        grub.check_platforms(az.firmware, bios_lib=bios_lib, efi_lib=efi_lib)
        _prepare_pacman_conf(az, p)
    choose_ids(p, az)
    _json(p.preflight, {"tools": sorted(tools), "pacman_conf": str(p.pacman_conf)})
    log.info("tools present; pacman.conf %s; root UUID %s", p.pacman_conf, root_uuid(p))


def _prepare_pacman_conf(az: AzureSettings, p: Paths) -> None:
    p.work.mkdir(parents=True, exist_ok=True)
    if az.pacman_conf is not None:
        if not az.pacman_conf.is_file():
            raise UserError(
                f"azure.pacman_conf: {az.pacman_conf} does not exist",
                "point it at an existing pacman.conf, or remove it to use azure.mirror",
            )
        text = az.pacman_conf.read_text(encoding="utf-8", errors="replace")
        if "[options]" not in text:
            raise UserError(
                f"azure.pacman_conf: {az.pacman_conf} has no [options] section",
                "give a complete pacman.conf (see pacman.conf(5))",
            )
        write_if_changed(p.pacman_conf, text.encode())
    else:
        _probe_mirror(az.mirror)
        _init_keyring(p)
        write_if_changed(p.pacman_conf, conf.pacman_conf(az.mirror, str(p.gnupg)).encode())
