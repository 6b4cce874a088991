"""The formula the catalog's implementations share (private: no catalog entries here).

Written from the convention in ``shared/golden/README.md`` only; nothing here calls
``sp_rope.tables`` or ``sp_rope.cache``, so the correct implementations are an independent
second opinion on sp_rope's own builder.

``NdRope`` is FastVideo's N-D builder as a class with one method per step (factors, positions,
sharding, angles, layout), so that a mutant overrides exactly the one step its bug lives in.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

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
    def make(cls, sizes: Sequence[int], dims: Sequence[int], theta: float, rescale: Any, interpolation: Any,
             **rest: Any) -> RopeCall:
        """Normalize a call; ``rest``: shard_dim, sp_rank, sp_world_size, dtype, start_frame, use_real
        and optionally sharded (default: whether the SP group has more than one rank)."""
        rank, world = int(rest["sp_rank"]), int(rest["sp_world_size"])
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"bad SP rank {rank} of {world}")
        return cls(
            tuple(int(s) for s in sizes), tuple(int(d) for d in dims), float(theta), _tuple_or_float(rescale),
            _tuple_or_float(interpolation), int(rest["shard_dim"]), rank, world, rest["dtype"],
            int(rest["start_frame"]), bool(rest["use_real"]), bool(rest.get("sharded", world > 1)),
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


def inv_freq(d: int, theta: float, rescale: float, dtype: torch.dtype) -> torch.Tensor:
    """``1 / theta_a ** (2k/d)`` for ``k < d/2`` in ``dtype``; NTK rescale ``theta * r**(d/(d-2))``."""
    if rescale != 1.0:
        theta = theta * rescale ** (d / (d - 2))
    return 1.0 / (theta ** (torch.arange(0, d, 2, dtype=dtype)[: d // 2] / d))


class NdRope:
    """FastVideo's N-D builder: per-axis float32 positions (time shifted by ``start_frame``
    before sharding), a contiguous block of ``shard_dim`` per rank, per-axis frequencies in
    ``dtype``, cos/sin of the outer products concatenated over the axes."""

    def factors(self, value: Factor, ndim: int) -> tuple[float, ...]:
        """A scalar or one value per axis, as one float per axis."""
        if isinstance(value, tuple):
            return value * ndim if len(value) == 1 else value
        return (float(value),) * ndim

    def rescale_factors(self, call: RopeCall) -> tuple[float, ...]:
        return self.factors(call.theta_rescale_factor, len(call.rope_sizes))

    def interpolation_factors(self, call: RopeCall) -> tuple[float, ...]:
        return self.factors(call.interpolation_factor, len(call.rope_sizes))

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
        rescale, interp = self.rescale_factors(call), self.interpolation_factors(call)
        coords = self.local_coords(call, self.positions(call))
        angles = torch.cat([
            self.angles(coords[a], call.rope_dim_list[a], call.theta, rescale[a], interp[a], call.dtype)
            for a in range(ndim)
        ], dim=1)
        return self.layout(angles.cos(), call.use_real), self.layout(angles.sin(), call.use_real)


ND = NdRope()


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
    pos = [c.to(torch.float32) for c in unravel(indices.clamp(min=0), spec.grid)]
    pos[0] = pos[0] + spec.start_frame
    factors_r, factors_i = spec.theta_rescale_factor, spec.interpolation_factor
    assert isinstance(factors_r, tuple) and isinstance(factors_i, tuple)  # RopeSpec normalizes them
    angles = torch.cat([
        ND.angles(pos[a], d, spec.theta, factors_r[a], factors_i[a], spec.torch_dtype)
        for a, d in enumerate(spec.rope_dim_list)
    ], dim=1)
    cos, sin = to_layout(angles.cos(), spec.layout), to_layout(angles.sin(), spec.layout)
    cos[pad], sin[pad] = 1.0, 0.0
    return cos, sin


def same_bits(a: Table, b: Table) -> bool:
    """Bit-exact equality of two (cos, sin) pairs, dtype and shape included."""
    return all(x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
               for x, y in zip(a, b, strict=True))


__all__ = [
    "ND", "NdRope", "RopeCall", "SpGroup", "Table", "inv_freq", "rows_table", "same_bits", "to_layout", "unravel",
]
