"""The shell scripts of the two initrds: the new /init, and the shutdown script's last line.

The new /init loads the Arch kernel's modules and hands over to the provider's init; the
shutdown initrd's script (in /run/initramfs) must end with `kexec -e` so that
`systemctl kexec` boots the loaded kernel. Both are text in, text out.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from archkernel.errors import UserError

MODULE_DIR = "archkernel/modules"  # inside the initrd; a directory the provider never has
# A final shell, as old shutdown scripts end: `sh`, `exec /bin/sh`, `busybox sh`,
# `exec setsid cttyhack sh` (busybox's way of giving the shell a controlling tty) ...
SHELL_ENDINGS = re.compile(
    r"^\s*(exec\s+)?(setsid\s+)?(cttyhack\s+)?(/usr)?(/s?bin/)?(ba|busybox\s+|a)?sh(\s+-[a-z]+)*\s*$"
)


def init_script(modules: Sequence[str], version: str) -> str:
    """The new /init: busybox applets, the modules in order, then the provider's init.

    It sources /init.scw so the provider's script keeps running as PID 1. `modules` are
    module file paths; a name that is not a module name (letters, digits, '_', '-') or a
    version with control characters is refused, and every value is shell-quoted.
    """
    import shlex  # only when the initrd is rebuilt, not on every boot

    from archkernel.formats import kmod

    if not version.isprintable():
        raise UserError(
            f"kernel version {version!r} has control characters",
            "set scaleway.kernel_version to the name of a directory in /usr/lib/modules",
        )
    names = [kmod.module_name(relpath) for relpath in modules]
    for relpath, name in zip(modules, names, strict=True):
        if not kmod.is_module_name(name):
            raise UserError(
                f"module file {relpath!r} does not name a module (its name is {name!r})",
                "module names are letters, digits, '_' and '-'; check the kernel's modules.dep",
            )
    lines = [
        "#!/bin/sh",
        f"# archkernel: load the modules of the Arch kernel {version} the root needs,",
        "# then hand over to the provider's init (sourced, so it stays PID 1).",
        "/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys",
        "/bin/busybox --install -s",
    ]
    for name in names:
        module = shlex.quote(f"/{MODULE_DIR}/{name}.ko")
        loading = shlex.quote(f"archkernel: loading {name}")
        failed = shlex.quote(f"archkernel: loading {name} failed")
        lines.append(f"echo {loading}")
        lines.append(f"insmod {module} || echo {failed}")
    lines += ["echo 'archkernel: starting the provider init'", ". /init.scw", ""]
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
    last = last_command(text)
    raise UserError(
        f"the shutdown script does not end with a shell or `kexec -e` (it ends with {last!r})",
        "check /run/initramfs/shutdown by hand; a plain shell last line is what we replace",
    )


def last_command(text: str) -> str:
    """The script's last line that is not blank or a comment (for a dry run to show)."""
    commands = [
        ln.strip()
        for ln in text.rstrip("\n").split("\n")
        if ln.strip() and not ln.lstrip().startswith("#")
    ]
    return commands[-1] if commands else "(empty)"
