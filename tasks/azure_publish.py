"""azure_publish: take the VHD azure_vhd built and checked into Azure.

Each step is a function of `archkernel.azure.publish.steps` that returns its plan; this
module says only in which order they run and which files each makes and reads. Step 1
reads step 9's report and manifest of azure_vhd, so a new image is checked again; the
upload (step 3, or 2 for the blob target) resumes from what the service already holds.
"""

from __future__ import annotations

from archkernel.azure import workspace
from archkernel.azure.publish import steps
from archkernel.settings import Settings

from .steps import Step, Workflow


def build(s: Settings) -> list[Step]:
    """The steps of azure_publish, in order: five for a gallery, two for a blob."""
    w, p = workspace.paths(s), steps.paths(s)
    check = Step.of(
        steps.check_vhd,
        targets=[p.stamp("check")],
        # Step 9's report and manifest (not the 30 GiB VHD: step 1 compares its sha256 with
        # the manifest's), so a VHD restored from CI artifacts publishes too.
        file_dep=[w.report, w.manifest],
    )
    if s.azure.publish.target == "blob":
        return [
            check,
            Step.of(steps.upload_vhd, targets=[p.stamp("upload")], file_dep=[p.stamp("check")]),
        ]
    return [
        check,
        Step.of(steps.disk, targets=[p.stamp("disk")], file_dep=[p.stamp("check")]),
        Step.of(steps.upload_vhd, targets=[p.stamp("upload")], file_dep=[p.stamp("disk")]),
        Step.of(
            steps.image,
            targets=[p.stamp("gallery")],
            file_dep=[p.stamp("disk"), p.stamp("upload")],
        ),
        Step.of(steps.cleanup, targets=[p.stamp("cleanup")], file_dep=[p.stamp("gallery")]),
    ]


WORKFLOWS = [
    Workflow(
        "azure_publish",
        "publish the azure_vhd image to an Azure Compute Gallery (or a page blob)",
        build,
        outputs=lambda s: [steps.paths(s).record],
    )
]
