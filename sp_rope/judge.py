"""Judging: every comparison behind a verdict, in one place; no process groups.

Each rank judges its own slices where they are, so what crosses the wire is findings, not tables:

- ``judge_slice``: the rank's rows vs the implementation's unsharded table, row by row through
  ``ReferenceRows`` (per-row digests, so a rank need not hold the largest tables and a slice at
  once; smaller tables are held and compared directly), at the tokens the rank claims; the
  claimed tokens must be the plan's (``plan-mismatch``); padding rows are the identity;
- ``compare_oracle``: the unsharded table vs the independent float64 formula, within a per-dtype
  tolerance (once per spec, on one rank: the specs are spread over the ranks);
- ``judge_apply`` / ``judge_attention``: the upper levels, against single-rank results;
- ``Retention``: every tensor handed out is re-checked later (``overwritten-after-return``);
- ``find_key_collisions`` and ``check_partition``: on rank 0, over what every rank reported.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import weakref
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .apply import apply_rope, masked_attention
from .cache import RopeSlice
from .oracle import oracle_table, tolerance
from .report import CaseResult
from .sharding import ShardPlan
from .spec import AXIS_NAMES, RopeSpec
from .tables import unravel

APPLY_TOL = 1e-6  # float32 rotation of identical inputs: equal up to rounding of the same ops
ATTENTION_TOL = 1e-5  # float32 attention, relative and absolute (different reduction orders)

DIGEST_COLUMNS = 4099  # a prime: no row width of a table lines its rows up with the columns
SMALL_DIGEST_BYTES = 64 * 1024


def content_digest(*tensors: torch.Tensor) -> tuple[object, ...]:
    """A content digest per tensor: dtype, shape, and a fingerprint of the raw bytes.

    Used to see whether a table changed (across steps, after return): a 128-bit
    BLAKE2b of the bytes up to 64 KiB; larger, of the wrapping sums of the raw machine words in
    each of 4099 interleaved columns (word i in column i mod 4099) — one reduction pass, several
    times cheaper than hashing every byte, and any change that leaves one changed word in some
    column is seen (README: "Digests")."""
    parts: list[object] = []
    for t in tensors:
        flat = t.detach().to("cpu").contiguous().reshape(-1)
        nbytes = flat.numel() * flat.element_size()
        fingerprint = hashlib.blake2b(digest_size=16)
        if nbytes <= SMALL_DIGEST_BYTES:
            fingerprint.update(ctypes.string_at(flat.data_ptr(), nbytes) if nbytes else b"")
        else:
            words = flat.view(torch.uint8).view(torch.int64 if nbytes % 8 == 0 else torch.int32)
            whole = words.numel() - words.numel() % DIGEST_COLUMNS
            columns = words[:whole].view(-1, DIGEST_COLUMNS).sum(0, dtype=torch.int64)
            tail = words[whole:].to(torch.int64)
            for part in (columns, tail):
                fingerprint.update(ctypes.string_at(part.data_ptr(), part.numel() * 8) if part.numel() else b"")
        parts.append((str(t.dtype), tuple(t.shape), fingerprint.hexdigest()))
    return tuple(parts)


@functools.lru_cache(maxsize=4096)
def plan_tokens(plan: ShardPlan, grid: tuple[int, ...], sp_rank: int, sp_size: int) -> torch.Tensor:
    """The plan's tokens of one rank, computed once (read-only: callers never write into it)."""
    return plan.indices(grid, sp_rank, sp_size)


def key_digest(key: object) -> str:
    return hashlib.blake2b(repr(key).encode(), digest_size=8).hexdigest()


def token_name(index: int, grid: tuple[int, ...]) -> str:
    coords = [int(c) for c in unravel(torch.tensor([index]), grid)]
    return "(" + ", ".join(f"{AXIS_NAMES[a]}={c}" for a, c in enumerate(coords)) + ")"


ORACLE_ROWS = 1024  # rows of the formula evaluated at once: its float64 temporaries stay a few MiB


