"""Run sp_rope's check from Python, e.g. inside a framework's own test suite.

``run_check(impl=..., convention=..., nproc=2)`` runs one whole check job, exactly as
``python -m sp_rope.check`` would, and returns a :class:`CheckResult`; ``assert_check_passes``
raises ``AssertionError`` with the failure table instead. The job is a subprocess that starts its
own ranks (the self-launcher: port-0 rendezvous), so several jobs may run at once (threads,
``pytest -n auto``); each call has a private temporary directory for its JSON report and a
wall-clock timeout after which every process of the job is killed.

This module imports no torch: the pytest plugin loads it in every pytest run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_TIMEOUT = 600.0  # seconds for a whole job (the check's own --timeout bounds each collective)
EXIT_MEANING = {0: "passed", 1: "a correctness violation", 2: "bad input", 3: "an infrastructure failure"}
# What a launcher sets for its ranks. A caller that is itself a rank (a test run under torchrun)
# must not hand them on, or the check would believe it is a rank instead of launching its own.
LAUNCHER_VARIABLES = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR", "MASTER_PORT",
    "TORCHELASTIC_RUN_ID", "SP_ROPE_VERDICT_FILE",
)  # fmt: skip
STDERR_TAIL_LINES = 40
_COUNT_LINE = re.compile(r"^(\d+) passed, (\d+) failed, (\d+) skipped$", re.MULTILINE)

Items = str | int | Sequence[str | int] | None


@dataclass(frozen=True)
class CheckJob:
    """One check job: the CLI's options as fields. ``None`` leaves an option to the CLI's default.

    ``schemes``, ``dtypes``, ``layouts``, ``start_frames`` and ``configs`` take a sequence or a
    comma-separated string. ``timeout`` bounds the whole job (default 600 s);
    ``collective_timeout`` is the check's own ``--timeout`` (every collective).
    ``extra_args`` are appended to the command line as given.
    """

    impl: str | None = None
    convention: str | None = None
    impl_cache: str | None = None
    nproc: int | None = None
    configs: Items = None
    level: str | None = None
    schemes: Items = None
    dtypes: Items = None
    layouts: Items = None
    start_frames: Items = None
    steps: int | None = None
    seed: int | None = None
    backend: str | None = None
    collective_timeout: float | None = None
    timeout: float | None = None
    extra_args: Sequence[str] = ()

    def argv(self) -> list[str]:
        """The check's command-line arguments for this job (no ``--report``)."""
        args: list[str] = []
        for name, option in _SCALAR_OPTIONS.items():
            value = getattr(self, name)
            if value is not None:
                args += [option, str(value)]
        for name, option in _LIST_OPTIONS.items():
            value = getattr(self, name)
            if value is not None:
                args += [option, ",".join(_items(name, value))]
        if self.configs is not None:
            for config in _items("configs", self.configs):
                args += ["--config", config]
        return args + [str(arg) for arg in self.extra_args]

    def wall_timeout(self) -> float:
        timeout = DEFAULT_TIMEOUT if self.timeout is None else float(self.timeout)
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout!r}")
        return timeout


_SCALAR_OPTIONS = {
    "impl": "--impl", "convention": "--convention", "impl_cache": "--impl-cache", "nproc": "--nproc",
    "level": "--level", "steps": "--steps", "seed": "--seed", "backend": "--backend",
    "collective_timeout": "--timeout",
}  # fmt: skip
_LIST_OPTIONS = {"schemes": "--schemes", "dtypes": "--dtypes", "layouts": "--layouts", "start_frames": "--start-frames"}


