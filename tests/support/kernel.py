"""A real Debian kernel (image and modules) for tests: `archkernel.demo.debian`'s, or a skip.

`debian_kernel_tree()` returns a root holding `boot/vmlinuz-<version>` and
`lib/modules/<version>/` with the index `depmod` writes (see `archkernel.demo.debian`),
cached under `$ARCHKERNEL_TEST_CACHE` (default `~/.cache/archkernel-tests`). Tests must
treat the tree as read-only: copy what they change. Where it cannot be had (not Debian or
Ubuntu, or no package lists and not root) the calling test is skipped.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from archkernel.demo import debian
from archkernel.demo.debian import copy_modules, kernel_image, kernel_version, module_dir
from archkernel.errors import UserError
from archkernel.host.run import missing_tools

__all__ = ["copy_modules", "debian_kernel_tree", "kernel_image", "kernel_version", "module_dir"]


def debian_kernel_tree(
    cache_dir: Path | None = None, meta_package: str = debian.KERNEL_META_PACKAGE
) -> Path:
    """`archkernel.demo.debian.debian_kernel_tree`, skipping the test where it cannot work."""
    try:
        return debian.debian_kernel_tree(cache_dir, meta_package)
    except UserError as exc:
        missing = missing_tools(debian.KERNEL_TOOLS)
        if missing:
            pytest.skip(f"a Debian kernel for tests needs {', '.join(missing)}")
        if os.geteuid() != 0 and exc.hint == debian.APT_HINT:  # no package lists, may not fetch
            pytest.skip(f"apt-cache knows no {meta_package}: {exc.hint}")
        raise
