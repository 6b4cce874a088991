"""Zigzag (head-tail) load balancing with the tail chunk off by one: rank r takes chunks r and 2P-r
instead of r and 2P-1-r (its own index function; rank 0's tail lies past the sequence end)."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable

import torch

from sp_rope.cache import RopeSlice
from sp_rope.mutants import _base
from sp_rope.sharding import ShardPlan
from sp_rope.spec import RopeSpec

CONVENTION = "native"
EXPECTED: str | None = "slice-mismatch"
DESCRIPTION = "zigzag tail chunk 2P-r instead of 2P-1-r (rank 0 reads past the end, rank r>0 overlaps)"
IMPL = "rope"
CACHE = "ROPE_CACHE"

MAX_ENTRIES = 3
ROPE_CACHE: OrderedDict[Hashable, RopeSlice] = OrderedDict()


def _indices(plan: ShardPlan, grid: tuple[int, ...], sp_rank: int, sp_size: int) -> torch.Tensor:
    if plan.scheme != "zigzag" or sp_size == 1:
        return plan.indices(grid, sp_rank, sp_size)
    chunks = 2 * sp_size
    tail = 2 * sp_size - sp_rank  # BUG: should be 2 * sp_size - 1 - sp_rank
    if plan.axis is None:
        n = math.prod(grid) // chunks
        return torch.cat([torch.arange(c * n, (c + 1) * n) for c in (sp_rank, tail)])
    # Blocks of one axis: flat indices are start-of-block offsets along that axis.
    n = grid[plan.axis] // chunks
    inner = math.prod(grid[plan.axis + 1:])
    outer = math.prod(grid[: plan.axis])
    blocks = []
    for c in (sp_rank, tail):
        along = torch.arange(c * n, (c + 1) * n)
        idx = (torch.arange(outer)[:, None, None] * grid[plan.axis] + along[None, :, None]) * inner
        blocks.append((idx + torch.arange(inner)[None, None, :]).reshape(-1))
    return torch.cat(blocks)


def rope(spec: RopeSpec, plan: ShardPlan, sp_rank: int, sp_size: int, device: str = "cpu") -> RopeSlice:
    key = _base.native_key(spec, plan, sp_rank, sp_size, device)
    build = lambda: _base.build_native(spec, plan, sp_rank, sp_size, device, key, _indices)  # noqa: E731
    return _base.lru_get(ROPE_CACHE, key, build, MAX_ENTRIES)
