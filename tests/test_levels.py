"""Apply and attention levels on real ranks: every scheme at SP sizes 2 and 4."""

from __future__ import annotations

import json

import pytest
from helpers import ALL_SCHEMES, check


@pytest.mark.parametrize("level", ["apply", "attention"])
def test_every_scheme_passes_at_level_on_sp_sizes_2_and_4(tmp_path, level):
    report = tmp_path / "r.json"
    result = check(
        "--nproc", "4", "--level", level, "--dtypes", "float32", "--start-frames", "0,4096", "--report", str(report)
    )
    assert result.code == 0, result
    cases = json.loads(report.read_text())["cases"]
    at_level = {(c["scheme"], c["sp_size"]) for c in cases if c["status"] == "passed" and c["level"] == level}
    for size in (2, 4):
        assert {s for s, p in at_level if p == size} == ALL_SCHEMES - ({"contiguous:h"} if size == 4 else set())


@pytest.mark.parametrize("mutant", ["rope_not_permuted", "rope_permuted_hidden_not"])
def test_permutation_mutants_pass_tables_and_fail_apply(tmp_path, mutant):
    impl = ["--impl", f"sp_rope/mutants/{mutant}.py:rope", "--layouts", "interleaved", "--dtypes", "float32"]
    tables = check("--nproc", "4", "--level", "table", *impl)
    assert tables.code == 0, tables
    report = tmp_path / "r.json"
    applied = check("--nproc", "4", "--level", "all", "--report", str(report), *impl)
    assert applied.code == 1, applied
    assert {"apply-mismatch", "attention-mismatch"} <= set(json.loads(report.read_text())["summary"]["diagnoses"])
    assert "rotated q differs from the single-rank result at token" in applied.out
