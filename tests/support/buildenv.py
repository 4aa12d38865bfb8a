"""A build environment for the tests that is not the host's userland, and signing keys.

    python -m tests.support.buildenv        # build (or find) the cached tarball, print its path

No Arch mirror is reachable from the test machines, so the bootstrap build environment the
tests run tools in is Debian bookworm made with `debootstrap --variant=minbase`, with
Debian's pacman, pacstrap, e2fsprogs, fdisk, GRUB, dosfstools and mtools installed, a
marker file `/etc/archkernel-test-env` that the host does not have, and packed the way Arch
packs its bootstrap tarball: one zstd tar whose entries all sit under `root.x86_64/`.

debootstrap takes a minute or two, so the tarball is cached in $ARCHKERNEL_TEST_CACHE
(default ~/.cache/archkernel-tests) under a name that changes with the recipe. The Debian
mirror is the host's own, read from /etc/apt/sources.list(.d) at run time.

`signing_key()` makes a throw-away OpenPGP key the way a release engineer would use one:
its public half exported as a keyring for `azure.bootstrap_keyring`, detached signatures
made with its secret half.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from archkernel.demo.debian import apt, cache_dir, locked
from archkernel.errors import UserError
from archkernel.host.files import atomic_path, remove_path, temporary_directory, write_text
from archkernel.host.run import check_tools, minimal_env, run
from archkernel.log import complete_step

SUITE = "bookworm"
# What the Azure workflow runs inside the environment (see buildenv.ROUTED_TOOLS), and
# what pacman-key needs (makepkg's shell libraries, gpg, Arch's keys).
PACKAGES = (
    "pacman-package-manager",
    "makepkg",
    "arch-install-scripts",
    "archlinux-keyring",
    "gpg",
    "gpgconf",
    "gpg-agent",
    "e2fsprogs",
    "fdisk",
    "util-linux",
    "grub-pc-bin",
    "grub-efi-amd64-bin",
    "grub2-common",
    "dosfstools",
    "mtools",
    "systemd",
    "passwd",
    "zstd",
)
MARKER = "etc/archkernel-test-env"
MARKER_TEXT = "archkernel test build environment: Debian bookworm made by debootstrap\n"
# Change when the recipe below changes: it is part of the cached tarball's name.
RECIPE = "2"
TOP = "root.x86_64"  # the top-level directory of Arch's bootstrap tarballs


# --- the Debian mirror the host uses ---------------------------------------------------------


def parse_sources(text: str, *, deb822: bool) -> list[tuple[str, list[str]]]:
    """(URI, suites) of each enabled `deb` source in an APT sources file."""
    found: list[tuple[str, list[str]]] = []
    if deb822:
        for stanza in text.split("\n\n"):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                key, value = line.split(":", 1)
                fields[key.strip().lower()] = value.strip()
            if "deb" not in fields.get("types", "").split():
                continue
            if fields.get("enabled", "yes").lower() == "no":
                continue
            suites = fields.get("suites", "").split()
            found += [(uri, suites) for uri in fields.get("uris", "").split()]
        return found
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) < 3 or words[0] != "deb":
            continue
        rest = words[1:]
        if rest[0].startswith("["):  # [arch=amd64 signed-by=...] options
            while rest and not rest[0].endswith("]"):
                rest = rest[1:]
            rest = rest[1:]
        if len(rest) >= 2:
            found.append((rest[0], [rest[1]]))
    return found


def debian_mirror(suite: str = SUITE, apt_dir: Path = Path("/etc/apt")) -> str:
    """The URI the host's APT uses for `suite` (the main archive, not security)."""
    files = [apt_dir / "sources.list"]
    parts = apt_dir / "sources.list.d"
    if parts.is_dir():
        files += sorted(p for p in parts.iterdir() if p.suffix in (".list", ".sources"))
    for path in files:
        if not path.is_file():
            continue
        for uri, suites in parse_sources(path.read_text(), deb822=path.suffix == ".sources"):
            if suite in suites and uri.startswith(("http://", "https://", "file:/")):
                return uri
    raise UserError(
        f"no Debian mirror for {suite} in {apt_dir}/sources.list(.d)",
        f"add a `deb` source for {suite}, or fill $ARCHKERNEL_TEST_CACHE with a built tarball",
    )


# --- the environment tarball -----------------------------------------------------------------


def recipe_digest() -> str:
    """What names the cached tarball: suite, packages, marker and recipe version."""
    text = "\n".join([RECIPE, SUITE, MARKER, MARKER_TEXT, *PACKAGES])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def tarball_path(cache: Path | None = None) -> Path:
    """Where the cached tarball is (whether or not it was built yet)."""
    base = cache if cache is not None else cache_dir()
    return base / f"buildenv-debian-{SUITE}-{recipe_digest()}.tar.zst"


