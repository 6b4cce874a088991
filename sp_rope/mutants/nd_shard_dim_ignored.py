"""shard_dim ignored: the time axis is always split (floor division; only the declared axis is
checked for divisibility), so H- or W-sharded runs hand ranks T blocks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from sp_rope.mutants import _base

CONVENTION = "fastvideo-nd"
EXPECTED: str | None = "slice-mismatch"
DESCRIPTION = "shard_dim ignored: always shards the time axis, whatever axis was declared"
IMPL = "rope"
CACHE: str | None = None

class _Builder(_base.NdRope):
    def shard_axis(self, call: _base.RopeCall) -> int:
        return 0  # BUG: call.shard_dim ignored

BUILD = _Builder()


def rope(
    rope_dim_list: Sequence[int], rope_sizes: Sequence[int], *, theta: float = 10000.0,
    theta_rescale_factor: Any = 1.0, interpolation_factor: Any = 1.0, shard_dim: int = 0, sp_rank: int = 0,
    sp_world_size: int = 1, dtype: torch.dtype = torch.float32, start_frame: int = 0, use_real: bool = True,
) -> _base.Table:
    call = _base.RopeCall.make(rope_sizes, rope_dim_list, theta, theta_rescale_factor, interpolation_factor,
                               shard_dim, sp_rank, sp_world_size, dtype, start_frame, use_real)
    return BUILD(call)
