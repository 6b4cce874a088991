"""Providers: the implementations the check can judge, behind one small interface.

A provider answers two questions: "this rank's slice, please" (``get``, through whatever cache
the implementation keeps) and "the whole unsharded table" (``full``). ``native`` is sp_rope's
own protocol; adapters for other conventions live in ``sp_rope.adapters``.

The native protocol (what new code should target) is one callable::

    fn(spec: RopeSpec, plan: ShardPlan, sp_rank: int, sp_size: int, device: str) -> RopeSlice

returning this rank's rows of the table and the global token index of every row (``-1`` for
padding), plus, optionally, the cache key it used (``RopeSlice.key``) so the check can prove no
two ranks share an entry. ``sp_size == 1`` asks for the unsharded table.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import torch

from .cache import RopeCache, RopeSlice
from .sharding import ShardPlan
from .spec import RopeSpec
from .tables import build_table

UNSHARDED = ShardPlan("contiguous", axis=0)
SLICE_BUDGET = 80 * 1024**2  # sp_rope's own cache in the check: one 720p P = 2 float64 slice (74 MiB)

NativeFn = Callable[[RopeSpec, ShardPlan, int, int, str], RopeSlice]


@contextlib.contextmanager
def as_a_model_calls(device: str) -> Iterator[None]:
    """The context a bfloat16 model's forward calls its RoPE in: autocast to bfloat16 on the
    device, and bfloat16 as torch's default dtype (as scripts that load a model in bfloat16 set
    it). Tables must not change under it (a matmul of positions and frequencies without an
    autocast guard comes out in bfloat16; positions made as ``arange(n) + offset`` and scaled
    by a float take the default dtype); only the implementation's calls run in it, never the
    check's own judging."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            yield
    finally:
        torch.set_default_dtype(default)


def on_device(tensor: torch.Tensor, device: str) -> bool:
    """Whether ``tensor`` lives where ``device`` asked (``cuda`` is any CUDA device, ``cuda:1`` one)."""
    asked = torch.device(device)
    return tensor.device.type == asked.type and asked.index in (None, tensor.device.index)


class WrongDevice(Exception):
    """A table came back on another device than the call asked for."""


def tables_on(sl: RopeSlice, device: str) -> bool:
    """Whether both of ``sl``'s tables live where ``device`` asked."""
    return on_device(sl.cos, device) and on_device(sl.sin, device)


def require_device(sl: RopeSlice, device: str) -> RopeSlice:
    """``sl``, when its tables are on ``device``; else WrongDevice."""
    if not tables_on(sl, device):
        raise WrongDevice(f"asked for {device}, got cos on {sl.cos.device}, sin on {sl.sin.device}")
    return sl


class Provider:
    """Base: override ``get``; ``full`` defaults to ``get`` at SP size 1."""

    name = "provider"

    def skip_reason(self, spec: RopeSpec, plan: ShardPlan) -> str | None:
        """Why this implementation cannot express ``(spec, plan)``, or None."""
        return None

    def get(self, spec: RopeSpec, plan: ShardPlan, sp_rank: int, sp_size: int, device: str) -> RopeSlice:
        raise NotImplementedError

    def full(self, spec: RopeSpec, device: str, within: tuple[int, int] = (0, 1)) -> RopeSlice:
        """The unsharded table, asked for by a rank that sits at ``within = (sp_rank, sp_size)``
        of a real SP group (an implementation must not shard it anyway)."""
        return self.get(spec, UNSHARDED, 0, 1, device)

    def cache_keys(self) -> list[Hashable] | None:
        """All keys the implementation's cache holds now, when it exposes them."""
        return None

    def cache_size(self) -> int | None:
        """How many entries the implementation's cache holds now, when the check can see it."""
        return None


class SpRopeProvider(Provider):
    """sp_rope itself: slices through a ``RopeCache``, the reference built uncached.

    The cache is bounded by bytes (``SLICE_BUDGET``) as a deployment's would be: the default run's
    small tables all stay cached, so its re-entries are hits, while a preset's P = 2 float64
    slices (32-74 MiB) fill it at once, so eviction and re-entry still happen there. The
    probe's eviction sweep (1024 latent sizes) evicts from any cache under 1024 entries.
    """

    name = "sp_rope"

    def __init__(self, cache: RopeCache | None = None) -> None:
        self.cache = cache or RopeCache(max_bytes=SLICE_BUDGET)

    def get(self, spec: RopeSpec, plan: ShardPlan, sp_rank: int, sp_size: int, device: str) -> RopeSlice:
        return self.cache.get(spec, plan, sp_rank, sp_size, device)

    def full(self, spec: RopeSpec, device: str, within: tuple[int, int] = (0, 1)) -> RopeSlice:
        # The whole-grid builder (broadcast copies), a different path from the sliced one.
        cos, sin = build_table(spec)
        return RopeSlice(cos.to(device), sin.to(device), torch.arange(spec.num_tokens, device=device))

    def cache_keys(self) -> list[Hashable]:
        return list(self.cache.keys())

    def cache_size(self) -> int:
        return len(self.cache)


class NativeProvider(Provider):
    """A user function following the native protocol."""

    def __init__(self, fn: NativeFn, name: str, watcher: Any = None) -> None:
        self.fn = fn
        self.name = name
        self.watcher = watcher  # an adapters.CacheWatcher when --impl-cache is given

    def get(self, spec: RopeSpec, plan: ShardPlan, sp_rank: int, sp_size: int, device: str) -> RopeSlice:
        before = self.watcher.snapshot() if self.watcher else None
        out = self.fn(spec, plan, sp_rank, sp_size, device)
        if not isinstance(out, RopeSlice):  # a bare (cos, sin): the plan's tokens, in the plan's order
            cos, sin = out
            out = RopeSlice(cos, sin, plan.indices(spec.grid, sp_rank, sp_size))
        if out.key is None and self.watcher and before:
            out = RopeSlice(out.cos, out.sin, out.indices, self.watcher.key_for((out.cos, out.sin), before))
        return out

    def cache_size(self) -> int | None:
        return None if self.watcher is None else self.watcher.size()
