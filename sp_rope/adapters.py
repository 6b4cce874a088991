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
import inspect
import sys
from collections.abc import Hashable, Iterable, Iterator, Mapping, Reversible
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .cache import CacheMutationError, RopeCache, RopeSlice
from .config import ConfigError
from .judge import plan_tokens
from .providers import UNSHARDED, NativeProvider, Provider, SpRopeProvider
from .sharding import ShardPlan
from .spec import RopeSpec, default_rope_dim_list

CONVENTIONS = ("native", "fastvideo", "fastvideo-nd", "diffusers-wan")

_file_modules: dict[Path, Any] = {}


def load_object(target: str, option: str = "--impl") -> Any:
    """Resolve ``module:attr`` or ``path/file.py:attr`` (the file needs no installation).

    Any failure to import — a SyntaxError, an exception, even ``sys.exit`` at import time — is a
    one-line ConfigError naming the file and line, never a traceback or a foreign exit code.
    """
    import traceback

    def import_failed(exc: BaseException) -> ConfigError:
        if isinstance(exc, SyntaxError) and exc.filename:
            at = f"{exc.filename}:{exc.lineno}"
            what = f"SyntaxError: {exc.msg}"
        else:
            frames = traceback.extract_tb(exc.__traceback__)
            # The user's frame, not importlib's: the last one outside the import machinery.
            user = [f for f in frames if "importlib" not in f.filename and f.filename != __file__]
            at = f"{user[-1].filename}:{user[-1].lineno}" if user else where
            detail = str(exc).strip().splitlines()
            what = f"{type(exc).__name__}: {detail[0] if detail else ''}".rstrip(": ")
            if isinstance(exc, SystemExit):
                what += " (sys.exit at import)"
        return ConfigError(f"{option} {target!r}: importing {where!r} failed at {at}: {what}")

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
            try:
                spec.loader.exec_module(module)
            except (Exception, SystemExit) as exc:
                del sys.modules[name]
                raise import_failed(exc) from None
            _file_modules[path] = module
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as exc:
            raise ConfigError(f"{option} {target!r}: cannot import {where!r}: {exc}") from None
        except (Exception, SystemExit) as exc:
            raise import_failed(exc) from None
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
        # id of a tensor an entry held when its key was first seen -> that key: a call then costs
        # one look per new key, not a scan of every entry (a sweep makes thousands of them).
        self._holder: dict[int, Hashable] = {}
        self._indexed: set[int] = set()  # ids of the key objects looked at

    def _held(self, key: Hashable) -> tuple[torch.Tensor, ...]:
        value = self.mapping[key]
        if isinstance(value, (tuple, list)):
            held: Iterable[object] = value
        elif isinstance(value, torch.Tensor):
            held = (value,)
        else:  # a record such as a RopeSlice: its tensor attributes
            held = vars(value).values() if hasattr(value, "__dict__") else ()
        return tuple(h for h in held if isinstance(h, torch.Tensor))

    def size(self) -> int | None:
        """The mapping's entry count, or None when it has no length."""
        try:
            return len(self.mapping)
        except TypeError:
            return None

    def key_for(self, returned: tuple[torch.Tensor, ...], before: Snapshot) -> Hashable | None:
        recent = self._added_since(before)
        for key in recent:
            self._index(key)
        # The entry that holds the very tensors returned is the one that was used (one look)...
        for r in returned:
            key = self._holder.get(id(r))
            if key is not None and self._holds(key, r):
                return key
        if not recent:  # (an entry whose value was replaced, or whose key took a freed key's id)
            keys = list(self.mapping.keys())
            for key in keys:
                self._index(key)
            for key in keys:
                if any(h is r for h in self._held(key) for r in returned):
                    return key
        # ... unless the implementation hands out copies: then the key it just added.
        return recent[0] if recent else None

    def snapshot(self) -> Snapshot:
        """Where the mapping ends now: the keys a call adds are those after its last key (a look
        at the new keys only, not at every entry: a sweep makes thousands of them)."""
        if isinstance(self.mapping, Reversible):
            tail = next(reversed(self.mapping), _EMPTY)
            return Snapshot(None if tail is _EMPTY else id(tail))
        return Snapshot(None, frozenset(id(key) for key in self.mapping.keys()))  # no order: every id

    def _added_since(self, before: Snapshot) -> list[Hashable]:
        """The keys added since ``before``, newest first."""
        if before.ids is not None:
            return [key for key in reversed(list(self.mapping.keys())) if id(key) not in before.ids]
        added: list[Hashable] = []
        for key in reversed(self.mapping):  # type: ignore[call-overload]  # Reversible, see snapshot
            if before.tail is not None and id(key) == before.tail:
                return added
            added.append(key)
        # Empty before; or its last key is gone (evicted by the call): the keys never seen.
        return added if before.tail is None else [key for key in added if id(key) not in self._indexed]

    def _index(self, key: Hashable) -> None:
        if id(key) not in self._indexed:
            self._indexed.add(id(key))
            self._holder.update((id(t), key) for t in self._held(key))

    def _holds(self, key: Hashable, tensor: torch.Tensor) -> bool:
        try:
            return key in self.mapping and any(h is tensor for h in self._held(key))
        except Exception:  # noqa: BLE001 - a key whose __eq__ raises, a mapping that refuses it
            return False


