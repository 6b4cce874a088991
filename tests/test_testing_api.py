"""sp_rope.testing (run_check, assert_check_passes) and the pytest plugin's sp_rope_check fixture.

Jobs here use 2 ranks and a small matrix: they are about the API, not about coverage.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from helpers import REPO

from sp_rope.testing import CheckJob, CheckResult, assert_check_passes, run_check

EXAMPLES = REPO / "examples"
ASSETS = REPO / "tests" / "assets"
FV_ROPE = EXAMPLES / "fv_rope.py"  # honours BUG=1: its cache key then omits sp_rank
FRAMEWORK_CI = EXAMPLES / "framework_ci"
SMALL = dict(
    convention="fastvideo",
    nproc=2,
    configs=["quick"],
    schemes="contiguous:t,contiguous:h",
    dtypes="float64",
    layouts="interleaved",
    start_frames="0,17",
)


def pytest_run(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    """``python -m pytest`` in a subprocess; its combined output (the exit code is in the summary)."""
    full_env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    return proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------
# The command line a job becomes (no processes)


def test_job_argv_takes_sequences_and_comma_strings():
    job = CheckJob(
        impl="pkg.rope:rope", convention="fastvideo", impl_cache="pkg.rope:CACHE", nproc=2, level="table",
        configs=["quick", "my.toml"], schemes=["contiguous:t", "flat"], dtypes="float64",
        layouts=" interleaved, half ", start_frames=[0, 17], steps=2, collective_timeout=30,
    )  # fmt: skip
    assert job.argv() == [
        "--impl", "pkg.rope:rope", "--convention", "fastvideo", "--impl-cache", "pkg.rope:CACHE",
        "--nproc", "2", "--level", "table", "--steps", "2", "--timeout", "30",
        "--schemes", "contiguous:t,flat", "--dtypes", "float64", "--layouts", "interleaved,half",
        "--start-frames", "0,17", "--config", "quick", "--config", "my.toml",
    ]  # fmt: skip
    assert CheckJob(configs="quick,quick-odd", start_frames=17).argv() == [
        "--start-frames", "17", "--config", "quick", "--config", "quick-odd",
    ]  # fmt: skip


def test_seed_is_passed_only_when_given():
    assert "--seed" not in CheckJob(nproc=2).argv()
    argv = CheckJob(nproc=2, seed=1234).argv()
    assert argv[argv.index("--seed") + 1] == "1234"


def test_bad_options_fail_before_any_process():
    with pytest.raises(TypeError, match="unknown check option.*schemess"):
        run_check(schemess="flat")
    with pytest.raises(ValueError, match="timeout must be > 0 seconds, got 0"):
        run_check(nproc=2, timeout=0)
    with pytest.raises(TypeError, match="dtypes: expected a sequence"):
        CheckJob(dtypes=3.5).argv()  # type: ignore[arg-type]


def _result(code: int, passed: int, failed: int, report: bool = True, stderr: str = "") -> CheckResult:
    summary = {"passed": passed, "failed": failed, "skipped": 0, "diagnoses": []}
    return CheckResult(code, passed, failed, 0, set(), [], {"summary": summary} if report else None, "", stderr)


@pytest.mark.parametrize(
    "result, ok",
    [
        (_result(0, 3, 0), True),
        (_result(0, 0, 0), False),  # everything skipped: nothing was checked
        (_result(0, 3, 0, report=False), False),  # exit 0 but no report: not a verdict
        (_result(1, 2, 1), False),
        (_result(2, 0, 0, report=False, stderr="sp_rope.check: --dtypes: bad\n"), False),
        (_result(3, 0, 0, report=False, stderr="rank 1 crashed\n"), False),
    ],
)
def test_ok_needs_exit_0_a_report_and_a_passed_case(result, ok):
    assert result.ok is ok


def test_repr_shows_counts_first_failure_and_stderr():
    failures = [f"FAIL quick/contiguous:t/P2/sf{sf}/float64/interleaved/apply: key-collision: ranks" for sf in (0, 17)]
    result = CheckResult(1, 0, 2, 0, {"key-collision"}, failures, {"summary": {}}, "", "")
    assert repr(result) == (
        "CheckResult(ok=False, exit_code=1, passed=0, failed=2, skipped=0, diagnoses=['key-collision'], "
        "failures=['FAIL quick/contiguous:t/P2/sf0/float64/interleaved/apply: key-collision: ranks' (+1 more)])"
    )
    crashed = CheckResult(3, 0, 0, 0, set(), [], None, "", "noise\nsp_rope.check: rank 1 exited with code 1\n")
    assert repr(crashed).endswith("stderr='sp_rope.check: rank 1 exited with code 1')")


# ---------------------------------------------------------------------------------------------
# Real jobs


def test_bad_input_is_exit_2_not_a_pass():
    result = run_check(nproc=2, dtypes="float16", timeout=120)
    assert (result.ok, result.exit_code, result.report) == (False, 2, None), result.explain()
    assert "float16" in result.stderr
    with pytest.raises(AssertionError, match=r"(?s)exit 2 \(bad input\).*float16"):
        assert_check_passes(nproc=2, dtypes="float16", timeout=120)


def test_import_failure_on_one_rank_is_not_ok_and_keeps_its_message():
    impl = ASSETS / "fv_broken_on_rank1.py"
    result = run_check(impl=f"{impl}:rope", impl_cache=f"{impl}:CACHE", timeout=300, **SMALL)
    assert not result.ok and result.exit_code in (2, 3), result.explain()  # bad input or a crashed rank
    assert "fv_broken_on_rank1: injected import failure on rank 1" in result.stderr
    assert "injected import failure on rank 1" in result.explain()


def test_concurrent_jobs_do_not_interfere(monkeypatch):
    """A correct and a buggy implementation checked at the same time, from two threads. The
    buggy one is named as a module, importable through the caller's PYTHONPATH."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FRAMEWORK_CI), os.environ.get("PYTHONPATH", "")]))
    buggy_module = "tiny_framework.rope_no_sp_rank"
    jobs = {
        "correct": CheckJob(impl=f"{FV_ROPE}:rope", impl_cache=f"{FV_ROPE}:CACHE", timeout=300, **SMALL),
        "buggy": CheckJob(impl=f"{buggy_module}:rope", impl_cache=f"{buggy_module}:CACHE", timeout=300, **SMALL),
    }
    results: dict[str, CheckResult] = {}
    threads = [threading.Thread(target=lambda n=name: results.update({n: run_check(jobs[n])})) for name in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=400)
    correct, buggy = results["correct"], results["buggy"]
    assert correct.ok and correct.passed > 0, correct.explain()
    assert not buggy.ok and buggy.exit_code == 1 and "key-collision" in buggy.diagnoses, buggy.explain()
    assert correct.report and correct.report["summary"]["implementation"] == f"{FV_ROPE}:rope"
    assert buggy.report and buggy.report["summary"]["implementation"] == f"{buggy_module}:rope"
    assert all(line.startswith("FAIL ") for line in buggy.failures)
    assert any(": key-collision: ranks [0, 1] " in line for line in buggy.failures), buggy.failures


