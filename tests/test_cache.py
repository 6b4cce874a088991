"""RopeCache: complete keys, sharing, LRU + byte budget, read-only entries, thread safety."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from sp_rope import (
    CacheKey,
    CacheMutationError,
    RopeCache,
    RopeSlice,
    RopeSpec,
    ShardPlan,
    build_slice,
    default_cache,
    rope_slice,
)

BASE_SPEC = RopeSpec(
    (4, 4, 4), (8, 4, 4), theta_rescale_factor=[1.0, 1.0, 1.0], interpolation_factor=[1.0, 1.0, 1.0]
)
T_PLAN = ShardPlan("contiguous", axis=0)
BASE = (BASE_SPEC, T_PLAN, 0, 2, "cpu")  # spec, plan, sp_rank, sp_size, device


def _factor(i: int, value: float) -> list[float]:
    factors = [1.0, 1.0, 1.0]
    factors[i] = value
    return factors


# Every field that shapes the output, changed one at a time.
VARIANTS = {
    "sp_rank": (BASE_SPEC, T_PLAN, 1, 2, "cpu"),
    "sp_size": (BASE_SPEC, T_PLAN, 0, 4, "cpu"),
    "plan": (BASE_SPEC, ShardPlan("stripe"), 0, 2, "cpu"),
    "plan-axis": (BASE_SPEC, ShardPlan("contiguous", axis=1), 0, 2, "cpu"),
    "start_frame": (BASE_SPEC.replace(start_frame=1), T_PLAN, 0, 2, "cpu"),
    "dtype": (BASE_SPEC.replace(dtype="float32"), T_PLAN, 0, 2, "cpu"),
    "layout-half": (BASE_SPEC.replace(layout="half"), T_PLAN, 0, 2, "cpu"),
    "layout-neox": (BASE_SPEC.replace(layout="neox"), T_PLAN, 0, 2, "cpu"),
    "theta": (BASE_SPEC.replace(theta=500.0), T_PLAN, 0, 2, "cpu"),
    **{
        f"theta_rescale_factor[{i}]": (
            BASE_SPEC.replace(theta_rescale_factor=_factor(i, 2.0)),
            T_PLAN,
            0,
            2,
            "cpu",
        )
        for i in range(3)
    },
    **{
        f"interpolation_factor[{i}]": (
            BASE_SPEC.replace(interpolation_factor=_factor(i, 0.5)),
            T_PLAN,
            0,
            2,
            "cpu",
        )
        for i in range(3)
    },
    "rope_dim_list": (BASE_SPEC.replace(rope_dim_list=(4, 4, 8)), T_PLAN, 0, 2, "cpu"),
    "grid": (BASE_SPEC.replace(grid=(4, 4, 2)), T_PLAN, 0, 2, "cpu"),
    "device": (BASE_SPEC, T_PLAN, 0, 2, "meta"),  # a second device that exists on every machine
}


def _differs(a, b) -> bool:  # type: ignore[no-untyped-def]
    """Outputs differ in device, dtype, shape or any value of cos, sin or indices."""
    for x, y in ((a.cos, b.cos), (a.sin, b.sin), (a.indices, b.indices)):
        if x.device != y.device or x.dtype != y.dtype or x.shape != y.shape:
            return True
        if x.device.type != "meta" and not torch.equal(x, y):  # meta tensors carry no values
            return True
    return False


@pytest.mark.parametrize("field", list(VARIANTS))
def test_each_output_affecting_field_gets_its_own_entry(field: str) -> None:
    cache = RopeCache()
    base = cache.get(*BASE)
    other = cache.get(*VARIANTS[field])
    assert (cache.stats.misses, cache.stats.hits, len(cache)) == (2, 0, 2)
    assert len(set(cache.keys())) == 2
    # The field really changes the output, so sharing one entry would hand out a wrong table.
    assert _differs(base, other)
    assert not _differs(other, build_slice(*VARIANTS[field]))


def test_all_variants_are_pairwise_distinct_keys() -> None:
    cache = RopeCache()
    for args in (BASE, *VARIANTS.values()):
        cache.get(*args)
    assert len(cache) == len(VARIANTS) + 1 and cache.stats.hits == 0


def test_equal_specs_share_one_entry() -> None:
    cache = RopeCache()
    first = cache.get(*BASE)
    # Scalar factors, list inputs and a torch.device are the same key as BASE.
    same_spec = RopeSpec(
        [4, 4, 4], [8, 4, 4], theta=10000, theta_rescale_factor=1, interpolation_factor=[1.0]
    )
    second = cache.get(same_spec, ShardPlan("contiguous", axis=0), 0, 2, torch.device("cpu"))
    assert second is first
    assert (cache.stats.misses, cache.stats.hits, len(cache)) == (1, 1, 1)


def test_key_records_every_field() -> None:
    cache = RopeCache()
    piece = cache.get(*BASE)
    (key,) = cache.keys()
    assert isinstance(key, CacheKey)
    assert (key.spec, key.plan, key.sp_rank, key.sp_size, key.device) == BASE
    assert piece.key == key


def _fresh_keys(n: int) -> list[tuple]:
    return [(BASE_SPEC.replace(start_frame=i), T_PLAN, 0, 2, "cpu") for i in range(n)]


def test_lru_evicts_least_recently_used_and_hit_refreshes_recency() -> None:
    a, b, c, d = _fresh_keys(4)
    cache = RopeCache(max_entries=3)
    for args in (a, b, c):
        cache.get(*args)
    cache.get(*a)  # hit: a becomes most recent, so b is now the oldest
    cache.get(*d)
    assert [k.spec.start_frame for k in cache.keys()] == [2, 0, 3]  # c, a, d: LRU first
    assert cache.stats.evictions == 1
    cache.get(*b)  # b was evicted: a miss that evicts c
    assert [k.spec.start_frame for k in cache.keys()] == [0, 3, 1]
    assert (cache.stats.hits, cache.stats.misses, cache.stats.evictions) == (1, 5, 2)


@pytest.mark.parametrize("seed", range(5))
def test_eviction_follows_exact_lru_order_over_random_traffic(seed: int) -> None:
    """Hits, misses and evictions in a random order keep the cache's contents equal to a plain
    LRU list's (the eviction order is kept lazily, so entries hit long after insertion and
    entries inserted after them must still leave in recency order)."""
    rng = random.Random(seed)
    keys = _fresh_keys(12)
    cache = RopeCache(max_entries=5)
    lru: list[int] = []  # start_frames, least recently used first
    for _ in range(400):
        sf = rng.choice([rng.randrange(12), *(lru[-3:] or [0])])  # favour recent keys: many hits
        cache.get(*keys[sf])
        if sf in lru:
            lru.remove(sf)
        elif len(lru) == 5:
            lru.pop(0)
        lru.append(sf)
        assert [k.spec.start_frame for k in cache.keys()] == lru


def test_byte_budget_is_never_exceeded() -> None:
    keys = _fresh_keys(6)
    entry_bytes = build_slice(*keys[0]).nbytes  # every key here has the same size
    cache = RopeCache(max_entries=100, max_bytes=int(2.5 * entry_bytes))
    for step, args in enumerate(keys + keys[::-1]):
        cache.get(*args)
        assert cache.stats.bytes <= cache.max_bytes, f"over budget after call {step}"
        assert cache.stats.bytes == len(cache) * entry_bytes
        assert len(cache) <= 2
    # 6 fills, then the reversed pass hits keys[5], keys[4] and refills 4 more.
    assert (cache.stats.hits, cache.stats.misses, cache.stats.evictions) == (2, 10, 8)


def test_mixed_size_entries_respect_byte_budget() -> None:
    small, big = (BASE_SPEC, T_PLAN, 0, 4, "cpu"), (BASE_SPEC, T_PLAN, 0, 1, "cpu")
    small_bytes, big_bytes = build_slice(*small).nbytes, build_slice(*big).nbytes
    cache = RopeCache(max_bytes=big_bytes + small_bytes // 2)
    cache.get(*small)
    cache.get(*big)  # both would exceed the budget: the older, small entry goes
    assert [k.sp_size for k in cache.keys()] == [1]
    assert cache.stats.bytes == big_bytes <= cache.max_bytes and cache.stats.evictions == 1


def test_oversize_entry_is_returned_but_not_kept() -> None:
    entry_bytes = build_slice(*BASE).nbytes
    cache = RopeCache(max_bytes=entry_bytes - 1)
    kept = cache.get(*_fresh_keys(1)[0])  # also too big: shows the cache stays empty, not evicting
    piece = cache.get(*BASE)
    assert not _differs(piece, build_slice(*BASE))
    assert len(cache) == 0 and cache.stats.bytes == 0
    assert cache.stats.uncacheable == 2 and cache.stats.evictions == 0
    cache.get(*BASE)  # not kept, so a miss again
    assert cache.stats.misses == 3 and cache.stats.hits == 0
    assert kept.cos.shape == piece.cos.shape


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda p: p.cos.mul_(2), id="cos-mul_"),
        pytest.param(lambda p: p.sin.view(-1)[:3].add_(1), id="sin-through-view"),
        pytest.param(lambda p: p.cos[1:, :2].zero_(), id="cos-through-slice"),
        pytest.param(lambda p: p.indices.add_(1), id="indices"),
        pytest.param(lambda p: p.cos.copy_(p.cos.clone()), id="same-values-copy"),
    ],
)
def test_in_place_mutation_is_detected(mutate) -> None:  # type: ignore[no-untyped-def]
    cache = RopeCache()
    mutate(cache.get(*BASE))
    with pytest.raises(CacheMutationError):
        cache.get(*BASE)
    # The corrupted entry is dropped: the next call rebuilds a correct table.
    assert len(cache) == 0 and cache.stats.bytes == 0
    fresh = cache.get(*BASE)
    assert not _differs(fresh, build_slice(*BASE))
    assert cache.get(*BASE) is fresh


def test_reading_an_entry_is_not_a_mutation() -> None:
    cache = RopeCache()
    piece = cache.get(*BASE)
    _ = piece.cos.sum(), piece.sin.clone(), piece.cos[0], torch.equal(piece.cos, piece.cos), piece.cos * 2
    assert cache.get(*BASE) is piece and cache.stats.hits == 1


def test_clear_empties_the_cache() -> None:
    cache = RopeCache()
    for args in _fresh_keys(3):
        cache.get(*args)
    cache.clear()
    assert len(cache) == 0 and cache.keys() == [] and cache.stats.bytes == 0


@pytest.mark.parametrize("kwargs", [{"max_entries": 0}, {"max_bytes": 0}])
def test_cache_limits_must_be_positive(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        RopeCache(**kwargs)


def test_rope_slice_uses_given_cache_and_default_cache() -> None:
    mine = RopeCache()
    piece = rope_slice(*BASE, cache=mine)
    assert rope_slice(*BASE, cache=mine) is piece and mine.stats.hits == 1
    spec = BASE_SPEC.replace(start_frame=12345)  # a key no other test puts in the process-wide cache
    misses = default_cache().stats.misses
    shared = rope_slice(spec, T_PLAN, 0, 2)
    assert rope_slice(spec, T_PLAN, 0, 2) is shared
    assert default_cache().stats.misses == misses + 1


# ---------------------------------------------------------------------------------------------
# Concurrency: 8 threads x 10,000 mixed calls, every returned table verified.
# ---------------------------------------------------------------------------------------------

THREADS, CALLS = 8, 10_000
THREAD_KEYS = [
    (BASE_SPEC.replace(start_frame=sf, layout=layout), plan, rank, 4, "cpu")
    for sf in (0, 3)
    for layout in ("interleaved", "half")
    for plan in (T_PLAN, ShardPlan("stripe"))
    for rank in (0, 3)
]  # 16 keys: small enough that hits dominate


def _hammer(cache: RopeCache, calls: int = CALLS) -> tuple[list[str], list[set[int]]]:
    """Run the mixed workload; return failures and, per key, the ids of the cos tensors handed out."""
    expected = [build_slice(*args) for args in THREAD_KEYS]
    seen: list[set[int]] = [set() for _ in THREAD_KEYS]
    failures: list[str] = []
    start = threading.Barrier(THREADS)

    def work(seed: int) -> None:
        rng = random.Random(seed)
        start.wait()
        try:
            for _ in range(calls):
                k = rng.randrange(len(THREAD_KEYS))
                got = cache.get(*THREAD_KEYS[k])
                want = expected[k]
                if not (
                    torch.equal(got.cos, want.cos)
                    and torch.equal(got.sin, want.sin)
                    and torch.equal(got.indices, want.indices)
                ):
                    failures.append(f"thread {seed}: wrong table for key {k}")
                    return
                seen[k].add(id(got.cos))  # set.add is atomic under the GIL
        except Exception as exc:  # noqa: BLE001 - report any error from a worker thread
            failures.append(f"thread {seed}: {exc!r}")

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failures, seen


def test_threads_share_entries_and_get_correct_tables() -> None:
    cache = RopeCache()
    failures, seen = _hammer(cache)
    assert not failures, failures[:5]
    assert cache.stats.hits + cache.stats.misses == THREADS * CALLS
    # Racing misses for one key all end up with the entry that was stored first.
    assert all(len(ids) == 1 for ids in seen)
    assert len(cache) == len(THREAD_KEYS) and cache.stats.evictions == 0
    assert cache.stats.misses <= THREADS * len(THREAD_KEYS)  # at most one build per thread and key


def test_threads_with_evictions_stay_correct_and_within_budget() -> None:
    # Fewer calls than above: here a third of the calls are misses that rebuild a table.
    calls = 2_000
    entry_bytes = {args: build_slice(*args).nbytes for args in THREAD_KEYS}
    cache = RopeCache(max_entries=12, max_bytes=int(10.5 * max(entry_bytes.values())))
    failures, _ = _hammer(cache, calls)
    assert not failures, failures[:5]
    assert cache.stats.hits + cache.stats.misses == THREADS * calls
    assert cache.stats.evictions > 0
    assert len(cache) <= 12 and cache.stats.bytes <= cache.max_bytes
    # The byte counter agrees with the entries actually held.
    held = {(k.spec, k.plan, k.sp_rank, k.sp_size, k.device) for k in cache.keys()}
    assert cache.stats.bytes == sum(entry_bytes[args] for args in held)


# ---------------------------------------------------------------------------------------------
# One allocation per entry: one version counter guards cos, sin and indices.
# ---------------------------------------------------------------------------------------------


def test_entries_are_views_of_one_allocation() -> None:
    piece = RopeCache().get(*BASE)
    assert piece.guard is not None
    for t in (piece.cos, piece.sin, piece.indices):
        assert t.untyped_storage().data_ptr() == piece.guard.untyped_storage().data_ptr()
        before = piece.guard._version
        t.view(-1)[:1].add_(0)  # any in-place write to any of the three moves the shared counter
        assert piece.guard._version > before
    # The three views do not overlap.
    views = (piece.indices, piece.cos, piece.sin)
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in views)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))


def test_foreign_builder_output_is_copied_not_aliased() -> None:
    """A wrapped builder may keep (and later write) the tensors it returned; the entry must not change."""
    kept: list = []

    def builder(spec, plan, sp_rank, sp_size, device):  # type: ignore[no-untyped-def]
        sl = build_slice(spec, plan, sp_rank, sp_size, device)
        cos, sin, idx = sl.cos.clone(), sl.sin.clone(), sl.indices.clone()  # three separate tensors
        kept.append((cos, sin, idx))
        return RopeSlice(cos, sin, idx)

    cache = RopeCache(builder=builder)
    piece = cache.get(*BASE)
    for t in kept[0]:
        t.zero_()  # the builder's own tensors, not the cache's
    again = cache.get(*BASE)
    assert again is piece and not _differs(again, build_slice(*BASE))


def test_foreign_builder_with_mismatched_shapes_is_refused() -> None:
    def builder(spec, plan, sp_rank, sp_size, device):  # type: ignore[no-untyped-def]
        sl = build_slice(spec, plan, sp_rank, sp_size, device)
        return RopeSlice(sl.cos, sl.sin[:-1].clone(), sl.indices.clone())

    with pytest.raises(ValueError, match=r"builder returned cos .*expected \[rows, width\] twice"):
        RopeCache(builder=builder).get(*BASE)


def test_hash_collisions_between_specs_never_share_an_entry() -> None:
    a, b = BASE_SPEC, BASE_SPEC.replace(start_frame=7)
    object.__setattr__(b, "_hash", hash(a))  # b now hashes exactly like a: a forced collision
    assert hash(a) == hash(b) and a != b
    cache = RopeCache()
    got_a, got_b = cache.get(a, T_PLAN, 0, 2), cache.get(b, T_PLAN, 0, 2)
    for _ in range(3):  # hits, in both orders
        assert cache.get(b, T_PLAN, 0, 2) is got_b and cache.get(a, T_PLAN, 0, 2) is got_a
    assert not _differs(got_a, build_slice(a, T_PLAN, 0, 2)) and not _differs(got_b, build_slice(b, T_PLAN, 0, 2))
    assert _differs(got_a, got_b)
    assert (cache.stats.misses, cache.stats.hits, len(cache)) == (2, 6, 2)


def test_equal_but_distinct_and_unpickled_keys_hit_the_same_entry() -> None:
    import pickle

    cache = RopeCache()
    first = cache.get(*BASE)
    twin_spec, twin_plan = pickle.loads(pickle.dumps((BASE_SPEC, T_PLAN)))  # equal objects, no kept hash
    assert twin_spec is not BASE_SPEC and twin_plan is not T_PLAN
    for _ in range(2):  # the first call hashes them, the second takes the hit path
        assert cache.get(twin_spec, twin_plan, 0, 2, "cpu") is first
    assert (cache.stats.misses, cache.stats.hits) == (1, 2)


def test_a_full_cache_evicts_before_it_builds() -> None:
    """A miss in a full cache drops the LRU entry first, so no more than max_entries tables are
    held at any time, the one being built included (its builder sees the room already made)."""
    held_during_build: list[int] = []

    def builder(*args):  # type: ignore[no-untyped-def]
        held_during_build.append(len(cache))
        return build_slice(*args)

    cache = RopeCache(max_entries=2, builder=builder)
    for args in _fresh_keys(5):
        cache.get(*args)
    assert held_during_build == [0, 1, 1, 1, 1]
    assert len(cache) == 2 and cache.stats.evictions == 3
