"""A fixed pool of table slots for the causal blocks of one geometry, whose key -> slot map is not
invalidated on eviction: a start_frame re-entered after its slot was reused gets the table now
living in that slot (another start_frame's)."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from sp_rope.cache import RopeSlice
from sp_rope.mutants import _base
from sp_rope.sharding import ShardPlan
from sp_rope.spec import RopeSpec

CONVENTION = "native"
EXPECTED: str | None = "stale-after-eviction"
DESCRIPTION = "slot-pool cache reuses a slot but keeps the evicted key's entry, serving another key's table"
IMPL = "rope"
CACHE = "ROPE_CACHE"

MAX_ENTRIES = 3
ROPE_CACHE: dict[Hashable, int] = {}  # key -> slot
SLOTS: list[RopeSlice | None] = [None] * MAX_ENTRIES
# The geometry (key less start_frame) the pool serves, and the slot the next miss overwrites.
_pool: dict[str, Any] = {"geometry": None, "next": 0}


def rope(spec: RopeSpec, plan: ShardPlan, sp_rank: int, sp_size: int, device: str = "cpu") -> RopeSlice:
    key = _base.native_key(spec, plan, sp_rank, sp_size, device)
    geometry = _base.native_key(spec.replace(start_frame=0), plan, sp_rank, sp_size, device)
    if geometry != _pool["geometry"]:  # a new geometry: the pool starts over (correct)
        ROPE_CACHE.clear()
        SLOTS[:] = [None] * MAX_ENTRIES
        _pool.update(geometry=geometry, next=0)
    slot = ROPE_CACHE.get(key)
    if slot is not None:
        hit = SLOTS[slot]
        assert hit is not None
        return hit
    slot = _pool["next"]
    _pool["next"] = (slot + 1) % MAX_ENTRIES
    # BUG: the key that owned this slot keeps its ROPE_CACHE entry (it should be deleted here).
    value = SLOTS[slot] = _base.build_native(spec, plan, sp_rank, sp_size, device, key)
    ROPE_CACHE[key] = slot
    return value
