"""Numbered steps and how they become doit tasks.

A workflow is an ordered list of `Step`s. Each becomes the doit subtask
`<workflow>:<NN>_<verb>` with its targets, its file dependencies, exactly the settings it
reads (as a `SettingsChanged` up-to-date check that also remembers their values, so
`archkernel steps` can say what changed), and a task dependency on the step before it.
`step_status` reads doit's state to say whether a step would run and why, for `archkernel
steps` and for the line `archkernel run` prints before a step runs again.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from doit.dependency import Dependency
from doit.exceptions import TaskFailed

from archkernel.errors import UserError
from archkernel.log import complete_step, log
from archkernel.plan import Plan, declared_settings, execute
from archkernel.settings import Loaded, Settings, subset
from archkernel.settings.audit import recording, undeclared

from .state import DurableJsonDB, StatChecker

SETTINGS_VALUE = "_archkernel_settings"
# Set (to anything) to make every step fail when it reads a setting it did not declare.
ENV_AUDIT = "ARCHKERNEL_AUDIT_SETTINGS"

StepFunction = Callable[[Settings], Plan]


def _function_of(fn: Callable[..., Any]) -> Callable[..., Any]:
    return fn.func if isinstance(fn, functools.partial) else fn


@dataclass
class Step:
    """One numbered step of a workflow: a library step function and its files.

    Its number is its position in the workflow, its name the function's name and its
    description the first line of the function's docstring; the settings it reads are
    the function's `@reads` declaration (see `Step.of`).
    """

    function: StepFunction
    verb: str
    doc: str
    targets: Sequence[Path] = ()
    file_dep: Sequence[Path] = ()
    settings: Sequence[str] = ()
    always: bool = False
    number: int = 0

    @classmethod
    def of(
        cls,
        function: StepFunction,
        *,
        targets: Sequence[Path] = (),
        file_dep: Sequence[Path] = (),
        always: bool = False,
        verb: str | None = None,
        doc: str | None = None,
    ) -> Step:
        """The step that runs the plan `function(settings)` returns."""
        inner = _function_of(function)
        summary = (inspect.getdoc(inner) or "").split("\n\n", 1)[0].replace("\n", " ")
        return cls(
            function,
            verb or inner.__name__,
            doc or summary.rstrip("."),
            targets=targets,
            file_dep=file_dep,
            settings=declared_settings(inner),
            always=always,
        )

    @property
    def id(self) -> str:
        """`05_configure`."""
        return f"{self.number:02d}_{self.verb}"

    def plan(self, settings: Settings) -> Plan:
        """What the step would do now (changes nothing)."""
        return self.function(settings)


@dataclass
class Workflow:
    """A named, ordered list of steps built from the settings.

    `shared_inputs` are files every step reads (the build environment's record), declared
    once here and added to each step's inputs except the step that makes them. `locating`
    are settings read only to find files (the work directory): they are covered by the
    steps' targets and inputs, not by each step's settings.
    """

    name: str
    doc: str
    build: Callable[[Settings], list[Step]]
    # A reason to do nothing this time (e.g. already kexec'd), checked when the tasks are
    # made; it applies to runs that reach the last step.
    halted: Callable[[Loaded], str | None] | None = None
    extra_tasks: Callable[[Loaded], list[dict[str, Any]]] | None = field(default=None)
    shared_inputs: Callable[[Settings], list[Path]] | None = None
    locating: Sequence[str] = ("workdir",)
    # Trees the steps build on that no final output needs (`archkernel clean` removes them).
    intermediates: Callable[[Settings], list[Path]] | None = None
    # What the workflow exists to make: named at the end of a run, kept by `clean`.
    outputs: Callable[[Settings], list[Path]] | None = None
    # Undoes what killed runs left (processes, mounts, temporary trees): every run does it
    # first, whether or not any step then runs (the hidden task `_<name>_start`).
    housekeeping: Callable[[Settings], None] | None = None

    def steps(self, loaded: Loaded) -> list[Step]:
        """The steps for these settings, numbered from 1, with the shared inputs."""
        steps = self.build(loaded.settings)
        shared = self.shared_inputs(loaded.settings) if self.shared_inputs else []
        for number, step in enumerate(steps, start=1):
            step.number = number
            extra = [f for f in shared if f not in step.targets and f not in step.file_dep]
            step.file_dep = [*step.file_dep, *extra]
        return steps


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


class Forced:
    """doit `uptodate` that is never up to date, with the reason: the step always runs
    (it reads the live system), or `--from` forced it."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __call__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"Forced({self.reason!r})"


ALWAYS = "always runs"


@dataclass
class StepStatus:
    """Whether a step is up to date in doit's state, and why it would run if not."""

    uptodate: bool
    finished_before: bool  # it has succeeded at least once (doit kept its record)
    reasons: list[str]


def read_state(dep_file: str | os.PathLike[str]) -> Any:
    """doit's saved state, to read: it is never closed, so nothing is written back."""
    return Dependency(DurableJsonDB, os.fspath(dep_file), checker_cls=StatChecker)


def step_status(state: Any, task: Any, tasks: dict[str, Any]) -> StepStatus:
    """Ask doit's state (`read_state`) whether `task` is up to date, and why not: each
    changed setting (old -> new value), changed or missing file, and forced run."""
    status = state.get_status(task, tasks, get_log=True)
    values = state.get_values(task.name)
    finished = bool(values or state._get(task.name, "deps:"))
    r = status.reasons
    reasons: list[str] = []
    for utd, _args, _kw in r.get("uptodate_false", []):
        if isinstance(utd, SettingsChanged) and finished:
            for key, old, new in utd.changes(values):
                reasons.append(f"setting {key}: {json.dumps(old)} -> {json.dumps(new)}")
        elif isinstance(utd, Forced):
            reasons.append(utd.reason)
        elif utd is False:
            reasons.append(ALWAYS)
    for target in r.get("missing_target", []):
        reasons.append(f"target missing: {target}")
    for f in r.get("changed_file_dep", []):
        reasons.append(f"input changed: {f}")
    for f in r.get("missing_file_dep", []):
        reasons.append(f"input not there yet: {f}")
    for f in r.get("added_file_dep", []):
        reasons.append(f"new input: {f}")
    for f in r.get("removed_file_dep", []):
        reasons.append(f"input no longer read: {f}")
    if r.get("has_no_dependencies"):
        reasons.append(ALWAYS)
    return StepStatus(status.status == "up-to-date", finished, reasons)


def task_name(workflow: str, step: Step) -> str:
    """`azure_vhd:05_configure`."""
    return f"{workflow}:{step.id}"


def _skip(title: str, reason: str) -> Callable[[], None]:
    def run() -> None:
        log.info("%s: skipped: %s", title, reason)

    return run


def _action(workflow: Workflow, step: Step, settings: Settings) -> Callable[[], Any]:
    title = task_name(workflow.name, step)

    def run() -> Any:
        seen: set[str] = set()
        audit = bool(os.environ.get(ENV_AUDIT))
        try:
            with complete_step(title, step.doc):
                execute(step.plan(recording(settings, seen) if audit else settings))
                extra = undeclared(seen, [*step.settings, *workflow.locating]) if audit else []
                if extra:
                    raise UserError(
                        f"{title} read settings it does not declare: {', '.join(extra)}",
                        "add them to the step function's @reads",
                    )
        except UserError as exc:
            return TaskFailed(str(exc))
        return None

    run.__name__ = f"step_{step.id}"
    return run


def step_range_error(
    workflow: str,
    count: int,
    from_step: int | None,
    to_step: int | None,
    names: tuple[str, str] = ("from", "to"),
) -> UserError | None:
    """Why `from_step`/`to_step` do not fit a workflow of `count` steps, or None (`names`:
    what the user called them: doit's variables or our options)."""
    for value, option in zip((from_step, to_step), names, strict=True):
        if value is not None and not 1 <= value <= count:
            return UserError(
                f"{option} {value}: {workflow} has steps 1 to {count}",
                f"give a step number from 1 to {count}; `archkernel steps {workflow}` lists them",
            )
    if from_step is not None and to_step is not None and from_step > to_step:
        return UserError(
            f"{names[0]} {from_step} is after {names[1]} {to_step}",
            f"give a range like {names[0]} 3 {names[1]} 6",
        )
    return None


def _start(
    workflow: Workflow,
    settings: Settings,
    count: int,
    from_step: int | None,
    to_step: int | None,
) -> Callable[[], Any]:
    def run() -> Any:
        error = step_range_error(workflow.name, count, from_step, to_step)
        if error is not None:
            return TaskFailed(str(error))
        if workflow.housekeeping is not None:
            try:
                workflow.housekeeping(settings)
            except UserError as exc:
                return TaskFailed(str(exc))
        return None

    run.__name__ = f"start_{workflow.name}"
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
    steps = workflow.steps(loaded)
    yield {"basename": workflow.name, "name": None, "doc": workflow.doc}
    # Plain `doit run` has no command line of ours to check the range or tidy up first:
    # a hidden task that the first step depends on does both (it runs even when every step
    # is up to date, as `archkernel run` does).
    start = f"_{workflow.name}_start"
    yield {
        "basename": start,
        "doc": f"check the step range, then undo what killed runs of {workflow.name} left",
        "actions": [_start(workflow, loaded.settings, len(steps), from_step, to_step)],
        "uptodate": [False],
        "verbosity": 2,
    }
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
        if step.always:
            uptodate.append(Forced(ALWAYS))
        elif from_step is not None and step.number >= from_step:
            uptodate.append(Forced("forced by --from"))
        task: dict[str, Any] = {
            "basename": workflow.name,
            "name": step.id,
            "doc": step.doc,
            "actions": [_action(workflow, step, loaded.settings)],
            "targets": [os.fspath(t) for t in step.targets],
            "file_dep": [os.fspath(f) for f in step.file_dep],
            "uptodate": uptodate,
            "verbosity": 2,
        }
        task["task_dep"] = [previous or start]
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
