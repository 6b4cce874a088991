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

from .apply import apply_rope, masked_attention, ulysses_attention
from .cache import RopeSlice
from .report import CaseResult
from .sharding import ShardPlan
from .verify import token_name

LEVELS = {
    "table": ("table",),
    "apply": ("table", "apply"),
    "attention": ("table", "attention"),
    "all": ("table", "apply", "attention"),
}
MAX_TOKENS = 65_536  # hidden states of the full sequence live on every rank; bound their memory
APPLY_TOL = 1e-6  # float32 rotation of identical inputs: equal up to rounding of the same ops
ATTENTION_TOL = 1e-5  # float32 attention, relative and absolute (different reduction orders)
SEED = 20261127


@dataclass
class HiddenStates:
    """Seeded q, k, v ``[1, N, H, D]`` float32 for the whole sequence, identical on every rank.

    H is the world size: the fewest heads every SP group size divides (Ulysses shards heads).
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


def rotate_local(
    hs: HiddenStates, sl: RopeSlice, plan_indices: torch.Tensor, layout: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank's q/k (its plan tokens) rotated with the rank's table rows."""
    cos, sin = sl.cos.cpu(), sl.sin.cpu()
    if cos.shape[0] != len(plan_indices):
        raise _RowCountMismatch(f"table has {cos.shape[0]} rows, the rank holds {len(plan_indices)} tokens")
    return (
        apply_rope(shard_rows(hs.q, plan_indices), cos, sin, layout),
        apply_rope(shard_rows(hs.k, plan_indices), cos, sin, layout),
    )


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
    hs: HiddenStates, rq: torch.Tensor, rk: torch.Tensor, plan: ShardPlan, grid: tuple[int, ...],
    sp_rank: int, sp_size: int, device: str,
) -> AttentionInput:
    per_rank = [plan.indices(grid, r, sp_size) for r in range(sp_size)]
    length = max(len(i) for i in per_rank)
    positions = torch.cat([torch.cat([i, i.new_full((length - len(i),), -1)]) for i in per_rank])
    own = len(per_rank[sp_rank])

    def pad(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x.new_zeros(1, length - own, *x.shape[2:])], dim=1).to(device)

    return AttentionInput(pad(rq), pad(rk), pad(shard_rows(hs.v, per_rank[sp_rank])), positions.to(device), own)


def attention_local(inputs: list[AttentionInput], group: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Ulysses attention (non-causal, causal) of each input, two all-to-alls for all of them;
    returns the rank's own output rows, on the CPU. Every rank of the group passes the same list."""
    outs = ulysses_attention([(a.q, a.k, a.v, a.positions) for a in inputs], group)
    return [(plain[:, : a.own].cpu(), causal[:, : a.own].cpu()) for a, (plain, causal) in zip(inputs, outs)]


@dataclass
class LevelReference:
    """Single-rank results for one spec: rotated q/k of the whole sequence, and attention."""

    rq: torch.Tensor
    rk: torch.Tensor
    attention: tuple[torch.Tensor, torch.Tensor] | None = None


def reference_for(hs: HiddenStates, reference: RopeSlice, layout: str, with_attention: bool) -> LevelReference:
    rq = apply_rope(hs.q, reference.cos.cpu(), reference.sin.cpu(), layout)
    rk = apply_rope(hs.k, reference.cos.cpu(), reference.sin.cpu(), layout)
    ref = LevelReference(rq, rk)
    if with_attention:
        positions = torch.arange(rq.shape[1])
        ref.attention = (
            masked_attention(rq, rk, hs.v, positions, False),
            masked_attention(rq, rk, hs.v, positions, True),
        )
    return ref


def verify_apply(
    case: CaseResult,
    ref: LevelReference,
    rank: int,
    plan: ShardPlan,
    plan_indices: torch.Tensor,
    rotated_q: torch.Tensor,
    grid: tuple[int, ...],
) -> None:
    real = plan_indices >= 0
    _compare(
        case,
        "apply-mismatch",
        f"rank {rank} ({plan}, P={case.sp_size}) rotated q",
        rotated_q[:, real],
        ref.rq[:, plan_indices[real]],
        plan_indices[real],
        grid,
        APPLY_TOL,
    )


def verify_attention(
    case: CaseResult,
    ref: LevelReference,
    rank: int,
    plan: ShardPlan,
    plan_indices: torch.Tensor,
    outputs: tuple[torch.Tensor, torch.Tensor],
    grid: tuple[int, ...],
) -> None:
    assert ref.attention is not None
    real = plan_indices >= 0
    for kind, got, full in zip(("non-causal", "causal"), outputs, ref.attention):
        _compare(
            case,
            "attention-mismatch",
            f"rank {rank} ({plan}, P={case.sp_size}) {kind} Ulysses attention",
            got[:, real],
            full[:, plan_indices[real]],
            plan_indices[real],
            grid,
            ATTENTION_TOL,
        )


def _compare(
    case: CaseResult,
    diagnosis: str,
    what: str,
    got: torch.Tensor,
    want: torch.Tensor,
    tokens: torch.Tensor,
    grid: tuple[int, ...],
    tol: float,
) -> None:
    err = (got.double() - want.double()).abs()
    bad = (err > tol * (1 + want.double().abs())).flatten(2).any(dim=(0, 2))
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        worst = float(err.max())
        case.max_abs_error = max(case.max_abs_error, worst)
        case.fail(
            diagnosis,
            f"{what} differs from the single-rank result at token {token_name(int(tokens[row]), grid)}, "
            f"max abs error {worst:.3g} (tolerance {tol:g} relative)",
        )
