"""The users the Azure Linux Agent makes administrators join wheel, Arch's admin group.

On Linux (Arch's ArchUtil keeps the generic code) waagent creates the user of the
provisioning media with `useradd -m` and grants it sudo with a line of
/etc/sudoers.d/waagent. It puts nobody in `wheel`, yet on Arch wheel is more than sudo:
polkit's default rule makes its members the administrators it authenticates, and the
journal's ACLs let them read it. cloud-init puts its user in wheel. So that both agents
give the same administrator, a path unit watches waagent's sudoers file: each account it
names joins wheel, and leaves it when the file stops naming it, so that wheel (which
/etc/sudoers.d/10-wheel makes sudoers too) never outlasts the agent's grant.
"""

from __future__ import annotations

PATH_UNIT = "archkernel-waagent-wheel.path"
SERVICE_UNIT = "archkernel-waagent-wheel.service"
SUDOERS = "/etc/sudoers.d/waagent"  # waagent.conf's OS.SudoersDir, its default
SCRIPT = "/usr/local/lib/archkernel/waagent-wheel"
STATE = "/var/lib/archkernel/waagent-wheel"  # the accounts the program put in wheel, NAME:UID


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
    """Run the program over waagent's sudoers file, keeping its state in /var/lib."""
    return f"""\
# Written by archkernel: started by {PATH_UNIT}.
[Unit]
Description=Put the users waagent made sudoers in wheel (archkernel)

[Service]
Type=oneshot
StateDirectory=archkernel
ExecStart={SCRIPT} {SUDOERS} {STATE}
"""


