"""``python -m sp_rope.cp_plans``: parse, find the models, launch the ranks, print the table."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..dist import UsageError, launch_env
from .job import EXIT_FAIL, EXIT_INFRA, EXIT_OK, EXIT_USAGE, FAIL, NOT_CHECKED, JobSettings, ModelResult, rank_entry
from .recipes import PLANTS, RECIPES, SUPPORTED_NPROC

PROG = "sp_rope.cp_plans"
RESULT_ENV = "SP_ROPE_CP_RESULT_FILE"


@dataclass(frozen=True)
class Settings:
    models: tuple[str, ...] | None  # as given (names or class names), None: every model with a plan
    nproc: int
    timeout: float
    report: str | None
    plants: dict[str, str]  # recipe name -> planted bug kind
    logger_shim: bool


@dataclass
class Selection:
    """What to run, and the rows that are reported without running."""

    recipes: list[str]
    skipped: list[ModelResult] = field(default_factory=list)
    diffusers_version: str = ""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=f"python -m {PROG}",
        description="Apply diffusers' own context-parallel plans to tiny models on CPU ranks and check that "
        "every rank's rotary embedding rows belong to its hidden-state tokens, and the sharded output.",
    )
    parser.add_argument("--models", help="comma-separated names or diffusers class names (default: all with a plan)")
    parser.add_argument(
        "--nproc", type=int, default=2, help="ranks: 2 or 4, what the tiny models are sized for (default 2)"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds, every process group (default 120)")
    parser.add_argument("--report", help="write the results as JSON to this path")
    parser.add_argument(
        "--plant",
        action="append",
        default=[],
        metavar="MODEL:KIND",
        help=f"self-test: apply a deep copy of MODEL's plan with a known wrong split ({', '.join(PLANTS)})",
    )
    parser.add_argument(
        "--no-logger-shim",
        action="store_true",
        help="do not stand in for transformers' Logger.warning_once (shows the AttributeError diffusers raises)",
    )
    return parser


def parse_settings(argv: list[str]) -> Settings:
    args = build_parser().parse_args(argv)
    if args.nproc not in SUPPORTED_NPROC:
        sizes = " or ".join(map(str, SUPPORTED_NPROC))
        raise UsageError(f"--nproc: {args.nproc} is not supported (the tiny models are sized for {sizes} ranks)")
    if not args.timeout > 0:
        raise UsageError(f"--timeout: must be > 0, got {args.timeout:g}")
    models = tuple(m.strip() for m in args.models.split(",") if m.strip()) if args.models is not None else None
    if models == ():
        raise UsageError("--models: empty list")
    if args.report is not None and not Path(args.report).resolve().parent.is_dir():
        raise UsageError(f"--report: the directory of {args.report!r} does not exist")
    return Settings(models, args.nproc, args.timeout, args.report, _parse_plants(args.plant), not args.no_logger_shim)


def _parse_plants(specs: list[str]) -> dict[str, str]:
    plants: dict[str, str] = {}
    for spec in (s for item in specs for s in item.split(",") if s.strip()):
        model, _, kind = spec.strip().partition(":")
        if kind not in PLANTS:
            raise UsageError(f"--plant: unknown kind {kind!r} in {spec!r} (choose from {', '.join(PLANTS)})")
        targets = PLANTS[kind][0]
        name = next((t for t in targets if t.lower() == model.lower()), None)
        if name is None:
            raise UsageError(f"--plant: {kind} applies to {', '.join(targets)}, not {model!r}")
        plants[name] = kind
    return plants


def select(settings: Settings) -> Selection:
    """The recipes to run against this diffusers; every failure is bad input (exit 2)."""
    requested = [(token, _resolve(token)) for token in settings.models or ()]  # names first: no import needed
    diffusers, model_mixin = _import_diffusers()
    version = diffusers.__version__
    selection = Selection([], diffusers_version=version)
    if settings.models is None:
        with_plan = _classes_with_plan(model_mixin)
        selection.recipes = [name for name, recipe in RECIPES.items() if recipe.class_name in with_plan]
        covered = {r.class_name for r in RECIPES.values()}
        for class_name in sorted(set(with_plan) - covered):
            reason = f"{NOT_CHECKED}: sp_rope has no tiny configuration for this class"
            selection.skipped.append(ModelResult(class_name, class_name, reason, reason, reason))
    for token, names in requested:
        for name in names:
            class_name = RECIPES[name].class_name
            cls = getattr(diffusers, class_name, None)
            if cls is None:
                raise UsageError(f"--models: {token}: {class_name} is not in diffusers {version}")
            if not getattr(cls, "_cp_plan", None):
                raise UsageError(f"--models: {token}: {class_name} has no _cp_plan in diffusers {version}")
            if name not in selection.recipes:
                selection.recipes.append(name)
    for name in settings.plants:
        if name not in selection.recipes:
            raise UsageError(f"--plant: {name} is not among the models this run checks")
    return selection


def _import_diffusers() -> tuple[Any, type]:
    try:
        import diffusers
        from diffusers.models.modeling_utils import ModelMixin
    except ImportError as exc:
        raise UsageError(f"diffusers is not installed ({exc}): pip install -e '.[diffusers]'") from exc
    version = getattr(diffusers, "__version__", "?")
    missing = [
        what
        for what, present in (
            ("ModelMixin._cp_plan", hasattr(ModelMixin, "_cp_plan")),
            ("ModelMixin.enable_parallelism", hasattr(ModelMixin, "enable_parallelism")),
            ("ContextParallelConfig", _has(diffusers, "ContextParallelConfig")),
            ("diffusers.hooks.context_parallel", _importable("diffusers.hooks.context_parallel")),
        )
        if not present
    ]
    if missing:
        raise UsageError(
            f"diffusers {version} has no context-parallel plans to check ({', '.join(missing)} missing); "
            "this needs a diffusers with ModelMixin._cp_plan and enable_parallelism"
        )
    return diffusers, ModelMixin


def _has(module: Any, name: str) -> bool:
    try:
        return getattr(module, name, None) is not None
    except Exception:  # noqa: BLE001 - a lazy import that fails means the name is not usable
        return False


def _importable(module: str) -> bool:
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _classes_with_plan(model_mixin: type) -> dict[str, type]:
    """Every model class diffusers exports whose ``_cp_plan`` is set (inherited ones included)."""
    import diffusers.models as models

    structure = getattr(models, "_import_structure", None)
    names = sorted({n for group in structure.values() for n in group}) if structure else dir(models)
    found = {}
    for name in names:
        try:
            obj = getattr(models, name)
        except Exception:  # noqa: BLE001 - optional backends (flax, onnx, ...) that are not installed
            continue
        if isinstance(obj, type) and issubclass(obj, model_mixin) and getattr(obj, "_cp_plan", None):
            found[name] = obj
    return found


def _resolve(token: str) -> list[str]:
    by_name = [n for n in RECIPES if n.lower() == token.lower()]
    if by_name:
        return by_name
    by_class = [n for n, r in RECIPES.items() if r.class_name.lower() == token.lower()]
    if by_class:
        return by_class
    known = ", ".join(RECIPES)
    raise UsageError(f"--models: unknown model {token!r} (known: {known}, or their diffusers class names)")


def worker_argv(settings: Settings, selection: Selection) -> list[str]:
    argv = ["--models", ",".join(selection.recipes), "--timeout", repr(settings.timeout)]
    argv += [f"--plant={name}:{kind}" for name, kind in settings.plants.items()]
    return argv + ([] if settings.logger_shim else ["--no-logger-shim"])


def launch(settings: Settings, selection: Selection) -> tuple[int, dict[str, Any] | None]:
    """Run the ranks through torch's elastic launcher (c10d rendezvous on a free localhost port)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=settings.nproc,
        run_id=f"sp_rope-cp-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
        rdzv_configs={"timeout": int(max(60, settings.timeout))},
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="sp_rope-cp-") as tmp:
        result_file = Path(tmp) / "results.json"
        os.environ[RESULT_ENV] = str(result_file)
        try:
            elastic_launch(config, entrypoint=sys.executable)("-m", PROG, *worker_argv(settings, selection))
        except ChildFailedError as err:
            _say(_describe_failure(err))
            return EXIT_INFRA, None
        finally:
            del os.environ[RESULT_ENV]
        if not result_file.exists():
            _say("infrastructure failure (exit 3): rank 0 finished without results")
            return EXIT_INFRA, None
        return EXIT_OK, json.loads(result_file.read_text())


