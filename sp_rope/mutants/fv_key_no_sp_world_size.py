"""FastVideo-style cache whose key omits the SP world size (it keeps do_sp_sharding): a rank that
is SP rank r in both a P=2 and a P=4 sub-group gets its P=2 slice back in the P=4 group."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch

from sp_rope.mutants import _base

CONVENTION = "fastvideo"
EXPECTED: str | None = "key-collision"
DESCRIPTION = "RoPE cache key without sp_world_size: a rank reuses its P=2 slice in a P=4 group"
IMPL = "rope"
CACHE = "ROPE_CACHE"

ROPE_CACHE: dict[Hashable, _base.Table] = {}


def get_sp_group() -> _base.SpGroup:
    return _base.SpGroup(rank_in_group=0, world_size=1)


def rope(
    rope_sizes: Sequence[int], hidden_size: int, heads_num: int, rope_dim_list: Sequence[int] | None,
    rope_theta: float, theta_rescale_factor: Any = 1.0, interpolation_factor: Any = 1.0,
    shard_dim: int = 0, do_sp_sharding: bool = False, dtype: torch.dtype = torch.float32,
    start_frame: int = 0, use_real: bool = True,
) -> _base.Table:
    call = _base.fastvideo_call(
        get_sp_group, rope_sizes, hidden_size, heads_num, rope_dim_list, rope_theta, theta_rescale_factor,
        interpolation_factor, shard_dim, do_sp_sharding, dtype, start_frame, use_real,
    )
    # BUG: the key forgets sp_world_size, so calls that differ only in it share one cache entry.
    return _base.cached(ROPE_CACHE, call.key(drop=("sp_world_size",)), lambda: _base.ND(call))
