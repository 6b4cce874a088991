"""Table values: bit-exact against the FastVideo golden tables, close to an in-test float64 formula.

The formula here is written from the convention only (it does not import ``sp_rope.tables`` or
``sp_rope.oracle``), so a mistake shared by the builder and the oracle still shows up.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sp_rope import RopeCache, RopeSpec, ShardPlan, build_slice, build_table
from sp_rope.oracle import oracle_table, tolerance

LAYOUTS = ("interleaved", "half", "neox")

# ---------------------------------------------------------------------------------------------
# Golden tables (FastVideo's builder output). A missing file is a failure, never a skip.
# ---------------------------------------------------------------------------------------------

GOLDEN_DEFAULT = Path(__file__).resolve().parent / "assets" / "fastvideo_rope_tables.pt"  # see assets/README.md
GOLDEN_PATH = Path(os.environ.get("SP_ROPE_GOLDEN") or GOLDEN_DEFAULT)


def _load_golden() -> list[dict]:
    if not GOLDEN_PATH.is_file():
        return []
    return torch.load(GOLDEN_PATH, weights_only=True)


GOLDEN = _load_golden()


def _golden_id(i: int, e: dict) -> str:
    axis = "thw"[e["shard_dim"]]
    return f"{i:02d}-{e['name']}-{axis}-P{e['sp_world_size']}r{e['sp_rank']}-sf{e['start_frame']}"


# One sentinel parameter when the file is missing or empty, so the test fails instead of being
# collected with an empty parameter set (which pytest reports as a skip).
GOLDEN_PARAMS = [pytest.param(i, id=_golden_id(i, e)) for i, e in enumerate(GOLDEN)] or [
    pytest.param(None, id="golden-file-missing")
]


def _golden_entry(index: int | None) -> dict:
    if index is None:
        pytest.fail(
            f"golden RoPE tables not found or empty at {GOLDEN_PATH} (tests/assets/ ships them; "
            "SP_ROPE_GOLDEN may point at another copy)"
        )
    return GOLDEN[index]


def _golden_spec_plan(e: dict) -> tuple[RopeSpec, ShardPlan]:
    spec = RopeSpec(
        grid=tuple(e["rope_sizes"]),
        rope_dim_list=tuple(e["rope_dim_list"]),
        theta=e["rope_theta"],
        theta_rescale_factor=e["theta_rescale_factor"],
        interpolation_factor=e["interpolation_factor"],
        dtype=e["dtype"],
        layout="interleaved" if e["use_real"] else "half",
        start_frame=e["start_frame"],
    )
    return spec, ShardPlan("contiguous", axis=e["shard_dim"])


def _assert_bit_equal(cos: torch.Tensor, sin: torch.Tensor, e: dict) -> None:
    for got, want in ((cos, e["cos"]), (sin, e["sin"])):
        assert got.dtype == want.dtype
        assert got.shape == want.shape
        assert torch.equal(got, want), f"max |diff| {(got.double() - want.double()).abs().max().item():.3e}"


@pytest.mark.parametrize("index", GOLDEN_PARAMS)
def test_golden_build_table_at_plan_indices(index: int | None) -> None:
    e = _golden_entry(index)
    spec, plan = _golden_spec_plan(e)
    indices = plan.indices(spec.grid, e["sp_rank"], e["sp_world_size"])
    _assert_bit_equal(*build_table(spec, indices), e)


@pytest.mark.parametrize("index", GOLDEN_PARAMS)
def test_golden_full_table_rows_at_plan_indices(index: int | None) -> None:
    # The whole-grid path (broadcast fill) gathered to the rank's rows must match too.
    e = _golden_entry(index)
    spec, plan = _golden_spec_plan(e)
    indices = plan.indices(spec.grid, e["sp_rank"], e["sp_world_size"])
    cos, sin = build_table(spec)
    _assert_bit_equal(cos[indices], sin[indices], e)


@pytest.mark.parametrize("index", GOLDEN_PARAMS)
def test_golden_build_slice(index: int | None) -> None:
    e = _golden_entry(index)
    spec, plan = _golden_spec_plan(e)
    piece = build_slice(spec, plan, e["sp_rank"], e["sp_world_size"])
    _assert_bit_equal(piece.cos, piece.sin, e)


@pytest.mark.parametrize("index", GOLDEN_PARAMS)
def test_golden_through_cache_miss_and_hit(index: int | None) -> None:
    e = _golden_entry(index)
    spec, plan = _golden_spec_plan(e)
    cache = RopeCache()
    for _ in range(2):  # first call builds, second is served from the cache
        piece = cache.get(spec, plan, e["sp_rank"], e["sp_world_size"])
        _assert_bit_equal(piece.cos, piece.sin, e)
    assert (cache.stats.misses, cache.stats.hits) == (1, 1)


def test_golden_covers_both_layouts_and_sharded_entries() -> None:
    # If the file shrank to trivial entries the bit-exact tests above would prove little.
    assert GOLDEN, f"golden RoPE tables not found or empty at {GOLDEN_PATH}"
    assert {e["use_real"] for e in GOLDEN} == {True, False}
    assert any(e["sp_world_size"] > 1 for e in GOLDEN)
    assert any(e["start_frame"] > 0 for e in GOLDEN)


# ---------------------------------------------------------------------------------------------
# Independent float64 formula.
# ---------------------------------------------------------------------------------------------


def formula_table(spec: RopeSpec, indices: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 cos/sin from the convention, in ``spec.layout``; ``-1`` rows are cos 1 / sin 0.

    angle(token, axis, k) = position * theta_a ** (-2k/d), theta_a = theta * r ** (d/(d-2)),
    position = float32(coord [+ start_frame on time]) * float32(interp), rounded to float32.
    """
    tokens = list(range(spec.num_tokens)) if indices is None else [int(i) for i in indices]
    halves = []
    for axis, (size, d) in enumerate(zip(spec.grid, spec.rope_dim_list, strict=True)):
        inner = math.prod(spec.grid[axis + 1 :])
        coords = [(max(t, 0) // inner) % size + (spec.start_frame if axis == 0 else 0) for t in tokens]
        r = spec.theta_rescale_factor[axis]
        theta_a = spec.theta * r ** (d / (d - 2)) if r != 1.0 else spec.theta
        inv_freq = torch.tensor([theta_a ** (-2.0 * k / d) for k in range(d // 2)], dtype=torch.float64)
        interp = torch.tensor(spec.interpolation_factor[axis], dtype=torch.float32)
        position = (torch.tensor(coords, dtype=torch.float32) * interp).to(torch.float64)
        halves.append(position[:, None] * inv_freq[None, :])
    angles = torch.cat(halves, dim=1)  # [tokens, D/2], axis blocks in order t, h, w
    half = angles.shape[1]
    if spec.layout == "interleaved":  # [c0, c0, c1, c1, ...]
        angles = angles[:, [j // 2 for j in range(2 * half)]]
    elif spec.layout == "neox":  # [c0 .. c_{D/2-1}, c0 .. c_{D/2-1}]
        angles = angles[:, [j % half for j in range(2 * half)]]
    cos, sin = angles.cos(), angles.sin()
    pad = torch.tensor([t < 0 for t in tokens], dtype=torch.bool)
    cos[pad], sin[pad] = 1.0, 0.0
    return cos, sin


# float64 bound: |angle error| is a few ulps of the angle. With start_frame <= 64 and small grids
# the largest angle stays below ~150 rad, so the error stays ~1e-13, an order below 1e-12.
# (tolerance() grows with start_frame because float64 cannot keep 1e-12 at angles ~1e4.)
FLOAT64_TOL = 1e-12

FORMULA_CASES = {
    "wan-d128": RopeSpec((6, 4, 8), (44, 42, 42)),
    "wan-d128-sf64": RopeSpec((6, 4, 8), (44, 42, 42), start_frame=64),
    "hunyuan-theta256": RopeSpec((4, 6, 6), (16, 56, 56), theta=256.0, start_frame=3),
    "rescaled-interp": RopeSpec(
        (4, 4, 4),
        (8, 8, 8),
        theta_rescale_factor=[1.0, 2.0, 2.0],
        interpolation_factor=[1.0, 0.5, 0.5],
        start_frame=7,
    ),
    "non-dyadic-interp": RopeSpec((5, 3, 7), (8, 6, 4), interpolation_factor=[0.7, 1.3, 0.3], start_frame=11),
    "1d": RopeSpec((33,), (16,), start_frame=5),
    "2d": RopeSpec((9, 7), (12, 8), theta_rescale_factor=1.5),
}


def _max_err(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> float:
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", list(FORMULA_CASES))
def test_float64_table_matches_formula(case: str, layout: str) -> None:
    spec = FORMULA_CASES[case].replace(layout=layout)
    table = build_table(spec)
    assert table[0].shape == (spec.num_tokens, spec.width)
    assert _max_err(table, formula_table(spec)) <= FLOAT64_TOL


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", list(FORMULA_CASES))
def test_float32_table_matches_formula_within_tolerance(case: str, layout: str) -> None:
    spec = FORMULA_CASES[case].replace(layout=layout, dtype="float32")
    table = build_table(spec)
    assert table[0].dtype == torch.float32
    assert _max_err(table, formula_table(spec)) <= tolerance(spec)


def test_layouts_place_columns_as_documented() -> None:
    # Explicit column checks, independent of formula_table's own layout code.
    spec = RopeSpec((3, 2), (4, 2), start_frame=1)
    half = build_table(spec.replace(layout="half"))[0]
    inter = build_table(spec.replace(layout="interleaved"))[0]
    neox = build_table(spec.replace(layout="neox"))[0]
    assert half.shape[1] == 3 and inter.shape[1] == neox.shape[1] == 6
    assert torch.equal(
        inter, torch.stack([half[:, 0], half[:, 0], half[:, 1], half[:, 1], half[:, 2], half[:, 2]], 1)
    )
    assert torch.equal(neox, torch.cat([half, half], dim=1))
    # Column 0 is the time axis at frequency 1, so its angle is t + start_frame.
    t = torch.arange(3, dtype=torch.float64).repeat_interleave(2) + 1
    assert torch.allclose(half[:, 0], t.cos(), rtol=0, atol=1e-15)


_dims = st.integers(1, 12).map(lambda k: 2 * k)


@st.composite
def float64_specs(draw: st.DrawFn) -> RopeSpec:
    ndim = draw(st.integers(1, 3))
    dims = tuple(draw(_dims) for _ in range(ndim))
    factor = st.sampled_from([0.25, 0.5, 0.7, 1.0, 1.3, 2.0])
    rescale = [1.0 if d == 2 else draw(st.sampled_from([1.0, 0.5, 2.0, 3.0])) for d in dims]
    return RopeSpec(
        grid=tuple(draw(st.integers(1, 6)) for _ in range(ndim)),
        rope_dim_list=dims,
        theta=draw(st.sampled_from([10000.0, 256.0, 500000.0, 10.5])),
        theta_rescale_factor=rescale,
        interpolation_factor=[draw(factor) for _ in range(ndim)],
        layout=draw(st.sampled_from(LAYOUTS)),
        start_frame=draw(st.integers(0, 64)),
    )


@settings(max_examples=60, deadline=None)
@given(float64_specs())
def test_random_float64_specs_match_formula(spec: RopeSpec) -> None:
    assert _max_err(build_table(spec), formula_table(spec)) <= FLOAT64_TOL


@settings(max_examples=60, deadline=None)
@given(float64_specs(), st.data())
def test_start_frame_equals_rows_of_a_longer_grid(spec: RopeSpec, data: st.DataObject) -> None:
    # A grid of T frames shifted by sf is, bit for bit, the last T frames of a T+sf grid:
    # start_frame moves time positions only, and by exactly sf.
    sf = data.draw(st.integers(1, 16), label="start_frame")
    shifted = spec.replace(start_frame=sf)
    longer = spec.replace(grid=(spec.grid[0] + sf, *spec.grid[1:]), start_frame=0)
    rows = sf * math.prod(spec.grid[1:])
    cos, sin = build_table(shifted)
    long_cos, long_sin = build_table(longer)
    assert torch.equal(cos, long_cos[rows:]) and torch.equal(sin, long_sin[rows:])


def _time_columns(spec: RopeSpec) -> torch.Tensor:
    d0, mask = spec.rope_dim_list[0], torch.zeros(spec.width, dtype=torch.bool)
    if spec.layout == "interleaved":
        mask[:d0] = True
    else:
        mask[: d0 // 2] = True
        if spec.layout == "neox":
            mask[spec.head_dim // 2 : spec.head_dim // 2 + d0 // 2] = True
    return mask


@settings(max_examples=60, deadline=None)
@given(float64_specs(), st.integers(1, 64))
def test_start_frame_changes_only_time_columns(spec: RopeSpec, sf: int) -> None:
    base = build_table(spec.replace(start_frame=0))
    shifted = build_table(spec.replace(start_frame=sf))
    time = _time_columns(spec)
    for b, s in zip(base, shifted, strict=True):
        assert torch.equal(b[:, ~time], s[:, ~time])
    # ...and the time columns do move (cos of the frequency-1 column at a new position).
    assert not torch.equal(base[0][:, time], shifted[0][:, time])


# ---------------------------------------------------------------------------------------------
# Row selection, padding, output properties.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rows_at_indices_with_padding(layout: str) -> None:
    spec = RopeSpec((3, 4, 5), (8, 4, 4), layout=layout, start_frame=2)
    full_cos, full_sin = build_table(spec)
    indices = torch.tensor([59, 0, -1, 17, 17, 33, -1])
    cos, sin = build_table(spec, indices)
    real = indices >= 0
    assert torch.equal(cos[real], full_cos[indices[real]]) and torch.equal(sin[real], full_sin[indices[real]])
    assert torch.equal(cos[~real], torch.ones(2, spec.width, dtype=torch.float64))
    assert torch.equal(sin[~real], torch.zeros(2, spec.width, dtype=torch.float64))


@pytest.mark.parametrize("bad", [[60], [-2], [0, 1, 1000]])
def test_out_of_range_indices_raise(bad: list[int]) -> None:
    with pytest.raises(ValueError, match="indices"):
        build_table(RopeSpec((3, 4, 5), (8, 4, 4)), torch.tensor(bad))


def test_empty_indices_give_empty_table() -> None:
    cos, sin = build_table(RopeSpec((3, 4, 5), (8, 4, 4)), torch.empty(0, dtype=torch.int64))
    assert cos.shape == sin.shape == (0, 16)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_output_dtype_device_and_contiguity(dtype: str) -> None:
    spec = RopeSpec((2, 3, 4), (8, 4, 4), dtype=dtype)
    for t in build_table(spec):
        assert t.dtype == spec.torch_dtype and t.device.type == "cpu" and t.is_contiguous()


# ---------------------------------------------------------------------------------------------
# sp_rope.oracle against the in-test formula, and tolerance() sanity.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", list(FORMULA_CASES))
def test_oracle_matches_formula(case: str, layout: str) -> None:
    spec = FORMULA_CASES[case].replace(layout=layout)
    indices = torch.cat([torch.arange(spec.num_tokens).flip(0), torch.tensor([-1, -1])])
    oracle = oracle_table(spec, indices)
    assert oracle[0].dtype == torch.float64 and oracle[0].shape == (spec.num_tokens + 2, spec.width)
    assert _max_err(oracle, formula_table(spec, indices)) <= FLOAT64_TOL


@settings(max_examples=60, deadline=None)
@given(float64_specs())
def test_random_specs_oracle_matches_formula(spec: RopeSpec) -> None:
    assert _max_err(oracle_table(spec), formula_table(spec)) <= FLOAT64_TOL


def test_tolerance_is_positive_and_grows_with_start_frame_and_coarser_dtype() -> None:
    spec = FORMULA_CASES["wan-d128"]
    small, far = tolerance(spec), tolerance(spec.replace(start_frame=4096))
    assert 0 < small <= FLOAT64_TOL  # small float64 grids: at least as strict as the formula bound
    assert far > small
    assert tolerance(spec.replace(dtype="float32")) > 1e6 * small


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("start_frame", [0, 4096])
def test_builder_within_tolerance_of_oracle(dtype: str, start_frame: int) -> None:
    spec = RopeSpec((4, 6, 8), (44, 42, 42), dtype=dtype, start_frame=start_frame)
    assert _max_err(build_table(spec), oracle_table(spec)) <= tolerance(spec)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("start_frame", [0, 4096])
def test_tolerance_rejects_a_one_frame_shift(dtype: str, start_frame: int) -> None:
    # A tolerance loose enough to accept an off-by-one time position would prove nothing.
    spec = RopeSpec((4, 6, 8), (44, 42, 42), dtype=dtype, start_frame=start_frame)
    wrong = build_table(spec.replace(start_frame=start_frame + 1))
    assert _max_err(wrong, oracle_table(spec)) > tolerance(spec)


def test_build_table_writes_into_out() -> None:
    spec = RopeSpec.for_head_dim((3, 4, 5), 16, start_frame=2)
    idx = torch.tensor([7, 0, 59, 13])
    out = (torch.full((4, spec.width), 9.0, dtype=torch.float64), torch.full((4, spec.width), 9.0, dtype=torch.float64))
    cos, sin = build_table(spec, idx, out=out)
    assert cos is out[0] and sin is out[1]
    want = build_table(spec, idx)
    assert torch.equal(cos, want[0]) and torch.equal(sin, want[1])


@pytest.mark.parametrize(
    "bad", [lambda n, w: torch.empty(n, w + 1, dtype=torch.float64), lambda n, w: torch.empty(n, w),
            lambda n, w: torch.empty(w, n, dtype=torch.float64).t()],
    ids=["shape", "dtype", "not-contiguous"],
)
def test_build_table_rejects_a_wrong_out(bad) -> None:  # type: ignore[no-untyped-def]
    spec = RopeSpec.for_head_dim((3, 4, 5), 16)
    idx = torch.arange(4)
    with pytest.raises(ValueError, match=r"^out: expected contiguous CPU \[4, 16\] float64"):
        build_table(spec, idx, out=(bad(4, spec.width), torch.empty(4, spec.width, dtype=torch.float64)))


def _axis_variants(base: RopeSpec) -> list[RopeSpec]:
    """``base`` with one thing that shapes a per-axis table changed (each axis of each field)."""
    out = [base.replace(theta=base.theta + 0.1), base.replace(start_frame=base.start_frame + 1)]
    for axis in range(3):
        grid = tuple(n + 2 if a == axis else n for a, n in enumerate(base.grid))
        out.append(base.replace(grid=grid))
        for name in ("theta_rescale_factor", "interpolation_factor"):
            values = getattr(base, name)
            out.append(base.replace(**{name: tuple(v * 1.5 if a == axis else v for a, v in enumerate(values))}))
    dims = list(base.rope_dim_list)
    dims[0], dims[1] = dims[0] + 4, dims[1] - 4
    out.append(base.replace(rope_dim_list=tuple(dims)))
    out += [base.replace(dtype="float32"), base.replace(layout="half"), base.replace(layout="neox")]
    return out


def test_per_axis_tables_built_for_one_spec_never_serve_another() -> None:
    # The builder reuses per-axis tables across builds: right after the base's build, each
    # variant's table must still be its own (judged by the independent formula).
    base = RopeSpec((4, 2, 6), (8, 12, 4), theta=500.0, theta_rescale_factor=(2.0, 1.5, 0.5),
                    interpolation_factor=(0.5, 0.75, 1.5), start_frame=3)
    tokens = ShardPlan("zigzag", axis=0).indices(base.grid, 1, 2)
    for spec in _axis_variants(base):
        build_table(base, tokens)
        for got, want in zip(build_table(spec, tokens), oracle_table(spec, tokens)):
            assert float((got.double() - want).abs().max()) <= tolerance(spec), spec
