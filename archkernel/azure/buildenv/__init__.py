"""The bootstrap build environment: the Azure build's tools from Arch's own userland.

With `azure.builder = "container"` the Azure workflow does not use the build host's
pacstrap, mkfs, sfdisk and GRUB but those of an Arch root file system made from Arch's
bootstrap tarball (see `archkernel.azure.bootstrap` for obtaining and verifying it), as
the old scripts did with a privileged Docker container, but without needing a daemon:

    env = buildenv.prepare(settings.azure, settings.workdir)        # step 1
    with buildenv.activate(settings.azure, settings.workdir) as env:  # every step
        run(["pacstrap", ...])       # runs inside the environment
        run(["losetup", ...])        # still runs on the host

`prepare` obtains the tarball, unpacks it under `workdir/buildenv/<sha256 prefix>/root`,
points its pacman at `azure.mirror`, initialises its pacman keyring and installs build
tools it lacks (both inside the environment, when it is an Arch one), and records all that
in `workdir/buildenv/buildenv.json`. A second build with the same tarball reuses the
tree; a different tarball replaces it. `activate` installs a `run()` wrapper
(`archkernel.host.run.wrapping`) so that every command whose tool is in `ROUTED_TOOLS` runs
inside; the others stay on the host.

Where the environment's commands run (`azure.container_runtime`):
- `chroot` (default): each command gets its own private mount namespace and PID namespace
  (`unshare`, then the `exec.py` helper), in which the work directory, the temporary
  directory and any other shared path are bind-mounted at the *same absolute path*, plus
  /proc, /sys, /dev and /run; then it is chrooted into the tree. Paths need no
  translation, mounts the host makes meanwhile (a loop-mounted image) are seen, and when
  the command ends the kernel removes its mounts and ends its leftover processes (a
  gpg-agent): nothing is mounted in the host's namespace, so Ctrl-C or `kill -9` cannot
  leave anything behind.
- `docker` / `podman`: the tree is imported once as an image (`archkernel-buildenv:...`)
  and each command is `docker run --rm --privileged` with the same paths as volumes.

Only tools that build the image run inside (the Arch tools, and the file system, partition
and boot loader tools whose versions must match what they make). Tools that act on the
host kernel's state stay on the host: `losetup`, `partx`, `mount` and `umount` (a mount
made in a command's private namespace would vanish with it), and so do the container
runtimes themselves, gpgv (it checks the environment before there is one), bsdtar, cp and
qemu.

The package, by concern: `routing` (which tools run inside, the host command that runs
one there, the `BuildEnv` wrapper), `state` (step 1's record and its lock), `prepare`
(obtain, verify, unpack, set up; `prepare`, `load`, `activate`), `containers` (docker and
podman containers of killed runs, removed by the next run) and `exec.py` (the chroot
helper, standard library only, started by path).
"""

from __future__ import annotations

from archkernel.azure.buildenv.prepare import (
    ACTIVATION_SETTINGS,
    SETTINGS,
    activate,
    load,
    prepare,
    required_tools,
    shared_paths,
)
from archkernel.azure.buildenv.routing import (
    ENV_PATH,
    HELPER,
    ROUTED_TOOLS,
    Bind,
    BuildEnv,
    Runtime,
    chroot_argv,
    container_argv,
    find_tool,
    merge_binds,
    pacman_conf_binds,
    resolve_in_root,
)
from archkernel.azure.buildenv.state import State, directory, state_file

__all__ = [
    "ACTIVATION_SETTINGS",
    "ENV_PATH",
    "HELPER",
    "ROUTED_TOOLS",
    "SETTINGS",
    "Bind",
    "BuildEnv",
    "Runtime",
    "State",
    "activate",
    "chroot_argv",
    "container_argv",
    "directory",
    "find_tool",
    "load",
    "merge_binds",
    "pacman_conf_binds",
    "prepare",
    "required_tools",
    "resolve_in_root",
    "shared_paths",
    "state_file",
]
