"""Correct ``fastvideo``-convention implementation: FastVideo's ``get_rotary_pos_embed`` with
its SP-group lookup and module-level table cache (the reference every fastvideo mutant bends)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch

from sp_rope.mutants import _base

CONVENTION = "fastvideo"
EXPECTED: str | None = None
DESCRIPTION = "FastVideo's cached N-D RoPE, keyed by every output-affecting field incl. SP rank/size"
IMPL = "rope"
CACHE = "ROPE_CACHE"

ROPE_CACHE: dict[Hashable, _base.Table] = {}


def get_sp_group() -> _base.SpGroup:
    """Single-process default; the check's adapter substitutes the real group per call."""
    return _base.SpGroup(rank_in_group=0, world_size=1)


def rope(
    rope_sizes: Sequence[int], hidden_size: int, heads_num: int, rope_dim_list: Sequence[int] | None,
    rope_theta: float, theta_rescale_factor: Any = 1.0, interpolation_factor: Any = 1.0,
    shard_dim: int = 0, do_sp_sharding: bool = False, dtype: torch.dtype = torch.float32,
    start_frame: int = 0, use_real: bool = True,
) -> _base.Table:
    """This rank's ``(cos, sin)``, ``[local tokens, D]`` (``D/2`` when not ``use_real``)."""
    call = _base.fastvideo_call(
        get_sp_group, rope_sizes, hidden_size, heads_num, rope_dim_list, rope_theta, theta_rescale_factor,
        interpolation_factor, shard_dim, do_sp_sharding, dtype, start_frame, use_real,
    )
    return _base.cached(ROPE_CACHE, call.key(), lambda: _base.ND(call))
