"""Model-geometry presets: ``configs/*.toml`` loaded into frozen dataclasses.

A preset names a real model's latent grid and RoPE geometry. Unknown keys are an error, so a
typo never silently falls back to a default.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .sharding import ShardError, parse_plan
from .spec import DTYPES, LAYOUTS, RopeSpec, default_rope_dim_list

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_PACKAGE = Path(__file__).resolve().parent
# An installed wheel carries the presets as sp_rope/configs/ (see pyproject.toml); a checkout,
# editable install or not, reads the top-level configs/ itself. One source of truth either way.
CONFIG_DIR = _PACKAGE / "configs" if (_PACKAGE / "configs").is_dir() else _PACKAGE.parent / "configs"
DEFAULT_CONFIGS = ("quick", "quick-odd")
# The largest preset has 118,800 tokens. Past 2**26 the unsharded float64 table alone is tens of
# GiB, so a bigger grid is a typo (or a job this check cannot hold), refused before any rank starts.
MAX_GRID_TOKENS = 2**26


class ConfigError(ValueError):
    """Bad user input: a one-line message naming the field and value."""


@dataclass(frozen=True)
class GeometryConfig:
    name: str
    grid: tuple[int, ...]
    head_dim: int
    rope_dim_list: tuple[int, ...]
    theta: float = 10000.0
    theta_rescale_factor: tuple[float, ...] | float = 1.0
    interpolation_factor: tuple[float, ...] | float = 1.0
    description: str = ""
    start_frames: tuple[int, ...] = field(default=())  # preset-specific causal offsets (added to the sweep)

    def spec(self, dtype: str, layout: str, start_frame: int) -> RopeSpec:
        return RopeSpec(
            self.grid,
            self.rope_dim_list,
            self.theta,
            self.theta_rescale_factor,
            self.interpolation_factor,
            dtype,
            layout,
            start_frame,
        )


_KEYS = {
    "name",
    "description",
    "grid",
    "head_dim",
    "hidden_size",
    "num_heads",
    "rope_dim_list",
    "theta",
    "theta_rescale_factor",
    "interpolation_factor",
    "start_frames",
}


def resolve_config_path(name_or_path: str) -> Path:
    """A path to a TOML file, or the name of a preset in ``configs/`` (``wan2.1-t2v-1.3b-480p``)."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.parent != Path("."):
        return path
    return CONFIG_DIR / f"{name_or_path}.toml"


def load_config(name_or_path: str) -> GeometryConfig:
    path = resolve_config_path(name_or_path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.toml")))
        raise ConfigError(f"--config {name_or_path!r}: no such file {str(path)!r} (presets: {known})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {name_or_path!r}: cannot read {str(path)!r}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {str(path)!r}: invalid TOML: {exc}") from None
    try:
        return parse_config(raw, default_name=path.stem)
    except ConfigError as exc:
        raise ConfigError(f"config {str(path)!r}: {exc}") from None


def parse_config(raw: dict[str, Any], default_name: str = "config") -> GeometryConfig:
    """A preset from its TOML table: every key strictly typed (a float head_dim is an error, not
    truncated), so a typo or a wrong type is a one-line error naming the key and value."""
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(_KEYS))})")
    if "grid" not in raw:
        raise ConfigError("missing key 'grid'")
    grid = _int_list("grid", raw["grid"])
    head_dim = _head_dim(raw)
    dims = raw.get("rope_dim_list")
    if dims is None:
        if head_dim is None:
            raise ConfigError("needs rope_dim_list, head_dim, or hidden_size and num_heads")
        try:
            dims = list(default_rope_dim_list(head_dim, len(grid)))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    dims = _int_list("rope_dim_list", dims)
    if head_dim is not None and sum(dims) != head_dim:
        raise ConfigError(f"rope_dim_list {dims!r} sums to {sum(dims)}, not the head dim {head_dim}")
    start_frames = _int_list("start_frames", raw.get("start_frames", []))
    if any(v < 0 for v in start_frames):
        raise ConfigError(f"start_frames must be integers >= 0, got {start_frames!r}")
    config = GeometryConfig(
        name=_str(raw, "name", default_name),
        grid=tuple(grid),
        head_dim=sum(dims),
        rope_dim_list=tuple(dims),
        theta=_number("theta", raw.get("theta", 10000.0)),
        theta_rescale_factor=_factor("theta_rescale_factor", raw.get("theta_rescale_factor", 1.0)),
        interpolation_factor=_factor("interpolation_factor", raw.get("interpolation_factor", 1.0)),
        description=_str(raw, "description", ""),
        start_frames=tuple(start_frames),
    )
    try:  # validate every field once, through the spec, so errors name the field
        config.spec("float64", "interleaved", 0)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    tokens = math.prod(grid)
    if tokens > MAX_GRID_TOKENS:
        raise ConfigError(f"grid {grid!r} has {tokens:,} tokens; at most {MAX_GRID_TOKENS:,} (2**26) are supported")
    return config


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(key: str, value: Any) -> int:
    if not _is_int(value):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    return int(value)


