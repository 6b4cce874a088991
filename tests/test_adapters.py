"""Adapters: loading --impl/--impl-cache, and the real diffusers package."""

from __future__ import annotations

import json
import sys

import torch
from helpers import REPO, check

from sp_rope import RopeSpec, ShardPlan, build_table
from sp_rope.adapters import DiffusersWanProvider, load_object, make_provider
from sp_rope.oracle import oracle_table, tolerance

FASTVIDEO = REPO / "sp_rope" / "mutants" / "correct_fastvideo.py"


def test_impl_and_impl_cache_in_one_file_share_one_module():
    fn = load_object(f"{FASTVIDEO}:rope")
    cache = load_object(f"{FASTVIDEO}:ROPE_CACHE")
    assert fn.__globals__["ROPE_CACHE"] is cache
    assert load_object(f"{FASTVIDEO}:rope") is fn  # loaded once, not re-executed


def test_fastvideo_adapter_substitutes_and_restores_get_sp_group():
    provider = make_provider(f"{FASTVIDEO}:rope", "fastvideo", f"{FASTVIDEO}:ROPE_CACHE")
    original = provider.fn.__globals__["get_sp_group"]
    spec = RopeSpec((4, 2, 2), (8, 8, 8), dtype="float64")
    plan = ShardPlan("contiguous", axis=0)
    sl = provider.get(spec, plan, 1, 2, "cpu")
    assert provider.fn.__globals__["get_sp_group"] is original
    full_cos, _ = build_table(spec)
    assert torch.equal(sl.cos, full_cos[plan.indices(spec.grid, 1, 2)])
    assert sl.key is not None and sl.key in load_object(f"{FASTVIDEO}:ROPE_CACHE")


def test_diffusers_wan_table_matches_the_float64_formula_in_float32():
    provider = DiffusersWanProvider()
    spec = RopeSpec.for_head_dim((4, 6, 8), 128, dtype="float32")
    assert provider.skip_reason(spec, ShardPlan("flat")) is None
    full = provider.full(spec, "cpu")
    assert full.cos.dtype == torch.float32 and full.cos.shape == (spec.num_tokens, 128)
    want_cos, want_sin = oracle_table(spec)
    assert float((full.cos.double() - want_cos).abs().max()) <= tolerance(spec)
    assert float((full.sin.double() - want_sin).abs().max()) <= tolerance(spec)
    assert "diffusers" in sys.modules  # the real package answered, not a stand-in


def test_diffusers_wan_job_passes_and_skips_what_it_cannot_express(tmp_path):
    config = tmp_path / "wan_tiny.toml"
    config.write_text('name = "wan-tiny"\ngrid = [4, 6, 8]\nhead_dim = 128\n')
    report = tmp_path / "r.json"
    result = check(
        "--nproc",
        "2",
        "--convention",
        "diffusers-wan",
        "--config",
        str(config),
        "--schemes",
        "flat,zigzag",
        "--start-frames",
        "0,5",
        "--report",
        str(report),
    )
    assert result.code == 0, result
    cases = json.loads(report.read_text())["cases"]
    passed = [c for c in cases if c["status"] == "passed"]
    assert passed and all(c["scheme"] == "flat" and c["start_frame"] == 0 and c["dtype"] == "float32" for c in passed)
    reasons = " ".join(c["details"][0] for c in cases if c["status"] == "skipped")
    assert "no start_frame" in reasons and "not zigzag" in reasons and "float32 tables only" in reasons
