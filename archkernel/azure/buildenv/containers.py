"""Containers a killed run left running (docker and podman build environments).

`docker run` is a client: when the build is killed (SIGKILL, or SIGKILL after Ctrl-C's
grace time) the client dies with it, but the container goes on in the daemon, writing
into the work directory. Every container the build starts carries the run that started
it (`LABEL`: the same mark as `RUN_VARIABLE`), so the next run finds those whose run is
gone and removes them, as `processes.stop_orphans` does for processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from archkernel.azure.buildenv.routing import CONTAINER_LABEL as LABEL
from archkernel.host.processes import orphans, run_alive
from archkernel.host.run import run
from archkernel.log import log

# One line per container: its ID, then its run (empty when the label is not there).
_FORMAT = '{{.ID}} {{.Label "' + LABEL + '"}}'


def listed(text: str) -> list[tuple[str, str | None]]:
    """`docker ps --format _FORMAT` output -> (container ID, its run or None)."""
    found: list[tuple[str, str | None]] = []
    for line in text.splitlines():
        cid, _, mark = line.strip().partition(" ")
        if cid.isalnum():  # an ID is hexadecimal; anything else is not a container line
            found.append((cid, mark.strip() or None))
    return found


def left_by_killed_runs(
    containers: Iterable[tuple[str, str | None]], alive: Callable[[str], bool] = run_alive
) -> list[str]:
    """IDs of the `containers` whose run is gone."""
    return [cid for cid, _ in orphans(containers, alive)]


def stop_orphan_containers(runtime: str) -> list[str]:
    """Remove the containers of `runtime` (docker or podman) whose run was killed; their
    IDs. A runtime that does not answer has nothing to remove here (the step that needs it
    says why it does not answer)."""
    ps = run(
        [runtime, "ps", "--all", "--no-trunc", "--filter", f"label={LABEL}", "--format", _FORMAT],
        capture=True,
        check=False,
    )
    if ps.returncode != 0:
        log.debug("%s ps failed; no containers of killed runs looked for", runtime)
        return []
    ids = left_by_killed_runs(listed(ps.stdout))
    if ids:
        log.info("removing %s containers left by killed runs: %s", runtime, " ".join(ids))
        run([runtime, "rm", "--force", *ids], capture=True)
    return ids
