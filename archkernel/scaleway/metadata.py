"""The server's metadata, as `scw-metadata` prints it: the tags, for the kill switch.

A server tagged with `scaleway.disable_tag` keeps the provider's kernel: the workflow
refuses to run, so a broken Arch kernel can be escaped from the provider's console.
"""

from __future__ import annotations

import re

from archkernel.errors import UserError

COMMAND = ("scw-metadata",)


def tags_from_metadata(text: str) -> list[str]:
    """Server tags from `scw-metadata` output (`TAGS_<n>=<tag>` lines, n of any length)."""
    tags = []
    for line in text.splitlines():
        m = re.fullmatch(r"TAGS_(\d+)=(.*)", line.strip())
        if m:
            tags.append(m.group(2).strip().strip("'\""))
    return tags


def kill_switch(metadata: str, disable_tag: str) -> UserError | None:
    """The error to stop with when the server carries `disable_tag`, else None."""
    if disable_tag not in tags_from_metadata(metadata):
        return None
    return UserError(
        f"kill switch set: the server has the tag {disable_tag!r}; doing nothing",
        f"remove the tag {disable_tag!r} from the server to boot the Arch kernel again",
    )
