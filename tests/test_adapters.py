"""Adapters: loading --impl/--impl-cache, and the real diffusers package."""

from __future__ import annotations

import inspect
import json
import math
import random
import sys

import pytest
import torch
from helpers import REPO, check

from sp_rope import RopeSpec, ShardPlan, build_table
from sp_rope.adapters import CacheWatcher, DiffusersWanProvider, load_object, make_provider
from sp_rope.cache import RopeSlice
from sp_rope.matrix import breadth_configs
from sp_rope.oracle import oracle_table, tolerance

FASTVIDEO = REPO / "sp_rope" / "mutants" / "fastvideo.py"


def test_impl_and_impl_cache_in_one_file_share_one_module():
    fn = load_object(f"{FASTVIDEO}:correct_fastvideo")
    cache = load_object(f"{FASTVIDEO}:correct_fastvideo.cache")
    assert fn.cache is cache
    assert load_object(f"{FASTVIDEO}:correct_fastvideo") is fn  # loaded once, not re-executed


@pytest.mark.parametrize("name", ["correct_fastvideo", "correct_fastvideo_no_grad"])
def test_fastvideo_adapter_substitutes_and_restores_get_sp_group(name):
    # correct_fastvideo_no_grad is wrapped by @torch.no_grad(): its __globals__ are torch's, and
    # the get_sp_group it reads lives in the module of the function it wraps.
    provider = make_provider(f"{FASTVIDEO}:{name}", "fastvideo", f"{FASTVIDEO}:{name}.cache")
    module_globals = inspect.unwrap(provider.fn).__globals__
    original = module_globals["get_sp_group"]
    spec = RopeSpec((4, 2, 2), (8, 8, 8), dtype="float64")
    plan = ShardPlan("contiguous", axis=0)
    sl = provider.get(spec, plan, 1, 2, "cpu")
    assert module_globals["get_sp_group"] is original
    assert "get_sp_group" not in provider.fn.__globals__ or provider.fn.__globals__ is module_globals
    full_cos, _ = build_table(spec)
    assert torch.equal(sl.cos, full_cos[plan.indices(spec.grid, 1, 2)])  # rank 1's rows, not rank 0's
    assert sl.key is not None and sl.key in load_object(f"{FASTVIDEO}:{name}.cache")


# The fastvideo convention's module: imports, the get_sp_group the adapter replaces, and the
# signature of ``fastvideo``, whose body each test module below supplies.
FASTVIDEO_MODULE = """
import torch
from sp_rope import RopeSpec, ShardPlan, build_table

CALLS, CACHE = [], {}

def get_sp_group():
    raise AssertionError("the check did not substitute get_sp_group")

def fastvideo(rope_sizes, hidden_size, heads_num, rope_dim_list, rope_theta, theta_rescale_factor=1.0,
              interpolation_factor=1.0, shard_dim=0, do_sp_sharding=False, dtype=torch.float32,
              start_frame=0, use_real=True):
"""

RECORDER = FASTVIDEO_MODULE + """
    g = get_sp_group()
    CALLS.append(dict(rescale=theta_rescale_factor, interpolation=interpolation_factor,
                      sharded=do_sp_sharding, group=(g.rank_in_group, g.world_size)))
    return torch.zeros(1, 1, dtype=dtype), torch.zeros(1, 1, dtype=dtype)

def nd(rope_dim_list, rope_sizes, **kwargs):
    CALLS.append(dict(rescale=kwargs["theta_rescale_factor"], interpolation=kwargs["interpolation_factor"],
                      sharded=kwargs["sp_world_size"] > 1, group=(kwargs["sp_rank"], kwargs["sp_world_size"])))
    shape = (len(range(0, 4 * 2 * 2, kwargs["sp_world_size"])), sum(rope_dim_list))  # the grid the test asks for
    return torch.zeros(shape, dtype=kwargs["dtype"]), torch.zeros(shape, dtype=kwargs["dtype"])
"""


