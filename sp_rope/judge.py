"""The comparisons behind a verdict; pure functions, no process groups.

- ``compare_slices``: gathered rank slices vs the unsharded table, bit for bit, tokens checked
  against the plan (any permutation or padding is undone through the riding indices);
- ``compare_oracle``: the unsharded table vs the float64 formula within a per-dtype tolerance;
- ``find_key_collisions``: cache keys shared inside an SP group, or one key, two tables.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from .cache import RopeSlice
from .oracle import oracle_table, tolerance
from .report import CaseResult
from .sharding import ShardPlan
from .spec import AXIS_NAMES, RopeSpec
from .tables import unravel

_MIX = 0x9E3779B97F4A7C15 - 2**64  # golden-ratio odd constant, as a signed int64


def tensor_digest(*tensors: torch.Tensor) -> str:
    """A content digest of tensors (dtype, shape and bits), without numpy.

    Two wrapping int64 weighted sums over the raw bytes; equal tables give equal digests,
    and any realistic difference changes them.
    """
    h = hashlib.blake2b(digest_size=12)
    for t in tensors:
        raw = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        pad = (-raw.numel()) % 8
        words = torch.cat([raw, raw.new_zeros(pad)]).view(torch.int64)
        weights = torch.arange(1, 2 * words.numel() + 1, 2, dtype=torch.int64) * _MIX
        sums = (int((words * weights).sum()), int((words ^ (words >> 29)).mul(weights | 1).sum()))
        h.update(f"{t.dtype}{tuple(t.shape)}{sums}".encode())
    return h.hexdigest()


def key_digest(key: object) -> str:
    return hashlib.blake2b(repr(key).encode(), digest_size=8).hexdigest()


def token_name(index: int, grid: tuple[int, ...]) -> str:
    coords = [int(c) for c in unravel(torch.tensor([index]), grid)]
    return "(" + ", ".join(f"{AXIS_NAMES[a]}={c}" for a, c in enumerate(coords)) + ")"


@dataclass
class RankPayload:
    """What one rank sends its group leader for one case: its first-step slice, on the CPU."""

    rank: int
    indices: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    extras: dict = field(default_factory=dict)  # upper-level outputs: "apply", "attention"


def compare_slices(
    case: CaseResult, spec: RopeSpec, plan: ShardPlan, payloads: list[RankPayload], reference: RopeSlice
) -> None:
    """Each rank's rows must equal the unsharded table at the tokens the rank claims (its riding
    indices), and the claimed tokens of the group must partition the grid. Whether those are the
    tokens the plan gives the rank's hidden states is the apply level's question."""
    grid, n = spec.grid, spec.num_tokens
    ref_cos, ref_sin = reference.cos.cpu(), reference.sin.cpu()
    seen = torch.zeros(n, dtype=torch.int64)
    for p in payloads:
        claimed = p.indices.to(torch.int64).cpu()
        if (
            p.cos.shape != (len(claimed), ref_cos.shape[1])
            or p.cos.dtype != ref_cos.dtype
            or p.sin.shape != p.cos.shape
        ):
            case.fail(
                "slice-mismatch",
                f"rank {p.rank} ({plan}) returned cos {tuple(p.cos.shape)} {p.cos.dtype} for {len(claimed)} tokens, "
                f"expected {(len(claimed), ref_cos.shape[1])} {ref_cos.dtype}",
            )
            continue
        if claimed.numel() and (int(claimed.max()) >= n or int(claimed.min()) < -1):
            case.fail("slice-mismatch", f"rank {p.rank} ({plan}) claims token indices outside [-1, {n})")
            continue
        real = claimed >= 0
        tokens = claimed[real]
        seen.index_add_(0, tokens, torch.ones_like(tokens))
        for name, got, ref in (("cos", p.cos, ref_cos), ("sin", p.sin, ref_sin)):
            got_real, want = got[real], ref[tokens]
            bad = (got_real != want).any(dim=1)
            if bool(bad.any()):
                row = int(bad.nonzero()[0])
                err = float((got_real.double() - want.double()).abs().max())
                case.max_abs_error = max(case.max_abs_error, err)
                case.fail(
                    "slice-mismatch",
                    f"rank {p.rank} ({plan}, P={case.sp_size}) {name} differs from the unsharded table at "
                    f"token {token_name(int(tokens[row]), grid)} (local row {int(real.nonzero()[row])}), "
                    f"max abs error {err:.3g}",
                )
            pad_rows = got[~real]
            identity = 1.0 if name == "cos" else 0.0
            if pad_rows.numel() and not bool((pad_rows == identity).all()):
                case.fail("slice-mismatch", f"rank {p.rank} ({plan}) padding rows of {name} are not {identity}")
    if case.status != "failed" and (bool((seen == 0).any()) or bool((seen > 1).any())):
        token = int(((seen == 0) | (seen > 1)).nonzero()[0])
        case.fail(
            "slice-mismatch",
            f"ranks' tokens ({plan}, P={case.sp_size}) do not partition the grid: token {token_name(token, grid)} "
            f"held {int(seen[token])} times",
        )


def compare_oracle(case: CaseResult, spec: RopeSpec, reference: RopeSlice) -> None:
    tol = tolerance(spec)
    want_cos, want_sin = oracle_table(spec)
    for name, got, want in (("cos", reference.cos, want_cos), ("sin", reference.sin, want_sin)):
        got = got.cpu()
        if got.shape != want.shape:
            case.fail(
                "oracle-mismatch",
                f"unsharded {name} has shape {tuple(got.shape)}, the formula gives {tuple(want.shape)}",
            )
            return
        err = (got.double() - want).abs()
        worst = float(err.max()) if err.numel() else 0.0
        if not worst <= tol:  # also catches NaN
            row = int((err > tol).any(dim=1).nonzero()[0]) if worst == worst else 0
            case.max_abs_error = max(case.max_abs_error, worst)
            case.fail(
                "oracle-mismatch",
                f"unsharded {name} ({spec.dtype}, {spec.layout}) differs from the float64 formula by {worst:.3g} "
                f"> tolerance {tol:.3g}, first at token {token_name(row, spec.grid)}",
            )


@dataclass(frozen=True)
class KeyRecord:
    """One cache lookup seen on one rank: which key, which table came back, for which case."""

    key: str  # digest of repr(key)
    key_text: str  # a short repr for messages
    table: str  # digest of the returned table
    rank: int
    sp_size: int
    group: int  # index of the SP group of this size (global rank // sp_size)
    case: int


def find_key_collisions(records: list[KeyRecord]) -> list[tuple[set[int], str]]:
    """(case indices involved, message) for every violation of "no shared cache entries"."""
    by_key: dict[str, list[KeyRecord]] = defaultdict(list)
    for rec in records:
        by_key[rec.key].append(rec)
    found: list[tuple[set[int], str]] = []
    for recs in by_key.values():
        text = recs[0].key_text
        groups: dict[tuple[int, int], set[int]] = defaultdict(set)
        for rec in recs:
            if rec.sp_size > 1:
                groups[(rec.sp_size, rec.group)].add(rec.rank)
        for (size, group), ranks in sorted(groups.items()):
            if len(ranks) > 1:
                cases = {r.case for r in recs if r.sp_size == size and r.group == group}
                found.append((cases, f"ranks {sorted(ranks)} of SP group {group} (P={size}) share cache key {text}"))
        tables: dict[str, KeyRecord] = {}
        for rec in recs:
            tables.setdefault(rec.table, rec)
        if len(tables) > 1:
            a, b = list(tables.values())[:2]
            found.append(
                (
                    {r.case for r in recs},
                    f"cache key {text} maps to two different tables "
                    f"(rank {a.rank} P={a.sp_size} and rank {b.rank} P={b.sp_size})",
                )
            )
    return found