# ---------------------------------------------------------------------------------------------
# The acceptance file: the API and the fixture from a directory outside the repository, under xdist

ACCEPTANCE = """\
from sp_rope.testing import run_check
ARGS = dict(impl=F + ":rope", convention="fastvideo", impl_cache=F + ":CACHE", nproc=2)
def test_ok(): r = run_check(**ARGS); assert r.ok and r.passed > 0
def test_bug(monkeypatch): monkeypatch.setenv("BUG", "1"); r = run_check(**ARGS); assert not r.ok and r.diagnoses
def test_fixture(sp_rope_check): assert sp_rope_check(**ARGS).ok
"""


def test_acceptance_file_passes_under_xdist_outside_the_repo(tmp_path):
    (tmp_path / "test_acceptance.py").write_text(f"F = {str(FV_ROPE.resolve())!r}\n" + ACCEPTANCE)
    output = pytest_run(["-n", "2"], cwd=tmp_path)
    assert re.search(r"\b3 passed\b", output), output


# ---------------------------------------------------------------------------------------------
# The plugin


def test_plugin_reports_the_failing_rank_and_kills_a_job_past_its_ini_timeout(tmp_path):
    """Under xdist: one job whose rank 1 cannot import the implementation, one that hangs until
    the ini timeout (generous: its ranks must get as far as importing the implementation on a
    loaded machine); both failures carry the check's stderr, and no rank of the hung job survives."""
    pids = tmp_path / "pids"
    pids.mkdir()
    (tmp_path / "test_plugin.py").write_text(
        textwrap.dedent(f"""
        ARGS = {SMALL!r}

        def test_broken(sp_rope_check):
            impl = {str(ASSETS / "fv_broken_on_rank1.py")!r}
            assert sp_rope_check(impl=impl + ":rope", impl_cache=impl + ":CACHE", timeout=300, **ARGS).ok

        def test_hang(sp_rope_check):
            impl = {str(ASSETS / "fv_hang_in_ranks.py")!r}
            assert sp_rope_check(impl=impl + ":rope", impl_cache=impl + ":CACHE", **ARGS).ok
        """)
    )
    output = pytest_run(["-n", "2", "-o", "sp_rope_timeout=60"], cwd=tmp_path, env={"FV_HANG_PID_DIR": str(pids)})
    assert re.search(r"\b2 failed\b", output), output
    assert "Captured sp_rope check 1 call" in output
    assert "fv_broken_on_rank1: injected import failure on rank 1" in output
    assert "ran past its timeout of 60 s; all its processes were killed" in output
    recorded = sorted(pids.iterdir())
    assert [p.name for p in recorded] == ["rank0.pid", "rank1.pid"], output
    assert not [p.name for p in recorded if _alive(int(p.read_text()))]


