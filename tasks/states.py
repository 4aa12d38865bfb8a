"""Each step's state, read from doit's state without running anything: `archkernel steps`
and `--dry-run` show it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from doit.loader import load_tasks

from archkernel.settings import Loaded

from . import doit_config, get_workflow, task_creators
from .steps import Step, read_state, step_status, task_name


@dataclass
class StepState:
    """A step's state for `steps` and `--dry-run`."""

    task: str
    step: Step | None
    state: str  # done | pending | will re-run | after earlier steps
    reasons: list[str]

    def as_json(self) -> dict[str, Any]:
        step = self.step
        return {
            "task": self.task,
            "number": step.number if step else None,
            "name": step.verb if step else None,
            "doc": step.doc if step else None,
            "state": self.state,
            "reasons": self.reasons,
        }


def step_states(
    loaded: Loaded, workflow: str, from_step: int | None = None, to_step: int | None = None
) -> list[StepState]:
    """The state of each step of `workflow`, read from doit's state without running anything."""
    wf = get_workflow(workflow)
    steps = {task_name(wf.name, s): s for s in wf.steps(loaded)}
    ns: dict[str, Any] = {"DOIT_CONFIG": doit_config(loaded)}
    ns.update(task_creators(loaded, from_step, to_step))
    tasks_dict = {t.name: t for t in load_tasks(ns)}
    state = read_state(ns["DOIT_CONFIG"]["dep_file"])
    out: list[StepState] = []
    rerun_targets: set[str] = set()
    for name, step in steps.items():
        task = tasks_dict.get(name)
        if task is None:
            continue
        status = step_status(state, task, tasks_dict)
        reasons = status.reasons
        upstream = [f for f in task.file_dep if f in rerun_targets]
        if status.uptodate and upstream:
            label = "after earlier steps"
            reasons = [f"re-runs if {Path(f).name} changes" for f in upstream]
        elif status.uptodate:
            label = "done"
        elif not status.finished_before:
            label = "pending"
            reasons = ["not finished yet"] + [
                x for x in reasons if x.startswith("input not there yet")
            ]
        else:
            label = "will re-run"
        if label != "done":
            rerun_targets.update(task.targets)
        out.append(StepState(name, step, label, reasons))
    return out


def print_steps(states: list[StepState]) -> None:
    for s in states:
        line = f"{s.task:<40} {s.state}"
        print(line)
        for reason in s.reasons:
            print(f"    {reason}")
