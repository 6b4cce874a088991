"""RopeSpec: a frozen, hashable, validated description of one RoPE cos/sin table."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}
LAYOUTS = ("interleaved", "half", "neox")
AXIS_NAMES = ("t", "h", "w")

Factor = float | Sequence[float]


def default_rope_dim_list(head_dim: int, ndim: int = 3) -> tuple[int, ...]:
    """The per-axis head-dim split used by the video DiTs (Wan, FastVideo).

    3-D: ``d - 4*(d//6), 2*(d//6), 2*(d//6)``; 2-D: two even halves; 1-D: the whole head dim.
    """
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even number, got {head_dim!r}")
    if ndim == 3:
        part = 2 * (head_dim // 6)
        return (head_dim - 2 * part, part, part)
    if ndim == 2:
        part = 2 * (head_dim // 4)
        return (head_dim - part, part)
    if ndim == 1:
        return (head_dim,)
    raise ValueError(f"grid must have 1, 2 or 3 axes, got {ndim}")


def hash_once(self: object) -> int:
    """``__hash__`` for frozen dataclasses that are hashed on every cache lookup.

    The generated frozen-dataclass hash rehashes every field on every call; the fields never
    change, so compute the same value once and keep it on the instance as ``_hash`` (which
    ``RopeCache``'s hit path reads directly, to key an index by ints).
    """
    try:
        return self._hash  # type: ignore[attr-defined, no-any-return]
    except AttributeError:
        value = hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self)))  # type: ignore[arg-type]
        object.__setattr__(self, "_hash", value)
        return value


def state_without_hash(self: object) -> dict[str, object]:
    """``__getstate__`` to pair with :func:`hash_once`: str hashes differ between processes, so a
    kept hash must not travel in a pickle."""
    state = dict(self.__dict__)
    state.pop("_hash", None)
    return state


def _per_axis(name: str, value: Factor, ndim: int) -> tuple[float, ...]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        values: tuple[float, ...] = (float(value),) * ndim
    elif isinstance(value, (list, tuple)):
        values = tuple(float(v) for v in value)
        if len(values) == 1:
            values = values * ndim
        if len(values) != ndim:
            raise ValueError(f"{name} must be a scalar or have one value per axis ({ndim}), got {list(value)!r}")
    else:
        raise ValueError(f"{name} must be a number or a list of numbers, got {value!r}")
    for v in values:
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name} values must be finite and > 0, got {v!r}")
    return values


@dataclass(frozen=True)
class RopeSpec:
    """Everything that shapes an unsharded RoPE table.

    ``theta_rescale_factor`` and ``interpolation_factor`` are normalized to one float per axis,
    so a scalar and the equivalent list give equal (and equally hashed) specs.
    """

    grid: tuple[int, ...]
    rope_dim_list: tuple[int, ...]
    theta: float = 10000.0
    theta_rescale_factor: tuple[float, ...] | float = 1.0
    interpolation_factor: tuple[float, ...] | float = 1.0
    dtype: str = "float64"
    layout: str = "interleaved"
    start_frame: int = 0

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if not isinstance(self.grid, (list, tuple)) or not 1 <= len(self.grid) <= 3:
            raise ValueError(f"grid must be a list of 1 to 3 sizes, got {self.grid!r}")
        grid = tuple(self.grid)
        for size in grid:
            if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
                raise ValueError(f"grid sizes must be positive integers, got grid={list(grid)!r}")
        set_(self, "grid", grid)
        if not isinstance(self.rope_dim_list, (list, tuple)):
            raise ValueError(f"rope_dim_list must be a list of ints, got {self.rope_dim_list!r}")
        dims = tuple(self.rope_dim_list)
        if len(dims) != len(grid):
            raise ValueError(f"rope_dim_list needs one dim per grid axis ({len(grid)}), got {list(dims)!r}")
        for axis, d in enumerate(dims):
            if not isinstance(d, int) or isinstance(d, bool) or d <= 0 or d % 2:
                raise ValueError(
                    f"rope_dim_list[{axis}] must be a positive even int, got {d!r} in {list(dims)!r}"
                )
        set_(self, "rope_dim_list", dims)
        if not isinstance(self.theta, (int, float)) or isinstance(self.theta, bool):
            raise ValueError(f"theta must be a number, got {self.theta!r}")
        if not math.isfinite(self.theta) or self.theta <= 1:
            raise ValueError(f"theta must be finite and > 1, got {self.theta!r}")
        set_(self, "theta", float(self.theta))
        set_(self, "theta_rescale_factor", _per_axis("theta_rescale_factor", self.theta_rescale_factor, len(grid)))
        set_(self, "interpolation_factor", _per_axis("interpolation_factor", self.interpolation_factor, len(grid)))
        for axis, (d, r) in enumerate(zip(dims, self.theta_rescale_factor, strict=True)):  # type: ignore[arg-type]
            if d == 2 and r != 1.0:  # theta * r ** (d / (d - 2)) divides by zero
                raise ValueError(
                    f"theta_rescale_factor[{axis}] must be 1 on an axis of dim 2, got {r!r} in {list(dims)!r}"
                )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {self.layout!r}")
        sf = self.start_frame
        if not isinstance(sf, int) or isinstance(sf, bool) or sf < 0:
            raise ValueError(f"start_frame must be an integer >= 0, got {sf!r}")
        # Positions are float32 in the FastVideo builder; past 2**24 they stop being integers.
        if sf + grid[0] > 2**24:
            raise ValueError(f"start_frame must keep time positions below 2**24, got {sf!r}")

    # Every cache lookup hashes its spec: see hash_once.
    __hash__ = hash_once
    __getstate__ = state_without_hash

    @classmethod
    def for_head_dim(cls, grid: Sequence[int], head_dim: int, **fields: object) -> RopeSpec:
        """A spec with the default per-axis split of ``head_dim``."""
        return cls(tuple(grid), default_rope_dim_list(head_dim, len(grid)), **fields)  # type: ignore[arg-type]

    @property
    def head_dim(self) -> int:
        return sum(self.rope_dim_list)

    @property
    def width(self) -> int:
        """Columns of the table: the head dim, or half of it for the ``half`` layout."""
        return self.head_dim // 2 if self.layout == "half" else self.head_dim

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def replace(self, **changes: object) -> RopeSpec:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]