@pytest.mark.parametrize("convention", ["fastvideo", "fastvideo-nd"])
def test_equal_factors_come_in_every_spelling_fastvideo_accepts_and_unequal_ones_as_a_list(tmp_path, convention):
    path = tmp_path / "recorder.py"
    path.write_text(RECORDER)
    fn = "fastvideo" if convention == "fastvideo" else "nd"
    provider = make_provider(f"{path}:{fn}", convention, None)
    calls = load_object(f"{path}:CALLS")
    plan = ShardPlan("contiguous", axis=0)
    for theta in (1e4, 2e4, 3e4, 4e4, 5e4, 6e4):  # six keys: the fastvideo-nd builder is behind a cache
        equal = RopeSpec((4, 2, 2), (8, 8, 8), theta, theta_rescale_factor=[2, 2, 2], interpolation_factor=0.5)
        provider.get(equal, plan, 0, 2, "cpu")
    provider.get(RopeSpec((4, 2, 2), (8, 8, 8), theta_rescale_factor=[1, 2, 2], interpolation_factor=[1, 1, 0.5]),
                 plan, 1, 2, "cpu")
    # A scalar, a one-element list (FastVideo broadcasts it) and the full list, each for two calls
    # in a row (a memo of the last call's arguments then meets arguments equal but for the lists).
    for name, value in (("rescale", 2.0), ("interpolation", 0.5)):
        spelled = [repr(c[name]) for c in calls[:6]]
        assert sorted(set(spelled), key=len) == [repr(value), repr([value]), repr([value] * 3)], spelled
        same_as_next = [a == b for a, b in zip(spelled, spelled[1:])]
        assert same_as_next in ([True, False, True, False, True], [False, True, False, True, False]), spelled
    assert (calls[6]["rescale"], calls[6]["interpolation"]) == ([1.0, 2.0, 2.0], [1.0, 1.0, 0.5])


def test_fastvideo_full_table_is_asked_unsharded_from_inside_the_real_sp_group(tmp_path):
    path = tmp_path / "recorder.py"
    path.write_text(RECORDER)
    provider = make_provider(f"{path}:fastvideo", "fastvideo", None)
    provider.full(RopeSpec((4, 2, 2), (8, 8, 8)), "cpu", within=(1, 2))
    (call,) = load_object(f"{path}:CALLS")
    assert (call["sharded"], call["group"]) == (False, (1, 2))


def test_a_fastvideo_function_that_shards_unasked_returns_a_block_for_the_full_table():
    spec = RopeSpec((4, 2, 2), (8, 8, 8), dtype="float64")
    good = make_provider("sp_rope.mutants.fastvideo:correct_fastvideo", "fastvideo", None)
    bad = make_provider("sp_rope.mutants.fastvideo:fv_shards_unasked", "fastvideo", None)
    assert torch.equal(good.full(spec, "cpu", within=(1, 2)).cos, build_table(spec)[0])
    assert bad.full(spec, "cpu", within=(1, 2)).cos.shape[0] == spec.num_tokens // 2


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
    every_case = json.loads(report.read_text())["cases"]
    cases = [c for c in every_case if c["config"] == "wan-tiny"]
    passed = [c for c in cases if c["status"] == "passed"]
    assert passed and all(c["scheme"] == "flat" and c["start_frame"] == 0 and c["dtype"] == "float32" for c in passed)
    probed = {c["scheme"] for c in every_case if c["config"] == "probe" and c["status"] == "passed"}
    fields = {
        "base", "grid[0]", "grid[1]", "grid[2]", "grid[0] <-> grid[1]", "grid[1] <-> grid[2]", "grid[0] <-> grid[2]",
        "theta", "theta (+0.1)", "theta (x(1+2^-30))", "head dim", "sp_rank", "sp_size", "sp_size 1 (unsharded)",
        "device",
    }
    assert probed == {
        *fields, *(f"{field} at 145152 tokens" for field in fields),
        "cache eviction (1024+ inputs)",
        "hot keys (512 calls each, the base and theta + 1 up to 16864)",
    }
    reasons = " ".join(c["details"][0] for c in cases if c["status"] == "skipped")
    assert "no start_frame" in reasons and "not zigzag" in reasons and "float32 tables only" in reasons


