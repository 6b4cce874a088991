"""flat:pad with the padding at the wrong end: the sequence is padded at its start (left padding),
so every rank's block is shifted by the pad count and rank 0 holds the padding rows."""

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
EXPECTED: str | None = "apply-mismatch"
DESCRIPTION = "flat:pad padding rows placed at the start of the sequence instead of its end"
IMPL = "rope"
CACHE = "ROPE_CACHE"

MAX_ENTRIES = 3
ROPE_CACHE: OrderedDict[Hashable, RopeSlice] = OrderedDict()


def _indices(plan: ShardPlan, grid: tuple[int, ...], sp_rank: int, sp_size: int) -> torch.Tensor:
    if str(plan) != "flat:pad" or sp_size == 1:
        return plan.indices(grid, sp_rank, sp_size)
    total = math.prod(grid)
    n = -(-total // sp_size)
    pad = n * sp_size - total
    idx = torch.arange(sp_rank * n, (sp_rank + 1) * n) - pad  # BUG: pad rows first, not last
    return torch.where(idx >= 0, idx, -1)


def rope(spec: RopeSpec, plan: ShardPlan, sp_rank: int, sp_size: int, device: str = "cpu") -> RopeSlice:
    key = _base.native_key(spec, plan, sp_rank, sp_size, device)
    build = lambda: _base.build_native(spec, plan, sp_rank, sp_size, device, key, _indices)  # noqa: E731
    return _base.lru_get(ROPE_CACHE, key, build, MAX_ENTRIES)
