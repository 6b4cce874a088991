"""Flattened-sequence split (xDiT/diffusers style) where an axis split was declared: the same as a
T split, but not an H or W split."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from sp_rope.mutants import _base

CONVENTION = "fastvideo-nd"
EXPECTED: str | None = "slice-mismatch"
DESCRIPTION = "splits the flattened sequence into P chunks where a contiguous shard_dim block was declared"
IMPL = "rope"
CACHE: str | None = None

class _Builder(_base.NdRope):
    def local_coords(self, call: _base.RopeCall, pos: list[torch.Tensor]) -> list[torch.Tensor]:
        coords = [m.reshape(-1) for m in torch.meshgrid(*pos, indexing="ij")]
        # BUG: a contiguous chunk of the flattened sequence, not a block of call.shard_dim
        return [c.tensor_split(call.sp_world_size)[call.sp_rank] for c in coords]

BUILD = _Builder()


def rope(
    rope_dim_list: Sequence[int], rope_sizes: Sequence[int], *, theta: float = 10000.0,
    theta_rescale_factor: Any = 1.0, interpolation_factor: Any = 1.0, shard_dim: int = 0, sp_rank: int = 0,
    sp_world_size: int = 1, dtype: torch.dtype = torch.float32, start_frame: int = 0, use_real: bool = True,
) -> _base.Table:
    call = _base.RopeCall.make(rope_sizes, rope_dim_list, theta, theta_rescale_factor, interpolation_factor,
                               shard_dim, sp_rank, sp_world_size, dtype, start_frame, use_real)
    return BUILD(call)
