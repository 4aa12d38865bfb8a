"""The image's build-time administrator (`[azure.user]`): its account, password and keys.

`useradd` makes the account (its argv is a `Run` of step 3's plan); the password hash is
written into /etc/shadow here rather than with `usermod -p`, so that it is on no command
line, and the SSH keys go to ~/.ssh/authorized_keys, owned by the user.
"""

from __future__ import annotations

import os
from pathlib import Path

from archkernel.errors import UserError
from archkernel.host.files import write_text
from archkernel.log import log
from archkernel.settings import AzureUser

GROUPS = ["wheel"]  # sudo for wheel: see config.sudoers_wheel
SHELL = "/bin/bash"


def useradd_argv(root: Path, name: str) -> list[str]:
    """The command that adds the user `name`, with a home and its own group, to `root`."""
    return [
        "useradd",
        "--root",
        str(root),
        "--create-home",
        "--user-group",
        "--groups",
        ",".join(GROUPS),
        "--shell",
        SHELL,
        name,
    ]


def password_login(user: AzureUser | None) -> bool:
    """Whether sshd accepts passwords: only for a user with a password hash and no keys."""
    return user is not None and user.password_hash is not None and not user.ssh_authorized_keys


def with_password(shadow: str, name: str, password_hash: str) -> str:
    """/etc/shadow text with `name`'s password field set to `password_hash`."""
    lines = []
    for line in shadow.splitlines():
        fields = line.split(":")
        if fields[0] == name:
            fields[1] = password_hash
        lines.append(":".join(fields))
    return "\n".join(lines) + "\n"


def passwd_ids(passwd: str, name: str) -> tuple[int, int]:
    """(uid, gid) of `name` in /etc/passwd text; UserError when it is not there."""
    for line in passwd.splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2]), int(fields[3])
    raise UserError(f"user {name} was not created in the image", "see useradd's output above")


def set_password(root: Path, user: AzureUser) -> None:
    """Write the user's password hash into `root`'s /etc/shadow (mode 0600)."""
    if user.password_hash is None:
        return
    shadow = root / "etc/shadow"
    text = with_password(shadow.read_text(), user.name, user.password_hash.get_secret_value())
    write_text(shadow, text, 0o600)


def install_keys(root: Path, user: AzureUser) -> None:
    """~/.ssh/authorized_keys with the user's keys, the user owning ~, ~/.ssh and the file."""
    uid, gid = passwd_ids((root / "etc/passwd").read_text(), user.name)
    home = root / "home" / user.name
    ssh = home / ".ssh"
    ssh.mkdir(mode=0o700, parents=True, exist_ok=True)
    keys = ssh / "authorized_keys"
    write_text(keys, "".join(k + "\n" for k in user.ssh_authorized_keys), 0o600)
    for path in (home, ssh, keys):
        os.chown(path, uid, gid)
    log.info("user %s (wheel) with %d SSH key(s)", user.name, len(user.ssh_authorized_keys))
