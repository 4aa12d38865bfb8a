"""The `archkernel` command: doit embedded over the same tasks as `dodo.py`, plus helpers."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from doit.cmd_base import ModuleTaskLoader
from doit.dependency import Dependency
from doit.doit_cmd import DoitMain
from doit.loader import load_tasks

from archkernel import __version__
from archkernel import log as logmod
from archkernel.errors import UserError
from archkernel.host.run import render
from archkernel.log import log
from archkernel.settings import Loaded, effective, load, remember
from tasks import doit_config, get_workflow, task_creators, workflows
from tasks.state import DurableJsonDB, StatChecker
from tasks.steps import SettingsChanged, Step, parse_step_number, task_name

EPILOG = """\
examples:
  archkernel run azure_vhd                      build the Azure image, resuming where it stopped
  archkernel run azure_vhd --from 6             force step 6 and every later one to run again
  archkernel run scaleway_kexec --to 6          prepare the initrd, stop before the shutdown hook
  archkernel run azure_vhd --dry-run            show what would run and the commands, change nothing
  archkernel steps azure_vhd                    each step's state, and why it would re-run
  archkernel --settings my.toml settings show   effective settings and where each came from
  archkernel vhd check disk.vhd                 check a VHD against Azure's rules

The same tasks run under plain doit: `doit list --all`, `doit run azure_vhd`,
`doit run azure_vhd from=6 to=8 settings=my.toml`.
"""


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="archkernel",
        description="Put Arch Linux where cloud providers do not support it: numbered, "
        "resumable build steps for a Scaleway C1 kexec boot and Azure VHD images.",
        epilog=EPILOG,
        formatter_class=fmt,
    )
    p.add_argument("--version", action="version", version=f"archkernel {__version__}")
    p.add_argument(
        "--settings",
        metavar="PATH",
        help="settings file (default: $ARCHKERNEL_SETTINGS, else ./settings.toml, else built-in)",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="log every command run")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run a workflow's steps, resuming after the last finished one",
        description="Run WORKFLOW's numbered steps. Steps whose inputs, outputs and settings "
        "are unchanged since they last succeeded are skipped, so after a failure a new run "
        "starts at the failed step.",
        epilog="examples:\n  archkernel run azure_vhd\n  archkernel run azure_vhd --from 6\n"
        "  archkernel run scaleway_kexec --to 6\n  archkernel run azure_vhd --dry-run\n"
        "\nplain doit equivalent: doit run azure_vhd from=6 to=8",
        formatter_class=fmt,
    )
    run.add_argument("workflow", help="azure_vhd, scaleway_kexec or azure_boottest")
    # Also accepted after the command (`archkernel run WORKFLOW --settings PATH`); SUPPRESS
    # keeps the global option's value when it is not given here.
    run.add_argument("--settings", metavar="PATH", default=argparse.SUPPRESS, help="settings file")
    run.add_argument("--from", dest="from_step", metavar="N", help="force step N and later to run")
    run.add_argument("--to", dest="to_step", metavar="M", help="stop after step M")
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would run and its commands; change nothing",
    )

    steps = sub.add_parser(
        "steps",
        help="list a workflow's steps with their state and why they would re-run",
        description="Print each step's number, name and state: done, pending (never "
        "finished), or will re-run, with the reason: which file or setting changed.",
        epilog="examples:\n  archkernel steps azure_vhd\n  archkernel --settings ci.toml steps "
        "scaleway_kexec",
        formatter_class=fmt,
    )
    steps.add_argument("workflow")
    steps.add_argument(
        "--settings", metavar="PATH", default=argparse.SUPPRESS, help="settings file"
    )

    sub.add_parser("list", help="list the workflows and their steps")

    st = sub.add_parser("settings", help="show or check the settings")
    st_sub = st.add_subparsers(dest="settings_command", metavar="ACTION")
    st_sub.add_parser("show", help="effective values and where each came from")
    st_sub.add_parser("check", help="validate; exit 0 when valid, 1 otherwise")

    vhd = sub.add_parser("vhd", help="check or make fixed VHD files")
    vhd_sub = vhd.add_subparsers(dest="vhd_command", metavar="ACTION")
    chk = vhd_sub.add_parser("check", help="check a VHD's footer against Azure's rules")
    chk.add_argument("file", type=Path)
    fr = vhd_sub.add_parser("from-raw", help="make a fixed VHD from a raw image (sparse, fast)")
    fr.add_argument("raw", type=Path)
    fr.add_argument("vhd", type=Path)

    dt = sub.add_parser("doit", help="run any doit command over archkernel's tasks")
    dt.add_argument("args", nargs=argparse.REMAINDER)
    return p


def _loader(
    loaded: Loaded,
    from_step: int | None = None,
    to_step: int | None = None,
    only: str | None = None,
) -> Any:
    ns: dict[str, Any] = {"DOIT_CONFIG": doit_config(loaded)}
    ns.update(task_creators(loaded, from_step, to_step, only))
    return ModuleTaskLoader(ns)


def _doit(
    loaded: Loaded,
    args: list[str],
    from_step: int | None = None,
    to_step: int | None = None,
    only: str | None = None,
) -> int:
    code = DoitMain(_loader(loaded, from_step, to_step, only)).run(args)
    return 0 if code == 0 else 1


@dataclass
class StepState:
    """A step's state for `steps` and `--dry-run`."""

    task: str
    step: Step | None
    state: str  # done | pending | will re-run | after earlier steps
    reasons: list[str]


