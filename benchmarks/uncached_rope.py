"""An implementation that caches nothing (native protocol): every call builds a new slice.

Figure 7 runs the check against it to measure the check's own memory: with sp_rope's default
implementation a rank also holds that implementation's cache (up to 3 slices)."""

from __future__ import annotations

from sp_rope.cache import RopeSlice, build_slice
from sp_rope.sharding import ShardPlan
from sp_rope.spec import RopeSpec


def rope(spec: RopeSpec, plan: ShardPlan, sp_rank: int, sp_size: int, device: str) -> RopeSlice:
    return build_slice(spec, plan, sp_rank, sp_size, device)
