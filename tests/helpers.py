"""Run the check as a user would: a real subprocess, a deadline, and its output on failure."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
# A small matrix for tests that are about the job, not about coverage of the schemes.
SMALL = [
    "--schemes",
    "contiguous:t,flat:pad,zigzag",
    "--dtypes",
    "float64",
    "--layouts",
    "interleaved",
    "--start-frames",
    "0,4096",
    "--steps",
    "2",
]


@dataclass
class Run:
    code: int
    out: str
    err: str
    seconds: float

    def __str__(self) -> str:
        return f"exit {self.code} after {self.seconds:.1f}s\n--- stdout\n{self.out}\n--- stderr\n{self.err}"


def run(args: list[str], timeout: float = 240, env: dict[str, str] | None = None, cwd: Path = REPO) -> Run:
    """Run a command (from the repo root by default) with launcher variables scrubbed."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    clean.setdefault("OMP_NUM_THREADS", "1")
    clean.update(env or {})
    start = time.monotonic()
    proc = subprocess.run(args, cwd=cwd, env=clean, capture_output=True, text=True, timeout=timeout)
    return Run(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start)


def check(*args: str, timeout: float = 240) -> Run:
    return run([sys.executable, "-m", "sp_rope.check", *args], timeout=timeout)


def torchrun(*args: str, timeout: float = 240) -> Run:
    return run([sys.executable, "-m", "torch.distributed.run", *args], timeout=timeout)


def processes_with(marker: str) -> list[str]:
    """Command lines of live processes mentioning ``marker`` (to prove nothing was orphaned)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(cmdline)
    return found


# Every sharding scheme the check must exercise, spelled out here (not taken from sp_rope), so a
# scheme dropped from the library's own list still fails the tests that expect it to run.
ALL_SCHEMES = {
    "contiguous:t", "contiguous:h", "contiguous:w", "flat", "flat:pad", "flat:uneven",
    "zigzag", "zigzag:t", "stripe", "usp:2",
}
