"""doit reporter: one plain line per step, failures as message and hint, no tracebacks."""

from __future__ import annotations

from typing import Any

from doit.exceptions import TaskFailed

from archkernel.log import log


class StepReporter:
    """Reports through the archkernel logger, so journald and terminals read the same."""

    desc = "archkernel steps: one line per step, errors without tracebacks"

    def __init__(self, outstream: Any, options: dict[str, Any]) -> None:
        self.failed: list[str] = []
        self.errors: list[str] = []

    def initialize(self, tasks: Any, selected_tasks: Any) -> None:
        pass

    def get_status(self, task: Any) -> None:
        pass

    def execute_task(self, task: Any) -> None:
        pass

    def add_failure(self, task: Any, fail: Any) -> None:
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
