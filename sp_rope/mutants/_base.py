"""Shared pieces of the catalog's implementations (private: not discovered as a mutant).

Written from the convention in ``shared/golden/README.md`` only; nothing here calls
``sp_rope.tables`` or ``sp_rope.cache``, so the correct implementations are an independent
second opinion on sp_rope's own builder.

The N-D builder is a class with one method per step (factors, positions, sharding, angles,
layout) so that a mutant overrides exactly the one step its bug lives in.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, MutableMapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from sp_rope.cache import RopeSlice
from sp_rope.sharding import ShardPlan
from sp_rope.spec import RopeSpec

Table = tuple[torch.Tensor, torch.Tensor]
Factor = float | tuple[float, ...]


@dataclass(frozen=True)
class SpGroup:
    """What FastVideo's ``get_sp_group()`` returns (the fields the builder reads)."""

    rank_in_group: int
    world_size: int


def _tuple_or_float(value: Any) -> Factor:
    return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else float(value)


@dataclass(frozen=True)
class RopeCall:
    """One builder call, every output-affecting argument normalized (lists to tuples).

    Its fields, in order, are the cache key, so a key cannot silently miss a field.
    """

    rope_sizes: tuple[int, ...]
    rope_dim_list: tuple[int, ...]
    theta: float
    theta_rescale_factor: Factor
    interpolation_factor: Factor
    shard_dim: int
    sp_rank: int
    sp_world_size: int
    dtype: torch.dtype
    start_frame: int
    use_real: bool
    sharded: bool  # FastVideo's do_sp_sharding: the caller asked for a rank's block

    @classmethod
    def make(
        cls, rope_sizes: Sequence[int], rope_dim_list: Sequence[int], theta: float, theta_rescale_factor: Any,
        interpolation_factor: Any, shard_dim: int, sp_rank: int, sp_world_size: int, dtype: torch.dtype,
        start_frame: int, use_real: bool, sharded: bool | None = None,
    ) -> RopeCall:
        if sp_world_size < 1 or not 0 <= sp_rank < sp_world_size:
            raise ValueError(f"bad SP rank {sp_rank} of {sp_world_size}")
        return cls(
            tuple(int(s) for s in rope_sizes), tuple(int(d) for d in rope_dim_list), float(theta),
            _tuple_or_float(theta_rescale_factor), _tuple_or_float(interpolation_factor), int(shard_dim),
            int(sp_rank), int(sp_world_size), dtype, int(start_frame), bool(use_real),
            sp_world_size > 1 if sharded is None else bool(sharded),
        )

    def key(self, drop: Sequence[str] = ()) -> tuple[Hashable, ...]:
        """The cache key: every field, except the ones a buggy key forgets."""
        return tuple(getattr(self, f.name) for f in fields(self) if f.name not in drop)

    def replace(self, **changes: Any) -> RopeCall:
        return replace(self, **changes)


def to_layout(half: torch.Tensor, layout: str) -> torch.Tensor:
    """``[n, D/2]`` cos or sin to the table layout: pairwise repeat, half, or two halves."""
    if layout == "interleaved":
        return half.repeat_interleave(2, dim=1)
    if layout == "neox":
        return torch.cat([half, half], dim=1)
    return half


