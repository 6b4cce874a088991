"""One rank's side: build each tiny model, run it whole, apply diffusers' CP plan, run it again, compare.

Probes are diffusers ``ModelHook``s registered on the consuming attention modules *before*
``enable_parallelism``: diffusers wraps ``forward`` once per hook, the later one outside, so a probe
registered first is the innermost wrapper and sees the arguments after every split the plan makes
(Helios splits at the attention module itself). A probe records the rotary embedding and the token
arguments as the attention receives them: in the whole-model run they are the unsharded reference,
under context parallelism this rank's shard. Each shard row is located in the reference by value
(the rows of random activations are pairwise distinct), which gives the global token of every row
of this rank's hidden states; the rope rows must be the reference rope at exactly those tokens.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

from .recipes import SEED, Recipe, RopeProbe, planted_plan

ROPE_TOL = 1e-6  # |cos/sin| <= 1; the rows are copies (or the same per-row computation) of the reference
MATCH_TOL = 1e-4  # relative: a shard row "is" a reference row; distinct rows differ by O(1)
E2E_TOL = 1e-5  # relative to 1 + max |reference output|, float32


@dataclass
class ProbeOutcome:
    label: str
    tokens: list[list[int]]  # per stream: the global token index of each row this rank holds
    stream_sizes: list[int] = field(default_factory=list)  # per stream: its unsharded token count
    problems: list[str] = field(default_factory=list)
    max_err: float = 0.0
    undetermined: str | None = None  # the tokens could not be located: nothing checked


@dataclass
class RankReport:
    rank: int
    error: str | None = None  # a stage that could not run: "build: ...", "enable_parallelism: ..."
    error_stage: str | None = None
    probes: list[ProbeOutcome] = field(default_factory=list)
    forward_error: str | None = None  # the CP forward raised
    e2e_err: float | None = None
    e2e_tol: float | None = None
    e2e_shapes_differ: str | None = None


@dataclass(frozen=True)
class RankSettings:
    plant: str | None  # planted bug kind for this model, or None
    world_size: int
    rank: int


@dataclass
class _Recorder:
    """The named arguments of the first call a probe sees (reset to None between runs)."""

    names: tuple[str, ...]
    seen: dict[str, Any] | None = None


def _probe_hook(recorder: _Recorder) -> Any:
    """A diffusers ModelHook that fills ``recorder`` and passes the call through unchanged."""
    from diffusers.hooks.hooks import ModelHook

    class ProbeHook(ModelHook):
        def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            if recorder.seen is None:
                recorder.seen = _bound_arguments(module, args, kwargs, recorder.names)
            return args, kwargs

    return ProbeHook()


def _bound_arguments(module: torch.nn.Module, args: tuple, kwargs: dict, names: tuple[str, ...]) -> dict[str, Any]:
    signature = inspect.signature(type(module).forward)
    bound = signature.bind_partial(module, *args, **kwargs).arguments
    extra: Any = next((bound.get(p.name, {}) for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), {})
    out = {}
    for name in names:
        value = bound.get(name, extra.get(name) if isinstance(extra, dict) else None)
        out[name] = _detached(value)
    return out


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    return value


@contextlib.contextmanager
def _accelerator_count_at_least_one() -> Iterator[None]:
    """``enable_parallelism`` picks its device as ``rank % torch.accelerator.device_count()``, which is a
    division by zero on a CPU-only build. With an explicit CPU mesh that device is only recorded, so
    for the call the count reads as 1 (device ``cpu:0``); nothing else in the call depends on it."""
    real = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: max(1, real())  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.accelerator.device_count = real  # type: ignore[assignment]


def install_logger_shim() -> bool:
    """diffusers' split hook warns through ``Logger.warning_once``, which ``logging`` lacks: transformers
    adds it on import. Without transformers imported, a plan entry whose ``expected_dims`` does not
    match (Wan's 1-D timestep) raises AttributeError. Install a one-shot warning as transformers
    does; returns whether it was missing."""
    if hasattr(logging.Logger, "warning_once"):
        return False

    @functools.lru_cache(None)
    def warning_once(self: logging.Logger, *args: Any, **kwargs: Any) -> None:
        self.warning(*args, **kwargs)

    logging.Logger.warning_once = warning_once  # type: ignore[attr-defined]
    return True


def build_mesh(world_size: int, timeout_s: float) -> Any:
    """A CPU (ring=1, ulysses=P) mesh whose groups all carry the job's timeout (diffusers' flattened
    mesh over both dims is the default group, which has it too)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]  # carries the group timeout
    options._timeout = timedelta(seconds=timeout_s)
    return init_device_mesh(
        "cpu",
        (1, world_size),
        mesh_dim_names=("ring", "ulysses"),
        backend_override={"ring": ("gloo", options), "ulysses": ("gloo", options)},
    )


