"""Numbered steps and how they become doit tasks.

A workflow is an ordered list of `Step`s. Each becomes the doit subtask
`<workflow>:<NN>_<verb>` with its targets, its file dependencies, exactly the settings it
reads (as a `SettingsChanged` up-to-date check that also remembers their values, so
`archkernel steps` can say what changed), and a task dependency on the step before it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from doit.exceptions import TaskFailed

from archkernel.errors import UserError
from archkernel.log import log
from archkernel.settings import Loaded, subset

SETTINGS_VALUE = "_archkernel_settings"

Action = Callable[[], None]
# What a step would run, for --dry-run: argv lists, and plain descriptions (str) of what
# it does without a command (write a file, append a footer). Must not run or change anything.
Commands = Callable[[], Sequence[list[str] | str]]


@dataclass
class Step:
    """One numbered step of a workflow."""

    number: int
    verb: str
    doc: str
    action: Action
    targets: Sequence[Path] = ()
    file_dep: Sequence[Path] = ()
    settings: Sequence[str] = ()
    always: bool = False
    commands: Commands | None = None

    @property
    def id(self) -> str:
        """`05_configure`."""
        return f"{self.number:02d}_{self.verb}"


@dataclass
class Workflow:
    """A named, ordered list of steps built from the settings."""

    name: str
    doc: str
    build: Callable[[Loaded], list[Step]]
    # A reason to do nothing this time (e.g. already kexec'd), checked when the tasks are
    # made; it applies to runs that reach the last step.
    halted: Callable[[Loaded], str | None] | None = None
    extra_tasks: Callable[[Loaded], list[dict[str, Any]]] | None = field(default=None)


class SettingsChanged:
    """doit `uptodate`: up to date while the step's settings hold the values of its last run.

    Like doit's `config_changed`, but it stores the values (secrets as digests) rather than
    one hash, so a re-run can be explained key by key.
    """

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values

    def configure_task(self, task: Any) -> None:
        task.value_savers.append(lambda: {SETTINGS_VALUE: self.values})

    def __call__(self, task: Any, values: dict[str, Any]) -> bool:
        return bool(values.get(SETTINGS_VALUE) == self.values)

    def changes(self, values: dict[str, Any]) -> list[tuple[str, Any, Any]]:
        """(key, old, new) for each setting that differs from the last successful run."""
        old = values.get(SETTINGS_VALUE) or {}
        keys = sorted(set(old) | set(self.values))
        return [
            (k, old.get(k), self.values.get(k)) for k in keys if old.get(k) != self.values.get(k)
        ]

    def __repr__(self) -> str:
        return f"SettingsChanged({sorted(self.values)})"


def task_name(workflow: str, step: Step) -> str:
    """`azure_vhd:05_configure`."""
    return f"{workflow}:{step.id}"


def _skip(title: str, reason: str) -> Callable[[], None]:
    def run() -> None:
        log.info("%s: skipped: %s", title, reason)

    return run


def _action(workflow: Workflow, step: Step) -> Callable[[], Any]:
    title = task_name(workflow.name, step)

    def run() -> Any:
        log.info("%s: %s", title, step.doc)
        start = time.monotonic()
        try:
            step.action()
        except UserError as exc:
            log.info("%s: failed after %.1fs", title, time.monotonic() - start)
            return TaskFailed(str(exc))
        except KeyboardInterrupt:
            log.info("%s: interrupted after %.1fs", title, time.monotonic() - start)
            raise
        log.info("%s: done in %.1fs", title, time.monotonic() - start)
        return None

    run.__name__ = f"step_{step.id}"
    return run


def doit_tasks(
    workflow: Workflow,
    loaded: Loaded,
    *,
    from_step: int | None = None,
    to_step: int | None = None,
) -> Iterator[dict[str, Any]]:
    """The doit task dicts of `workflow`: one subtask per step, in order.

    `from_step` forces that step and every later one to run; `to_step` leaves out the
    steps after it, so the group stops there.
    """
    steps = workflow.build(loaded)
    yield {"basename": workflow.name, "name": None, "doc": workflow.doc}
    reaches_end = to_step is None or to_step >= steps[-1].number
    halted = workflow.halted(loaded) if workflow.halted and reaches_end else None
    previous: str | None = None
    for step in steps:
        if to_step is not None and step.number > to_step:
            break
        if halted is not None:
            yield {
                "basename": workflow.name,
                "name": step.id,
                "doc": step.doc,
                "actions": [_skip(task_name(workflow.name, step), halted)],
                "uptodate": [False],
                "verbosity": 2,
            }
            continue
        uptodate: list[Any] = [SettingsChanged(subset(loaded.settings, list(step.settings)))]
        if step.always or (from_step is not None and step.number >= from_step):
            uptodate.append(False)
        task: dict[str, Any] = {
            "basename": workflow.name,
            "name": step.id,
            "doc": step.doc,
            "actions": [_action(workflow, step)],
            "targets": [os.fspath(t) for t in step.targets],
            "file_dep": [os.fspath(f) for f in step.file_dep],
            "uptodate": uptodate,
            "verbosity": 2,
        }
        if previous:
            task["task_dep"] = [previous]
        previous = f"{workflow.name}:{step.id}"
        yield task


def parse_step_number(value: str | int | None, what: str) -> int | None:
    """`6`, `06` or `06_disk` -> 6; None stays None; anything else is a UserError."""
    if value is None or value == "":
        return None
    text = str(value).split("_", 1)[0]
    if not text.isdigit():
        raise UserError(f"{what}: {value!r} is not a step number", "use e.g. 6 or 06_disk")
    return int(text)


@contextlib.contextmanager
def chdir(path: Path) -> Iterator[None]:
    """Temporarily change the working directory (doit resolves relative paths from it)."""
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)
