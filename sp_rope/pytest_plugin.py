"""pytest plugin (entry point ``pytest11: sp_rope``): the ``sp_rope_check`` fixture.

``sp_rope_check(**options)`` runs one check job with :func:`sp_rope.testing.run_check`'s options
and returns its :class:`~sp_rope.testing.CheckResult`; the job's command line, output and stderr
are attached to the test's report, so a failing test shows the failure table and the failing
rank's message. Each job starts its own ranks (port-0 rendezvous) in a private temporary
directory, so tests may run under ``pytest -n auto``.

A job's wall-clock limit is the ``timeout`` option, else the ini option ``sp_rope_timeout``
(default 600 s; ``-o sp_rope_timeout=120`` on the command line).

pytest loads this module in every run where sp_rope is installed: keep its imports light.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from .testing import DEFAULT_TIMEOUT, CheckJob, CheckResult, run_check


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "sp_rope_timeout",
        f"seconds one sp_rope check job may run before all its processes are killed (default {DEFAULT_TIMEOUT:g})",
        default=str(DEFAULT_TIMEOUT),
    )


@pytest.fixture
def sp_rope_check(request: pytest.FixtureRequest) -> Callable[..., CheckResult]:
    """A callable with ``run_check``'s arguments: runs the job, returns its result."""
    default_timeout = float(request.config.getini("sp_rope_timeout"))
    jobs = 0

    def check(job: CheckJob | None = None, **options: Any) -> CheckResult:
        nonlocal jobs
        if options.get("timeout") is None and (job is None or job.timeout is None):
            options["timeout"] = default_timeout
        result = run_check(job, **options)
        jobs += 1
        # Shown with the test's failure (and with -rP for passes), under "Captured sp_rope check ...".
        request.node.add_report_section("call", f"sp_rope check {jobs}", result.explain() + "\n")
        return result

    return check
