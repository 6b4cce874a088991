"""Key-completeness probe: change one input at a time, and every call must get its own table.

A cache key that forgets a field (a grid axis, theta, one element of a per-axis factor, the
layout, the SP rank...) hands the table cached for one input to a call with another. The matrix
finds that only where two of its cases happen to differ in exactly that field on one rank; the
probe makes them differ on purpose. From a small base input it varies each field alone,
mixing their calls (base, variant, variant, base), and judges every returned table against the
float64 oracle at its tokens, those tokens against the plan's, and, when a table is wrong,
whether it is the very table (by content digest) an earlier call got for another input:

- ``key-incomplete``: the wrong table is one returned earlier for another input, the field named;
- ``oracle-mismatch``: another wrong table (dtype, shape or values), the varied field named;
- ``plan-mismatch``: rows for other tokens than the plan gives the rank;
- ``wrong-device``: a table on another device than the call asked for;
- ``mutated-in-place``: the implementation's adapter saw a table written after it was returned.

Local and pure: no collectives, one process plays every SP rank and size. ``only`` picks the
fields by index (0 is the base input itself), so several ranks can share the work.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch

from .cache import CacheMutationError, RopeSlice
from .judge import content_digest, plan_tokens
from .oracle import oracle_table, tolerance
from .providers import Provider, as_a_model_calls, tables_on
from .report import CaseResult
from .sharding import ShardPlan, parse_plan
from .spec import RopeSpec, default_rope_dim_list


@dataclass(frozen=True)
class ProbeInput:
    """Everything a provider call takes."""

    spec: RopeSpec
    plan: ShardPlan
    sp_rank: int
    sp_size: int
    device: str | None = None  # None: the device the check runs on

    def with_spec(self, **changes: object) -> ProbeInput:
        return replace(self, spec=self.spec.replace(**changes))


@dataclass(frozen=True)
class Base:
    """The input every field is varied from, with the plans its shard-axis and scheme variants use."""

    input: ProbeInput
    other_axis: ShardPlan
    other_scheme: ShardPlan


@dataclass(frozen=True)
class Variant:
    field: str  # as RopeSpec spells it: grid[1], theta_rescale_factor[0], dtype, ...; sp_rank, scheme ...
    input: ProbeInput
    change: str  # "2 -> 4"
    against: ProbeInput | None = None  # what it alternates with; None: the base input


# Every grid axis even (each convention's contiguous split at SP size 2), t divisible by 4 (the SP
# size variant), unequal head-dim parts, theta not the default, non-unit factors on every axis: the
# rescale equal on all (adapters pass it as a scalar, its variants as lists), the interpolation
# unequal (a list, whose variants differ from it in one element only), a causal offset.
BASES = (
    Base(
        ProbeInput(
            RopeSpec((4, 2, 6), (8, 12, 4), theta=500.0, theta_rescale_factor=2.0,
                     interpolation_factor=(0.5, 0.75, 1.5), dtype="float64", layout="interleaved", start_frame=3),
            parse_plan("contiguous:t"), 0, 2,
        ),
        parse_plan("contiguous:h"),
        parse_plan("zigzag:t"),
    ),
    # For conventions with a fixed head-dim split, float32 tables only and no offset or factors
    # (diffusers' Wan RoPE): grid, theta and the SP coordinates are still probed.
    Base(
        ProbeInput(RopeSpec((4, 2, 6), (8, 8, 8), theta=500.0, dtype="float32"), parse_plan("flat"), 0, 2),
        parse_plan("contiguous:h"),
        parse_plan("zigzag"),
    ),
)


# The finest nudges that still move the base's table far past the float64 tolerance (by ~1e-10;
# interpolation scales float32 positions, so its nudge is float32's resolution), while a key that
# rounds "float noise" away (round(x, 6), a float32 cast, "%.6g") merges them with the base.
FINE = {"theta": 30, "theta_rescale_factor": 30, "interpolation_factor": 22}  # x(1 + 2^-n)


def variants(base: Base) -> list[Variant]:
    """Each field of ``base`` changed alone, to a value that changes the table: grossly, and by
    as little as a cache key that rounds, truncates or keeps a product would miss."""
    b, s = base.input, base.input.spec
    out = []
    for a, size in enumerate(s.grid):
        grid = tuple(n + 2 if i == a else n for i, n in enumerate(s.grid))
        out.append(Variant(f"grid[{a}]", b.with_spec(grid=grid), f"{size} -> {size + 2}"))
    for a, c in ((0, 1), (1, 2), (0, 2)):  # the same token count and axis products: a key on T*H*W or H*W
        swapped = list(s.grid)
        swapped[a], swapped[c] = swapped[c], swapped[a]
        change = f"{list(s.grid)} -> {swapped}"
        out.append(Variant(f"grid[{a}] <-> grid[{c}]", b.with_spec(grid=tuple(swapped)), change))
    # Two fields changed together so that a sum or a symmetric combination of them stays the
    # same: a key on the end frame (T + start_frame), or on an XOR or sum of the fields' hashes.
    step = 2 if s.start_frame >= 2 else -2  # T longer and the offset earlier, or the other way
    grid, offset = (s.grid[0] + step, *s.grid[1:]), s.start_frame - step
    out.append(Variant("grid[0] + start_frame (same end frame)", b.with_spec(grid=grid, start_frame=offset),
                       f"T {s.grid[0]} at {s.start_frame} -> T {grid[0]} at {offset}"))
    # (Against rescale changed on t where the two are equal: a swap must change something.)
    rescale, interpolation = (list(getattr(s, name)) for name in ("theta_rescale_factor", "interpolation_factor"))
    if rescale == interpolation:
        rescale[0] *= 1.5
    unswapped = b.with_spec(theta_rescale_factor=tuple(rescale))
    out.append(Variant("theta_rescale_factor <-> interpolation_factor", b.with_spec(
        theta_rescale_factor=tuple(interpolation), interpolation_factor=tuple(rescale)),
        f"{rescale}, {interpolation} -> {interpolation}, {rescale}", None if unswapped == b else unswapped))
    # theta doubled and the rescale halved on every axis: the same product, which an NTK rescale
    # is often folded into (the base it scales), yet the rescale's exponent differs: a key on the
    # product merges them.
    halved_rescale = tuple(v / 2 for v in s.theta_rescale_factor)  # type: ignore[union-attr]
    out.append(Variant("theta x theta_rescale_factor (same product)", b.with_spec(
        theta=2 * s.theta, theta_rescale_factor=halved_rescale),
        f"{s.theta:g}, {list(s.theta_rescale_factor)} -> {2 * s.theta:g}, {list(halved_rescale)}"))  # type: ignore[arg-type]
    for a, c in ((1, 0), (1, 2), (0, 2)):  # 4 dims moved between each pair of axes: the same head dim
        dims = list(s.rope_dim_list)
        dims[a], dims[c] = dims[a] - 4, dims[c] + 4
        out.append(Variant(f"rope_dim_list[{a}] -> [{c}]", b.with_spec(rope_dim_list=tuple(dims)),
                           f"{list(s.rope_dim_list)} -> {dims}"))
    out.append(Variant("theta", b.with_spec(theta=s.theta * 1.8), f"{s.theta:g} -> {s.theta * 1.8:g}"))
    # Equal to the nearest integer, and not representable in float32: a rounding key, or theta
    # held in a float32 buffer for a float64 table, gives the base's table or a wrong one.
    out.append(Variant("theta (+0.1)", b.with_spec(theta=s.theta + 0.1), f"{s.theta:g} -> {s.theta + 0.1:g}"))
    fine = s.theta * (1 + 2.0 ** -FINE["theta"])
    out.append(Variant(f"theta (x(1+2^-{FINE['theta']}))", b.with_spec(theta=fine), f"{s.theta:g} -> {fine:.17g}"))
    for name in ("theta_rescale_factor", "interpolation_factor"):
        values: tuple[float, ...] = getattr(s, name)
        for a, value in enumerate(values):
            changed = tuple(v * 1.5 if i == a else v for i, v in enumerate(values))
            out.append(Variant(f"{name}[{a}]", b.with_spec(**{name: changed}), f"{value:g} -> {value * 1.5:g}"))
        # Not representable in bfloat16, equal to 3 decimals: a key or buffer that rounds it.
        nudged = (values[0] * (1 + 2**-10), *values[1:])
        out.append(
            Variant(f"{name}[0] (x(1+2^-10))", b.with_spec(**{name: nudged}), f"{values[0]:g} -> {nudged[0]:.9g}")
        )
        finer = (values[0] * (1 + 2.0 ** -FINE[name]), *values[1:])
        out.append(Variant(f"{name}[0] (x(1+2^-{FINE[name]}))", b.with_spec(**{name: finer}),
                           f"{values[0]:g} -> {finer[0]:.17g}"))
        # The same values on other axes (rotated by one, against the base or, where its values
        # are all equal, against one changed on t): a key on the set or the sorted values.
        unequal = values if len(set(values)) > 1 else (values[0] * 1.5, *values[1:])
        rotated = (*unequal[1:], unequal[0])
        out.append(Variant(f"{name} (same values, other axes)", b.with_spec(**{name: rotated}),
                           f"{list(unequal)} -> {list(rotated)}", None if unequal == values else b.with_spec(
                               **{name: unequal})))
    other_dtype = "float32" if s.dtype == "float64" else "float64"
    out.append(Variant("dtype", b.with_spec(dtype=other_dtype), f"{s.dtype} -> {other_dtype}"))
    other_layout = "half" if s.layout != "half" else "interleaved"
    out.append(Variant("layout", b.with_spec(layout=other_layout), f"{s.layout} -> {other_layout}"))
    third = "neox" if s.layout != "neox" else "interleaved"  # a slice asked for cold, with no table cached
    out.append(Variant(f"layout ({third})", b.with_spec(layout=third), f"{s.layout} -> {third}"))
    head_dim = 2 * s.head_dim  # Wan's split of another head dim: a key on the grid and theta alone
    wan_split = default_rope_dim_list(head_dim, len(s.grid))
    out.append(Variant("head dim", b.with_spec(rope_dim_list=wan_split), f"{s.head_dim} -> {head_dim}"))
    later = s.start_frame + 5
    out.append(Variant("start_frame", b.with_spec(start_frame=later), f"{s.start_frame} -> {later}"))
    # 2^20 frames later: the same offset modulo any power of two up to 2^20, which a key that
    # packs start_frame into a bit field, or a ring of positions indexed modulo its length, sees.
    # (Still exact in float32, as the convention's positions are.)
    far = s.start_frame + FAR_FRAMES
    out.append(Variant("start_frame (+2^20)", b.with_spec(start_frame=far), f"{s.start_frame} -> {far}"))
    rank = (b.sp_rank + 1) % b.sp_size
    out.append(Variant("sp_rank", replace(b, sp_rank=rank), f"{b.sp_rank} -> {rank}"))
    out.append(Variant("sp_size", replace(b, sp_size=2 * b.sp_size), f"{b.sp_size} -> {2 * b.sp_size}"))
    # The whole table on one rank, in every layout and dtype: from the scaled base, more rows
    # than any of its slices (a size tier on the rows a call builds, rather than on the grid,
    # is crossed there, and a path for long builds must get every layout and dtype right).
    whole = replace(b, sp_rank=0, sp_size=1)
    out.append(Variant("sp_size 1 (unsharded)", whole, f"{b.sp_size} -> 1"))
    for layout in ("interleaved", "half", "neox"):
        if layout != s.layout:
            out.append(Variant(f"sp_size 1 (unsharded), layout {layout}", whole.with_spec(layout=layout),
                               f"{b.sp_size}, {s.layout} -> 1, {layout}"))
    out.append(Variant(f"sp_size 1 (unsharded), dtype {other_dtype}", whole.with_spec(dtype=other_dtype),
                       f"{b.sp_size}, {s.dtype} -> 1, {other_dtype}"))
    out.append(Variant("shard axis", replace(b, plan=base.other_axis), f"{b.plan} -> {base.other_axis}"))
    out.append(Variant("scheme", replace(b, plan=base.other_scheme), f"{b.plan} -> {base.other_scheme}"))
    # A pipeline moved to another device (CPU offload, another GPU in one process) must not get
    # the table cached for the first. Meta is the other device every machine has: it holds
    # shapes and no values, so its tables are judged by device, shape and dtype alone.
    out.append(Variant("device", replace(b, device=META), f"the check's device -> {META}"))
    # Half the frames and twice the rows, split along h instead: SP rank 1 holds a share of the
    # same shape (and token count), at other positions. A key on the rank's local shape instead
    # of the grid and the shard axis gives it the other share's table. (Rank 0's shares would
    # hold the same positions: equal tables, nothing to see.)
    at_one = replace(b, sp_rank=1)
    halved = (s.grid[0] // 2, 2 * s.grid[1], *s.grid[2:])
    out.append(Variant("grid + shard axis (same local shape)", replace(at_one, plan=base.other_axis).with_spec(
        grid=halved), f"{list(s.grid)} {b.plan} -> {list(halved)} {base.other_axis} (SP rank 1)", against=at_one))
    # A scheme's own parameter, alternating with the same scheme at another value: the last rank
    # of 5 (48 tokens: flat's modes differ there), SP rank 1 of 4 (usp's ring degrees differ).
    # SP rank 2 of 6: ring 2 x Ulysses 3 and ring 3 x Ulysses 2 (degrees that differ, which no
    # SP size up to 4 has) place it differently.
    pairs = (("usp:2", "usp:4", 1, 4), ("usp:2", "usp:1", 1, 4), ("usp:2", "usp:3", 2, 6),
             ("flat:pad", "flat:uneven", 4, 5))
    for first, second, rank, size in pairs:
        one, other = (replace(b, plan=parse_plan(n), sp_rank=rank, sp_size=size) for n in (first, second))
        out.append(Variant(f"scheme parameter ({first} / {second})", other, f"{first} -> {second}", against=one))
    return out


META = "meta"
FAR_FRAMES = 2**20

# Every field is varied from the base a second time at the size of a real latent, past any
# size tier an implementation may switch paths at (a second cache for long sequences, chunked
# builds), whose key can be the one that forgets a field: every axis scaled up, 145,152 tokens,
# past 2^17 and past every preset (HunyuanVideo's 720p latent: 118,800 tokens), and 2^17 frames
# into a causal stream (where positions may come from another path too).
SCALE = (9, 24, 14)
FAR_START = 2**17  # the scaled base's causal offset, where one has one: past memo paths for far positions
JUDGED_ROWS = 4096  # rows of a larger table judged against the formula, evenly spread


def at_scale(base: Base) -> Base:
    """``base`` with every grid axis scaled by ``SCALE``, and ``FAR_START`` frames later."""
    s = base.input.spec
    grid = tuple(n * f for n, f in zip(s.grid, SCALE))
    start_frame = s.start_frame + FAR_START if s.start_frame else 0
    return replace(base, input=base.input.with_spec(grid=grid, start_frame=start_frame))


def _wrong_form(inp: ProbeInput, sl: RopeSlice) -> str | None:
    """Why ``sl``'s shape or dtype is not ``inp``'s table's for the tokens it claims, or None."""
    want = ((sl.indices.numel(), inp.spec.width), inp.spec.torch_dtype)
    if (tuple(sl.cos.shape), sl.cos.dtype) != want or (tuple(sl.sin.shape), sl.sin.dtype) != want:
        got = f"cos {list(sl.cos.shape)} {sl.cos.dtype}, sin {list(sl.sin.shape)} {sl.sin.dtype}"
        return f"is {got}; expected {list(want[0])} {want[1]}"
    return None


