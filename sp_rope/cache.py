"""RopeCache: a bounded, thread-safe LRU of per-rank RoPE slices, read-only entries.

The key is every field that shapes the output (the whole frozen ``RopeSpec``, the
``ShardPlan``, ``sp_rank``, ``sp_size`` and the device), so two ranks, two SP group sizes or two
causal ``start_frame`` offsets can never share an entry. Entries are shared between callers,
so on every hit the cache checks that nobody mutated them in place (torch's per-tensor
``_version`` counter) and refuses to hand out a corrupted table.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .sharding import ShardPlan
from .spec import RopeSpec
from .tables import build_table

DEFAULT_MAX_ENTRIES = 256
DEFAULT_MAX_BYTES = 2 * 1024**3  # about 13 float64 Wan-720p full tables (cos + sin)


class CacheMutationError(RuntimeError):
    """A cached table was modified in place after it was handed out."""


@dataclass(frozen=True)
class CacheKey:
    spec: RopeSpec
    plan: ShardPlan
    sp_rank: int
    sp_size: int
    device: str


@dataclass(frozen=True)
class RopeSlice:
    """One rank's table: ``cos``/``sin`` rows for the global token ``indices`` (-1: padding)."""

    cos: torch.Tensor
    sin: torch.Tensor
    indices: torch.Tensor
    key: object = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.cos, self.sin, self.indices))


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes: int = 0
    uncacheable: int = 0  # single entries larger than the byte budget, returned but not kept


@dataclass
class _Entry:
    value: RopeSlice
    versions: tuple[int, ...] = field(default_factory=tuple)


def _versions(value: RopeSlice) -> tuple[int, ...]:
    return (value.cos._version, value.sin._version, value.indices._version)


_DEVICE_NAMES: dict[str | torch.device, str] = {}


def _device_name(device: str | torch.device) -> str:
    """``str(torch.device(device))``; str and torch.device spellings are memoized in _DEVICE_NAMES
    (constructing a torch.device costs microseconds, a dict lookup tens of nanoseconds)."""
    name = str(torch.device(device))
    if isinstance(device, (str, torch.device)) and len(_DEVICE_NAMES) < 64:
        _DEVICE_NAMES[device] = name
    return name


def build_slice(spec: RopeSpec, plan: ShardPlan, sp_rank: int, sp_size: int, device: str = "cpu") -> RopeSlice:
    """Build one rank's slice, uncached: only the rank's rows are ever materialized.

    Tables are built on the CPU and then moved, so a device table is bit-identical to the
    CPU (and golden) one; GPU cos/sin kernels are not bit-identical to CPU libm.
    """
    indices = plan.indices(spec.grid, sp_rank, sp_size)
    cos, sin = build_table(spec, indices)
    target = torch.device(device)
    if target.type != "cpu":
        cos, sin, indices = (t.to(target) for t in (cos, sin, indices))
    return RopeSlice(cos, sin, indices)


class RopeCache:
    """LRU bounded by ``max_entries`` and ``max_bytes``; hits refresh recency."""

    def __init__(
        self,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        builder: Callable[[RopeSpec, ShardPlan, int, int, str], RopeSlice] = build_slice,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.builder = builder  # what a miss calls; sp_rope's builder unless wrapping another one
        self.stats = CacheStats()
        # Keyed by the CacheKey's fields as a tuple; each entry's value.key is its CacheKey.
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        # The entry last inserted or moved to the end. A hit on it skips move_to_end (which hashes
        # the key again); a removed entry can never be hit, so a stale _mru is harmless.
        self._mru: _Entry | None = None
        self._lock = threading.Lock()

    def get(
        self, spec: RopeSpec, plan: ShardPlan, sp_rank: int, sp_size: int, device: str | torch.device = "cpu"
    ) -> RopeSlice:
        # The hit path is hot (every denoising step, every layer that asks): the lookup key is a
        # plain tuple of the same five fields a CacheKey holds (equal and equally hashed exactly
        # when the CacheKeys are), and the CacheKey object itself is only built on a miss.
        try:
            dev = _DEVICE_NAMES[device]
        except (KeyError, TypeError):  # first use of this spelling, or not a str/torch.device
            dev = _device_name(device)
        lookup = (spec, plan, sp_rank, sp_size, dev)
        entries = self._entries
        with self._lock:
            entry = entries.get(lookup)
            if entry is not None:
                value = entry.value
                if (value.cos._version, value.sin._version, value.indices._version) != entry.versions:
                    del entries[lookup]
                    self.stats.bytes -= value.nbytes
                    raise CacheMutationError(
                        f"cached RoPE table for {value.key} was modified in place; cache entries are read-only"
                    )
                if entry is not self._mru:  # already the most recent: its position is right
                    entries.move_to_end(lookup)
                    self._mru = entry
                self.stats.hits += 1
                return value
            self.stats.misses += 1
        key = CacheKey(spec, plan, sp_rank, sp_size, dev)
        # Build outside the lock so threads asking for different keys do not serialize.
        built = self.builder(spec, plan, sp_rank, sp_size, dev)
        value = RopeSlice(built.cos, built.sin, built.indices, key)
        with self._lock:
            raced = self._entries.get(lookup)
            if raced is not None:  # another thread built the same key first: share its entry
                return raced.value
            if value.nbytes > self.max_bytes:
                self.stats.uncacheable += 1
                return value
            self._entries[lookup] = self._mru = _Entry(value, _versions(value))
            self.stats.bytes += value.nbytes
            self._evict()
        return value

    def _evict(self) -> None:
        while len(self._entries) > self.max_entries or self.stats.bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.stats.bytes -= old.value.nbytes
            self.stats.evictions += 1

    def keys(self) -> list[CacheKey]:
        """Current keys, least recently used first."""
        with self._lock:
            return [entry.value.key for entry in self._entries.values()]  # type: ignore[misc]  # always a CacheKey here

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.stats.bytes = 0


_default_cache = RopeCache()


def default_cache() -> RopeCache:
    """The process-wide cache used by :func:`sp_rope.rope_slice`."""
    return _default_cache
