"""Enter a build environment and run one command there (the chroot runtime's helper).

    unshare --mount --pid --fork --kill-child --propagation private -- \\
        python3 -I -S exec.py --root ROOT [--bind PATH]... [--ro-bind PATH]... \\
        [--resolv-conf] [--path PATH] [--cwd DIR] -- COMMAND [ARG]...

`archkernel.azure.buildenv` starts this, by path, for every build-environment command. It
runs as process 1 of a new PID namespace in a new, private mount namespace, so everything
it mounts exists for this one command only: when the command ends (or `unshare` is
killed, Ctrl-C included) the kernel ends every process left in the namespace and drops
every mount in it.
Nothing is ever mounted in the host's namespace, and nothing needs cleaning up.

Inside the namespace it mounts, under ROOT: a tmpfs on /run, each shared host path (the
work directory, the temporary directory ...) recursively at the same absolute path (so
paths need no translation, and mounts the host makes there later, like a loop-mounted
image, are seen by the next command), a fresh /proc, the host's /sys and /dev (loop
devices), and the host's /etc/resolv.conf; then chroots into ROOT and execs the command
with PATH set to the environment's (`--path`), the rest of its environment as given.

Standard library only, run with `-I -S`: it must start fast and import nothing of ours.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import sys
from dataclasses import dataclass, field

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000

EXIT_SETUP = 125  # as `docker run`: the environment could not be entered
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]


class SetupError(Exception):
    """The environment could not be entered."""


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    """mount(2), raising SetupError with the target's name."""
    result = _libc.mount(
        source.encode() if source else None,
        target.encode(),
        fstype.encode() if fstype else None,
        flags,
        data.encode() if data else None,
    )
    if result != 0:
        code = ctypes.get_errno()
        raise SetupError(f"cannot mount {source or fstype} on {target}: {os.strerror(code)}")


def target_in(root: str, path: str, *, directory: bool = True) -> str:
    """`root` + `path`, creating what is missing, never through a symlink in the tree
    (an absolute link there would point at the host)."""
    current = root
    parts = [p for p in path.split("/") if p]
    for index, part in enumerate(parts):
        current = os.path.join(current, part)
        last = index == len(parts) - 1
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            if last and not directory:
                os.close(os.open(current, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            else:
                os.mkdir(current, 0o755)
            continue
        if stat.S_ISLNK(st.st_mode):
            raise SetupError(f"{current} is a symbolic link; cannot mount {path} there")
        if not last and not stat.S_ISDIR(st.st_mode):
            raise SetupError(f"{current} is not a directory; cannot mount {path} there")
    return current


def bind(root: str, path: str, *, read_only: bool = False) -> None:
    """Bind `path` with everything mounted below it at the same path under `root`."""
    target = target_in(root, path, directory=os.path.isdir(path))
    mount(path, target, None, MS_BIND | MS_REC)
    if read_only:
        mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY)


def enter(root: str, binds: list[tuple[str, bool]], resolv_conf: bool, cwd: str | None) -> None:
    """Mount what the command needs under `root`, then chroot into it."""
    if os.getpid() != 1:
        # Only as process 1 of a new PID namespace are we in a throw-away mount namespace.
        raise SetupError("must run as `unshare --mount --pid --fork --kill-child ...`")
    mount("tmpfs", target_in(root, "/run"), "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    for path, read_only in binds:
        bind(root, path, read_only=read_only)
    try:
        # A /proc of the new PID namespace: the command sees its own processes only.
        mount("proc", target_in(root, "/proc"), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except SetupError:
        # Refused where the host's /proc is partly hidden (in some containers): use it.
        mount("/proc", target_in(root, "/proc"), None, MS_BIND | MS_REC)
    for api in ("/sys", "/dev"):
        mount(api, target_in(root, api), None, MS_BIND | MS_REC)
    if resolv_conf and os.path.isfile("/etc/resolv.conf"):
        target = os.path.join(root, "etc/resolv.conf")
        # Only onto a plain file: the tree's own link (to systemd-resolved, say) is kept.
        if os.path.isdir(os.path.join(root, "etc")) and not os.path.islink(target):
            bind(root, "/etc/resolv.conf", read_only=True)
    os.chroot(root)
    os.chdir(cwd if cwd and os.path.isdir(cwd) else "/")


@dataclass
class Options:
    """What the command line asks for."""

    root: str = ""
    binds: list[tuple[str, bool]] = field(default_factory=list)  # (path, read-only)
    resolv_conf: bool = False
    path: str | None = None
    cwd: str | None = None
    command: list[str] = field(default_factory=list)


def parse(argv: list[str]) -> Options:
    """--root, the binds in order, --resolv-conf, --path, --cwd, and the command after `--`."""
    opts = Options()
    args = list(argv)
    while args:
        option = args.pop(0)
        if option == "--":
            break
        if option == "--resolv-conf":
            opts.resolv_conf = True
            continue
        if not args:
            raise SetupError(f"{option} needs a value")
        value = args.pop(0)
        if not value.startswith("/"):
            raise SetupError(f"{option} {value}: not an absolute path")
        if option == "--root":
            opts.root = value
        elif option in ("--bind", "--ro-bind"):
            opts.binds.append((value, option == "--ro-bind"))
        elif option == "--path":
            opts.path = value
        elif option == "--cwd":
            opts.cwd = value
        else:
            raise SetupError(f"unknown option {option}")
    opts.command = args
    if not opts.root or not opts.command:
        raise SetupError("usage: exec.py --root ROOT [options] -- COMMAND [ARG]...")
    return opts


def main(argv: list[str]) -> int:
    try:
        opts = parse(argv)
        enter(opts.root, opts.binds, opts.resolv_conf, opts.cwd)
    except (SetupError, OSError) as exc:
        print(f"archkernel build environment: {exc}", file=sys.stderr)
        return EXIT_SETUP
    if opts.path is not None:
        os.environ["PATH"] = opts.path
    command = opts.command
    try:
        os.execvp(command[0], command)  # noqa: S606 (an argv, no shell)
    except OSError as exc:
        print(f"archkernel build environment: cannot run {command[0]}: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND if exc.errno == errno.ENOENT else EXIT_CANNOT_EXECUTE
    return EXIT_CANNOT_EXECUTE  # not reached: execvp returns only by raising


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
