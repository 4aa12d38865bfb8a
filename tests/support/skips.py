"""Skips about the machine itself (a Docker engine that answers, a module the host kernel
has loaded), which no setup step can change: CI's strict mode (TESTS_FAIL_ON_SKIP=1, see
tests/conftest.py) lets these pass, and fails the run on any other skip."""

from __future__ import annotations

from typing import NoReturn

import pytest

MACHINE = "this machine: "  # how a skip about the machine begins its reason


def skip_for_this_machine(reason: str) -> NoReturn:
    pytest.skip(MACHINE + reason)
