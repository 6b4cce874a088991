"""Per-axis factor lists collapsed to their first value (theta_rescale_factor [1, 2, 2] used as the
scalar 1, interpolation [1, .5, .5] as 1): the NTK rescale and interpolation of H and W are lost."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from sp_rope.mutants import _base

CONVENTION = "fastvideo-nd"
EXPECTED: str | None = "oracle-mismatch"
DESCRIPTION = "per-axis theta_rescale/interpolation factor lists collapsed to their first value"
IMPL = "rope"
CACHE: str | None = None

class _Builder(_base.NdRope):
    def factors(self, value: _base.Factor, ndim: int) -> tuple[float, ...]:
        first = value[0] if isinstance(value, tuple) else value  # BUG: a list read as one scalar
        return (float(first),) * ndim

BUILD = _Builder()


def rope(
    rope_dim_list: Sequence[int], rope_sizes: Sequence[int], *, theta: float = 10000.0,
    theta_rescale_factor: Any = 1.0, interpolation_factor: Any = 1.0, shard_dim: int = 0, sp_rank: int = 0,
    sp_world_size: int = 1, dtype: torch.dtype = torch.float32, start_frame: int = 0, use_real: bool = True,
) -> _base.Table:
    call = _base.RopeCall.make(rope_sizes, rope_dim_list, theta, theta_rescale_factor, interpolation_factor,
                               shard_dim, sp_rank, sp_world_size, dtype, start_frame, use_real)
    return BUILD(call)
