"""What a step does, as data: the commands it runs and the work it does in-process.

A step function (e.g. `archkernel.azure.tree.pacstrap`) decides: it reads its settings and
the files earlier steps wrote, and returns a `Plan` without changing anything. `execute()`
then carries the plan out, and `--dry-run` prints `describe(plan)` instead, so what a dry
run shows is what runs (pyinfra's model). Two kinds of operation:

- `Run`: an external command, started through `archkernel.host.run.run` (which logs it
  as `+ cmd` with -v). Its argv is fixed when the plan is made.
- `Do`: in-process work (write a file, check a tree, fetch over TFTP) with a plain
  description. It starts no external command: every command of a step is a `Run`.

The settings a step function reads are declared beside it with `@reads(...)`; the tasks
turn them into the step's up-to-date check, and `archkernel.settings.audit` proves no step
reads more than it declared.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from archkernel.errors import UserError
from archkernel.host.run import render, run

F = TypeVar("F", bound=Callable[..., Any])

_READS = "__archkernel_reads__"


def reads(*keys: str) -> Callable[[F], F]:
    """Declare the settings a step function reads (`azure.hostname`, or a whole section
    such as `azure.user`)."""

    def mark(fn: F) -> F:
        setattr(fn, _READS, tuple(dict.fromkeys([*getattr(fn, _READS, ()), *keys])))
        return fn

    return mark


def declared_settings(fn: Callable[..., Any]) -> tuple[str, ...]:
    """The settings `fn` declared with `@reads` (none: an empty tuple)."""
    return tuple(getattr(fn, _READS, ()))


@dataclass(frozen=True)
class Run:
    """An external command of a plan.

    `then` receives the finished process (stdout captured when `capture`); `error` turns a
    non-zero exit into the UserError to raise (default: `command_error`); with `check`
    false a non-zero exit is for `then` to judge; `note` says what a dry run cannot show
    on the command line (e.g. what is fed on stdin).
    """

    argv: tuple[str, ...]
    stdin: bytes | str | None = None
    capture: bool = False
    timeout: float | None = None
    env: Mapping[str, str] | None = None
    cwd: str | None = None
    then: Callable[[subprocess.CompletedProcess[str]], None] | None = None
    error: Callable[[list[str], int, str], UserError] | None = None
    check: bool = True
    note: str = ""

    @classmethod
    def of(cls, argv: Sequence[str | os.PathLike[str]], **options: Any) -> Run:
        """A Run of `argv` (paths allowed), with any of the fields above."""
        return cls(tuple(os.fspath(a) for a in argv), **options)

    def lines(self) -> list[str]:
        """How a dry run shows it."""
        shown = [f"+ {render(self.argv)}"]
        if self.note:
            shown.append(f"  ({self.note})")
        return shown

    def __call__(self) -> None:
        proc = run(
            self.argv,
            check=self.check and self.error is None,
            capture=self.capture,
            stdin=self.stdin,
            env=self.env,
            cwd=self.cwd,
            timeout=self.timeout,
        )
        if proc.returncode != 0 and self.check and self.error is not None:
            raise self.error(list(self.argv), proc.returncode, proc.stderr)
        if self.then is not None:
            self.then(proc)


@dataclass(frozen=True)
class Do:
    """In-process work of a plan, with what it does in plain words."""

    description: str
    fn: Callable[[], object]

    def lines(self) -> list[str]:
        return [f"# {self.description}"]

    def __call__(self) -> None:
        self.fn()


Op = Run | Do


@dataclass
class Plan:
    """The operations of one step, in order.

    `context` (e.g. the bootstrap build environment, which routes commands into it) is
    entered around the operations; `cleanup` runs after them whatever happened, like a
    `finally` block; `notes` are shown by a dry run only.
    """

    ops: list[Op] = field(default_factory=list)
    context: Callable[[], AbstractContextManager[object]] | None = None
    cleanup: list[Op] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def run(self, argv: Sequence[str | os.PathLike[str]], **options: Any) -> Plan:
        """Append a `Run` of `argv`; returns the plan, so calls chain."""
        self.ops.append(Run.of(argv, **options))
        return self

    def do(self, description: str, fn: Callable[[], object]) -> Plan:
        """Append a `Do`; returns the plan."""
        self.ops.append(Do(description, fn))
        return self

    def extend(self, ops: Iterable[Op]) -> Plan:
        self.ops.extend(ops)
        return self

    def commands(self) -> list[tuple[str, ...]]:
        """The argv of every command it runs, in order (cleanup last)."""
        return [op.argv for op in [*self.ops, *self.cleanup] if isinstance(op, Run)]


def describe(plan: Plan) -> list[str]:
    """The lines a dry run prints for `plan`: `+ cmd` per command, `# what` per Do."""
    lines = [f"# {note}" for note in plan.notes]
    for op in plan.ops:
        lines += op.lines()
    if plan.cleanup:
        lines.append("# then, whatever happened:")
        for op in plan.cleanup:
            lines += op.lines()
    return lines


@contextlib.contextmanager
def _nothing() -> Iterator[object]:
    yield None


def execute(plan: Plan) -> None:
    """Carry `plan` out: its operations in order inside its context, then its cleanup."""
    with (plan.context or _nothing)():
        try:
            for op in plan.ops:
                op()
        finally:
            for op in plan.cleanup:
                op()
