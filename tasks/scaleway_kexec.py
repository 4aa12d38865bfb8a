"""scaleway_kexec: boot the Arch kernel on a Scaleway C1 by patching the provider's initrd.

Each step is a function of `archkernel.scaleway.steps` that returns its plan; this module
says only in which order they run and which files each makes and reads. Steps 1, 2, 7
and 8 always run (they read the live system, the boot server and /run); steps 3-6 run
only when what they read changed, so an unchanged bootscript and kernel give the cached
boot path: fetch the bootscript, kexec.
"""

from __future__ import annotations

from archkernel.scaleway import steps, workspace
from archkernel.settings import Settings

from .steps import Step, Workflow


def build(s: Settings) -> list[Step]:
    """The steps of scaleway_kexec, in order."""
    p = workspace.paths(s)
    output = p.system(s.scaleway.output_initrd)
    return [
        Step.of(steps.check, targets=[p.check], always=True),
        Step.of(steps.fetch_bootscript, targets=[p.bootscript], file_dep=[p.check], always=True),
        Step.of(steps.fetch_initrd, targets=[p.uinitrd, p.initrd_info], file_dep=[p.bootscript]),
        Step.of(steps.unpack, targets=[p.payload, p.listing], file_dep=[p.uinitrd, p.initrd_info]),
        Step.of(steps.modules, targets=[p.modules_manifest], file_dep=[p.check]),
        Step.of(
            steps.pack,
            targets=[p.packed, output],
            file_dep=[p.payload, p.listing, p.modules_manifest],
        ),
        Step.of(steps.shutdown, file_dep=[p.check], always=True),
        Step.of(steps.kexec, file_dep=[p.check, output], always=True),
    ]


WORKFLOWS = [
    Workflow(
        "scaleway_kexec",
        "boot the Arch kernel on a Scaleway C1: patch the provider's initrd, kexec",
        build,
        halted=lambda loaded: steps.halted(loaded.settings),
        # The system's root only says where its files are: they are the steps' inputs.
        locating=("workdir", "scaleway.root"),
        outputs=lambda s: [workspace.paths(s).system(s.scaleway.output_initrd)],
    )
]
