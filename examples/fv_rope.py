"""A FastVideo-style rotary embedding for sequence parallelism (a stand-in for your framework's).

``rope(...)`` returns the cos/sin rows of this rank's tokens of a (t, h, w) grid and caches them
in ``CACHE`` across denoising steps. Under sequence parallelism each rank holds a contiguous block
of ``shard_dim``; the rank comes from ``get_sp_group()``.

``BUG=1`` in the environment drops the SP rank from the cache key, the classic bug: ranks of one
SP group then share an entry. It is here so the example can show what a failure looks like.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

CACHE: dict[Hashable, tuple[torch.Tensor, torch.Tensor]] = {}


@dataclass(frozen=True)
class SpGroup:
    rank_in_group: int = 0
    world_size: int = 1


def get_sp_group() -> SpGroup:
    """The sequence-parallel group; a real framework asks its distributed state."""
    return SpGroup()


def per_axis(value: Any, ndim: int) -> tuple[float, ...]:
    """A factor given once for all axes or once per axis, as one float per axis."""
    values = tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),)
    return values * ndim if len(values) == 1 else values


def axis_freqs(d: int, theta: float, rescale: float, dtype: torch.dtype) -> torch.Tensor:
    """``d/2`` inverse frequencies of one axis in ``dtype``; NTK rescale stretches theta."""
    if rescale != 1.0:
        theta = theta * rescale ** (d / (d - 2))
    return 1.0 / theta ** (torch.arange(0, d, 2)[: d // 2].to(dtype) / d)


@dataclass(frozen=True)
class RopeCall:
    """Everything that shapes one table: its fields are the cache key."""

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


def build_tables(call: RopeCall) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of this rank's tokens, row-major over its block of the grid."""
    positions = [torch.arange(size, dtype=torch.float32) for size in call.rope_sizes]
    positions[0] = positions[0] + call.start_frame  # causal offset: before sharding
    if call.sp_world_size > 1:
        size = call.rope_sizes[call.shard_dim]
        if size % call.sp_world_size:
            raise ValueError(f"rope_sizes[{call.shard_dim}] = {size} does not split over {call.sp_world_size} ranks")
        block = size // call.sp_world_size
        positions[call.shard_dim] = positions[call.shard_dim][call.sp_rank * block : (call.sp_rank + 1) * block]
    coords = [c.reshape(-1) for c in torch.meshgrid(*positions, indexing="ij")]
    angles = torch.cat(
        [
            torch.outer(coords[a] * call.interpolation[a], axis_freqs(d, call.theta, call.rescale[a], call.dtype))
            for a, d in enumerate(call.rope_dim_list)
        ],
        dim=1,
    )
    cos, sin = angles.cos(), angles.sin()
    if call.use_real:  # interleaved: each frequency's cos/sin repeated for its pair of channels
        cos, sin = cos.repeat_interleave(2, dim=1), sin.repeat_interleave(2, dim=1)
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's ``(cos, sin)``: ``[tokens, head_dim]``, or ``head_dim/2`` wide when not ``use_real``."""
    ndim = len(rope_sizes)
    head_dim = hidden_size // heads_num
    dims = tuple(rope_dim_list) if rope_dim_list is not None else (head_dim // ndim,) * ndim
    if sum(dims) != head_dim or len(dims) != ndim:
        raise ValueError(f"rope_dim_list {dims} does not split head dim {head_dim} over {ndim} axes")
    group = get_sp_group() if do_sp_sharding else SpGroup()
    call = RopeCall(
        tuple(rope_sizes), dims, float(rope_theta), per_axis(theta_rescale_factor, ndim),
        per_axis(interpolation_factor, ndim), shard_dim, group.rank_in_group, group.world_size, dtype,
        start_frame, use_real,
    )  # fmt: skip
    key: Hashable = call
    if os.environ.get("BUG") == "1":
        key = tuple(v for name, v in vars(call).items() if name != "sp_rank")
    if key not in CACHE:
        CACHE[key] = build_tables(call)
    return CACHE[key]
