"""Progress of a long check on stderr, from rank 0: cases done of the total, the family being
built, elapsed time and an estimate of what is left. A live line on a terminal; in a log (CI),
a plain line at most every ``LOG_EVERY_S`` seconds. ``--quiet`` turns it off."""

from __future__ import annotations

import sys
import time
from typing import TextIO

LOG_EVERY_S = 10.0


class Progress:
    def __init__(self, total: int, enabled: bool, stream: TextIO | None = None) -> None:
        self.total, self.enabled = max(total, 1), enabled
        self.stream = stream or sys.stderr
        self.live = self.enabled and self.stream.isatty()
        self.start = time.monotonic()
        self.done = 0
        self._last_line = self.start

    def advance(self, cases: int, where: str) -> None:
        self.done += cases
        if not self.enabled:
            return
        now = time.monotonic()
        if not self.live and now - self._last_line < LOG_EVERY_S:
            return
        self._last_line = now
        elapsed = now - self.start
        left = elapsed * (self.total - self.done) / self.done if self.done else float("nan")
        line = f"sp_rope.check: {self.done}/{self.total} cases, {where}, {elapsed:.0f} s elapsed, ~{left:.0f} s left"
        self.stream.write(f"\r\x1b[2K{line}" if self.live else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.live:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
