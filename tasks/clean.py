"""`archkernel clean`: remove a workflow's intermediate trees, keep its final outputs."""

from __future__ import annotations

import os
from pathlib import Path

from archkernel.errors import UserError
from archkernel.host.files import is_under, remove_path
from archkernel.settings import Loaded
from archkernel.units import GiB, KiB, MiB

from . import doit_config
from .steps import Workflow, read_state, task_name


def human_size(size: int) -> str:
    """`512 MiB`, `1.5 GiB`, `900 KiB`: one decimal at most, none when it is 0."""
    for unit, factor in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= factor:
            return f"{size / factor:.1f}".removesuffix(".0") + f" {unit}"
    return f"{size} bytes"


def _disk_usage(tree: Path) -> int:
    """Bytes the files under `tree` take on disk (hard links counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for top, dirs, files in os.walk(tree):
        for name in [*dirs, *files]:
            try:
                st = os.lstat(os.path.join(top, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def clean_workflow(loaded: Loaded, wf: Workflow) -> int:
    """`archkernel clean`: remove `wf`'s intermediate trees and forget its steps."""
    settings = loaded.settings
    trees = wf.intermediates(settings) if wf.intermediates else []
    if not trees:
        print(f"{wf.name} keeps no intermediate trees: nothing to remove")
        return 0
    workdir = settings.workdir.resolve()
    for tree in trees:
        where = os.path.abspath(tree)
        if where == str(workdir) or not is_under(where, workdir):
            # A wrong declaration must not remove anything the build does not own.
            raise UserError(f"{wf.name} would clean {tree}: not inside the workdir {workdir}")
    present = [t for t in trees if t.exists() or t.is_symlink()]
    if not present:
        print(f"{wf.name}: no intermediate trees to remove")
        return 0
    # First forget the steps: whatever happens next, no record claims work that is gone.
    dep_file = Path(doit_config(loaded)["dep_file"])
    if dep_file.exists():
        state = read_state(dep_file)
        for step in wf.steps(loaded):
            state.remove(task_name(wf.name, step))
        state.close()
    for tree in present:
        size = _disk_usage(tree) if tree.is_dir() else 0
        remove_path(tree)
        print(f"removed {tree} ({human_size(size)})")
    kept = [p for p in (wf.outputs(settings) if wf.outputs else []) if p.exists()]
    for path in kept:
        print(f"kept    {path}")
    print(f"the next `archkernel run {wf.name}` runs every step again")
    return 0