def _outputs(result: Any) -> list[torch.Tensor]:
    return [t.detach().clone() for t in result if isinstance(t, torch.Tensor)]


def check_model(recipe: Recipe, mesh: Any, settings: RankSettings) -> RankReport:
    """Run ``recipe`` whole and under diffusers' context parallelism on ``mesh``; this rank's findings."""
    import diffusers

    report = RankReport(rank=settings.rank)
    stage = "build"
    try:
        torch.manual_seed(SEED)
        model = getattr(diffusers, recipe.class_name)(**recipe.config).eval()
        inputs = recipe.inputs(torch.Generator().manual_seed(SEED))
        probes = _install_probes(model, recipe.probes)
        stage = "reference forward"
        with torch.no_grad():
            reference = _outputs(model(**copy.deepcopy(inputs), return_dict=False))
        reference_seen = [p.seen for p in probes]
        for p in probes:
            p.seen = None
        stage = "enable_parallelism"
        _enable_context_parallel(model, mesh, settings)
    except Exception as exc:  # noqa: BLE001 - recorded as this model's verdict, the job goes on
        report.error_stage, report.error = stage, f"{stage}: {type(exc).__name__}: {_first_line(exc)}"
        return report

    cp_out: list[torch.Tensor] | None = None
    try:
        with torch.no_grad():
            cp_out = _outputs(model(**copy.deepcopy(inputs), return_dict=False))
    except Exception as exc:  # noqa: BLE001 - a plan that breaks the forward is a finding, not a crash
        report.forward_error = f"{type(exc).__name__}: {_first_line(exc)} ({_raised_at(exc)})"
    for probe, spec, ref_seen in zip(probes, recipe.probes, reference_seen):
        if probe.seen is None or ref_seen is None:
            continue  # never reached (the forward raised before it): reported by the merge
        report.probes.append(compare_probe(spec, ref_seen, probe.seen))
    if cp_out is not None:
        _compare_outputs(report, reference, cp_out)
    return report


def _install_probes(model: torch.nn.Module, specs: tuple[RopeProbe, ...]) -> list[_Recorder]:
    from diffusers.hooks.hooks import HookRegistry

    recorders = []
    for index, spec in enumerate(specs):
        recorder = _Recorder((spec.rope_arg, *(s.arg for s in spec.streams)))
        registry = HookRegistry.check_if_exists_or_initialize(model.get_submodule(spec.module))
        registry.register_hook(_probe_hook(recorder), f"sp_rope_probe_{index}")
        recorders.append(recorder)
    return recorders


def _enable_context_parallel(model: Any, mesh: Any, settings: RankSettings) -> None:
    from diffusers import ContextParallelConfig

    if settings.plant is not None:
        # The instance attribute shadows the class's plan; enable_parallelism reads self._cp_plan.
        model._cp_plan = planted_plan(type(model)._cp_plan, settings.plant)
    config = ContextParallelConfig(ulysses_degree=settings.world_size, mesh=mesh)
    with _accelerator_count_at_least_one():
        model.enable_parallelism(config=config)


