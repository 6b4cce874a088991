"""Shard start off by one (start = rank*n + 1, wrapped modulo the axis so nothing crashes): every
rank holds its block shifted by one position."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from sp_rope.mutants import _base

CONVENTION = "fastvideo-nd"
EXPECTED: str | None = "slice-mismatch"
DESCRIPTION = "shard offset off by one: rank r takes positions rank*n+1 .. (rank+1)*n (wrapping)"
IMPL = "rope"
CACHE: str | None = None

class _Builder(_base.NdRope):
    def block(self, size: int, sp_rank: int, sp_world_size: int) -> torch.Tensor:
        n = size // sp_world_size
        return (torch.arange(n) + sp_rank * n + 1) % size  # BUG: + 1

BUILD = _Builder()


def rope(
    rope_dim_list: Sequence[int], rope_sizes: Sequence[int], *, theta: float = 10000.0,
    theta_rescale_factor: Any = 1.0, interpolation_factor: Any = 1.0, shard_dim: int = 0, sp_rank: int = 0,
    sp_world_size: int = 1, dtype: torch.dtype = torch.float32, start_frame: int = 0, use_real: bool = True,
) -> _base.Table:
    call = _base.RopeCall.make(rope_sizes, rope_dim_list, theta, theta_rescale_factor, interpolation_factor,
                               shard_dim, sp_rank, sp_world_size, dtype, start_frame, use_real)
    return BUILD(call)
