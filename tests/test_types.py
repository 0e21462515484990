"""``keys/`` is a typed library (it ships ``py.typed``): ``mypy --strict`` finds nothing in it,
nor in the example app that the README shows."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow  # mypy from a cold cache (a fresh clone, CI) takes ~20 s of CPU
def test_keys_and_the_example_are_mypy_strict_clean() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary", "keys", "examples/reports.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_keys_ships_its_type_marker() -> None:
    assert (ROOT / "keys" / "py.typed").is_file()
