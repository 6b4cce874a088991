"""The key-completeness probe (sp_rope.probe), in one process: each field a key can forget is
named when forgotten, correct implementations of every convention pass every field they can
express, and the fields they cannot express are reported skipped, never passed."""

from __future__ import annotations

import collections
import functools
import math
import operator
import re

import pytest
import torch

from sp_rope.adapters import DiffusersWanProvider, make_provider
from sp_rope.cache import RopeSlice
from sp_rope.mutants import catalog
from sp_rope.mutants.native import NativeRope
from sp_rope.probe import EVICTION_DEPTH, HOT_CALLS, field_groups, probe_eviction, probe_hot_keys, probe_keys
from sp_rope.providers import NativeProvider, Provider, SpRopeProvider
from sp_rope.report import CaseResult
from sp_rope.tables import build_table

# Written out here, not taken from sp_rope.probe: a field the probe stops varying fails these tests.
SWAPS = ["grid[0] <-> grid[1]", "grid[1] <-> grid[2]", "grid[0] <-> grid[2]"]
PAIRS = ["grid[0] + start_frame (same end frame)", "theta_rescale_factor <-> interpolation_factor",
         "theta x theta_rescale_factor (same product)"]
DIM_MOVES = ["rope_dim_list[1] -> [0]", "rope_dim_list[1] -> [2]", "rope_dim_list[0] -> [2]"]
NUDGES = ["theta (+0.1)", "theta_rescale_factor[0] (x(1+2^-10))", "interpolation_factor[0] (x(1+2^-10))"]
FINE = ["theta (x(1+2^-30))", "theta_rescale_factor[0] (x(1+2^-30))", "interpolation_factor[0] (x(1+2^-22))"]
REORDERED = ["theta_rescale_factor (same values, other axes)", "interpolation_factor (same values, other axes)"]
WHOLE = ["sp_size 1 (unsharded)", "sp_size 1 (unsharded), layout half", "sp_size 1 (unsharded), layout neox",
         "sp_size 1 (unsharded), dtype float32"]
SCHEME_PARAMETERS = [
    "scheme parameter (usp:2 / usp:4)", "scheme parameter (usp:2 / usp:1)", "scheme parameter (usp:2 / usp:3)",
    "scheme parameter (flat:pad / flat:uneven)",
]
FIELDS = [
    "grid[0]", "grid[1]", "grid[2]", *SWAPS, *PAIRS, *DIM_MOVES, "theta", *NUDGES, *FINE,
    "theta_rescale_factor[0]", "theta_rescale_factor[1]", "theta_rescale_factor[2]",
    "interpolation_factor[0]", "interpolation_factor[1]", "interpolation_factor[2]", *REORDERED,
    "head dim", "dtype", "layout", "layout (neox)", "start_frame", "start_frame (+2^20)", "sp_rank", "sp_size",
    *WHOLE, "shard axis", "scheme",
    "device", *SCHEME_PARAMETERS, "grid + shard axis (same local shape)",
]
LOCAL_SHAPE = FIELDS[-1]  # alternates with SP rank 1 of the base: a key without sp_rank fails it too
# A key without one field (as the catalog's native implementation names key fields), and the
# probe fields that must then fail: the field itself and every variant that also changes it.
KEY_FIELD_FAILS = {
    # A swap changes two axes, but (2, 4, 6) meets the key of grid[1]'s variant (4, 4, 6), still cached.
    "grid[0]": {"grid[0]", SWAPS[0]},
    "grid[1]": {"grid[1]"},
    "grid[2]": {"grid[2]"},
    "rope_dim_list": {*DIM_MOVES, "head dim"},
    "theta": {"theta", NUDGES[0], FINE[0]},
    # The reordered rescale alternates (3, 2, 2) with (2, 2, 3): without [0] the first is the base's key,
    # without [2] the second.
    "theta_rescale_factor[0]": {"theta_rescale_factor[0]", NUDGES[1], FINE[1], REORDERED[0]},
    "theta_rescale_factor[1]": {"theta_rescale_factor[1]"},
    "theta_rescale_factor[2]": {"theta_rescale_factor[2]", REORDERED[0]},
    "interpolation_factor[0]": {"interpolation_factor[0]", NUDGES[2], FINE[2]},
    "interpolation_factor[1]": {"interpolation_factor[1]"},
    "interpolation_factor[2]": {"interpolation_factor[2]"},
    "dtype": {"dtype"},
    "layout": {"layout", "layout (neox)", WHOLE[1], WHOLE[2]},
    "start_frame": {"start_frame", "start_frame (+2^20)"},
    "sp_rank": {"sp_rank", LOCAL_SHAPE},
    "sp_size": {"sp_size", WHOLE[0]},  # the other whole tables meet entries this cache evicted
    "shard axis": {"shard axis"},
    "scheme": {"scheme", *SCHEME_PARAMETERS},
    "device": {"device"},
}
CATALOG = {m.name: m for m in catalog()}
CORRECT = [m for m in catalog() if m.expected is None]


