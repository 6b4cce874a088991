"""Faults and signals: the exit-code contract when a rank hangs, stops, dies or cannot import,
and when the launcher is interrupted; the verdict names the rank that stopped, and its phase.

Deadlines here are generous (a loaded machine is slow); they only separate "seconds" from the
tens of seconds a wait for the wrong thing takes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from helpers import FIXTURES, REPO, SMALL, Run, check, processes_with, torchrun

TIMEOUT = 5  # --timeout of the fault runs: short, so the tests stay short


def _verdict(result: Run) -> str:
    lines = [line for line in result.err.splitlines() if line.startswith("sp_rope.check: infrastructure failure")]
    assert len(lines) == 1, result
    return lines[0]


def _only_line(result: Run) -> str:
    """The one line of output (stdout and stderr together) a fault or signal must produce."""
    lines = [line for line in (result.out + result.err).splitlines() if line.strip()]
    assert len(lines) == 1, result
    return lines[0]


def _gone(marker: str, within: float) -> list[str]:
    """Processes still alive with ``marker`` on their command line after ``within`` seconds."""
    deadline = time.monotonic() + within
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    return processes_with(marker)


def _summary(report: Path) -> dict:
    return json.loads(report.read_text())["summary"]


class _Job:
    """A self-launched check run in the background, with rank 1 pausing in its first build
    (tests/fixtures/stall.py) and telling us its pid, so a test can signal it mid-phase."""

    def __init__(self, tmp_path: Path, pause: float, *args: str) -> None:
        self.marker = uuid.uuid4().hex
        self.report = tmp_path / f"{self.marker}.json"
        self.pidfile = tmp_path / "rank1.pid"
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        env.update(OMP_NUM_THREADS="1", SP_ROPE_TEST_PIDFILE=str(self.pidfile), SP_ROPE_TEST_PAUSE=str(pause))
        impl = f"{FIXTURES}/stall.py:pause_on_rank1"
        argv = ["--nproc", "4", "--timeout", str(TIMEOUT), "--report", str(self.report), "--impl", impl, *SMALL, *args]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sp_rope.check", *argv],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group, as a shell gives a foreground job
        )
        self.start = time.monotonic()

    def rank1_pid(self) -> int:
        """Rank 1's pid, once it is inside its first build (phase 'build P=2 ...')."""
        while not self.pidfile.exists():
            assert self.proc.poll() is None, self.finish()
            assert time.monotonic() - self.start < 180, "rank 1 never reached its first build"
            time.sleep(0.1)
        return int(self.pidfile.read_text())

    def finish(self, deadline: float = 180) -> Run:
        try:
            out, err = self.proc.communicate(timeout=deadline)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            out, err = self.proc.communicate()
            pytest.fail(f"no exit within {deadline}s\n--- stdout\n{out}\n--- stderr\n{err}")
        return Run(self.proc.returncode, out, err, time.monotonic() - self.start)

    def cleanup(self) -> None:
        with contextlib.suppress(OSError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.pidfile.exists():
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(self.pidfile.read_text()), signal.SIGKILL)


@pytest.fixture
def job(tmp_path):
    jobs: list[_Job] = []

    def start(pause: float, *args: str) -> _Job:
        jobs.append(_Job(tmp_path, pause, *args))
        return jobs[-1]

    yield start
    for started in jobs:
        started.cleanup()


def test_hang_before_the_attention_level_names_the_hung_rank_and_its_phase(tmp_path):
    # Rank 1 sleeps in its first build; its SP partner, rank 0, goes on to the attention level.
    marker = uuid.uuid4().hex
    report = tmp_path / f"{marker}.json"
    impl = f"{FIXTURES}/stall.py:hang_on_rank1"
    result = check("--nproc", "4", "--timeout", str(TIMEOUT), "--report", str(report), "--impl", impl, *SMALL)
    assert result.code == 3, result
    verdict = _only_line(result)
    assert re.search(
        r"rank\(s\) 1 did not reach phase '[^']+': rank 1 was busy for \d+s at stall\.py:\d+ hang_on_rank1 "
        r"in phase 'build P=2 quick/",
        verdict,
    ), result
    summary = _summary(report)
    assert summary["status"] == "infrastructure-failure" and summary["rank"] == 1, summary
    assert summary["phase"].startswith("build P=2 quick/") and summary["failed"] >= 1, summary
    assert _gone(marker, within=5) == []


def test_a_stopped_rank_is_named_and_the_job_ends_within_twice_the_timeout(job):
    run = job(3)
    rank1 = run.rank1_pid()
    os.kill(rank1, signal.SIGSTOP)
    stopped_at = time.monotonic()
    result = run.finish()
    assert result.code == 3, result
    verdict = _only_line(result)
    assert re.search(r"rank\(s\) 1 did not reach phase '[^']+': rank 1 was stopped \(SIGSTOP\)", verdict), result
    assert "in phase 'build P=2 quick/" in verdict, result
    # The job notices after --timeout; 2x --timeout, plus slack for a loaded machine, is the
    # deadline (the agent alone would wait 30 s for a stopped rank before killing it).
    assert time.monotonic() - stopped_at < 2 * TIMEOUT + 20, result
    assert _gone(run.marker, within=5) == []


