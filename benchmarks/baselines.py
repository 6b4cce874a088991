"""The baselines the figures are ratios against, written here from FastVideo's documented semantics
(tests/assets/README.md), not copied from FastVideo.

- ``naive_full``: FastVideo's builder shape: a float32 ``linspace`` meshgrid of the whole grid,
  ``start_frame`` added to the time positions, per axis an outer product over *all* tokens, cos/sin
  of all tokens, ``repeat_interleave`` for the real (interleaved) layout, ``cat`` of the axes.
- ``naive_rank``: ``naive_full`` then this rank's contiguous block along ``shard_dim``.
- ``MemoRope``: FastVideo's table cache: a plain dict keyed on a tuple of the builder's arguments.
"""

from __future__ import annotations

import torch

Table = tuple[torch.Tensor, torch.Tensor]


def _per_axis(value: float | list[float], ndim: int) -> list[float]:
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)] * ndim


def naive_full(
    rope_sizes: list[int],
    rope_dim_list: list[int],
    theta: float = 10000.0,
    use_real: bool = True,
    theta_rescale_factor: float | list[float] = 1.0,
    interpolation_factor: float | list[float] = 1.0,
    dtype: torch.dtype = torch.float64,
    start_frame: int = 0,
) -> Table:
    ndim = len(rope_sizes)
    axes = [torch.linspace(0, n, n + 1, dtype=torch.float32)[:n] for n in rope_sizes]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)  # [ndim, *rope_sizes]
    if start_frame:
        grid[0] += start_frame
    rescale, interp = _per_axis(theta_rescale_factor, ndim), _per_axis(interpolation_factor, ndim)
    cos_parts, sin_parts = [], []
    for axis, d in enumerate(rope_dim_list):
        base = theta * rescale[axis] ** (d / (d - 2)) if rescale[axis] != 1.0 else theta
        freqs = 1.0 / (base ** (torch.arange(0, d, 2)[: d // 2].to(dtype) / d))
        angles = torch.outer(grid[axis].reshape(-1) * interp[axis], freqs)  # every token of the grid
        cos, sin = angles.cos(), angles.sin()
        if use_real:
            cos, sin = cos.repeat_interleave(2, dim=1), sin.repeat_interleave(2, dim=1)
        cos_parts.append(cos)
        sin_parts.append(sin)
    return torch.cat(cos_parts, dim=1), torch.cat(sin_parts, dim=1)


def rank_block(
    table: torch.Tensor, rope_sizes: list[int], shard_dim: int, sp_rank: int, world: int
) -> torch.Tensor:
    """Rows of the contiguous block ``[rank*n, (rank+1)*n)`` of ``shard_dim``, row-major."""
    n = rope_sizes[shard_dim] // world
    grid = table.view(*rope_sizes, table.shape[-1])
    return grid.narrow(shard_dim, sp_rank * n, n).reshape(-1, table.shape[-1])


def naive_rank(
    rope_sizes: list[int], rope_dim_list: list[int], shard_dim: int, sp_rank: int, world: int,
    **kwargs: object,
) -> Table:
    cos, sin = naive_full(rope_sizes, rope_dim_list, **kwargs)  # type: ignore[arg-type]
    return tuple(rank_block(t, rope_sizes, shard_dim, sp_rank, world) for t in (cos, sin))  # type: ignore[return-value]


class MemoRope:
    """FastVideo's memo: ``dict[tuple of args] -> (cos, sin)``; no bound, no lock, no checks."""

    def __init__(self) -> None:
        self.tables: dict[tuple, Table] = {}

    def get(
        self, rope_sizes: list[int], rope_dim_list: list[int], theta: float, use_real: bool,
        theta_rescale_factor: float, interpolation_factor: float, shard_dim: int, sp_rank: int,
        sp_world_size: int, start_frame: int, dtype: torch.dtype,
    ) -> Table:
        key = (tuple(rope_sizes), tuple(rope_dim_list), theta, use_real, theta_rescale_factor,
               interpolation_factor, shard_dim, sp_rank, sp_world_size, start_frame, dtype)
        hit = self.tables.get(key)
        if hit is None:
            hit = self.tables[key] = naive_rank(
                rope_sizes, rope_dim_list, shard_dim, sp_rank, sp_world_size, theta=theta, use_real=use_real,
                theta_rescale_factor=theta_rescale_factor, interpolation_factor=interpolation_factor,
                dtype=dtype, start_frame=start_frame,
            )
        return hit
