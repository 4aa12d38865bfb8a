"""Arch's bootstrap tarball: find the newest, download it, verify it, unpack it safely.

Arch publishes the tarball in each release directory (`.../iso/latest/` is the newest) as
`archlinux-bootstrap-YYYY.MM.DD-x86_64.tar.zst` and, for the latest release, also as
`archlinux-bootstrap-x86_64.tar.zst`; each with a detached OpenPGP signature (`.sig`) and
listed in `sha256sums.txt`. Its entries all sit under one directory, `root.x86_64/`.

Trust comes from the signature alone: it is checked with `gpgv` against
`azure.bootstrap_keyring` (by default Debian's `archlinux-keyring`), and a missing or bad
signature stops the build. `sha256sums.txt` is not signed; it only names the release and
its SHA-256, which lets a second build see that the environment it has is already that
release without downloading it again. A tarball given by path or URL
(`azure.bootstrap_tarball`) is trusted through the SHA-256 the user gives with it.

The functions that decide (`parse_sha256sums`, `parse_listing`, `pick_tarball`,
`signature_verdict`, `tree_root`) are pure; `newest`, `download`, `verify_signature` and
`unpack` act.

What is unpacked is checked like the rest: its `usr` and `etc` are directories, and no
symbolic link in it leads out of it (`links_leading_out`). An absolute link is read as the
environment's programs read it, from the environment's root (Debian's `var/run -> /run`);
the host never follows one (`buildenv.prepare` writes into the tree through
`resolve_in_root`).
"""

from __future__ import annotations

import html
import os
import re
import stat
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from archkernel.errors import UserError
from archkernel.host.download import FetchError, fetch_text
from archkernel.host.download import download as download_file
from archkernel.host.files import sha256_file, temporary_directory
from archkernel.host.run import run
from archkernel.log import log

ARCH = "x86_64"
TOP_DIRECTORY = f"root.{ARCH}"
SUMS = "sha256sums.txt"
_NAME = re.compile(
    rf"archlinux-bootstrap-(?:(?P<date>\d{{4}}\.\d{{2}}\.\d{{2}})-)?{ARCH}\.tar\.(?P<ext>zst|gz)"
)
# Lists and signatures are small; a bootstrap tarball is about 150 MiB (another userland
# given by URL, a few hundred).
LIST_LIMIT = 4 << 20
DOWNLOAD_LIMIT = 4 << 30


@dataclass(frozen=True)
class Release:
    """The newest bootstrap tarball on a mirror: where it is and, if listed, its SHA-256."""

    name: str
    url: str
    sha256: str | None

    @property
    def signature_url(self) -> str:
        return self.url + ".sig"


# --- deciding ---------------------------------------------------------------------------------


_HEX = frozenset("0123456789abcdefABCDEF")


def parse_sha256sums(text: str) -> dict[str, str]:
    """File name -> SHA-256 from `sha256sum` output (`HASH  NAME` or `HASH *NAME`).

    Lines that are not a hash and a name are skipped. Linear in the text: the file is
    unsigned and may be anything up to LIST_LIMIT (a pattern with `\\s+` then `.*?`
    took seconds on a line of spaces).
    """
    sums = {}
    for line in text.splitlines():
        line = line.strip()
        digest, rest = line[:64], line[64:]
        if len(digest) < 64 or not _HEX.issuperset(digest) or not rest[:1].isspace():
            continue
        name = rest.lstrip()
        if name[:1] == "*" and name[1:2] and not name[1:2].isspace():
            name = name[1:]  # binary mode; '* x' is a name, as sha256sum writes it
        if name:
            sums[name.lstrip("./")] = digest.lower()
    return sums


def parse_listing(page: str) -> list[str]:
    """The file names a web server's directory listing links to (`href="NAME"`)."""
    names = []
    for href in re.findall(r"""href\s*=\s*["']([^"'?#]+)["']""", page, flags=re.IGNORECASE):
        name = urllib.parse.unquote(html.unescape(href)).rstrip("/").rsplit("/", 1)[-1]
        if name:
            names.append(name)
    return names


def pick_tarball(names: Iterable[str]) -> str | None:
    """The newest bootstrap tarball among `names`: the latest date, zstd before gzip; the
    undated name (`archlinux-bootstrap-x86_64.tar.zst`) when no dated one is listed."""
    best: tuple[str, bool, str] | None = None
    for name in names:
        m = _NAME.fullmatch(name)
        if m:
            key = (m.group("date") or "", m.group("ext") == "zst", name)
            if best is None or key > best:
                best = key
    return best[2] if best else None


