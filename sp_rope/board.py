"""The liveness board: every rank's phase and heartbeat, so a failure names the rank that stopped.

When a collective times out, the rank that notices is usually a healthy one, waiting for the
culprit. So each rank publishes where it is: its phase, whether its main thread is inside
``torch.distributed`` (waiting in a collective or barrier) or in its own code (and at which
line), and a heartbeat that a daemon thread advances every ``BEAT_S``. Whoever notices a failure
reads the board and names the rank(s) that stopped making progress, with the phase each was in:
a rank whose heartbeat stopped (stopped, killed, wedged), else a rank busy in its own code while
the others wait for it.

Two sinks carry the same entries: a directory named by ``$SP_ROPE_BOARD`` (the self-launcher
sets it, and reads it after the job ends: one small JSON file per rank, replaced atomically) and,
when there is no directory (torchrun, any number of nodes), the job's c10d store.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BOARD_ENV = "SP_ROPE_BOARD"
BEAT_S = 0.5  # heartbeat period
COALESCE_S = 0.05  # phase changes are published at most this often (the latest one wins)
WATCH_S = 2.0  # a reader calls a rank stopped when its heartbeat did not advance for this long
_STORE_PREFIX = "sp_rope/board"


@dataclass
class Entry:
    """One rank's line on the board."""

    rank: int
    pid: int
    host: str
    phase: str = "startup"
    since: float = 0.0  # wall-clock time the phase began
    beat: int = 0  # advanced every BEAT_S by the heartbeat thread
    at: float = 0.0  # wall-clock time of the last publication
    waiting: bool = False  # the main thread is inside torch.distributed (a collective or barrier)
    where: str = ""  # the main thread's innermost frame outside torch: "file.py:line function"
    outcome: dict[str, Any] | None = None  # set once, when the rank ends: code, message, culprits

    @property
    def own_failure(self) -> bool:
        """The rank failed in its own code (not waiting for another rank)."""
        return bool(self.outcome) and self.outcome.get("culprits") == [self.rank]  # type: ignore[union-attr]


def directory() -> Path | None:
    """The board directory of a self-launched job (None under torchrun)."""
    value = os.environ.get(BOARD_ENV)
    return Path(value) if value else None


def read_directory(path: Path) -> dict[int, Entry]:
    entries = {}
    for file in path.glob("rank*.json"):
        with contextlib.suppress(OSError, ValueError, TypeError):
            entry = Entry(**json.loads(file.read_text()))
            entries[entry.rank] = entry
    return entries


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")  # one writer per file: a fixed temporary name is enough
    tmp.write_text(text)
    os.replace(tmp, path)


class Publisher:
    """This rank's entry, kept current on the board by a daemon thread."""

    def __init__(self, rank: int, board_dir: Path | None) -> None:
        now = time.time()
        self.entry = Entry(rank, os.getpid(), socket.gethostname(), since=now, at=now)
        self.board_dir = board_dir
        self.store: Any = None
        # Keys per restart of an elastic job: a restarted job never reads the previous attempt's.
        self._store_prefix = f"{_STORE_PREFIX}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._main = threading.main_thread().ident
        self._stopping = False
        self.publish()
        self._thread = threading.Thread(target=self._run, name="sp_rope-heartbeat", daemon=True)
        self._thread.start()

    def set_phase(self, name: str) -> None:
        # Only a note for the heartbeat thread: the phase changes hundreds of times a run.
        self.entry.phase, self.entry.since = name, time.time()
        self._changed.set()

    def failing(self, phase: str) -> None:
        """This rank noticed a failure in ``phase`` and is about to read the board: from now on
        it is not a candidate culprit (it is neither waiting nor making progress)."""
        self.entry.phase = phase
        self.finish(3, f"noticed a failure in phase {phase!r}", [], final=False)

    def finish(self, code: int, message: str, culprits: list[int], final: bool = True) -> None:
        """Record how this rank ended; published now, the process is about to exit."""
        self.entry.outcome = {"code": code, "message": message, "culprits": culprits, "at": time.time(), "final": final}
        self.publish()
        if final:
            self.stop()

    def stop(self) -> None:
        """No more beats, and no more store: the process is about to exit, and a daemon thread
        inside the store's C++ client while the interpreter tears down aborts the process
        ("terminate called without an active exception")."""
        self._stopping = True
        self._changed.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * BEAT_S)
        with self._lock:
            self.store = None

    def publish(self) -> None:
        with self._lock:
            self._observe_main_thread()
            self.entry.at = time.time()
            text = json.dumps(asdict(self.entry))
            if self.board_dir is not None:
                with contextlib.suppress(OSError):  # the launcher removed it: the job is over
                    _write_atomic(self.board_dir / f"rank{self.entry.rank}.json", text)
            if self.store is not None:
                try:
                    self.store.set(f"{self._store_prefix}/{self.entry.rank}", text)
                except Exception:  # noqa: BLE001 - the store is gone (the job is ending); stop using it
                    self.store = None

    def read_store(self, world_size: int) -> dict[int, Entry]:
        entries: dict[int, Entry] = {}
        with self._lock:
            if self.store is None:
                return entries
            for rank in range(world_size):
                key = f"{self._store_prefix}/{rank}"
                with contextlib.suppress(Exception):
                    if self.store.check([key]):
                        entries[rank] = Entry(**json.loads(self.store.get(key)))
        return entries

    def _run(self) -> None:
        next_beat = time.monotonic() + BEAT_S
        while not self._stopping:
            self._changed.wait(max(0.0, next_beat - time.monotonic()))
            self._changed.clear()
            if self._stopping:
                return
            if time.monotonic() >= next_beat:
                self.entry.beat += 1
                next_beat = time.monotonic() + BEAT_S
            self.publish()
            time.sleep(COALESCE_S)

    def _observe_main_thread(self) -> None:
        frame = sys._current_frames().get(self._main) if self._main is not None else None
        # Waiting: the innermost frame is torch.distributed's (it called into a collective). Not
        # any frame: torchelastic's @record wraps the whole rank.
        self.entry.waiting = frame is not None and "/torch/distributed/" in _filename(frame)
        self.entry.where = ""
        while frame is not None and ("/torch/" in _filename(frame) or frame.f_code.co_filename == __file__):
            frame = frame.f_back
        if frame is not None:
            self.entry.where = f"{Path(_filename(frame)).name}:{frame.f_lineno} {frame.f_code.co_name}"