WAN_CLASSES = """
import torch
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

class ThetaIgnored(WanRotaryPosEmbed):
    def __init__(self, attention_head_dim, patch_size, max_seq_len, theta=10000.0):
        super().__init__(attention_head_dim, patch_size, max_seq_len)  # theta dropped

NOT_A_CLASS = 3
"""


def test_diffusers_wan_judges_the_class_named_by_impl(tmp_path):
    path = tmp_path / "wan_classes.py"
    path.write_text(WAN_CLASSES)
    provider = make_provider(f"{path}:ThetaIgnored", "diffusers-wan", None)
    assert "ThetaIgnored" in provider.name and "ThetaIgnored" not in make_provider(None, "diffusers-wan", None).name
    spec = RopeSpec.for_head_dim((4, 6, 8), 24, theta=500.0, dtype="float32")
    want_cos, _ = oracle_table(spec)
    assert float((provider.full(spec, "cpu").cos.double() - want_cos).abs().max()) > 1e-2
    assert float((DiffusersWanProvider().full(spec, "cpu").cos.double() - want_cos).abs().max()) <= tolerance(spec)


@pytest.mark.parametrize(
    ("impl", "impl_cache", "message"),
    [
        ("/no/such/file.py:x", None, "no such file"),
        ("{path}:NOT_A_CLASS", None, "is not a class"),
        (None, "{path}:NOT_A_CLASS", "--impl-cache does not apply to --convention diffusers-wan"),
    ],
)
def test_diffusers_wan_bad_impl_is_a_usage_error(tmp_path, impl, impl_cache, message):
    path = tmp_path / "wan_classes.py"
    path.write_text(WAN_CLASSES)
    args = ["--nproc", "2", "--convention", "diffusers-wan"]
    args += ["--impl", impl.format(path=path)] if impl else []
    args += ["--impl-cache", impl_cache.format(path=path)] if impl_cache else []
    result = check(*args, timeout=120)
    assert result.code == 2, result
    assert message in result.err and "Traceback" not in result.err and len(result.err.strip().splitlines()) == 1, result


def test_the_cache_watcher_names_the_entry_that_served_each_call():
    pair, record = (torch.zeros(3), torch.ones(3)), RopeSlice(torch.zeros(2), torch.ones(2), torch.arange(2))
    mapping: dict[object, object] = {"pair": pair, "record": record}
    watcher = CacheWatcher(mapping)
    assert watcher.key_for(pair, watcher.snapshot()) == "pair"
    assert watcher.key_for((record.cos, record.sin), watcher.snapshot()) == "record"
    before = watcher.snapshot()
    mapping["copied"] = (torch.full((3,), 2.0), torch.full((3,), 3.0))  # the call handed out copies
    assert watcher.key_for((mapping["copied"][0].clone(), mapping["copied"][1].clone()), before) == "copied"
    mapping["pair"] = replaced = (torch.zeros(3), torch.ones(3))  # a new value under a known key
    assert watcher.key_for(replaced, watcher.snapshot()) == "pair"
    del mapping["record"]  # an evicted entry is never named, even for its old tensors
    assert watcher.key_for((record.cos, record.sin), watcher.snapshot()) is None


SHARDS_IN_PLACE = FASTVIDEO_MODULE + """
    assert sum(rope_dim_list) == hidden_size // heads_num
    g = get_sp_group()
    spec = RopeSpec(tuple(rope_sizes), tuple(rope_dim_list), theta=rope_theta, start_frame=start_frame,
                    dtype=str(dtype).removeprefix("torch."), layout="interleaved" if use_real else "half")
    world = g.world_size if do_sp_sharding else 1
    tokens = ShardPlan("contiguous", axis=shard_dim).indices(spec.grid, g.rank_in_group if world > 1 else 0, world)
    rope_sizes[shard_dim] //= world  # "this rank's part of the grid", written into the caller's list
    return build_table(spec, tokens)
"""


