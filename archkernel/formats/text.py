"""Text from a machine we do not trust (a TFTP server, a VM under test) made safe to show.

A message quoted from the network or a VM's agent reaches a log line and the user's
terminal: `clean_text` removes terminal escape sequences whole and turns every other
character that does not print (CR, LF, BEL, C1 controls such as the 8-bit CSI, bidi
overrides) into a space, so the quote can neither move the cursor, rewrite a line, fake
a line of its own nor run on without end.
"""

from __future__ import annotations

import re

MAX_TEXT = 200
# Terminal escape sequences, removed whole: CSI (ESC [ ... final byte), the strings
# OSC, DCS, SOS, PM and APC (ESC ] P X ^ _ ... ended by BEL, ESC \ or the end of the
# text) and the short ones (ESC, intermediate bytes, a final byte).
_ESCAPE = re.compile(
    r"\x1b(?:\[[0-?]*[ -/]*[@-~]?|[\]PX^_][^\x07\x1b]*(?:\x07|\x1b\\)?|[ -/]*[0-~])?"
)


def clean_text(raw: bytes | str, limit: int = MAX_TEXT) -> str:
    """`raw` as one line safe for a log or a terminal.

    Bytes are decoded as UTF-8 (bad bytes become U+FFFD); terminal escape sequences are
    removed whole; every other character that does not print (control characters such as
    CR, LF, BEL and DEL, bidirectional overrides, unusual spaces) becomes a space; runs of
    spaces shrink to one; the result is cut to `limit` characters, ending in "..." when cut.
    """
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    text = _ESCAPE.sub("", text)
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    if len(text) > limit:
        text = text[: limit - 3].rstrip() + "..."
    return text
