"""Correct ``fastvideo-nd``-convention implementation: FastVideo's cache-less
``get_nd_rotary_pos_embed`` (the check wraps it in sp_rope's own cache)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from sp_rope.mutants import _base

CONVENTION = "fastvideo-nd"
EXPECTED: str | None = None
DESCRIPTION = "FastVideo's N-D RoPE builder: start_frame before sharding, contiguous shard_dim block"
IMPL = "rope"
CACHE: str | None = None


def rope(
    rope_dim_list: Sequence[int], rope_sizes: Sequence[int], *, theta: float = 10000.0,
    theta_rescale_factor: Any = 1.0, interpolation_factor: Any = 1.0, shard_dim: int = 0, sp_rank: int = 0,
    sp_world_size: int = 1, dtype: torch.dtype = torch.float32, start_frame: int = 0, use_real: bool = True,
) -> _base.Table:
    call = _base.RopeCall.make(rope_sizes, rope_dim_list, theta, theta_rescale_factor, interpolation_factor,
                               shard_dim, sp_rank, sp_world_size, dtype, start_frame, use_real)
    return _base.ND(call)