@dataclass(frozen=True)
class Snapshot:
    """Where a watched mapping ended before a call: its last key's id (None: it was empty), or,
    for a mapping without an order, every key's id."""

    tail: int | None
    ids: frozenset[int] | None = None


_EMPTY = object()


HEADS = 12  # heads_num passed to the fastvideo convention (hidden_size = HEADS x head_dim), as in Wan 1.3B


class ArgumentMutationError(ValueError):
    """The implementation changed an argument it was passed, in place."""


class ArgumentLists:
    """The ``rope_sizes`` and ``rope_dim_list`` lists a provider passes: the same two list objects
    every call, refilled, as a model keeps its own and updates them when the latent size changes.
    A cache keyed on the lists' ``id()`` then maps every geometry to one entry."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.dims: list[int] = []

        self.calls = 0

    def refill(self, spec: RopeSpec) -> tuple[list[int], list[int]]:
        self.sizes[:], self.dims[:] = spec.grid, spec.rope_dim_list
        self.calls += 1
        return self.sizes, self.dims

    def factors(self, spec: RopeSpec) -> dict[str, float | list[float]]:
        """The two factors, spelled differently from each other; the spelling moves on every
        second call, so that consecutive calls also agree in everything but the refilled lists (a
        memo of the last call's arguments that holds these very lists then takes them as equal)."""
        spelling = self.calls // 2
        return {
            "theta_rescale_factor": as_passed(spec.theta_rescale_factor, spelling),  # type: ignore[arg-type]
            "interpolation_factor": as_passed(spec.interpolation_factor, spelling + 1),  # type: ignore[arg-type]
        }


@contextlib.contextmanager
def unchanged(name: str, **arguments: list[int]) -> Iterator[None]:
    """The lists passed must come back as they went in: a model reuses its ``rope_sizes`` and
    ``rope_dim_list`` from step to step, so a callee that shards them in place (``sizes[d] //=
    world``) hands the next step another geometry, though its own tables were right."""
    before = {key: list(value) for key, value in arguments.items()}
    yield
    for key, value in arguments.items():
        if value != before[key]:
            raise ArgumentMutationError(
                f"{name} changed its {key} argument in place ({before[key]} -> {value}); "
                "callers reuse it for the next step"
            )


def as_passed(factors: tuple[float, ...], spelling: int = 0) -> float | list[float]:
    """A per-axis factor as callers pass it: the list when the axes differ; when every axis has
    the same one, each spelling FastVideo accepts in turn (``spelling`` mod 3): a scalar, a
    one-element list (broadcast), the full list. RopeSpec normalizes them all to one per axis."""
    if len(set(factors)) > 1:
        return list(factors)
    return (factors[0], [factors[0]], list(factors))[spelling % 3]


@dataclass
class _Group:
    """What FastVideo's ``get_sp_group()`` returns."""

    rank_in_group: int
    world_size: int


class FastVideoProvider(Provider):
    """``fn(rope_sizes, hidden_size, heads_num, rope_dim_list, rope_theta, ...) -> (cos, sin)``.

    The function finds its SP rank through ``get_sp_group()`` in its own module's globals (those
    of the undecorated function, when a decorator such as ``@torch.no_grad()`` wraps it); the
    adapter substitutes that global with the current SP group for the call and restores it.
    Layout: interleaved (``use_real=True``) or half; scheme: contiguous along ``shard_dim``.
    """

    def __init__(self, fn: Any, name: str, watcher: CacheWatcher | None) -> None:
        self.fn, self.name, self.watcher = fn, name, watcher
        self.arguments = ArgumentLists()

    def skip_reason(self, spec: RopeSpec, plan: ShardPlan) -> str | None:
        if spec.layout == "neox":
            return "the fastvideo convention has no neox layout"
        if plan.scheme != "contiguous":
            return f"the fastvideo convention shards contiguously along one axis only, not {plan}"
        return None

    @contextlib.contextmanager
    def _sp_group(self, group: _Group) -> Iterator[None]:
        module_globals = inspect.unwrap(self.fn).__globals__
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

    def _call(self, spec: RopeSpec, shard_dim: int, group: _Group, sharded: bool) -> tuple[torch.Tensor, ...]:
        sizes, dims = self.arguments.refill(spec)
        with self._sp_group(group), unchanged(self.name, rope_sizes=sizes, rope_dim_list=dims):
            return self.fn(  # type: ignore[no-any-return]
                sizes,
                spec.head_dim * HEADS,  # hidden_size: all heads, as a model passes it
                HEADS,
                dims,
                spec.theta,
                **self.arguments.factors(spec),
                shard_dim=shard_dim,
                do_sp_sharding=sharded,
                dtype=spec.torch_dtype,
                start_frame=spec.start_frame,
                use_real=spec.layout == "interleaved",
            )

    def get(self, spec: RopeSpec, plan: ShardPlan, sp_rank: int, sp_size: int, device: str) -> RopeSlice:
        axis = 0 if plan.axis is None else plan.axis
        before = self.watcher.snapshot() if self.watcher else None
        cos, sin = self._call(spec, axis, _Group(sp_rank, sp_size), sp_size > 1)
        key = self.watcher.key_for((cos, sin), before) if self.watcher and before else None
        # The function takes no device: a model moves its tables (a no-op where they already are).
        return RopeSlice(cos.to(device), sin.to(device), plan_tokens(plan, spec.grid, sp_rank, sp_size), key)

    def cache_size(self) -> int | None:
        return None if self.watcher is None else self.watcher.size()

    def full(self, spec: RopeSpec, device: str, within: tuple[int, int] = (0, 1)) -> RopeSlice:
        # Asked from inside the real SP group, with do_sp_sharding=False: a function that shards
        # whenever its group has several ranks returns a block here, and fails the shape check.
        # The shard_dim a model is configured with still comes along: no sharding must mean no
        # sharding along any axis. It follows the start_frame (a sweep meets every axis), so the
        # same call is the same call whatever the dtype or layout.
        cos, sin = self._call(spec, spec.start_frame % len(spec.grid), _Group(*within), False)
        return RopeSlice(cos.to(device), sin.to(device), torch.arange(spec.num_tokens))


class FastVideoNdProvider(Provider):
    """A cache-less N-D builder ``fn(rope_dim_list, rope_sizes, *, theta, ..., use_real)``,
    wrapped in sp_rope's own ``RopeCache`` (the builder is what is judged)."""

    def __init__(self, fn: Any, name: str) -> None:
        self.fn, self.name = fn, name
        self.arguments = ArgumentLists()
        self.cache = RopeCache(max_entries=3, builder=self._build)
        # The cache stores a copy of what the builder returns, so a builder that later writes into
        # tensors it returned (a reused workspace) cannot corrupt it; that bug is still the
        # builder's, so the tensors it returned for cached keys are watched here.
        self._returned: dict[tuple, list[tuple[torch.Tensor, int]]] = {}

    def skip_reason(self, spec: RopeSpec, plan: ShardPlan) -> str | None:
        return FastVideoProvider.skip_reason(self, spec, plan)  # type: ignore[arg-type]

    def _build(self, spec: RopeSpec, plan: ShardPlan, sp_rank: int, sp_size: int, device: str) -> RopeSlice:
        sizes, dims = self.arguments.refill(spec)
        with unchanged(self.name, rope_dim_list=dims, rope_sizes=sizes):
            cos, sin = self.fn(
                dims,
                sizes,
                theta=spec.theta,
                **self.arguments.factors(spec),
                shard_dim=0 if plan.axis is None else plan.axis,
                sp_rank=sp_rank,
                sp_world_size=sp_size,
                dtype=spec.torch_dtype,
                start_frame=spec.start_frame,
                use_real=spec.layout == "interleaved",
            )
        self._returned[(spec, plan, sp_rank, sp_size, device)] = [(t, t._version) for t in (cos, sin)]
        return RopeSlice(cos.to(device), sin.to(device), plan_tokens(plan, spec.grid, sp_rank, sp_size))

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

    def full(self, spec: RopeSpec, device: str, within: tuple[int, int] = (0, 1)) -> RopeSlice:
        # The explicit-argument API says "unsharded" by sp_world_size=1 whatever group asks.
        return self._build(spec, UNSHARDED, 0, 1, device)


WAN_PATCH = (1, 2, 2)  # Wan 2.1's patch (t, h, w): a latent of 2H x 2W is an H x W grid of tokens


class DiffusersWanProvider(Provider):
    """A ``WanRotaryPosEmbed``-like class (diffusers' own without ``--impl``), sharded as diffusers'
    context-parallel plan shards its output: a contiguous split of the flattened sequence.

    The class is constructed as diffusers constructs it for Wan, ``cls(attention_head_dim,
    patch_size=(1, 2, 2), max_seq_len, theta=theta)``, once per head dim and theta (one model),
    and called on a latent ``[1, C, T, 2H, 2W]`` for every table (patchified, the grid is
    ``(T, H, W)``), returning ``(cos, sin)`` shaped ``[1, T*H*W, 1, D]``. diffusers' tables are
    float32 (angles in float64), so only float32 cases are expressible; there is no start_frame,
    rescale or interpolation argument."""

    def __init__(self, cls: Any = None, impl: str | None = None) -> None:
        if cls is None and importlib.util.find_spec("diffusers") is None:
            # Only look for the package here (cheap); import it on first use, in the ranks.
            raise ConfigError("--convention diffusers-wan needs diffusers: pip install -e '.[diffusers]'")
        self.cls = cls
        self.name = f"diffusers-wan ({impl or 'diffusers WanRotaryPosEmbed'})"
        self._models: dict[tuple[int, float, int], Any] = {}

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

    def _model(self, spec: RopeSpec) -> Any:
        if self.cls is None:
            from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

            self.cls = WanRotaryPosEmbed
        # Wan's own max_seq_len (1024); an axis longer than that needs a model built for more
        # positions (the next power of two), as a pipeline for such latents would build.
        positions = max(1024, 1 << (max(spec.grid) - 1).bit_length())
        key = (spec.head_dim, spec.theta, positions)
        if key not in self._models:
            # Built as pipelines build a bfloat16 transformer: under a bfloat16 default dtype, so a
            # table precomputed in the default dtype (an arange without a dtype) is seen.
            default = torch.get_default_dtype()
            torch.set_default_dtype(torch.bfloat16)
            try:
                self._models[key] = self.cls(spec.head_dim, WAN_PATCH, positions, theta=spec.theta)
            finally:
                torch.set_default_dtype(default)
        return self._models[key]

    def full(self, spec: RopeSpec, device: str, within: tuple[int, int] = (0, 1)) -> RopeSlice:
        # A bfloat16 latent, as inference runs: the tables' dtype must not follow the input's. Its
        # frames, height and width are the grid's times Wan's patch: the table is the patches'.
        latent = tuple(n * p for n, p in zip(spec.grid, WAN_PATCH))
        cos, sin = self._model(spec)(torch.zeros(1, 1, *latent, dtype=torch.bfloat16))
        cos, sin = cos.reshape(-1, cos.shape[-1]), sin.reshape(-1, sin.shape[-1])
        return RopeSlice(cos.to(device), sin.to(device), torch.arange(spec.num_tokens))

    def get(self, spec: RopeSpec, plan: ShardPlan, sp_rank: int, sp_size: int, device: str) -> RopeSlice:
        full = self.full(spec, device)
        indices = plan.indices(spec.grid, sp_rank, sp_size)
        if full.cos.shape[0] != spec.num_tokens:  # a table of the wrong length: the check rejects it whole
            return RopeSlice(full.cos, full.sin, indices)
        if indices.numel() and bool((indices == torch.arange(int(indices[0]), int(indices[0]) + len(indices))).all()):
            # One run (the even split): a view, as the CP plan's split is, so a class that later
            # rewrites the memory it returned is seen rewriting tables still in use.
            start, count = int(indices[0]), len(indices)
            return RopeSlice(full.cos.narrow(0, start, count), full.sin.narrow(0, start, count), indices)
        rows = indices.to(full.cos.device)
        return RopeSlice(full.cos[rows], full.sin[rows], indices)


def make_provider(impl: str | None, convention: str, impl_cache: str | None) -> Provider:
    """The provider for ``--impl/--convention/--impl-cache`` (sp_rope itself without --impl)."""
    if convention not in CONVENTIONS:
        raise ConfigError(f"--convention: unknown value {convention!r} (choose from {', '.join(CONVENTIONS)})")
    if convention == "diffusers-wan":
        if impl_cache is not None:
            # The adapter slices the class's whole table for every rank: keys would be shared.
            raise ConfigError("--impl-cache does not apply to --convention diffusers-wan")
        cls = load_object(impl) if impl is not None else None
        if impl is not None and not callable(cls):
            raise ConfigError(f"--impl {impl!r} is not a class (diffusers-wan constructs it like WanRotaryPosEmbed)")
        return DiffusersWanProvider(cls, impl)
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