def _misfit(inp: ProbeInput, sl: RopeSlice, device: str) -> bool:
    """Whether ``sl`` is on another device, or of another shape or dtype, than ``inp``'s table."""
    rows = len(plan_tokens(inp.plan, inp.spec.grid, inp.sp_rank, inp.sp_size))
    return not tables_on(sl, inp.device or device) or sl.indices.numel() != rows or _wrong_form(inp, sl) is not None


def wrong(inp: ProbeInput, sl: RopeSlice) -> str | None:
    """Why ``sl`` is not ``inp``'s table at the tokens it claims, or None when it is."""
    spec = inp.spec
    form = _wrong_form(inp, sl)
    if form is not None:
        return form
    cos, sin, claimed = sl.cos.detach().cpu(), sl.sin.detach().cpu(), sl.indices.detach().cpu().to(torch.int64)
    if claimed.numel() and (int(claimed.min()) < -1 or int(claimed.max()) >= spec.num_tokens):
        return f"claims token indices outside [-1, {spec.num_tokens})"
    if claimed.numel() > JUDGED_ROWS:
        # Rows spread over the whole table: a table built for another input differs almost
        # everywhere (and the very table of an earlier input is found by its digest); a wrong
        # row here and there is the matrix's to find, row by row.
        rows = torch.linspace(0, claimed.numel() - 1, JUDGED_ROWS).round().to(torch.int64)
        cos, sin, claimed = cos[rows], sin[rows], claimed[rows]
    tol = tolerance(spec)
    want_cos, want_sin = oracle_table(spec, claimed)
    worst = max(float((got.double() - ref).abs().max()) if got.numel() else 0.0
                for got, ref in ((cos, want_cos), (sin, want_sin)))
    if not worst <= tol:  # also NaN
        return f"differs from the float64 formula by {worst:.3g} > tolerance {tol:.3g}"
    return None


