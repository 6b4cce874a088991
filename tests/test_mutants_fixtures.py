"""The mutation catalog (sp_rope.mutants): well-formed, correct entries bit-exact, every mutant
killed by the real multi-rank check with its declared diagnosis, every correct entry passing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import check

from sp_rope import build_slice, build_table, parse_plan
from sp_rope.adapters import load_object
from sp_rope.config import load_config
from sp_rope.mutants import CONVENTIONS, Mutant, _base, catalog
from sp_rope.mutants import fastvideo as fv_module
from sp_rope.report import DIAGNOSES

GOLDEN = Path(__file__).resolve().parent / "assets" / "fastvideo_rope_tables.pt"
CATALOG = catalog()
ENTRY = {m.name: m for m in CATALOG}

# Every mutant the catalog had before it became declarative, with its diagnosis: the bugs stay.
KEPT = {
    "fv_concat_not_interleaved": "oracle-mismatch", "fv_key_no_dtype": "oracle-mismatch",
    "fv_key_no_sp_rank": "key-collision", "fv_key_no_sp_world_size": "key-collision",
    "fv_key_no_start_frame": "oracle-mismatch", "fv_mutate_on_hit": "unstable-across-steps",
    "fv_start_frame_rank0": "slice-mismatch", "native_pad_front": "apply-mismatch",
    "native_stale_slot": "stale-after-eviction", "native_zigzag_2p_minus_r": "slice-mismatch",
    "nd_factor_first_only": "oracle-mismatch", "nd_flat_split": "slice-mismatch",
    "nd_float32_angles": "oracle-mismatch", "nd_shard_dim_ignored": "slice-mismatch",
    "nd_shard_off_by_one": "slice-mismatch", "nd_shared_workspace": "mutated-in-place",
    "rope_not_permuted": "apply-mismatch", "rope_permuted_hidden_not": "apply-mismatch",
}
# The classes of bug the default check must find, one mutant at least each.
NEW_CLASSES = {
    "key-incomplete": {"fv_key_grid_th", "fv_key_no_theta", "fv_key_rescale_first", "fv_key_interp_first_two",
                       "fv_key_no_use_real", "fv_key_no_rope_dim_list"},
    "slice-mismatch": {"fv_rank_from_global", "nd_pow2_shift"},
    "stale-after-eviction": {"native_stale_lru32"},
    "overwritten-after-return": {"native_static_output"},
    "plan-mismatch": {"native_next_rank_tokens"},
    "oracle-mismatch": {"fv_shards_unasked", "nd_scalar_rescale_ignored"},
}


def test_catalog_is_well_formed():
    names = [m.name for m in CATALOG]
    assert len(names) == len(set(names))
    mutants = [m for m in CATALOG if m.expected is not None]
    correct = [m for m in CATALOG if m.expected is None]
    assert {m.name for m in correct} == {"correct_native", "correct_fastvideo", "correct_fastvideo_no_grad",
                                         "correct_fastvideo_nd"}
    assert {m.convention for m in mutants} == set(CONVENTIONS)
    for m in CATALOG:
        assert isinstance(m, Mutant) and m.module.startswith("sp_rope.mutants.") and m.path.is_file()
        assert m.expected is None or m.expected in DIAGNOSES
        assert callable(load_object(f"{m.module}:{m.impl}"))
        if m.convention == "fastvideo-nd":
            assert m.cache is None  # the check caches nd builders itself
        else:  # each implementation its own mapping, reachable as the check loads it
            assert m.cache == f"{m.name}.cache"
            assert hasattr(load_object(f"{m.module}:{m.cache}"), "keys")
        assert "--impl" in m.check_args() and m.convention in m.check_args()
    assert not any(m.name.startswith("_") for m in CATALOG)


def test_no_two_entries_share_a_cache():
    caches: dict[int, list[str]] = {}
    for m in CATALOG:
        if m.cache:
            caches.setdefault(id(load_object(f"{m.module}:{m.cache}")), []).append(m.name)
    assert all(len(names) == 1 for names in caches.values()), caches


def test_every_earlier_mutant_keeps_its_bug_and_diagnosis_and_every_new_class_has_one():
    assert {name: ENTRY[name].expected for name in KEPT if name in ENTRY} == KEPT
    for diagnosis, names in NEW_CLASSES.items():
        assert {ENTRY[name].expected for name in names} == {diagnosis}, names


def _golden() -> list[dict]:
    if not GOLDEN.is_file():
        pytest.fail(f"golden RoPE tables not found at {GOLDEN}")
    return torch.load(GOLDEN, weights_only=True)


@pytest.mark.parametrize("fastvideo_name", ["correct_fastvideo", "correct_fastvideo_no_grad"])
def test_correct_implementations_match_the_golden_tables_bit_for_bit(monkeypatch, fastvideo_name):
    fv = getattr(fv_module, fastvideo_name)
    nd = load_object("sp_rope.mutants.fastvideo_nd:correct_fastvideo_nd")
    for e in _golden():
        dtype = getattr(torch, e["dtype"])
        want = (e["cos"], e["sin"])
        group = _base.SpGroup(e["sp_rank"], e["sp_world_size"])
        monkeypatch.setattr(fv_module, "get_sp_group", lambda group=group: group)
        got_fv = fv(
            e["rope_sizes"], sum(e["rope_dim_list"]), 1, e["rope_dim_list"], e["rope_theta"],
            theta_rescale_factor=e["theta_rescale_factor"], interpolation_factor=e["interpolation_factor"],
            shard_dim=e["shard_dim"], do_sp_sharding=e["sp_world_size"] > 1, dtype=dtype,
            start_frame=e["start_frame"], use_real=e["use_real"],
        )
        got_nd = nd(
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
    native = load_object("sp_rope.mutants.native:correct_native")
    cfg = load_config(config)
    for dtype in ("float32", "float64"):
        for sf in (0, 4096):
            spec = cfg.spec(dtype, layout, sf)
            full = native(spec, parse_plan("contiguous:t"), 0, 1)
            assert _base.same_bits((full.cos, full.sin), build_table(spec))
            for scheme in ("flat:pad", "zigzag", "usp:2", "stripe"):
                plan = parse_plan(scheme)
                for rank in range(4):
                    try:
                        want = build_slice(spec, plan, rank, 4)
                    except ValueError:  # not divisible: the check skips it too
                        continue
                    got = native(spec, plan, rank, 4)
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
