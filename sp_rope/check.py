"""``python -m sp_rope.check``: the multi-rank verdict on sharded, cached RoPE tables.

Run it under torchrun (``torchrun --nproc-per-node 4 -m sp_rope.check``) or let it launch its
own ranks (``python -m sp_rope.check --nproc 4``). Each rank builds its slices through the
implementation's cache for every case, repeats them like denoising steps, sweeps causal
start_frames in two orders (so LRU entries are evicted and re-entered), then the slices are
gathered per SP group and compared with the unsharded table and an independent formula, and
every cache key seen anywhere is checked for sharing. Exit codes: 0 pass, 1 a correctness
violation, 2 bad input, 3 an infrastructure failure (crash, hang, timeout), rank and phase named.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
from dataclasses import dataclass, field
from functools import lru_cache

from .adapters import CONVENTIONS, make_provider
from .cache import CacheMutationError, RopeSlice
from .config import DEFAULT_CONFIGS, ConfigError, GeometryConfig, Matrix, load_config, validate_matrix
from .dist import Job, LaunchEnv, PhaseError, UsageError, launch_env, phase, phase_of, resolve_backend
from .levels import (
    LEVELS,
    MAX_TOKENS,
    AttentionInput,
    HiddenStates,
    attention_input,
    attention_local,
    draw_hidden_states,
    reference_for,
    rotate_local,
    shard_rows,
    verify_apply,
    verify_attention,
)
from .providers import Provider, SpRopeProvider
from .report import FAILED, SKIPPED, CaseResult, Report
from .sharding import ALL_PLAN_NAMES, ShardError, ShardPlan, parse_plan
from .spec import RopeSpec
from .verify import (
    KeyRecord,
    RankPayload,
    compare_oracle,
    compare_slices,
    find_key_collisions,
    key_digest,
    tensor_digest,
)

DEFAULT_START_FRAMES = (0, 1, 17, 4096)
DEFAULT_DTYPES = ("float32", "float64")
DEFAULT_LAYOUTS = ("interleaved", "half", "neox")
GATHER_BUDGET_BYTES = 256 * 1024**2  # per gather round, counted as unsharded table bytes
MAX_ATTENTION_TOKENS = 8192  # the reference attention's [N, N] mask and scores stay small

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INFRA = 0, 1, 2, 3


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line, no usage dump: the same on every rank, easy to grep in CI logs.
        raise ConfigError(message)


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _int_csv(field_name: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in _csv(text))
    except ValueError:
        raise ConfigError(f"{field_name}: expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sp_rope.check", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--nproc", type=int, default=None, help="ranks to launch when not under torchrun (default 4)")
    p.add_argument(
        "--config",
        action="append",
        default=None,
        help=f"preset name in configs/ or a TOML path; repeatable (default: {', '.join(DEFAULT_CONFIGS)})",
    )
    p.add_argument("--backend", default="auto", help="auto, gloo or nccl (auto: nccl with one GPU per rank, else gloo)")
    p.add_argument("--schemes", default=",".join(ALL_PLAN_NAMES), help="comma-separated sharding schemes")
    p.add_argument("--dtypes", default=",".join(DEFAULT_DTYPES), help="frequency dtypes: float32,float64")
    p.add_argument("--layouts", default=",".join(DEFAULT_LAYOUTS), help="interleaved,half,neox")
    p.add_argument("--start-frames", default=",".join(map(str, DEFAULT_START_FRAMES)), help="causal offsets to sweep")
    p.add_argument("--steps", type=int, default=3, help="denoising steps: calls per case (default 3)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds for every collective (default 60)")
    p.add_argument("--report", default=None, help="write a JSON report here")
    p.add_argument("--junit", default=None, help="write JUnit XML here")
    p.add_argument("--quiet", action="store_true", help="print only the count line")
    p.add_argument("--impl", default=None, help="implementation to check: module:attr or path/to/file.py:attr")
    p.add_argument("--convention", default="native", help=f"how to call --impl: {', '.join(CONVENTIONS)}")
    p.add_argument("--impl-cache", default=None, help="the mapping --impl caches into (module:attr or file.py:attr)")
    p.add_argument("--level", default="all", help="table, apply, attention or all (default all)")
    p.add_argument(
        "--mutants",
        action="store_true",
        help="run the check on every implementation in sp_rope.mutants and print the kill table",
    )
    return p


@dataclass
class Settings:
    matrix: Matrix
    backend: str
    timeout: float
    nproc: int | None
    report: str | None
    junit: str | None
    quiet: bool
    provider: Provider
    mutants: bool = False
    levels: tuple[str, ...] = ("table",)
    argv: list[str] = field(default_factory=list)


def parse_settings(argv: list[str], world_size: int) -> Settings:
    """Parse and validate everything that can be validated before any process exists."""
    args = build_parser().parse_args(argv)
    if args.nproc is not None and args.nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {args.nproc}")
    if not args.timeout > 0:
        raise ConfigError(f"--timeout must be > 0, got {args.timeout}")
    if args.backend not in ("auto", "gloo", "nccl"):
        raise ConfigError(f"--backend: unknown value {args.backend!r} (choose from auto, gloo, nccl)")
    configs = tuple(load_config(name) for name in (args.config or DEFAULT_CONFIGS))
    matrix = Matrix(
        configs=configs,
        schemes=_csv(args.schemes),
        dtypes=_csv(args.dtypes),
        layouts=_csv(args.layouts),
        start_frames=_int_csv("--start-frames", args.start_frames),
        steps=args.steps,
    )
    if not matrix.schemes or not matrix.dtypes or not matrix.layouts or not matrix.start_frames:
        raise ConfigError("--schemes, --dtypes, --layouts and --start-frames must not be empty")
    validate_matrix(matrix, sp_sizes(world_size), explicit_configs=args.config is not None)
    if args.level not in LEVELS:
        raise ConfigError(f"--level: unknown value {args.level!r} (choose from {', '.join(LEVELS)})")
    if args.mutants and args.impl:
        raise ConfigError("--mutants checks the built-in catalog; it takes no --impl")
    provider = make_provider(args.impl, args.convention, args.impl_cache)
    return Settings(
        matrix,
        args.backend,
        args.timeout,
        args.nproc,
        args.report,
        args.junit,
        args.quiet,
        provider,
        args.mutants,
        LEVELS[args.level],
        argv,
    )


def sp_sizes(world_size: int) -> tuple[int, ...]:
    """Every divisor d > 1 of the world size (the world size included); 1 for a single rank."""
    return tuple(d for d in range(2, world_size + 1) if world_size % d == 0) or (1,)


# ---------------------------------------------------------------------------------------------
# The rank side


@dataclass(frozen=True)
class Family:
    """Cases that share everything but start_frame: one causal sweep."""

    config: GeometryConfig
    scheme: str
    dtype: str
    layout: str
    sp_size: int

    def start_frames(self, matrix: Matrix) -> tuple[int, ...]:
        return tuple(dict.fromkeys((*matrix.start_frames, *self.config.start_frames)))

    def spec(self, start_frame: int) -> RopeSpec:
        return self.config.spec(self.dtype, self.layout, start_frame)


def families(matrix: Matrix, sizes: tuple[int, ...]) -> list[Family]:
    return [
        Family(config, scheme, dtype, layout, size)
        for size in sizes
        for config in matrix.configs
        for dtype in matrix.dtypes
        for layout in matrix.layouts
        for scheme in matrix.schemes
    ]


def sweep_order(start_frames: tuple[int, ...]) -> list[int]:
    """The second pass: ends first, moving inward (0, 4096, 1, 17 ...), so entries evicted in
    the first pass are re-entered while others are still cached."""
    order, lo, hi = [], 0, len(start_frames) - 1
    while lo <= hi:
        order.append(start_frames[lo])
        if hi != lo:
            order.append(start_frames[hi])
        lo, hi = lo + 1, hi - 1
    return order


@dataclass
class RankRun:
    """Everything one rank learned locally while building its slices."""

    records: list[KeyRecord] = field(default_factory=list)
    findings: dict[int, list[tuple[str, str]]] = field(default_factory=dict)
    extras: dict[int, dict[str, object]] = field(default_factory=dict)  # upper-level outputs per case


def _snapshot(sl: RopeSlice) -> RopeSlice:
    # Copy to the CPU now: a buggy implementation may mutate the returned tensors later.
    return RopeSlice(
        sl.cos.detach().to("cpu", copy=True),
        sl.sin.detach().to("cpu", copy=True),
        sl.indices.detach().to("cpu", copy=True),
        sl.key,
    )


def run_family(
    provider: Provider,
    fam: Family,
    case_ids: dict[int, int],
    sp_rank: int,
    job: Job,
    matrix: Matrix,
    run: RankRun,
    group_index: int,
    skipped: dict[int, str],
) -> dict[int, RopeSlice]:
    """Build every start_frame of one family through the provider, twice over, ``steps`` each."""
    plan = parse_plan(fam.scheme)
    first: dict[int, RopeSlice] = {}
    digests: dict[int, str] = {}

    def call(sf: int, when: str) -> None:
        case = case_ids[sf]
        spec = fam.spec(sf)
        try:
            sl = provider.get(spec, plan, sp_rank, fam.sp_size, job.device)
        except CacheMutationError as exc:
            run.findings.setdefault(case, []).append(("mutated-in-place", f"rank {job.rank}: {exc}"))
            return
        digest = tensor_digest(sl.cos, sl.sin, sl.indices)
        if sl.key is not None:
            run.records.append(
                KeyRecord(key_digest(sl.key), repr(sl.key)[:160], digest, job.rank, fam.sp_size, group_index, case)
            )
        if sf not in first:
            first[sf], digests[sf] = _snapshot(sl), digest
        elif digest != digests[sf]:
            diagnosis = "stale-after-eviction" if when == "reentry" else "unstable-across-steps"
            run.findings.setdefault(case, []).append(
                (diagnosis, f"rank {job.rank} got a different table on {when} for start_frame {sf}")
            )

    sfs = tuple(sf for sf in fam.start_frames(matrix) if sf not in skipped)
    for sf in sfs:  # pass 1: the denoising loop of each causal block
        for step in range(matrix.steps):
            call(sf, "first call" if step == 0 else f"step {step + 1}")
    for sf in sweep_order(sfs):  # pass 2: revisit, after evictions
        call(sf, "reentry")
    return first


def skip_reasons(provider: Provider, fam: Family, matrix: Matrix) -> dict[int, str]:
    """start_frame -> why that case cannot run (the scheme cannot shard, or the implementation
    cannot express it); the same answer on every rank, so every rank skips the same cases."""
    plan = parse_plan(fam.scheme)
    try:
        plan.indices(fam.config.grid, 0, fam.sp_size)
    except ShardError as exc:
        return {sf: str(exc) for sf in fam.start_frames(matrix)}
    reasons = {sf: provider.skip_reason(fam.spec(sf), plan) for sf in fam.start_frames(matrix)}
    return {sf: reason for sf, reason in reasons.items() if reason is not None}


def run_check(job: Job, provider: Provider, matrix: Matrix, levels: tuple[str, ...] = ("table",)) -> Report | None:
    """The whole check on this rank; rank 0 returns the merged report, others None."""
    sizes = sp_sizes(job.env.world_size)
    hidden: dict[str, HiddenStates | None] = {}
    for config in matrix.configs:
        small = config.grid and len(config.grid) == 3 and _tokens(config) <= MAX_TOKENS
        if set(levels) - {"table"} and small:
            with phase(f"draw hidden states {config.name}"):
                hidden[config.name] = draw_hidden_states(
                    _tokens(config), job.env.world_size, config.head_dim, job.device
                )
        else:
            hidden[config.name] = None
    all_families = families(matrix, sizes)
    cases: list[CaseResult] = []
    case_index: list[dict[int, int]] = []
    for fam in all_families:
        ids = {}
        for sf in fam.start_frames(matrix):
            ids[sf] = len(cases)
            cases.append(CaseResult(fam.config.name, fam.scheme, fam.sp_size, sf, fam.dtype, fam.layout))
        case_index.append(ids)
    run = RankRun()
    verified: dict[int, CaseResult] = {}
    for size in sizes:
        group, group_ranks = job.sp_group(size)
        sp_rank = group_ranks.index(job.rank)
        is_leader = sp_rank == 0
        batch: list[tuple[int, Family, dict[int, RopeSlice]]] = []
        batch_bytes = 0
        attention: list[tuple[int, AttentionInput]] = []  # (case, input) of the batch's families
        members = [i for i, fam in enumerate(all_families) if fam.sp_size == size]
        for pos, fi in enumerate(members):
            fam = all_families[fi]
            skipped = skip_reasons(provider, fam, matrix)
            for sf, reason in skipped.items():
                cases[case_index[fi][sf]].skip(reason)
            if len(skipped) == len(case_index[fi]):
                continue
            with phase(f"build P={size} {fam.config.name}/{fam.scheme}/{fam.dtype}/{fam.layout}"):
                first = run_family(provider, fam, case_index[fi], sp_rank, job, matrix, run, job.rank // size, skipped)
            hs = hidden[fam.config.name]
            if hs is not None:
                # Decided from the matrix alone, so every rank of the group joins the same attentions.
                built = [sf for sf in fam.start_frames(matrix) if sf not in skipped]
                attend = "attention" in levels and _tokens(fam.config) <= MAX_ATTENTION_TOKENS
                attention_sf = max(built) if attend else None
                with phase(f"apply P={size} {fam.config.name}/{fam.scheme}/{fam.dtype}/{fam.layout}"):
                    pending = _run_levels(fam, first, hs, levels, sp_rank, job, case_index[fi], run, attention_sf)
                if pending is not None:
                    attention.append(pending)
            batch.append((fi, fam, first))
            # Every rank counts the same unsharded bytes, so all agree on when to gather.
            batch_bytes += sum(fam.spec(0).num_tokens * fam.spec(0).width * 16 for _ in first)
            if batch_bytes >= GATHER_BUDGET_BYTES or pos == len(members) - 1:
                _attend(attention, group, run, size)
                _gather_and_verify(
                    job, provider, group, group_ranks, is_leader, batch, case_index, cases, run, verified, hidden
                )
                batch, batch_bytes, attention = [], 0, []
        if batch:
            _attend(attention, group, run, size)
            _gather_and_verify(
                job, provider, group, group_ranks, is_leader, batch, case_index, cases, run, verified, hidden
            )
    job.sync("collect results")
    with phase("collect results"):
        gathered = job.gather((list(verified.values()), run.records), None, list(range(job.env.world_size)))
    if gathered is None:
        return None
    return _merge(cases, gathered, job, provider)


def _tokens(config: GeometryConfig) -> int:
    return math.prod(config.grid)


def _run_levels(
    fam: Family,
    first: dict[int, RopeSlice],
    hs: HiddenStates,
    levels: tuple[str, ...],
    sp_rank: int,
    job: Job,
    case_ids: dict[int, int],
    run: RankRun,
    attention_sf: int | None,
) -> tuple[int, AttentionInput] | None:
    """Rotate the rank's own hidden states with its slices; returns (case, attention input) of
    ``attention_sf`` (the caller batches attention over families: it is collective)."""
    plan = parse_plan(fam.scheme)
    grid = fam.config.grid
    own = plan.indices(grid, sp_rank, fam.sp_size)
    unrotated = (shard_rows(hs.q, own), shard_rows(hs.k, own))
    rotated = {}
    for sf, sl in first.items():
        try:
            rotated[sf] = rotate_local(hs, sl, own, fam.layout)
        except ValueError as exc:  # a table with the wrong number of rows: still join the collectives
            run.findings.setdefault(case_ids[sf], []).append(("apply-mismatch", f"rank {job.rank}: {exc}"))
            rotated[sf] = unrotated
        if "apply" in levels:  # q alone: k goes through the same rotation (and through attention)
            run.extras.setdefault(case_ids[sf], {})["apply"] = rotated[sf][0]
    if attention_sf is None:
        return None
    # A rank with no table for it (its failure is recorded) still joins the all-to-alls.
    rq, rk = rotated.get(attention_sf, unrotated)
    return case_ids[attention_sf], attention_input(hs, rq, rk, plan, grid, sp_rank, fam.sp_size, job.device)


def _attend(attention: list[tuple[int, AttentionInput]], group: object, run: RankRun, size: int) -> None:
    """Ulysses attention of every pending family at once: two all-to-alls, not two per family."""
    if not attention:
        return
    with phase(f"attention P={size}"):
        outputs = attention_local([a for _, a in attention], group)
    for (case, _), out in zip(attention, outputs):
        run.extras.setdefault(case, {})["attention"] = out


def _gather_and_verify(
    job: Job,
    provider: Provider,
    group: object,
    group_ranks: list[int],
    is_leader: bool,
    batch: list[tuple[int, Family, dict[int, RopeSlice]]],
    case_index: list[dict[int, int]],
    cases: list[CaseResult],
    run: RankRun,
    verified: dict[int, CaseResult],
    hidden: dict[str, HiddenStates | None],
) -> None:
    size = len(group_ranks)
    payload: dict[int, tuple[RankPayload | None, list[tuple[str, str]]]] = {}
    for fi, _, first in batch:
        for ci in case_index[fi].values():
            if cases[ci].status == SKIPPED:
                continue
            sl = first.get(cases[ci].start_frame)
            sent = None if sl is None else RankPayload(job.rank, sl.indices, sl.cos, sl.sin, run.extras.pop(ci, {}))
            payload[ci] = (sent, run.findings.get(ci, []))
    job.sync(f"gather P={size}")
    with phase(f"gather P={size}"):
        per_rank = job.gather(payload, group, group_ranks)
    if not is_leader or per_rank is None:
        return
    with phase(f"verify P={size}"):
        for fi, fam, _ in batch:
            plan = parse_plan(fam.scheme)
            for sf, ci in case_index[fi].items():
                case, spec = cases[ci], fam.spec(sf)
                if case.status == SKIPPED:
                    continue
                slices = []
                for sp_rank, rank_payload in enumerate(per_rank):
                    sent, findings = rank_payload[ci]
                    for diagnosis, detail in findings:
                        case.fail(diagnosis, detail)
                    if sent is None:
                        case.fail("slice-mismatch", f"rank {group_ranks[sp_rank]} returned no table for this case")
                    slices.append(sent)
                reference = _reference(provider, spec, job.device)
                want = ((spec.num_tokens, spec.width), spec.torch_dtype)
                got = (tuple(reference.cos.shape), reference.cos.dtype)
                if got != want or reference.sin.shape != reference.cos.shape:
                    # Nothing else can be compared against a table of the wrong shape or dtype.
                    case.fail(
                        "oracle-mismatch",
                        f"the unsharded table is {list(reference.cos.shape)} {reference.cos.dtype}, "
                        f"the spec needs {list(want[0])} {want[1]}",
                    )
                    verified[ci] = case
                    continue
                if all(s is not None for s in slices):
                    compare_slices(case, spec, plan, slices, reference)
                    _verify_levels(case, spec, plan, slices, reference, hidden)
                _oracle_once(case, spec, reference)
                verified[ci] = case


_oracle_verdicts: dict[tuple[RopeSpec, str], list[tuple[str, str, float]]] = {}


def _verify_levels(
    case: CaseResult,
    spec: RopeSpec,
    plan: ShardPlan,
    slices: list[RankPayload],
    reference: RopeSlice,
    hidden: dict[str, HiddenStates | None],
) -> None:
    hs = hidden.get(case.config)
    levels = [level for level in ("apply", "attention") if all(level in s.extras for s in slices)]
    if hs is None or not levels:
        return
    ref = reference_for(hs, reference, spec.layout, with_attention="attention" in levels)
    for sp_rank, sent in enumerate(slices):
        own = plan.indices(spec.grid, sp_rank, case.sp_size)
        if "apply" in levels:
            verify_apply(case, ref, sent.rank, plan, own, sent.extras["apply"], spec.grid)
        if "attention" in levels:
            verify_attention(case, ref, sent.rank, plan, own, sent.extras["attention"], spec.grid)
    case.level = levels[-1]


def _oracle_once(case: CaseResult, spec: RopeSpec, reference: RopeSlice) -> None:
    # The oracle costs a full float64 table: judge each distinct reference once per process.
    memo_key = (spec, tensor_digest(reference.cos, reference.sin))
    if memo_key not in _oracle_verdicts:
        probe = CaseResult(case.config, case.scheme, case.sp_size, case.start_frame, case.dtype, case.layout)
        compare_oracle(probe, spec, reference)
        _oracle_verdicts[memo_key] = [
            (d, detail.split(": ", 1)[1], probe.max_abs_error) for d, detail in zip(probe.diagnoses, probe.details)
        ]
    for diagnosis, detail, err in _oracle_verdicts[memo_key]:
        case.max_abs_error = max(case.max_abs_error, err)
        case.fail(diagnosis, detail)


@lru_cache(maxsize=8)
def _reference(provider: Provider, spec: RopeSpec, device: str) -> RopeSlice:
    """The implementation's own unsharded table, built on the rank's device: slices are compared
    with it bit for bit (a GPU-built table may differ from a CPU one in the last bits; the
    oracle, with its stated tolerance, judges the values)."""
    return _snapshot(provider.full(spec, device))


def _merge(cases: list[CaseResult], gathered: list, job: Job, provider: Provider) -> Report:
    records: list[KeyRecord] = []
    by_id = {case.case_id: case for case in cases}
    for verified, rank_records in gathered:
        records.extend(rank_records)
        for result in verified:
            target = by_id[result.case_id]
            if target.status == SKIPPED:
                continue
            for detail in result.details:
                diagnosis = detail.split(":", 1)[0]
                if result.status == FAILED and detail not in target.details:
                    target.fail(diagnosis, detail.split(": ", 1)[1])
            target.max_abs_error = max(target.max_abs_error, result.max_abs_error)
    for involved, message in find_key_collisions(records):
        for ci in sorted(involved):
            if cases[ci].status != SKIPPED:
                cases[ci].fail("key-collision", message)
    return Report(cases, job.env.world_size, job.backend, provider.name)


# ---------------------------------------------------------------------------------------------
# Entry points


def _say(message: str, rank: int) -> None:
    if rank == 0:
        print(f"sp_rope.check: {message}", file=sys.stderr, flush=True)


def rank_main(settings: Settings, env: LaunchEnv) -> int:
    """One rank of the job: exit code 0/1 agreed by every rank (rank 0 decides)."""
    backend, device = resolve_backend(settings.backend, env)
    if settings.nproc is not None and settings.nproc != env.local_world_size:
        raise UsageError(f"--nproc {settings.nproc} disagrees with this launch ({env.local_world_size} ranks per node)")
    provider = settings.provider
    job = Job(env, backend, device, settings.timeout)
    try:
        if settings.mutants:
            return _run_mutants(job, settings)
        report = run_check(job, provider, settings.matrix, settings.levels)
        code = EXIT_OK
        if report is not None:
            code = EXIT_FAIL if report.failed else EXIT_OK
            print(report.summary_line() if settings.quiet else report.human(), flush=True)
            if settings.report:
                report.write_json(settings.report)
            if settings.junit:
                report.write_junit(settings.junit)
        job.sync("finish")
        with phase("finish"):
            return int(job.broadcast(code))
    finally:
        job.close()


def _run_mutants(job: Job, settings: Settings) -> int:
    """Every catalog entry through the same job: mutants must fail with their declared
    diagnosis, correct implementations (sp_rope itself included) must pass."""
    from .mutants import catalog

    rows: list[tuple[str, str, str, str, bool]] = []
    entries = [(None, "sp_rope", "native", None)] + [(m, m.name, m.convention, m.expected) for m in catalog()]
    for mutant, name, convention, expected in entries:
        provider = (
            SpRopeProvider()
            if mutant is None
            else make_provider(
                f"{mutant.module}:{mutant.impl}",
                convention,
                f"{mutant.module}:{mutant.cache}" if mutant.cache else None,
            )
        )
        with phase(f"mutant {name}"):
            report = run_check(job, provider, settings.matrix, settings.levels)
        if report is not None:
            found = sorted(report.diagnoses())
            ok = (expected in found) if expected else (report.failed == 0 and report.count("passed") > 0)
            rows.append((name, convention, expected or "(passes)", ",".join(found) or "pass", ok))
    code = EXIT_OK
    if job.rank == 0:
        mutants = [r for r in rows if r[2] != "(passes)"]
        killed = sum(r[4] for r in mutants)
        false_positives = sum(not r[4] for r in rows if r[2] == "(passes)")
        lines = [f"{'implementation':<34} {'convention':<13} {'expected':<22} {'got':<44} verdict"]
        for name, convention, expected, got, ok in rows:
            verdict = ("killed" if ok else "SURVIVED") if expected != "(passes)" else ("ok" if ok else "FALSE POSITIVE")
            lines.append(f"{name:<34} {convention:<13} {expected:<22} {got:<44} {verdict}")
        if not mutants:  # an empty catalog proves nothing
            lines.append("no mutants found in sp_rope.mutants")
        lines.append(
            f"kill rate {100 * killed / max(1, len(mutants)):.0f}% ({killed}/{len(mutants)} mutants), "
            f"{false_positives} false positives ({len(rows) - len(mutants)} correct implementations)"
        )
        print("\n".join(lines), flush=True)
        code = EXIT_OK if mutants and killed == len(mutants) and not false_positives else EXIT_FAIL
    job.sync("finish")
    with phase("finish"):
        return int(job.broadcast(code))


def _rank_entry(settings: Settings, env: LaunchEnv) -> int:
    from torch.distributed.elastic.multiprocessing.errors import record

    try:
        code = record(rank_main)(settings, env)
        return EXIT_INFRA if code is None else code
    except UsageError as exc:
        _say(str(exc), env.rank)
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - any crash of this rank is an infrastructure failure
        where = phase_of(exc)
        if not isinstance(exc, PhaseError):
            traceback.print_exc()
        print(
            f"sp_rope.check: rank {env.rank} failed in phase {where!r}: {type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_INFRA


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    env = launch_env()
    rank = env.rank if env else 0
    try:
        nproc_probe = _peek_nproc(argv)
        settings = parse_settings(argv, env.world_size if env else nproc_probe)
    except ConfigError as exc:
        _say(str(exc), rank)
        return EXIT_USAGE
    if env is None:
        from .launch import self_launch

        try:  # refuse NCCL without one GPU per rank before starting anything
            resolve_backend(settings.backend, LaunchEnv(0, nproc_probe, 0, nproc_probe))
        except UsageError as exc:
            _say(str(exc), rank)
            return EXIT_USAGE
        return self_launch(settings, nproc_probe)
    code = _rank_entry(settings, env)
    verdict_file = os.environ.get("SP_ROPE_VERDICT_FILE")
    if verdict_file and code in (EXIT_OK, EXIT_FAIL, EXIT_USAGE):
        # Under the self-launcher a verdict travels by file and ranks exit 0, so the agent never
        # mistakes a verdict for a crash (nor stops slower ranks mid-exit); 3 stays an exit code.
        if env.rank == 0:
            with open(verdict_file, "w") as f:
                f.write(str(code))
        return EXIT_OK
    return code


def _peek_nproc(argv: list[str]) -> int:
    args, _ = build_parser().parse_known_args(argv)
    if args.nproc is not None and args.nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {args.nproc}")
    return args.nproc or int(os.environ.get("SP_ROPE_NPROC", "4"))


if __name__ == "__main__":
    sys.exit(main())
