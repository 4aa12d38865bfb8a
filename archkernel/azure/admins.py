"""The users the Azure Linux Agent makes administrators join wheel, Arch's admin group.

waagent (upstream, on every distribution) creates the user of the provisioning media with
`useradd -m` and grants it sudo with a line of /etc/sudoers.d/waagent. It puts nobody in
`wheel`, yet on Arch wheel is more than sudo: polkit's default rule makes its members
administrators (`systemctl restart` works for them without sudo), and the journal's ACLs
let them read it. cloud-init puts its user in wheel. So that both agents give the same
administrator, a path unit watches waagent's sudoers file and puts each account it names
in wheel. That gives nothing the sudoers line does not: whoever the file names is root
through sudo already.
"""

from __future__ import annotations

PATH_UNIT = "archkernel-waagent-wheel.path"
SERVICE_UNIT = "archkernel-waagent-wheel.service"
SUDOERS = "/etc/sudoers.d/waagent"  # waagent.conf's OS.SudoersDir, its default
SCRIPT = "/usr/local/lib/archkernel/waagent-wheel"


def path_unit() -> str:
    """Start the service whenever waagent writes its sudoers file; active before waagent
    starts (path units come up before basic.target, waagent after it)."""
    return f"""\
# Written by archkernel: waagent's administrators join wheel (see {SCRIPT}).
[Unit]
Description=Watch waagent's sudoers file (archkernel)
Before=waagent.service

[Path]
PathChanged={SUDOERS}

[Install]
WantedBy=paths.target
"""


def service_unit() -> str:
    """Run the script once over waagent's sudoers file."""
    return f"""\
# Written by archkernel: started by {PATH_UNIT}.
[Unit]
Description=Put the users waagent made sudoers in wheel (archkernel)

[Service]
Type=oneshot
ExecStart={SCRIPT} {SUDOERS}
"""


def script() -> str:
    """The POSIX shell program: for each line waagent writes (`NAME ALL=(ALL) ALL`, with
    `NOPASSWD:` when the user has no password) whose NAME is an account not yet in wheel,
    `gpasswd -a NAME wheel`. Any other line is ignored; a name is a user name (no blank,
    no leading `-`, at most 32 characters) before it reaches a command line. With
    `--dry-run` it prints the commands instead. A user the file no longer names stays in
    wheel: the file cannot say whether the agent put it there."""
    return f"""\
#!/bin/sh
# Written by archkernel. waagent grants sudo in {SUDOERS} and puts
# nobody in wheel, Arch's admin group (polkit, the journal): each account
# that file names joins wheel. Started by {PATH_UNIT}.
# Usage: waagent-wheel [--dry-run] [FILE]
set -uf  # names are split on blanks, never globbed
run=
if [ "${{1:-}}" = --dry-run ]; then run="echo"; shift; fi
sudoers=${{1:-{SUDOERS}}}
[ -r "$sudoers" ] || exit 0
status=0
names=$(sed -n -E 's/^([A-Za-z0-9_][A-Za-z0-9_.-]{{0,31}}) ALL=\\(ALL\\)( NOPASSWD:)? ALL$/\\1/p' \\
    "$sudoers")
for name in $names; do
    if ! groups=$(id -nG -- "$name" 2>/dev/null); then
        echo "$sudoers names $name, which is no user: left alone" >&2
        continue
    fi
    case " $groups " in *" wheel "*) continue ;; esac
    $run gpasswd -a "$name" wheel || status=1
done
exit $status
"""


def files() -> dict[str, tuple[str, int]]:
    """What the build writes, path under the root -> (text, mode): local units in /etc
    and a program in /usr/local, as no package owns them."""
    return {
        f"etc/systemd/system/{PATH_UNIT}": (path_unit(), 0o644),
        f"etc/systemd/system/{SERVICE_UNIT}": (service_unit(), 0o644),
        SCRIPT.lstrip("/"): (script(), 0o755),
    }