class _Probe:
    """The calls of one probe, and every table they got (digest -> the first input that got it)."""

    def __init__(self, provider: Provider, device: str, base: Base) -> None:
        self.provider, self.device, self.base = provider, device, base
        self.seen: dict[tuple[object, ...], ProbeInput] = {}
        self.labels: dict[ProbeInput, str] = {base.input: "the base input"}
        self.base_table: tuple[object, ...] | None = None  # digest of the first base call's table, judged once

    def get(self, inp: ProbeInput) -> RopeSlice | Exception:
        """One call with fresh objects equal to ``inp``'s, dropped right after: a cache keyed on
        ``id()`` of its arguments meets ids that other inputs' objects reused. (They are dropped
        in the reverse of their creation order, so the next call's objects, made in the same
        order, take the same memory and ids, or the pair's ids swapped.)"""
        spec = inp.spec.replace()
        plan = replace(inp.plan)
        try:
            with as_a_model_calls(self.device):
                return self.provider.get(spec, plan, inp.sp_rank, inp.sp_size, inp.device or self.device)
        except Exception as exc:  # noqa: BLE001 - the implementation failed: a verdict, not a crash
            return exc
        finally:
            del plan
            del spec

    def call(self, case: CaseResult, inp: ProbeInput, what: str) -> None:
        """One call, judged into ``case``; ``what`` names the call in messages."""
        self.judge(case, inp, what, self.get(inp))

    def judge(self, case: CaseResult, inp: ProbeInput, what: str, sl: RopeSlice | Exception) -> None:
        if isinstance(sl, CacheMutationError):
            case.fail("mutated-in-place", f"{what}: {sl}")
            return
        if isinstance(sl, Exception):
            case.fail("implementation-error", f"{what}: {type(sl).__name__}: {str(sl).strip()[:200]}")
            return
        asked = inp.device or self.device
        elsewhere = not tables_on(sl, asked)
        on_meta = META in (sl.cos.device.type, sl.sin.device.type)  # no values: device, shape, dtype
        earlier = inp
        if not on_meta:
            digest = content_digest(sl.cos, sl.sin)
            if inp == self.base.input:
                if digest == self.base_table:  # the same table as the first base call: judged there
                    return
                self.base_table = self.base_table or digest
            earlier = self.seen.setdefault(digest, inp)
        if elsewhere:
            problem: str | None = f"is on {sl.cos.device} (sin on {sl.sin.device}), asked for {asked}"
        else:
            problem = _wrong_form(inp, sl) if on_meta else wrong(inp, sl)
        other_tokens = sl.indices.device.type != META and not torch.equal(
            sl.indices.detach().cpu().to(torch.int64), plan_tokens(inp.plan, inp.spec.grid, inp.sp_rank, inp.sp_size)
        )
        if (problem is not None or other_tokens) and earlier != inp:
            label = self.labels.get(earlier, f"the input with grid {list(earlier.spec.grid)}")  # a sweep's
            case.fail("key-incomplete", f"{what} got the table returned earlier for {label} "
                                        f"(a cache key without {case.scheme}, or {case.scheme} ignored)")
        elif problem is not None:
            case.fail("wrong-device" if elsewhere else "oracle-mismatch", f"{what}: the table {problem}")
        elif other_tokens:
            case.fail("plan-mismatch", f"{what}: rows for other tokens than {inp.plan} gives SP rank "
                                       f"{inp.sp_rank} of {inp.sp_size}")

    def field(self, case: CaseResult, variant: Variant) -> None:
        """Base and variant calls, base-variant-variant-base and back to back (judged afterwards,
        so nothing the check allocates comes between them): each must get its own table every time."""
        self.labels[variant.input] = f"{variant.field} = {variant.change.split(' -> ')[1]}"
        changed = f"{variant.field} changed alone ({variant.change})"
        base, which = self.base.input, "base"
        if variant.against is not None:
            base, which = variant.against, "other"
            self.labels.setdefault(base, f"{variant.field} = {variant.change.split(' -> ')[0]}")
        # Each input at an even and an odd position: arguments whose ids (or the adapter's) swap
        # between two addresses every call still give the variant an id the base had.
        calls = [
            (base, f"the {which} call before {changed}"),
            (variant.input, f"the first call with {changed}"),
            (variant.input, f"the second call with {changed}"),
            (base, f"the {which} call after {changed}"),
        ]
        got = [self.get(inp) for inp, _ in calls]
        failed = next((sl for sl in got[1:3] if isinstance(sl, Exception)), None)
        if variant.input.device == META and failed is not None and not isinstance(failed, CacheMutationError):
            case.skip(f"not probed: the implementation cannot build on {META} (the device every machine has "
                      f"besides its own): {type(failed).__name__}: {str(failed).strip()[:120]}")
            return
        for (inp, what), sl in zip(calls, got):
            self.judge(case, inp, what, sl)