def step_states(
    loaded: Loaded, workflow: str, from_step: int | None = None, to_step: int | None = None
) -> list[StepState]:
    """The state of each step of `workflow`, read from doit's state without running anything."""
    wf = get_workflow(workflow)
    steps = {task_name(wf.name, s): s for s in wf.build(loaded)}
    ns: dict[str, Any] = {"DOIT_CONFIG": doit_config(loaded)}
    ns.update(task_creators(loaded, from_step, to_step))
    config = ns["DOIT_CONFIG"]
    tasks = load_tasks(ns)
    tasks_dict = {t.name: t for t in tasks}
    dep_file = config["dep_file"]
    db_class: Any = DurableJsonDB
    dep = Dependency(db_class, dep_file, checker_cls=StatChecker)
    out: list[StepState] = []
    rerun_targets: set[str] = set()
    # Read only: dep.close() is never called, it would write the state file.
    for name, step in steps.items():
        task = tasks_dict.get(name)
        if task is None:
            continue
        status = dep.get_status(task, tasks_dict, get_log=True)
        reasons: list[str] = []
        values = dep.get_values(task.name)
        never = not values and not dep._get(task.name, "deps:")
        r = status.reasons
        for utd, _args, _kw in r.get("uptodate_false", []):
            if isinstance(utd, SettingsChanged) and not never:
                for key, old, new in utd.changes(values):
                    reasons.append(f"setting {key}: {json.dumps(old)} -> {json.dumps(new)}")
            elif utd is False:
                reasons.append("always runs" if step.always else "forced by --from")
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
            reasons.append("always runs")
        upstream = [f for f in task.file_dep if f in rerun_targets]
        if status.status == "up-to-date" and upstream:
            state = "after earlier steps"
            reasons = [f"re-runs if {Path(f).name} changes" for f in upstream]
        elif status.status == "up-to-date":
            state = "done"
        elif never:
            state = "pending"
            reasons = ["not finished yet"] + [
                x for x in reasons if x.startswith("input not there yet")
            ]
        else:
            state = "will re-run"
        if state != "done":
            rerun_targets.update(task.targets)
        out.append(StepState(name, step, state, reasons))
    return out


def _print_steps(states: list[StepState]) -> None:
    for s in states:
        line = f"{s.task:<40} {s.state}"
        print(line)
        for reason in s.reasons:
            print(f"    {reason}")


def _dry_run(loaded: Loaded, workflow: str, first: int | None, last: int | None) -> int:
    print(f"dry run of {workflow}: nothing is changed")
    for s in step_states(loaded, workflow, first, last):
        if s.step is None:
            continue
        if s.state == "done":
            print(f"skip  {s.task} (up to date)")
            continue
        print(f"run   {s.task}: {s.step.doc}")
        for reason in s.reasons:
            print(f"        because {reason}")
        commands = s.step.commands() if s.step.commands else []
        for argv in commands:
            if isinstance(argv, str):
                print(f"        # {argv}")
            else:
                print(f"        + {render(argv)}")
    return 0


def _settings_show(loaded: Loaded) -> None:
    print(f"# settings file: {loaded.path or '(none)'} ({loaded.path_origin})")
    rows = effective(loaded)
    width = max(len(k) for k, _, _ in rows)
    for key, value, origin in rows:
        print(f"{key:<{width}} = {value:<40} # {origin}")


def _vhd(args: argparse.Namespace) -> int:
    from archkernel.formats import vhd

    if args.vhd_command == "check":
        problems = vhd.check(args.file)
        if problems:
            for problem in problems:
                print(f"FAIL {problem}")
            print(f"{args.file}: {len(problems)} problem(s); Azure would reject it")
            return 1
        print(f"{args.file}: a fixed VHD that Azure accepts")
        return 0
    if args.vhd_command == "from-raw":
        vhd.from_raw(args.raw, args.vhd)
        print(f"wrote {args.vhd}")
        return 0
    raise UserError("vhd needs an action: check or from-raw", "see `archkernel vhd --help`")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `archkernel` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    logmod.setup(-1 if args.quiet else args.verbose)
    os.environ["ARCHKERNEL_VERBOSE"] = str(-1 if args.quiet else args.verbose)
    try:
        return _main(parser, args)
    except UserError as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted; finished steps are kept, run the same command to resume")
        return 130


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "vhd":
        return _vhd(args)
    # A real run keeps its validated settings in the workdir for the next one (the boot
    # path; see `remember` below); nothing else reads or writes that cache.
    run = args.command == "run" and not args.dry_run
    loaded = load(args.settings, cache=run)
    if loaded.from_cache:
        log.debug("settings: unchanged since validated (workdir's .settings-cache.json)")
    if args.command == "settings":
        if args.settings_command == "check":
            print(f"settings are valid ({loaded.path or 'built-in defaults'})")
            return 0
        _settings_show(loaded)
        return 0
    if args.command == "list":
        for wf in workflows().values():
            print(f"{wf.name}: {wf.doc}")
            for step in wf.build(loaded):
                print(f"  {step.id:<24} {step.doc}")
        return 0
    if args.command == "steps":
        get_workflow(args.workflow)
        _print_steps(step_states(loaded, args.workflow))
        return 0
    if args.command == "doit":
        return _doit(loaded, list(args.args))
    # run
    get_workflow(args.workflow)
    first = parse_step_number(args.from_step, "--from")
    last = parse_step_number(args.to_step, "--to")
    if first is not None and last is not None and first > last:
        raise UserError(f"--from {first} is after --to {last}", "give a range like --from 3 --to 6")
    if args.dry_run:
        return _dry_run(loaded, args.workflow, first, last)
    code = _doit(loaded, ["run", args.workflow], first, last, only=args.workflow)
    remember(loaded)
    return code


if __name__ == "__main__":
    sys.exit(main())
