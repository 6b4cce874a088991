"""Build RoPE cos/sin tables, whole or for any set of global token indices.

Bit-exactness with FastVideo's builder rests on three facts:
- positions are integers held in float32 (time shifted by ``start_frame``), scaled by the
  interpolation factor in float32, then promoted to the frequency dtype;
- frequencies are ``1 / theta_a ** (arange(0, d, 2) / d)`` computed in the frequency dtype, with
  ``theta_a = theta * r ** (d / (d - 2))`` for a rescale factor ``r != 1``;
- cos/sin are elementwise, so evaluating them on a per-axis 1-D table and then gathering rows
  gives the same bits as evaluating them on the expanded grid. The expensive part (cos/sin)
  therefore costs ``sum(grid)`` rows, not ``prod(grid)``, and a rank's slice never needs the
  whole grid.
"""

from __future__ import annotations

import torch

from .spec import RopeSpec

Table = tuple[torch.Tensor, torch.Tensor]


def axis_positions(spec: RopeSpec, axis: int) -> torch.Tensor:
    """Scaled positions of one axis, float32, as FastVideo computes them."""
    pos = torch.arange(spec.grid[axis], dtype=torch.float32)
    if axis == 0 and spec.start_frame:
        pos = pos + spec.start_frame
    return pos * spec.interpolation_factor[axis]


def axis_frequencies(spec: RopeSpec, axis: int) -> torch.Tensor:
    """``d/2`` inverse frequencies of one axis, in the spec's frequency dtype."""
    d = spec.rope_dim_list[axis]
    theta = spec.theta
    rescale = spec.theta_rescale_factor[axis]  # type: ignore[index]
    if rescale != 1.0:
        theta = theta * rescale ** (d / (d - 2))
    return 1.0 / (theta ** (torch.arange(0, d, 2, dtype=spec.torch_dtype)[: d // 2] / d))


def axis_table(spec: RopeSpec, axis: int) -> Table:
    """cos/sin of one axis, shape ``[grid[axis], d/2]`` (half width, no layout applied)."""
    angles = torch.outer(axis_positions(spec, axis), axis_frequencies(spec, axis))
    return angles.cos(), angles.sin()


def unravel(indices: torch.Tensor, grid: tuple[int, ...]) -> list[torch.Tensor]:
    """Per-axis coordinates of row-major flat token indices."""
    coords = []
    rest = indices
    for size in reversed(grid[1:]):
        coords.append(rest % size)
        rest = rest // size
    coords.append(rest)
    return coords[::-1]


def _blocks(spec: RopeSpec) -> list[tuple[int, int, int]]:
    """(axis, first column, width) of each axis block in the output, before layout duplication."""
    blocks, col = [], 0
    step = 1 if spec.layout in ("half", "neox") else 2
    for axis, d in enumerate(spec.rope_dim_list):
        blocks.append((axis, col, d // 2 * step))
        col += d // 2 * step
    return blocks


def build_table(spec: RopeSpec, indices: torch.Tensor | None = None) -> Table:
    """cos/sin ``[tokens, spec.width]`` in ``spec.dtype`` on the CPU.

    ``indices`` (int64, global row-major token indices) selects rows in that order; ``-1`` marks
    a padding row, which gets the identity rotation (cos 1, sin 0). ``None`` builds all tokens.
    """
    n = spec.num_tokens if indices is None else int(indices.numel())
    cos = torch.empty(n, spec.width, dtype=spec.torch_dtype)
    sin = torch.empty_like(cos)
    if indices is None:
        _fill_full(spec, cos, sin)
    else:
        _fill_rows(spec, indices, cos, sin)
    if spec.layout == "neox":
        half = spec.head_dim // 2
        cos[:, half:] = cos[:, :half]
        sin[:, half:] = sin[:, :half]
    return cos, sin


def _axis_tables(spec: RopeSpec) -> list[Table]:
    tables = [axis_table(spec, axis) for axis in range(len(spec.grid))]
    if spec.layout == "interleaved":
        tables = [(c.repeat_interleave(2, dim=1), s.repeat_interleave(2, dim=1)) for c, s in tables]
    return tables


def _fill_full(spec: RopeSpec, cos: torch.Tensor, sin: torch.Tensor) -> None:
    # Broadcast each axis block over the grid: a pure memory-bound copy, no index tensors.
    ndim = len(spec.grid)
    grid_cos = cos.view(*spec.grid, spec.width)
    grid_sin = sin.view(*spec.grid, spec.width)
    for (axis, col, width), (c, s) in zip(_blocks(spec), _axis_tables(spec)):
        shape = [1] * ndim + [width]
        shape[axis] = spec.grid[axis]
        grid_cos[..., col : col + width] = c.view(shape)
        grid_sin[..., col : col + width] = s.view(shape)


def _fill_rows(spec: RopeSpec, indices: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    indices = indices.to(torch.int64)
    if indices.numel() and (int(indices.max()) >= spec.num_tokens or int(indices.min()) < -1):
        raise ValueError(f"indices must lie in [-1, {spec.num_tokens}), got {indices.min()}..{indices.max()}")
    pad = indices < 0
    coords = unravel(indices.clamp(min=0), spec.grid)
    for (axis, col, width), (c, s) in zip(_blocks(spec), _axis_tables(spec)):
        cos[:, col : col + width] = c.index_select(0, coords[axis])
        sin[:, col : col + width] = s.index_select(0, coords[axis])
    if bool(pad.any()):
        cos[pad] = 1.0
        sin[pad] = 0.0