def _alive(pid: int) -> bool:
    """Running (a zombie, killed but not yet reaped by init, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def test_plugin_modules_import_no_torch():
    """sp_rope.testing and sp_rope.pytest_plugin themselves import nothing heavy (the package's
    __init__ is bypassed here; see the xfail below for the package as a whole)."""
    code = textwrap.dedent(f"""
        import sys, types
        package = types.ModuleType("sp_rope")
        package.__path__ = [{str(REPO / "sp_rope")!r}]
        sys.modules["sp_rope"] = package
        import sp_rope.pytest_plugin
        heavy = sorted(m for m in ("torch", "numpy") if m in sys.modules)
        assert not heavy, heavy
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_loading_the_plugin_imports_no_torch():
    code = "import sys, sp_rope.pytest_plugin; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------------------
# The README's example


def _readme_example() -> str:
    section = (REPO / "README.md").read_text().split("\n## In your test suite\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, "no python block in the README's section 'In your test suite'"
    return blocks[0]


def test_readme_example_is_the_example_file():
    assert _readme_example() == (EXAMPLES / "test_in_your_suite.py").read_text()


def test_readme_example_passes_and_fails_with_the_bug():
    passing = pytest_run([str(EXAMPLES / "test_in_your_suite.py")], cwd=REPO)
    assert re.search(r"\b1 passed\b", passing), passing
    failing = pytest_run([str(EXAMPLES / "test_in_your_suite.py")], cwd=REPO, env={"BUG": "1"})
    assert re.search(r"\b1 failed\b", failing), failing
    assert re.search(r"diagnoses=\[[^]]*'key-collision'", failing) and "Captured sp_rope check 1 call" in failing
    assert re.search(r"^FAIL quick/contiguous:t/P2/sf0/float64/interleaved/apply: key-collision", failing, re.M)


# ---------------------------------------------------------------------------------------------
# examples/framework_ci: a separate project's CI step


def test_framework_ci_example_passes_its_ci_step():
    output = pytest_run(["-n", "2", "-rxX"], cwd=FRAMEWORK_CI)
    assert re.search(r"\b1 passed, 1 xfailed\b", output), output
    assert "XFAIL tests/test_sp_rope.py::test_cache_key_without_sp_rank_is_caught" in output, output
