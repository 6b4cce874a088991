"""Load someone else's RoPE implementation and adapt its convention to a ``Provider``.

``--impl module:attr`` or ``--impl path/to/file.py:attr`` names the function;
``--convention`` says how to call it; ``--impl-cache`` names the mapping the implementation
caches into, so the check can see which key each call used. An ``--impl`` and an
``--impl-cache`` naming the same module or file get the same module object.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .cache import CacheMutationError, RopeCache, RopeSlice
from .config import ConfigError
from .providers import UNSHARDED, NativeProvider, Provider, SpRopeProvider
from .sharding import ShardPlan
from .spec import RopeSpec, default_rope_dim_list

CONVENTIONS = ("native", "fastvideo", "fastvideo-nd", "diffusers-wan")

_file_modules: dict[Path, Any] = {}


def load_object(target: str, option: str = "--impl") -> Any:
    """Resolve ``module:attr`` or ``path/file.py:attr`` (the file needs no installation)."""
    where, sep, attr = target.rpartition(":")
    if not sep or not where or not attr:
        raise ConfigError(f"{option} {target!r}: expected module:attr or path/to/file.py:attr")
    if where.endswith(".py"):
        path = Path(where).resolve()
        if not path.is_file():
            raise ConfigError(f"{option} {target!r}: no such file {where!r}")
        module = _file_modules.get(path)
        if module is None:
            name = f"sp_rope_impl_{abs(hash(path)):x}"
            spec = importlib.util.spec_from_file_location(name, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # one module object for --impl and --impl-cache
            spec.loader.exec_module(module)
            _file_modules[path] = module
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise ConfigError(f"{option} {target!r}: cannot import {where!r}: {exc}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{option} {target!r}: {where!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


class CacheWatcher:
    """Finds the key an implementation used for a call in its cache mapping."""

    def __init__(self, mapping: Mapping[Hashable, Any]) -> None:
        if not isinstance(mapping, Mapping) and not hasattr(mapping, "keys"):
            raise ConfigError(f"--impl-cache must name a mapping, got {type(mapping).__name__}")
        self.mapping = mapping

    def key_for(self, returned: tuple[torch.Tensor, ...], before: set[Hashable]) -> Hashable | None:
        # The entry that holds the very tensors returned is the one that was used...
        for key, value in list(self.mapping.items()):
            held = value if isinstance(value, (tuple, list)) else (value,)
            if any(any(h is r for r in returned) for h in held if isinstance(h, torch.Tensor)):
                return key
        # ... unless the implementation hands out copies: then the key it just added.
        added = [key for key in list(self.mapping.keys()) if key not in before]
        return added[-1] if added else None

    def snapshot(self) -> set[Hashable]:
        return set(self.mapping.keys())


@dataclass
class _Group:
    """What FastVideo's ``get_sp_group()`` returns."""

    rank_in_group: int
    world_size: int


class FastVideoProvider(Provider):
    """``fn(rope_sizes, hidden_size, heads_num, rope_dim_list, rope_theta, ...) -> (cos, sin)``.

    The function finds its SP rank through ``get_sp_group()`` in its own module's globals; the
    adapter substitutes that global with the current SP group for the call and restores it.
    Layout: interleaved (``use_real=True``) or half; scheme: contiguous along ``shard_dim``.
    """

    def __init__(self, fn: Any, name: str, watcher: CacheWatcher | None) -> None:
        self.fn, self.name, self.watcher = fn, name, watcher

    def skip_reason(self, spec: RopeSpec, plan: ShardPlan) -> str | None:
        if spec.layout == "neox":
            return "the fastvideo convention has no neox layout"
        if plan.scheme != "contiguous":
            return f"the fastvideo convention shards contiguously along one axis only, not {plan}"
        return None

    @contextlib.contextmanager
    def _sp_group(self, group: _Group) -> Iterator[None]:
        module_globals = self.fn.__globals__
        missing = object()
        saved = module_globals.get("get_sp_group", missing)
        module_globals["get_sp_group"] = lambda: group
        try:
            yield
        finally:
            if saved is missing:
                del module_globals["get_sp_group"]
            else:
                module_globals["get_sp_group"] = saved

    def get(self, spec: RopeSpec, plan: ShardPlan, sp_rank: int, sp_size: int, device: str) -> RopeSlice:
        axis = 0 if plan.axis is None else plan.axis
        before = self.watcher.snapshot() if self.watcher else set()
        with self._sp_group(_Group(sp_rank, sp_size)):
            cos, sin = self.fn(
                list(spec.grid),
                spec.head_dim,
                1,
                list(spec.rope_dim_list),
                spec.theta,
                theta_rescale_factor=list(spec.theta_rescale_factor),  # type: ignore[arg-type]
                interpolation_factor=list(spec.interpolation_factor),  # type: ignore[arg-type]
                shard_dim=axis,
                do_sp_sharding=sp_size > 1,
                dtype=spec.torch_dtype,
                start_frame=spec.start_frame,
                use_real=spec.layout == "interleaved",
            )
        key = self.watcher.key_for((cos, sin), before) if self.watcher else None
        return RopeSlice(cos, sin, plan.indices(spec.grid, sp_rank, sp_size), key)


