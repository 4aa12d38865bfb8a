"""scaleway_kexec: boot the Arch kernel on a Scaleway C1 (steps come with their issue)."""

from tasks.steps import Workflow

WORKFLOWS: list[Workflow] = []
