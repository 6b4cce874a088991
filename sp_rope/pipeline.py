"""The check on one rank, stage by stage: matrix -> build -> judge -> exchange -> report.

For each geometry, dtype and layout ("a sweep group"), every rank walks the start_frames in
order. For each one it builds the implementation's unsharded table once, has the owner rank
judge it against the float64 oracle, then calls the implementation for every family of the
group it sits in (schemes x SP layouts), judging each first-call slice where it lies against
that table: its row digests, or the table itself where it is small (``_holds``). A second pass
re-enters the start_frames in another order. Only findings travel.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from dataclasses import dataclass, field

import torch

from .build import RankState, Seat, call
from .cache import RopeSlice
from .config import Matrix
from .dist import Job, UsageError, phase, return_freed_memory
from .exchange import RankReport, collect
from .judge import (
    KeyRecord,
    LevelReference,
    RankSlice,
    ReferenceRows,
    Watched,
    compare_oracle,
    content_digest,
    judge_apply,
    judge_attention,
    judge_reference,
    judge_slice,
    plan_tokens,
)
from .levels import (
    MAX_ATTENTION_TOKENS,
    MAX_TOKENS,
    AttentionInput,
    HiddenStates,
    attention_input,
    attention_local,
    draw_hidden_states,
    rotate_rows,
    shard_rows,
)
from .matrix import Case, Family, SpLayout, expand, families
from .progress import Progress
from .providers import Provider, WrongDevice, as_a_model_calls, require_device
from .report import CaseResult, Report
from .sharding import ShardError
from .spec import RopeSpec


@dataclass(frozen=True)
class RunSpec:
    """What one run checks, as every rank agrees on it."""

    matrix: Matrix
    levels: tuple[str, ...]
    seed: int
    breadth: bool  # the default run: adversarial geometries and call patterns added
    progress: bool = True


@dataclass
class Pending:
    """One family's attention input, waiting for its SP layout's batched all-to-all."""

    case: Case
    seat: Seat
    data: AttentionInput
    reference: LevelReference | None  # None: this rank has no table to judge (its failure is recorded)


@dataclass
class ConfigLevels:
    """The upper levels' state for one geometry: its hidden states, the rank's rows of them per
    plan position, and the attention inputs waiting for their SP layout's all-to-alls."""

    hidden: HiddenStates
    _rows: dict[tuple[object, ...], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    attention: dict[SpLayout, list[Pending]] = field(default_factory=dict)

    def rows(self, own: torch.Tensor, where: tuple[object, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        if where not in self._rows:
            self._rows[where] = (shard_rows(self.hidden.q, own), shard_rows(self.hidden.k, own))
        return self._rows[where]


@dataclass
class Sweep:
    """One sweep group (geometry x dtype x layout) on this rank: its families and where it sits."""

    families: list[Family]
    seats: list[Seat]
    levels: ConfigLevels | None


@dataclass
class RankRun:
    """Everything one rank carries through the stages."""

    job: Job
    provider: Provider
    run: RunSpec
    cases: dict[tuple[int, int], Case]  # (id of family, start_frame) -> case
    skips: dict[int, dict[int, str]]  # id of family -> start_frame -> why it cannot run
    progress: Progress
    state: RankState = field(init=False)
    report: RankReport = field(init=False)
    specs: int = 0  # specs numbered in matrix order, the same on every rank
    largest_table: int = field(init=False)  # bytes of the run's largest cos table (see ``_holds``)

    def __post_init__(self) -> None:
        self.state = RankState(self.job, self.provider)
        self.report = RankReport(self.job.rank)
        self.largest_table = max(_table_bytes(case.spec) for case in self.cases.values())

    def case(self, fam: Family, sf: int) -> Case:
        return self.cases[(id(fam), sf)]

    def runs(self, fam: Family, sf: int) -> bool:
        return sf not in self.skips[id(fam)]


def run_rank(job: Job, provider: Provider, run: RunSpec) -> Report | None:
    """The whole check on this rank; rank 0 returns the merged report, the others None."""
    fams = families(run.matrix, job.env.world_size, run.seed, run.breadth)
    cases = expand(fams)
    skips: dict[int, dict[int, str]] = {id(fam): {} for fam in fams}
    for case in cases:
        reason = skip_reason(provider, case)
        if reason is not None:
            skips[id(case.family)][case.start_frame] = reason
            case.result.skip(reason)
    if all(case.result.status == "skipped" for case in cases):
        raise UsageError(_nothing_to_run(cases))
    rr = RankRun(
        job,
        provider,
        run,
        {(id(c.family), c.start_frame): c for c in cases},
        skips,
        Progress(len(cases), run.progress and job.rank == 0),
    )
    heads = job.env.world_size  # divisible by every consecutive SP size: Ulysses shards heads
    cpu_start = time.process_time()
    for _, by_config in itertools.groupby(fams, key=lambda f: f.config):
        config_fams = list(by_config)
        hidden = _hidden_states(rr, config_fams, heads)
        levels = None if hidden is None else ConfigLevels(hidden)
        for _, by_sweep in itertools.groupby(config_fams, key=lambda f: (f.dtype, f.layout)):
            sweep = _sweep(rr, list(by_sweep), levels)
            _first_pass(rr, sweep)
            _second_pass(rr, sweep)
        _attend(rr, config_fams, levels)
    rr.report.cpu_s = time.process_time() - cpu_start
    rr.progress.close()
    for index, message in rr.state.retention.recheck():
        rr.state.fail(index, "overwritten-after-return", message)
    rr.report.findings, rr.report.records = rr.state.findings, list(rr.state.records.values())
    return_freed_memory()
    rr.report.probes = _probe(rr)
    report = Report([], job.env.world_size, job.backend, provider.name, seed=run.seed)
    return collect(job, rr.report, cases, report, functools.partial(_replay_apart, rr, cases))


def _replay_apart(rr: RankRun, cases: list[Case], first: KeyRecord, other: KeyRecord) -> bool:
    """Rank 0 asks for ``first``'s input, then ``other``'s (another rank's calls, played here):
    whether the second gets the very table its own rank got (see ``exchange.Replay``)."""
    try:
        for rec in (first, other):
            case = cases[rec.case]
            fam = case.family
            seat = fam.sp.group_of(rec.rank)
            assert seat is not None  # the record was made by a rank in one of its groups
            with as_a_model_calls(rr.job.device):
                got = rr.provider.get(case.spec, fam.plan, seat[1].index(rec.rank), fam.sp.size, rr.job.device)
        return str(content_digest(got.cos, got.sin, got.indices)[:2]) == other.table
    except Exception:  # noqa: BLE001 - a call that fails here does not clear the key
        return False


def skip_reason(provider: Provider, case: Case) -> str | None:
    """Why a case cannot run (the scheme cannot shard the grid, or the implementation cannot
    express it); the same answer on every rank, so every rank skips the same cases."""
    fam = case.family
    try:
        plan_tokens(fam.plan, fam.config.grid, 0, fam.sp.size)
    except ShardError as exc:
        return str(exc)
    return provider.skip_reason(case.spec, fam.plan)


def _sweep(rr: RankRun, fams: list[Family], levels: ConfigLevels | None) -> Sweep:
    seats = []
    for fam in fams:
        place = fam.sp.group_of(rr.job.rank)
        if place is not None and len(rr.skips[id(fam)]) < len(fam.start_frames):
            seats.append(Seat(fam, place[1].index(rr.job.rank), place[0], place[1]))
    return Sweep(fams, seats, levels)


def _first_pass(rr: RankRun, sweep: Sweep) -> None:
    """Each start_frame in order: the unsharded table once, then every family's steps."""
    head = sweep.families[0]
    for sf in head.start_frames:
        live = [fam for fam in sweep.families if rr.runs(fam, sf)]
        where = f"{head.config.name}/{head.dtype}/{head.layout} start_frame {sf}"
        if live:
            _one_start_frame(rr, sweep, live, sf)
        rr.progress.advance(len(sweep.families), where)


def _one_start_frame(rr: RankRun, sweep: Sweep, live: list[Family], sf: int) -> None:
    spec, spec_id = rr.case(live[0], sf).spec, rr.specs
    rr.specs += 1
    rr.report.spec_cases[spec_id] = [rr.case(fam, sf).index for fam in live]
    participants = sorted({r for fam in live for group in fam.sp.groups for r in group})
    seats = [seat for seat in sweep.seats if rr.runs(seat.family, sf)]
    if not seats:
        return
    within = (seats[0].sp_rank, seats[0].family.sp.size)
    scratch = CaseResult("", "", 0, sf, spec.dtype, spec.layout)
    with phase(f"reference {spec.grid} {spec.dtype}/{spec.layout} start_frame {sf}"):
        try:
            reference, watched = _unsharded(rr, spec, within)
        except WrongDevice as exc:
            scratch.fail("wrong-device", f"rank {rr.job.rank}: the unsharded table: {exc}")
            reference, watched = None, Watched([])
        except Exception as exc:  # noqa: BLE001 - the implementation under test failed: a verdict
            scratch.fail("implementation-error", f"rank {rr.job.rank}: the unsharded table raised {exc!r}"[:300])
            reference, watched = None, Watched([])
    truth = None
    if reference is not None and judge_reference(scratch, spec, reference):
        rebuild = functools.partial(_rebuilt, rr, spec, within)
        rows = ReferenceRows.of(reference, rr.run.seed, rebuild, watched if _holds(rr, spec) else None)
        rr.report.ref_digests[spec_id] = rows.fingerprint()
        if participants[spec_id % len(participants)] == rr.job.rank:  # the oracle is spread over ranks
            compare_oracle(scratch, spec, reference)
        # The upper levels' single-rank results: computed once per spec, when first asked for (they
        # keep the table: only geometries small enough for the upper levels have them).
        hs = None if sweep.levels is None else sweep.levels.hidden
        truth = Truth(rows, None if hs is None else LevelReference((hs.q, hs.k, hs.v), reference, spec.layout))
    del reference  # held on only where _holds says so (or for the upper levels)
    for case_index in rr.report.spec_cases[spec_id]:
        _absorb(rr, case_index, scratch)
    for seat in seats:
        _steps(rr, sweep, seat, rr.case(seat.family, sf), truth)
    if watched.written():
        for case_index in rr.report.spec_cases[spec_id]:
            rr.state.fail(
                case_index,
                "mutated-in-place",
                f"rank {rr.job.rank}: the implementation wrote into the "
                "unsharded table it had returned while this rank's slices were judged against it",
            )


def _table_bytes(spec: RopeSpec) -> int:
    return spec.num_tokens * spec.width * spec.torch_dtype.itemsize


def _holds(rr: RankRun, spec: RopeSpec) -> bool:
    """Whether the rank keeps the unsharded table while it judges the spec's slices. A table at
    most half the run's largest is kept: it, a slice and the implementation's temporaries take
    no more memory than the largest table's own pass, in which the table is dropped after its
    row digests. Comparing with kept rows costs a third of digesting every slice."""
    return 2 * _table_bytes(spec) <= rr.largest_table


def _unsharded(rr: RankRun, spec: RopeSpec, within: tuple[int, int]) -> tuple[RopeSlice, Watched]:
    """The implementation's unsharded table on the CPU, and a watch on the tensors it returned."""
    with as_a_model_calls(rr.job.device):
        built = require_device(rr.provider.full(spec, rr.job.device, within), rr.job.device)
    return RopeSlice(built.cos.detach().cpu(), built.sin.detach().cpu(), built.indices), Watched.of(built)


def _rebuilt(rr: RankRun, spec: RopeSpec, within: tuple[int, int]) -> RopeSlice:
    """The unsharded table asked for again: only to size a mismatch's error."""
    return _unsharded(rr, spec, within)[0]


@dataclass
class Truth:
    """What a spec's slices are judged against: the unsharded table's row digests, and the upper
    levels' single-rank results (None where no level above the table runs)."""

    rows: ReferenceRows
    levels: LevelReference | None


def _steps(rr: RankRun, sweep: Sweep, seat: Seat, case: Case, truth: Truth | None) -> None:
    """A case's denoising steps; the first call's slice is judged at once, before the next call,
    so a rank never holds two of a case's slices (an uncached implementation returns a new one
    per step)."""
    fam = seat.family
    calls = fam.calls[fam.start_frames.index(case.start_frame)]
    first, judged = None, False
    with phase(f"build P={fam.sp.size} {fam.config.name}/{fam.scheme}/{fam.dtype}/{fam.layout}"):
        for step in range(calls):
            sl = call(rr.state, seat, case, "first call" if step == 0 else f"step {step + 1}")
            if sl is not None and truth is not None and not judged:
                _judge_first(rr, seat, case, sl, truth.rows)
                judged = True
            if sweep.levels is not None:  # the upper levels rotate with it after the steps
                first = first if sl is None else sl
            del sl
    if sweep.levels is not None:
        _levels(rr, sweep, Seated(seat, case), first, None if truth is None else truth.levels)


def _judge_first(rr: RankRun, seat: Seat, case: Case, first: RopeSlice, reference: ReferenceRows) -> None:
    rr.report.judged.append(case.index)
    scratch = _scratch(case)
    off_plan = judge_slice(scratch, case.spec, RankSlice(rr.job.rank, seat.sp_rank, seat.family.plan, first), reference)
    if off_plan is not None:
        rr.report.off_plan[case.index] = (seat.group, seat.sp_rank, off_plan)
    _absorb(rr, case.index, scratch)


@dataclass(frozen=True)
class Seated:
    """A case as one rank holds it."""

    seat: Seat
    case: Case


def _levels(rr: RankRun, sweep: Sweep, at: Seated, first: RopeSlice | None, truth: LevelReference | None) -> None:
    """Rotate the rank's own hidden states (the plan's tokens) with its slice; queue attention."""
    seat, case, levels = at.seat, at.case, sweep.levels
    fam = seat.family
    assert levels is not None
    own = plan_tokens(fam.plan, fam.config.grid, seat.sp_rank, fam.sp.size)
    q_rows, k_rows = levels.rows(own, (fam.plan, seat.sp_rank, fam.sp.size))
    where = f"rank {rr.job.rank} ({fam.plan}, P={fam.sp.size})"
    scratch = _scratch(case)
    attends = _attends(rr, fam) and case.start_frame == max(sf for sf in fam.start_frames if rr.runs(fam, sf))
    rotated, rotated_q0 = (q_rows, k_rows), None
    if first is not None:
        try:
            rotated_q0 = rotate_rows(q_rows[:, :, :1], first, fam.layout)
            if attends:
                rotated = (rotate_rows(q_rows, first, fam.layout), rotate_rows(k_rows, first, fam.layout))
        except (ValueError, RuntimeError) as exc:  # a table of the wrong shape: still join the collectives
            scratch.fail("apply-mismatch", f"{where}: {exc}")
    judgeable = rotated_q0 is not None and truth is not None and not scratch.diagnoses
    if "apply" in rr.run.levels and judgeable:
        assert truth is not None and rotated_q0 is not None
        judge_apply(scratch, where, truth, rotated_q0, own, fam.config.grid)
        rr.report.levels[case.index] = "apply"
    _absorb(rr, case.index, scratch)
    if attends:
        per_rank = [plan_tokens(fam.plan, fam.config.grid, r, fam.sp.size) for r in range(fam.sp.size)]
        data = attention_input(levels.hidden, rotated, per_rank, seat.sp_rank, rr.job.device)
        levels.attention.setdefault(fam.sp, []).append(Pending(case, seat, data, truth if judgeable else None))


def _attends(rr: RankRun, fam: Family) -> bool:
    # Consecutive groups, one dtype x layout per scheme (rotating through them, as the other SP
    # layouts do): an SP-rank bug or a bad row is the table and apply levels' to find; attention
    # proves that the rotated shards attend like the whole sequence, per scheme and SP size.
    combos = [(d, lay) for d in rr.run.matrix.dtypes for lay in rr.run.matrix.layouts]
    position = rr.run.matrix.schemes.index(fam.scheme) if fam.scheme in rr.run.matrix.schemes else 0
    return (
        "attention" in rr.run.levels
        and fam.sp.kind == "consecutive"
        and combos[position % len(combos)] == (fam.dtype, fam.layout)
        and math.prod(fam.config.grid) <= MAX_ATTENTION_TOKENS
    )


def _second_pass(rr: RankRun, sweep: Sweep) -> None:
    """Re-enter every start_frame once, in the group's revisit order (after evictions)."""
    for sf in sweep.families[0].reentry:
        for seat in sweep.seats:
            if rr.runs(seat.family, sf):
                with phase(f"re-enter P={seat.family.sp.size} {seat.family.config.name}/{seat.family.scheme}"):
                    call(rr.state, seat, rr.case(seat.family, sf), "reentry")


def _attend(rr: RankRun, fams: list[Family], levels: ConfigLevels | None) -> None:
    """Ulysses attention of every family of one geometry and SP layout at once (two all-to-alls).
    Which layouts attend follows from the matrix alone, so every rank meets at the same syncs."""
    if levels is None:
        return
    layouts = dict.fromkeys(
        fam.sp for fam in fams if _attends(rr, fam) and len(rr.skips[id(fam)]) < len(fam.start_frames)
    )
    for sp in layouts:
        name = f"attention P={sp.size} {fams[0].config.name}"
        rr.job.sync(name)
        pending = levels.attention.pop(sp, [])
        group = rr.job.sp_group(sp.groups)
        if group is None:
            continue  # this rank sits this layout out
        with phase(name):
            outputs = attention_local([p.data for p in pending], group)
        for p, out in zip(pending, outputs):
            if p.reference is None:
                continue
            fam = p.seat.family
            own = plan_tokens(fam.plan, fam.config.grid, p.seat.sp_rank, fam.sp.size)
            scratch = _scratch(p.case)
            where = f"rank {rr.job.rank} ({fam.plan}, P={fam.sp.size})"
            judge_attention(scratch, where, p.reference, out, own, fam.config.grid)
            if rr.report.levels.get(p.case.index) == "apply" or "apply" not in rr.run.levels:
                rr.report.levels[p.case.index] = "attention"
            _absorb(rr, p.case.index, scratch)


def _hidden_states(rr: RankRun, fams: list[Family], heads: int) -> HiddenStates | None:
    config = fams[0].config
    tokens = math.prod(config.grid)
    if set(rr.run.levels) == {"table"} or len(config.grid) != 3 or tokens > MAX_TOKENS:
        return None
    name = f"draw hidden states {config.name}"
    rr.job.sync(name)
    with phase(name):
        return draw_hidden_states(
            tokens, heads if tokens <= MAX_ATTENTION_TOKENS else 1, config.head_dim, rr.job.device
        )


def _scratch(case: Case) -> CaseResult:
    r = case.result
    return CaseResult(r.config, r.scheme, r.sp_size, r.start_frame, r.dtype, r.layout, group=r.group)


def _absorb(rr: RankRun, case_index: int, scratch: CaseResult) -> None:
    for detail in scratch.details:
        diagnosis, _, text = detail.partition(": ")
        rr.state.fail(case_index, diagnosis, text, scratch.max_abs_error)


def _probe(rr: RankRun) -> list[CaseResult]:
    """The key-completeness probe (from a small base and from one at a real latent's size), its
    fields spread over the ranks but the last, which runs the eviction sweep (about as long as
    all the fields together); the hot-key calls run on the rank before it."""
    from .probe import HOT_DEEP_S, field_groups, probe_eviction, probe_hot_keys, probe_keys

    world, rank = rr.job.env.world_size, rr.job.rank
    spread = max(world - 1, 1)
    groups = field_groups(rr.provider)
    with phase("key-completeness probe"):
        cases = probe_keys(rr.provider, rr.job.device, only=lambda i: rank < spread and groups[i] % spread == rank)
        # At a real latent's size too, each field on the next rank (the fields' costs even out).
        cases += probe_keys(
            rr.provider, rr.job.device, only=lambda i: rank < spread and (groups[i] + 1) % spread == rank, scaled=True
        )
    if rank == world - 1:
        with phase("cache eviction sweep"):
            # It grows past its first 1024 inputs only within a third of the job's timeout from
            # its start: the other ranks wait for it within that timeout.
            extra_s = rr.job.timeout.total_seconds() / 3
            cases.append(probe_eviction(rr.provider, rr.job.device, extra_s=extra_s))
    if rank == max(world - 2, 0):
        with phase("hot keys"):
            # Its deep calls stop within a sixth of the job's timeout: the other ranks wait for it.
            deep_s = min(HOT_DEEP_S, rr.job.timeout.total_seconds() / 6)
            cases.append(probe_hot_keys(rr.provider, rr.job.device, deep_s=deep_s))
    return cases


def _nothing_to_run(cases: list[Case]) -> str:
    reasons: dict[str, int] = {}
    for case in cases:
        reasons[case.result.details[0]] = reasons.get(case.result.details[0], 0) + 1
    common = max(reasons, key=lambda r: reasons[r])
    return (
        f"no case can run: all {len(cases)} cases of the matrix are skipped (most often: {common}); "
        "a run that checks nothing is not a pass. Choose configs, schemes, dtypes and layouts the "
        "implementation can express, e.g. --config wan2.1-t2v-1.3b-480p --schemes flat --dtypes float32 "
        "--layouts interleaved --start-frames 0 --level table"
    )
