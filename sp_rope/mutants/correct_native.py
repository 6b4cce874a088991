"""Correct ``native``-convention implementation with its own small LRU (so the check's key,
step and eviction checks apply to it)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

from sp_rope.cache import RopeSlice
from sp_rope.mutants import _base
from sp_rope.sharding import ShardPlan
from sp_rope.spec import RopeSpec

CONVENTION = "native"
EXPECTED: str | None = None
DESCRIPTION = "native slices from the formula in a 3-entry LRU keyed by spec, plan, rank, size, device"
IMPL = "rope"
CACHE = "ROPE_CACHE"

MAX_ENTRIES = 3  # small on purpose: the check's four start_frames evict and re-enter entries
ROPE_CACHE: OrderedDict[Hashable, RopeSlice] = OrderedDict()


def rope(spec: RopeSpec, plan: ShardPlan, sp_rank: int, sp_size: int, device: str = "cpu") -> RopeSlice:
    key = _base.native_key(spec, plan, sp_rank, sp_size, device)
    build = lambda: _base.build_native(spec, plan, sp_rank, sp_size, device, key)  # noqa: E731
    return _base.lru_get(ROPE_CACHE, key, build, MAX_ENTRIES)