def _items(name: str, value: Items) -> list[str]:
    """A comma-separated string, one value, or a sequence of values, as a list of strings."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, (int, os.PathLike)):
        return [os.fspath(value) if isinstance(value, os.PathLike) else str(value)]
    if isinstance(value, Sequence):
        return [os.fspath(v) if isinstance(v, os.PathLike) else str(v) for v in value]
    raise TypeError(f"{name}: expected a sequence or a comma-separated string, got {value!r}")


@dataclass(repr=False)
class CheckResult:
    """What one check job found. ``ok``: it ran, checked at least one case, and nothing failed."""

    exit_code: int
    passed: int
    failed: int
    skipped: int
    diagnoses: set[str]
    failures: list[str]  # the ``FAIL ...`` lines, as the check prints them
    report: dict[str, Any] | None  # the JSON report; None when the job wrote none
    stdout: str
    stderr: str
    command: list[str] = field(default_factory=list)
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.report is not None and self.failed == 0 and self.passed > 0

    def __repr__(self) -> str:
        parts = [
            f"ok={self.ok}", f"exit_code={self.exit_code}", f"passed={self.passed}", f"failed={self.failed}",
            f"skipped={self.skipped}", f"diagnoses={sorted(self.diagnoses)}",
        ]  # fmt: skip
        # Short enough for pytest's assertion line (~240 characters); explain() has it all.
        if self.failures:
            more = f" (+{len(self.failures) - 1} more)" if len(self.failures) > 1 else ""
            parts.append(f"failures=[{_cut(self.failures[0], 90)!r}{more}]")
        if (self.exit_code in (2, 3) or self.report is None) and self.stderr.strip():
            parts.append(f"stderr={_cut(self.stderr.strip().splitlines()[-1], 110)!r}")
        return f"CheckResult({', '.join(parts)})"

    def verdict(self) -> str:
        """One line: what the exit code means, or why ``ok`` is False despite exit 0."""
        if self.timed_out:
            return f"sp_rope check timed out (exit {self.exit_code})"
        if self.report is None and self.exit_code in (0, 1):  # a crash outside the check's own handling
            return f"sp_rope check failed: exit {self.exit_code} without a report (see stderr)"
        if self.exit_code == 0 and self.passed == 0 and self.failed == 0:
            return f"sp_rope check checked nothing: 0 passed, 0 failed, {self.skipped} skipped"
        meaning = EXIT_MEANING.get(self.exit_code, "an unknown exit code")
        return f"sp_rope check {'passed' if self.ok else 'failed'}: exit {self.exit_code} ({meaning})"

    def explain(self) -> str:
        """The verdict, the command to reproduce it, the check's output, and the tail of stderr
        (the failing rank's message) when the job could not run to a verdict."""
        lines = [self.verdict(), f"command: {shlex.join(self.command)}", self.stdout.rstrip()]
        if self.exit_code not in (0, 1) or self.timed_out or (self.report is None and self.stderr.strip()):
            tail = self.stderr.rstrip().splitlines()[-STDERR_TAIL_LINES:]
            lines += [f"--- stderr (last {len(tail)} lines)", *tail]
        return "\n".join(line for line in lines if line)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def run_check(job: CheckJob | None = None, **options: Any) -> CheckResult:
    """Run one check job in a subprocess and return what it found.

    Keyword arguments are :class:`CheckJob`'s fields (``impl``, ``convention``, ``impl_cache``,
    ``nproc``, ``configs``, ``level``, ``schemes``, ``dtypes``, ``layouts``, ``start_frames``,
    ``steps``, ``seed``, ``timeout``, ...), given instead of or on top of ``job``. The caller's
    environment reaches the ranks; a relative ``impl`` path is relative to the current directory.
    """
    job = _make_job(job, options)
    timeout = job.wall_timeout()
    with tempfile.TemporaryDirectory(prefix="sp_rope-testing-") as private:
        report_path = Path(private) / "report.json"
        command = [sys.executable, "-m", "sp_rope.check", *job.argv()]
        code, out, err, timed_out = _run_job([*command, "--report", str(report_path)], timeout)
        report = _read_report(report_path)
    return _result(command, code, out, err, report, timed_out)


def assert_check_passes(job: CheckJob | None = None, **options: Any) -> CheckResult:
    """:func:`run_check`, raising ``AssertionError`` (the check's output) unless ``ok``."""
    result = run_check(job, **options)
    if not result.ok:
        raise AssertionError(result.explain())
    return result


def _make_job(job: CheckJob | None, options: dict[str, Any]) -> CheckJob:
    known = {f.name for f in dataclasses.fields(CheckJob)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown check option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return dataclasses.replace(job, **options) if job is not None else CheckJob(**options)


def _rank_environment() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if name not in LAUNCHER_VARIABLES}


def _run_job(command: list[str], timeout: float) -> tuple[int, str, str, bool]:
    """Run the job in a process group of its own; on timeout (or if the caller is interrupted)
    kill every process it started. Returns (exit code, stdout, stderr, timed out)."""
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_rank_environment(),
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err, False
    except subprocess.TimeoutExpired:
        _kill_job(proc.pid)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # something we could not find still holds the pipes
            out, err = "", ""
        err += f"sp_rope.testing: the check ran past its timeout of {timeout:g} s; all its processes were killed\n"
        return 3, out, err, True
    except BaseException:  # KeyboardInterrupt, a pytest-timeout: leave no ranks behind
        _kill_job(proc.pid)
        proc.wait()
        raise


def _kill_job(root: int) -> None:
    """SIGKILL the job's process tree. The elastic launcher starts each rank in a session of its
    own, so killing the launcher's process group alone would leave the ranks running."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(root, signal.SIGSTOP)  # the launcher can start no more ranks while we look
    for pid in [root, *_descendants(root)]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(root, signal.SIGKILL)


def _descendants(root: int) -> list[int]:
    """Every process below ``root`` (Linux ``/proc``; elsewhere none are found)."""
    children: dict[int, list[int]] = {}
    proc = Path("/proc")
    for entry in proc.iterdir() if proc.is_dir() else ():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])  # after "(comm)": state, ppid
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _read_report(path: Path) -> dict[str, Any] | None:
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):  # none written (exit 2/3), or cut short by a kill
        return None
    return report if isinstance(report, dict) else None


def _result(
    command: list[str], code: int, out: str, err: str, report: dict[str, Any] | None, timed_out: bool
) -> CheckResult:
    summary = report.get("summary", {}) if report else {}
    counts = [int(summary.get(name, 0)) for name in ("passed", "failed", "skipped")]
    if report is None:  # the count line, if the job got as far as printing it
        lines = _COUNT_LINE.findall(out)
        counts = [int(n) for n in lines[-1]] if lines else [0, 0, 0]
    return CheckResult(
        exit_code=code,
        passed=counts[0],
        failed=counts[1],
        skipped=counts[2],
        diagnoses=set(summary.get("diagnoses", [])),
        failures=[line for line in out.splitlines() if line.startswith("FAIL ")],
        report=report,
        stdout=out,
        stderr=err,
        command=command,
        timed_out=timed_out,
    )


__all__ = ["DEFAULT_TIMEOUT", "CheckJob", "CheckResult", "assert_check_passes", "run_check"]
