"""The provider's U-Boot bootscript: which initrd it has `bootm` boot.

The bootscript is a U-Boot legacy image (type script) holding shell-like text; the initrd
to patch is the file of the `tftp` load whose address `bootm`/`bootz` passes as initrd.
"""

from __future__ import annotations

import re
from pathlib import Path

from archkernel.errors import UserError
from archkernel.units import KiB, MiB

# A real bootscript is a few hundred bytes (U-Boot's own command buffer holds 1-2 KiB).
# These bound what a hostile or damaged one costs: its length, and the bytes its
# variables expand to in all (`setenv a ${a}${a}` doubles `a` on every line).
MAX_SCRIPT = 64 * KiB
MAX_EXPANDED = 1 * MiB

_VARIABLE = r"\$\{(\w+)\}|\$(\w+)"  # compiled on first use (re caches it)


def _script_commands(text: str) -> list[list[str]]:
    """U-Boot script commands as word lists: lines, `;` separators, comments dropped.

    One pass over the text, as U-Boot's hush reads it: quotes ('...' and "...") group
    words and are removed, a backslash escapes the next character (in double quotes
    only `"` and itself), `;` outside quotes ends a command, `#` at the start of a word
    starts a comment. A quote left open ends with its line.
    """
    commands: list[list[str]] = []
    for line in text.replace("\r", "\n").split("\n"):
        words: list[str] = []
        word: list[str] = []
        in_word = False  # '' is a word too
        quote = ""
        i, end = 0, len(line)
        while i < end:
            char = line[i]
            i += 1
            if quote == "'":
                if char == "'":
                    quote = ""
                else:
                    word.append(char)
            elif quote == '"':
                if char == '"':
                    quote = ""
                elif char == "\\" and i < end and line[i] in '"\\':
                    word.append(line[i])
                    i += 1
                else:
                    word.append(char)
            elif char in " \t\f\v;":
                if in_word:
                    words.append("".join(word))
                    word, in_word = [], False
                if char == ";" and words:
                    commands.append(words)
                    words = []
            elif char == "#" and not in_word:
                break
            else:
                in_word = True
                if char in "'\"":
                    quote = char
                elif char == "\\":
                    if i < end:
                        word.append(line[i])
                        i += 1
                else:
                    word.append(char)
        if in_word:
            words.append("".join(word))
        if words:
            commands.append(words)
    return commands


class _Expander:
    """Expands the script's own variables, within MAX_EXPANDED bytes for the whole script."""

    def __init__(self, source: str, budget: int = MAX_EXPANDED) -> None:
        self.env: dict[str, str] = {}
        self.source = source
        self.budget = budget

    def expand(self, word: str) -> str:
        """`word` with the script's own variables expanded.

        Variables the script does not set (U-Boot's `${ramdisk_addr_r}` ...) stay as
        written: they still tell two load addresses apart, where expanding them to
        nothing would make every address equal.
        """
        return re.sub(_VARIABLE, self._value, word) if "$" in word else word

    def _value(self, m: re.Match[str]) -> str:
        value = self.env.get(m.group(1) or m.group(2), m.group(0))
        self.budget -= len(value)
        if self.budget < 0:  # before the caller joins it into anything larger
            raise UserError(
                f"{self.source} expands its variables to more than {MAX_EXPANDED // MiB} MiB",
                "a real bootscript is a few hundred bytes; check what the TFTP server "
                "hands out as the bootscript",
            )
        return value


def _same_address(a: str, b: str) -> bool:
    try:
        return int(a, 16) == int(b, 16)
    except ValueError:
        return a.strip().lower() == b.strip().lower()


def initrd_from_bootscript(text: str, *, source: str = "the bootscript") -> str:
    """The initrd path the bootscript fetches by TFTP.

    Picks the `tftp`/`tftpboot` whose load address `bootm`/`bootz` uses as the initrd; if
    the script boots differently, the one load whose file name says initrd. Variables set
    with `setenv` are expanded; whitespace and tabs may vary. A script longer than
    MAX_SCRIPT, or whose variables expand to more than MAX_EXPANDED, is refused.
    """
    if len(text) > MAX_SCRIPT:
        raise UserError(
            f"{source} is {len(text)} characters long; at most {MAX_SCRIPT // KiB} KiB are read",
            "a real bootscript is a few hundred bytes; check what the TFTP server hands out "
            "as the bootscript",
        )
    expander = _Expander(source)
    env = expander.env
    loads: list[tuple[str | None, str]] = []
    initrd_addr: str | None = None
    for words in _script_commands(text):
        cmd, args = words[0], [expander.expand(w) for w in words[1:]]
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
