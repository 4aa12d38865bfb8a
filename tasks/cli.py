"""The `archkernel` command: doit embedded over the same tasks as `dodo.py`, plus helpers."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from doit.cmd_base import ModuleTaskLoader
from doit.doit_cmd import DoitMain

from archkernel import __version__
from archkernel import log as logmod
from archkernel.errors import UserError
from archkernel.log import log
from archkernel.plan import describe
from archkernel.settings import Loaded, load, remember
from archkernel.settings.display import toml_lines, values

from . import demo, doit_config, get_workflow, manifest, task_creators, workflows
from .clean import clean_workflow, human_size
from .states import print_steps, step_states
from .steps import Step, Workflow, parse_step_number, step_range_error

EPILOG = """\
examples:
  archkernel run azure_vhd                      build the Azure image, resuming where it stopped
  archkernel run azure_vhd --from 6             force step 6 and every later one to run again
  archkernel run scaleway_kexec --to 6          prepare the initrd, stop before the shutdown hook
  archkernel run azure_vhd --dry-run            show what would run and the commands, change nothing
  archkernel steps azure_vhd                    each step's state, and why it would re-run
  archkernel clean azure_vhd                    remove the intermediate trees, keep the image
  archkernel --settings my.toml settings show   effective settings and where each came from
  archkernel vhd check disk.vhd                 check a VHD against Azure's rules
  archkernel steps azure_vhd --json             for scripts (also settings show, vhd check)
  archkernel demo azure_vhd                     build and boot an image, no Arch mirror needed

output: archkernel's own lines (steps, reasons, errors) go to stderr and the build tools'
output to stdout. To keep the whole story in one log, capture both:
  archkernel run azure_vhd > build.log 2>&1     or    archkernel run azure_vhd 2>&1 | tee build.log
-v and -q work before or after the command: `archkernel run azure_vhd -v`.

The same tasks run under plain doit: `doit list --all`, `doit run azure_vhd`,
`doit run azure_vhd from=6 to=8 settings=my.toml`.
"""

STEPS_JSON = """\
--json prints one object:
  {"workflow": "azure_vhd",
   "steps": [{"task": "azure_vhd:01_preflight", "number": 1, "name": "preflight",
              "doc": "...", "state": "done", "reasons": []}, ...]}
state is one of: done, pending, will re-run, after earlier steps.
"""

SETTINGS_JSON = """\
--json prints one object:
  {"file": "/path/settings.toml" or null, "file_origin": "./settings.toml",
   "settings": {"azure.disk_size": {"value": "30GiB", "origin": "default"}, ...}}
Values are as the settings file writes them (null: not set); a secret's value is
"**********". An origin is "default", "file PATH" or "env VARIABLE".
"""

VHD_JSON = """\
--json prints one object (the exit status is still 1 when Azure would reject the file):
  {"path": "disk.vhd", "file_size": 536871424, "ok": false,
   "rules": [{"rule": "cookie", "ok": true, "detail": "..."}, ...],
   "truncated": false, "hint": "..." or null}
"""

# A process killed by SIGPIPE exits with this status in a shell (128 + 13).
BROKEN_PIPE_STATUS = 141


def git_commit(root: Path | None = None) -> str | None:
    """`git describe` of the checkout archkernel runs from; None when it is not run from a
    checkout (no .git beside the package), or git is missing or fails."""
    from archkernel.host.run import run

    root = root or Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        proc = run(
            ["git", "-C", root, "describe", "--always", "--dirty", "--tags"],
            check=False,
            capture=True,
            timeout=10,
        )
    except UserError:  # git is not installed
        return None
    described = proc.stdout.strip()
    return described if proc.returncode == 0 and described else None


class _Version(argparse.Action):
    """--version: the package version, and the commit when run from a checkout. Asked
    only when given (it may run git)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        commit = git_commit()
        print(f"archkernel {__version__}" + (f" (git {commit})" if commit else ""))
        parser.exit()