def _int_list(key: str, value: Any) -> list[int]:
    if not isinstance(value, list):
        raise ConfigError(f"{key} must be a list of integers, got {value!r}")
    return [_int(f"{key}[{i}]", v) for i, v in enumerate(value)]


def _number(key: str, value: Any) -> float:
    if not _is_number(value):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    return float(value)


def _str(raw: dict[str, Any], key: str, default: str) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def _head_dim(raw: dict[str, Any]) -> int | None:
    if "head_dim" in raw:
        return _int("head_dim", raw["head_dim"])
    if "hidden_size" in raw or "num_heads" in raw:
        if "hidden_size" not in raw or "num_heads" not in raw:
            raise ConfigError("hidden_size and num_heads go together (or give head_dim)")
        hidden, heads = _int("hidden_size", raw["hidden_size"]), _int("num_heads", raw["num_heads"])
        if heads <= 0 or hidden % heads:
            raise ConfigError(f"hidden_size {hidden!r} must be a multiple of num_heads {heads!r}")
        return hidden // heads
    return None


def _factor(key: str, value: Any) -> tuple[float, ...] | float:
    if isinstance(value, list):
        return tuple(_number(f"{key}[{i}]", v) for i, v in enumerate(value))
    return _number(key, value)


@dataclass(frozen=True)
class Matrix:
    """What one run checks: geometries × schemes × SP sizes × start_frames × dtypes × layouts."""

    configs: tuple[GeometryConfig, ...]
    schemes: tuple[str, ...]
    dtypes: tuple[str, ...]
    layouts: tuple[str, ...]
    start_frames: tuple[int, ...]
    steps: int


def validate_choices(field_name: str, values: tuple[str, ...], allowed: tuple[str, ...] | list[str]) -> None:
    for value in values:
        if value not in allowed:
            raise ConfigError(f"{field_name}: unknown value {value!r} (choose from {', '.join(allowed)})")


def validate_matrix(matrix: Matrix, sp_sizes: tuple[int, ...], explicit_configs: bool = True) -> None:
    """Reject a matrix that cannot run, before any process group exists.

    A config the user named must be splittable by some requested scheme and SP size; the
    default presets only need to leave at least one runnable case between them.
    """
    for name in matrix.schemes:
        try:
            parse_plan(name)
        except ValueError as exc:
            raise ConfigError(f"--schemes: {exc}") from None
    validate_choices("--dtypes", matrix.dtypes, list(DTYPES))
    validate_choices("--layouts", matrix.layouts, LAYOUTS)
    for sf in matrix.start_frames:
        if sf < 0:
            raise ConfigError(f"--start-frames: start_frame must be >= 0, got {sf}")
    if matrix.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {matrix.steps}")
    for config in matrix.configs:
        for sf in (*matrix.start_frames, *config.start_frames):
            try:
                config.spec("float64", "interleaved", sf)
            except ValueError as exc:
                raise ConfigError(f"config {config.name!r}: {exc}") from None
        for name in matrix.schemes:
            plan = parse_plan(name)
            if plan.axis is not None and plan.axis >= len(config.grid):
                raise ConfigError(
                    f"--schemes {name!r}: shard axis {plan.axis} out of range for config "
                    f"{config.name!r} grid {list(config.grid)}"
                )
        if explicit_configs and not _any_splittable(config, matrix, sp_sizes):
            raise ConfigError(
                f"config {config.name!r}: grid {list(config.grid)} cannot be split by any requested SP size "
                f"{list(sp_sizes)} with schemes {', '.join(matrix.schemes)}"
            )

    if not any(_any_splittable(config, matrix, sp_sizes) for config in matrix.configs):
        raise ConfigError(
            f"no requested scheme ({', '.join(matrix.schemes)}) can split any config at SP sizes {list(sp_sizes)}"
        )


def _any_splittable(config: GeometryConfig, matrix: Matrix, sp_sizes: tuple[int, ...]) -> bool:
    return any(_splittable(config, parse_plan(s), size) for s in matrix.schemes for size in sp_sizes)


def _splittable(config: GeometryConfig, plan: Any, sp_size: int) -> bool:
    try:
        plan.indices(config.grid, 0, sp_size)
    except ShardError:
        return False
    return True
