"""`archkernel demo WORKFLOW [DIR]`: a workflow on an embedded default, no cloud, no mirror.

The library part is `archkernel.demo`; this module is the command. Each demo prepares what
its workflow needs, then runs it through `archkernel run` itself (`cli.main`), so what
runs, resumes and fails is what a real run does, and ends with a summary on stdout.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from archkernel.errors import UserError

DESCRIPTION = """\
Run a workflow on an embedded default, on this machine, as root, with only what
.ci/setup installs (Debian packages come from the package mirrors, nothing else from the
network).

azure_vhd: build a small, real pacman repository in DIR (Debian's kernel and busybox
under Arch's package names, stand-ins for the rest) and DIR/settings.toml for it; then run
`archkernel run azure_vhd` and `archkernel run azure_boottest` with those settings. Ends
with the VHD's path, its verify result and the boot result. Run it again to resume where
it stopped (or to do nothing, when all is done); edit DIR/settings.toml to try other
settings (it is kept).

With --profile functional the repository holds Debian 12's real systemd, udev, OpenSSH,
sudo, Python, cloud-init and waagent repacked under Arch's names and layout
(archkernel.demo.functional), DIR/settings.toml sets azure.boottest_mode = "provision",
and the boot test proves the provisioning on a stand-in Azure fabric.

scaleway_kexec: stand up a fake Scaleway C1 in DIR: a root tree with a kernel and a
module tree, in.tftpd on 127.0.0.1 serving a mkimage-made bootscript and initrd, and
recording stand-ins for kexec and systemctl first on PATH; run `archkernel run
scaleway_kexec` against it, print the kexec command line and what was added to the
initrd, and stop the server. Nothing is kexec'd.
"""

EPILOG = """\
examples:
  archkernel demo azure_vhd                       build and boot in ./archkernel-demo
  archkernel demo azure_vhd /var/tmp/demo -v      elsewhere, logging every command
  archkernel demo azure_vhd --profile functional DIR   real services, provisioning proven
  archkernel demo scaleway_kexec                  the kexec workflow in ./archkernel-demo-c1
  ARCHKERNEL_AZURE__GENERATION=2 archkernel demo azure_vhd   a UEFI image (settings from
                                                  the environment apply as in `run`)

A missing tool is named with its package before anything is downloaded. Debian's kernel
and busybox packages are downloaded once into $ARCHKERNEL_TEST_CACHE (default
~/.cache/archkernel-tests), shared with the tests. The summary goes to stdout and the
log to stderr: `archkernel demo azure_vhd > demo.log 2>&1` keeps both.
"""

DEMOS = {"azure_vhd": "archkernel-demo", "scaleway_kexec": "archkernel-demo-c1"}


def add_parser(sub: Any, common: list[argparse.ArgumentParser]) -> None:
    """Register `archkernel demo` on the subcommands `sub` (`common`: -v and -q)."""
    demo = sub.add_parser(
        "demo",
        parents=common,
        help="run a workflow on an embedded default (no cloud, no Arch mirror)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("workflow", choices=list(DEMOS), help="azure_vhd or scaleway_kexec")
    demo.add_argument(
        "--profile",
        choices=("small", "functional"),
        default="small",
        help="azure_vhd: the small stand-in repository (default), or Debian's real services "
        "repacked as Arch packages, with the provisioning boot test",
    )
    demo.add_argument(
        "dir",
        nargs="?",
        type=Path,
        help="where everything goes (default: ./archkernel-demo, ./archkernel-demo-c1)",
    )


def run(args: argparse.Namespace) -> int:
    """`archkernel demo` with the parsed `args`."""
    if args.settings:
        raise UserError(
            "archkernel demo writes and uses its own settings (DIR/settings.toml)",
            "leave out --settings; edit DIR/settings.toml after the first run instead",
        )
    directory = Path(args.dir or DEMOS[args.workflow])
    flags = _verbosity(args)
    if args.workflow == "azure_vhd":
        return azure_vhd(directory, flags, getattr(args, "profile", "small"))
    return scaleway_kexec(directory, flags)


def _verbosity(args: argparse.Namespace) -> list[str]:
    if getattr(args, "quiet", False):
        return ["-q"]
    return ["-v"] * int(getattr(args, "verbose", 0) or 0)


def _archkernel_run(workflow: str, settings: Path, flags: Sequence[str]) -> int:
    """`archkernel [FLAGS] --settings SETTINGS run WORKFLOW`, in this process."""
    from .cli import main  # cli imports this module to register the command

    return main([*flags, "--settings", str(settings), "run", workflow])


def azure_vhd(directory: Path, flags: Sequence[str], profile: str = "small") -> int:
    """The repository, then azure_vhd and azure_boottest, then the summary."""
    from archkernel.demo import azure, functional, offline
    from archkernel.host.run import check_tools
    from archkernel.settings import load

    directory = directory.resolve()
    if profile == "functional":
        settings_file = functional.build(directory).settings
    else:
        settings_file = offline.write_settings(directory)
    check_tools(azure.tools(load(settings_file).settings), "archkernel demo azure_vhd")
    if profile != "functional":
        offline.build(directory)
    for workflow in ("azure_vhd", "azure_boottest"):
        code = _archkernel_run(workflow, settings_file, flags)
        if code != 0:
            return code
    settings = load(settings_file).settings
    if settings.azure.boottest_mode == "provision":
        for line in _provision_report(settings):
            print(line)
        return 0
    for line in azure.report(azure.outcome(settings), settings_file):
        print(line)
    return 0


def _provision_report(settings: Any) -> list[str]:
    """The demo's last lines for a provisioning boot test: each proof of each boot."""
    import json

    from archkernel.azure import boottest

    lines = ["archkernel demo azure_vhd: provisioning proven"]
    for test in boottest.boot_tests(settings):
        lines.append(f"  {test.firmware_name}: {test.stamp}")
        for key, value in json.loads(test.stamp.read_text()).items():
            lines.append(f"    {key}: {value}")
    return lines


def scaleway_kexec(directory: Path, flags: Sequence[str]) -> int:
    """A fake C1 on loopback, scaleway_kexec against it, then the summary."""
    from archkernel.demo import scaleway

    with scaleway.standing_c1(directory) as c1:
        code = _archkernel_run("scaleway_kexec", c1.settings, flags)
        if code != 0:
            return code
        result = scaleway.outcome(c1)
    for line in scaleway.report(result, c1):
        print(line)
    return 0
