"""Angles (position x frequency) computed in float32 though float64 frequencies were declared; the
table is cast back to float64, so only its precision is wrong (worst at start_frame 4096)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from sp_rope.mutants import _base

CONVENTION = "fastvideo-nd"
EXPECTED: str | None = "oracle-mismatch"
DESCRIPTION = "angles computed in float32, then cast to the declared float64 (float32 precision)"
IMPL = "rope"
CACHE: str | None = None

class _Builder(_base.NdRope):
    def angles(self, pos: torch.Tensor, d: int, theta: float, rescale: float, interp: float,
               dtype: torch.dtype) -> torch.Tensor:
        freqs = _base.inv_freq(d, theta, rescale, dtype)
        return torch.outer(pos * interp, freqs.float()).to(dtype)  # BUG: float32 product

BUILD = _Builder()


def rope(
    rope_dim_list: Sequence[int], rope_sizes: Sequence[int], *, theta: float = 10000.0,
    theta_rescale_factor: Any = 1.0, interpolation_factor: Any = 1.0, shard_dim: int = 0, sp_rank: int = 0,
    sp_world_size: int = 1, dtype: torch.dtype = torch.float32, start_frame: int = 0, use_real: bool = True,
) -> _base.Table:
    call = _base.RopeCall.make(rope_sizes, rope_dim_list, theta, theta_rescale_factor, interpolation_factor,
                               shard_dim, sp_rank, sp_world_size, dtype, start_frame, use_real)
    return BUILD(call)