def script() -> str:
    """The POSIX shell program. Each account a line of waagent's form names (`NAME
    ALL=(ALL) ALL`, `NOPASSWD:` before the last ALL when it has no password; blanks around
    `=` allowed) and not in wheel joins it (`gpasswd -a`), and is written in the state
    file (`NAME:UID`). One the state file lists that the sudoers file no longer names (a
    line removed, the file rewritten or deleted) leaves wheel (`gpasswd -d`), so wheel never
    outlasts the sudo grant; an account that was in wheel before is never removed, nor is
    a later account of the same name with another uid (the listed one was deleted). The
    state is written before gpasswd runs, and a state file it cannot read or write, or
    holding a line that is no `NAME:UID`, changes nothing (the run fails): no account is
    ever in wheel by this program unrecorded. Other lines of the sudoers file are ignored;
    a name is a user name (no blank, no leading `-`, not a number) before it reaches a
    command line.

    The unit starts at the file's first change, which may be waagent's opening it, before
    its line is written, and systemd drops the file's events while the service runs: so
    the program reads the file again until it has not changed for a second (at most 10
    passes). `--dry-run` prints the commands of one pass instead of running them."""
    return (
        r"""#!/bin/sh
# Written by archkernel. waagent grants sudo in @SUDOERS@ and puts
# nobody in wheel, Arch's admin group (polkit, the journal): each account that
# file names joins wheel, and leaves it when the file no longer names it (if it
# joined here; the state file lists those, as NAME:UID). Started by @PATH_UNIT@.
# Usage: waagent-wheel [--dry-run] [SUDOERS [STATE]]
# shellcheck disable=SC2086  # lists of names are split on blanks, never globbed:
set -uf
run=
if [ "${1:-}" = --dry-run ]; then run="echo"; shift; fi
sudoers=${1:-@SUDOERS@}
state=${2:-@STATE@}
name='[A-Za-z0-9_][A-Za-z0-9_.-]*'
record="$name:[0-9]+"
b='[[:blank:]]'

in_wheel() { case " $(id -nG -- "$1" 2>/dev/null) " in *" wheel "*) return 0 ;; esac; return 1; }
listed() { printf '%s\n' $2 | grep -qxF -- "$1"; }
signature() { stat -c '%z %s' -- "$sudoers" 2>/dev/null || echo none; }

# The state file: the accounts this program put in wheel, NAME:UID a line: a later
# account of a deleted one's name is not the one put there. Written whole
# and synced, then moved into place; a failure leaves the previous one.
save() {
    { mkdir -p -- "$(dirname -- "$state")" &&
        if [ $# -eq 0 ]; then : >"$state.new"; else printf '%s\n' "$@" >"$state.new"; fi &&
        sync -- "$state.new" && mv -f -- "$state.new" "$state"; } ||
        { echo "cannot write $state: wheel left as it is" >&2; return 1; }
}

sync_wheel() {
    named='' joined='' kept='' adding='' leaving='' failed=0
    if [ -e "$sudoers" ]; then
        named=$(sed -n -E "s/^($name)$b+ALL$b*=$b*\(ALL(:ALL)?\)$b+(NOPASSWD:$b*)?ALL$b*\$/\1/p" \
            "$sudoers") || return 1
        named=$(printf '%s\n' $named | sort -u)  # a name on two lines is one account
    fi
    if [ -e "$state" ]; then
        # grep: 1 is no line, 2 an error (then nobody's membership is known: change nothing)
        joined=$(grep -xE -- "$record" "$state") || [ $? -eq 1 ] || return 1
        # Any other line (another format, a number for a name) is not this program's: whom
        # it put in wheel is unknown, so nothing changes.
        if grep -qvxE -- "$record" "$state" || printf '%s\n' $joined | grep -qE '^[0-9]+:'; then
            echo "$state has a line that is no NAME:UID: wheel left as it is" >&2
            return 1
        fi
    fi
    for user in $named; do
        case $user in *[!0-9]*) ;; *) continue ;; esac  # id would take it for a uid
        if ! uid=$(id -u -- "$user" 2>/dev/null); then
            echo "$sudoers names $user, which is no user: left alone" >&2
        elif ! in_wheel "$user"; then
            adding="$adding $user:$uid"
        elif listed "$user:$uid" "$joined"; then
            kept="$kept $user:$uid"
        fi
    done
    # A record whose account is gone, or is another one now, is dropped: not this one's.
    for entry in $joined; do
        user=${entry%%:*}
        if ! listed "$user" "$named" && [ "$(id -u -- "$user" 2>/dev/null)" = "${entry#*:}" ] &&
            in_wheel "$user"; then
            leaving="$leaving $entry"
        fi
    done
    # Recorded before gpasswd runs: an account in wheel by this program is always listed.
    if [ -z "$run" ]; then save $kept $adding $leaving || return 1; fi
    for entry in $adding; do
        if $run gpasswd -a "${entry%%:*}" wheel; then kept="$kept $entry"; else failed=1; fi
    done
    for entry in $leaving; do
        if ! $run gpasswd -d "${entry%%:*}" wheel; then failed=1; kept="$kept $entry"; fi
    done
    if [ -z "$run" ]; then save $kept || failed=1; fi
    return $failed
}

passes=0
while :; do
    before=$(signature)
    status=0
    sync_wheel || status=1
    passes=$((passes + 1))
    if [ -n "$run" ]; then break; fi
    sleep 1
    if [ "$(signature)" = "$before" ]; then break; fi
    if [ "$passes" -ge 10 ]; then
        echo "$sudoers still changes after $passes passes: run again later" >&2
        status=1
        break
    fi
done
exit "$status"
""".replace("@SUDOERS@", SUDOERS)
        .replace("@STATE@", STATE)
        .replace("@PATH_UNIT@", PATH_UNIT)
    )


def files() -> dict[str, tuple[str, int]]:
    """What the build writes, path under the root -> (text, mode): local units in /etc
    and a program in /usr/local, as no package owns them."""
    return {
        f"etc/systemd/system/{PATH_UNIT}": (path_unit(), 0o644),
        f"etc/systemd/system/{SERVICE_UNIT}": (service_unit(), 0o644),
        SCRIPT.lstrip("/"): (script(), 0o755),
    }
