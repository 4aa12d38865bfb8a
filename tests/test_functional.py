"""The functional profile's repacking rules: Arch's merged /usr, links re-aimed, groups."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from archkernel.demo import functional
from archkernel.demo.package import Staging
from archkernel.errors import UserError


@pytest.mark.parametrize(
    ("debian", "arch"),
    [
        ("bin/bash", "usr/bin/bash"),
        ("sbin/agetty", "usr/bin/agetty"),
        ("usr/sbin/sshd", "usr/bin/sshd"),
        ("lib/systemd/systemd", "usr/lib/systemd/systemd"),
        ("lib64/ld-linux-x86-64.so.2", "usr/lib/ld-linux-x86-64.so.2"),
        ("usr/lib64/x", "usr/lib/x"),
        ("var/run/sshd", "run/sshd"),
        ("usr/bin/python3", "usr/bin/python3"),
        ("etc/ssh/moduli", "etc/ssh/moduli"),
        ("binary/x", "binary/x"),  # a prefix of a name is not the directory
        ("sbin", "usr/bin"),
    ],
)
def test_paths_move_to_arch_layout(debian: str, arch: str) -> None:
    assert functional.arch_path(debian) == arch


@pytest.mark.parametrize(
    ("link", "target", "expected"),
    [
        # Debian's /lib64 loader link points into /lib: both end up in usr/lib.
        (
            "lib64/ld-linux-x86-64.so.2",
            "../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
            "x86_64-linux-gnu/ld-linux-x86-64.so.2",
        ),
        ("usr/sbin/iptables", "../bin/xtables", "xtables"),
        ("sbin/init", "/lib/systemd/systemd", "/lib/systemd/systemd"),
        ("lib/systemd/system/a.service", "b.service", "b.service"),
        ("usr/share/x/y", "../../../lib/z", "../../lib/z"),  # /lib/z is /usr/lib/z now
    ],
)
def test_links_are_re_aimed(link: str, target: str, expected: str) -> None:
    assert functional.arch_link_target(link, target) == expected


def test_a_moved_link_still_resolves(tmp_path: Path) -> None:
    deb = tmp_path / "deb"
    (deb / "lib/x86_64-linux-gnu").mkdir(parents=True)
    (deb / "lib/x86_64-linux-gnu/libz.so.1").write_bytes(b"ELF")
    (deb / "usr/lib").mkdir(parents=True)
    (deb / "usr/lib/libz-compat.so").symlink_to("../../lib/x86_64-linux-gnu/libz.so.1")
    (deb / "sbin").mkdir()
    (deb / "sbin/tool").write_bytes(b"#!/bin/sh\n")
    (deb / "sbin/tool").chmod(0o4755)
    (deb / "usr/share/doc/z").mkdir(parents=True)
    staging = Staging(tmp_path / "stage")
    staging.root.mkdir()
    functional.merge_deb(deb, staging)
    root = staging.root
    assert (root / "usr/lib/libz-compat.so").read_bytes() == b"ELF"
    assert os.readlink(root / "usr/lib/libz-compat.so") == "x86_64-linux-gnu/libz.so.1"
    assert staging.modes["usr/bin/tool"] == 0o4755
    assert not (root / "usr/share/doc").exists()
    assert not (root / "lib").exists() and not (root / "sbin").exists()


def test_groups() -> None:
    assert functional.group_of("openssh-server") == "openssh"
    assert functional.group_of("udev") == "systemd"
    assert functional.group_of("waagent") == "walinuxagent"
    assert functional.group_of("libssl3") == functional.RUNTIME
    assert functional.group_of("base-files") is None


def test_cloud_init_units_lose_debians_lines_only() -> None:
    unit = "[Unit]\nDefaultDependencies=no\nBefore=sysinit.target\nBefore=sshd.service\n"
    lines = ("DefaultDependencies=no", "Before=sysinit.target")
    assert functional.without_lines(unit, lines, "u") == "[Unit]\nBefore=sshd.service\n"
    with pytest.raises(UserError, match=r"no longer has Before=sysinit\.target"):
        functional.without_lines("[Unit]\nDefaultDependencies=no\n", lines, "u")
