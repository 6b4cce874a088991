"""Sharding plans: which global token indices a sequence-parallel rank owns, in its order.

Each scheme is one small pure function ``(grid, sp_rank, sp_size, ...) -> int64 indices``.
``-1`` marks a padding row (only ``flat:pad``). For every scheme the ranks' indices partition
the grid exactly. ``ShardPlan`` is the hashable name of a scheme with its parameters; it is
what goes into cache keys and reports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .spec import AXIS_NAMES, hash_once, state_without_hash


class ShardError(ValueError):
    """A scheme cannot shard this grid at this SP size (e.g. sizes not divisible)."""


def _check_rank(sp_rank: int, sp_size: int) -> None:
    if sp_size < 1 or not 0 <= sp_rank < sp_size:
        raise ValueError(f"sp_rank must be in [0, sp_size), got sp_rank={sp_rank}, sp_size={sp_size}")


def _check_axis(grid: tuple[int, ...], axis: int) -> None:
    if not 0 <= axis < len(grid):
        raise ValueError(f"shard axis must be in [0, {len(grid)}) for grid {list(grid)}, got {axis}")


def _divisible(what: str, size: int, parts: int) -> None:
    if size % parts:
        raise ShardError(f"{what} of size {size} is not divisible into {parts} parts")


def _axis_block(grid: tuple[int, ...], axis: int, start: int, length: int) -> torch.Tensor:
    """Row-major flat indices of the block ``start:start+length`` along ``axis``.

    Built as a broadcast sum of per-axis offsets, so only the block's own indices are
    allocated, never an index tensor of the whole grid.
    """
    index = torch.zeros((), dtype=torch.int64)
    stride = math.prod(grid)
    for a, size in enumerate(grid):
        stride //= size
        coords = torch.arange(start, start + length) if a == axis else torch.arange(size)
        index = index.unsqueeze(-1) + coords * stride
    return index.reshape(-1)


def contiguous(grid: tuple[int, ...], sp_rank: int, sp_size: int, axis: int = 0) -> torch.Tensor:
    """A contiguous block of one grid axis, local tokens row-major (FastVideo)."""
    _check_rank(sp_rank, sp_size)
    _check_axis(grid, axis)
    _divisible(f"axis {AXIS_NAMES[axis]}", grid[axis], sp_size)
    n = grid[axis] // sp_size
    return _axis_block(grid, axis, sp_rank * n, n)


def flat(grid: tuple[int, ...], sp_rank: int, sp_size: int, mode: str = "even") -> torch.Tensor:
    """Contiguous split of the flattened sequence (diffusers / xDiT).

    ``even`` needs divisibility; ``pad`` pads the sequence at its end to a multiple of
    ``sp_size`` (padded rows are ``-1``); ``uneven`` uses ``torch.tensor_split`` sizes.
    """
    _check_rank(sp_rank, sp_size)
    total = math.prod(grid)
    if mode == "even":
        _divisible("sequence", total, sp_size)
        n = total // sp_size
        return torch.arange(sp_rank * n, (sp_rank + 1) * n)
    if mode == "pad":
        n = -(-total // sp_size)
        idx = torch.arange(sp_rank * n, (sp_rank + 1) * n)
        return torch.where(idx < total, idx, -1)
    if mode == "uneven":
        # torch.tensor_split sizes (the first total % sp_size ranks get one more), computed
        # without an index tensor of the whole sequence.
        base, extra = divmod(total, sp_size)
        start = sp_rank * base + min(sp_rank, extra)
        return torch.arange(start, start + base + (sp_rank < extra))
    raise ValueError(f"flat mode must be even, pad or uneven, got {mode!r}")


def zigzag(grid: tuple[int, ...], sp_rank: int, sp_size: int, axis: int | None = None) -> torch.Tensor:
    """Head-tail load balancing: of ``2P`` chunks, rank ``r`` owns chunk ``r`` then ``2P-1-r``.

    ``axis=None`` chunks the flattened sequence; otherwise chunks are blocks of that axis.
    """
    _check_rank(sp_rank, sp_size)
    chunks = 2 * sp_size
    if axis is None:
        total = math.prod(grid)
        _divisible("sequence", total, chunks)
        n = total // chunks
        return torch.cat([torch.arange(c * n, (c + 1) * n) for c in (sp_rank, chunks - 1 - sp_rank)])
    _check_axis(grid, axis)
    _divisible(f"axis {AXIS_NAMES[axis]}", grid[axis], chunks)
    n = grid[axis] // chunks
    return torch.cat([_axis_block(grid, axis, c * n, n) for c in (sp_rank, chunks - 1 - sp_rank)])


def stripe(grid: tuple[int, ...], sp_rank: int, sp_size: int) -> torch.Tensor:
    """Token ``i`` goes to rank ``i mod P`` (ring-flash-attention's stripe)."""
    _check_rank(sp_rank, sp_size)
    total = math.prod(grid)
    _divisible("sequence", total, sp_size)
    return torch.arange(sp_rank, total, sp_size)


def usp(grid: tuple[int, ...], sp_rank: int, sp_size: int, ring: int = 2) -> torch.Tensor:
    """Unified SP (yunchang / xDiT): zigzag over the ring degree, Ulysses split inside.

    Ranks are laid out ``rank = ring_rank * ulysses + ulysses_rank`` (Ulysses groups are
    consecutive ranks). The sequence is cut into ``2*ring`` chunks; ring rank ``r`` owns chunks
    ``r`` and ``2*ring-1-r``; each of those two chunks is split contiguously into ``ulysses``
    parts and the rank holds part ``ulysses_rank`` of each.
    """
    _check_rank(sp_rank, sp_size)
    if ring < 1 or sp_size % ring:
        raise ShardError(f"usp ring degree {ring} does not divide SP size {sp_size}")
    ulysses = sp_size // ring
    ring_rank, ulysses_rank = divmod(sp_rank, ulysses)
    total = math.prod(grid)
    _divisible("sequence", total, 2 * ring * ulysses)
    chunk = total // (2 * ring)
    part = chunk // ulysses
    starts = [c * chunk + ulysses_rank * part for c in (ring_rank, 2 * ring - 1 - ring_rank)]
    return torch.cat([torch.arange(s, s + part) for s in starts])


@dataclass(frozen=True)
class ShardPlan:
    """A scheme and its parameters; ``indices`` dispatches to the scheme's function.

    Names (``str(plan)``, also the CLI spelling): ``contiguous:t|h|w``, ``flat``, ``flat:pad``,
    ``flat:uneven``, ``zigzag``, ``zigzag:t|h|w``, ``stripe``, ``usp:R`` (ring degree R).
    """

    scheme: str
    axis: int | None = None
    mode: str = "even"
    ring: int = 2

    # Every cache lookup hashes its plan, as it does its spec.
    __hash__ = hash_once
    __getstate__ = state_without_hash

    def __post_init__(self) -> None:
        if self.scheme == "contiguous" and self.axis is None:  # one spelling, one cache key
            object.__setattr__(self, "axis", 0)

    def indices(self, grid: tuple[int, ...], sp_rank: int, sp_size: int) -> torch.Tensor:
        if sp_size == 1 and sp_rank == 0:  # one rank holds the whole sequence, in order
            return torch.arange(math.prod(grid))
        if self.scheme == "contiguous":
            return contiguous(grid, sp_rank, sp_size, 0 if self.axis is None else self.axis)
        if self.scheme == "flat":
            return flat(grid, sp_rank, sp_size, self.mode)
        if self.scheme == "zigzag":
            return zigzag(grid, sp_rank, sp_size, self.axis)
        if self.scheme == "stripe":
            return stripe(grid, sp_rank, sp_size)
        if self.scheme == "usp":
            return usp(grid, sp_rank, sp_size, self.ring)
        raise ValueError(f"unknown scheme {self.scheme!r}")

    def __str__(self) -> str:
        if self.scheme in ("contiguous", "zigzag") and self.axis is not None:
            return f"{self.scheme}:{AXIS_NAMES[self.axis]}"
        if self.scheme == "flat" and self.mode != "even":
            return f"flat:{self.mode}"
        if self.scheme == "usp":
            return f"usp:{self.ring}"
        return self.scheme


SCHEMES = ("contiguous", "flat", "zigzag", "stripe", "usp")
ALL_PLAN_NAMES = (
    "contiguous:t", "contiguous:h", "contiguous:w", "flat", "flat:pad", "flat:uneven",
    "zigzag", "zigzag:t", "stripe", "usp:2",
)


def _parse_axis(text: str, name: str) -> int:
    if text in AXIS_NAMES:
        return AXIS_NAMES.index(text)
    if text.isdigit():
        return int(text)
    raise ValueError(f"scheme {name!r}: shard axis must be t, h, w or 0-2, got {text!r}")


def parse_plan(name: str) -> ShardPlan:
    """``"contiguous:h"`` → ``ShardPlan("contiguous", axis=1)``; the inverse of ``str(plan)``."""
    scheme, _, arg = name.strip().partition(":")
    if scheme == "contiguous":
        return ShardPlan("contiguous", axis=_parse_axis(arg or "t", name))
    if scheme == "zigzag":
        return ShardPlan("zigzag", axis=_parse_axis(arg, name) if arg else None)
    if scheme == "flat":
        if arg not in ("", "even", "pad", "uneven"):
            raise ValueError(f"scheme {name!r}: flat mode must be pad or uneven, got {arg!r}")
        return ShardPlan("flat", mode=arg or "even")
    if scheme == "stripe" and not arg:
        return ShardPlan("stripe")
    if scheme == "usp":
        if arg and not arg.isdigit():
            raise ValueError(f"scheme {name!r}: usp ring degree must be an integer, got {arg!r}")
        return ShardPlan("usp", ring=int(arg or 2))
    raise ValueError(f"unknown scheme {name!r}; known: {', '.join(ALL_PLAN_NAMES)}")