def _case(name: str, inp: ProbeInput) -> CaseResult:
    s = inp.spec
    return CaseResult("probe", name, inp.sp_size, s.start_frame, s.dtype, s.layout)


def _base(provider: Provider, scaled: bool = False) -> Base:
    base = next((b for b in BASES if provider.skip_reason(b.input.spec, b.input.plan) is None), BASES[0])
    return at_scale(base) if scaled else base


def _one_case(provider: Provider, device: str, name: str) -> tuple[CaseResult, _Probe | None]:
    """The case of a probe that runs from the base input as a whole (the eviction sweep, the hot
    keys), and its calls; no calls when the base cannot be expressed (the case is then skipped)."""
    base = _base(provider)
    case = _case(name, base.input)
    reason = provider.skip_reason(base.input.spec, base.input.plan)
    if reason is not None:
        case.skip(f"not probed: the probe's base input cannot be expressed: {reason}")
        return case, None
    return case, _Probe(provider, device, base)


def field_groups(provider: Provider) -> list[int]:
    """For each probe index (0: the base), the number of its field's group: the variants of one
    field (grid, theta, one factor list, ...) in one group, so that ranks sharing out the fields by
    group keep related variants in one process, where one can meet another's cache entry (rescale
    (3, 2, 2) and (2, 3, 2) under a key on the set of values)."""
    names = ["base"] + [v.field for v in variants(_base(provider))]
    groups = [name.split("[")[0].split(" (")[0].split(" + ")[0] for name in names]
    numbers = {group: i for i, group in enumerate(dict.fromkeys(groups))}
    return [numbers[group] for group in groups]


