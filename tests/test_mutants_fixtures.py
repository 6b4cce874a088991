"""The mutation catalog (sp_rope.mutants): well-formed, correct entries bit-exact, every mutant
killed by the real multi-rank check with its declared diagnosis, every correct entry passing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import check

from sp_rope import build_slice, build_table, parse_plan
from sp_rope.config import load_config
from sp_rope.mutants import CONVENTIONS, Mutant, _base, catalog
from sp_rope.mutants import correct_fastvideo as fv
from sp_rope.mutants import correct_fastvideo_nd as nd
from sp_rope.mutants import correct_native as native
from sp_rope.report import DIAGNOSES

GOLDEN = Path(__file__).resolve().parent / "assets" / "fastvideo_rope_tables.pt"
CATALOG = catalog()


def test_catalog_is_well_formed():
    names = [m.name for m in CATALOG]
    assert len(names) == len(set(names))
    mutants = [m for m in CATALOG if m.expected is not None]
    correct = [m for m in CATALOG if m.expected is None]
    assert len(mutants) >= 14
    assert {m.convention for m in correct} == set(CONVENTIONS)
    assert {m.convention for m in mutants} == set(CONVENTIONS)
    for m in CATALOG:
        assert isinstance(m, Mutant) and m.module == f"sp_rope.mutants.{m.name}" and m.path.is_file()
        assert m.expected is None or m.expected in DIAGNOSES
        assert m.convention != "fastvideo-nd" or m.cache is None  # the check caches nd builders itself
        assert "--impl" in m.check_args() and m.convention in m.check_args()
    assert not any(m.name.startswith("_") for m in CATALOG)


def _golden() -> list[dict]:
    if not GOLDEN.is_file():
        pytest.fail(f"golden RoPE tables not found at {GOLDEN}")
    return torch.load(GOLDEN, weights_only=True)


def test_correct_implementations_match_the_golden_tables_bit_for_bit(monkeypatch):
    for e in _golden():
        dtype = getattr(torch, e["dtype"])
        want = (e["cos"], e["sin"])
        group = _base.SpGroup(e["sp_rank"], e["sp_world_size"])
        monkeypatch.setattr(fv, "get_sp_group", lambda group=group: group)
        got_fv = fv.rope(
            e["rope_sizes"], sum(e["rope_dim_list"]), 1, e["rope_dim_list"], e["rope_theta"],
            theta_rescale_factor=e["theta_rescale_factor"], interpolation_factor=e["interpolation_factor"],
            shard_dim=e["shard_dim"], do_sp_sharding=e["sp_world_size"] > 1, dtype=dtype,
            start_frame=e["start_frame"], use_real=e["use_real"],
        )
        got_nd = nd.rope(
            e["rope_dim_list"], e["rope_sizes"], theta=e["rope_theta"],
            theta_rescale_factor=e["theta_rescale_factor"], interpolation_factor=e["interpolation_factor"],
            shard_dim=e["shard_dim"], sp_rank=e["sp_rank"], sp_world_size=e["sp_world_size"], dtype=dtype,
            start_frame=e["start_frame"], use_real=e["use_real"],
        )
        assert _base.same_bits(got_fv, want), e["name"]
        assert _base.same_bits(got_nd, want), e["name"]


@pytest.mark.parametrize("config", ["quick", "quick-odd"])
@pytest.mark.parametrize("layout", ["interleaved", "half", "neox"])
def test_correct_native_matches_sp_rope_bit_for_bit(config, layout):
    cfg = load_config(config)
    for dtype in ("float32", "float64"):
        for sf in (0, 4096):
            spec = cfg.spec(dtype, layout, sf)
            full = native.rope(spec, parse_plan("contiguous:t"), 0, 1)
            assert _base.same_bits((full.cos, full.sin), build_table(spec))
            for scheme in ("flat:pad", "zigzag", "usp:2", "stripe"):
                plan = parse_plan(scheme)
                for rank in range(4):
                    try:
                        want = build_slice(spec, plan, rank, 4)
                    except ValueError:  # not divisible: the check skips it too
                        continue
                    got = native.rope(spec, plan, rank, 4)
                    assert torch.equal(got.indices, want.indices)
                    assert _base.same_bits((got.cos, got.sin), (want.cos, want.sin))


@pytest.mark.parametrize("entry", CATALOG, ids=[m.name for m in CATALOG])
def test_check_verdict(entry: Mutant, tmp_path):
    """The default matrix on 4 ranks: a mutant fails with its declared diagnosis among those
    reported; a correct implementation passes."""
    report = tmp_path / "report.json"
    result = check("--nproc", "4", "--quiet", *entry.check_args(), "--report", str(report), timeout=280)
    assert report.is_file(), result
    summary = json.loads(report.read_text())["summary"]
    if entry.expected is None:
        assert result.code == 0 and summary["failed"] == 0 and summary["passed"] > 0, result
    else:
        assert result.code == 1, result
        assert entry.expected in summary["diagnoses"], (summary["diagnoses"], str(result))