def test_a_function_that_shards_its_rope_sizes_argument_in_place_is_named(tmp_path):
    path = tmp_path / "shards_in_place.py"
    path.write_text(SHARDS_IN_PLACE)
    provider = make_provider(f"{path}:fastvideo", "fastvideo", None)
    spec = RopeSpec((4, 2, 6), (8, 12, 4), dtype="float32")
    assert provider.full(spec, "cpu").cos.shape == (48, 24)  # unsharded: the list comes back as it went
    with pytest.raises(ValueError, match=r"changed its rope_sizes argument in place \(\[4, 2, 6\] -> \[2, 2, 6\]\)"):
        provider.get(spec, ShardPlan("contiguous", axis=0), 1, 2, "cpu")


KEYED_ON_LIST_IDS = FASTVIDEO_MODULE + """
    g = get_sp_group()
    world = g.world_size if do_sp_sharding else 1
    rank = g.rank_in_group if world > 1 else 0
    # lists are unhashable: "their ids will do"
    key = (id(rope_sizes), id(rope_dim_list), rope_theta, str(theta_rescale_factor), str(interpolation_factor),
           shard_dim, rank, world, dtype, start_frame, use_real)
    if key not in CACHE:
        spec = RopeSpec(tuple(rope_sizes), tuple(rope_dim_list), rope_theta, theta_rescale_factor,
                        interpolation_factor, str(dtype).removeprefix("torch."),
                        "interleaved" if use_real else "half", start_frame)
        CACHE[key] = build_table(spec, ShardPlan("contiguous", axis=shard_dim).indices(spec.grid, rank, world))
    return CACHE[key]
"""


def test_a_cache_keyed_on_the_ids_of_the_argument_lists_is_key_incomplete(tmp_path):
    # The adapter passes the same two lists every call, refilled, as a model keeps its own.
    from sp_rope.probe import probe_keys

    path = tmp_path / "keyed_on_list_ids.py"
    path.write_text(KEYED_ON_LIST_IDS)
    failures = {c.scheme: c.diagnoses for c in probe_keys(make_provider(f"{path}:fastvideo", "fastvideo", None), "cpu")
                if c.status == "failed"}
    assert {"grid[0]", "grid[1]", "grid[2]", "rope_dim_list[1] -> [0]"} <= set(failures), failures
    # (On meta a wrong table holds no values to recognize: the device field's is of another shape.)
    assert all(diagnoses == ["key-incomplete"] for field, diagnoses in failures.items() if field != "device"), failures


LAST_CALL_MEMO = """
import torch
from sp_rope import RopeSpec, ShardPlan, build_table

LAST = []

def nd(rope_dim_list, rope_sizes, **kwargs):
    # a one-entry memo of the last call: its arguments as passed, the caller's lists included
    args = (rope_dim_list, rope_sizes, kwargs)
    if LAST and LAST[0] == args:
        return LAST[1]
    f = lambda v: v if isinstance(v, (int, float)) else tuple(v)
    spec = RopeSpec(tuple(rope_sizes), tuple(rope_dim_list), kwargs["theta"], f(kwargs["theta_rescale_factor"]),
                    f(kwargs["interpolation_factor"]), str(kwargs["dtype"]).removeprefix("torch."),
                    "interleaved" if kwargs["use_real"] else "half", kwargs["start_frame"])
    plan = ShardPlan("contiguous", axis=kwargs["shard_dim"])
    LAST[:] = [args, build_table(spec, plan.indices(spec.grid, kwargs["sp_rank"], kwargs["sp_world_size"]))]
    return LAST[1]
"""