def compare_probe(spec: RopeProbe, reference: dict[str, Any], shard: dict[str, Any]) -> ProbeOutcome:
    """The rope rows this rank's attention received must be the reference rows at its tokens."""
    outcome = ProbeOutcome(label=spec.label, tokens=[])
    joint: list[int] = []
    offset = 0
    for stream in spec.streams:
        full, part = _rows(reference[stream.arg]), _rows(shard[stream.arg])
        located, why = locate_rows(full, part)
        if why is not None and "more than one" in why:
            outcome.undetermined = f"{spec.module} {stream.arg} {why}: its tokens cannot be told apart"
            return outcome
        if why is not None:
            outcome.problems.append(
                f"{spec.module} {stream.arg} {why} (its activations already differ: something upstream went wrong)"
            )
            return outcome
        outcome.tokens.append(located)
        outcome.stream_sizes.append(full.shape[0])
        joint.extend(offset + i for i in located)
        offset += full.shape[0]
    for item in spec.items if spec.items is not None else (None,):
        full_rope = _item(reference[spec.rope_arg], item)
        got = _item(shard[spec.rope_arg], item)
        name = spec.rope_arg if item is None else f"{spec.rope_arg}[{item}]"
        if got.dim() <= spec.token_dim or full_rope.shape[spec.token_dim] != offset:
            outcome.problems.append(
                f"{spec.module} {name} has shape {tuple(got.shape)} (unsharded {tuple(full_rope.shape)}): "
                f"no dim {spec.token_dim} of {offset} tokens to check"
            )
            continue
        expected = full_rope.index_select(spec.token_dim, torch.tensor(joint, dtype=torch.long))
        if got.shape != expected.shape:
            outcome.problems.append(
                f"{spec.module} {name} has shape {tuple(got.shape)} for this rank's "
                f"{len(joint)} tokens; the rows of those tokens have shape {tuple(expected.shape)}"
            )
            continue
        per_row = (got - expected).abs().movedim(spec.token_dim, 0).reshape(len(joint), -1).amax(dim=1)
        per_row = per_row.double()
        outcome.max_err = max(outcome.max_err, float(per_row.max()) if len(joint) else 0.0)
        bad = torch.nonzero(per_row > ROPE_TOL).flatten()
        if len(bad):
            row = int(bad[0])
            outcome.problems.append(
                f"{spec.module} {name} row {row} is not the rope of the token it rotates, "
                f"first bad token {_token_name(spec, outcome.tokens, row)}: max err {float(per_row[row]):.3g} "
                f"({len(bad)} of {len(joint)} rows wrong)"
            )
    return outcome


def locate_rows(full: torch.Tensor, part: torch.Tensor) -> tuple[list[int], str | None]:
    """Index in ``full`` of each row of ``part`` (nearest by max abs difference), or why not: a row
    that is no row of ``full`` within ``MATCH_TOL``, or one that is two of them (rows not distinct)."""
    if part.shape[0] == 0:
        return [], None
    distance = (part[:, None, :].double() - full[None, :, :].double()).abs().amax(dim=-1)
    nearest = distance.topk(min(2, full.shape[0]), dim=1, largest=False)
    tol = MATCH_TOL * (1.0 + float(full.abs().max()))
    far = torch.nonzero(nearest.values[:, 0] > tol).flatten()
    if len(far):
        return [], f"row {int(far[0])} matches no token of the unsharded run"
    if full.shape[0] > 1:
        twice = torch.nonzero(nearest.values[:, 1] <= tol).flatten()
        if len(twice):
            return [], f"row {int(twice[0])} matches more than one token of the unsharded run"
    return [int(i) for i in nearest.indices[:, 0]], None


def _rows(value: torch.Tensor) -> torch.Tensor:
    """(tokens, features) of a (batch=1, tokens, ...) activation."""
    return value[0].reshape(value.shape[1], -1)


def _item(value: Any, item: int | None) -> torch.Tensor:
    return value if item is None else value[item]


def _token_name(spec: RopeProbe, tokens: list[list[int]], row: int) -> str:
    for stream, located in zip(spec.streams, tokens):
        if row < len(located):
            index = located[row]
            where = ""
            if stream.grid is not None:
                t, h, w = (int(x) for x in torch.unravel_index(torch.tensor(index), stream.grid))
                where = f" (t={t}, h={h}, w={w})"
            return f"{stream.arg}[{index}]{where}"
        row -= len(located)
    return f"row {row}"


def _compare_outputs(report: RankReport, reference: list[torch.Tensor], got: list[torch.Tensor]) -> None:
    if [t.shape for t in reference] != [t.shape for t in got]:
        report.e2e_shapes_differ = f"{[tuple(t.shape) for t in got]} vs {[tuple(t.shape) for t in reference]}"
        return
    scale = 1.0 + max(float(t.abs().max()) for t in reference)
    report.e2e_tol = E2E_TOL * scale
    report.e2e_err = max(float((a.double() - b.double()).abs().max()) for a, b in zip(got, reference))


def _raised_at(exc: BaseException) -> str:
    """Where in diffusers (or else anywhere) the exception came from, for the diagnosis."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "diffusers" in f.filename] or frames
    if not ours:
        return "no traceback"
    frame = ours[-1]
    where = frame.filename.split("site-packages/")[-1]
    return f"raised at {where}:{frame.lineno} in {frame.name}"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""