def probe_keys(
    provider: Provider, device: str, only: Callable[[int], bool] | None = None, scaled: bool = False
) -> list[CaseResult]:
    """One case for the base input (index 0) and one per varied field (indices 1...), those that
    ``only`` selects; an input the provider cannot express is a skipped case, never a pass.
    ``scaled``: from the base at a real latent's size (``at_scale``), the cases named so."""
    base = _base(provider, scaled)
    todo = [Variant("base", base.input, "")] + variants(base)
    chosen = [v for i, v in enumerate(todo) if only is None or only(i)]
    suffix = f" at {base.input.spec.num_tokens} tokens" if scaled else ""
    cases = [_case(v.field + suffix, v.input) for v in chosen]
    reason = provider.skip_reason(base.input.spec, base.input.plan)
    if reason is not None:
        for case in cases:
            case.skip(f"not probed: the probe's base input cannot be expressed: {reason}")
        return cases
    probe = _Probe(provider, device, base)
    # The first call of all, judged where the base case is reported (or nowhere, on a rank
    # without it): every field's calls are compared with it.
    base_case = next((c for c, v in zip(cases, chosen) if v.field == "base"), _case("base", base.input))
    probe.call(base_case, base.input, "the base call")
    for case, variant in zip(cases, chosen):
        if variant.field == "base":
            continue
        reason = provider.skip_reason(variant.input.spec, variant.input.plan)
        if reason is not None:
            case.skip(f"not probed: {variant.field} {variant.change}: {reason}")
            continue
        probe.field(case, variant)
    return cases


