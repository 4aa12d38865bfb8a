"""azure_vhd: an Arch Linux image that Azure accepts (steps come with their issue)."""

from tasks.steps import Workflow

WORKFLOWS: list[Workflow] = []
