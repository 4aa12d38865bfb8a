"""A serial console as a person would read it, and a boot's progress while it goes.

QEMU writes the guest's serial console to a file. GRUB and other full-screen programs draw
on it with cursor moves and escape sequences, so the raw text reads badly in a log or an
error: `console_lines` turns it into the lines a screen would show, `console_tail` quotes
the last of them, and `BootProgress` shows the seconds so far and the last line.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from typing import TextIO

from archkernel.log import log

TAIL_LINES = 20
# A console line longer than this is cut in the tail (a line that never ended).
TAIL_WIDTH = 160
# Without a terminal, how often (seconds) a boot in progress says so in the log.
PROGRESS_EVERY = 10.0

# CSI sequences (cursor moves, colours) and charset selections GRUB and consoles emit.
_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>78]")
# What starts a new line on the screen: a cursor position (`ESC[row;colH`, `ESC[H`, also
# `f`), a move to a row (`ESC[rowd`) or a clear of the screen (`ESC[J`, `ESC[2J`).
_NEW_LINE = re.compile(r"\x1b\[(?:([0-9]*)(?:;[0-9]*)?[Hf]|([0-9]*)d|[0-3]?J)")


def clean_console(text: str) -> str:
    """Console output without terminal escape sequences and carriage returns (what the
    marker is looked for in: text split by escape sequences joins up again)."""
    return _ESCAPES.sub("", text).replace("\r", "")


def _visible(piece: str) -> str:
    """One line of console output as it ends up on the screen: escape sequences removed,
    the text after its last carriage return (a line rewritten in place), no trailing
    blanks, cut to TAIL_WIDTH."""
    parts = [p for p in _ESCAPES.sub("", piece).split("\r") if p.strip()]
    line = parts[-1].rstrip() if parts else ""
    return line if len(line) <= TAIL_WIDTH else line[: TAIL_WIDTH - 3] + "..."


def console_lines(text: str) -> list[str]:
    """The meaningful lines of console output, in order.

    A full-screen program (GRUB's menu) draws with cursor moves rather than newlines, so
    each cursor position or screen clear starts a line; text written again at the row of
    the line before it replaces that line (GRUB's countdown); lines without a letter or
    digit (blank rows, the menu's frame) are left out.
    """
    lines: list[str] = []
    last_row: int | None = None  # the screen row of lines[-1], when known
    pos = 0
    row: int | None = None
    for match in [*_NEW_LINE.finditer(text), None]:
        end = match.start() if match is not None else len(text)
        for n, piece in enumerate(text[pos:end].split("\n")):
            here = row if n == 0 else None  # after a newline the row is not known
            line = _visible(piece)
            if not any(c.isalnum() for c in line):
                continue
            if here is not None and here == last_row:
                lines[-1] = line
            else:
                lines.append(line)
            last_row = here
        if match is None:
            break
        pos = match.end()
        number = match.group(1) if match.group(1) is not None else match.group(2)
        if number is None:  # a clear: what follows is a new screen
            row = last_row = None
        else:
            row = int(number or 1)
    return lines


def console_tail(text: str, lines: int = TAIL_LINES) -> str:
    """The last `lines` meaningful lines of console output (`console_lines`)."""
    return "\n".join(console_lines(text)[-lines:])


def last_console_line(text: str) -> str:
    """The console's last meaningful line (empty if none): looks at the end of `text` only."""
    window = text[-8192:]
    if len(window) < len(text):
        # Cut at a line or escape boundary, not inside an escape sequence.
        cut = min((i for i in (window.find("\n"), window.find("\x1b")) if i >= 0), default=0)
        window = window[cut:]
    found = console_lines(window)
    return found[-1].strip() if found else ""


def _log_stream() -> TextIO | None:
    """The stream archkernel's log is written to (None if it has no stream handler)."""
    for handler in log.handlers:
        if isinstance(handler, logging.StreamHandler):
            return handler.stream  # type: ignore[no-any-return]
    return None


def _is_terminal(stream: TextIO | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):
        return False


class BootProgress:
    """How a boot is going while it goes: the seconds since it started and the console's
    last line. On a terminal that is one line rewritten in place (erased when the boot
    ends); in a plain log (journal, CI) a line every `every` seconds. Nothing when the log
    shows only warnings (-q).
    """

    def __init__(
        self,
        what: str,
        *,
        stream: TextIO | None = None,
        every: float = PROGRESS_EVERY,
        width: int | None = None,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.what = what
        self.stream = stream if stream is not None else _log_stream()
        self.terminal = _is_terminal(self.stream)
        self.enabled = log.isEnabledFor(logging.INFO)
        self.every = every
        self.width = width
        self.say = say if say is not None else (lambda line: log.info("%s", line))
        self._due = every
        self._shown = ""

    def line(self, elapsed: float, console: str) -> str:
        """The progress line for `elapsed` seconds and the console output so far."""
        last = last_console_line(console)
        told = f"console: {last}" if last else "nothing on the console yet"
        return f"{self.what}: {elapsed:.0f}s, {told}"

    def _columns(self) -> int:
        if self.width is not None:
            return self.width
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, OSError, ValueError):
            columns = 0
        return columns if columns > 0 else 80  # a pseudo-terminal may say 0

    def update(self, elapsed: float, console: str) -> None:
        """Show the progress after `elapsed` seconds, `console` being the output so far."""
        if not self.enabled:
            return
        if self.terminal:
            assert self.stream is not None
            shown = self.line(elapsed, console)[: max(self._columns() - 1, 20)]
            if shown != self._shown:
                # Back to the start of the line, erase it, write the new one.
                self.stream.write(f"\r\x1b[K{shown}")
                self.stream.flush()
                self._shown = shown
        elif elapsed >= self._due:
            self.say(self.line(elapsed, console))
            self._due = (elapsed // self.every + 1) * self.every

    def close(self) -> None:
        """Erase the status line (on a terminal), so that the next log line starts clean."""
        if self.terminal and self._shown:
            assert self.stream is not None
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = ""