def _filename(frame: Any) -> str:
    return str(frame.f_code.co_filename).replace(os.sep, "/")


_publisher: Publisher | None = None


def start(rank: int) -> Publisher:
    """Put this rank on the board (once per process)."""
    global _publisher
    if _publisher is None:
        _publisher = Publisher(rank, directory())
    return _publisher


def publisher() -> Publisher | None:
    return _publisher


def set_phase(name: str) -> None:
    if _publisher is not None:
        _publisher.set_phase(name)


def failing(phase: str) -> None:
    if _publisher is not None:
        _publisher.failing(phase)


# ---------------------------------------------------------------------------------------------
# Reading the board


@dataclass(frozen=True)
class Culprit:
    """A rank that stopped making progress, and what the board showed of it."""

    rank: int
    phase: str
    state: str  # "was stopped (SIGSTOP)", "was busy for 12s at x.py:3 fn", ...

    def __str__(self) -> str:
        return f"rank {self.rank} {self.state} in phase {self.phase!r}"


def find_culprits(world_size: int, me: int) -> list[Culprit]:
    """Ranks other than ``me`` that stopped making progress, watched for up to WATCH_S.

    Named, in order of preference: ranks that failed in their own code, ranks whose heartbeat
    stopped (stopped, killed, wedged), else ranks busy in their own code, not in a collective,
    while ``me`` waited (those whose phase did not change while watched, if any).
    """
    pub = _publisher
    if pub is None or (pub.board_dir is None and pub.store is None):
        return []  # no board to read: blame nobody rather than everybody
    board_dir = pub.board_dir

    def read() -> dict[int, Entry]:
        return read_directory(board_dir) if board_dir is not None else pub.read_store(world_size)

    others = [r for r in range(world_size) if r != me]
    first = read()
    deadline = time.monotonic() + WATCH_S
    while True:
        time.sleep(BEAT_S / 2)
        last = read()
        quiet = [r for r in others if _quiet(first.get(r), last.get(r))]
        if not quiet or time.monotonic() >= deadline:
            break
    failed = [r for r in others if r in last and last[r].own_failure]
    if failed:
        return [Culprit(r, last[r].phase, "failed") for r in failed]
    if quiet:
        return [_silent(r, last.get(r)) for r in quiet]
    now = time.time()
    busy = [r for r in others if not last[r].waiting and not last[r].outcome]
    stuck = [r for r in busy if r in first and (last[r].phase, last[r].since) == (first[r].phase, first[r].since)]
    return [
        Culprit(r, last[r].phase, f"was busy for {now - last[r].since:.0f}s at {last[r].where or '?'}")
        for r in (stuck or busy)
    ]


def _quiet(before: Entry | None, after: Entry | None) -> bool:
    """No heartbeat between two readings (or no entry at all), and no recorded ending."""
    if after is None:
        return True
    if after.outcome:
        return False
    return before is not None and before.beat == after.beat and before.pid == after.pid


def _silent(rank: int, entry: Entry | None) -> Culprit:
    if entry is None:
        return Culprit(rank, "startup", "never reported (no board entry)")
    age = time.time() - entry.at
    return Culprit(rank, entry.phase, f"{process_state(entry)} with no heartbeat for {age:.0f}s")


def process_state(entry: Entry) -> str:
    """What the OS says about a rank's process, when it runs on this host."""
    stat = Path(f"/proc/{entry.pid}/stat")
    if entry.host != socket.gethostname() or not Path("/proc/self/stat").exists():
        return "stopped responding"
    try:
        state = stat.read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "exited"
    return {"T": "was stopped (SIGSTOP)", "t": "was stopped by a tracer", "Z": "exited"}.get(
        state, "stopped responding"
    )


def stopped_children(entries: dict[int, Entry]) -> list[int]:
    """Pids of this process's children that are stopped (SIGSTOP): SIGTERM cannot end them."""
    found = []
    for entry in entries.values():
        try:
            fields = Path(f"/proc/{entry.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] == "T" and int(fields[1]) == os.getpid():
            found.append(entry.pid)
    return found


def alive(entry: Entry) -> bool:
    try:
        state = Path(f"/proc/{entry.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"