def signature_verdict(status: str) -> tuple[str | None, str]:
    """Read gpgv's `--status-fd` lines: (signer's primary key fingerprint, "") for a good
    signature by a valid key, else (None, why not)."""
    codes: dict[str, list[str]] = {}
    for line in status.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "[GNUPG:]":
            codes.setdefault(words[1], words[2:])
    if "BADSIG" in codes:
        return None, "the signature does not match the file (BAD signature)"
    if "REVKEYSIG" in codes:
        return None, "it was made by a revoked key"
    if "EXPKEYSIG" in codes:
        return None, "it was made by an expired key"
    if "NO_PUBKEY" in codes or "ERRSIG" in codes:
        key = (codes.get("NO_PUBKEY") or codes.get("ERRSIG") or ["?"])[0]
        return None, f"it was made by key {key}, which is not in the keyring"
    if "NODATA" in codes:
        return None, "the signature file holds no OpenPGP signature"
    valid = codes.get("VALIDSIG")
    if "GOODSIG" not in codes or not valid:
        return None, "gpgv did not report a good signature"
    # VALIDSIG's tenth field is the primary key's fingerprint (the signing key's own first).
    return (valid[9] if len(valid) > 9 else valid[0]), ""


def tree_root(unpacked: Path) -> Path:
    """The root file system in a freshly unpacked tarball: the single top-level directory
    when there is one (Arch's `root.x86_64/`), else the unpacked directory itself."""
    entries = list(unpacked.iterdir())
    single = entries[0] if len(entries) == 1 else None
    if single is not None and single.is_dir() and not single.is_symlink() and single.name != "usr":
        return single
    return unpacked


# A chain of links longer than this is a loop (the kernel's limit, ELOOP).
MAX_LINKS = 40
# What a root file system is: these are directories, never links (the build writes there).
ROOT_DIRECTORIES = ("usr", "etc")


def leads_out(root: Path, link: str) -> str | None:
    """Why the symbolic link `link` (a path in the tree `root`) leads out of it, or None.

    It is followed as a process chrooted into `root` follows it (an absolute target starts
    at `root`), through any further links, and leads out when a `..` climbs above `root`
    (the host, following it from the tree's directory, would leave the tree) or when it
    never ends (a loop such as `usr -> /usr`, which the host would follow to its own /usr).
    A link to something missing is fine: it dangles in the tree.
    """
    done = [p for p in link.split("/") if p][:-1]  # the directory the link is in
    target, links = os.readlink(root.joinpath(link)), 1
    todo: list[str] = []
    while True:
        if target.startswith("/"):
            done = []
        todo = [p for p in target.split("/") if p not in ("", ".")] + todo
        while todo:
            part = todo.pop(0)
            if part == "..":
                if not done:
                    return "climbs above the environment's root"
                done.pop()
                continue
            try:
                mode = os.lstat(root.joinpath(*done, part)).st_mode
            except (FileNotFoundError, NotADirectoryError):
                return None
            if stat.S_ISLNK(mode):
                break
            done.append(part)
        else:
            return None
        links += 1
        if links > MAX_LINKS:
            return "is a loop"
        target = os.readlink(root.joinpath(*done, part))


def links_leading_out(root: Path) -> list[tuple[str, str, str]]:
    """(path in the tree, target, why) of each symbolic link in the tree `root` that leads
    out of it (see `leads_out`), in the order found."""
    found = []
    todo = [root]
    while todo:
        directory = todo.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.is_symlink():
                    inside = os.path.relpath(entry.path, root)
                    why = leads_out(root, inside)
                    if why is not None:
                        found.append((inside, os.readlink(entry.path), why))
                elif entry.is_dir(follow_symlinks=False):
                    todo.append(Path(entry.path))
    return found


def _check_tree(tarball: Path, root: Path) -> None:
    """Refuse an unpacked tree whose `usr` or `etc` is not a directory, or with a link
    that leads out of it."""
    for name in ROOT_DIRECTORIES:
        try:
            mode = os.lstat(root / name).st_mode
        except FileNotFoundError:
            mode = 0
        if not stat.S_ISDIR(mode):
            what = {0: f"no {name}/ in it", stat.S_IFLNK: f"its {name} is a symbolic link"}
            raise UserError(
                f"{tarball.name} holds no root file system "
                f"({what.get(stat.S_IFMT(mode), f'its {name} is not a directory')})",
                "give Arch's bootstrap tarball (archlinux-bootstrap-x86_64.tar.zst) or one like it",
            )
    out = links_leading_out(root)
    if out:
        shown = "; ".join(f"{path} -> {target} {why}" for path, target, why in out[:5])
        more = f" (and {len(out) - 5} more)" if len(out) > 5 else ""
        raise UserError(
            f"{tarball.name} has symbolic links that lead out of the environment: {shown}{more}",
            "the tarball is damaged or was made to escape; use Arch's bootstrap tarball",
        )


# --- acting -----------------------------------------------------------------------------------


def _fetch_list(url: str, timeout: float) -> str:
    """A list on the mirror; FetchError (with its `status` for an HTTP error) if not."""
    try:
        return fetch_text(url, limit=LIST_LIMIT, timeout=timeout)
    except FetchError as exc:
        if exc.hint is None:
            exc.hint = (
                "check the network and azure.bootstrap_mirror, or give a tarball with "
                "azure.bootstrap_tarball and azure.bootstrap_sha256"
            )
        raise