def test_a_memo_of_the_last_arguments_holding_the_callers_lists_is_key_incomplete(tmp_path):
    # The lists come back refilled for the next latent size, so the memo finds them equal; the
    # factors' spelling stays the same for two calls in a row, or it would never meet that.
    from sp_rope.probe import probe_keys

    path = tmp_path / "last_call_memo.py"
    path.write_text(LAST_CALL_MEMO)
    failures = {c.scheme: c.diagnoses for c in probe_keys(make_provider(f"{path}:nd", "fastvideo-nd", None), "cpu")
                if c.status == "failed"}
    # A stale table of another size is refused by the cache the builder sits behind (an error).
    assert {"grid[1]", "grid[2]", "grid[1] <-> grid[2]"} <= set(failures), failures
    assert {d for diagnoses in failures.values() for d in diagnoses} <= {"key-incomplete", "implementation-error"}


SHARDS_SPATIAL_AXES_ALWAYS = FASTVIDEO_MODULE + """
    g = get_sp_group()
    spec = RopeSpec(tuple(rope_sizes), tuple(rope_dim_list), theta=rope_theta, start_frame=start_frame,
                    dtype=str(dtype).removeprefix("torch."), layout="interleaved" if use_real else "half")
    # "h and w shards follow the group": do_sp_sharding is only consulted for t
    world = g.world_size if do_sp_sharding or shard_dim > 0 else 1
    tokens = ShardPlan("contiguous", axis=shard_dim).indices(spec.grid, g.rank_in_group if world > 1 else 0, world)
    return build_table(spec, tokens)
"""


def test_the_unsharded_table_is_asked_for_with_each_shard_dim(tmp_path):
    path = tmp_path / "spatial.py"
    path.write_text(SHARDS_SPATIAL_AXES_ALWAYS)
    provider = make_provider(f"{path}:fastvideo", "fastvideo", None)
    rows = [provider.full(RopeSpec((4, 2, 6), (8, 12, 4), start_frame=sf), "cpu", within=(1, 2)).cos.shape[0]
            for sf in (0, 1, 2)]
    assert rows == [48, 24, 24], rows  # shard_dim 0 unsharded, as it must be; 1 and 2 sharded anyway


class _FollowsInputDtype:
    """diffusers' Wan RoPE, but its tables take the latent's dtype."""

    def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

        self.inner = WanRotaryPosEmbed(*args, **kwargs)

    def __call__(self, hidden_states):  # type: ignore[no-untyped-def]
        return tuple(t.to(hidden_states.dtype) for t in self.inner(hidden_states))


def test_diffusers_wan_tables_must_not_follow_a_bfloat16_latent():
    spec = RopeSpec.for_head_dim((2, 4, 6), 24, dtype="float32")
    assert DiffusersWanProvider().full(spec, "cpu").cos.dtype == torch.float32  # diffusers' own: float32
    assert DiffusersWanProvider(_FollowsInputDtype).full(spec, "cpu").cos.dtype == torch.bfloat16


