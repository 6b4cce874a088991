"""The ``native`` convention: ``rope(spec, plan, sp_rank, sp_size, device) -> RopeSlice``.

``NativeRope`` is the correct implementation; each field is one step a bug can live in: which
key fields the cache forgets, which tokens a rank builds rows for, and how entries are stored.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch

from sp_rope.cache import RopeSlice
from sp_rope.mutants import Row, register
from sp_rope.mutants._base import rows_table
from sp_rope.sharding import ShardError, ShardPlan, flat, zigzag
from sp_rope.spec import RopeSpec

Key = tuple[tuple[str, Hashable], ...]
IndexFn = Callable[[ShardPlan, tuple[int, ...], int, int], torch.Tensor]


def key_fields(spec: RopeSpec, plan: ShardPlan, sp_rank: int, sp_size: int, device: str) -> dict[str, Hashable]:
    """Everything that shapes one rank's slice, named as ``sp_rope.probe`` names its fields."""
    fields: dict[str, Hashable] = {
        "sp_rank": sp_rank, "sp_size": sp_size, "scheme": (plan.scheme, plan.mode, plan.ring), "shard axis": plan.axis,
        "start_frame": spec.start_frame, "dtype": spec.dtype, "layout": spec.layout,
        "rope_dim_list": spec.rope_dim_list, "theta": spec.theta, "device": str(torch.device(device)),
    }
    fields.update({f"grid[{a}]": size for a, size in enumerate(spec.grid)})
    for name in ("theta_rescale_factor", "interpolation_factor"):
        fields.update({f"{name}[{a}]": value for a, value in enumerate(getattr(spec, name))})
    return fields


class Store(Protocol):
    @property
    def cache(self) -> Mapping[Key, object]:  # the mapping the check watches (--impl-cache)
        ...

    def get(self, key: Key, build: Callable[[], RopeSlice]) -> RopeSlice: ...


class LruStore:
    """A small LRU: hits refresh recency; the least recently used entry goes first."""

    def __init__(self, max_entries: int = 3) -> None:
        self.max_entries = max_entries
        self.cache: OrderedDict[Key, RopeSlice] = OrderedDict()

    def get(self, key: Key, build: Callable[[], RopeSlice]) -> RopeSlice:
        hit = self.cache.get(key)
        if hit is not None:
            self.cache.move_to_end(key)
            return hit
        value = self.cache[key] = build()
        while len(self.cache) > self.max_entries:
            self.cache.popitem(last=False)
        return value


@dataclass
class NativeRope:
    """Rows from the formula for the plan's tokens, cached under every field that shapes them, in
    a 3-entry LRU (small, so the check's start_frame sweep evicts and re-enters entries)."""

    forget: tuple[str, ...] = ()  # key fields (``key_fields`` names) the cache key leaves out
    indices: IndexFn = ShardPlan.indices  # which tokens the rank's rows are for
    store: Store = field(default_factory=LruStore)

    @property
    def cache(self) -> Mapping[Key, object]:
        return self.store.cache

    def __call__(self, spec: RopeSpec, plan: ShardPlan, sp_rank: int, sp_size: int, device: str = "cpu") -> RopeSlice:
        fields = key_fields(spec, plan, sp_rank, sp_size, device)
        key = tuple((name, value) for name, value in fields.items() if name not in self.forget)

        def build() -> RopeSlice:
            tokens = self.indices(plan, spec.grid, sp_rank, sp_size)
            cos, sin = rows_table(spec, tokens)  # on the CPU (CPU libm: the bits the golden tables pin)
            return RopeSlice(cos.to(device), sin.to(device), tokens.to(device), key)

        return self.store.get(key, build)


# ---------------------------------------------------------------------------------------------
# Deviations


