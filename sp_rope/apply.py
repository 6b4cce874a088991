"""Apply a cos/sin table to q/k, and the Ulysses attention used by the check's upper levels.

``apply_rope`` rotates ``x [B, S, H, D]`` with ``cos/sin [S, W]`` in the table's layout:

- ``interleaved``: pairs ``(x[2i], x[2i+1])`` rotate by angle i (tables ``[c0,c0,c1,c1,...]``);
- ``neox``: pairs ``(x[i], x[i+D/2])`` (tables ``[c0,c1,...,c0,c1,...]``);
- ``half``: the complex form, pairs ``(x[2i], x[2i+1])`` as one complex number times
  ``cos_i + j sin_i`` (tables of half width).

Compute is float32 (float64 tables are rounded, as the models do), the output has x's dtype.
"""

from __future__ import annotations

import math

import torch


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str) -> torch.Tensor:
    """Rotate ``x [B, S, H, D]`` by the table rows ``cos/sin [S, W]``; returns a new tensor."""
    if x.dim() != 4:
        raise ValueError(f"x must be [B, S, H, D], got shape {tuple(x.shape)}")
    xf = x.float()
    c = cos.float()[None, :, None, :]
    s = sin.float()[None, :, None, :]
    if layout == "half":
        c, s = c.repeat_interleave(2, dim=-1), s.repeat_interleave(2, dim=-1)
        layout = "interleaved"
    if layout == "interleaved":
        pairs = xf.unflatten(-1, (-1, 2))
        rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    elif layout == "neox":
        first, second = xf.chunk(2, dim=-1)
        rotated = torch.cat([-second, first], dim=-1)
    else:
        raise ValueError(f"layout must be interleaved, half or neox, got {layout!r}")
    return (xf * c + rotated * s).to(x.dtype)


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, causal: bool
) -> torch.Tensor:
    """SDPA over ``[B, S, H, D]`` where ``positions`` gives each row's global token index.

    Rows at position ``-1`` are padding: never attended to. Causal means "a token sees the
    tokens at or before its global position", whatever order the rows are held in.
    """
    keys_ok = (positions >= 0)[None, :]
    mask = keys_ok & (positions[None, :] <= positions[:, None]) if causal else keys_ok.expand(len(positions), -1)
    mask = mask | ~(positions >= 0)[:, None]  # padding queries attend somewhere; their rows are dropped
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[None, None]
    )
    return out.transpose(1, 2)


def ulysses_attention(
    batch: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]], group: object
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Ulysses sequence parallelism for one SP group: (non-causal, causal) outputs per item.

    Each item is ``(q, k, v, positions)``: the rank holds ``[1, L, H, D]`` rows (padded to the same
    ``L`` on every rank) whose global positions, for all ranks in rank order, are ``positions
    [P*L]``. One all-to-all turns the sequence shards of q, k, v into head shards (every rank: all
    rows, H/P heads), attention runs over the full sequence, and one all-to-all turns both outputs
    back. All items share those two all-to-alls: collectives, not bytes, dominate at check sizes.
    """
    import torch.distributed as dist

    size = dist.get_world_size(group)  # type: ignore[arg-type]

    def all_to_all(parts: list[torch.Tensor]) -> torch.Tensor:
        # Each part is [P, ...]: row j goes to rank j. Every rank sends the same part sizes.
        send = torch.cat([p.reshape(size, -1) for p in parts], dim=1)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)  # type: ignore[arg-type]
        return recv

    def split(recv: torch.Tensor, shapes: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        sizes = [math.prod(shape) for shape in shapes]
        return [part.reshape(size, *shape) for part, shape in zip(recv.split(sizes, dim=1), shapes)]

    # [L, H, 3D] -> [P, L, H/P, 3D]: chunk j (heads of rank j) goes to rank j.
    shapes = [(q.shape[1], q.shape[2] // size, 3 * q.shape[3]) for q, _, _, _ in batch]
    sent = [torch.cat([q, k, v], dim=-1)[0].reshape(length, size, h, d3).transpose(0, 1)
            for (q, k, v, _), (length, h, d3) in zip(batch, shapes)]
    outs = []
    for received, (_, _, _, positions), (length, h, d3) in zip(split(all_to_all(sent), shapes), batch, shapes):
        # Rows from rank j are rank j's sequence shard: rank order is the order of ``positions``.
        head_q, head_k, head_v = received.reshape(1, size * length, h, d3).split(d3 // 3, dim=-1)
        both = [masked_attention(head_q, head_k, head_v, positions, causal) for causal in (False, True)]
        outs.append(torch.cat(both, dim=-1)[0].reshape(size, length, h, 2 * d3 // 3))
    back_shapes = [(length, h, 2 * d3 // 3) for length, h, d3 in shapes]
    results = []
    for back, (length, h, d2) in zip(split(all_to_all(outs), back_shapes), back_shapes):
        plain, causal = back.transpose(0, 1).reshape(1, length, size * h, d2).split(d2 // 2, dim=-1)
        results.append((plain, causal))
    return results