def _common() -> argparse.ArgumentParser:
    """-v and -q, also accepted after a command; SUPPRESS keeps the value given before it."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS, help="log every command run"
    )
    common.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="only warnings and errors",
    )
    return common


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    common = [_common()]
    p = argparse.ArgumentParser(
        prog="archkernel",
        description="Put Arch Linux where cloud providers do not support it: numbered, "
        "resumable build steps for a Scaleway C1 kexec boot and Azure VHD images.",
        epilog=EPILOG,
        formatter_class=fmt,
    )
    p.add_argument("--version", action=_Version, help="the version (and git commit) and exit")
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
        parents=common,
        help="run a workflow's steps, resuming after the last finished one",
        description="Run WORKFLOW's numbered steps. Steps whose inputs, outputs and settings "
        "are unchanged since they last succeeded are skipped, so after a failure a new run "
        "starts at the failed step. A step that runs again says why first.",
        epilog="examples:\n  archkernel run azure_vhd\n  archkernel run azure_vhd --from 6\n"
        "  archkernel run scaleway_kexec --to 6\n  archkernel run azure_vhd --dry-run\n"
        "  archkernel run azure_vhd > build.log 2>&1   (the log on stderr, tools on stdout)\n"
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
        parents=common,
        help="list a workflow's steps with their state and why they would re-run",
        description="Print each step's number, name and state: done, pending (never "
        "finished), or will re-run, with the reason: which file or setting changed.",
        epilog="examples:\n  archkernel steps azure_vhd\n  archkernel --settings ci.toml steps "
        "scaleway_kexec\n  archkernel steps azure_vhd --json\n\n" + STEPS_JSON,
        formatter_class=fmt,
    )
    steps.add_argument("workflow")
    steps.add_argument(
        "--settings", metavar="PATH", default=argparse.SUPPRESS, help="settings file"
    )
    steps.add_argument("--json", action="store_true", help="print JSON (shape below)")

    clean = sub.add_parser(
        "clean",
        parents=common,
        help="remove a workflow's intermediate trees; keep its final outputs",
        description="Remove the trees WORKFLOW's steps build on (for azure_vhd the "
        "pacstrapped root/ and image-root/) and keep what it made (the VHD). doit's record "
        "of the workflow's steps is forgotten with them, so the next `archkernel run "
        "WORKFLOW` runs every step again rather than trusting work that is gone.",
        epilog="example:\n  archkernel clean azure_vhd",
        formatter_class=fmt,
    )
    clean.add_argument("workflow")
    clean.add_argument(
        "--settings", metavar="PATH", default=argparse.SUPPRESS, help="settings file"
    )

    sub.add_parser("list", parents=common, help="list the workflows and their steps")

    st = sub.add_parser("settings", parents=common, help="show or check the settings")
    st_sub = st.add_subparsers(dest="settings_command", metavar="ACTION")
    show = st_sub.add_parser(
        "show",
        parents=common,
        help="effective values and where each came from",
        description="Print the effective settings as TOML that pastes back into a settings "
        "file (dotted keys), each line with where its value came from.",
        epilog=SETTINGS_JSON,
        formatter_class=fmt,
    )
    show.add_argument("--json", action="store_true", help="print JSON (shape below)")
    st_sub.add_parser("check", parents=common, help="validate; exit 0 when valid, 1 otherwise")

    vhd = sub.add_parser("vhd", parents=common, help="check or make fixed VHD files")
    vhd_sub = vhd.add_subparsers(dest="vhd_command", metavar="ACTION")
    chk = vhd_sub.add_parser(
        "check",
        parents=common,
        help="check a VHD's footer against Azure's rules",
        epilog=VHD_JSON,
        formatter_class=fmt,
    )
    chk.add_argument("file", type=Path, help="the VHD file to check")
    chk.add_argument("--json", action="store_true", help="print JSON (shape below)")
    fr = vhd_sub.add_parser(
        "from-raw",
        parents=common,
        help="make a fixed VHD from a raw image (sparse, fast)",
        description="Write RAW's data followed by a fixed-VHD footer to VHD. RAW is not "
        "changed; VHD stays as sparse as RAW.",
    )
    fr.add_argument("raw", type=Path, help="the raw disk image (a whole number of MiB); read only")
    fr.add_argument("vhd", type=Path, help="the VHD file to write")
    fr.add_argument("--force", action="store_true", help="replace VHD if it exists")

    demo.add_parser(sub, common)
    manifest.add_parser(sub, common)

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


def _planned(step: Step, loaded: Loaded) -> list[str]:
    """The dry-run lines of `step`: its plan as it would be made now."""
    try:
        return describe(step.plan(loaded.settings))
    except (UserError, OSError, ValueError) as exc:
        # A plan that needs an earlier step's output cannot be made before that step ran.
        return [f"# made when the earlier steps have run ({exc})"]


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
        for line in _planned(s.step, loaded):
            print(f"        {line}")
    return 0


def _settings_show(loaded: Loaded, as_json: bool) -> None:
    if as_json:
        shown = {
            v.key: {"value": "**********" if v.secret else v.value, "origin": v.origin}
            for v in values(loaded)
        }
        path = str(loaded.path) if loaded.path else None
        print(json.dumps({"file": path, "file_origin": loaded.path_origin, "settings": shown}))
        return
    print(f"# settings file: {loaded.path or '(none)'} ({loaded.path_origin})")
    for line in toml_lines(loaded):
        print(line)


def _vhd(args: argparse.Namespace) -> int:
    from archkernel.formats import vhd_file

    if args.vhd_command == "check":
        report = vhd_file.examine(args.file)
        if args.json:
            results = [{"rule": r.rule, "ok": r.ok, "detail": r.detail} for r in report.results]
            print(
                json.dumps(
                    {
                        "path": report.path,
                        "file_size": report.file_size,
                        "ok": report.ok,
                        "rules": results,
                        "truncated": report.truncated,
                        "hint": report.hint,
                    }
                )
            )
            return 0 if report.ok else 1
        if report.problems:
            for problem in report.problems:
                print(f"FAIL {problem}")
            print(f"{args.file}: {len(report.problems)} problem(s); Azure would reject it")
            if report.hint:
                print(f"  hint: {report.hint}")
            return 1
        print(f"{args.file}: a fixed VHD that Azure accepts")
        return 0
    if args.vhd_command == "from-raw":
        vhd_file.from_raw(args.raw, args.vhd, replace=args.force)
        print(f"wrote {args.vhd}")
        return 0
    raise UserError("vhd needs an action: check or from-raw", "see `archkernel vhd --help`")


def _outputs_line(wf: Workflow, loaded: Loaded) -> None:
    """One line per final output of a finished run: its path and size."""
    for path in wf.outputs(loaded.settings) if wf.outputs else []:
        try:
            st = path.stat()
        except OSError:
            continue
        used = st.st_blocks * 512
        size = human_size(st.st_size)
        if used < st.st_size:  # sparse: what it holds matters as much as its size
            size += f", {human_size(used)} used"
        log.info("%s: %s (%s)", wf.name, path, size)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `archkernel` console script."""
    try:
        parser = _parser()
        args, extra = parser.parse_known_args(argv)
        if extra:
            _late_positional(parser, args, extra)
        quiet, verbose = getattr(args, "quiet", False), getattr(args, "verbose", 0)
        logmod.setup(-1 if quiet else verbose)
        os.environ["ARCHKERNEL_VERBOSE"] = str(-1 if quiet else verbose)
        try:
            code = _main(parser, args)
        except UserError as exc:
            log.error("%s", exc)
            code = 1
        except KeyboardInterrupt:
            log.error("interrupted; finished steps are kept, run the same command to resume")
            code = 130
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # The reader went away (`archkernel steps azure_vhd | head -4`): stop quietly, as a
        # tool killed by SIGPIPE would. stdout now leads nowhere, so the final flush at
        # exit cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return BROKEN_PIPE_STATUS


