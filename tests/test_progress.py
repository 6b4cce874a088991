"""Progress of long runs: on stderr from rank 0, a live line on a terminal, sparse lines in a log,
nothing with --quiet."""

from __future__ import annotations

import io
import re

from helpers import check

import sp_rope.progress as progress_module
from sp_rope.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_lines_say_cases_done_where_elapsed_and_left(monkeypatch):
    monkeypatch.setattr(progress_module, "LOG_EVERY_S", 0.0)
    log = io.StringIO()
    p = Progress(total=10, enabled=True, stream=log)
    p.advance(4, "quick/float64/interleaved start_frame 17")
    line = log.getvalue()
    assert re.fullmatch(
        r"sp_rope\.check: 4/10 cases, quick/float64/interleaved start_frame 17, \d+ s elapsed, ~\d+ s left\n", line
    ), line


def test_a_log_gets_sparse_lines_and_a_terminal_one_live_line(monkeypatch):
    log, terminal = io.StringIO(), _Terminal()
    sparse, live = Progress(100, True, log), Progress(100, True, terminal)
    for _ in range(50):
        sparse.advance(1, "x")
        live.advance(1, "x")
    live.close()
    assert log.getvalue().count("\n") <= 1  # at most one line per LOG_EVERY_S (10 s)
    assert terminal.getvalue().count("\r") >= 50 and "\n" not in terminal.getvalue()


def test_disabled_progress_writes_nothing():
    log = io.StringIO()
    Progress(5, False, log).advance(5, "x")
    assert log.getvalue() == ""


def test_quiet_runs_print_no_progress():
    result = check(
        "--nproc", "2", "--seed", "1", "--quiet", "--config", "quick", "--schemes", "flat", "--level", "table"
    )
    assert result.code == 0, result
    assert "cases," not in result.err and result.out.strip().endswith("skipped"), result
