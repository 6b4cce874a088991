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
        # >=: the default run's breadth geometries add schemes that quick's grid cannot split.
        assert {s for s, p in at_level if p == size} >= ALL_SCHEMES - ({"contiguous:h"} if size == 4 else set())


@pytest.mark.parametrize("mutant", ["rope_not_permuted", "rope_permuted_hidden_not"])
def test_permutation_mutants_fail_plan_tokens_at_the_table_level_and_apply(tmp_path, mutant):
    # RoPE built for another token order than the hidden states: the table level sees a rank
    # claiming tokens other than its plan's; the apply and attention levels see wrong rotations.
    impl = ["--impl", f"sp_rope.mutants.native:{mutant}", "--layouts", "interleaved", "--dtypes", "float32"]
    tables = tmp_path / "t.json"
    result = check("--nproc", "4", "--level", "table", "--report", str(tables), *impl)
    assert result.code == 1, result
    assert "plan-mismatch" in json.loads(tables.read_text())["summary"]["diagnoses"]
    report = tmp_path / "r.json"
    applied = check("--nproc", "4", "--level", "all", "--report", str(report), *impl)
    assert applied.code == 1, applied
    assert {"apply-mismatch", "attention-mismatch"} <= set(json.loads(report.read_text())["summary"]["diagnoses"])
    assert "rotated q differs from the single-rank result at token" in json.dumps(json.loads(report.read_text()))