EVICTION_DEPTH = 1024  # distinct inputs asked for in a row: more than any cache bounded below it holds
EVICTION_ORACLE_EVERY = 64  # first-pass tables also judged against the formula (the rest by digest)
# With a cache the check can see (--impl-cache, or sp_rope's own), the sweep goes on while it has
# not evicted yet, up to EVICTION_MAX inputs, and past its first eviction for as many inputs as it
# held then (at least EVICTION_PAST): every entry has been evicted or has outlived an eviction
# since, so a cache bounded at 4096 entries is tested like one bounded at 100.
EVICTION_MAX = 10240
EVICTION_PAST = 1024
EVICTION_EXTRA_S = 20.0  # seconds from the sweep's start after which it grows no further past EVICTION_DEPTH


def _sweep_grids(count: int) -> list[tuple[int, ...]]:
    """``count`` distinct 3-D grids, T even (each splits along t, and flat, at SP size 2), at most
    8 x 16 x 16: the same model (head dim, theta) asked for one latent size after another."""
    grids: list[tuple[int, ...]] = [(t, h, w) for w in range(1, 17) for h in range(1, 17) for t in (2, 4, 6, 8)]
    return grids[:count] if count <= len(grids) else grids + [(2, 1, w) for w in range(17, 17 + count - len(grids))]


def _sweep_inputs(provider: Provider, base: ProbeInput, depth: int) -> Iterator[ProbeInput]:
    """``depth`` latent sizes of one model, then (where the implementation has a start_frame) a
    tiny latent at one causal offset after another, as a long video streams: cheap tables, so the
    sweep can go on until a large cache evicts."""
    yield from (base.with_spec(grid=grid) for grid in _sweep_grids(depth))
    tiny = base.with_spec(grid=(2, 1, 2))
    first = max(base.spec.start_frame, 0) + 1000  # past every start_frame of the grid sweep
    if provider.skip_reason(tiny.with_spec(start_frame=first).spec, tiny.plan) is None:
        yield from (tiny.with_spec(start_frame=first + k) for k in itertools.count())