class FastVideoNdProvider(Provider):
    """A cache-less N-D builder ``fn(rope_dim_list, rope_sizes, *, theta, ..., use_real)``,
    wrapped in sp_rope's own ``RopeCache`` (the builder is what is judged)."""

    def __init__(self, fn: Any, name: str) -> None:
        self.fn, self.name = fn, name
        self.cache = RopeCache(max_entries=3, builder=self._build)
        # The cache stores a copy of what the builder returns, so a builder that later writes into
        # tensors it returned (a reused workspace) cannot corrupt it; that bug is still the
        # builder's, so the tensors it returned for cached keys are watched here.
        self._returned: dict[tuple, list[tuple[torch.Tensor, int]]] = {}

    def skip_reason(self, spec: RopeSpec, plan: ShardPlan) -> str | None:
        return FastVideoProvider.skip_reason(self, spec, plan)  # type: ignore[arg-type]

    def _build(self, spec: RopeSpec, plan: ShardPlan, sp_rank: int, sp_size: int, device: str) -> RopeSlice:
        cos, sin = self.fn(
            list(spec.rope_dim_list),
            list(spec.grid),
            theta=spec.theta,
            theta_rescale_factor=list(spec.theta_rescale_factor),  # type: ignore[arg-type]
            interpolation_factor=list(spec.interpolation_factor),  # type: ignore[arg-type]
            shard_dim=0 if plan.axis is None else plan.axis,
            sp_rank=sp_rank,
            sp_world_size=sp_size,
            dtype=spec.torch_dtype,
            start_frame=spec.start_frame,
            use_real=spec.layout == "interleaved",
        )
        self._returned[(spec, plan, sp_rank, sp_size, device)] = [(t, t._version) for t in (cos, sin)]
        return RopeSlice(cos.to(device), sin.to(device), plan.indices(spec.grid, sp_rank, sp_size))

    def get(self, spec: RopeSpec, plan: ShardPlan, sp_rank: int, sp_size: int, device: str) -> RopeSlice:
        out = self.cache.get(spec, plan, sp_rank, sp_size, device)
        cached = {(k.spec, k.plan, k.sp_rank, k.sp_size, k.device) for k in self.cache.keys()}
        for key in list(self._returned):
            if key not in cached:
                del self._returned[key]
            elif any(t._version != v for t, v in self._returned[key]):
                del self._returned[key]
                raise CacheMutationError(
                    f"{self.name} wrote into the tables it returned for {key[0]} ({key[1]}, rank {key[2]}/{key[3]}) "
                    "after returning them, while they were cached; cache entries are read-only"
                )
        return out

    def full(self, spec: RopeSpec, device: str) -> RopeSlice:
        return self._build(spec, UNSHARDED, 0, 1, device)


class DiffusersWanProvider(Provider):
    """diffusers' ``WanRotaryPosEmbed``, sharded as diffusers' context-parallel plan shards its
    output: a contiguous split of the flattened sequence. Its tables are float32 (angles in
    float64), so only float32 cases are expressible; it has no start_frame and no cache."""

    name = "diffusers-wan"

    def __init__(self) -> None:
        # Only look for the package here (cheap); import it on first use, in the ranks.
        if importlib.util.find_spec("diffusers") is None:
            raise ConfigError("--convention diffusers-wan needs diffusers: pip install -e '.[diffusers]'")
        self._full: dict[RopeSpec, RopeSlice] = {}

    def skip_reason(self, spec: RopeSpec, plan: ShardPlan) -> str | None:
        if str(plan) != "flat":
            return f"diffusers shards the flattened sequence evenly (flat), not {plan}"
        if len(spec.grid) != 3 or spec.rope_dim_list != default_rope_dim_list(spec.head_dim):
            return "diffusers' Wan RoPE fixes the split d-4*(d//6), 2*(d//6), 2*(d//6) over (t, h, w)"
        if spec.dtype != "float32" or spec.layout != "interleaved":
            return "diffusers' Wan RoPE returns interleaved float32 tables only"
        if spec.start_frame or set(spec.theta_rescale_factor) != {1.0} or set(spec.interpolation_factor) != {1.0}:  # type: ignore[arg-type]
            return "diffusers' Wan RoPE has no start_frame, theta rescale or interpolation"
        return None

    def full(self, spec: RopeSpec, device: str) -> RopeSlice:
        if spec not in self._full:
            from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

            rope = WanRotaryPosEmbed(spec.head_dim, (1, 1, 1), max(spec.grid), theta=spec.theta)
            latents = torch.zeros(1, 1, *spec.grid)
            cos, sin = rope(latents)
            n = spec.num_tokens
            self._full[spec] = RopeSlice(cos.reshape(n, -1).to(device), sin.reshape(n, -1).to(device), torch.arange(n))
        return self._full[spec]

    def get(self, spec: RopeSpec, plan: ShardPlan, sp_rank: int, sp_size: int, device: str) -> RopeSlice:
        full = self.full(spec, device)
        indices = plan.indices(spec.grid, sp_rank, sp_size)
        return RopeSlice(full.cos[indices.to(full.cos.device)], full.sin[indices.to(full.cos.device)], indices)


def make_provider(impl: str | None, convention: str, impl_cache: str | None) -> Provider:
    """The provider for ``--impl/--convention/--impl-cache`` (sp_rope itself without --impl)."""
    if convention not in CONVENTIONS:
        raise ConfigError(f"--convention: unknown value {convention!r} (choose from {', '.join(CONVENTIONS)})")
    if convention == "diffusers-wan":
        return DiffusersWanProvider()
    if impl is None:
        if convention != "native":
            raise ConfigError(f"--convention {convention} needs --impl module:attr or path/to/file.py:attr")
        if impl_cache is not None:
            raise ConfigError("--impl-cache needs --impl")
        return SpRopeProvider()
    fn = load_object(impl)
    if not callable(fn):
        raise ConfigError(f"--impl {impl!r} is not callable")
    watcher = CacheWatcher(load_object(impl_cache, "--impl-cache")) if impl_cache else None
    if convention == "native":
        return NativeProvider(fn, impl, watcher)
    if convention == "fastvideo":
        return FastVideoProvider(fn, impl, watcher)
    return FastVideoNdProvider(fn, impl)
