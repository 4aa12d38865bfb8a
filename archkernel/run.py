"""One `run()` for every external command, and the host-tool checks built on it."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from archkernel.errors import UserError
from archkernel.log import log

# tool -> (Arch package, Debian/Ubuntu package)
PACKAGES: dict[str, tuple[str, str]] = {
    "pacman": ("pacman", "pacman-package-manager"),
    "pacstrap": ("arch-install-scripts", "arch-install-scripts"),
    "arch-chroot": ("arch-install-scripts", "arch-install-scripts"),
    "pacman-key": ("pacman", "pacman-package-manager"),
    "repo-add": ("pacman", "pacman-package-manager"),
    "makepkg": ("pacman", "makepkg"),
    "mkimage": ("uboot-tools", "u-boot-tools"),
    "dumpimage": ("uboot-tools", "u-boot-tools"),
    "kexec": ("kexec-tools", "kexec-tools"),
    "systemctl": ("systemd", "systemd"),
    "bsdtar": ("libarchive", "libarchive-tools"),
    "cpio": ("cpio", "cpio"),
    "gzip": ("gzip", "gzip"),
    "zstd": ("zstd", "zstd"),
    "xz": ("xz", "xz-utils"),
    "depmod": ("kmod", "kmod"),
    "modprobe": ("kmod", "kmod"),
    "sfdisk": ("util-linux", "fdisk"),
    "sgdisk": ("gptfdisk", "gdisk"),
    "losetup": ("util-linux", "mount"),
    "partx": ("util-linux", "util-linux"),
    "blkid": ("util-linux", "util-linux"),
    "mount": ("util-linux", "mount"),
    "umount": ("util-linux", "mount"),
    "mkfs.ext4": ("e2fsprogs", "e2fsprogs"),
    "e2fsck": ("e2fsprogs", "e2fsprogs"),
    "debugfs": ("e2fsprogs", "e2fsprogs"),
    "tune2fs": ("e2fsprogs", "e2fsprogs"),
    "mkfs.vfat": ("dosfstools", "dosfstools"),
    "mcopy": ("mtools", "mtools"),
    "mmd": ("mtools", "mtools"),
    "grub-install": ("grub", "grub-pc-bin and grub2-common"),
    "grub-mkimage": ("grub", "grub-pc-bin and grub2-common"),
    "udevadm": ("systemd", "udev"),
    "qemu-img": ("qemu-img", "qemu-utils"),
    "qemu-system-x86_64": ("qemu-system-x86", "qemu-system-x86"),
    "in.tftpd": ("tftp-hpa", "tftpd-hpa"),
    "tftp": ("tftp-hpa", "tftp-hpa"),
    "gpg": ("gnupg", "gpg"),
    "gpgconf": ("gnupg", "gpgconf"),
    "systemd-analyze": ("systemd", "systemd"),
    "unshare": ("util-linux", "util-linux"),
    "chroot": ("coreutils", "coreutils"),
    "docker": ("docker", "docker.io"),
    "podman": ("podman", "podman"),
}

# What a child sees of our environment: enough to run, nothing that changes tools' output.
_KEEP_ENV = ("PATH", "TERM", "SOURCE_DATE_EPOCH", "TMPDIR", "HOME")


def package_hint(tool: str) -> str:
    """Say which packages provide `tool`, for error messages."""
    arch, debian = PACKAGES.get(tool, (None, None))
    if arch is None:
        return f"install the package that provides '{tool}'"
    return f"install '{arch}' on Arch Linux or '{debian}' on Debian/Ubuntu"


def minimal_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment every child process gets: PATH and a fixed C.UTF-8 locale."""
    env = {k: os.environ[k] for k in _KEEP_ENV if k in os.environ}
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env["LANG"] = env["LC_ALL"] = "C.UTF-8"
    if extra:
        env.update(extra)
    return env


def render(argv: Sequence[str | os.PathLike[str]]) -> str:
    """A command as a user could paste it into a shell."""
    return shlex.join(os.fspath(a) for a in argv)


def _tail(text: str | bytes | None, lines: int = 8) -> str:
    if not text:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return "\n".join(f"    {line}" for line in kept)


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    check: bool = True,
    capture: bool = False,
    stdin: bytes | str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
    stdout_file: int | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `argv` (never a shell string) and explain any failure as a UserError.

    stderr is always captured so a failure can quote its last lines; stdout is captured
    when `capture` is true, otherwise it goes to ours. Output is decoded as UTF-8.
    """
    args = [os.fspath(a) for a in argv]
    if not args:
        raise ValueError("run() needs a command")
    log.debug("+ %s", render(args))
    if isinstance(stdin, str):
        stdin = stdin.encode()
    try:
        proc = subprocess.run(
            args,
            input=stdin,
            stdout=subprocess.PIPE if capture else stdout_file,
            stderr=subprocess.PIPE,
            env=minimal_env(env),
            cwd=cwd,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        tool = Path(args[0]).name
        raise UserError(f"command not found: {args[0]}", package_hint(tool)) from exc
    except PermissionError as exc:
        raise UserError(
            f"cannot execute {args[0]}: permission denied", "check the file's mode and owner"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise UserError(
            f"{render(args)} did not finish within {timeout:g}s",
            "check that the tool is not waiting for input or a network peer",
        ) from exc
    out = proc.stdout.decode("utf-8", "replace") if proc.stdout is not None else ""
    err = proc.stderr.decode("utf-8", "replace") if proc.stderr is not None else ""
    result = subprocess.CompletedProcess(args, proc.returncode, out, err)
    if err and not check:
        log.debug("%s", err.rstrip())
    if check and proc.returncode != 0:
        raise command_error(args, proc.returncode, err)
    return result


def command_error(args: Sequence[str], code: int, stderr: str | bytes | None) -> UserError:
    """The UserError for a command that exited non-zero or was killed."""
    tail = _tail(stderr)
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        message = f"{render(args)} was killed by {name}"
    else:
        message = f"{render(args)} failed with exit code {code}"
    if tail:
        message += f"; its last output:\n{tail}"
    return UserError(message, "see the command's output above; run with -v for every command")


def missing_tools(tools: Iterable[str]) -> list[str]:
    """The tools of `tools` that are not on PATH, in order."""
    path = minimal_env()["PATH"]
    return [t for t in dict.fromkeys(tools) if shutil.which(t, path=path) is None]


def check_tools(tools: Iterable[str], purpose: str) -> None:
    """Raise one UserError listing every missing tool with the packages that provide it."""
    missing = missing_tools(tools)
    if not missing:
        return
    lines = [f"  {t}: {package_hint(t)}" for t in missing]
    raise UserError(
        f"{purpose} needs {len(missing)} missing tool(s):\n" + "\n".join(lines),
        "install the packages above and run again; finished steps are kept",
    )
