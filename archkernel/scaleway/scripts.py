"""The shell scripts of the two initrds: the new /init, and the shutdown script's last line.

The new /init loads the Arch kernel's modules and hands over to the provider's init; the
shutdown initrd's script (in /run/initramfs) must end with `kexec -e` so that
`systemctl kexec` boots the loaded kernel. Both are text in, text out.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from archkernel.errors import UserError

MODULE_DIR = "archkernel/modules"  # inside the initrd; a directory the provider never has
# A final shell, as old shutdown scripts end: `sh`, `exec /bin/sh`, `busybox sh`,
# `exec setsid cttyhack sh` (busybox's way of giving the shell a controlling tty) ...
SHELL_ENDINGS = re.compile(
    r"^\s*(exec\s+)?(setsid\s+)?(cttyhack\s+)?(/usr)?(/s?bin/)?(ba|busybox\s+|a)?sh(\s+-[a-z]+)*\s*$"
)


def init_script(
    modules: Sequence[str], version: str, params: Mapping[str, Sequence[str]] | None = None
) -> str:
    """The new /init: busybox applets, the modules in order, then the provider's init.

    It sources /init.scw so the provider's script keeps running as PID 1. `modules` are
    module file paths; a name that is not a module name (letters, digits, '_', '-') or a
    version with control characters is refused, and every value is shell-quoted.
    `params` gives a module's `insmod` words by module name (`{"nbd": ["nbds_max=3"]}`):
    busybox insmod reads no parameters from the command line. Should the kernel refuse
    them, the module is loaded once more without them (its defaults beat no network).
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
        words = list((params or {}).get(name, ()))
        for word in words:
            if not word.isprintable():
                raise UserError(
                    f"parameter {word!r} of module {name} has control characters",
                    "correct it in scaleway.module_options or on the kernel command line",
                )
        failed = shlex.quote(f"archkernel: loading {name} failed")
        if not words:
            lines.append(f"echo {shlex.quote(f'archkernel: loading {name}')}")
            lines.append(f"insmod {module} || echo {failed}")
            continue
        shown = " ".join(words)
        args = " ".join(shlex.quote(w) for w in words)
        retry = shlex.quote(f"archkernel: loading {name} with {shown} failed; again without")
        lines.append(f"echo {shlex.quote(f'archkernel: loading {name} with {shown}')}")
        lines.append(
            f"insmod {module} {args} || {{ echo {retry}; insmod {module} || echo {failed}; }}"
        )
    lines += ["echo 'archkernel: starting the provider init'", ". /init.scw", ""]
    return "\n".join(lines)


_KEXEC_E = re.compile(r"(^|[\s/;(])kexec\s+-e\b")
# A `case` pattern line whose alternatives include kexec: `kexec)`, `"kexec")`, `a|kexec)`.
_KEXEC_CASE = re.compile(
    r"^\s*\(?\s*(?:[\w\"'*-]+\s*\|\s*)*[\"']?kexec[\"']?\s*(?:\|[^)]*)?\)(.*)$"
)


@dataclass(frozen=True)
class Shutdown:
    """What the shutdown script does for `systemctl kexec`, and the script to write.

    `kind`: `branch` (a `kexec)` case branch runs `kexec -e`, as the provider's scripts
    since v3.12.4 do), `trailing` (its last command is `kexec -e`), `elsewhere` (a
    `kexec -e` on another line), or `patched` (its last command, a plain shell as in
    v3.12.3, becomes `kexec -e`: then `patched` holds the new text).
    """

    kind: str
    line: int  # 1-based line of the kexec -e found, or of the replaced shell
    found: str  # that line's command
    patched: str | None = None

    def describe(self) -> str:
        if self.kind == "branch":
            return f"its `kexec)` branch runs kexec -e (line {self.line}); left as it is"
        if self.kind == "trailing":
            return "it already ends with kexec -e; left as it is"
        if self.kind == "elsewhere":
            return f"it runs kexec -e on line {self.line} ({self.found!r}); left as it is"
        return f"its last command {self.found!r} (line {self.line}) replaced with `kexec -e`"


def examine_shutdown(text: str) -> Shutdown:
    """What the shutdown script does to kexec, patching its final shell if it does not.

    A script that neither runs `kexec -e` nor ends with a plain shell is an error
    (nothing to guess).
    """
    lines = text.rstrip("\n").split("\n")
    commands = [
        (i, ln) for i, ln in enumerate(lines) if ln.strip() and not ln.lstrip().startswith("#")
    ]
    in_branch = False
    for i, ln in commands:
        m = _KEXEC_CASE.match(ln)
        if m:
            in_branch, ln = True, m.group(1)
        if in_branch and _KEXEC_E.search(ln):
            return Shutdown("branch", i + 1, lines[i].strip())
        if in_branch and (";;" in ln or ln.strip() == "esac"):
            in_branch = False
    kexecs = [(i, ln) for i, ln in commands if _KEXEC_E.search(ln)]
    if kexecs and kexecs[-1][0] == commands[-1][0]:
        return Shutdown("trailing", kexecs[-1][0] + 1, commands[-1][1].strip())
    if kexecs:
        return Shutdown("elsewhere", kexecs[0][0] + 1, kexecs[0][1].strip())
    if commands and SHELL_ENDINGS.match(commands[-1][1]):
        index = commands[-1][0]
        indent = lines[index][: len(lines[index]) - len(lines[index].lstrip())]
        found = lines[index].strip()
        lines[index] = f"{indent}kexec -e"
        return Shutdown("patched", index + 1, found, "\n".join(lines) + "\n")
    last = last_command(text)
    raise UserError(
        f"the shutdown script does not end with a shell or `kexec -e` (it ends with {last!r})",
        "check /run/initramfs/shutdown by hand; a plain shell last line is what we replace",
    )


def patch_shutdown(text: str) -> str | None:
    """The shutdown script made to end with `kexec -e`, or None when it runs it already."""
    return examine_shutdown(text).patched


def last_command(text: str) -> str:
    """The script's last line that is not blank or a comment (for a dry run to show)."""
    commands = [
        ln.strip()
        for ln in text.rstrip("\n").split("\n")
        if ln.strip() and not ln.lstrip().startswith("#")
    ]
    return commands[-1] if commands else "(empty)"
