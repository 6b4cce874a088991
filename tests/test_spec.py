"""RopeSpec: validation (errors name the field), normalization, hashing, default dim split."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from sp_rope import RopeSpec, build_table, default_rope_dim_list


def _spec(**changes: object) -> RopeSpec:
    fields: dict[str, object] = {"grid": (4, 6, 8), "rope_dim_list": (8, 4, 4)}
    fields.update(changes)
    return RopeSpec(**fields)  # type: ignore[arg-type]


# (field changes, the field name the ValueError message must mention)
INVALID = {
    "odd-axis-dim": ({"rope_dim_list": (8, 3, 4)}, "rope_dim_list"),
    "zero-axis-dim": ({"rope_dim_list": (8, 0, 4)}, "rope_dim_list"),
    "dims-count-short": ({"rope_dim_list": (8, 4)}, "rope_dim_list"),
    "dims-count-long": ({"rope_dim_list": (8, 4, 4, 2)}, "rope_dim_list"),
    "dims-not-a-list": ({"rope_dim_list": 16}, "rope_dim_list"),
    "negative-size": ({"grid": (4, -6, 8)}, "grid"),
    "zero-size": ({"grid": (0, 6, 8)}, "grid"),
    "float-size": ({"grid": (4.0, 6, 8)}, "grid"),
    "no-axes": ({"grid": (), "rope_dim_list": ()}, "grid"),
    "four-axes": ({"grid": (2, 2, 2, 2), "rope_dim_list": (2, 2, 2, 2)}, "grid"),
    "negative-start-frame": ({"start_frame": -1}, "start_frame"),
    "float-start-frame": ({"start_frame": 1.0}, "start_frame"),
    "start-frame-past-float32-integers": ({"start_frame": 2**24}, "start_frame"),
    "unknown-dtype": ({"dtype": "float16"}, "dtype"),
    "torch-dtype-object": ({"dtype": torch.float64}, "dtype"),
    "unknown-layout": ({"layout": "rotate_half"}, "layout"),
    "two-rescale-factors-for-three-axes": ({"theta_rescale_factor": [1.0, 2.0]}, "theta_rescale_factor"),
    "four-interp-factors-for-three-axes": (
        {"interpolation_factor": [1.0, 1.0, 1.0, 1.0]},
        "interpolation_factor",
    ),
    "zero-interp-factor": ({"interpolation_factor": [1.0, 0.0, 1.0]}, "interpolation_factor"),
    "nan-rescale-factor": ({"theta_rescale_factor": float("nan")}, "theta_rescale_factor"),
    "string-interp-factor": ({"interpolation_factor": "1.0"}, "interpolation_factor"),
    "theta-not-above-one": ({"theta": 1.0}, "theta"),
    "theta-infinite": ({"theta": float("inf")}, "theta"),
    # theta * r ** (d / (d - 2)) divides by zero for d == 2: refuse it up front.
    "rescale-on-dim-2-axis": (
        {"rope_dim_list": (8, 2, 4), "theta_rescale_factor": 2.0},
        "theta_rescale_factor",
    ),
}


@pytest.mark.parametrize(("changes", "field"), list(INVALID.values()), ids=list(INVALID))
def test_invalid_spec_raises_value_error_naming_the_field(changes: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        _spec(**changes)


def test_valid_base_spec_is_accepted() -> None:
    # Guards the table above: every failure there comes from its one changed field.
    spec = _spec()
    assert spec.head_dim == 16 and spec.num_tokens == 4 * 6 * 8


def test_dim_2_axis_without_rescale_builds() -> None:
    cos, sin = build_table(_spec(rope_dim_list=(8, 2, 4)))
    assert cos.shape == (4 * 6 * 8, 14)
    assert torch.isfinite(cos).all() and torch.isfinite(sin).all()


def test_spec_is_frozen() -> None:
    spec = _spec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.start_frame = 3  # type: ignore[misc]


def test_spec_is_hashable_and_equal_specs_hash_equal() -> None:
    a, b = _spec(), _spec(grid=[4, 6, 8], rope_dim_list=[8, 4, 4])  # lists normalize to tuples
    assert a == b and hash(a) == hash(b)
    assert len({a, b, _spec(start_frame=1)}) == 2


@pytest.mark.parametrize("field", ["theta_rescale_factor", "interpolation_factor"])
def test_scalar_factor_equals_per_axis_list(field: str) -> None:
    scalar, listed, single = _spec(**{field: 2.0}), _spec(**{field: [2.0, 2.0, 2.0]}), _spec(**{field: [2]})
    assert scalar == listed == single
    assert hash(scalar) == hash(listed) == hash(single)
    assert getattr(scalar, field) == (2.0, 2.0, 2.0)
    assert scalar != _spec(**{field: [2.0, 2.0, 1.0]})


def test_int_and_float_theta_give_equal_specs() -> None:
    assert _spec(theta=10000) == _spec(theta=10000.0)


@pytest.mark.parametrize(
    ("head_dim", "ndim", "expected"),
    [
        (128, 3, (44, 42, 42)),
        (96, 3, (32, 32, 32)),
        (24, 3, (8, 8, 8)),
        (128, 2, (64, 64)),
        (10, 2, (6, 4)),
        (64, 1, (64,)),
    ],
)
def test_default_rope_dim_list(head_dim: int, ndim: int, expected: tuple[int, ...]) -> None:
    assert default_rope_dim_list(head_dim, ndim) == expected
    assert sum(expected) == head_dim


@pytest.mark.parametrize(("head_dim", "ndim"), [(127, 3), (0, 3), (-2, 3), (128, 4), (128, 0)])
def test_default_rope_dim_list_rejects_bad_input(head_dim: int, ndim: int) -> None:
    with pytest.raises(ValueError):
        default_rope_dim_list(head_dim, ndim)


def test_for_head_dim_uses_default_split() -> None:
    spec = RopeSpec.for_head_dim([6, 4, 8], 128, dtype="float32")
    assert spec.rope_dim_list == (44, 42, 42) and spec.grid == (6, 4, 8) and spec.dtype == "float32"


@pytest.mark.parametrize(("layout", "width"), [("interleaved", 16), ("neox", 16), ("half", 8)])
def test_width_follows_layout(layout: str, width: int) -> None:
    assert _spec(layout=layout).width == width


@pytest.mark.parametrize(("grid", "dims"), [((7,), (16,)), ((5, 3), (8, 4))], ids=["1d", "2d"])
@pytest.mark.parametrize("layout", ["interleaved", "half", "neox"])
def test_low_dimensional_grids_build(grid: tuple[int, ...], dims: tuple[int, ...], layout: str) -> None:
    spec = RopeSpec(grid, dims, layout=layout, start_frame=2)
    cos, sin = build_table(spec)
    assert cos.shape == sin.shape == (spec.num_tokens, spec.width)
    # Column 0 is the time axis at frequency 1: the angle is the time position itself.
    assert cos[0, 0].item() == pytest.approx(math.cos(2.0), abs=1e-15)
    assert sin[-1, 0].item() == pytest.approx(math.sin(grid[0] - 1 + 2.0), abs=1e-15)


def test_replace_revalidates() -> None:
    with pytest.raises(ValueError, match="start_frame"):
        _spec().replace(start_frame=-5)
    assert _spec().replace(start_frame=5).start_frame == 5


def test_torch_dtype_maps_names() -> None:
    assert _spec(dtype="float32").torch_dtype is torch.float32
    assert _spec(dtype="float64").torch_dtype is torch.float64
