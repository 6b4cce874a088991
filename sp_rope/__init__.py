"""sp_rope: sharded rotary position embeddings for sequence-parallel video transformers."""

from __future__ import annotations

import torch

from .cache import CacheKey, CacheMutationError, RopeCache, RopeSlice, build_slice, default_cache
from .sharding import ShardError, ShardPlan, parse_plan
from .spec import RopeSpec, default_rope_dim_list
from .tables import build_table

__all__ = [
    "CacheKey", "CacheMutationError", "RopeCache", "RopeSlice", "RopeSpec", "ShardError", "ShardPlan",
    "build_slice", "build_table", "default_cache", "default_rope_dim_list", "parse_plan", "rope_slice",
]


def rope_slice(
    spec: RopeSpec,
    plan: ShardPlan,
    sp_rank: int,
    sp_size: int,
    device: str | torch.device = "cpu",
    cache: RopeCache | None = None,
) -> RopeSlice:
    """This rank's cos/sin slice, through ``cache`` (default: the process-wide cache)."""
    # Not ``cache or ...``: an empty RopeCache has len 0 and is falsy.
    return (cache if cache is not None else default_cache()).get(spec, plan, sp_rank, sp_size, device)