class _LatentGrid:
    """A Wan RoPE that builds its table on the latent's own frames, height and width (before
    patchifying) and cuts it to the token count: right only for a patch of (1, 1, 1)."""

    def __init__(self, attention_head_dim, patch_size, max_seq_len, theta=10000.0):  # type: ignore[no-untyped-def]
        self.head_dim, self.patch, self.theta = attention_head_dim, tuple(patch_size), theta

    def __call__(self, hidden_states):  # type: ignore[no-untyped-def]
        frames, height, width = hidden_states.shape[2:]
        tokens = math.prod(n // p for n, p in zip((frames, height, width), self.patch))
        cos, sin = build_table(RopeSpec.for_head_dim((frames, height, width), self.head_dim, theta=self.theta,
                                                     dtype="float32"))
        return cos[:tokens].reshape(1, tokens, 1, -1), sin[:tokens].reshape(1, tokens, 1, -1)


class _PositionsInLatentDtype(_LatentGrid):
    """A Wan RoPE whose positions are made in the latent's dtype (bfloat16 at inference)."""

    def __call__(self, hidden_states):  # type: ignore[no-untyped-def]
        grid = tuple(n // p for n, p in zip(hidden_states.shape[2:], self.patch))
        spec = RopeSpec.for_head_dim(grid, self.head_dim, theta=self.theta, dtype="float32")
        coords = [torch.arange(n, dtype=hidden_states.dtype).double() for n in grid]
        angles = []
        for axis, dim in enumerate(spec.rope_dim_list):
            freqs = 1.0 / self.theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
            shape = [1, 1, 1, dim // 2]
            shape[axis] = grid[axis]
            angles.append(torch.outer(coords[axis], freqs).view(shape).expand(*grid, dim // 2))
        theta = torch.cat(angles, -1).reshape(-1, spec.width // 2)
        cos, sin = theta.cos().float().repeat_interleave(2, 1), theta.sin().float().repeat_interleave(2, 1)
        return cos.reshape(1, -1, 1, spec.width), sin.reshape(1, -1, 1, spec.width)


def test_diffusers_wan_is_called_with_wans_patch():
    # With a (1, 1, 1) patch, a table built before patchifying is the right one.
    spec = RopeSpec.for_head_dim((2, 3, 4), 24, dtype="float32")
    want_cos, _ = oracle_table(spec)
    got = DiffusersWanProvider(_LatentGrid).full(spec, "cpu").cos.double()
    assert got.shape == want_cos.shape and float((got - want_cos).abs().max()) > 1e-2


def test_the_long_breadth_axis_catches_positions_made_in_bfloat16():
    (long,) = [c for c in breadth_configs(random.Random(0)) if max(c.grid) > 2048]
    spec = long.spec("float32", "interleaved", 0)
    assert DiffusersWanProvider().skip_reason(spec, ShardPlan("flat")) is None  # every convention expresses it
    want_cos, _ = oracle_table(spec)
    for cls, wrong in ((_PositionsInLatentDtype, True), (None, False)):  # None: diffusers' own
        got = DiffusersWanProvider(cls).full(spec, "cpu").cos.double()
        assert (float((got - want_cos).abs().max()) > tolerance(spec)) is wrong


class _DefaultDtypeTables(_LatentGrid):
    """A Wan RoPE whose per-axis tables are precomputed in torch's default dtype at construction."""

    def __init__(self, attention_head_dim, patch_size, max_seq_len, theta=10000.0):  # type: ignore[no-untyped-def]
        super().__init__(attention_head_dim, patch_size, max_seq_len, theta)
        dims = RopeSpec.for_head_dim((1, 1, 1), attention_head_dim).rope_dim_list
        self.axes = [torch.outer(torch.arange(max_seq_len) * 1.0, 1.0 / theta ** (torch.arange(0, d, 2) / d))
                     for d in dims]

    def __call__(self, hidden_states):  # type: ignore[no-untyped-def]
        grid = tuple(n // p for n, p in zip(hidden_states.shape[2:], self.patch))
        parts = []
        for axis, angles in enumerate(self.axes):
            shape = [1, 1, 1, angles.shape[1]]
            shape[axis] = grid[axis]
            parts.append(angles[: grid[axis]].float().view(shape).expand(*grid, -1))
        theta = torch.cat(parts, -1).reshape(math.prod(grid), -1)
        cos, sin = theta.cos().repeat_interleave(2, 1), theta.sin().repeat_interleave(2, 1)
        return cos.reshape(1, cos.shape[0], 1, -1), sin.reshape(1, sin.shape[0], 1, -1)


def test_diffusers_wan_classes_are_built_under_a_bfloat16_default_dtype():
    spec = RopeSpec.for_head_dim((2, 3, 300), 24, dtype="float32")
    want_cos, _ = oracle_table(spec)
    got = DiffusersWanProvider(_DefaultDtypeTables).full(spec, "cpu").cos.double()
    assert float((got - want_cos).abs().max()) > tolerance(spec)
    assert torch.get_default_dtype() == torch.float32  # restored
