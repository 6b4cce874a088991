"""The ``fastvideo-nd`` convention: FastVideo's cache-less ``get_nd_rotary_pos_embed`` (the check
wraps it in sp_rope's own cache, so these keep none).

``NdBuilder`` is the function (correct with the plain ``NdRope``); each mutant swaps in a builder
with one step overridden, or post-processes the output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sp_rope.mutants import Row, register
from sp_rope.mutants._base import ND, NdRope, RopeCall, Table, inv_freq


def as_returned(table: Table) -> Table:
    return table


@dataclass(frozen=True)
class NdBuilder:
    """``get_nd_rotary_pos_embed``: the call normalized, built by ``builder``, passed through ``output``."""

    builder: NdRope = ND
    output: Callable[[Table], Table] = as_returned
    cache: None = None  # the check caches fastvideo-nd builders itself

    def __call__(
        self, rope_dim_list: Sequence[int], rope_sizes: Sequence[int], *, theta: float = 10000.0,
        theta_rescale_factor: Any = 1.0, interpolation_factor: Any = 1.0, shard_dim: int = 0, sp_rank: int = 0,
        sp_world_size: int = 1, dtype: torch.dtype = torch.float32, start_frame: int = 0, use_real: bool = True,
    ) -> Table:
        call = RopeCall.make(rope_sizes, rope_dim_list, theta, theta_rescale_factor, interpolation_factor,
                             shard_dim=shard_dim, sp_rank=sp_rank, sp_world_size=sp_world_size, dtype=dtype,
                             start_frame=start_frame, use_real=use_real)
        return self.output(self.builder(call))


# ---------------------------------------------------------------------------------------------
# Deviations


class FirstFactorOnly(NdRope):
    def factors(self, value: Any, ndim: int) -> tuple[float, ...]:
        first = value[0] if isinstance(value, tuple) else value  # BUG: a list read as one scalar
        return (float(first),) * ndim


class ScalarRescaleIgnored(NdRope):
    def rescale_factors(self, call: RopeCall) -> tuple[float, ...]:
        if isinstance(call.theta_rescale_factor, float):  # BUG: only a per-axis list was expected
            return (1.0,) * len(call.rope_sizes)
        return super().rescale_factors(call)


class FlatSplit(NdRope):
    def local_coords(self, call: RopeCall, pos: list[torch.Tensor]) -> list[torch.Tensor]:
        coords = [m.reshape(-1) for m in torch.meshgrid(*pos, indexing="ij")]
        # BUG: a contiguous chunk of the flattened sequence, not a block of call.shard_dim
        return [c.tensor_split(call.sp_world_size)[call.sp_rank] for c in coords]


class Float32Angles(NdRope):
    def angles(self, pos: torch.Tensor, d: int, theta: float, rescale: float, interp: float,
               dtype: torch.dtype) -> torch.Tensor:
        freqs = inv_freq(d, theta, rescale, dtype)
        return torch.outer(pos * interp, freqs.float()).to(dtype)  # BUG: float32 product


class AlwaysShardTime(NdRope):
    def shard_axis(self, call: RopeCall) -> int:
        return 0  # BUG: call.shard_dim ignored


class BlockOffByOne(NdRope):
    def block(self, size: int, sp_rank: int, sp_world_size: int) -> torch.Tensor:
        n = size // sp_world_size
        return (torch.arange(n) + sp_rank * n + 1) % size  # BUG: + 1 (wrapping, so nothing crashes)


class PowerOfTwoOffset(NdRope):
    def block(self, size: int, sp_rank: int, sp_world_size: int) -> torch.Tensor:
        start = (sp_rank * size) >> (sp_world_size.bit_length() - 1)  # BUG: r*size/P only for P a power of 2
        return (torch.arange(size // sp_world_size) + start) % size  # (wrapping, so nothing crashes)


class SharedWorkspace:
    """BUG: tables returned as views of a buffer reused by every call of the same shape (to save
    allocations): the next causal block's build overwrites tables the caller still caches."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[torch.dtype, tuple[int, ...]], torch.Tensor] = {}

    def __call__(self, table: Table) -> Table:
        cos, sin = table
        key = (cos.dtype, tuple(cos.shape))
        if key not in self.buffers:
            self.buffers[key] = torch.empty((2, *cos.shape), dtype=cos.dtype)
        out = self.buffers[key]
        out[0].copy_(cos)
        out[1].copy_(sin)
        return out[0], out[1]


ENTRIES = register(globals(), "fastvideo-nd", [
    Row("correct_fastvideo_nd", None,
        "FastVideo's N-D RoPE builder: start_frame before sharding, contiguous shard_dim block", NdBuilder()),
    Row("nd_factor_first_only", "oracle-mismatch",
        "per-axis theta_rescale/interpolation factor lists collapsed to their first value",
        NdBuilder(FirstFactorOnly())),
    Row("nd_scalar_rescale_ignored", "oracle-mismatch",
        "a scalar theta_rescale_factor ignored (only a per-axis list rescales theta)",
        NdBuilder(ScalarRescaleIgnored())),
    Row("nd_float32_angles", "oracle-mismatch",
        "angles computed in float32, then cast to the declared float64 (float32 precision)",
        NdBuilder(Float32Angles())),
    Row("nd_flat_split", "slice-mismatch",
        "splits the flattened sequence into P chunks where a contiguous shard_dim block was declared",
        NdBuilder(FlatSplit())),
    Row("nd_shard_dim_ignored", "slice-mismatch",
        "shard_dim ignored: always shards the time axis, whatever axis was declared", NdBuilder(AlwaysShardTime())),
    Row("nd_shard_off_by_one", "slice-mismatch",
        "shard offset off by one: rank r takes positions rank*n+1 .. (rank+1)*n (wrapping)",
        NdBuilder(BlockOffByOne())),
    Row("nd_pow2_shift", "slice-mismatch",
        "block offset (rank*size) >> (P.bit_length()-1): right for P = 2 and 4, wrong for P = 3",
        NdBuilder(PowerOfTwoOffset())),
    Row("nd_shared_workspace", "mutated-in-place",
        "returns views of a reused workspace buffer, so a later build overwrites cached tables",
        NdBuilder(output=SharedWorkspace())),
])
