"""doit tasks for archkernel's workflows: one module per workflow, numbered steps.

`dodo.py` and the `archkernel` command both get their tasks from `namespace()`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from archkernel import log as logmod
from archkernel.errors import UserError
from archkernel.settings import Loaded, load

from .reporter import StepReporter
from .state import BACKEND_NAME, StatChecker
from .steps import Workflow, doit_tasks, parse_step_number

# Built-in workflow modules, relative to this package (installed as `archkernel_tasks`;
# `tasks` in the checkout, where dodo.py imports it).
WORKFLOW_MODULES = [
    f"{__name__}.scaleway_kexec",
    f"{__name__}.azure_vhd",
    f"{__name__}.azure_publish",
]
# Extra workflow modules (plugins, the tests' demo workflow): `module[,module...]`.
ENV_EXTRA = "ARCHKERNEL_EXTRA_WORKFLOWS"


def workflows(only: str | None = None) -> dict[str, Workflow]:
    """Every workflow by name, in a stable order.

    With `only`, a built-in workflow's module (`<this package>.<only>`) is the one imported: running
    one workflow does not pay for importing the others (scaleway_kexec runs at every boot).
    """
    names = list(WORKFLOW_MODULES)
    names += [m for m in os.environ.get(ENV_EXTRA, "").split(",") if m.strip()]
    if only is not None and f"{__name__}.{only}" in WORKFLOW_MODULES:
        names = [f"{__name__}.{only}"]
    found: dict[str, Workflow] = {}
    for module_name in names:
        module = importlib.import_module(module_name.strip())
        for wf in getattr(module, "WORKFLOWS", []):
            found[wf.name] = wf
    return found


def get_workflow(name: str) -> Workflow:
    """The workflow called `name`, or a UserError listing the known ones."""
    known = workflows(only=name)
    if name not in known:
        known = workflows()
    if name not in known:
        raise UserError(f"no workflow named {name!r}", f"choose one of: {', '.join(known)}")
    return known[name]


def backend_name() -> str:
    """Our durable backend when the package is installed (it is an entry point), else json."""
    points = importlib.metadata.entry_points(group="doit.BACKEND")
    return BACKEND_NAME if any(p.name == BACKEND_NAME for p in points) else "json"


def doit_config(loaded: Loaded) -> dict[str, Any]:
    """DOIT_CONFIG: the state file under workdir (absolute), our checker and reporter."""
    dep_file = str(loaded.settings.workdir.resolve() / ".doit.json")
    return {
        "dep_file": dep_file,
        "backend": backend_name(),
        "check_file_uptodate": StatChecker,
        "reporter": StepReporter.for_state(dep_file),
        "verbosity": 2,
        "default_tasks": [],
        "action_string_formatting": "new",
    }


def task_creators(
    loaded: Loaded,
    from_step: int | None = None,
    to_step: int | None = None,
    only: str | None = None,
) -> dict[str, Callable[[], Iterator[dict[str, Any]]]]:
    """`task_<workflow>` generator functions, as doit expects to find them in a dodo.

    `only`: just that workflow's (see `workflows`).
    """
    creators: dict[str, Callable[[], Iterator[dict[str, Any]]]] = {}
    for wf in workflows(only).values():

        def creator(wf: Workflow = wf) -> Iterator[dict[str, Any]]:
            yield from doit_tasks(wf, loaded, from_step=from_step, to_step=to_step)
            if wf.extra_tasks is not None:
                yield from wf.extra_tasks(loaded)

        creator.__doc__ = wf.doc
        creators[f"task_{wf.name}"] = creator
    return creators


def namespace(
    settings: str | None = None, from_step: str | None = None, to_step: str | None = None
) -> dict[str, Any]:
    """Everything a dodo file defines: DOIT_CONFIG and one task creator per workflow.

    Settings errors end the program with their message (no traceback).
    """
    if not logmod.log.handlers:
        logmod.setup(int(os.environ.get("ARCHKERNEL_VERBOSE", "0") or 0))
    try:
        loaded = load(None, doit_var=settings)
        first = parse_step_number(from_step, "from")
        last = parse_step_number(to_step, "to")
    except UserError as exc:
        print(f"archkernel: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    ns: dict[str, Any] = {"DOIT_CONFIG": doit_config(loaded)}
    ns.update(task_creators(loaded, first, last))
    return ns
