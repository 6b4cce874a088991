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

import math
import threading

import torch

from .spec import RopeSpec

Table = tuple[torch.Tensor, torch.Tensor]


def axis_positions(spec: RopeSpec, axis: int) -> torch.Tensor:
    """Scaled positions of one axis, float32, as FastVideo computes them."""
    pos = torch.arange(spec.grid[axis], dtype=torch.float32)
    if axis == 0 and spec.start_frame:
        pos = pos + spec.start_frame
    return pos * spec.interpolation_factor[axis]  # type: ignore[index]


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
    """(axis, first column, width) of every axis block in the output.

    ``neox`` lists each block twice (the second half of the row repeats the first), so both fill
    paths write every column directly and no second pass over the table is needed.
    """
    blocks, col = [], 0
    step = 1 if spec.layout in ("half", "neox") else 2
    for axis, d in enumerate(spec.rope_dim_list):
        blocks.append((axis, col, d // 2 * step))
        col += d // 2 * step
    if spec.layout == "neox":
        blocks += [(axis, col + start, width) for axis, start, width in blocks]
    return blocks


def build_table(spec: RopeSpec, indices: torch.Tensor | None = None, out: Table | None = None) -> Table:
    """cos/sin ``[tokens, spec.width]`` in ``spec.dtype`` on the CPU.

    ``indices`` (int64, global row-major token indices) selects rows in that order; ``-1`` marks
    a padding row, which gets the identity rotation (cos 1, sin 0). ``None`` builds all tokens.
    ``out``: contiguous CPU cos/sin tensors of that shape and dtype to write into (and return).
    """
    n = spec.num_tokens if indices is None else int(indices.numel())
    if out is None:
        cos = torch.empty(n, spec.width, dtype=spec.torch_dtype)
        sin = torch.empty_like(cos)
    else:
        cos, sin = out
        want = f"contiguous CPU [{n}, {spec.width}] {spec.dtype}"
        for t in out:
            fits = t.shape == (n, spec.width) and t.dtype == spec.torch_dtype and t.device.type == "cpu"
            if not (fits and t.is_contiguous()):
                raise ValueError(f"out: expected {want}, got {list(t.shape)} {t.dtype} on {t.device}")
    if indices is None:
        _fill_full(spec, cos, sin)
    else:
        _fill_rows(spec, indices, cos, sin)
    return cos, sin


# Per-axis tables, by everything that shapes one: a sweep builds the same axes for every scheme,
# SP size, rank and re-entry of a spec, and each build would otherwise spend most of its time
# here. Read-only once stored (the fills only read them). Only small ones are kept (a 1-D
# sequence's axis table is its whole table), so the memo holds at most 64 MiB.
_AXIS_MEMO: dict[tuple[object, ...], Table] = {}
_AXIS_MEMO_SIZE = 256
_AXIS_MEMO_MAX_BYTES = 256 * 1024  # per axis (cos + sin); a 720p axis is 160 KiB
_AXIS_MEMO_LOCK = threading.Lock()


def _axis_key(spec: RopeSpec, axis: int) -> tuple[object, ...]:
    return (
        spec.grid[axis],
        spec.rope_dim_list[axis],
        spec.theta,
        spec.theta_rescale_factor[axis],  # type: ignore[index]
        spec.interpolation_factor[axis],  # type: ignore[index]
        spec.start_frame if axis == 0 else 0,  # only time is shifted
        spec.dtype,
        spec.layout == "interleaved",
    )


def _axis_tables(spec: RopeSpec) -> list[Table]:
    return [_layout_axis_table(spec, axis) for axis in range(len(spec.grid))]


def _layout_axis_table(spec: RopeSpec, axis: int) -> Table:
    """One axis's table with the layout's column order applied, from the memo when it holds it."""
    key = _axis_key(spec, axis)
    with _AXIS_MEMO_LOCK:
        table = _AXIS_MEMO.get(key)
    if table is not None:
        return table
    c, s = axis_table(spec, axis)
    table = (c.repeat_interleave(2, dim=1), s.repeat_interleave(2, dim=1)) if spec.layout == "interleaved" else (c, s)
    if 2 * table[0].numel() * table[0].element_size() <= _AXIS_MEMO_MAX_BYTES:
        with _AXIS_MEMO_LOCK:
            if len(_AXIS_MEMO) >= _AXIS_MEMO_SIZE:
                del _AXIS_MEMO[next(iter(_AXIS_MEMO))]  # the oldest
            _AXIS_MEMO[key] = table
    return table


# A slab (one index of the first axis) is copied whole only when it is at least this big, so the
# per-slab Python overhead stays small next to the copy itself.
_SLAB_MIN_BYTES = 1024 * 1024


def _broadcast_fill(out: torch.Tensor, grid: tuple[int, ...], first_axis: int, blocks, tables) -> None:
    """Write each block of axes ``first_axis..`` broadcast over ``out`` viewed as ``[*grid, width]``."""
    view = out.view(*grid, out.shape[-1])
    for axis, col, width in blocks:
        if axis < first_axis:
            continue
        shape = [1] * len(grid) + [width]
        shape[axis - first_axis] = grid[axis - first_axis]
        view[..., col : col + width] = tables[axis].view(shape)


def _fill_grid(
    grid: tuple[int, ...], blocks: list[tuple[int, int, int]], tables: list[Table],
    cos: torch.Tensor, sin: torch.Tensor,
) -> None:
    """Fill ``cos``/``sin`` (rows: ``grid`` row-major) from per-axis tables with ``grid[a]`` rows each.

    Pure memory-bound copies, no index tensors. When each index of the first axis covers a big
    enough slab, the slab is assembled once in a small (cache-resident) buffer, only its
    first-axis block is rewritten per index, and the output is written by one contiguous copy per
    slab: full rows in one pass, instead of one strided pass per axis block.
    """
    width = cos.shape[-1]
    slab_rows = math.prod(grid[1:])
    slab = len(grid) > 1 and slab_rows * width * cos.element_size() >= _SLAB_MIN_BYTES
    for out, part in ((cos, 0), (sin, 1)):
        axis_tables = [t[part] for t in tables]
        if not slab:
            _broadcast_fill(out, grid, 0, blocks, axis_tables)
            continue
        buf = torch.empty(slab_rows, width, dtype=out.dtype)
        _broadcast_fill(buf, grid[1:], 1, blocks, axis_tables)
        first = [(col, w) for axis, col, w in blocks if axis == 0]
        for i, rows in enumerate(out.view(grid[0], slab_rows, width)):
            for col, w in first:
                buf[:, col : col + w] = axis_tables[0][i]
            rows.copy_(buf)


def _fill_full(spec: RopeSpec, cos: torch.Tensor, sin: torch.Tensor) -> None:
    _fill_grid(spec.grid, _blocks(spec), _axis_tables(spec), cos, sin)


def _fill_rows(spec: RopeSpec, indices: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    indices = indices.to(torch.int64)
    if indices.numel() and (int(indices.max()) >= spec.num_tokens or int(indices.min()) < -1):
        raise ValueError(f"indices must lie in [-1, {spec.num_tokens}), got {indices.min()}..{indices.max()}")
    pad = indices < 0
    coords = unravel(indices.clamp(min=0), spec.grid)
    tables = _axis_tables(spec)
    for axis, col, width in _blocks(spec):
        # Gather straight into the output's column block: no temporary, one pass.
        torch.index_select(tables[axis][0], 0, coords[axis], out=cos[:, col : col + width])
        torch.index_select(tables[axis][1], 0, coords[axis], out=sin[:, col : col + width])
    if bool(pad.any()):
        cos[pad] = 1.0
        sin[pad] = 0.0
