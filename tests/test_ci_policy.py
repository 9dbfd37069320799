"""The suite's skip policy (tests/conftest.py, tests/needs.py), run on a throwaway suite: with CI set, a missing
requirement or any skip other than a CUDA-only one fails, with one line saying what to install; without CI they
skip with that line; CUDA-only tests skip without a CUDA device, and the run says how many did."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

SUITE = '''
import pytest
from tests.needs import need_module, need_path

def test_passes():
    pass

def test_needs_a_module():
    need_module("no_such_module_evlp", "pip install no-such-module-evlp")

def test_needs_a_file():
    need_path("/no/such/file/evlp", "apt-get install -y no-such-package")

def test_skips_for_another_reason():
    pytest.skip("because")

@pytest.mark.cuda
def test_on_a_gpu():
    pass
'''


def run_suite(tmp_path: Path, ci: bool) -> str:
    suite = tmp_path / "tests"
    suite.mkdir(exist_ok=True)
    (suite / "__init__.py").write_text("")
    for name in ("conftest.py", "needs.py"):
        shutil.copy(HERE / name, suite / name)
    (suite / "test_policy.py").write_text(SUITE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "1"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "tests"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return run.stdout


def test_ci_fails_every_skip_but_cuda_only_ones_with_one_line_saying_what_to_install(tmp_path):
    out = run_suite(tmp_path, ci=True)
    assert "FAILED tests/test_policy.py::test_needs_a_module - Failed: the Python module no_such_module_evlp is " \
           "missing; install it: pip install no-such-module-evlp" in out
    assert "FAILED tests/test_policy.py::test_needs_a_file - Failed: /no/such/file/evlp is missing; install it: " \
           "apt-get install -y no-such-package" in out
    assert "FAILED tests/test_policy.py::test_skips_for_another_reason - skipped, which CI refuses" in out
    assert "PASSED tests/test_policy.py::test_passes" in out
    cuda = torch.cuda.is_available()
    assert ("PASSED tests/test_policy.py::test_on_a_gpu" in out) == cuda
    assert f"CUDA-only tests skipped (no CUDA device): {0 if cuda else 1}\n" in out


def test_outside_ci_a_missing_requirement_skips_with_its_line(tmp_path):
    out = run_suite(tmp_path, ci=False)
    assert "the Python module no_such_module_evlp is missing; install it: pip install no-such-module-evlp" in out
    skipped = 3 + (not torch.cuda.is_available())
    assert "FAILED" not in out and f"1 passed, {skipped} skipped" in out
    assert "other skips: 3 (CI=1 fails them)" in out
