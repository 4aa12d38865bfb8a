"""`archkernel manifest diff A B`: what differs between two builds' manifests.

The library part is `archkernel.azure.manifest`; this module is the command.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from archkernel.errors import UserError
from archkernel.log import log

DESCRIPTION = """\
Compare two manifests that step 9 of azure_vhd wrote (workdir/azure/manifest.json, or
<vhd>.manifest.json beside a VHD) and print one line per difference: archkernel's version,
a setting, the package source, a package (version, repository, sha256 of its file), a
tool's version, an ID, an output's size and sha256.

Exit status: 0 when the manifests are the same, 1 when they differ, 2 when one cannot be
read.
"""

EPILOG = """\
example:
  archkernel manifest diff old/azure/manifest.json build/azure/manifest.json

output, one line per difference (SECTION KEY: OLD -> NEW; (none): absent):
  package linux: 6.12.1-1 from core, sha256 0f3e... -> 6.12.2-1 from core, sha256 9a1c...
  id root_uuid: 0b6d3c3e-... -> 5a8f4f3e-...
"""

# Exit status when a manifest cannot be read (as diff and cmp: 0 same, 1 different).
TROUBLE = 2


def add_parser(sub: Any, common: list[argparse.ArgumentParser]) -> None:
    """Register `archkernel manifest` on the subcommands `sub` (`common`: -v and -q)."""
    manifest = sub.add_parser(
        "manifest", parents=common, help="compare the manifests of two azure_vhd builds"
    )
    actions = manifest.add_subparsers(dest="manifest_command", metavar="ACTION")
    diff = actions.add_parser(
        "diff",
        parents=common,
        help="what differs between two manifests; exit 0 when none",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    diff.add_argument("a", type=Path, help="the first manifest")
    diff.add_argument("b", type=Path, help="the second manifest")


def run(args: argparse.Namespace) -> int:
    """`archkernel manifest` with the parsed `args`."""
    from archkernel.azure import manifest

    if args.manifest_command != "diff":
        raise UserError("manifest needs an action: diff", "see `archkernel manifest --help`")
    try:
        a, b = manifest.load(args.a), manifest.load(args.b)
    except UserError as exc:
        log.error("%s", exc)
        return TROUBLE
    differences = manifest.diff(a, b)
    for difference in differences:
        print(difference.line())
    if not differences:
        print(f"{args.a} and {args.b} describe the same build")
        return 0
    return 1
