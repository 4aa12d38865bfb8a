"""One `run()` for every external command, and the host-tool checks built on it.

Where a command runs can be redirected: inside `wrapping(wrapper)`, run() hands every
command to `wrapper.wrap()` just before starting it, and runs what comes back. That is the
whole hook; `archkernel.azure.buildenv` uses it to run the Arch tools of the Azure build inside a
bootstrap build environment while the code that calls run() stays as it is. The wrapper
lives in a context variable, so it applies to the current thread (or task) only and ends
with its `with` block, whatever ends the block.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

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
    "mkfs.fat": ("dosfstools", "dosfstools"),
    "fsck.fat": ("dosfstools", "dosfstools"),
    "mdir": ("mtools", "mtools"),
    "useradd": ("shadow", "passwd"),
    "cp": ("coreutils", "coreutils"),
    "debootstrap": ("debootstrap", "debootstrap"),
    "grub-bios-setup": ("grub", "grub-pc-bin and grub2-common"),
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
    "gpgv": ("gnupg", "gpgv"),
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


@dataclass(frozen=True)
class Command:
    """A command as run() is about to start it, for a `CommandWrapper` to rewrite."""

    argv: list[str]
    env: dict[str, str]  # the child's whole environment (`minimal_env` plus extras)
    cwd: str | None  # directory to start it in (a wrapper that moves it elsewhere clears it)
    has_input: bool  # run() feeds it `stdin` (a container runtime must keep stdin open)
    where: str | None = None  # where it runs, for logs and errors: None is the host


class CommandWrapper(Protocol):
    """Decides where commands run; see `wrapping`."""

    def wrap(self, command: Command) -> Command:
        """The command to start instead (`command` itself to run it on the host).

        May raise UserError, e.g. when the tool is missing where it would run."""
        ...

    def which(self, tool: str) -> str | None:
        """Where `tool` would be found if run() ran it now, or None if it would not be."""
        ...


_wrapper: ContextVar[CommandWrapper | None] = ContextVar("archkernel_run_wrapper", default=None)


@contextlib.contextmanager
def wrapping(wrapper: CommandWrapper) -> Iterator[None]:
    """Let `wrapper` rewrite every command run() starts in this block (nested: innermost)."""
    token = _wrapper.set(wrapper)
    try:
        yield
    finally:
        _wrapper.reset(token)


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
    command = Command(
        args, minimal_env(env), os.fspath(cwd) if cwd is not None else None, stdin is not None
    )
    wrapper = _wrapper.get()
    if wrapper is not None:
        command = wrapper.wrap(command)
    # Logs and errors show the command as the caller wrote it, and where it ran.
    shown = render(args) if command.where is None else f"{render(args)} (in {command.where})"
    log.debug("+ %s", shown)
    if command.argv != args:
        log.debug("  as %s", render(command.argv))
    if isinstance(stdin, str):
        stdin = stdin.encode()
    try:
        proc = subprocess.run(
            command.argv,
            input=stdin,
            stdout=subprocess.PIPE if capture else stdout_file,
            stderr=subprocess.PIPE,
            env=command.env,
            cwd=command.cwd,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        tool = Path(command.argv[0]).name
        raise UserError(f"command not found: {command.argv[0]}", package_hint(tool)) from exc
    except PermissionError as exc:
        raise UserError(
            f"cannot execute {command.argv[0]}: permission denied",
            "check the file's mode and owner",
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise UserError(
            f"{shown} did not finish within {timeout:g}s",
            "check that the tool is not waiting for input or a network peer",
        ) from exc
    out = proc.stdout.decode("utf-8", "replace") if proc.stdout is not None else ""
    err = proc.stderr.decode("utf-8", "replace") if proc.stderr is not None else ""
    result = subprocess.CompletedProcess(args, proc.returncode, out, err)
    if err and not check:
        log.debug("%s", err.rstrip())
    if check and proc.returncode != 0:
        raise command_error(args, proc.returncode, err, where=command.where)
    return result


def command_error(
    args: Sequence[str], code: int, stderr: str | bytes | None, *, where: str | None = None
) -> UserError:
    """The UserError for a command that exited non-zero or was killed (`where`: not on the
    host but in that build environment)."""
    tail = _tail(stderr)
    shown = render(args) if where is None else f"{render(args)} (in {where})"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        message = f"{shown} was killed by {name}"
    else:
        message = f"{shown} failed with exit code {code}"
    if tail:
        message += f"; its last output:\n{tail}"
    return UserError(message, "see the command's output above; run with -v for every command")


def which(tool: str) -> str | None:
    """Where run() would find `tool` now: on PATH, or where the active wrapper runs it."""
    wrapper = _wrapper.get()
    if wrapper is not None:
        return wrapper.which(tool)
    return shutil.which(tool, path=minimal_env()["PATH"])


def missing_tools(tools: Iterable[str]) -> list[str]:
    """The tools of `tools` that run() would not find (see `which`), in order."""
    return [t for t in dict.fromkeys(tools) if which(t) is None]


def check_tools(tools: Iterable[str], purpose: str) -> None:
    """Raise one UserError listing every missing tool with the packages that provide it."""
    missing = missing_tools(tools)
    if not missing:
        return
    lines = [f"  {t}: {package_hint(t)}" for t in missing]
    raise UserError(
        # The names on the first line: it is the line an error report shows first.
        f"{purpose} needs {len(missing)} missing tool(s): {', '.join(missing)}\n"
        + "\n".join(lines),
        "install the packages above and run again; finished steps are kept",
    )
