"""``python -m sp_rope.check``: the multi-rank verdict on sharded, cached RoPE tables.

Run it under torchrun (``torchrun --nproc-per-node 4 -m sp_rope.check``) or let it launch its
own ranks (``python -m sp_rope.check --nproc 4``). This module is the command line and the
wiring; the stages are ``matrix`` (what is checked), ``build`` (the implementation's calls on
each rank), ``judge`` (every comparison), ``exchange`` (findings to rank 0), ``report``, with
``pipeline`` running them on one rank. Exit codes: 0 pass, 1 a correctness violation, 2 bad
input, 3 an infrastructure failure (crash, hang, timeout), rank and phase named.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import traceback
from dataclasses import dataclass, field

from .adapters import CONVENTIONS, load_object, make_provider
from .config import DEFAULT_CONFIGS, ConfigError, Matrix, load_config, validate_matrix
from .dist import Job, LaunchEnv, PhaseError, UsageError, keep_freed_memory, launch_env, phase, resolve_backend
from .levels import LEVELS
from .matrix import divisors
from .pipeline import RunSpec, run_rank
from .providers import Provider, SpRopeProvider
from .sharding import ALL_PLAN_NAMES

DEFAULT_START_FRAMES = (0, 1, 17, 4096)
DEFAULT_DTYPES = ("float32", "float64")
DEFAULT_LAYOUTS = ("interleaved", "half", "neox")

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
        "--seed",
        type=int,
        default=None,
        help="seed of the matrix's random part: geometries, call counts and orders (default: drawn, printed)",
    )
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
    seed: int | None = None  # None: rank 0 draws one, printed in the header
    breadth: bool = False  # the default matrix: adversarial geometries and call patterns added


def parse_settings(argv: list[str], world_size: int) -> Settings:
    """Parse and validate everything that can be validated before any process exists."""
    from .config import resolve_config_path
    from .dist import MAX_TIMEOUT_S
    from .launch import MAX_NPROC

    args = build_parser().parse_args(argv)
    if args.nproc is not None and not 1 <= args.nproc <= MAX_NPROC:
        raise ConfigError(f"--nproc must be between 1 and {MAX_NPROC}, got {args.nproc}")
    if not 0 < args.timeout <= MAX_TIMEOUT_S:  # also refuses nan and inf
        raise ConfigError(f"--timeout must be > 0 and <= {MAX_TIMEOUT_S} seconds, got {args.timeout}")
    if args.backend not in ("auto", "gloo", "nccl"):
        raise ConfigError(f"--backend: unknown value {args.backend!r} (choose from auto, gloo, nccl)")
    for option, path in (("--report", args.report), ("--junit", args.junit)):
        if path is not None and not path.strip():
            raise ConfigError(f"{option}: empty path")
    # A preset named twice (or by name and by path) is one preset: its cases count once.
    names = {resolve_config_path(name).resolve(): name for name in args.config or DEFAULT_CONFIGS}
    configs = tuple(load_config(name) for name in names.values())
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
        args.seed,
        breadth=args.config is None,
    )


def sp_sizes(world_size: int) -> tuple[int, ...]:
    """Every divisor d > 1 of the world size (the world size included); 1 for a single rank."""
    return tuple(d for d in divisors(world_size) if d > 1) or (1,)


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
    keep_freed_memory()
    job = Job(env, backend, device, settings.timeout)
    try:
        if settings.mutants:
            return _run_mutants(job, settings)
        report = run_rank(job, provider, _run_spec(job, settings))
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


def _run_spec(job: Job, settings: Settings, progress: bool = True) -> RunSpec:
    """What this run checks, with the seed every rank agrees on (rank 0 draws one if none given)."""
    seed = settings.seed
    if seed is None:
        job.sync("agree on seed")
        with phase("agree on seed"):
            seed = int(job.broadcast(secrets.randbelow(2**31) if job.rank == 0 else None))
    return RunSpec(settings.matrix, settings.levels, seed, settings.breadth, progress and not settings.quiet)


def _run_mutants(job: Job, settings: Settings) -> int:
    """Every catalog entry through the same job: mutants must fail with their declared
    diagnosis, correct implementations (sp_rope itself included) must pass."""
    from .mutants import catalog

    rows: list[tuple[str, str, str, str, bool]] = []
    run = _run_spec(job, settings, progress=False)
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
            report = run_rank(job, provider, run)
        if mutant is not None and mutant.cache:
            # Its module stays imported: without this, every mutant's tables (a 720p geometry's
            # among them) would stay cached for the rest of the run.
            load_object(f"{mutant.module}:{mutant.cache}", "--impl-cache").clear()
        del provider
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
    """One rank, any ending turned into an exit code; how it ended goes on the board, where the
    self-launcher (or a rank that noticed the failure) reads it."""
    import contextlib

    from torch.distributed.elastic.multiprocessing.errors import record

    from . import board
    from .dist import diagnose
    from .report import JobOutcome, write_outcome_reports

    publisher = board.start(env.rank)
    try:
        code = record(rank_main)(settings, env)
    except UsageError as exc:
        _say(str(exc), env.rank)
        publisher.finish(EXIT_USAGE, str(exc), [env.rank])
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - any crash of this rank is an infrastructure failure
        diagnosis = diagnose(exc, env.rank, env.world_size)
        if diagnosis.own and not isinstance(exc, PhaseError):
            traceback.print_exc()  # this rank's own code failed: its traceback is the evidence
        publisher.finish(EXIT_INFRA, diagnosis.message, list(diagnosis.culprits))
        if board.directory() is None:  # under torchrun every rank speaks; self-launched, the launcher does
            print(f"sp_rope.check: infrastructure failure (exit 3): {diagnosis.message}", file=sys.stderr, flush=True)
            if env.rank == 0:
                culprit = diagnosis.culprits[0] if diagnosis.culprits else None
                outcome = JobOutcome("infrastructure-failure", diagnosis.message, culprit, diagnosis.phase)
                with contextlib.suppress(OSError):
                    write_outcome_reports(outcome, settings.report, settings.junit)
        return EXIT_INFRA
    code = EXIT_INFRA if code is None else code
    publisher.finish(code, "finished", [])
    return code


def main(argv: list[str] | None = None) -> int:
    import contextlib
    import signal

    from . import board
    from .report import JobOutcome, unwritable_reason, write_outcome_reports

    argv = list(sys.argv[1:] if argv is None else argv)
    env = launch_env()
    if env is not None:
        # Launchers stop ranks with a signal (SIGINT too, when torchrun gets Ctrl-C): die
        # quietly, at once, even inside a collective, instead of printing a traceback.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        board.start(env.rank)
    self_launched = board.directory() is not None
    try:
        nproc_probe = _peek_nproc(argv)
        with phase("parse options"):
            settings = parse_settings(argv, env.world_size if env else nproc_probe)
        # Only the process that writes the reports checks them (rank 0 of another node may
        # not even have the directory): before anything starts, not after the whole run.
        if env is None or (env.rank == 0 and not self_launched):
            for option, path in (("--report", settings.report), ("--junit", settings.junit)):
                reason = unwritable_reason(path) if path else None
                if reason:
                    raise ConfigError(f"{option} {path!r}: {reason}")
    except ConfigError as exc:
        if env is None or not self_launched:
            _say(str(exc), env.rank if env else 0)
        else:  # self-launched: the launcher validated this argv, so only this rank failed; it says so once
            board.start(env.rank).finish(EXIT_USAGE, str(exc), [env.rank])
        return EXIT_USAGE
    except KeyboardInterrupt:  # Ctrl-C while loading presets or --impl (ranks take SIGINT silently)
        _say("interrupted by SIGINT (exit 130) before any rank started", 0)
        return 128 + signal.SIGINT
    if env is None:
        from .launch import LaunchRequest, self_launch

        try:  # refuse NCCL without one GPU per rank before starting anything
            resolve_backend(settings.backend, LaunchEnv(0, nproc_probe, 0, nproc_probe))
        except UsageError as exc:
            _say(str(exc), 0)
            return EXIT_USAGE
        request = LaunchRequest(tuple(argv), nproc_probe, settings.timeout, settings.report, settings.junit)
        try:
            return self_launch(request)
        except KeyboardInterrupt:  # Ctrl-C before the launcher took over SIGINT
            _say("interrupted by SIGINT (exit 130) before any rank started", 0)
            return 128 + signal.SIGINT
    if env.rank == 0 and not self_launched:  # torchrun: no report from an earlier run survives this one
        started = JobOutcome("incomplete", "the run has not written its verdict (still running, or it was stopped)")
        with contextlib.suppress(OSError):
            write_outcome_reports(started, settings.report, settings.junit)
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
    from .launch import MAX_NPROC

    args, _ = build_parser().parse_known_args(argv)
    nproc = args.nproc if args.nproc is not None else os.environ.get("SP_ROPE_NPROC", "4")
    try:
        nproc = int(nproc)
    except ValueError:
        raise ConfigError(f"SP_ROPE_NPROC must be an integer, got {nproc!r}") from None
    if not 1 <= nproc <= MAX_NPROC:
        raise ConfigError(f"--nproc must be between 1 and {MAX_NPROC}, got {nproc}")
    return nproc


if __name__ == "__main__":
    sys.exit(main())
