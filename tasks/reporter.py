"""doit reporter: one plain line per step, why a finished step runs again, failures as
message and hint, no tracebacks."""

from __future__ import annotations

from typing import Any, ClassVar

from doit.exceptions import TaskFailed

from archkernel.log import log

from .steps import ALWAYS, read_state, step_status


class StepReporter:
    """Reports through the archkernel logger, so journald and terminals read the same.

    Before a step that finished in an earlier run runs again, it says why, in the words of
    `archkernel steps` (read from doit's state as the run found it: a step's own record
    changes only when it finishes). `for_state` binds it to the state file.
    """

    desc = "archkernel steps: one line per step, errors without tracebacks"
    state_file: ClassVar[str | None] = None

    def __init__(self, outstream: Any, options: dict[str, Any]) -> None:
        self.failed: list[str] = []
        self.errors: list[str] = []
        self.tasks: dict[str, Any] = {}
        self._state: Any = None

    @classmethod
    def for_state(cls, state_file: str) -> type[StepReporter]:
        """This reporter, explaining re-runs from the doit state in `state_file`."""
        return type(cls.__name__, (cls,), {"state_file": state_file})

    def initialize(self, tasks: Any, selected_tasks: Any) -> None:
        self.tasks = dict(tasks)

    def get_status(self, task: Any) -> None:
        pass

    def execute_task(self, task: Any) -> None:
        if self.state_file is None or not task.actions or task.name.startswith("_"):
            return
        if self._state is None:
            self._state = read_state(self.state_file)
        status = step_status(self._state, task, self.tasks)
        if not status.finished_before or not status.reasons:
            return  # a first run: the step's own line says what it does
        # A step that reads the live system runs every time: saying so each time is noise.
        level = log.debug if status.reasons == [ALWAYS] else log.info
        level("%s: runs again because %s", task.name, "; ".join(status.reasons))

    def add_failure(self, task: Any, fail: Any) -> None:
        if task.name.startswith("_") and isinstance(fail, TaskFailed) and not fail.traceback:
            self.errors.append(fail.message)  # before any step: not a step that failed
            return
        self.failed.append(task.name)
        if isinstance(fail, TaskFailed) and not fail.traceback:
            log.error("step %s failed: %s", task.name, fail.message)
        else:
            # An exception the code did not turn into a UserError: a bug, so keep the trace.
            log.error("step %s crashed (a bug; please report it):\n%s", task.name, fail.get_msg())

    def add_success(self, task: Any) -> None:
        pass

    def skip_uptodate(self, task: Any) -> None:
        if task.actions and not task.name.startswith("_"):
            log.info("%s: up to date", task.name)

    def skip_ignore(self, task: Any) -> None:
        log.info("%s: ignored", task.name)

    def cleanup_error(self, exception: Any) -> None:
        log.error("clean-up failed: %s", exception.get_msg())

    def runtime_error(self, msg: str) -> None:
        self.errors.append(msg)

    def teardown_task(self, task: Any) -> None:
        pass

    def complete_run(self) -> None:
        for msg in self.errors:
            log.error("%s", msg)
        if self.failed:
            workflow = self.failed[0].split(":", 1)[0]
            log.error(
                "stopped at %s; fix the problem and run `archkernel run %s` (or `doit run %s`)"
                " again: finished steps are kept",
                self.failed[0],
                workflow,
                workflow,
            )