@dataclass
class _Growth:
    """When to stop a sweep: at ``depth`` inputs for a cache the check cannot see; for one it can,
    as many inputs past its first eviction as it held then, or at EVICTION_MAX inputs, or when
    ``deadline`` (time.monotonic) has passed: the other ranks wait for this one within the job's
    timeout, and an implementation that builds slowly must get a verdict, not an infrastructure
    failure."""

    depth: int
    size: int | None
    deadline: float
    stop_at: int | None = None  # set at the first eviction

    def saw(self, k: int, size: int | None) -> None:
        if size is not None and self.size is not None and size <= self.size and self.stop_at is None:
            self.stop_at = k + max(EVICTION_PAST, self.size)
        self.size = size

    def more(self, k: int) -> bool:
        if k < self.depth:
            return True
        if self.size is None or k >= max(self.depth, EVICTION_MAX) or time.monotonic() > self.deadline:
            return False
        return self.stop_at is None or k < self.stop_at


def probe_eviction(
    provider: Provider, device: str, depth: int = EVICTION_DEPTH, extra_s: float = EVICTION_EXTRA_S
) -> CaseResult:
    """``depth`` distinct inputs in a row (the base input at one latent size after another: one
    model, so a per-instance cache fills too), more while a cache the check can see has not
    evicted yet (``_Growth``), then all of them again, most recent first. A cache bounded below
    that has to evict; one that evicts the wrong value, or leaves a stale index or offset behind,
    then hands an input another input's table (``stale-after-eviction``). The matrix's own run
    makes a few thousand keys per rank at most. Every first-pass table must differ from all
    earlier ones; every second-pass table must be the one its input got first (each
    ``EVICTION_ORACLE_EVERY``-th is also judged against the formula: a wrong fresh build is the
    matrix's to find)."""
    case, probe = _one_case(provider, device, f"cache eviction ({depth}+ inputs)")
    if probe is None:
        return case
    inputs: list[ProbeInput] = []
    owner: dict[tuple[object, ...], int] = {}  # digest -> the input that got it first
    first: list[tuple[object, ...]] = []

    def name(k: int) -> str:
        s = inputs[k].spec
        return f"input {k + 1} (grid {list(s.grid)}, start_frame {s.start_frame})"

    held = Held(case)
    growth = _Growth(depth, provider.cache_size(), time.monotonic() + extra_s)
    for k, inp in enumerate(_sweep_inputs(provider, probe.base.input, depth)):
        if not growth.more(k):
            break
        inputs.append(inp)
        sl = probe.get(inp)
        # Every table's device, shape and dtype (no values: cheap), some against the formula too.
        if isinstance(sl, Exception) or k % EVICTION_ORACLE_EVERY == 0 or _misfit(inp, sl, probe.device):
            probe.judge(case, inp, f"the first call for {name(k)}", sl)
        if isinstance(sl, Exception) or case.diagnoses or not held.keep(name(k), sl):
            return case
        digest = content_digest(sl.cos, sl.sin)
        if digest in owner:
            case.fail("stale-after-eviction", f"the first call for {name(k)} got the table of {name(owner[digest])} "
                                              f"after {k} other inputs")
            return case
        owner[digest] = k
        first.append(digest)
        growth.saw(k, provider.cache_size())
    if not held.release_all():
        return case
    count = len(inputs)
    for k in reversed(range(count)):
        sl = probe.get(inputs[k])
        if isinstance(sl, Exception):
            probe.judge(case, inputs[k], f"the second call for {name(k)}", sl)
            return case
        digest = content_digest(sl.cos, sl.sin)
        if digest != first[k]:
            got = f"the table of {name(owner[digest])}" if digest in owner else "another table than the first time"
            case.fail("stale-after-eviction", f"the second call for {name(k)} (after all {count}, then "
                                              f"{count - 1 - k} of them again, most recent first) got {got}")
            return case
    return case


HELD_CALLS = 16  # the sweep holds each table this many further calls, as a forward pass holds its own


class Held:
    """Tables the caller still holds, with copies of what they were: a cache that recycles an
    evicted entry's memory (an arena, a pool of buffers) rewrites a table still in use."""

    def __init__(self, case: CaseResult, window: int = HELD_CALLS) -> None:
        self.case, self.window = case, window
        self.tables: list[tuple[str, RopeSlice, torch.Tensor, torch.Tensor]] = []

    def keep(self, name: str, sl: RopeSlice) -> bool:
        """Hold ``sl``; release the oldest beyond the window. False once a held table changed."""
        self.tables.append((name, sl, sl.cos.detach().clone(), sl.sin.detach().clone()))
        return self._release(len(self.tables) - self.window)

    def same(self, which: int, sl: RopeSlice) -> bool:
        """Whether ``sl`` holds what the ``which``-th held table held when it was kept."""
        _, _, cos, sin = self.tables[which]
        return torch.equal(sl.cos, cos) and torch.equal(sl.sin, sin)

    def release_all(self) -> bool:
        return self._release(len(self.tables))

    def _release(self, count: int) -> bool:
        gone, self.tables = self.tables[: max(count, 0)], self.tables[max(count, 0) :]
        for name, sl, cos, sin in gone:
            if not (torch.equal(sl.cos, cos) and torch.equal(sl.sin, sin)):
                self.case.fail("overwritten-after-return", f"the table returned for {name} changed while the "
                                                           f"caller held it for {self.window} more calls")
                return False
        return True


