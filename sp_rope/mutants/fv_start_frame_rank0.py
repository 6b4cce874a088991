"""start_frame added after sharding, and only on SP rank 0 (as if the offset belonged to the first chunk)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch

from sp_rope.mutants import _base

CONVENTION = "fastvideo"
EXPECTED: str | None = "slice-mismatch"
DESCRIPTION = "start_frame applied after sharding on SP rank 0 only: ranks > 0 lose the causal offset"
IMPL = "rope"
CACHE = "ROPE_CACHE"

ROPE_CACHE: dict[Hashable, _base.Table] = {}


class _Builder(_base.NdRope):
    def positions(self, call: _base.RopeCall) -> list[torch.Tensor]:
        return super().positions(call.replace(start_frame=0))  # BUG: not before sharding ...

    def local_coords(self, call: _base.RopeCall, pos: list[torch.Tensor]) -> list[torch.Tensor]:
        coords = super().local_coords(call, pos)
        if call.sp_rank == 0:  # BUG: ... but after it, on the rank that owns the first chunk only
            coords[0] = coords[0] + call.start_frame
        return coords


BUILD = _Builder()


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
    return _base.cached(ROPE_CACHE, call.key(), lambda: BUILD(call))
