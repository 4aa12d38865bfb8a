"""doit entry point: `doit list --all`, `doit run azure_vhd`, `doit run scaleway_kexec`.

Variables: `settings=PATH` (settings file), `from=N` (force step N and later to re-run),
`to=M` (stop after step M). The tasks themselves live in `tasks/`.
"""

from doit import get_var

from tasks import namespace

globals().update(namespace(get_var("settings"), get_var("from"), get_var("to")))
