"""The ranks' job: every model in turn on every rank, each rank's findings gathered and merged on rank 0."""

from __future__ import annotations

import json
import sys
import traceback
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass, field

from ..dist import Job, LaunchEnv, PhaseError, phase, phase_of
from .rank import RankReport, RankSettings, build_mesh, check_model, install_logger_shim
from .recipes import RECIPES, Recipe

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INFRA = 0, 1, 2, 3
PASS, FAIL, NOT_CHECKED = "pass", "FAIL", "not checked"


@dataclass(frozen=True)
class JobSettings:
    models: tuple[str, ...]  # recipe names, resolved by the parent
    plants: dict[str, str]  # recipe name -> planted bug kind
    timeout: float
    logger_shim: bool
    result_file: str


@dataclass
class ModelResult:
    model: str
    class_name: str
    rope: str  # "pass", "FAIL" or "not checked: <reason>"
    end_to_end: str
    verdict: str
    diagnoses: list[str] = field(default_factory=list)
    covers: str = ""
    rope_max_err: float | None = None
    e2e_max_err: float | None = None
    planted: str | None = None

    @property
    def status(self) -> str:
        return self.verdict.split(":")[0]


def _quiet() -> None:
    """Keep ranks' output to failures: diffusers' experimental-feature and skipped-split notices, and
    torch's deprecation notice for the collective diffusers gathers with, repeat on every rank."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=r".*_functional_collectives\.all_gather_tensor. is deprecated")


def rank_main(settings: JobSettings, env: LaunchEnv) -> int:
    _quiet()
    shim_installed = install_logger_shim() if settings.logger_shim else False
    job = Job(env, "gloo", "cpu", settings.timeout)
    try:
        with phase("device mesh"):
            mesh = build_mesh(env.world_size, settings.timeout)
        everyone = list(range(env.world_size))
        results = []
        for name in settings.models:
            recipe = RECIPES[name]
            job.sync(f"{name}: start")
            with phase(f"{name}: check"):
                report = check_model(recipe, mesh, RankSettings(settings.plants.get(name), env.world_size, env.rank))
            job.sync(f"{name}: gather")
            with phase(f"{name}: gather"):
                gathered = job.gather(report, None, everyone)
            if gathered is not None:
                results.append(merge(recipe, gathered, settings.plants.get(name)))
        job.sync("finish")
        if env.rank == 0:
            payload = {"logger_shim_installed": shim_installed, "results": [asdict(r) for r in results]}
            with open(settings.result_file, "w") as f:
                json.dump(payload, f)
        return EXIT_OK
    finally:
        job.close()


def rank_entry(settings: JobSettings, env: LaunchEnv) -> int:
    from torch.distributed.elastic.multiprocessing.errors import record

    try:
        code = record(rank_main)(settings, env)
        return EXIT_INFRA if code is None else code
    except Exception as exc:  # noqa: BLE001 - any crash of this rank is an infrastructure failure
        if not isinstance(exc, PhaseError):
            traceback.print_exc()
        print(
            f"sp_rope.cp_plans: rank {env.rank} failed in phase {phase_of(exc)!r}: {type(exc).__name__}: "
            f"{_first_line(str(exc))}",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_INFRA


def merge(recipe: Recipe, reports: list[RankReport], planted: str | None = None) -> ModelResult:
    """One verdict for ``recipe`` from every rank's report."""
    result = ModelResult(recipe.name, recipe.class_name, "", "", "", covers=recipe.covers, planted=planted)
    errors = [r for r in reports if r.error]
    if errors:
        first = errors[0]
        if first.error_stage == "enable_parallelism":
            # diffusers' own machinery refused the model's own plan: a finding about the plan.
            result.rope = result.end_to_end = f"{NOT_CHECKED}: enable_parallelism raised"
            result.verdict = FAIL
        else:
            result.rope = result.end_to_end = result.verdict = f"{NOT_CHECKED}: {first.error}"
        result.diagnoses = by_rank(recipe.name, [(r.rank, r.error or "") for r in errors])
        return result
    _merge_rope(result, recipe, reports)
    _merge_end_to_end(result, reports)
    outcomes = (result.rope.split(":")[0], result.end_to_end.split(":")[0])
    if FAIL in outcomes:
        result.verdict = FAIL
    elif PASS in outcomes:
        result.verdict = PASS
    else:
        result.verdict = result.rope
    return result


