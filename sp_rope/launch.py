"""Self-launch: ``python -m sp_rope.check --nproc N`` starts its own ranks.

It uses torch's elastic launcher exactly as ``torchrun --standalone`` does (c10d rendezvous on
a free localhost port) and runs ``python -m sp_rope.check`` in each worker. It also owns how a
run ends when it ends without a verdict:

- a rank failure is exit 3 with one line naming the rank(s) that stopped making progress and
  the phase each was in, read from the liveness board (:mod:`sp_rope.board`) the ranks keep in a
  directory of this launcher's;
- a rank stopped with SIGSTOP cannot act on SIGTERM, so once the job is failing such ranks are
  SIGKILLed (the agent would wait 30 s for each);
- Ctrl-C or SIGTERM stops every rank within seconds: exit 130 or 143, one line, no traceback;
- the ``--report``/``--junit`` files say how the run ended (``incomplete`` while it runs), so a
  report left by an earlier run never survives a failed one.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from . import board
from .report import JobOutcome, write_outcome_reports

EXIT_USAGE, EXIT_INFRA = 2, 3
# Every rank is a local process that imports torch (~0.3 GB each) and holds gloo connections to
# every other rank: a few hundred is already more than one machine runs well. The bound is far
# above that, and stops a typo (--nproc 1099511627776) from trying to start them one by one.
MAX_NPROC = 4096
SHUTDOWN_S = 2  # after SIGTERM, workers still alive this much later are SIGKILLed
_AGENT_SIGTERM = -signal.SIGTERM  # the exit code of a worker the agent stopped after another failed


@dataclass(frozen=True)
class LaunchRequest:
    """What the launcher needs from the command line (the check parses it; ranks reparse argv)."""

    argv: tuple[str, ...]  # the check's own arguments, passed to every rank
    nproc: int
    timeout: float
    report: str | None = None
    junit: str | None = None


class _Signals:
    """SIGINT and SIGTERM to the launcher end the job: the first one stops the agent (which then
    SIGTERMs every rank, silently, even a rank still importing torch); later ones are ignored
    while the launcher reports."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self.armed = True
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        from torch.distributed.elastic.multiprocessing.api import SignalException

        if self.received is not None or not self.armed:
            return
        self.received = signal.Signals(signum)
        # The agent stops its workers with the signal it is handed: SIGTERM, whatever came in.
        raise SignalException(f"sp_rope.check got {self.received.name}", sigval=signal.SIGTERM)


class _Reaper(threading.Thread):
    """Once the job is failing (a rank ended badly or vanished), SIGKILLs ranks stopped with
    SIGSTOP: SIGTERM stays pending on a stopped process, and the agent would wait 30 s."""

    def __init__(self, board_dir: Path) -> None:
        super().__init__(name="sp_rope-reaper", daemon=True)
        self.board_dir = board_dir
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.25):
            entries = board.read_directory(self.board_dir)
            # Final outcomes only: a rank still reading the board must see the stopped rank stopped.
            ended_badly = [e for e in entries.values() if e.outcome and e.outcome["final"] and e.outcome["code"] >= 2]
            vanished = [e for e in entries.values() if not e.outcome and not board.alive(e)]
            failing = ended_badly or vanished
            if failing:
                for pid in board.stopped_children(entries):
                    os.kill(pid, signal.SIGKILL)