HOT_CALLS = 512  # calls per input: five 50-step denoising runs with CFG (100 calls each) of one key
# The base and theta + 1 (one shape, dtype and layout) are asked this many times per step of the
# others: 16,864 calls each, past a promotion threshold of 2^14 hits (one video asks about 4,000
# of one key: 50 steps x 40 blocks x CFG's 2 forwards; a server making one resolution passes 16k
# within a few videos). Both promoted into one static buffer per shape, dtype and layout, the
# first would get the second's table.
HOT_DEEP_REPEAT = 33
HOT_DEEP_S = 3.0  # past this many seconds, every input is asked once a step (an uncached build per call is slow)


def _hot_total(calls: int, repeat: int) -> int:
    """All calls of an input asked once in the first step and ``repeat`` times in each later one."""
    return 1 + (calls - 1) * repeat


def probe_hot_keys(provider: Provider, device: str, calls: int = HOT_CALLS, deep_s: float = HOT_DEEP_S) -> CaseResult:
    """Inputs of one shape (the base, theta + 1, and the base in another layout and dtype, where
    the implementation can express them) asked for in turn, ``calls`` times each, the first two
    ``HOT_DEEP_REPEAT`` times as often (for ``deep_s`` seconds), as long denoising runs
    with CFG ask for their tables: past any warm-up, promotion or compaction threshold of a
    cache (an entry moved to a static buffer, or re-encoded, after N hits), in every layout and
    dtype such a rewrite can get wrong. Every call must return the table its input's first call
    got (``unstable-across-steps``), and those first tables, held to the end, must not change
    (``overwritten-after-return``)."""
    deep = _hot_total(calls, HOT_DEEP_REPEAT)
    case, probe = _one_case(provider, device, f"hot keys ({calls} calls each, the base and theta + 1 up to {deep})")
    if probe is None:
        return case
    base = probe.base.input
    s = base.spec
    other_layout = "half" if s.layout != "half" else "interleaved"
    candidates = {
        "the base input": base,
        f"theta {s.theta + 1:g}": base.with_spec(theta=s.theta + 1),
        f"layout {other_layout}": base.with_spec(layout=other_layout),
        "the other dtype": base.with_spec(dtype="float32" if s.dtype == "float64" else "float64"),
    }
    inputs = {name: inp for name, inp in candidates.items() if provider.skip_reason(inp.spec, inp.plan) is None}
    repeats = {name: HOT_DEEP_REPEAT if inp.spec.replace(theta=s.theta) == s else 1 for name, inp in inputs.items()}
    # The first call of each input, judged against the formula; their tables held to the end.
    held = Held(case, window=len(inputs))
    for name, inp in inputs.items():
        sl = probe.get(inp)
        probe.judge(case, inp, f"call 1 of {_hot_total(calls, repeats[name])} for {name}", sl)
        if isinstance(sl, Exception) or case.diagnoses:
            return case
        held.keep(name, sl)
    # Then the hits, each compared with the first table only: one set of argument objects per
    # input (equal-but-new objects are the key probe's concern) and one model context for all.
    asked = dict.fromkeys(inputs, 1)
    turns = [(which, name, inp) for which, (name, inp) in enumerate(inputs.items()) for _ in range(repeats[name])]
    once = [(which, name, inp) for which, (name, inp) in enumerate(inputs.items())]
    args = {name: (inp.spec.replace(), replace(inp.plan), inp.sp_rank, inp.sp_size, inp.device or device)
            for name, inp in inputs.items()}
    failure: tuple[str, ProbeInput, RopeSlice | Exception] | None = None
    deadline = time.monotonic() + deep_s
    with as_a_model_calls(device):
        for _ in range(calls - 1):
            for which, name, inp in turns if time.monotonic() < deadline else once:
                asked[name] += 1
                try:
                    got: RopeSlice | Exception = provider.get(*args[name])
                except Exception as exc:  # noqa: BLE001 - the implementation failed: a verdict, not a crash
                    got = exc
                if isinstance(got, Exception) or not held.same(which, got):
                    failure = (name, inp, got)
                    break
            if failure is not None:
                break
    if failure is not None:
        name, inp, got = failure
        what = f"call {asked[name]} of up to {_hot_total(calls, repeats[name])} for {name}"
        if isinstance(got, Exception):
            probe.judge(case, inp, what, got)
        else:
            case.fail("unstable-across-steps", f"{what} returned another table than its first call")
        return case
    held.release_all()
    return case