def pad_at_front(plan: ShardPlan, grid: tuple[int, ...], sp_rank: int, sp_size: int) -> torch.Tensor:
    if str(plan) != "flat:pad" or sp_size == 1:
        return plan.indices(grid, sp_rank, sp_size)
    total = math.prod(grid)
    n = -(-total // sp_size)
    idx = torch.arange(sp_rank * n, (sp_rank + 1) * n) - (n * sp_size - total)  # BUG: pad rows first, not last
    return torch.where(idx >= 0, idx, -1)


def zigzag_tail_2p_minus_r(plan: ShardPlan, grid: tuple[int, ...], sp_rank: int, sp_size: int) -> torch.Tensor:
    if plan.scheme != "zigzag" or sp_size == 1:
        return plan.indices(grid, sp_rank, sp_size)
    chunks = 2 * sp_size
    tail = 2 * sp_size - sp_rank  # BUG: should be 2 * sp_size - 1 - sp_rank
    if plan.axis is None:
        n = math.prod(grid) // chunks
        return torch.cat([torch.arange(c * n, (c + 1) * n) for c in (sp_rank, tail)])
    # Blocks of one axis: flat indices are start-of-block offsets along that axis.
    n = grid[plan.axis] // chunks
    inner, outer = math.prod(grid[plan.axis + 1:]), math.prod(grid[: plan.axis])
    blocks = []
    for c in (sp_rank, tail):
        along = torch.arange(c * n, (c + 1) * n)
        idx = (torch.arange(outer)[:, None, None] * grid[plan.axis] + along[None, :, None]) * inner
        blocks.append((idx + torch.arange(inner)[None, None, :]).reshape(-1))
    return torch.cat(blocks)


def contiguous_whatever_the_plan(plan: ShardPlan, grid: tuple[int, ...], sp_rank: int, sp_size: int) -> torch.Tensor:
    return flat(grid, sp_rank, sp_size, "uneven")  # BUG: ignores the plan's permutation


def zigzag_whatever_the_plan(plan: ShardPlan, grid: tuple[int, ...], sp_rank: int, sp_size: int) -> torch.Tensor:
    try:
        return zigzag(grid, sp_rank, sp_size)  # BUG: ignores the plan actually used
    except ShardError:
        return flat(grid, sp_rank, sp_size, "uneven")


def next_rank_tokens(plan: ShardPlan, grid: tuple[int, ...], sp_rank: int, sp_size: int) -> torch.Tensor:
    return plan.indices(grid, (sp_rank + 1) % sp_size, sp_size)  # BUG: rank r builds rank r+1's tokens


class StaleSlotStore:
    """A fixed pool of table slots and a key -> slot map; a miss reuses the least recently used
    slot. ``per_geometry``: the pool serves one geometry (the key less start_frame) and starts
    over, correctly, when another comes."""

    def __init__(self, slots: int, per_geometry: bool) -> None:
        self.cache: dict[Key, int] = {}  # key -> slot
        self.slots: list[RopeSlice | None] = [None] * slots
        self.recency = list(range(slots))  # least recently used first
        self.per_geometry = per_geometry
        self.geometry: Key | None = None

    def get(self, key: Key, build: Callable[[], RopeSlice]) -> RopeSlice:
        geometry = tuple(item for item in key if item[0] != "start_frame")
        if self.per_geometry and geometry != self.geometry:
            self.cache.clear()
            self.slots = [None] * len(self.slots)
            self.geometry = geometry
        slot = self.cache.get(key)
        if slot is None:
            slot = self.recency[0]
            # BUG: the key that owned this slot keeps its entry in self.cache (it should be deleted here).
            self.slots[slot] = build()
            self.cache[key] = slot
        self.recency.remove(slot)
        self.recency.append(slot)
        value = self.slots[slot]
        assert value is not None
        return value


class StaticOutputStore(LruStore):
    """Every table copied into one output buffer per shape, the way a captured CUDA graph returns
    its static outputs. BUG: a later call rewrites the tensors handed out before."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, key: Key, build: Callable[[], RopeSlice]) -> RopeSlice:
        table = super().get(key, build)
        shape = (tuple(table.cos.shape), table.cos.dtype, table.cos.device)
        if shape not in self.outputs:
            self.outputs[shape] = (torch.empty_like(table.cos), torch.empty_like(table.sin))
        cos, sin = self.outputs[shape]
        cos.copy_(table.cos)
        sin.copy_(table.sin)
        return RopeSlice(cos, sin, table.indices, key)


ENTRIES = register(globals(), "native", [
    Row("correct_native", None,
        "native slices from the formula in a 3-entry LRU keyed by every field that shapes them", NativeRope()),
    Row("native_pad_front", "apply-mismatch",
        "flat:pad padding rows placed at the start of the sequence instead of its end",
        NativeRope(indices=pad_at_front)),
    Row("native_zigzag_2p_minus_r", "slice-mismatch",
        "zigzag tail chunk 2P-r instead of 2P-1-r (rank 0 reads past the end, rank r>0 overlaps)",
        NativeRope(indices=zigzag_tail_2p_minus_r)),
    Row("rope_not_permuted", "apply-mismatch",
        "load-balanced (zigzag/stripe) hidden states rotated with a contiguous-split RoPE table",
        NativeRope(indices=contiguous_whatever_the_plan)),
    Row("rope_permuted_hidden_not", "apply-mismatch",
        "contiguously split hidden states rotated with a zigzag-permuted RoPE table",
        NativeRope(indices=zigzag_whatever_the_plan)),
    Row("native_next_rank_tokens", "plan-mismatch",
        "rank r returns rank r+1's tokens with their correct rows (the ranks still partition the grid)",
        NativeRope(indices=next_rank_tokens)),
    Row("native_stale_slot", "stale-after-eviction",
        "slot-pool cache reuses a slot but keeps the evicted key's entry, serving another key's table",
        NativeRope(store=StaleSlotStore(3, per_geometry=True))),
    Row("native_stale_lru32", "stale-after-eviction",
        "32-slot LRU that keeps an evicted key's slot number: re-entering it serves the slot's new table",
        NativeRope(store=StaleSlotStore(32, per_geometry=False))),
    Row("native_static_output", "overwritten-after-return",
        "tables copied into one static output buffer per shape (CUDA-graph style), rewritten by every call",
        NativeRope(store=StaticOutputStore())),
])
