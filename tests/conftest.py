"""Suite-wide settings.

In CI (``CI`` set in the environment) a test may not skip for want of something the project's
own setup installs (mosquitto, openssl, rosettasciio, h5py, tifffile): a skip there would hide a
missing install step, so it fails instead. Skips for hardware CI does not have (reasons that
mention CUDA or a GPU) stay skips.
"""

from __future__ import annotations

import os

import pytest

HARDWARE_WORDS = ("cuda", "gpu")


def _reason(longrepr) -> str:  # type: ignore[no-untyped-def]
    return str(longrepr[-1] if isinstance(longrepr, tuple) else longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail"):
        reason = _reason(report.longrepr)
        if any(w in reason.lower() for w in HARDWARE_WORDS):
            return
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which must have everything the project installs: {reason}"


def pytest_collectreport(report):  # type: ignore[no-untyped-def]
    if os.environ.get("CI") and report.skipped:
        if not any(w in _reason(report.longrepr).lower() for w in HARDWARE_WORDS):
            report.outcome = "failed"