def compare_oracle(case: CaseResult, spec: RopeSpec, reference: RopeSlice) -> None:
    """The unsharded table vs the float64 formula within ``tolerance(spec)``, a block of rows at a
    time (the formula's float64 intermediates for a 720p table would be several tables' worth)."""
    tol = tolerance(spec)
    cos, sin = reference.cos.cpu(), reference.sin.cpu()
    if tuple(cos.shape) != (spec.num_tokens, spec.width) or sin.shape != cos.shape:
        case.fail(
            "oracle-mismatch",
            f"unsharded table has shape {tuple(cos.shape)}, the formula gives {(spec.num_tokens, spec.width)}",
        )
        return
    worst = {"cos": 0.0, "sin": 0.0}
    first: dict[str, int] = {}
    for start in range(0, spec.num_tokens, ORACLE_ROWS):
        rows = torch.arange(start, min(start + ORACLE_ROWS, spec.num_tokens))
        for name, got, want in zip(("cos", "sin"), (cos[rows], sin[rows]), oracle_table(spec, rows)):
            err = (got.double() - want).abs()
            block = float(err.max()) if err.numel() else 0.0
            if not block <= tol and name not in first:  # also catches NaN
                first[name] = start + int(((err > tol) | err.isnan()).any(dim=1).nonzero()[0])
            worst[name] = block if block != block else max(worst[name], block)
    for name, row in first.items():
        case.max_abs_error = max(case.max_abs_error, worst[name])
        case.fail(
            "oracle-mismatch",
            f"unsharded {name} ({spec.dtype}, {spec.layout}) differs from the float64 formula by {worst[name]:.3g} "
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
    group: str  # the SP group: layout kind and index ("consecutive0", "strided1", "offset0")
    case: int


@dataclass(frozen=True)
class KeyCollision:
    """One cache key that two ranks' calls reached for two different tables."""

    cases: set[int]
    message: str
    first: KeyRecord
    other: KeyRecord  # a call that got another table than ``first`` under the same key


def find_key_collisions(records: list[KeyRecord]) -> list[KeyCollision]:
    """Every cache key that maps to two different tables: on two ranks of one SP group (a key
    without the SP rank, or an offset the rank derives), or anywhere else. Ranks that reach one
    key for one table (a cache keyed on the positions a rank covers: rank r at start_frame 1 and
    rank r + 1 at 0 hold the same frames) share a correct entry. Whether one process asking for
    both calls' inputs hands the second the first's table is for the caller to replay."""
    by_key: dict[str, list[KeyRecord]] = defaultdict(list)
    for rec in records:
        by_key[rec.key].append(rec)
    found: list[KeyCollision] = []
    for recs in by_key.values():
        tables: dict[str, KeyRecord] = {}
        for rec in recs:
            tables.setdefault(rec.table, rec)
        if len(tables) == 1:
            continue
        text = recs[0].key_text
        groups: dict[tuple[int, str], list[KeyRecord]] = defaultdict(list)
        for rec in recs:
            if rec.sp_size > 1:
                groups[(rec.sp_size, rec.group)].append(rec)
        shared = False
        for (size, group), members in sorted(groups.items()):
            ranks = sorted({r.rank for r in members})
            other = next((r for r in members if r.table != members[0].table), None)
            if len(ranks) > 1 and other is not None:
                shared = True
                found.append(KeyCollision({r.case for r in members}, f"ranks {ranks} of SP group {group} (P={size}) "
                                          f"share cache key {text}, for different tables", members[0], other))
        if not shared:
            a, b = list(tables.values())[:2]
            found.append(KeyCollision({r.case for r in recs}, f"cache key {text} maps to two different tables "
                                      f"(rank {a.rank} P={a.sp_size} and rank {b.rank} P={b.sp_size})", a, b))
    return found


def judge_reference(case: CaseResult, spec: RopeSpec, reference: RopeSlice) -> bool:
    """The unsharded table must have the spec's shape and dtype: nothing else can be compared
    against one that has not. Returns whether it has."""
    want = ((spec.num_tokens, spec.width), spec.torch_dtype)
    got = (tuple(reference.cos.shape), reference.cos.dtype)
    if got == want and reference.sin.shape == reference.cos.shape and reference.sin.dtype == reference.cos.dtype:
        return True
    case.fail(
        "oracle-mismatch",
        f"the unsharded table is {list(reference.cos.shape)} {reference.cos.dtype}, "
        f"the spec needs {list(want[0])} {want[1]}",
    )
    return False


@dataclass(frozen=True)
class RankSlice:
    """One rank's first-call slice for a case, with where the rank sits."""

    rank: int
    sp_rank: int
    plan: ShardPlan
    table: RopeSlice


def judge_slice(case: CaseResult, spec: RopeSpec, got: RankSlice, reference: ReferenceRows) -> torch.Tensor | None:
    """Judge one rank's slice where it was built. Returns the claimed tokens when they are not the
    plan's (rank 0 then checks the group's claims still partition the grid), else None."""
    sl, plan, where = got.table, got.plan, f"rank {got.rank} ({got.plan}, P={case.sp_size})"
    if (
        sl.indices.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
        or sl.indices.dtype == torch.bool
    ):
        case.fail("slice-mismatch", f"{where} returned token indices of dtype {sl.indices.dtype}, not integers")
        return None
    claimed = sl.indices.to("cpu", torch.int64).reshape(-1)
    cos, sin = sl.cos.detach().cpu(), sl.sin.detach().cpu()
    want_shape = (len(claimed), reference.width)
    if {cos.shape, sin.shape} != {want_shape} or {cos.dtype, sin.dtype} != {reference.dtype}:
        case.fail(
            "slice-mismatch",
            f"{where} returned cos {tuple(cos.shape)} {cos.dtype} for {len(claimed)} tokens, "
            f"expected {want_shape} {reference.dtype}",
        )
        return None
    own = plan_tokens(plan, spec.grid, got.sp_rank, case.sp_size)
    on_plan = claimed.shape == own.shape and torch.equal(claimed, own)
    n = spec.num_tokens
    if not on_plan and claimed.numel() and (int(claimed.max()) >= n or int(claimed.min()) < -1):
        case.fail("slice-mismatch", f"{where} claims token indices outside [-1, {n})")
        return None
    off_plan = None
    if not on_plan:
        at = _first_difference(claimed, own)
        case.fail(
            "plan-mismatch",
            f"{where} claims {len(claimed)} tokens, the plan gives it {len(own)}; first difference at local row {at}: "
            f"claimed {_token_or_pad(claimed, at, spec.grid)}, plan {_token_or_pad(own, at, spec.grid)}",
        )
        off_plan = claimed
    table = functools.cache(reference.table)  # at most once per slice, and only for a mismatch
    for name, rows in (("cos", cos), ("sin", sin)):
        _compare_rows(case, RowsUnderJudgement(where, name, rows, claimed, spec.grid), reference, table)
    return off_plan


# --- row digests -------------------------------------------------------------------------------

ROW_DIGEST_PRIME = 65_537  # above every 16-bit word: distinct words stay distinct modulo it
ROW_DIGEST_WIDTH = 4  # independent hashes per row: two different rows agree in all with p**-4 < 2**-64
ROW_BLOCK = 1024  # rows widened to float64 words at once: a few MiB, never a table's worth


@functools.lru_cache(maxsize=64)
def _row_coefficients(words: int, seed: int) -> torch.Tensor:
    """Uniform coefficients modulo the prime, one row per hash, drawn from the run's seed."""
    generator = torch.Generator().manual_seed(seed)
    drawn = torch.randint(0, ROW_DIGEST_PRIME, (words, ROW_DIGEST_WIDTH), generator=generator)
    return drawn.to(torch.float64).T.contiguous()


def _words(rows: torch.Tensor) -> torch.Tensor:
    """The rows' signed 16-bit words, -0.0 read as 0.0 (``x + 0.0``), as an equality test would."""
    return (rows + 0.0).view(torch.int16)


def row_digests(table: torch.Tensor, seed: int) -> torch.Tensor:
    """``[rows, ROW_DIGEST_WIDTH]`` int32: per row, ``sum_i a_i * w_i mod p`` for the row's signed
    16-bit words ``w_i`` and the seed's uniform coefficients ``a_i`` (a Carter-Wegman hash: two
    rows that differ in any word agree with probability ``1/p`` per column, whatever the rows).

    The sums are integers below ``2**53`` (words < 2**15, coefficients < 2**17, at most 2**20
    words a row), so a float64 matrix product computes them exactly, in any summation order.
    The coefficients stand on the left (``[hashes, words] @ [words, rows]``): with few hashes,
    that is the shape BLAS runs several times faster than ``[rows, words] @ [words, hashes]``."""
    rows = table.detach().cpu()  # [rows, width]: shapes are judged before digests
    words = rows.shape[1] * rows.element_size() // 2
    if words > 2**20:
        raise ValueError(f"rows of {words} 16-bit words are too wide for exact row digests")
    coefficients = _row_coefficients(words, seed)
    out = torch.empty(ROW_DIGEST_WIDTH, rows.shape[0], dtype=torch.float64)
    wide = torch.empty(min(ROW_BLOCK, rows.shape[0]), words, dtype=torch.float64)  # reused: no allocation a block
    for start in range(0, rows.shape[0], ROW_BLOCK):
        block = _words(rows[start : start + ROW_BLOCK])
        widened = wide[: block.shape[0]].copy_(block)
        torch.mm(coefficients, widened.T, out=out[:, start : start + block.shape[0]])
    return out.remainder_(ROW_DIGEST_PRIME).to(torch.int32).T


@dataclass
class Watched:
    """The unsharded table's tensors as the implementation returned them (and their bases), by
    weak reference with their version counters: the check drops its own copy of a large table
    once the digests are taken, so only what the implementation keeps can be written, and that
    is still seen."""

    held: list[tuple[weakref.ref, int]]

    @classmethod
    def of(cls, table: RopeSlice) -> Watched:
        tensors = [t for part in (table.cos, table.sin) for t in (part, part._base) if t is not None]
        return cls([(weakref.ref(t), t._version) for t in tensors])

    def written(self) -> bool:
        return any((t := ref()) is not None and t._version != version for ref, version in self.held)


@dataclass(frozen=True)
class ReferenceRows:
    """The implementation's unsharded table as per-row digests (16 bytes a row): what every slice
    is judged against. ``held`` is the table itself where the pipeline keeps it (a table no
    larger than half the run's largest: see ``pipeline``); while ``watched`` sees no write into
    what the implementation returned, slices are compared with its rows directly, the same test
    the digests make, at a third of the cost. ``rebuild`` asks the implementation for the table
    again: only to size a mismatch."""

    cos: torch.Tensor  # [tokens, ROW_DIGEST_WIDTH]
    sin: torch.Tensor
    dtype: torch.dtype
    width: int
    seed: int
    rebuild: Callable[[], RopeSlice]
    held: RopeSlice | None = None
    watched: Watched | None = None

    @classmethod
    def of(
        cls, table: RopeSlice, seed: int, rebuild: Callable[[], RopeSlice], watched: Watched | None = None
    ) -> ReferenceRows:
        """The table's row digests; with ``watched`` (the watch on the tensors the implementation
        returned for it), the table itself is kept too."""
        cos, sin = row_digests(table.cos, seed), row_digests(table.sin, seed)
        held = None if watched is None else table
        return cls(cos, sin, table.cos.dtype, table.cos.shape[1], seed, rebuild, held, watched)

    def intact(self) -> RopeSlice | None:
        """The held table, unless something wrote into it after its digests were taken (then
        only the digests say what it was)."""
        if self.watched is None or self.watched.written():
            return None
        return self.held

    def table(self) -> RopeSlice:
        """The table's rows for a mismatch's report: the held table, else built again."""
        held = self.intact()
        return self.rebuild() if held is None else held

    def fingerprint(self) -> str:
        """One digest of all rows: the ranks compare theirs (every rank's table must be the same)."""
        both = torch.cat([self.cos, self.sin]).contiguous()
        return hashlib.blake2b(ctypes.string_at(both.data_ptr(), both.numel() * 4), digest_size=16).hexdigest()


@dataclass(frozen=True)
class RowsUnderJudgement:
    """One table (cos or sin) of a rank's slice, with the tokens its rows claim (-1: padding)."""

    where: str
    name: str
    table: torch.Tensor
    claimed: torch.Tensor
    grid: tuple[int, ...]


JUDGE_ROWS = 4096  # rows of a rebuilt table compared at once when a mismatch is reported


def _compare_rows(
    case: CaseResult, rows: RowsUnderJudgement, reference: ReferenceRows, table: Callable[[], RopeSlice]
) -> None:
    """Each real row against the unsharded table's at its token (its held rows, else its row
    digests), plus the identity on padding rows. Only a mismatch asks for the table itself
    (``table``), for the error's size."""
    real = rows.claimed >= 0
    held = reference.intact()
    if held is None:
        want = getattr(reference, rows.name).index_select(0, rows.claimed.clamp(min=0))
        differ = (row_digests(rows.table, reference.seed) != want).any(dim=1)
    else:
        differ = _rows_differ(rows, getattr(held, rows.name))
    bad = differ & real
    if bool(bad.any()):
        _report_mismatch(case, rows, int(bad.nonzero()[0]), table)
    pad = ~real
    identity = 1.0 if rows.name == "cos" else 0.0
    if bool(pad.any()) and not bool((rows.table[pad] == identity).all()):
        case.fail("slice-mismatch", f"{rows.where} padding rows of {rows.name} are not {identity}")


def _rows_differ(rows: RowsUnderJudgement, table: torch.Tensor) -> torch.Tensor:
    """Which rows differ in their words from the table's rows at their tokens (the digests'
    test: -0.0 reads as 0.0), a block of rows at a time through one reused buffer."""
    tokens = rows.claimed.clamp(min=0)  # padding rows are judged apart
    differ = torch.zeros(len(tokens), dtype=torch.bool)
    buffer = torch.empty(min(ROW_BLOCK, len(tokens)), table.shape[1], dtype=table.dtype)
    for start in range(0, len(tokens), ROW_BLOCK):
        got = rows.table[start : start + ROW_BLOCK]
        want = torch.index_select(table, 0, tokens[start : start + ROW_BLOCK], out=buffer[: len(got)])
        if not torch.equal(got, want):  # equal values are equal words; unequal ones (or NaN) are looked at
            differ[start : start + len(got)] = (_words(got) != _words(want)).any(dim=1)
    return differ


def _report_mismatch(case: CaseResult, rows: RowsUnderJudgement, first: int, table: Callable[[], RopeSlice]) -> None:
    """The first real row that differs, and the largest error over all real rows against the
    table (held, or built again; blocks of rows, no whole-slice copies)."""
    where = f"{rows.where} {rows.name} differs from the unsharded table at token "
    where += f"{token_name(int(rows.claimed[first]), rows.grid)} (local row {first})"
    try:
        ref = getattr(table(), rows.name).detach().cpu()
    except Exception as exc:  # noqa: BLE001 - the mismatch stands; only its size is unknown
        case.fail("slice-mismatch", f"{where}; building the unsharded table again to size the error raised {exc!r}")
        return
    err = 0.0
    for at in range(0, len(rows.claimed), JUDGE_ROWS):
        tokens, got = rows.claimed[at : at + JUDGE_ROWS], rows.table[at : at + JUDGE_ROWS]
        real = tokens >= 0
        diff = (got[real].double() - ref.index_select(0, tokens[real]).double()).abs()
        if diff.numel():
            err = max(err, float(diff.nan_to_num(nan=float("inf")).max()))
    case.max_abs_error = max(case.max_abs_error, err)
    case.fail("slice-mismatch", f"{where}, max abs error {err:.3g}")


def _first_difference(a: torch.Tensor, b: torch.Tensor) -> int:
    common = min(len(a), len(b))
    diff = (a[:common] != b[:common]).nonzero()
    return int(diff[0]) if len(diff) else common


def _token_or_pad(indices: torch.Tensor, row: int, grid: tuple[int, ...]) -> str:
    if row >= len(indices):
        return "nothing"
    return "padding" if int(indices[row]) < 0 else token_name(int(indices[row]), grid)


def check_partition(case: CaseResult, claims: list[torch.Tensor], num_tokens: int, grid: tuple[int, ...]) -> None:
    """The tokens claimed by one SP group must partition the grid (rank 0, when some rank's
    claims were not the plan's; the plans themselves partition, as tests/test_sharding proves)."""
    seen = torch.zeros(num_tokens, dtype=torch.int64)
    for claimed in claims:
        tokens = claimed[claimed >= 0]
        seen.index_add_(0, tokens, torch.ones_like(tokens))
    wrong = (seen != 1).nonzero()
    if len(wrong):
        token = int(wrong[0])
        case.fail(
            "slice-mismatch",
            f"ranks' tokens ({case.scheme}, P={case.sp_size}) do not partition the grid: token "
            f"{token_name(token, grid)} held {int(seen[token])} times",
        )


class Retention:
    """Every tensor an implementation handed out, with the digest it had then.

    A table handed to a model must stay what it was: a static output buffer rewritten by the
    next call (CUDA-graph style) or a reused workspace changes tables already in use. Checked
    whenever the same tensor comes back, and for every tensor still alive at the end of the run.
    Only weak references are kept, so nothing is held alive that the implementation dropped."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[weakref.ref, tuple[object, ...], int, str]] = {}

    def handed_out(
        self, tensor: torch.Tensor, digest: tuple[object, ...], case: int, what: str
    ) -> tuple[int, str] | None:
        """Record a returned tensor; (earlier case, message) when this very tensor was handed out
        before with other contents."""
        held = self._seen.get(id(tensor))
        if held is not None and held[0]() is tensor:
            if held[1] != digest:
                self._seen[id(tensor)] = (held[0], digest, case, what)  # report each rewrite once
                return held[2], self._message(held, "by a later call")
            return None
        self._seen[id(tensor)] = (weakref.ref(tensor), digest, case, what)
        return None

    def recheck(self) -> list[tuple[int, str]]:
        """(case, message) for every live tensor whose contents changed since it was handed out."""
        found = []
        for held in self._seen.values():
            tensor = held[0]()
            if tensor is not None and content_digest(tensor) != held[1]:
                found.append((held[2], self._message(held, "by the end of the run")))
        return found

    @staticmethod
    def _message(held: tuple[weakref.ref, tuple[object, ...], int, str], when: str) -> str:
        return f"the {held[3]} handed out for this case was overwritten {when} (a reused buffer or workspace)"


class LevelReference:
    """Single-rank results for one spec, computed once and shared by all its families: q and k
    rotated with the unsharded table, and attention over the whole sequence."""

    def __init__(self, hidden: tuple[torch.Tensor, torch.Tensor, torch.Tensor], reference: RopeSlice, layout: str):
        self.hidden, self.reference, self.layout = hidden, reference, layout

    @functools.cached_property
    def rotated_q0(self) -> torch.Tensor:
        """q's first head rotated: the rotation is the same for every head, so the apply level
        judges one (attention uses them all)."""
        return apply_rope(self.hidden[0][:, :, :1], self.reference.cos.cpu(), self.reference.sin.cpu(), self.layout)

    @functools.cached_property
    def rotated(self) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.reference.cos.cpu(), self.reference.sin.cpu()
        q, k, _ = self.hidden
        return apply_rope(q, cos, sin, self.layout), apply_rope(k, cos, sin, self.layout)

    @functools.cached_property
    def attention(self) -> tuple[torch.Tensor, torch.Tensor]:
        (q, k), v = self.rotated, self.hidden[2]
        positions = torch.arange(q.shape[1])
        return masked_attention(q, k, v, positions, False), masked_attention(q, k, v, positions, True)


def judge_apply(
    case: CaseResult, where: str, ref: LevelReference, rotated_q: torch.Tensor, own: torch.Tensor, grid: tuple[int, ...]
) -> None:
    real = own >= 0
    if bool(real.all()) and torch.equal(rotated_q, ref.rotated_q0[:, own]):
        return  # the same ops on the same bits: the common case, without the tolerance's passes
    what = _Comparison("apply-mismatch", f"{where} rotated q", APPLY_TOL)
    _compare(case, what, rotated_q[:, real], ref.rotated_q0[:, own[real]], own[real], grid)


def judge_attention(
    case: CaseResult,
    where: str,
    ref: LevelReference,
    outputs: tuple[torch.Tensor, torch.Tensor],
    own: torch.Tensor,
    grid: tuple[int, ...],
) -> None:
    real = own >= 0
    for kind, got, want in zip(("non-causal", "causal"), outputs, ref.attention):
        what = _Comparison("attention-mismatch", f"{where} {kind} Ulysses attention", ATTENTION_TOL)
        _compare(case, what, got[:, real], want[:, own[real]], own[real], grid)


@dataclass(frozen=True)
class _Comparison:
    """What an upper-level comparison is called, and its relative tolerance."""

    diagnosis: str
    what: str
    tol: float


def _compare(
    case: CaseResult, c: _Comparison, got: torch.Tensor, want: torch.Tensor, tokens: torch.Tensor, grid: tuple[int, ...]
) -> None:
    err = (got.double() - want.double()).abs()
    bad = (err > c.tol * (1 + want.double().abs())).flatten(2).any(dim=(0, 2))
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        worst = float(err.max())
        case.max_abs_error = max(case.max_abs_error, worst)
        case.fail(
            c.diagnosis,
            f"{c.what} differs from the single-rank result at token {token_name(int(tokens[row]), grid)}, "
            f"max abs error {worst:.3g} (tolerance {c.tol:g} relative)",
        )