def _describe_failure(err: Any) -> str:
    failures = getattr(err, "failures", {})
    # Name the rank that caused it: one whose barrier message names the missing ranks, else one the
    # agent did not stop itself (it ends the others with SIGTERM once a rank has failed), earliest first.
    rank, failure = min(
        failures.items(),
        key=lambda kv: ("rank(s) " not in _message(kv[1]), kv[1].exitcode == -signal.SIGTERM, kv[1].timestamp, kv[0]),
    )
    message = _message(failure)
    return (
        f"infrastructure failure (exit 3): rank {rank} exited with code {failure.exitcode}"
        f"{': ' + message if message else ''}; ranks that failed: {sorted(failures)}"
    )


def _message(failure: Any) -> str:
    message = getattr(failure, "message", "")
    if isinstance(message, dict):
        message = message.get("message", "")
    text = str(message or "").strip()
    return "" if not text or text.startswith("To enable traceback") else text.splitlines()[0]


def format_table(results: list[ModelResult], nproc: int) -> list[str]:
    rows = [("model", "class", "rope split", f"end to end (Ulysses, {nproc} ranks)", "verdict")]
    for r in results:
        rows.append(
            (
                r.model + (f" [planted {r.planted}]" if r.planted else ""),
                r.class_name,
                _cell(r.rope, r.rope_max_err),
                _cell(r.end_to_end, r.e2e_max_err),
                r.verdict,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[4] for row in rows]


def _cell(status: str, max_err: float | None) -> str:
    if status == "pass" and max_err is not None:
        return f"{status} (max err {max_err:.1e})"
    return status


def summarize(results: list[ModelResult]) -> dict[str, int]:
    return {
        "passed": sum(r.status == "pass" for r in results),
        "failed": sum(r.status == FAIL for r in results),
        "not_checked": sum(r.status == NOT_CHECKED for r in results),
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    env = launch_env()
    if env is not None:
        return _worker(argv, env)
    start = time.monotonic()
    try:
        settings = parse_settings(argv)
        selection = select(settings)
    except UsageError as exc:
        _say(str(exc))
        return EXIT_USAGE
    code, payload = launch(settings, selection)
    if payload is None:
        return code
    results = [ModelResult(**r) for r in payload["results"]] + selection.skipped
    summary = summarize(results)
    wall = time.monotonic() - start
    _print_results(results, settings, selection, payload.get("logger_shim_installed", False))
    print(
        f"{summary['passed']} passed, {summary['failed']} failed, {summary['not_checked']} not checked ({wall:.1f} s)"
    )
    if settings.report:
        report = {
            "diffusers": selection.diffusers_version,
            "nproc": settings.nproc,
            "plants": settings.plants,
            "summary": {**summary, "wall_s": round(wall, 2)},
            "logger_shim_installed": payload.get("logger_shim_installed", False),
            "models": [asdict(r) for r in results],
        }
        Path(settings.report).write_text(json.dumps(report, indent=2))
    return EXIT_FAIL if summary["failed"] else EXIT_OK


def _print_results(results: list[ModelResult], settings: Settings, selection: Selection, shimmed: bool) -> None:
    print(f"{PROG}: diffusers {selection.diffusers_version}, {settings.nproc} CPU ranks (gloo)")
    for line in format_table(results, settings.nproc):
        print(line)
    for r in results:
        for line in r.diagnoses:
            print(f"  {line}")
    if shimmed:
        print(
            "note: diffusers' CP split hook calls Logger.warning_once, which only transformers defines; "
            "a stand-in was installed (--no-logger-shim shows the AttributeError)"
        )


def _worker(argv: list[str], env: Any) -> int:
    result_file = os.environ.get(RESULT_ENV)
    if not result_file:
        if env.rank == 0:
            _say(f"launches its own ranks: run `python -m {PROG} --nproc N`, not under torchrun")
        return EXIT_USAGE
    args = build_parser().parse_args(argv)
    settings = JobSettings(
        models=tuple(args.models.split(",")),
        plants=_parse_plants(args.plant),
        timeout=args.timeout,
        logger_shim=not args.no_logger_shim,
        result_file=result_file,
    )
    return rank_entry(settings, env)


def _say(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)