def ensure_debootstrap() -> None:
    """Install Debian's debootstrap if it is missing (as root; .ci/setup does it too)."""
    if shutil.which("debootstrap", path=minimal_env()["PATH"]) is None and os.geteuid() == 0:
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "debootstrap"]
        apt(install, env={"DEBIAN_FRONTEND": "noninteractive"})
    check_tools(["debootstrap", "bsdtar"], "building the test build environment")


def build_tarball(dest: Path, mirror: str | None = None) -> Path:
    """debootstrap the environment and pack it at `dest` as Arch packs its bootstrap."""
    ensure_debootstrap()
    mirror = mirror or debian_mirror()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with (
        complete_step(f"debootstrap {SUITE} from {mirror} for the test build environment"),
        temporary_directory(prefix=".debootstrap-", parent=str(dest.parent)) as work,
    ):
        tree = work / "tree"
        argv = ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}"]
        run([*argv, SUITE, tree, mirror], timeout=3600)
        write_text(tree / MARKER, MARKER_TEXT)
        # Downloaded packages and package lists are half the size and of no use here.
        for cached in (tree / "var/cache/apt/archives").glob("*.deb"):
            cached.unlink()
        for listing in (tree / "var/lib/apt/lists").glob("*_*"):
            remove_path(listing)
        with atomic_path(dest) as tmp:
            run(
                [
                    "bsdtar",
                    "--numeric-owner",
                    "--zstd",
                    "--options",
                    "zstd:compression-level=3",
                    # Entry names move under TOP/; link targets (`../proc/...`) stay as they are.
                    "-s",
                    rf"|^\.|{TOP}|S",
                    "-cf",
                    tmp,
                    "-C",
                    tree,
                    ".",
                ],
                timeout=1800,
            )
    return dest


def environment_tarball(cache: Path | None = None) -> Path:
    """The cached environment tarball, built first if it is not there yet."""
    dest = tarball_path(cache)
    with locked(dest.with_name(dest.name + ".lock")):
        if not dest.is_file():
            build_tarball(dest)
    return dest


def make_tarball(dest: Path, files: dict[str, str], *, top: str | None = TOP) -> Path:
    """A small root tarball (zstd) holding `files` (path -> text) and the API mount points,
    under `top/` like Arch's, or flat."""
    with temporary_directory(prefix="archkernel-tar-") as tmp:
        tree = tmp / (top or "tree")
        for name in ("usr/bin", "etc", "proc", "sys", "dev", "run", "tmp"):
            (tree / name).mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            write_text(tree / name, text)
        source = [top] if top else ["."]
        run(
            [
                "bsdtar",
                "--numeric-owner",
                "--zstd",
                "-cf",
                dest,
                "-C",
                tree.parent if top else tree,
                *source,
            ]
        )
    return dest


# --- processes ------------------------------------------------------------------------------


def env_processes(root: Path) -> list[int]:
    """Processes whose root directory is `root` (chrooted into the environment)."""
    want = os.stat(root)
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                st = os.stat(f"/proc/{entry}/root")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino):
                found.append(int(entry))
    return found


# --- signing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SigningKey:
    """A test release key: `keyring` holds its public key; `sign` makes detached signatures."""

    home: Path
    keyring: Path
    fingerprint: str

    def sign(self, path: Path, signature: Path | None = None) -> Path:
        out = signature or path.with_name(path.name + ".sig")
        out.unlink(missing_ok=True)
        gpg: list[str | os.PathLike[str]] = ["gpg", "--homedir", self.home, "--batch", "--yes"]
        gpg += ["--local-user", self.fingerprint]
        run([*gpg, "--detach-sign", "--output", out, path])
        return out


def signing_key(home: Path, name: str = "archkernel test releases") -> SigningKey:
    """A new ed25519 signing key in GNUPGHOME `home`, its public key exported beside it."""
    check_tools(["gpg", "gpgconf"], "making a test signing key")
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    gpg: list[str | os.PathLike[str]] = ["gpg", "--homedir", home, "--batch"]
    try:
        run(
            [
                *gpg,
                "--passphrase",
                "",
                "--quick-gen-key",
                f"{name} <{home.name}@example.invalid>",
                "ed25519",
                "sign",
                "never",
            ]
        )
        listing = run([*gpg, "--with-colons", "--list-secret-keys"], capture=True).stdout
        fingerprint = next(
            line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:")
        )
        keyring = home.with_name(home.name + ".gpg")
        run([*gpg, "--output", keyring, "--yes", "--export", fingerprint])
    finally:
        # Signing later starts the agent again; the tests' fixtures stop it at the end.
        stop_agent(home)
    return SigningKey(home, keyring, fingerprint)


def stop_agent(home: Path) -> None:
    """Stop the gpg-agent (and any other daemon) gpg started for `home`."""
    run(["gpgconf", "--homedir", home, "--kill", "all"], check=False)


def main(argv: Iterable[str] | None = None) -> int:
    from archkernel import log

    del argv
    log.setup(1 if os.environ.get("ARCHKERNEL_VERBOSE") else 0)
    try:
        print(environment_tarball())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