def self_launch(request: LaunchRequest) -> int:
    """Run the job on ``request.nproc`` local ranks; the check's exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The agent logs every worker start and stop at WARNING; keep the user's terminal to the verdict.
    # (Its modules set their own loggers' levels, so the parent's level alone is not enough.)
    for name in ["torch.distributed.elastic", *logging.root.manager.loggerDict]:
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=request.nproc,
        run_id=f"sp_rope-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
        rdzv_configs={"timeout": int(max(60, request.timeout))},
        signals_to_handle="SIGHUP,SIGQUIT",  # SIGINT and SIGTERM are _Signals'
        shutdown_timeout=SHUTDOWN_S,
    )
    # As torchrun does: one intra-op thread per rank. Without it, N ranks x all cores of threads
    # oversubscribe the machine and the default check runs ~3x slower on 2 cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # gloo's C++ log lines on a failed barrier point at its coordinator ("check rank 0 logs"),
    # whoever stopped; the verdict line names the rank from the board. (Set it to see them.)
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
    argv = ["-m", "sp_rope.check", *request.argv]
    with _Signals() as signals, tempfile.TemporaryDirectory(prefix="sp_rope-") as tmp:
        verdict, board_dir = Path(tmp) / "verdict", Path(tmp) / "board"
        board_dir.mkdir()
        os.environ.update({"SP_ROPE_VERDICT_FILE": str(verdict), board.BOARD_ENV: str(board_dir)})
        reaper = _Reaper(board_dir)
        try:
            started = JobOutcome("incomplete", "the run has not written its verdict (still running, or it was stopped)")
            _write_reports(started, request)
            reaper.start()
            elastic_launch(config, entrypoint=sys.executable)(*argv)
        except ChildFailedError as err:
            signals.armed = False
            return _report_failure(err, board.read_directory(board_dir), request)
        except SignalException as err:
            signals.armed = False
            received = signals.received or signal.Signals(err.sigval)
            return _report_interrupt(received, board.read_directory(board_dir), request)
        finally:
            signals.armed = False  # a signal from here on, while the launcher reports, is ignored
            reaper.done.set()
            del os.environ["SP_ROPE_VERDICT_FILE"], os.environ[board.BOARD_ENV]
        if not verdict.exists():
            message = "rank 0 finished without a verdict"
            return _infra(message, JobOutcome("infrastructure-failure", message, 0, None, request.nproc), request)
        return int(verdict.read_text())


def _say(line: str) -> None:
    print(f"sp_rope.check: {line}", file=sys.stderr, flush=True)


def _write_reports(outcome: JobOutcome, request: LaunchRequest) -> None:
    try:
        write_outcome_reports(outcome, request.report, request.junit)
    except OSError as exc:  # checked writable before launch; if that changed, the verdict line still stands
        _say(f"could not write the report: {exc}")


def _infra(message: str, outcome: JobOutcome, request: LaunchRequest) -> int:
    _say(f"infrastructure failure (exit 3): {message}")
    _write_reports(outcome, request)
    return EXIT_INFRA


def _report_interrupt(received: signal.Signals, entries: dict[int, board.Entry], request: LaunchRequest) -> int:
    code = 128 + int(received)
    by_phase: dict[str, list[int]] = {}
    for rank in sorted(entries):
        by_phase.setdefault(entries[rank].phase, []).append(rank)
    where = "; ".join(
        f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} in phase {name!r}"
        for name, ranks in by_phase.items()
    )
    stopped = f"stopped {len(entries)} of {request.nproc} ranks: {where}" if entries else "no rank had started"
    message = f"interrupted by {received.name} (exit {code}); {stopped}"
    _say(message)
    _write_reports(JobOutcome("interrupted", message, world_size=request.nproc), request)
    return code


def _report_failure(err: Any, entries: dict[int, board.Entry], request: LaunchRequest) -> int:
    """One verdict line for a job a rank ended badly, from what the ranks left on the board.

    In order: a rank-specific bad input (exit 2); ranks that failed in their own code; the ranks
    that the ranks which noticed the failure blamed (the ranks all of them name); ranks that
    died without a word (killed, crashed); else the agent's record of the first failure.
    """
    exits: dict[int, int] = {rank: f.exitcode for rank, f in getattr(err, "failures", {}).items()}
    ended = {r: e.outcome for r, e in entries.items() if e.outcome}
    usage = {r: o for r, o in ended.items() if o["code"] == EXIT_USAGE}
    if usage:
        messages = {o["message"] for o in usage.values()}
        rank = min(usage)
        line = next(iter(messages)) if len(usage) == request.nproc and len(messages) == 1 else (
            f"rank {rank}: {usage[rank]['message']}"
        )
        _say(line)
        _write_reports(JobOutcome("bad-input", line, rank, None, request.nproc), request)
        return EXIT_USAGE
    own = sorted((o["at"], r) for r, o in ended.items() if entries[r].own_failure)
    if own:
        rank = own[0][1]
        return _blame(ended[rank]["message"], [rank], entries, request)
    noticed = [(o["culprits"], o["message"], o["at"]) for o in ended.values() if o["code"] != 0 and o["culprits"]]
    if noticed:
        common = set.intersection(*(set(c) for c, _, _ in noticed))
        # The message of a rank that blamed exactly the ranks every rank blamed; barrier verdicts
        # ("did not reach phase") first, they say which phase the others were waiting for.
        best = sorted(noticed, key=lambda n: (set(n[0]) != common, "did not reach" not in n[1], n[2]))[0]
        return _blame(best[1], sorted(common) or best[0], entries, request)
    died = sorted(r for r, code in exits.items() if code not in (0, _AGENT_SIGTERM) and r not in ended)
    if died:
        parts = [f"rank {r} {_death(exits[r])} in phase {_phase(entries, r)!r}" for r in died]
        return _blame("; ".join(parts), died, entries, request)
    said = sorted((o["at"], r) for r, o in ended.items() if o["code"] == EXIT_INFRA and o.get("final"))
    if said:  # a rank that failed without finding whom to blame: its own account
        rank = said[0][1]
        return _blame(ended[rank]["message"], [rank], entries, request)
    return _blame(_agent_record(err, exits), sorted(exits)[:1], entries, request)


def _blame(message: str, culprits: list[int], entries: dict[int, board.Entry], request: LaunchRequest) -> int:
    rank = culprits[0] if culprits else None
    phase = _phase(entries, rank) if rank is not None else None
    return _infra(message, JobOutcome("infrastructure-failure", message, rank, phase, request.nproc), request)


def _phase(entries: dict[int, board.Entry], rank: int) -> str:
    return entries[rank].phase if rank in entries else "startup"


def _death(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode} without a verdict"


def _agent_record(err: Any, exits: dict[int, int]) -> str:
    """The elastic agent's account of the first failure, when the board has nothing better."""
    failures = getattr(err, "failures", {})
    if not failures:
        return "the job failed without naming a rank"
    rank, failure = min(failures.items(), key=lambda kv: (kv[1].timestamp, kv[0]))
    message = getattr(failure, "message", "")
    if isinstance(message, dict):
        message = message.get("message", "")
    text = str(message or "").strip()
    detail = "" if not text or text.startswith("To enable traceback") else f": {text.splitlines()[0]}"
    return f"rank {rank} exited with code {failure.exitcode}{detail}; ranks that failed: {sorted(exits)}"