def by_rank(model: str, entries: list[tuple[int, str]]) -> list[str]:
    """One line per distinct message, naming every rank that reported it, in first-seen order."""
    ranks: dict[str, list[int]] = defaultdict(list)
    for rank, message in entries:
        ranks[message].append(rank)
    lines = []
    for message, who in ranks.items():
        label = f"rank {who[0]}" if len(who) == 1 else f"ranks {', '.join(map(str, who))}"
        lines.append(f"{model} {label}: {message}")
    return lines


def _merge_rope(result: ModelResult, recipe: Recipe, reports: list[RankReport]) -> None:
    problems = [(r.rank, line) for r in reports for p in r.probes for line in p.problems]
    reached = {(r.rank, p.label) for r in reports for p in r.probes}
    unreached = [
        (r.rank, f"{spec.label} never reached (the CP forward raised first)")
        for spec in recipe.probes
        for r in reports
        if (r.rank, spec.label) not in reached
    ]
    undetermined = [(r.rank, str(p.undetermined)) for r in reports for p in r.probes if p.undetermined]
    partition = _partition_problems(recipe, reports)
    result.rope_max_err = max((p.max_err for r in reports for p in r.probes), default=None)
    if problems or partition:
        result.rope = FAIL
        result.diagnoses += by_rank(recipe.name, problems) + [f"{recipe.name}: {line}" for line in partition]
    elif undetermined:
        result.rope = f"{NOT_CHECKED}: the tokens of {len(undetermined)} probe(s) could not be located"
        result.diagnoses += by_rank(recipe.name, undetermined)
    elif unreached:
        result.rope = f"{NOT_CHECKED}: {len(unreached)} of {len(recipe.probes) * len(reports)} probes never reached"
        result.diagnoses += by_rank(recipe.name, unreached)
    else:
        result.rope = PASS


def _partition_problems(recipe: Recipe, reports: list[RankReport]) -> list[str]:
    """The hidden-state shards the probes saw must hold every token exactly once over the ranks."""
    problems: list[str] = []
    for spec in recipe.probes:
        outcomes = [next((p for p in r.probes if p.label == spec.label), None) for r in reports]
        complete = [o for o in outcomes if o is not None and len(o.tokens) == len(spec.streams)]
        if len(complete) != len(reports):
            continue  # a rank's rows could not be located: reported by that rank
        for s, stream in enumerate(spec.streams):
            holders: dict[int, list[int]] = defaultdict(list)
            for report, outcome in zip(reports, complete):
                for token in outcome.tokens[s]:
                    holders[token].append(report.rank)
            shared = sorted(t for t, ranks in holders.items() if len(ranks) > 1)
            if shared:
                problems.append(
                    f"{spec.module} {stream.arg}: token {shared[0]} is on ranks {holders[shared[0]]} "
                    f"({len(shared)} tokens on more than one rank)"
                )
            missing = [t for t in range(complete[0].stream_sizes[s]) if t not in holders]
            if missing:
                problems.append(f"{spec.module} {stream.arg}: token {missing[0]} is on no rank")
    return problems


def _merge_end_to_end(result: ModelResult, reports: list[RankReport]) -> None:
    raised = [(r.rank, f"the CP forward raised {r.forward_error}") for r in reports if r.forward_error]
    shaped = [(r.rank, f"CP output shapes {r.e2e_shapes_differ}") for r in reports if r.e2e_shapes_differ]
    wrong = [
        (r.rank, f"CP output differs from the single-rank output by {r.e2e_err:.3g} (tolerance {r.e2e_tol:.3g})")
        for r in reports
        if r.e2e_err is not None and r.e2e_tol is not None and r.e2e_err > r.e2e_tol
    ]
    result.e2e_max_err = max((r.e2e_err for r in reports if r.e2e_err is not None), default=None)
    if raised or shaped or wrong:
        result.end_to_end = FAIL
        result.diagnoses += by_rank(result.model, raised + shaped + wrong)
    else:
        result.end_to_end = PASS


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else ""
