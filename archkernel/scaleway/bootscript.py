"""The provider's U-Boot bootscript: which initrd it has `bootm` boot.

The bootscript is a U-Boot legacy image (type script) holding shell-like text; the initrd
to patch is the file of the `tftp` load whose address `bootm`/`bootz` passes as initrd.
"""

from __future__ import annotations

import re
from pathlib import Path

from archkernel.errors import UserError


def _script_commands(text: str) -> list[list[str]]:
    """U-Boot script commands as word lists: lines, `;` separators, comments dropped."""
    import shlex  # only when a bootscript is parsed, not on every boot

    commands = []
    for line in text.replace("\r", "\n").splitlines():
        if line.lstrip().startswith("#"):
            continue
        for part in re.split(r";(?=(?:[^'\"]|'[^']*'|\"[^\"]*\")*$)", line):
            try:
                words = shlex.split(part, comments=False)
            except ValueError:
                words = part.split()
            if words:
                commands.append(words)
    return commands


def _expand(word: str, env: dict[str, str]) -> str:
    """`word` with the script's own variables expanded.

    Variables the script does not set (U-Boot's `${ramdisk_addr_r}` ...) stay as written:
    they still tell two load addresses apart, where expanding them to nothing would make
    every address equal.
    """

    def value(m: re.Match[str]) -> str:
        return env.get(m.group(1) or m.group(2), m.group(0))

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, word)


def _same_address(a: str, b: str) -> bool:
    try:
        return int(a, 16) == int(b, 16)
    except ValueError:
        return a.strip().lower() == b.strip().lower()


def initrd_from_bootscript(text: str, *, source: str = "the bootscript") -> str:
    """The initrd path the bootscript fetches by TFTP.

    Picks the `tftp`/`tftpboot` whose load address `bootm`/`bootz` uses as the initrd; if
    the script boots differently, the one load whose file name says initrd. Variables set
    with `setenv` are expanded; whitespace and tabs may vary.
    """
    env: dict[str, str] = {}
    loads: list[tuple[str | None, str]] = []
    initrd_addr: str | None = None
    for words in _script_commands(text):
        cmd, args = words[0], [_expand(w, env) for w in words[1:]]
        if cmd == "setenv" and args:
            env[args[0]] = " ".join(args[1:])
        elif cmd == "env" and len(args) >= 2 and args[0] == "set":
            env[args[1]] = " ".join(args[2:])
        elif cmd in ("tftp", "tftpboot") and args:
            address, name = (args[0], args[1]) if len(args) >= 2 else (None, args[0])
            if ":" in name and re.match(r"^\d+\.\d+\.\d+\.\d+:", name):
                name = name.split(":", 1)[1]
            loads.append((address, name))
        elif cmd in ("bootm", "bootz", "booti") and len(args) >= 2 and args[1] != "-":
            initrd_addr = args[1].split(":", 1)[0]
    chosen: list[str] = []
    if initrd_addr is not None:
        chosen = [n for a, n in loads if a is not None and _same_address(a, initrd_addr)]
    if not chosen:
        chosen = [n for _, n in loads if re.search(r"initrd|initramfs", n, re.IGNORECASE)]
    if not chosen:
        names = ", ".join(n for _, n in loads) or "no tftp command at all"
        raise UserError(
            f"{source} names no initrd to fetch (it loads: {names})",
            "check the server's bootscript; set scaleway.bootscript if it has another name",
        )
    name = chosen[-1]
    if name.startswith("/") or ".." in name.split("/") or not name.strip():
        raise UserError(
            f"{source} names an unsafe initrd path {name!r}",
            "the path must be relative and must not contain '..'",
        )
    return name


def initrd_from_image(data: bytes, *, source: str) -> str:
    """The initrd path named by the bootscript image `data` (a U-Boot script uImage)."""
    from archkernel.formats import uimage

    _, payload = uimage.parse(data, expect_type=uimage.SCRIPT, source=source)
    return initrd_from_bootscript(uimage.script_text(payload, source), source=source)


def bootscript_initrd(path: Path) -> str:
    """The initrd path named by the bootscript image at `path`."""
    return initrd_from_image(path.read_bytes(), source=f"bootscript {path.name}")
