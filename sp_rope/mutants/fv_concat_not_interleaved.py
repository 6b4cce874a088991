"""use_real tables laid out [c0..c_{D/2-1}, c0..c_{D/2-1}] (NeoX halves) instead of FastVideo's pairwise
[c0, c0, c1, c1, ...], in the sharded and the unsharded path alike."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch

from sp_rope.mutants import _base

CONVENTION = "fastvideo"
EXPECTED: str | None = "oracle-mismatch"
DESCRIPTION = "use_real cos/sin concatenated as two halves instead of repeat_interleave(2), in every path"
IMPL = "rope"
CACHE = "ROPE_CACHE"

ROPE_CACHE: dict[Hashable, _base.Table] = {}


class _Builder(_base.NdRope):
    def layout(self, half: torch.Tensor, use_real: bool) -> torch.Tensor:
        return torch.cat([half, half], dim=1) if use_real else half  # BUG: halves, not pairs


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
