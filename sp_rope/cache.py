"""RopeCache: a bounded, thread-safe LRU of per-rank RoPE slices, read-only entries.

The key is every field that shapes the output (the whole frozen ``RopeSpec``, the
``ShardPlan``, ``sp_rank``, ``sp_size`` and the device), so two ranks, two SP group sizes or two
causal ``start_frame`` offsets can never share an entry. Entries are shared between callers,
so on every hit the cache checks that nobody mutated them in place (torch's version counter,
shared by the views of one allocation) and refuses to hand out a corrupted table.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace

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
    """One rank's table: ``cos``/``sin`` rows for the global token ``indices`` (-1: padding).

    ``guard``, when set, is a tensor whose version counter is shared by ``cos``, ``sin`` and
    ``indices`` (all three are views of it): one read of ``guard._version`` tells whether any of
    them was written in place. :func:`build_slice` and the cache's entries always set it.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    indices: torch.Tensor
    key: object = None
    guard: torch.Tensor | None = field(default=None, repr=False, compare=False)

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


_ALIGN = 64  # bytes; each view starts on a cache line


def _round_up(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def _layout(rows: int, width: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """Byte offsets of a packed slice's ``indices``, ``cos`` and ``sin``, and its total size."""
    table = _round_up(rows * width * dtype.itemsize)
    cos_at = _round_up(8 * rows)
    return 0, cos_at, cos_at + table, cos_at + 2 * table


def _carve(raw: torch.Tensor, rows: int, width: int, dtype: torch.dtype) -> RopeSlice:
    """``indices``, ``cos``, ``sin`` as views of the byte buffer ``raw`` (see :func:`_packed`)."""
    at = _layout(rows, width, dtype)
    indices = raw[at[0] : at[0] + 8 * rows].view(torch.int64)
    table = rows * width * dtype.itemsize
    cos, sin = (raw[a : a + table].view(dtype).view(rows, width) for a in at[1:3])
    return RopeSlice(cos, sin, indices, guard=raw)


def _packed(rows: int, width: int, dtype: torch.dtype, device: torch.device) -> RopeSlice:
    """An uninitialized slice in one allocation. Views share their base's version counter, so a
    cache hit checks one counter instead of three (the hit path is a few hundred nanoseconds)."""
    raw = torch.empty(_layout(rows, width, dtype)[3], dtype=torch.uint8, device=device)
    return _carve(raw, rows, width, dtype)


def _repacked(value: RopeSlice) -> RopeSlice:
    """A foreign builder's slice copied into one allocation on the table's device (bits unchanged),
    so the entry does not alias tensors the builder may still hold and write."""
    if value.guard is not None:
        return value
    cos, sin, indices = value.cos, value.sin, value.indices
    if cos.dim() != 2 or sin.shape != cos.shape or sin.dtype != cos.dtype or indices.numel() != cos.shape[0]:
        raise ValueError(
            f"builder returned cos {tuple(value.cos.shape)}, sin {tuple(value.sin.shape)}, "
            f"indices {tuple(value.indices.shape)}: expected [rows, width] twice and [rows]"
        )
    out = _packed(cos.shape[0], cos.shape[1], cos.dtype, cos.device)
    out.cos.copy_(cos)
    out.sin.copy_(sin)
    out.indices.copy_(indices.reshape(-1))
    return RopeSlice(out.cos, out.sin, out.indices, value.key, out.guard)


_DEVICE_NAMES: dict[str | torch.device, str] = {}


def _device_name(device: str | torch.device) -> str:
    """``str(torch.device(device))``; str and torch.device spellings are memoized in _DEVICE_NAMES
    (constructing a torch.device costs microseconds, a dict lookup tens of nanoseconds)."""
    try:
        return _DEVICE_NAMES[device]
    except (KeyError, TypeError):  # first use of this spelling, or not a str/torch.device
        pass
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
    rows = int(indices.numel())
    out = _packed(rows, spec.width, spec.torch_dtype, torch.device("cpu"))
    out.indices.copy_(indices)
    build_table(spec, indices, out=(out.cos, out.sin))
    target = torch.device(device)
    if target.type != "cpu":
        out = _carve(out.guard.to(target), rows, spec.width, spec.torch_dtype)  # type: ignore[union-attr]
    return out


class _Entry:
    __slots__ = ("value", "guard", "version", "last_used", "spec", "plan", "hash_key")

    def __init__(self, value: RopeSlice, last_used: int, hash_key: tuple) -> None:
        self.value = value
        self.spec, self.plan = value.key.spec, value.key.plan  # type: ignore[attr-defined]  # a CacheKey
        self.hash_key = hash_key
        self.guard: torch.Tensor = value.guard  # type: ignore[assignment]  # always set on entries
        self.version = self.guard._version
        self.last_used = last_used


class RopeCache:
    """LRU bounded by ``max_entries`` and ``max_bytes``; hits refresh recency.

    Hits take no lock. Under the GIL a dict read and ``next()`` on an ``itertools.count`` are
    atomic, and everything else a hit touches is owned by its entry; inserts, evictions and
    removals hold the lock. Recency is a tick from one counter, taken by every hit and every
    insert, so the hit count is exact without a shared ``+= 1``: ticks taken minus ticks
    not taken by hits. (On a free-threaded build, tables stay correct, since dict reads are
    still atomic there; the hit count and recency may be approximate.) A hit costs less than a
    plain dict memo of the arguments (``benchmarks/RESULTS.md``, figure 3).

    The read-only guard is torch's version counter, which only in-place tensor ops advance.
    Writes that bypass it are not seen: through ``.data`` (a tensor with its own counter),
    through ``.numpy()``, or into the raw storage (``untyped_storage()``, a ``data_ptr`` handed
    to C). Such an entry is served, corrupted, on every hit until it is evicted; only a caller
    that compares what it gets across calls (as the check does, step by step) notices.
    """

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
        # Keyed by the CacheKey's fields as a plain tuple (equal and equally hashed exactly when
        # the CacheKeys are); the CacheKey object itself is built only on a miss, as value.key.
        self._entries: dict[tuple, _Entry] = {}
        # The hit path's index: the same entries keyed by the hashes RopeSpec and ShardPlan keep
        # (ints, hashed in C) instead of by the objects (two Python-level __hash__ calls, ~100 ns).
        # A hit through it must still find an equal spec and plan; a hash collision keeps the
        # first entry here and leaves the other to the full-key path.
        self._by_hash: dict[tuple, _Entry] = {}
        self._lock = threading.Lock()
        self._order: list[tuple[int, int, tuple, _Entry]] = []  # eviction order, see _evict_lru
        self._pushes = itertools.count()  # breaks ties between two items of one entry
        self._clock = itertools.count()
        self._other_ticks = 0  # ticks taken by inserts and stats reads, not hits
        self._counts = CacheStats()  # everything but hits, changed under the lock

    def get(
        self, spec: RopeSpec, plan: ShardPlan, sp_rank: int, sp_size: int, device: str | torch.device = "cpu"
    ) -> RopeSlice:
        # The hit path is hot (every denoising step, every layer that asks): one dict read, two
        # identity checks, one version counter, one tick.
        dev = device if device == "cpu" else _device_name(device)
        try:
            entry = self._by_hash.get((spec._hash, plan._hash, sp_rank, sp_size, dev))  # type: ignore[attr-defined]
        except AttributeError:  # not hashed yet (a new or unpickled object): the full-key path hashes it
            entry = None
        if (
            entry is not None
            and (entry.spec is spec or entry.spec == spec)
            and (entry.plan is plan or entry.plan == plan)
            and entry.guard._version == entry.version
        ):
            entry.last_used = next(self._clock)
            return entry.value
        return self._get_locked(spec, plan, sp_rank, sp_size, dev)

    def _get_locked(self, spec: RopeSpec, plan: ShardPlan, sp_rank: int, sp_size: int, dev: str) -> RopeSlice:
        lookup = (spec, plan, sp_rank, sp_size, dev)
        with self._lock:
            entry = self._entries.get(lookup)
            if entry is not None:
                if entry.guard._version != entry.version:
                    self._remove(lookup)
                    raise CacheMutationError(
                        f"cached RoPE table for {entry.value.key} was modified in place; cache entries are read-only"
                    )
                entry.last_used = next(self._clock)  # inserted by another thread since the first look
                return entry.value
            self._counts.misses += 1
            # At the entry bound, the LRU entry goes before the build, not after: a full cache
            # never holds max_entries + 1 tables while a miss builds (a 720p slice is 74 MiB).
            while len(self._entries) >= self.max_entries:
                self._evict_lru()
        key = CacheKey(spec, plan, sp_rank, sp_size, dev)
        # Build outside the lock so threads asking for different keys do not serialize.
        value = replace(_repacked(self.builder(spec, plan, sp_rank, sp_size, dev)), key=key)
        with self._lock:
            raced = self._entries.get(lookup)
            if raced is not None:  # another thread built the same key first: share its entry
                return raced.value
            if value.nbytes > self.max_bytes:
                self._counts.uncacheable += 1
                return value
            self._other_ticks += 1
            entry = self._entries[lookup] = _Entry(value, next(self._clock), (hash(spec), hash(plan), *lookup[2:]))
            self._push(lookup, entry)
            self._by_hash.setdefault(entry.hash_key, entry)
            self._counts.bytes += value.nbytes
            while len(self._entries) > self.max_entries or self._counts.bytes > self.max_bytes:
                self._evict_lru()
        return value

    def _evict_lru(self) -> None:
        # A heap of (tick, entry) with each entry's tick when it was pushed; hits move only the
        # entry's own tick (no lock, no heap). Every live entry has an item at or below its tick,
        # so the smallest item whose tick is still its entry's is the LRU; an entry used since
        # goes back in with its new tick. O(log n) amortized instead of a scan of every entry.
        while True:
            tick, _, lookup, entry = heapq.heappop(self._order)
            if self._entries.get(lookup) is not entry:
                continue  # removed, or replaced by a later entry of the same key (with its own item)
            if entry.last_used == tick:
                break
            self._push(lookup, entry)
        self._remove(lookup)
        self._counts.evictions += 1

    def _push(self, lookup: tuple, entry: _Entry) -> None:
        heapq.heappush(self._order, (entry.last_used, next(self._pushes), lookup, entry))

    def _remove(self, lookup: tuple) -> None:
        entry = self._entries.pop(lookup)
        if self._by_hash.get(entry.hash_key) is entry:
            del self._by_hash[entry.hash_key]
        self._counts.bytes -= entry.value.nbytes

    @property
    def stats(self) -> CacheStats:
        """A snapshot of the counters."""
        with self._lock:
            ticks = next(self._clock)  # ticks taken before this one
            hits = ticks - self._other_ticks
            self._other_ticks += 1
            return replace(self._counts, hits=hits)

    def keys(self) -> list[CacheKey]:
        """Current keys, least recently used first."""
        with self._lock:
            entries = sorted(self._entries.values(), key=lambda e: e.last_used)
            return [e.value.key for e in entries]  # type: ignore[misc]  # always a CacheKey here

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._by_hash.clear()
            self._order.clear()
            self._counts.bytes = 0


_default_cache = RopeCache()


def default_cache() -> RopeCache:
    """The process-wide cache used by :func:`sp_rope.rope_slice`."""
    return _default_cache


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
