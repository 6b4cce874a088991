"""sp_rope: sharded rotary position embeddings for sequence-parallel video transformers.

The names below load on first use, so ``import sp_rope.testing`` (and the pytest plugin that
every pytest run in an environment with sp_rope loads) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "CacheKey": "cache", "CacheMutationError": "cache", "RopeCache": "cache", "RopeSlice": "cache",
    "build_slice": "cache", "default_cache": "cache", "rope_slice": "cache",
    "ShardError": "sharding", "ShardPlan": "sharding", "parse_plan": "sharding",
    "RopeSpec": "spec", "default_rope_dim_list": "spec", "build_table": "tables",
}  # fmt: skip
__all__ = [
    "CacheKey", "CacheMutationError", "RopeCache", "RopeSlice", "RopeSpec", "ShardError", "ShardPlan",
    "build_slice", "build_table", "default_cache", "default_rope_dim_list", "parse_plan", "rope_slice",
]  # fmt: skip

if TYPE_CHECKING:
    from .cache import CacheKey, CacheMutationError, RopeCache, RopeSlice, build_slice, default_cache, rope_slice
    from .sharding import ShardError, ShardPlan, parse_plan
    from .spec import RopeSpec, default_rope_dim_list
    from .tables import build_table


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'sp_rope' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value
