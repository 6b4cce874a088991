"""Stage 3: every rank's findings travel to rank 0 once, at the end, and are merged there.

What crosses the wire scales with what must be judged, not with the tables: findings (a few
lines per failing case), the cases each rank judged, its cache keys with table digests, one
digest per unsharded table it built, and, only for a rank whose tokens are not the plan's, its
claimed token indices (so rank 0 can still say whether the group partitions the grid).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .dist import Job, phase
from .judge import KeyRecord, check_partition, find_key_collisions, plan_tokens
from .matrix import Case
from .report import DIAGNOSES, SKIPPED, CaseResult, Report

LEVEL_ORDER = ("table", "apply", "attention")
ORDER = list(DIAGNOSES)  # report order: slice, oracle and key findings before the upper levels


@dataclass
class RankReport:
    """What one rank sends rank 0."""

    rank: int
    findings: dict[int, list[tuple[str, str, float]]] = field(default_factory=dict)
    judged: list[int] = field(default_factory=list)  # cases whose first-call slice this rank judged
    records: list[KeyRecord] = field(default_factory=list)
    ref_digests: dict[int, str] = field(default_factory=dict)  # spec number -> its row digests, digested
    spec_cases: dict[int, list[int]] = field(default_factory=dict)  # spec number -> its cases
    off_plan: dict[int, tuple[int, int, torch.Tensor]] = field(default_factory=dict)  # case -> group, sp_rank, claims
    levels: dict[int, str] = field(default_factory=dict)  # highest level judged per case
    probes: list[CaseResult] = field(default_factory=list)
    cpu_s: float = 0.0  # CPU seconds of the case stages (Report.rank_cpu_s)


# Whether one process, asked for the first call's input and then the other's, gives the other
# its own table (a cache whose entries hold more than the key says: a window of frames checked
# on every hit); False when it hands out the first's table, or anything else.
Replay = Callable[[KeyRecord, KeyRecord], bool]


def collect(job: Job, mine: RankReport, cases: list[Case], report: Report, replay: Replay) -> Report | None:
    """Gather every rank's report at rank 0 and merge it into ``report`` (None elsewhere)."""
    job.sync("collect results")
    with phase("collect results"):
        gathered = job.gather(mine, None, list(range(job.env.world_size)))
    if gathered is None:
        return None
    with phase("merge results"):
        merge(gathered, cases, replay)
    report.cases = [case.result for case in cases] + [p for r in gathered for p in r.probes]
    report.rank_cpu_s = [round(r.cpu_s, 3) for r in gathered]
    return report


def merge(reports: list[RankReport], cases: list[Case], replay: Replay | None = None) -> None:
    judged: dict[int, set[int]] = {}
    found: dict[int, list[tuple[int, int, str, str, float]]] = {}
    for r in reports:
        for index, items in r.findings.items():
            found.setdefault(index, []).extend((ORDER.index(d), r.rank, d, detail, err) for d, detail, err in items)
    for index, ordered in found.items():
        result = cases[index].result
        # The table's own findings first, lower ranks first: the first line names the root cause.
        for _, _, diagnosis, detail, error in sorted(ordered, key=lambda item: item[:2]):
            if result.status != SKIPPED and f"{diagnosis}: {detail}" not in result.details:
                result.fail(diagnosis, detail)
            result.max_abs_error = max(result.max_abs_error, error)
    for r in reports:
        for index in r.judged:
            judged.setdefault(index, set()).add(r.rank)
        for index, level in r.levels.items():
            _raise_level(cases[index].result, level)
    for case in cases:
        fam = case.family
        expected = {rank for group in fam.sp.groups for rank in group}
        missing = expected - judged.get(case.index, set())
        if case.result.status == "passed" and missing:
            case.result.fail("slice-mismatch", f"rank(s) {sorted(missing)} returned no table for this case")
    _partitions(reports, cases)
    _references_agree(reports, cases)
    for collision in find_key_collisions([rec for r in reports for rec in r.records]):
        if replay is not None and replay(collision.first, collision.other):
            continue  # one process tells the two calls apart: the key is shared, no table is
        for index in sorted(collision.cases):
            if cases[index].result.status != SKIPPED:
                cases[index].result.fail("key-collision", collision.message)


def _raise_level(result: CaseResult, level: str) -> None:
    if LEVEL_ORDER.index(level) > LEVEL_ORDER.index(result.level):
        result.level = level


def _partitions(reports: list[RankReport], cases: list[Case]) -> None:
    """Where some rank's claimed tokens were not the plan's, its group's claims must still
    partition the grid (the other ranks' claims are the plan's, which they were checked to be)."""
    claims: dict[tuple[int, int], dict[int, torch.Tensor]] = {}
    for r in reports:
        for index, (group, sp_rank, claimed) in r.off_plan.items():
            claims.setdefault((index, group), {})[sp_rank] = claimed
    for (index, _group), by_rank in claims.items():
        case = cases[index]
        fam = case.family
        every = [
            by_rank.get(sp_rank, plan_tokens(fam.plan, fam.config.grid, sp_rank, fam.sp.size))
            for sp_rank in range(fam.sp.size)
        ]
        check_partition(case.result, every, case.spec.num_tokens, case.spec.grid)


def _references_agree(reports: list[RankReport], cases: list[Case]) -> None:
    """Every rank's unsharded table for a spec must be the same table (slices were compared with
    each rank's own; the oracle judged one of them)."""
    spec_cases = reports[0].spec_cases
    by_spec: dict[int, dict[str, int]] = {}
    for r in reports:
        for spec, digest in r.ref_digests.items():
            by_spec.setdefault(spec, {}).setdefault(digest, r.rank)
    for spec, digests in by_spec.items():
        if len(digests) > 1:
            ranks = sorted(digests.values())[:2]
            for index in spec_cases.get(spec, []):
                cases[index].result.fail(
                    "oracle-mismatch", f"the unsharded table differs between ranks {ranks[0]} and {ranks[1]}"
                )
