"""One `run()` for every external command, and the host-tool checks built on it.

Where a command runs can be redirected: inside `wrapping(wrapper)`, run() hands every
command to `wrapper.wrap()` just before starting it, and runs what comes back. That is the
whole hook; `archkernel.azure.buildenv` uses it to run the Arch tools of the Azure build inside a
bootstrap build environment while the code that calls run() stays as it is. The wrapper
lives in a context variable, so it applies to the current thread (or task) only and ends
with its `with` block, whatever ends the block.

A command never outlives the run that started it:
- It starts as the leader of its own process group, so everything it starts can be ended
  at once: run() ends the group when the command times out, when anything interrupts the
  wait (Ctrl-C: SIGINT to the group, then SIGKILL after `INTERRUPT_GRACE`), never
  leaving a pacman behind its killed pacstrap. Its stdin is /dev/null unless run() feeds
  it, so a command in the background group never stops to read the terminal.
- It gets SIGKILL when the thread that started it dies (`PR_SET_PDEATHSIG`): run() waits
  for the command in the calling thread, so that is when the whole process dies, SIGKILL
  included.
- Its environment names the run that started it (`RUN_VARIABLE`: our pid and start
  time), and so does everything it starts. Before its first command, a process ends the
  processes whose run is gone (`archkernel.host.processes.stop_orphans`): what a killed
  run's commands had started and PR_SET_PDEATHSIG does not reach.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

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
    "busybox": ("busybox", "busybox-static"),
    "tftp": ("tftp-hpa", "tftp-hpa"),
    "gpg": ("gnupg", "gpg"),
    "gpgv": ("gnupg", "gpgv"),
    "gpgconf": ("gnupg", "gpgconf"),
    "systemd-analyze": ("systemd", "systemd"),
    "unshare": ("util-linux", "util-linux"),
    "chroot": ("coreutils", "coreutils"),
    "docker": ("docker", "docker.io"),
    "podman": ("podman", "podman"),
    # the provisioning boot test (archkernel.azure.fabric)
    "ip": ("iproute2", "iproute2"),
    "dnsmasq": ("dnsmasq", "dnsmasq-base"),
    "genisoimage": ("cdrkit (AUR)", "genisoimage"),
    "ssh": ("openssh", "openssh-client"),
    "ssh-keygen": ("openssh", "openssh-client"),
}

# What a child sees of our environment: enough to run, nothing that changes tools' output.
_KEEP_ENV = ("PATH", "TERM", "SOURCE_DATE_EPOCH", "TMPDIR", "HOME")
# Set in every command's environment to `run_identity()`; see the module's docstring.
RUN_VARIABLE = "ARCHKERNEL_RUN"
# After Ctrl-C, how long a command gets to end on SIGINT before its group gets SIGKILL.
INTERRUPT_GRACE = 3.0
_PR_SET_PDEATHSIG = 1


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


def proc_stat(pid: int) -> list[bytes]:
    """The fields of /proc/PID/stat after the command name (field 3, the state, first):
    the name is in parentheses and may hold spaces. Empty if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return []
    return stat.rsplit(b")", 1)[-1].split()


def process_identity(pid: int) -> str | None:
    """`PID:START` (START: when it started, in clock ticks since boot), which no later
    process with the same pid has; None if there is no such process."""
    fields = proc_stat(pid)  # START is field 22
    return f"{pid}:{int(fields[19])}" if len(fields) > 19 else None


_identity: str | None = None


def run_identity() -> str:
    """This process's `process_identity`: what its commands carry in `RUN_VARIABLE`."""
    global _identity
    if _identity is None or not _identity.startswith(f"{os.getpid()}:"):  # forked since
        _identity = process_identity(os.getpid()) or f"{os.getpid()}:0"
    return _identity


_libc: Any = None  # ctypes' libc, loaded by the first command (ctypes is not cheap to import)


def _dies_with(parent: int) -> Callable[[], None]:
    """What the child runs between fork and exec: SIGKILL when its parent thread dies.

    Only a system call and a pid comparison: in a forked child of a threaded process,
    taking a lock could block for ever."""
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
    prctl = _libc.prctl

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: no signal would come
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


_cleaned = threading.Lock()
_orphans_stopped = False


def _stop_what_killed_runs_left() -> None:
    """Once per process, before its first command: `processes.stop_orphans`."""
    global _orphans_stopped
    with _cleaned:
        if _orphans_stopped:
            return
        _orphans_stopped = True
        # processes (through mounts) imports this module: imported when first used.
        from archkernel.host.processes import stop_orphans

        stop_orphans()


