"""Tables returned as views of a module-level workspace reused by every call of the same shape (to
save allocations): the next causal block's build overwrites tables the caller still caches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from sp_rope.mutants import _base

CONVENTION = "fastvideo-nd"
EXPECTED: str | None = "mutated-in-place"
DESCRIPTION = "returns views of a reused workspace buffer, so a later build overwrites cached tables"
IMPL = "rope"
CACHE: str | None = None

_WORKSPACE: dict[tuple[torch.dtype, tuple[int, ...]], torch.Tensor] = {}


def rope(
    rope_dim_list: Sequence[int], rope_sizes: Sequence[int], *, theta: float = 10000.0,
    theta_rescale_factor: Any = 1.0, interpolation_factor: Any = 1.0, shard_dim: int = 0, sp_rank: int = 0,
    sp_world_size: int = 1, dtype: torch.dtype = torch.float32, start_frame: int = 0, use_real: bool = True,
) -> _base.Table:
    call = _base.RopeCall.make(rope_sizes, rope_dim_list, theta, theta_rescale_factor, interpolation_factor,
                               shard_dim, sp_rank, sp_world_size, dtype, start_frame, use_real)
    cos, sin = _base.ND(call)
    shape = tuple(cos.shape)
    out = _WORKSPACE.get((cos.dtype, shape))
    if out is None:
        out = _WORKSPACE[(cos.dtype, shape)] = torch.empty((2, *shape), dtype=cos.dtype)
    # BUG: writes into the buffer whose views earlier calls handed out (and callers cached).
    out[0].copy_(cos)
    out[1].copy_(sin)
    return out[0], out[1]
