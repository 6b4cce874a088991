"""The check's upper levels: does the rank's table rotate the rank's own hidden states right?

The table level proves each rank's rows are right for the tokens the rank *claims*. These
levels feed the tokens the rank actually *holds* — hidden states sharded by the plan — through
the rotation (``apply``) and through Ulysses sequence-parallel attention (``attention``), and
compare with the single-rank computation. A table built for another token order (hidden states
permuted by zigzag but RoPE not, or the reverse) passes the table level and fails here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .apply import apply_rope, ulysses_attention
from .cache import RopeSlice

LEVELS = {
    "table": ("table",),
    "apply": ("table", "apply"),
    "attention": ("table", "attention"),
    "all": ("table", "apply", "attention"),
}
MAX_TOKENS = 65_536  # hidden states of the full sequence live on every rank; bound their memory
MAX_ATTENTION_TOKENS = 8192  # the reference attention's [N, N] mask and scores stay small
SEED = 20261127


@dataclass
class HiddenStates:
    """Seeded q, k, v ``[1, N, H, D]`` float32 for the whole sequence, identical on every rank.

    H is divisible by every SP size of the run (Ulysses shards heads), or 1 where no attention
    runs (grids over ``MAX_ATTENTION_TOKENS``: only the rotation is checked there).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


def draw_hidden_states(num_tokens: int, heads: int, head_dim: int, device: str) -> HiddenStates:
    """Rank 0 draws, everyone receives (one broadcast per geometry)."""
    qkv = torch.empty(3, 1, num_tokens, heads, head_dim, device=device)
    if dist.get_rank() == 0:
        qkv.copy_(torch.randn(qkv.shape, generator=torch.Generator().manual_seed(SEED)))
    dist.broadcast(qkv, src=0)
    q, k, v = qkv.cpu().unbind(0)
    return HiddenStates(q, k, v)


def shard_rows(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The rows of ``x [1, N, ...]`` a rank holds under the plan; padding rows are zeros."""
    rows = x[:, indices.clamp(min=0)]
    rows[:, indices < 0] = 0
    return rows


def rotate_rows(rows: torch.Tensor, sl: RopeSlice, layout: str) -> torch.Tensor:
    """The rank's rows ``[1, n, H, D]`` (its plan tokens) rotated with the rank's table rows."""
    cos, sin = sl.cos.cpu(), sl.sin.cpu()
    if cos.shape[0] != rows.shape[1]:
        raise _RowCountMismatch(f"table has {cos.shape[0]} rows, the rank holds {rows.shape[1]} tokens")
    return apply_rope(rows, cos, sin, layout)


class _RowCountMismatch(ValueError):
    pass


@dataclass
class AttentionInput:
    """One family's rotated rows for Ulysses attention, padded to the group's longest shard."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor  # global token of every padded row of every rank, rank order (-1: padding)
    own: int  # this rank's real rows (the first ``own`` of its ``L``)


def attention_input(
    hs: HiddenStates,
    rotated: tuple[torch.Tensor, torch.Tensor],
    per_rank: list[torch.Tensor],
    sp_rank: int,
    device: str,
) -> AttentionInput:
    """The rank's rotated q/k (and its v) padded to the group's longest shard; ``per_rank`` holds
    the plan's tokens of every rank of the group, in SP-rank order."""
    length = max(len(i) for i in per_rank)
    positions = torch.cat([torch.cat([i, i.new_full((length - len(i),), -1)]) for i in per_rank])
    own = len(per_rank[sp_rank])

    def pad(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x.new_zeros(1, length - own, *x.shape[2:])], dim=1).to(device)

    rq, rk = rotated
    return AttentionInput(pad(rq), pad(rk), pad(shard_rows(hs.v, per_rank[sp_rank])), positions.to(device), own)


def attention_local(inputs: list[AttentionInput], group: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Ulysses attention (non-causal, causal) of each input, two all-to-alls for all of them;
    returns the rank's own output rows, on the CPU. Every rank of the group passes the same list."""
    outs = ulysses_attention([(a.q, a.k, a.v, a.positions) for a in inputs], group)
    return [(plain[:, : a.own].cpu(), causal[:, : a.own].cpu()) for a, (plain, causal) in zip(inputs, outs)]