def _exited(proc: subprocess.Popen[bytes]) -> bool:
    """Whether the command has exited; it stays a zombie (not reaped), so its pid, which is
    its group's id, cannot be reused while we signal the group."""
    if proc.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _end_group(proc: subprocess.Popen[bytes], first: signal.Signals, grace: float) -> None:
    """End the command and everything in its process group: `first`, up to `grace`
    seconds for the command to exit, then SIGKILL to what is left; wait for it."""
    try:
        if first != signal.SIGKILL:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, first)
            deadline = time.monotonic() + grace
            while not _exited(proc) and time.monotonic() < deadline:
                time.sleep(0.02)
    finally:
        # Also after a second Ctrl-C during the grace period.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# Terminal control sequences: CSI (ESC [ ... final byte), OSC (ESC ] ... BEL or ESC \) and
# the two-byte escapes. Tools write some even when their output is not a terminal (pacman
# shows the cursor again when it is interrupted: ESC [ ? 25 h).
_CONTROLS = re.compile(
    rb"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b\n]*(?:\x07|\x1b\\)?|[()][0-9A-Za-z]|[ -/]*[0-~])"
)
_COPY_CHUNK = 64 * 1024


def strip_controls(data: bytes) -> bytes:
    """`data` without terminal control sequences (whole lines: a sequence has no newline)."""
    return _CONTROLS.sub(b"", data) if b"\x1b" in data else data


class _PlainCopy:
    """Copies a command's stdout to ours without terminal control sequences, for when ours
    is not a terminal (a log file): line by line, through a pipe and a thread."""

    def __init__(self) -> None:
        self.read, self.write = os.pipe()
        self.thread = threading.Thread(target=self._copy, name="plain-output", daemon=True)

    def start(self) -> None:
        """After the command started (or failed to): only the command holds the write end."""
        os.close(self.write)
        self.thread.start()

    def finish(self) -> None:
        """Wait for the copy; something the command left running may keep the pipe open,
        so not for ever."""
        self.thread.join(2.0)

    def _copy(self) -> None:
        pending, broken = b"", False
        with open(self.read, "rb", buffering=0) as source:
            while chunk := source.read(_COPY_CHUNK):
                pending += chunk
                cut = pending.rfind(b"\n") + 1
                if not cut and len(pending) > _COPY_CHUNK:  # a very long line: pass it on
                    cut = len(pending)
                if cut:
                    broken = broken or not _write_all(strip_controls(pending[:cut]))
                    pending = pending[cut:]
            if pending and not broken:
                _write_all(strip_controls(pending))


def _write_all(data: bytes) -> bool:
    """Write `data` to our stdout; False once it is gone (a closed pipe): the rest is
    read and dropped so the command never blocks on a full pipe."""
    try:
        while data:
            data = data[os.write(1, data) :]
    except OSError:
        return False
    return True


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
    when `capture` is true, otherwise it goes to ours (without terminal control sequences
    when ours is not a terminal). Output is decoded as UTF-8.
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
    _stop_what_killed_runs_left()
    plain = _PlainCopy() if not capture and stdout_file is None and not os.isatty(1) else None
    try:
        proc = subprocess.Popen(
            command.argv,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else plain.write if plain else stdout_file,
            stderr=subprocess.PIPE,
            # Not in `command.env`: where a command runs is not changed by it.
            env={**command.env, RUN_VARIABLE: run_identity()},
            cwd=command.cwd,
            process_group=0,
            preexec_fn=_dies_with(os.getpid()),
        )
    except FileNotFoundError as exc:
        tool = Path(command.argv[0]).name
        raise UserError(f"command not found: {command.argv[0]}", package_hint(tool)) from exc
    except PermissionError as exc:
        raise UserError(
            f"cannot execute {command.argv[0]}: permission denied",
            "check the file's mode and owner",
        ) from exc
    finally:
        if plain is not None:
            plain.start()
    with proc:  # its pipes closed on any exit
        try:
            stdout, stderr = proc.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            _end_group(proc, signal.SIGKILL, 0)
            raise UserError(
                f"{shown} did not finish within {timeout:g}s",
                "check that the tool is not waiting for input or a network peer",
            ) from exc
        except KeyboardInterrupt:
            _end_group(proc, signal.SIGINT, INTERRUPT_GRACE)
            raise
        except BaseException:
            _end_group(proc, signal.SIGKILL, 0)
            raise
        finally:
            if plain is not None:
                plain.finish()
    out = stdout.decode("utf-8", "replace") if stdout is not None else ""
    err = stderr.decode("utf-8", "replace") if stderr is not None else ""
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
