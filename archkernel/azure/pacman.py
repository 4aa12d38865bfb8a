"""The pacman commands of the Azure build, as argv lists, and what pacman's failures mean.

Nothing here runs a command: the steps put these argv into their plans.
"""

from __future__ import annotations

from pathlib import Path

from archkernel.errors import UserError
from archkernel.host.run import command_error

# Where pacman keeps a root's keyring (a package's hook may make one in the pacstrapped tree).
KEYRING_DIR = "etc/pacman.d/gnupg"
# pacman's log of the installation: when, and the build host's path of the root; no image
# needs it.
LOG_FILE = "var/log/pacman.log"
# The local database: a directory per package, whose `desc` records its install time.
LOCAL_DB = "var/lib/pacman/local"


def pacstrap_argv(pacman_conf: Path, root: Path, packages: list[str]) -> list[str]:
    """The pacstrap command that installs `packages` into `root`: no keyring copied, no
    mirror list copied, and `-c`: the packages go to the cache `pacman_conf` names
    (CacheDir: azure.package_cache, kept between builds), not to one inside `root`."""
    return ["pacstrap", "-C", str(pacman_conf), "-c", "-G", "-M", str(root), *packages]


def installed_argv(root: Path) -> list[str]:
    """The command that lists the packages installed in `root` (`name version` lines)."""
    return ["pacman", "--root", str(root), "-Q"]


def keyring_argvs(gpgdir: Path) -> list[list[str]]:
    """The commands that make a pacman keyring in `gpgdir` with Arch Linux's keys."""
    return [
        ["pacman-key", "--gpgdir", str(gpgdir), "--init"],
        ["pacman-key", "--gpgdir", str(gpgdir), "--populate", "archlinux"],
    ]


def stop_gpg_agent_argv(gpgdir: Path) -> list[str]:
    """The command that stops the gpg-agent of the keyring `gpgdir` (exits 0 when none runs,
    even when `gpgdir` does not exist)."""
    return ["gpgconf", "--homedir", str(gpgdir), "--kill", "all"]


def with_install_date(desc: str, epoch: int) -> str:
    """A local database `desc` file's text with its %INSTALLDATE% set to `epoch`."""
    lines = desc.split("\n")
    for i, line in enumerate(lines[:-1]):
        if line == "%INSTALLDATE%":
            lines[i + 1] = str(epoch)
    return "\n".join(lines)


def pacman_errors(output: str) -> list[str]:
    """pacman's own `error: ...` lines in `output` (what went wrong, in its words), once each."""
    found = [
        line.strip().removeprefix("error: ")
        for line in output.splitlines()
        if line.strip().startswith("error: ")
    ]
    return list(dict.fromkeys(found))


def pacstrap_error(argv: list[str], code: int, stderr: str) -> UserError:
    """The UserError for a failed pacstrap: pacman's reasons on the first line, if it gave any."""
    errors = pacman_errors(stderr)
    if code < 0 or not errors:
        return command_error(argv, code, stderr)
    if any(e.startswith("target not found") for e in errors):
        hint = "check the names in azure.packages and azure.extra_packages (pacman -Sl lists them)"
    else:
        hint = "see pacman's output above; check azure.mirror or azure.pacman_conf"
    return UserError(f"pacstrap could not install the packages: {'; '.join(errors)}", hint)
