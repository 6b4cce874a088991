"""The mutation catalog, judged by the real multi-rank check: every mutant killed with its
declared diagnosis, every correct implementation passing (one 4-rank job for all of them)."""

import pytest
from helpers import check

from sp_rope.mutants import catalog


@pytest.mark.timeout(1500)  # one job for ~40 implementations; minutes on a loaded 2-core machine
def test_every_mutant_is_killed_with_its_diagnosis_and_correct_ones_pass():
    entries = catalog()
    mutants = [m for m in entries if m.expected is not None]
    assert len(mutants) >= 30
    assert {m.convention for m in entries if m.expected is None} == {"native", "fastvideo", "fastvideo-nd"}
    result = check("--nproc", "4", "--mutants", timeout=1400)
    assert result.code == 0, result
    rows = {line.split()[0]: line.split() for line in result.out.splitlines()[1:-1]}
    for m in entries:
        row = rows[m.name]
        if m.expected is None:
            assert row[-1] == "ok" and row[-2] == "pass", row
        else:
            assert row[-1] == "killed" and m.expected in row[-2].split(","), row
    assert rows["sp_rope"][-1] == "ok"
    last = result.out.strip().splitlines()[-1]
    assert last.startswith(f"kill rate 100% ({len(mutants)}/{len(mutants)} mutants), 0 false"), last