def _late_positional(
    parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]
) -> None:
    """argparse reads `demo azure_vhd --profile functional DIR` as if DIR came with the
    workflow (no DIR), then leaves DIR over: take it as DIR. Anything else left over is
    an error, as `parse_args` would say."""
    if (
        getattr(args, "command", None) == "demo"
        and getattr(args, "dir", None) is None
        and len(extra) == 1
        and not extra[0].startswith("-")
    ):
        args.dir = Path(extra[0])
        return
    parser.error(f"unrecognized arguments: {' '.join(extra)}")


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "vhd":
        return _vhd(args)
    if args.command == "demo":
        return demo.run(args)
    if args.command == "manifest":
        return manifest.run(args)
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
        _settings_show(loaded, getattr(args, "json", False))
        return 0
    if args.command == "list":
        for wf in workflows().values():
            print(f"{wf.name}: {wf.doc}")
            for step in wf.steps(loaded):
                print(f"  {step.id:<24} {step.doc}")
        return 0
    if args.command == "steps":
        get_workflow(args.workflow)
        states = step_states(loaded, args.workflow)
        if args.json:
            shown = [s.as_json() for s in states]
            print(json.dumps({"workflow": args.workflow, "steps": shown}))
        else:
            print_steps(states)
        return 0
    if args.command == "clean":
        return clean_workflow(loaded, get_workflow(args.workflow))
    if args.command == "doit":
        return _doit(loaded, list(args.args))
    # run
    wf = get_workflow(args.workflow)
    first = parse_step_number(args.from_step, "--from")
    last = parse_step_number(args.to_step, "--to")
    count = len(wf.steps(loaded))
    error = step_range_error(wf.name, count, first, last, ("--from", "--to"))
    if error is not None:
        raise error
    if args.dry_run:
        return _dry_run(loaded, args.workflow, first, last)
    code = _doit(loaded, ["run", args.workflow], first, last, only=args.workflow)
    remember(loaded)
    if code == 0 and (last is None or last == count):
        _outputs_line(wf, loaded)
    return code


if __name__ == "__main__":
    sys.exit(main())
