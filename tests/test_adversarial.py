"""Detection power: one test per structural blind spot the default matrix used to have. Each
runs the default command (no extra options but a fixed seed, the table level and a report)
against one catalog implementation that carries a bug of that class, or a correct one that
used to be judged wrongly."""

from __future__ import annotations

import json
import math
import re

import pytest
from helpers import REPO, check

from sp_rope.matrix import divisors, sp_layouts
from sp_rope.mutants import catalog

ENTRIES = {m.name: m for m in catalog()}
SEED = "11"


def _diagnoses(name: str, tmp_path, *extra: str) -> tuple[set[str], dict]:
    report = tmp_path / "report.json"
    result = check(
        "--nproc",
        "4",
        "--seed",
        SEED,
        "--quiet",
        "--level",
        "table",
        "--report",
        str(report),
        *ENTRIES[name].check_args(),
        *extra,
        timeout=400,
    )
    assert result.code in (0, 1), result
    data = json.loads(report.read_text())
    assert data["summary"]["passed"] + data["summary"]["failed"] > 0, result
    return set(data["summary"]["diagnoses"]), data


@pytest.mark.parametrize(
    ("cause", "name", "diagnosis"),
    [
        ("1 key completeness: a factor list collapsed to its first element", "fv_key_rescale_first", "key-incomplete"),
        ("2 SP rank taken from the global rank (strided groups)", "fv_rank_from_global", "slice-mismatch"),
        (
            "3 an LRU of 32 entries that re-enters stale slots (deep sweep)",
            "native_stale_lru32",
            "stale-after-eviction",
        ),
        ("4 a static output buffer rewritten by later calls", "native_static_output", "overwritten-after-return"),
        (
            "5 a scalar rescale factor ignored (factors spelled as scalars)",
            "nd_scalar_rescale_ignored",
            "oracle-mismatch",
        ),
        ("5 do_sp_sharding=False ignored inside a real SP group", "fv_shards_unasked", "oracle-mismatch"),
        (
            "6 another rank's tokens with their correct rows, at the table level",
            "native_next_rank_tokens",
            "plan-mismatch",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) and " " not in v else None,
)
def test_the_default_matrix_kills_each_class(cause, name, diagnosis, tmp_path):
    found, _ = _diagnoses(name, tmp_path)
    assert diagnosis in found, f"cause {cause}: {name} got {sorted(found)}"


def test_a_power_of_two_assumption_dies_at_p3(tmp_path):
    found, data = _diagnoses("nd_pow2_shift", tmp_path)
    failing = {c["sp_size"] for c in data["cases"] if c["status"] == "failed"}
    assert found and 3 in failing, sorted(found)


def test_8_a_correct_decorated_fastvideo_function_passes(tmp_path):
    found, data = _diagnoses("correct_fastvideo_no_grad", tmp_path)
    assert not found and data["summary"]["failed"] == 0 and data["summary"]["passed"] > 0, data["summary"]


def test_7_nothing_checked_is_exit_2_with_a_command_that_runs(tmp_path):
    result = check("--nproc", "2", "--convention", "diffusers-wan", "--config", "quick", timeout=300)
    assert result.code == 2, result
    line = result.err.strip().splitlines()[-1]
    assert "no case can run" in line and "--schemes flat" in line and "Traceback" not in result.err, result


def test_sp_layouts_at_four_ranks_are_strided_and_not_only_powers_of_two():
    layouts = {(sp.kind, sp.size): sp.groups for sp in sp_layouts(4)}
    assert layouts[("consecutive", 2)] == ((0, 1), (2, 3))
    assert layouts[("strided", 2)] == ((0, 2), (1, 3))
    assert layouts[("consecutive", 4)] == ((0, 1, 2, 3),)
    assert layouts[("offset", 3)] == ((1, 2, 3),)  # rank 0 sits out; SP rank != global rank
    assert divisors(1_000_000_007 * 2) == [1, 2, 1_000_000_007, 2_000_000_014]


def test_the_seed_is_printed_and_reruns_the_same_cases(tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    runs = [
        check("--nproc", "2", "--seed", "123", "--level", "table", "--report", str(p), timeout=300)
        for p in (first, second)
    ]
    for result in runs:
        assert result.code == 0, result
        assert "seed 123" in result.out.splitlines()[0], result
    a, b = (json.loads(p.read_text()) for p in (first, second))
    assert a["summary"]["seed"] == 123 and [c["id"] for c in a["cases"]] == [c["id"] for c in b["cases"]]
    geometries = {c["config"] for c in a["cases"]}
    assert {"quick", "quick-odd", "deep-sweep", "probe"} <= geometries and any(g.startswith("b-") for g in geometries)


def test_a_mismatch_names_rank_scheme_first_bad_token_and_error(tmp_path):
    impl = REPO / "tests" / "assets" / "native_one_bad_row.py"
    result = check(
        "--nproc",
        "2",
        "--seed",
        "1",
        "--config",
        "quick",
        "--schemes",
        "contiguous:t",
        "--dtypes",
        "float64",
        "--layouts",
        "interleaved",
        "--start-frames",
        "0",
        "--impl",
        f"{impl}:rope",
        timeout=300,
    )
    assert result.code == 1, result
    assert re.search(
        r"FAIL quick/contiguous:t/P2/sf0/float64/interleaved\S*: slice-mismatch: rank 1 \(contiguous:t, P=2\) sin "
        r"differs from the unsharded table at token \(t=5, h=2, w=3\) \(local row \d+\), max abs error 0\.25\b",
        result.out,
    ), result


def _exact_in(value: float, dtype: str) -> bool:
    import torch

    return float(torch.tensor(value, dtype=torch.float64).to(getattr(torch, dtype)).double()) == value


def _values(factor: float | tuple[float, ...]) -> tuple[float, ...]:
    """A config's factor as per-axis values (a scalar is one value for every axis)."""
    return factor if isinstance(factor, tuple) else (factor,)


@pytest.mark.parametrize("seed", [1, 7, 12, 20, 90])
def test_the_default_matrix_reaches_where_plausible_bugs_hide(seed):
    """What the default run must always contain, whatever the seed (each point is a class of
    bugs an independent implementation shipped and an earlier matrix let through)."""
    from sp_rope.check import parse_settings
    from sp_rope.matrix import families

    settings = parse_settings([], 4)  # the default run's matrix
    fams = families(settings.matrix, 4, seed, breadth=settings.breadth)
    configs = {f.config for f in fams}
    factors = [v for c in configs for name in ("theta_rescale_factor", "interpolation_factor")
               for v in _values(getattr(c, name))]
    # theta and factors a float32 or bfloat16 buffer, or a key that rounds them, would change
    assert any(not _exact_in(c.theta, "float32") for c in configs)
    assert any(not _exact_in(v, "bfloat16") for v in factors)
    # spatial positions past a small precomputed per-axis table
    assert max(max(c.grid[1:]) for c in configs if len(c.grid) == 3) >= 96
    # every breadth geometry (T = 1 ones included) is asked for at a causal offset != 0 (Wan
    # 1080p's at 0 only has a twin of its grid, with factors, at 21)
    offsets = {f.config.grid: set() for f in fams}
    for fam in fams:
        offsets[fam.config.grid].update(fam.start_frames)
    for fam in fams:
        if fam.config.name.startswith("b-"):
            assert offsets[fam.config.grid] - {0}, fam.config.name
    # a block-causal stream split along t: start_frames 0, T, 2T, ... deeper than a 32-entry cache
    (deep,) = [f for f in fams if f.config.name == "deep-sweep"]
    t = deep.config.grid[0]
    assert deep.plan.scheme == "contiguous" and deep.plan.axis == 0
    assert deep.start_frames == tuple(range(0, t * len(deep.start_frames), t)) and len(deep.start_frames) > 32
    # tokens handed out in the plan's order, which is not row-major: two chunks of a spatial
    # axis per rank, with T > 1
    assert any(f.plan.scheme == "zigzag" and f.plan.axis in (1, 2) and f.config.grid[0] > 1 for f in fams)
    # who gets a flat split's extra tokens: a remainder of 2 or more
    assert any(f.scheme == "flat:uneven" and math.prod(f.config.grid) % f.sp.size >= 2 for f in fams)
    # two token sequences padded to one length, one right after the other at one offset: a key
    # on the padded length gives the second the first's rows
    pads = [f for f in fams if f.scheme == "flat:pad" and len(f.config.grid) == 1]
    assert any(
        a.config.grid != b.config.grid and -(-a.config.grid[0] // a.sp.size) == -(-b.config.grid[0] // b.sp.size)
        and a.sp == b.sp and a.start_frames == b.start_frames
        for a, b in zip(pads, pads[1:])
    )
    # padding that reaches a rank before the last
    tokens = {f: math.prod(f.config.grid) for f in fams}
    assert any(f.scheme == "flat:pad" and tokens[f] < (f.sp.size - 1) * -(-tokens[f] // f.sp.size) for f in fams)
    # h and w alike in size and dims, unlike in factors (an "equal axes" shortcut)
    assert any(
        c.grid[1] == c.grid[2] and c.rope_dim_list[1] == c.rope_dim_list[2]
        and isinstance(c.theta_rescale_factor, tuple) and c.theta_rescale_factor[1] != c.theta_rescale_factor[2]
        for c in configs if len(c.grid) == 3
    )
    # slices of a real model's size (paths an implementation switches to above some size)
    assert any(tokens[f] // f.sp.size > 32768 for f in fams)
    # Wan's split at a head dim = 4 mod 6 (64: 24/20/20), where 2*(d//6) and 2*round(d/6) part
    wan_split = {c: (c.head_dim - 4 * (c.head_dim // 6), 2 * (c.head_dim // 6), 2 * (c.head_dim // 6)) for c in configs}
    assert any(c.head_dim % 6 == 4 and c.rope_dim_list == wan_split[c] for c in configs)
    # an unsharded table of more than 2^17 tokens (where code builds in chunks)
    assert any(tokens[f] > 2**17 for f in fams)
    # an unsharded table larger than a 128 MiB cache budget (float64, as FastVideo builds it)
    assert any(f.dtype == "float64" and tokens[f] * f.config.head_dim * 2 * 8 > 128 * 2**20 for f in fams)
    # positions past tables precomputed up to 2^14 frames and 2^17 positions, in float64: a
    # token sequence (an LLM's decode position), split zigzag too, and a causal video stream
    far = [f for f in fams if f.dtype == "float64" and min(f.start_frames) > 2**14]
    assert any(len(f.config.grid) == 1 and min(f.start_frames) > 2**17 and f.plan.scheme == "zigzag" for f in far)
    assert any(len(f.config.grid) == 3 for f in far)
    # and just below the spec's limit of 2^24 (a table grown on demand but capped anywhere
    # above the first offsets), for a token sequence and a video stream alike
    for axes in (1, 3):
        assert any(len(f.config.grid) == axes and max(f.start_frames) + f.config.grid[0] > 2**24 - 2**10 for f in far)
    # non-default factors on a token sequence (a separate 1-D path) and past 2^17 tokens (a path
    # for long sequences): an NTK rescale and an interpolation, both != 1 there
    def scaled(c):  # type: ignore[no-untyped-def]
        return all(set(_values(v)) != {1.0} for v in (c.theta_rescale_factor, c.interpolation_factor))
    assert any(len(c.grid) == 1 and scaled(c) for c in configs)
    assert any(tokens[f] > 2**17 and scaled(f.config) for f in fams)
    # every dtype x layout on a token sequence and an image (a separate path for fewer axes
    # that gets one layout wrong), whatever the seed draws
    every = {(d, lay) for d in settings.matrix.dtypes for lay in settings.matrix.layouts}
    for axes in (1, 2):
        assert {(f.dtype, f.layout) for f in fams if f.config.name == f"b-{axes}d"} == every


def test_the_far_offsets_catch_angles_made_in_float32_past_a_precomputed_table():
    # A table precomputed for 8192 positions and grown on demand with float32 angles: fine below,
    # off by far more than the tolerance at the far offsets (and so at every axis they shift).
    import torch

    from sp_rope.matrix import FAR
    from sp_rope.oracle import oracle_table, tolerance
    from sp_rope.tables import unravel

    for config, start_frame in ((config, sf) for config, frames in FAR for sf in frames):
        spec = config.spec("float64", "interleaved", start_frame)
        want_cos, _ = oracle_table(spec)
        frames = unravel(torch.arange(spec.num_tokens), spec.grid)[0] + start_frame
        d = spec.rope_dim_list[0]
        freq = 1.0 / spec.theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        grown = torch.outer(frames.float(), freq.float()).double().cos().repeat_interleave(2, 1)
        assert float((grown - want_cos[:, :d]).abs().max()) > 1000 * tolerance(spec), config.name
        exact = torch.outer(frames.double(), freq).cos().repeat_interleave(2, 1)  # the same formula in float64
        assert float((exact - want_cos[:, :d]).abs().max()) <= tolerance(spec), config.name


def test_every_seeded_default_family_either_shards_or_is_skipped_for_a_reason():
    # A scheme along an axis a grid does not have (the 1-D and 2-D geometries) must never be drawn:
    # anything but a ShardError here would end the job instead of skipping the case.
    from sp_rope.check import parse_settings
    from sp_rope.judge import plan_tokens
    from sp_rope.matrix import families
    from sp_rope.sharding import ShardError

    settings = parse_settings([], 4)
    for seed in range(100):
        for fam in families(settings.matrix, 4, seed, breadth=settings.breadth):
            try:
                plan_tokens(fam.plan, fam.config.grid, 0, fam.sp.size)
            except ShardError:
                pass
