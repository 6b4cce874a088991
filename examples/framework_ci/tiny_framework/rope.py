"""Rotary position embedding for a (t, h, w) video grid under sequence parallelism.

FastVideo's calling convention: ``rope(...)`` returns this rank's cos/sin rows and caches them in
the module-level ``CACHE`` across denoising steps; with ``do_sp_sharding`` each rank of the SP
group (``get_sp_group()``) holds a contiguous block of the ``shard_dim`` axis.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

Tables = tuple[torch.Tensor, torch.Tensor]
CACHE: dict[Hashable, Tables] = {}


@dataclass(frozen=True)
class SpGroup:
    rank_in_group: int = 0
    world_size: int = 1


def get_sp_group() -> SpGroup:
    """The sequence-parallel group of this process (one process, no parallelism, here)."""
    return SpGroup()


@dataclass(frozen=True)
class RopeCall:
    """Everything that shapes one table (and so belongs in its cache key)."""

    rope_sizes: tuple[int, ...]
    rope_dim_list: tuple[int, ...]
    theta: float
    rescale: tuple[float, ...]
    interpolation: tuple[float, ...]
    shard_dim: int
    sp_rank: int
    sp_world_size: int
    dtype: torch.dtype
    start_frame: int
    use_real: bool


def rope_call(
    sp_group: Callable[[], Any],
    rope_sizes: Sequence[int],
    hidden_size: int,
    heads_num: int,
    rope_dim_list: Sequence[int] | None,
    rope_theta: float,
    theta_rescale_factor: Any = 1.0,
    interpolation_factor: Any = 1.0,
    shard_dim: int = 0,
    do_sp_sharding: bool = False,
    dtype: torch.dtype = torch.float32,
    start_frame: int = 0,
    use_real: bool = True,
) -> RopeCall:
    """``rope``'s arguments, checked and normalized; the SP group is asked only when sharding."""
    ndim = len(rope_sizes)
    head_dim = hidden_size // heads_num
    dims = tuple(rope_dim_list) if rope_dim_list is not None else (head_dim // ndim,) * ndim
    if len(dims) != ndim or sum(dims) != head_dim:
        raise ValueError(f"rope_dim_list {dims} does not split head dim {head_dim} over {ndim} axes")
    group = sp_group() if do_sp_sharding else SpGroup()
    return RopeCall(
        tuple(int(s) for s in rope_sizes), dims, float(rope_theta), _per_axis(theta_rescale_factor, ndim),
        _per_axis(interpolation_factor, ndim), int(shard_dim), group.rank_in_group, group.world_size, dtype,
        int(start_frame), bool(use_real),
    )  # fmt: skip


def _per_axis(value: Any, ndim: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),)
    return values * ndim if len(values) == 1 else values


def _inv_freq(d: int, theta: float, rescale: float, dtype: torch.dtype) -> torch.Tensor:
    if rescale != 1.0:  # NTK-aware scaling stretches the base
        theta = theta * rescale ** (d / (d - 2))
    return 1.0 / theta ** (torch.arange(0, d, 2)[: d // 2].to(dtype) / d)


def build_tables(call: RopeCall) -> Tables:
    """cos/sin rows of the rank's tokens, row-major over its block of the grid; ``use_real``:
    each frequency repeated for its pair of channels, else one column per frequency."""
    positions = [torch.arange(n, dtype=torch.float32) for n in call.rope_sizes]
    positions[0] += call.start_frame  # a causal block's first frame: shifted before sharding
    if call.sp_world_size > 1:
        n = call.rope_sizes[call.shard_dim]
        if n % call.sp_world_size:
            raise ValueError(f"axis {call.shard_dim} of size {n} does not split over {call.sp_world_size} ranks")
        step = n // call.sp_world_size
        positions[call.shard_dim] = positions[call.shard_dim][call.sp_rank * step : (call.sp_rank + 1) * step]
    coords = [c.reshape(-1) for c in torch.meshgrid(*positions, indexing="ij")]
    angles = torch.cat(
        [
            torch.outer(coords[a] * call.interpolation[a], _inv_freq(d, call.theta, call.rescale[a], call.dtype))
            for a, d in enumerate(call.rope_dim_list)
        ],
        dim=1,
    )
    cos, sin = angles.cos(), angles.sin()
    if call.use_real:
        return cos.repeat_interleave(2, dim=1), sin.repeat_interleave(2, dim=1)
    return cos, sin


def rope(
    rope_sizes: Sequence[int],
    hidden_size: int,
    heads_num: int,
    rope_dim_list: Sequence[int] | None,
    rope_theta: float,
    theta_rescale_factor: Any = 1.0,
    interpolation_factor: Any = 1.0,
    shard_dim: int = 0,
    do_sp_sharding: bool = False,
    dtype: torch.dtype = torch.float32,
    start_frame: int = 0,
    use_real: bool = True,
) -> Tables:
    """This rank's ``(cos, sin)``, cached under every field that shapes it."""
    call = rope_call(
        get_sp_group, rope_sizes, hidden_size, heads_num, rope_dim_list, rope_theta, theta_rescale_factor,
        interpolation_factor, shard_dim, do_sp_sharding, dtype, start_frame, use_real,
    )  # fmt: skip
    if call not in CACHE:
        CACHE[call] = build_tables(call)
    return CACHE[call]
