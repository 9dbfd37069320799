"""Test-wide settings: nothing may reach a model hub, and runs stay small and quiet.

Skips: only tests marked ``cuda`` skip, on a machine without a CUDA device, and the run says how many did. With
``CI`` set (``.ci/run`` sets it) any other skip is a failure: CI runs everything (``tests/needs.py`` turns a missing
requirement into a one-line failure saying what to install).
"""

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CUDA_ONLY = "CUDA-only: no CUDA device here"


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (the only tests that may skip)")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(pytest.mark.skip(reason=CUDA_ONLY))


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    return str(longrepr[2] if isinstance(longrepr, tuple) else longrepr)


def _refuse_in_ci(report) -> None:
    if report.skipped and os.environ.get("CI") and CUDA_ONLY not in _skip_reason(report):
        report.outcome = "failed"
        report.longrepr = f"skipped, which CI refuses (only CUDA-only tests may skip): {_skip_reason(report)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _refuse_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _refuse_in_ci(outcome.get_result())


def pytest_terminal_summary(terminalreporter):
    cuda = [r for r in terminalreporter.stats.get("skipped", []) if CUDA_ONLY in _skip_reason(r)]
    others = len(terminalreporter.stats.get("skipped", [])) - len(cuda)
    line = f"CUDA-only tests skipped (no CUDA device): {len(cuda)}"
    if others:
        line += f"; other skips: {others} (CI=1 fails them)"
    terminalreporter.write_line(line)