class NdRope:
    """FastVideo's N-D builder: per-axis float32 positions (time shifted by ``start_frame``
    before sharding), a contiguous block of ``shard_dim`` per rank, per-axis frequencies in
    ``dtype``, cos/sin of the outer products concatenated over the axes."""

    def factors(self, value: Factor, ndim: int) -> tuple[float, ...]:
        """A scalar or one value per axis, as one float per axis."""
        if isinstance(value, tuple):
            return value * ndim if len(value) == 1 else value
        return (float(value),) * ndim

    def positions(self, call: RopeCall) -> list[torch.Tensor]:
        """Unsharded integer positions per axis, float32 (as FastVideo's meshgrid)."""
        pos = [torch.arange(size, dtype=torch.float32) for size in call.rope_sizes]
        pos[0] = pos[0] + call.start_frame  # the causal offset, before sharding
        return pos

    def shard_axis(self, call: RopeCall) -> int:
        return call.shard_dim

    def block(self, size: int, sp_rank: int, sp_world_size: int) -> torch.Tensor:
        """Which positions of the sharded axis this rank owns: ``[rank*n, (rank+1)*n)``."""
        n = size // sp_world_size
        return torch.arange(sp_rank * n, (sp_rank + 1) * n)

    def local_coords(self, call: RopeCall, pos: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-axis positions of this rank's tokens, row-major over its local grid."""
        if call.sp_world_size > 1:
            if call.rope_sizes[call.shard_dim] % call.sp_world_size:  # FastVideo asserts this too
                raise ValueError(f"axis {call.shard_dim} of {call.rope_sizes} does not split into "
                                 f"{call.sp_world_size} parts")
            axis = self.shard_axis(call)
            pos = list(pos)
            pos[axis] = pos[axis][self.block(pos[axis].numel(), call.sp_rank, call.sp_world_size)]
        return [m.reshape(-1) for m in torch.meshgrid(*pos, indexing="ij")]

    def angles(self, pos: torch.Tensor, d: int, theta: float, rescale: float, interp: float,
               dtype: torch.dtype) -> torch.Tensor:
        """``[n, d/2]`` angles of one axis; positions scaled in float32, promoted to ``dtype``."""
        return torch.outer(pos * interp, inv_freq(d, theta, rescale, dtype))

    def layout(self, half: torch.Tensor, use_real: bool) -> torch.Tensor:
        return to_layout(half, "interleaved" if use_real else "half")

    def __call__(self, call: RopeCall) -> Table:
        ndim = len(call.rope_sizes)
        if len(call.rope_dim_list) != ndim:
            raise ValueError(f"rope_dim_list {call.rope_dim_list} does not match {call.rope_sizes}")
        rescale = self.factors(call.theta_rescale_factor, ndim)
        interp = self.factors(call.interpolation_factor, ndim)
        coords = self.local_coords(call, self.positions(call))
        angles = torch.cat([
            self.angles(coords[a], call.rope_dim_list[a], call.theta, rescale[a], interp[a], call.dtype)
            for a in range(ndim)
        ], dim=1)
        return self.layout(angles.cos(), call.use_real), self.layout(angles.sin(), call.use_real)


def inv_freq(d: int, theta: float, rescale: float, dtype: torch.dtype) -> torch.Tensor:
    """``1 / theta_a ** (2k/d)`` for ``k < d/2`` in ``dtype``; NTK rescale ``theta * r**(d/(d-2))``."""
    if rescale != 1.0:
        theta = theta * rescale ** (d / (d - 2))
    return 1.0 / (theta ** (torch.arange(0, d, 2, dtype=dtype)[: d // 2] / d))


ND = NdRope()


# ---------------------------------------------------------------------------------------------
# The fastvideo convention: get_rotary_pos_embed with the SP group and a module-level cache


def fastvideo_call(
    group: Callable[[], Any], rope_sizes: Sequence[int], hidden_size: int, heads_num: int,
    rope_dim_list: Sequence[int] | None, rope_theta: float, theta_rescale_factor: Any,
    interpolation_factor: Any, shard_dim: int, do_sp_sharding: bool, dtype: torch.dtype, start_frame: int,
    use_real: bool,
) -> RopeCall:
    """Normalize a ``fastvideo``-convention call; the SP group is asked only when sharding."""
    head_dim = hidden_size // heads_num
    if rope_dim_list is None:
        rope_dim_list = [head_dim // len(rope_sizes)] * len(rope_sizes)
    if sum(rope_dim_list) != head_dim:
        raise ValueError(f"sum(rope_dim_list) {sum(rope_dim_list)} != head dim {head_dim}")
    rank, world = 0, 1
    if do_sp_sharding:
        sp = group()
        rank, world = sp.rank_in_group, sp.world_size
    return RopeCall.make(rope_sizes, rope_dim_list, rope_theta, theta_rescale_factor, interpolation_factor,
                         shard_dim, rank, world, dtype, start_frame, use_real, do_sp_sharding)


def cached(cache: MutableMapping[Hashable, Table], key: Hashable, build: Callable[[], Table],
           on_hit: Callable[[Table], None] | None = None) -> Table:
    """FastVideo's module-level dict cache: the same tensors for every call with this key."""
    hit = cache.get(key)
    if hit is None:
        hit = cache[key] = build()
    elif on_hit is not None:
        on_hit(hit)
    return hit


# ---------------------------------------------------------------------------------------------
# The native convention: (spec, plan, sp_rank, sp_size, device) -> RopeSlice


def unravel(indices: torch.Tensor, grid: Sequence[int]) -> list[torch.Tensor]:
    """Row-major coordinates of flat token indices (the leading axis is not wrapped)."""
    coords, rest = [], indices
    for size in reversed(grid[1:]):
        coords.append(rest % size)
        rest = rest // size
    coords.append(rest)
    return coords[::-1]


def rows_table(spec: RopeSpec, indices: torch.Tensor) -> Table:
    """cos/sin of the tokens ``indices`` (``-1``: padding, the identity rotation), any layout."""
    pad = indices < 0
    coords = unravel(indices.clamp(min=0), spec.grid)
    pos = [c.to(torch.float32) for c in coords]
    pos[0] = pos[0] + spec.start_frame
    factors_r = spec.theta_rescale_factor
    factors_i = spec.interpolation_factor
    assert isinstance(factors_r, tuple) and isinstance(factors_i, tuple)  # RopeSpec normalizes them
    angles = torch.cat([
        ND.angles(pos[a], d, spec.theta, factors_r[a], factors_i[a], spec.torch_dtype)
        for a, d in enumerate(spec.rope_dim_list)
    ], dim=1)
    cos, sin = to_layout(angles.cos(), spec.layout), to_layout(angles.sin(), spec.layout)
    cos[pad], sin[pad] = 1.0, 0.0
    return cos, sin


IndexFn = Callable[[ShardPlan, tuple[int, ...], int, int], torch.Tensor]


def plan_indices(plan: ShardPlan, grid: tuple[int, ...], sp_rank: int, sp_size: int) -> torch.Tensor:
    return plan.indices(grid, sp_rank, sp_size)


def build_native(spec: RopeSpec, plan: ShardPlan, sp_rank: int, sp_size: int, device: str,
                 key: Hashable, index_fn: IndexFn = plan_indices) -> RopeSlice:
    """Build one rank's slice on the CPU (CPU libm: the bits the golden tables pin), then move it."""
    indices = index_fn(plan, spec.grid, sp_rank, sp_size)
    cos, sin = rows_table(spec, indices)
    return RopeSlice(cos.to(device), sin.to(device), indices.to(device), key)


def native_key(spec: RopeSpec, plan: ShardPlan, sp_rank: int, sp_size: int, device: str) -> Hashable:
    # RopeSpec is frozen and carries every table-shaping field; the plan, the SP coordinates and
    # the device make the rest of a slice's identity.
    return (spec, str(plan), sp_rank, sp_size, str(torch.device(device)))


def lru_get(cache: OrderedDict[Hashable, RopeSlice], key: Hashable, build: Callable[[], RopeSlice],
            max_entries: int) -> RopeSlice:
    """A small LRU: hits refresh recency; the least recently used entry goes first."""
    hit = cache.get(key)
    if hit is not None:
        cache.move_to_end(key)
        return hit
    value = cache[key] = build()
    while len(cache) > max_entries:
        cache.popitem(last=False)
    return value


def same_bits(a: Table, b: Table) -> bool:
    """Bit-exact equality of two (cos, sin) pairs, dtype and shape included."""
    return all(x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
               for x, y in zip(a, b, strict=True))


__all__ = [
    "ND", "NdRope", "RopeCall", "SpGroup", "Table", "build_native", "cached", "fastvideo_call", "inv_freq",
    "lru_get", "native_key", "rows_table", "same_bits", "to_layout", "unravel",
]