def _provider(name: str) -> Provider:
    m = CATALOG[name]
    return make_provider(f"{m.module}:{m.impl}", m.convention, f"{m.module}:{m.cache}" if m.cache else None)


def _by_status(cases: list[CaseResult]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {"passed": set(), "failed": set(), "skipped": set()}
    for case in cases:
        out[case.status].add(case.scheme)
    return out


def _failures(cases: list[CaseResult]) -> dict[str, list[str]]:
    return {c.scheme: c.diagnoses for c in cases if c.status == "failed"}


@pytest.mark.parametrize("name", [m.name for m in CORRECT])
def test_correct_catalog_implementations_pass_every_field_they_can_express(name):
    cases = probe_keys(_provider(name), "cpu")
    status = _by_status(cases)
    assert [c.config for c in cases] == ["probe"] * (1 + len(FIELDS))
    if CATALOG[name].convention == "native":
        assert status == {"passed": {"base", *FIELDS}, "failed": set(), "skipped": set()}, _failures(cases)
    else:  # fastvideo conventions shard contiguously only
        inexpressible = {"scheme", "layout (neox)", WHOLE[2], *SCHEME_PARAMETERS}
        assert status == {"passed": {"base", *FIELDS} - inexpressible, "failed": set(), "skipped": inexpressible}
        (scheme,) = [c for c in cases if c.scheme == "scheme"]
        assert scheme.details[0].startswith("not probed: scheme contiguous:t -> zigzag:t:"), scheme.details


def test_sp_rope_itself_passes_every_field():
    assert _by_status(probe_keys(SpRopeProvider(), "cpu")) == {
        "passed": {"base", *FIELDS}, "failed": set(), "skipped": set()
    }


def test_diffusers_wan_is_probed_where_it_can_be_and_skipped_elsewhere():
    cases = probe_keys(DiffusersWanProvider(), "cpu")
    status = _by_status(cases)
    probed = {"base", "grid[0]", "grid[1]", "grid[2]", *SWAPS, "theta", "theta (+0.1)", FINE[0], "head dim", "sp_rank",
              "sp_size", WHOLE[0], "device"}
    every = {"base", *FIELDS} - {WHOLE[3]} | {"sp_size 1 (unsharded), dtype float64"}  # its base is float32
    assert status == {"passed": probed, "failed": set(), "skipped": every - probed}
    assert all(c.details[0].startswith("not probed: ") for c in cases if c.status == "skipped")
    assert {c.dtype for c in cases if c.status == "passed"} == {"float32"}


@pytest.mark.parametrize("field", sorted(KEY_FIELD_FAILS))
def test_a_key_without_one_field_is_named_key_incomplete(field):
    impl = NativeRope(forget=(field,))  # the catalog's correct native implementation, one key field less
    cases = probe_keys(NativeProvider(impl, f"native key without {field}"), "cpu")
    assert _failures(cases) == {name: ["key-incomplete"] for name in KEY_FIELD_FAILS[field]}
    (case,) = [c for c in cases if c.scheme == (field if field != "rope_dim_list" else DIM_MOVES[0])]
    assert "got the table returned earlier for the base input" in case.details[0], case.details


def _on_device(device_of):  # type: ignore[no-untyped-def]
    """The catalog's correct native implementation, its tables then moved to ``device_of(device)``."""
    impl = NativeRope()

    def rope(spec, plan, sp_rank, sp_size, device):  # type: ignore[no-untyped-def]
        sl = impl(spec, plan, sp_rank, sp_size, "cpu")
        return RopeSlice(sl.cos.to(device_of(device)), sl.sin.to(device_of(device)), sl.indices)

    return NativeProvider(rope, "moved")


def test_tables_left_on_the_cpu_when_another_device_is_asked_for_are_caught():
    # Not a cache key this time: the device argument ignored. The meta call gets the CPU table,
    # the very one the base call got.
    cases = probe_keys(_on_device(lambda device: "cpu"), "cpu")
    assert _failures(cases) == {"device": ["key-incomplete"]}
    (case,) = [c for c in cases if c.scheme == "device"]
    assert "(the check's device -> meta) got the table returned earlier for the base input" in case.details[0]


def test_tables_sent_to_another_device_than_asked_are_wrong_device():
    cases = probe_keys(_on_device(lambda device: "meta"), "cpu")
    failures = _failures(cases)
    assert failures and all(diagnoses == ["wrong-device"] for diagnoses in failures.values()), failures
    assert "is on meta (sin on meta), asked for cpu" in next(c for c in cases if c.scheme == "base").details[0]


def test_an_implementation_that_cannot_build_on_meta_has_the_device_field_skipped_not_failed():
    impl = NativeRope()

    def rope(spec, plan, sp_rank, sp_size, device):  # type: ignore[no-untyped-def]
        if torch.device(device).type == "meta":
            raise NotImplementedError("no kernels on meta")
        return impl(spec, plan, sp_rank, sp_size, device)

    status = _by_status(cases := probe_keys(NativeProvider(rope, "no meta"), "cpu"))
    assert status == {"passed": {"base", *FIELDS} - {"device"}, "failed": set(), "skipped": {"device"}}
    (case,) = [c for c in cases if c.scheme == "device"]
    assert case.details[0].startswith("not probed: the implementation cannot build on meta"), case.details
    assert "NotImplementedError: no kernels on meta" in case.details[0]


def _keyed(key_of):  # type: ignore[no-untyped-def]
    """A native implementation with correct tables, cached under ``key_of(spec, plan, sp_rank, sp_size)``
    and the device."""
    cache: dict[object, RopeSlice] = {}

    def rope(spec, plan, sp_rank, sp_size, device):  # type: ignore[no-untyped-def]
        key = (key_of(spec, plan, sp_rank, sp_size), device)
        if key not in cache:
            tokens = plan.indices(spec.grid, sp_rank, sp_size)
            cache[key] = RopeSlice(*(t.to(device) for t in build_table(spec, tokens)), tokens)
        return cache[key]

    return NativeProvider(rope, "keyed")


def _rest(spec, plan, sp_rank, sp_size):  # type: ignore[no-untyped-def]
    return (spec.dtype, spec.layout, spec.start_frame, str(plan), sp_rank, sp_size)


def _floats(spec, normal):  # type: ignore[no-untyped-def]
    """theta and the factors, each value through ``normal``, as a key would hold them."""
    return (normal(spec.theta), *(tuple(map(normal, values)) for values in (
        spec.theta_rescale_factor, spec.interpolation_factor)))


def _as_float32(value: float) -> float:
    return float(torch.tensor(value, dtype=torch.float32))


def _local_shape(grid, plan, sp_size):  # type: ignore[no-untyped-def]
    """What a rank holds, as a model that shards the latent before building its table sees it."""
    if plan.scheme != "contiguous":
        return (math.prod(grid) // sp_size, str(plan))
    return tuple(n // sp_size if a == plan.axis else n for a, n in enumerate(grid))


# Keys that hold every field in some form, and still lose a difference; the probe field that sees it.
NEAR_MISS_KEYS = {
    "every float rounded to 6 decimals (float noise in configs)": (
        lambda s, p, r, n: (s.grid, s.rope_dim_list, *_floats(s, lambda v: round(v, 6)), *_rest(s, p, r, n)),
        set(FINE),
    ),
    "every float as float32": (
        lambda s, p, r, n: (s.grid, s.rope_dim_list, *_floats(s, _as_float32), *_rest(s, p, r, n)),
        {FINE[0], FINE[1]},  # interpolation's nudge is float32's resolution: the key keeps it
    ),
    "the end frame instead of T and start_frame": (
        lambda s, p, r, n: (s.grid[0] + s.start_frame, s.grid[1:], s.rope_dim_list, s.theta, s.theta_rescale_factor,
                            s.interpolation_factor, s.dtype, s.layout, str(p), r, n),
        {PAIRS[0]},
    ),
    "an XOR of the fields' hashes": (
        lambda s, p, r, n: (functools.reduce(operator.xor, map(hash, (
            s.grid, s.rope_dim_list, s.theta, s.theta_rescale_factor, s.interpolation_factor))), *_rest(s, p, r, n)),
        {PAIRS[1]},
    ),
    "theta times the rescale (the NTK base), per axis": (
        lambda s, p, r, n: (s.grid, s.rope_dim_list, tuple(s.theta * v for v in s.theta_rescale_factor),
                            s.interpolation_factor, *_rest(s, p, r, n)),
        {PAIRS[2]},
    ),
    "the product of h and w": (
        lambda s, p, r, n: (s.grid[0], s.grid[1] * s.grid[2], s.rope_dim_list, s.theta, s.theta_rescale_factor,
                            s.interpolation_factor, *_rest(s, p, r, n)),
        {SWAPS[1]},
    ),
    "the t part of the head-dim split": (
        lambda s, p, r, n: (s.grid, sum(s.rope_dim_list), s.rope_dim_list[0], s.theta, s.theta_rescale_factor,
                            s.interpolation_factor, *_rest(s, p, r, n)),
        {DIM_MOVES[1]},
    ),
    "theta and factors rounded as text": (
        lambda s, p, r, n: (s.grid, s.rope_dim_list, f"{s.theta:.0f}",
                            " ".join(f"{v:.2f}" for v in (*s.theta_rescale_factor, *s.interpolation_factor)),
                            *_rest(s, p, r, n)),
        {*NUDGES, *FINE},
    ),
    "the rank's local shape instead of the grid and shard axis": (
        lambda s, p, r, n: (_local_shape(s.grid, p, n), s.rope_dim_list, s.theta, s.theta_rescale_factor,
                            s.interpolation_factor, s.dtype, s.layout, s.start_frame, r, n),
        {LOCAL_SHAPE},
    ),
    "each factor as its set of values": (
        lambda s, p, r, n: (s.grid, s.rope_dim_list, s.theta, tuple(sorted(set(s.theta_rescale_factor))),
                            tuple(sorted(set(s.interpolation_factor))), *_rest(s, p, r, n)),
        # In one process rescale[1]'s (2, 3, 2) also meets rescale[0]'s (3, 2, 2); spread over ranks
        # those land in different processes, the reordered fields hold both inputs themselves.
        {*REORDERED, "theta_rescale_factor[1]", "theta_rescale_factor[2]"},
    ),
    "the scheme's name without its parameter": (
        lambda s, p, r, n: (s, p.scheme, p.axis, r, n),
        set(SCHEME_PARAMETERS),
    ),
    "start_frame packed into a 16-bit field": (
        lambda s, p, r, n: (s.replace(start_frame=0), (s.start_frame & 0xFFFF) | r << 16 | n << 24, str(p)),
        {"start_frame (+2^20)"},
    ),
    "start_frame modulo a ring of 4096 positions": (
        lambda s, p, r, n: (s.replace(start_frame=s.start_frame % 4096), str(p), r, n),
        {"start_frame (+2^20)"},
    ),
}


@pytest.mark.parametrize("name", sorted(NEAR_MISS_KEYS))
def test_a_key_that_loses_a_difference_is_caught_by_the_near_variant(name):
    key_of, fields = NEAR_MISS_KEYS[name]
    assert _failures(probe_keys(_keyed(key_of), "cpu")) == {field: ["key-incomplete"] for field in fields}


def _tiered(tokens: int):  # type: ignore[no-untyped-def]
    """Correct tables; inputs of at least ``tokens`` tokens cached apart, under a key without the
    dtype, the layout and the factors (a second cache for long sequences)."""
    def key_of(s, p, r, n):  # type: ignore[no-untyped-def]
        if s.num_tokens < tokens:
            return (s, str(p), r, n)
        return ("large", s.grid, s.rope_dim_list, s.theta, s.start_frame, str(p), r, n)

    return _keyed(key_of)


@pytest.mark.parametrize("tokens", [2**15, 2**17])
def test_a_key_that_forgets_fields_only_for_long_sequences_is_caught_at_scale(tokens):
    assert _failures(probe_keys(_tiered(tokens), "cpu")) == {}  # the small base never reaches the tier
    cases = probe_keys(_tiered(tokens), "cpu", scaled=True)
    at = " at 145152 tokens"
    forgotten = {"dtype", "layout", "layout (neox)", "theta_rescale_factor[0]", "theta_rescale_factor[1]",
                 "theta_rescale_factor[2]", "interpolation_factor[0]", "interpolation_factor[1]",
                 "interpolation_factor[2]", *NUDGES[1:], *FINE[1:], *REORDERED, PAIRS[1], *WHOLE[1:]}
    assert _failures(cases) == {field + at: ["key-incomplete"] for field in forgotten}
    assert {c.scheme for c in cases} == {field + at for field in ("base", *FIELDS)}


def test_the_scaled_probe_judges_a_large_table_at_rows_spread_over_it():
    # Correct tables but the last row's sin negated above 2^16 tokens: only the row sample's
    # last row can see it, and must.
    def rope(spec, plan, sp_rank, sp_size, device):  # type: ignore[no-untyped-def]
        tokens = plan.indices(spec.grid, sp_rank, sp_size)
        cos, sin = build_table(spec, tokens)
        if spec.num_tokens >= 2**16:
            sin = sin.clone()
            sin[-1] = -sin[-1]
        return RopeSlice(cos.to(device), sin.to(device), tokens)

    failures = _failures(probe_keys(NativeProvider(rope, "last row"), "cpu", scaled=True))
    assert failures and all(diagnoses == ["oracle-mismatch"] for diagnoses in failures.values()), failures


def test_a_key_on_the_identity_of_the_spec_is_caught():
    # The probe passes fresh, equal objects and drops them after each call: ids come back for
    # other inputs, as they do when a model builds its spec anew every step.
    failures = _failures(probe_keys(_keyed(lambda s, p, r, n: (id(s), str(p), r, n)), "cpu"))
    assert failures and all(diagnoses == ["key-incomplete"] for diagnoses in failures.values()), failures


# Catalog mutants whose cache key forgets a field, and the fields the probe must name for them.
KEY_MUTANTS = {
    "fv_key_grid_th": {"grid[2]", SWAPS[2]},  # (6, 2, 4) meets grid[0]'s (6, 2, 6), still cached
    "fv_key_no_theta": {"theta", NUDGES[0], FINE[0]},
    "fv_key_rescale_first": {"theta_rescale_factor[1]", "theta_rescale_factor[2]", REORDERED[0]},
    "fv_key_interp_first_two": {"interpolation_factor[2]"},
    "fv_key_no_use_real": {"layout", WHOLE[1]},
    "fv_key_no_rope_dim_list": {*DIM_MOVES, "head dim"},
    "fv_key_no_dtype": {"dtype", WHOLE[3]},
    # Its T meets the grid[0] variant's at another offset.
    "fv_key_no_start_frame": {"start_frame", "start_frame (+2^20)", PAIRS[0]},
    "fv_key_no_sp_rank": {"sp_rank", LOCAL_SHAPE},
    "fv_key_no_sp_world_size": {"sp_size"},  # the whole table is asked for without sharding
}


@pytest.mark.parametrize("name", sorted(KEY_MUTANTS))
def test_catalog_key_mutants_are_named_by_the_field_their_key_forgets(name):
    failures = _failures(probe_keys(_provider(name), "cpu"))
    assert failures == {field: ["key-incomplete"] for field in KEY_MUTANTS[name]}


def test_another_wrong_table_is_an_oracle_mismatch_naming_the_varied_field():
    # start_frame added after sharding, on SP rank 0 only: rank 1's table is wrong, and new.
    cases = probe_keys(_provider("fv_start_frame_rank0"), "cpu")
    assert _failures(cases) == {"sp_rank": ["oracle-mismatch"], LOCAL_SHAPE: ["oracle-mismatch"]}
    (case,) = [c for c in cases if c.scheme == "sp_rank"]
    assert "sp_rank changed alone (0 -> 1)" in case.details[0] and "float64 formula" in case.details[0]


def test_rows_for_another_ranks_tokens_are_a_plan_mismatch():
    failures = _failures(probe_keys(_provider("native_next_rank_tokens"), "cpu"))
    # Its tokens on meta hold no values: the device field's other calls are the base's, judged once.
    # The whole table has no other rank's tokens to hand out.
    assert failures["base"] == ["plan-mismatch"] and set(failures) == {"base", *FIELDS} - {"device", *WHOLE}


def test_a_table_written_after_it_was_returned_is_reported():
    failures = _failures(probe_keys(_provider("nd_shared_workspace"), "cpu"))
    assert failures and all(diagnoses == ["mutated-in-place"] for diagnoses in failures.values())


class _NoFloat32(Provider):
    """sp_rope's own tables, but float32 cannot be expressed."""

    name = "no-float32"

    def __init__(self) -> None:
        self.inner = SpRopeProvider()

    def skip_reason(self, spec, plan):
        return "float32 is not supported here" if spec.dtype == "float32" else None

    def get(self, spec, plan, sp_rank, sp_size, device):
        if spec.dtype == "float32":
            raise AssertionError("the probe called an input the provider cannot express")
        return self.inner.get(spec, plan, sp_rank, sp_size, device)


def test_an_inexpressible_field_is_skipped_with_its_reason_and_never_called():
    cases = probe_keys(_NoFloat32(), "cpu")
    float32 = {"dtype", WHOLE[3]}
    assert _by_status(cases) == {"passed": {"base", *FIELDS} - float32, "failed": set(), "skipped": float32}
    (dtype,) = [c for c in cases if c.scheme == "dtype"]
    assert dtype.details == ["not probed: dtype float64 -> float32: float32 is not supported here"]


class _ExpressesNothing(Provider):
    name = "nothing"

    def skip_reason(self, spec, plan):
        return "nothing at all"

    def get(self, spec, plan, sp_rank, sp_size, device):
        raise AssertionError("called")


def test_a_provider_that_cannot_express_the_base_gets_every_field_skipped():
    cases = probe_keys(_ExpressesNothing(), "cpu")
    assert _by_status(cases) == {"passed": set(), "failed": set(), "skipped": {"base", *FIELDS}}
    assert all(c.details[0].startswith("not probed: ") and "nothing at all" in c.details[0] for c in cases)


def test_only_spreads_the_fields_over_ranks_each_exactly_once():
    world = 4
    per_rank = [
        [c.scheme for c in probe_keys(SpRopeProvider(), "cpu", only=lambda i, r=rank: i % world == r)]
        for rank in range(world)
    ]
    everything = [name for names in per_rank for name in names]
    assert sorted(everything) == sorted(["base", *FIELDS])
    assert per_rank[0][0] == "base" and all(len(names) >= 4 for names in per_rank)


def test_the_variants_of_one_field_share_a_group_so_a_rank_runs_them_together():
    names = [c.scheme for c in probe_keys(SpRopeProvider(), "cpu")]  # in the probe's index order
    groups = dict(zip(names, field_groups(SpRopeProvider()), strict=True))
    for family in (["grid[0]", "grid[2]", *SWAPS, LOCAL_SHAPE], ["theta", NUDGES[0]], DIM_MOVES,
                   ["theta_rescale_factor[0]", "theta_rescale_factor[2]", NUDGES[1], REORDERED[0]],
                   ["interpolation_factor[1]", NUDGES[2], REORDERED[1]], SCHEME_PARAMETERS):
        assert len({groups[name] for name in family}) == 1, family
    assert len(set(groups.values())) >= 8 and groups["base"] == 0


def test_theta_held_in_float32_for_a_float64_table_is_caught_every_run():
    # No cache at all: the tables themselves are wrong wherever theta is not exact in float32.
    # Below float32's resolution the table is the base's own, as a key that drops the difference
    # would give (its message says "or ... ignored").
    def rope(spec, plan, sp_rank, sp_size, device):  # type: ignore[no-untyped-def]
        import torch

        narrowed = spec.replace(theta=float(torch.tensor(spec.theta, dtype=torch.float32)))
        tokens = plan.indices(spec.grid, sp_rank, sp_size)
        return RopeSlice(*(t.to(device) for t in build_table(narrowed, tokens)), tokens)

    assert _failures(probe_keys(NativeProvider(rope, "float32 theta"), "cpu")) == {
        "theta (+0.1)": ["oracle-mismatch"], FINE[0]: ["key-incomplete"]
    }


class _Lru:
    """A bounded cache of correct tables; ``misaligned``: on eviction it drops the oldest key but
    the newest value, so every later hit past the dropped slot gets its neighbour's table."""

    def __init__(self, capacity: int, misaligned: bool) -> None:
        self.capacity, self.misaligned = capacity, misaligned
        self.keys: list[object] = []
        self.values: list[RopeSlice] = []

    def __call__(self, spec, plan, sp_rank, sp_size, device):  # type: ignore[no-untyped-def]
        key = (spec, plan, sp_rank, sp_size)
        if key in self.keys:
            i = self.keys.index(key)
            self.keys.append(self.keys.pop(i))
            self.values.append(self.values.pop(i))
        else:
            tokens = plan.indices(spec.grid, sp_rank, sp_size)
            self.keys.append(key)
            self.values.append(RopeSlice(*build_table(spec, tokens), tokens))
            if len(self.keys) > self.capacity:
                self.keys.pop(0)
                self.values.pop(-2 if self.misaligned else 0)
        return self.values[-1]


@pytest.mark.parametrize("capacity", [3, 100, EVICTION_DEPTH - 24])
def test_a_bounded_cache_that_evicts_the_wrong_value_is_stale_after_eviction(capacity):
    case = probe_eviction(NativeProvider(_Lru(capacity, misaligned=True), "misaligned lru"), "cpu")
    assert case.diagnoses == ["stale-after-eviction"], case.details
    assert "got the table of input" in case.details[0], case.details


@pytest.mark.parametrize("capacity", [3, 100, 2 * EVICTION_DEPTH])
def test_a_correct_bounded_cache_passes_the_eviction_sweep(capacity):
    case = probe_eviction(NativeProvider(_Lru(capacity, misaligned=False), "lru"), "cpu")
    assert case.status == "passed" and case.scheme == f"cache eviction ({EVICTION_DEPTH}+ inputs)", case.details


class _DictLru:
    """A bounded dict of correct tables whose eviction hands the evicted entry's table to the next
    oldest key (a compaction that moves values but not keys)."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.entries = capacity, collections.OrderedDict()

    def __call__(self, spec, plan, sp_rank, sp_size, device):  # type: ignore[no-untyped-def]
        key = (spec, plan, sp_rank, sp_size)
        if key not in self.entries:
            tokens = plan.indices(spec.grid, sp_rank, sp_size)
            self.entries[key] = RopeSlice(*build_table(spec, tokens), tokens)
            if len(self.entries) > self.capacity:
                _, table = self.entries.popitem(last=False)
                self.entries[next(iter(self.entries))] = table
        self.entries.move_to_end(key)
        return self.entries[key]


class _Visible(NativeProvider):
    def cache_size(self) -> int:
        return len(self.fn.entries)


@pytest.mark.parametrize("visible", [True, False])
def test_the_sweep_goes_past_the_bound_of_a_large_cache_it_can_see(visible):
    impl = _DictLru(3000)
    case = probe_eviction((_Visible if visible else NativeProvider)(impl, "large lru"), "cpu")
    if visible:  # past 3000 entries, and as many again: the moved table is asked for
        assert case.diagnoses == ["stale-after-eviction"], case.details
    else:  # unseen, the sweep stops at EVICTION_DEPTH inputs, below the bound
        assert case.status == "passed" and len(impl.entries) == EVICTION_DEPTH, case.details


def test_every_sweep_table_of_another_shape_is_caught_not_only_those_judged_by_the_formula():
    # One stray row for one latent size: the sweep's second input, which is not judged against
    # the formula (its table is new, so no digest matches an earlier one either).
    def rope(spec, plan, sp_rank, sp_size, device):  # type: ignore[no-untyped-def]
        tokens = plan.indices(spec.grid, sp_rank, sp_size)
        cos, sin = build_table(spec, tokens)
        if spec.grid == (4, 1, 1):
            cos, sin = torch.cat([cos, cos[:1]]), torch.cat([sin, sin[:1]])
        return RopeSlice(cos, sin, tokens)

    case = probe_eviction(NativeProvider(rope, "a stray row"), "cpu")
    assert case.diagnoses == ["oracle-mismatch"], case.details
    assert "the first call for input 2 (grid [4, 1, 1]" in case.details[0] and "expected [2, 24]" in case.details[0]


def test_an_eviction_sweep_sees_a_wrong_fresh_table():
    def rope(spec, plan, sp_rank, sp_size, device):  # type: ignore[no-untyped-def]
        tokens = plan.indices(spec.grid, sp_rank, sp_size)
        return RopeSlice(*build_table(spec.replace(theta=spec.theta + 0.5), tokens), tokens)

    case = probe_eviction(NativeProvider(rope, "theta off by a half"), "cpu", depth=8)
    assert case.diagnoses == ["oracle-mismatch"] and "input 1 (grid [2, 1, 1]" in case.details[0], case.details


class _Recycling(_Lru):
    """A correct 8-entry LRU that builds each new table into the memory of the entry it evicts
    (through fresh tensors over the same storage), while callers may still hold that table."""

    def __call__(self, spec, plan, sp_rank, sp_size, device):  # type: ignore[no-untyped-def]
        key = (spec, plan, sp_rank, sp_size)
        if key in self.keys:
            return self.values[self.keys.index(key)]
        tokens = plan.indices(spec.grid, sp_rank, sp_size)
        cos, sin = build_table(spec, tokens)
        if len(self.keys) == self.capacity:
            self.keys.pop(0)
            old = self.values.pop(0)
            cos = old.cos.new_empty(0).set_(old.cos.untyped_storage(), 0, cos.shape).copy_(cos)
            sin = old.sin.new_empty(0).set_(old.sin.untyped_storage(), 0, sin.shape).copy_(sin)
        self.keys.append(key)
        self.values.append(RopeSlice(cos, sin, tokens))
        return self.values[-1]


def test_a_cache_that_recycles_evicted_memory_rewrites_a_held_table():
    case = probe_eviction(NativeProvider(_Recycling(8, misaligned=False), "recycling"), "cpu")
    assert case.diagnoses == ["overwritten-after-return"], case.details
    assert re.search(r"the table returned for input \d+ \(grid \[.*\], start_frame \d+\) changed while the "
                     r"caller held it", case.details[0]), case.details


class _Counting:
    """Correct tables in a dict, with each key's hit count: what a cache that changes its entries
    after N hits starts from."""

    def __init__(self, after: int) -> None:
        self.after, self.entries, self.hits = after, {}, {}

    def hit(self, spec, plan, sp_rank, sp_size):  # type: ignore[no-untyped-def]
        key = (spec, plan, sp_rank, sp_size)
        if key not in self.entries:
            tokens = plan.indices(spec.grid, sp_rank, sp_size)
            self.entries[key], self.hits[key] = RopeSlice(*build_table(spec, tokens), tokens), 0
        self.hits[key] += 1
        return key, self.entries[key]


class _Promoting(_Counting):
    """Correct tables, but after ``after`` hits an entry moves into one static buffer per shape and
    dtype, which the next promoted entry of that shape overwrites."""

    def __init__(self, after: int) -> None:
        super().__init__(after)
        self.static: dict[object, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, spec, plan, sp_rank, sp_size, device):  # type: ignore[no-untyped-def]
        key, entry = self.hit(spec, plan, sp_rank, sp_size)
        if self.hits[key] == self.after:
            shape = (entry.cos.shape, entry.cos.dtype)
            cos, sin = self.static.setdefault(shape, (entry.cos.clone(), entry.sin.clone()))
            cos.copy_(entry.cos), sin.copy_(entry.sin)
            self.entries[key] = entry = RopeSlice(cos, sin, entry.indices)
        return entry


@pytest.mark.parametrize("after", [2, 33, HOT_CALLS - 1, 4_100, 2**14])
def test_an_entry_that_changes_after_many_hits_is_caught_by_the_hot_keys(after):
    # Past what one video asks of a key (about 4,000 calls) and up to 2^14 hits: the base and
    # theta + 1 share a shape, so the second promotion overwrites the first's table. (Time
    # enough for every deep call on a loaded machine: the deadline is tested below.)
    case = probe_hot_keys(NativeProvider(_Promoting(after), "promoting"), "cpu", deep_s=60.0)
    assert case.status == "failed", case.details
    assert set(case.diagnoses) <= {"unstable-across-steps", "overwritten-after-return"}, case.details


def test_past_its_deadline_the_hot_keys_ask_every_input_once_a_step():
    # No time for deep calls: 512 calls each, short of a promotion at 4,100 hits.
    case = probe_hot_keys(NativeProvider(_Promoting(4_100), "promoting"), "cpu", deep_s=0.0)
    assert case.status == "passed", case.details


class _Compacting(_Counting):
    """Correct tables, but after ``after`` hits a half-layout entry is stored as its even columns
    and re-expanded on each hit (right only for a layout that repeats every column)."""

    def __call__(self, spec, plan, sp_rank, sp_size, device):  # type: ignore[no-untyped-def]
        key, entry = self.hit(spec, plan, sp_rank, sp_size)
        if spec.layout == "half" and self.hits[key] > self.after:
            return RopeSlice(entry.cos[:, ::2].repeat_interleave(2, 1), entry.sin[:, ::2].repeat_interleave(2, 1),
                             entry.indices)
        return entry


@pytest.mark.parametrize("after", [100, 300])
def test_an_entry_rewritten_after_many_hits_in_one_layout_only_is_caught_by_the_hot_keys(after):
    case = probe_hot_keys(NativeProvider(_Compacting(after), "compacting"), "cpu")
    assert case.diagnoses == ["unstable-across-steps"], case.details
    assert f"call {after + 1} of up to {HOT_CALLS} for layout half returned another table" in case.details[0], (
        case.details
    )


def test_sp_rope_itself_passes_the_cache_probes():
    for probe in (probe_eviction, probe_hot_keys):
        case = probe(SpRopeProvider(), "cpu")
        assert case.status == "passed", case.details


def test_tables_made_with_an_unguarded_matmul_fail_when_called_as_a_bfloat16_model_calls_them():
    # A matmul in the table's dtype (as positions @ inverse frequencies is): right in float32, but
    # bfloat16 under the autocast a bf16 forward runs in (float64 is left alone).
    def rope(spec, plan, sp_rank, sp_size, device):  # type: ignore[no-untyped-def]
        tokens = plan.indices(spec.grid, sp_rank, sp_size)
        cos, sin = build_table(spec, tokens)
        scale = torch.tensor([[1 + 2**-10]], dtype=cos.dtype) @ torch.ones(1, 1, dtype=cos.dtype)
        return RopeSlice(cos * scale / (1 + 2**-10), sin * scale / (1 + 2**-10), tokens)

    failures = _failures(probe_keys(NativeProvider(rope, "matmul"), "cpu"))
    assert failures.get("dtype") == ["oracle-mismatch"] and "base" not in failures, failures


def test_implementation_calls_run_under_a_bfloat16_default_dtype_which_is_then_restored():
    from sp_rope.providers import as_a_model_calls

    with as_a_model_calls("cpu"):
        assert torch.get_default_dtype() == torch.bfloat16
        assert (torch.arange(3) * 1.0).dtype == torch.bfloat16
    assert torch.get_default_dtype() == torch.float32
    with pytest.raises(ValueError), as_a_model_calls("cpu"):
        raise ValueError("the implementation failed")
    assert torch.get_default_dtype() == torch.float32