def newest(mirror: str, *, timeout: float = 60.0) -> Release:
    """The newest bootstrap tarball in the release directory `mirror`, from its
    sha256sums.txt or, if it has none, its directory listing."""
    base = mirror.rstrip("/") + "/"
    sums: dict[str, str] = {}
    try:
        sums = parse_sha256sums(_fetch_list(base + SUMS, timeout))
        names: Iterable[str] = sums
    except FetchError as exc:
        if exc.status is None:
            raise  # no answer (an HTTP error status is an answer)
        log.debug("%s%s: HTTP %s; reading the directory listing", base, SUMS, exc.status)
        try:
            names = parse_listing(_fetch_list(base, timeout))
        except FetchError as exc2:
            if exc2.status is None:
                raise
            raise UserError(
                f"{base} lists no files (HTTP {exc2.status})",
                "set azure.bootstrap_mirror to an Arch release directory such as "
                "https://geo.mirror.pkgbuild.com/iso/latest",
            ) from None
    name = pick_tarball(names)
    if name is None:
        raise UserError(
            f"no archlinux-bootstrap-{ARCH}.tar.zst in {base}",
            "set azure.bootstrap_mirror to an Arch release directory (…/iso/latest)",
        )
    return Release(name, base + urllib.parse.quote(name), sums.get(name))


def download(url: str, dest: Path, *, timeout: float = 60.0) -> str:
    """Download `url` to `dest` (atomically: all or nothing); returns its SHA-256."""
    try:
        return download_file(url, dest, limit=DOWNLOAD_LIMIT, timeout=timeout)
    except FetchError as exc:
        if exc.hint is None:
            exc.hint = (
                "check azure.bootstrap_mirror / azure.bootstrap_tarball"
                if exc.status is not None
                else "check the network"
            )
        raise


def check_sha256(path: Path, expected: str, what: str) -> str:
    """Raise UserError unless the file's SHA-256 is `expected`; returns it."""
    found = sha256_file(path)
    if found != expected.lower():
        raise UserError(
            f"{what} {path} has SHA-256 {found}, not the expected {expected}",
            "the file is damaged or not the one meant: fetch it again, or correct "
            "azure.bootstrap_sha256",
        )
    return found


def verify_signature(path: Path, signature: Path, keyring: Path, scratch: Path) -> str:
    """Check `signature` (detached) on `path` against the keys in `keyring` with gpgv;
    returns the signer's fingerprint, UserError for anything but a good signature.

    gpgv reads only the keyring it is given, trusts every key in it and starts no agent;
    it gets a private, empty home directory under `scratch` so nothing of the user's
    GnuPG setup takes part (and nothing is left: the directory is removed afterwards).
    """
    if not keyring.is_file():
        raise UserError(
            f"azure.bootstrap_keyring: {keyring} does not exist",
            "install 'archlinux-keyring' (Debian/Ubuntu or Arch), or point "
            "azure.bootstrap_keyring at a keyring with the key that signs Arch's releases",
        )
    if not signature.is_file():
        raise UserError(f"no signature {signature} for {path}", "the tarball must be signed")
    scratch.mkdir(parents=True, exist_ok=True)
    with temporary_directory(prefix=".gnupg-", parent=str(scratch)) as home:
        home.chmod(0o700)
        argv: list[str | os.PathLike[str]] = ["gpgv", "--homedir", home, "--status-fd", "1"]
        argv += ["--keyring", keyring.resolve(), signature, path]
        proc = run(argv, capture=True, check=False)
    signer, why = signature_verdict(proc.stdout)
    if proc.returncode != 0 or signer is None:
        why = why or f"gpgv failed with exit code {proc.returncode}"
        raise UserError(
            f"the signature of {path.name} is not good: {why}",
            f"the tarball may have been tampered with; keys trusted: {keyring} "
            "(azure.bootstrap_keyring)",
        )
    return signer


def unpack(tarball: Path, dest: Path) -> Path:
    """Unpack `tarball` into the new directory `dest`, as root, owners by number; returns
    the root file system in it (see `tree_root`).

    bsdtar refuses entries with `..`, entries that would be written through a symbolic
    link, and strips a leading `/` (it never writes outside `dest`); any refused entry
    fails the unpack. The tree is then refused if its `usr` or `etc` is not a directory or
    a symbolic link in it leads out of it (`links_leading_out`).
    """
    dest.mkdir(parents=True)
    run(
        # Without -P (never given) bsdtar refuses `..` and extracting through symlinks.
        ["bsdtar", "-x", "-p", "--numeric-owner", "-f", os.path.abspath(tarball), "-C", dest],
        timeout=3600,
    )
    root = tree_root(dest)
    _check_tree(tarball, root)
    return root