def test_a_killed_rank_is_named_with_its_phase(job):
    run = job(3)
    os.kill(run.rank1_pid(), signal.SIGKILL)
    result = run.finish()
    assert result.code == 3, result
    expected = r"infrastructure failure \(exit 3\): rank 1 was killed by SIGKILL in phase 'build P=2 quick/[^']+'"
    assert re.fullmatch(f"sp_rope.check: {expected}", _only_line(result)), result
    summary = _summary(run.report)
    assert (summary["status"], summary["rank"]) == ("infrastructure-failure", 1), summary
    assert _gone(run.marker, within=5) == []


@pytest.mark.parametrize(
    "send, code, name",
    [
        (lambda proc: proc.send_signal(signal.SIGINT), 130, "SIGINT"),  # Ctrl-C
        (lambda proc: os.killpg(proc.pid, signal.SIGTERM), 143, "SIGTERM"),  # kill of the process group
    ],
)
def test_interrupting_the_launcher_stops_every_rank_with_one_line(job, send, code, name):
    run = job(120)  # rank 1 sits in its first build: the job is mid-run when the signal comes
    run.rank1_pid()
    send(run.proc)
    sent_at = time.monotonic()
    result = run.finish()
    assert _gone(run.marker, within=max(0.0, 5 - (time.monotonic() - sent_at))) == [], result
    assert result.code == code, result
    line = _only_line(result)
    assert line.startswith(f"sp_rope.check: interrupted by {name} (exit {code}); stopped 4 of 4 ranks: "), result
    assert re.search(r"ranks? (\d+, )*1(, \d+)* in phase 'build P=2 quick/", line), result
    assert _summary(run.report)["status"] == "interrupted"


def test_a_rank_that_cannot_import_the_implementation_is_named(tmp_path):
    impl = tmp_path / "rank2_only.py"
    impl.write_text(
        "import os\n"
        "from sp_rope import build_slice as rope\n"
        "if os.environ.get('RANK') == '2':\n"
        "    raise RuntimeError('no accelerator on rank 2')\n"
    )
    result = check("--nproc", "4", "--timeout", str(TIMEOUT), "--impl", f"{impl}:rope", *SMALL)
    assert result.code == 2, result
    assert _only_line(result) == (
        f"sp_rope.check: rank 2: --impl '{impl}:rope': importing '{impl}' failed at {impl}:4: "
        "RuntimeError: no accelerator on rank 2"
    ), result


def test_a_failed_run_replaces_a_report_left_by_an_earlier_pass(tmp_path):
    report, junit = tmp_path / "r.json", tmp_path / "j.xml"
    report.write_text(json.dumps({"summary": {"passed": 12, "failed": 0, "skipped": 0}, "cases": []}))
    junit.write_text('<testsuite name="sp_rope.check" tests="12" failures="0" />')
    # An exception from the implementation is a verdict now; a rank whose process ends is not.
    impl = f"{FIXTURES}/faulty.py:die_on_rank2"
    result = check("--nproc", "4", "--report", str(report), "--junit", str(junit), "--impl", impl, *SMALL)
    assert result.code == 3, result
    summary = _summary(report)
    assert summary["status"] == "infrastructure-failure" and summary["failed"] >= 1 and summary["passed"] == 0
    assert summary["rank"] == 2 and summary["phase"], summary
    assert "rank 2 exited with code 7" in summary["message"], summary
    assert 'failures="1"' in junit.read_text() and "rank 2 exited with code 7" in junit.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["j.xml", "r.json"]  # no temporary files left


def test_under_torchrun_the_ranks_name_the_hung_rank(tmp_path):
    marker = uuid.uuid4().hex
    impl = f"{FIXTURES}/stall.py:hang_on_rank1"
    result = torchrun(
        "--standalone", "--nproc-per-node", "4", "-m", "sp_rope.check", "--timeout", str(TIMEOUT),
        "--report", str(tmp_path / f"{marker}.json"), "--impl", impl, *SMALL,
    )  # fmt: skip
    assert result.code != 0, result
    # Every rank that noticed says so (torchrun has no single verdict line); each blames rank 1.
    verdicts = [line for line in result.err.splitlines() if line.startswith("sp_rope.check: infrastructure failure")]
    assert verdicts, result
    for line in verdicts:
        assert re.search(r"\(exit 3\): rank\(s\) 1 did not reach phase '[^']+': rank 1 was busy", line), result
    assert _gone(marker, within=5) == []
