"""ruff and mypy stay clean (configured in pyproject.toml)."""

import subprocess
import sys

from helpers import REPO


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_ruff_clean():
    paths = [p for p in ("sp_rope", "tests", "benchmarks") if (REPO / p).is_dir()]
    result = _run("ruff", "check", *paths)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_clean():
    result = _run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr
