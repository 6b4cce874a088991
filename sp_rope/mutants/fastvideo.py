"""The ``fastvideo`` convention: FastVideo's ``get_rotary_pos_embed``, which finds its SP rank
through ``get_sp_group()`` in its own module and caches tables in a module-level dict.

``FvRope`` says how one such function keys, builds and serves its tables (correct by default);
``fastvideo_rope(FvRope(...))`` makes the function. Every function here reads this
module's ``get_sp_group``, which the check replaces with the real SP group during each call.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from sp_rope.mutants import Row, register
from sp_rope.mutants._base import ND, NdRope, RopeCall, SpGroup, Table


def get_sp_group() -> SpGroup:
    """Single-process default; the check's adapter substitutes the real group per call."""
    return SpGroup(rank_in_group=0, world_size=1)


def group_coords(do_sp_sharding: bool) -> tuple[int, int]:
    """(SP rank, SP size) of the block asked for: the SP group is consulted only when sharding."""
    if not do_sp_sharding:
        return 0, 1
    group = get_sp_group()
    return group.rank_in_group, group.world_size


@dataclass(frozen=True)
class FvRope:
    """How one function keys, builds and serves its tables; the defaults are FastVideo's."""

    forget: tuple[str, ...] = ()  # RopeCall fields the cache key leaves out
    key_view: Callable[[RopeCall], RopeCall] | None = None  # the key is taken of this view of the call
    builder: NdRope = ND
    coords: Callable[[bool], tuple[int, int]] = group_coords  # (SP rank, SP size) for do_sp_sharding
    on_hit: Callable[[Table], None] | None = None

    def lookup(self, cache: dict[Hashable, Table], call: RopeCall) -> Table:
        """FastVideo's module-level dict cache: the same tensors for every call with this key."""
        key = (self.key_view(call) if self.key_view else call).key(drop=self.forget)
        hit = cache.get(key)
        if hit is None:
            hit = cache[key] = self.builder(call)
        elif self.on_hit is not None:
            self.on_hit(hit)
        return hit


def fastvideo_rope(rope: FvRope) -> Callable[..., Table]:
    """A ``fastvideo``-convention function that works as ``rope`` says, with its own cache dict
    (``.cache``)."""
    cache: dict[Hashable, Table] = {}

    def get_rotary_pos_embed(
        rope_sizes: Sequence[int], hidden_size: int, heads_num: int, rope_dim_list: Sequence[int] | None,
        rope_theta: float, theta_rescale_factor: Any = 1.0, interpolation_factor: Any = 1.0,
        shard_dim: int = 0, do_sp_sharding: bool = False, dtype: torch.dtype = torch.float32,
        start_frame: int = 0, use_real: bool = True,
    ) -> Table:
        """This rank's ``(cos, sin)``, ``[local tokens, D]`` (``D/2`` when not ``use_real``)."""
        head_dim = hidden_size // heads_num
        dims = rope_dim_list or [head_dim // len(rope_sizes)] * len(rope_sizes)
        if sum(dims) != head_dim:
            raise ValueError(f"sum(rope_dim_list) {sum(dims)} != head dim {head_dim}")
        rank, world = rope.coords(do_sp_sharding)
        call = RopeCall.make(rope_sizes, dims, rope_theta, theta_rescale_factor, interpolation_factor,
                             shard_dim=shard_dim, sp_rank=rank, sp_world_size=world, dtype=dtype,
                             start_frame=start_frame, use_real=use_real)
        return rope.lookup(cache, call)

    get_rotary_pos_embed.cache = cache  # type: ignore[attr-defined]
    return get_rotary_pos_embed


# ---------------------------------------------------------------------------------------------
# Deviations


class HalvesForUseReal(NdRope):
    def layout(self, half: torch.Tensor, use_real: bool) -> torch.Tensor:
        return torch.cat([half, half], dim=1) if use_real else half  # BUG: halves, not pairs


class StartFrameAfterShardingOnRank0(NdRope):
    def positions(self, call: RopeCall) -> list[torch.Tensor]:
        return super().positions(call.replace(start_frame=0))  # BUG: not before sharding ...

    def local_coords(self, call: RopeCall, pos: list[torch.Tensor]) -> list[torch.Tensor]:
        coords = super().local_coords(call, pos)
        if call.sp_rank == 0:  # BUG: ... but after it, on the rank that owns the first chunk only
            coords[0] = coords[0] + call.start_frame
        return coords


def scale_cos_in_place(table: Table) -> None:
    table[0].mul_(1.0000001)  # BUG: meant for a fresh copy, it hits the shared cached tensor


def rank_from_global_rank(do_sp_sharding: bool) -> tuple[int, int]:
    if not do_sp_sharding:
        return 0, 1
    world = get_sp_group().world_size
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank % world, world  # BUG: the global rank, right only for SP groups of consecutive ranks


def sharding_whenever_grouped(do_sp_sharding: bool) -> tuple[int, int]:
    group = get_sp_group()  # BUG: do_sp_sharding ignored: inside an SP group, always a block
    return group.rank_in_group, group.world_size


def sizes_t_h(call: RopeCall) -> RopeCall:
    return call.replace(rope_sizes=call.rope_sizes[:2])  # BUG: W left out


def first_rescale(call: RopeCall) -> RopeCall:
    factor = call.theta_rescale_factor
    return call.replace(theta_rescale_factor=factor[0] if isinstance(factor, tuple) else factor)  # BUG: str(f[0])


def first_two_interpolations(call: RopeCall) -> RopeCall:
    factor = call.interpolation_factor
    return call.replace(interpolation_factor=factor[:2] if isinstance(factor, tuple) else factor)  # BUG: 2-D only


ENTRIES = register(globals(), "fastvideo", [
    Row("correct_fastvideo", None,
        "FastVideo's cached N-D RoPE, keyed by every output-affecting field incl. SP rank/size",
        fastvideo_rope(FvRope())),
    Row("correct_fastvideo_no_grad", None,
        "the same function under @torch.no_grad() (its __globals__ are torch's, not its module's)",
        torch.no_grad()(fastvideo_rope(FvRope()))),
    Row("fv_concat_not_interleaved", "oracle-mismatch",
        "use_real cos/sin concatenated as two halves instead of repeat_interleave(2), in every path",
        fastvideo_rope(FvRope(builder=HalvesForUseReal()))),
    Row("fv_start_frame_rank0", "slice-mismatch",
        "start_frame applied after sharding on SP rank 0 only: ranks > 0 lose the causal offset",
        fastvideo_rope(FvRope(builder=StartFrameAfterShardingOnRank0()))),
    Row("fv_mutate_on_hit", "unstable-across-steps",
        "a cache hit re-applies an in-place scale (cos.mul_) to the shared cached table",
        fastvideo_rope(FvRope(on_hit=scale_cos_in_place))),
    Row("fv_rank_from_global", "slice-mismatch",
        "SP rank taken as dist.get_rank() % sp_size: wrong in strided SP groups and when rank 0 sits out",
        fastvideo_rope(FvRope(coords=rank_from_global_rank))),
    Row("fv_shards_unasked", "oracle-mismatch",
        "do_sp_sharding=False ignored: inside a real SP group the unsharded table comes back sharded",
        fastvideo_rope(FvRope(coords=sharding_whenever_grouped))),
    Row("fv_key_no_sp_rank", "key-collision",
        "RoPE cache key without sp_rank: ranks of one SP group share an entry (the other ranks' rows)",
        fastvideo_rope(FvRope(forget=("sp_rank",)))),
    Row("fv_key_no_sp_world_size", "key-collision",
        "RoPE cache key without sp_world_size: a rank reuses its P=2 slice in a P=4 group",
        fastvideo_rope(FvRope(forget=("sp_world_size",)))),
    Row("fv_key_no_start_frame", "oracle-mismatch",
        "RoPE cache key without start_frame: causal blocks after the first reuse start_frame 0's table",
        fastvideo_rope(FvRope(forget=("start_frame",)))),
    Row("fv_key_no_dtype", "oracle-mismatch",
        "RoPE cache key without dtype: float64 callers get the cached float32 table",
        fastvideo_rope(FvRope(forget=("dtype",)))),
    Row("fv_key_no_theta", "key-incomplete",
        "RoPE cache key without rope_theta: a model with another base gets the first model's table",
        fastvideo_rope(FvRope(forget=("theta",)))),
    Row("fv_key_no_use_real", "key-incomplete",
        "RoPE cache key without use_real: half-layout callers get the interleaved table, or the reverse",
        fastvideo_rope(FvRope(forget=("use_real",)))),
    Row("fv_key_no_rope_dim_list", "key-incomplete",
        "RoPE cache key with the head dim but not rope_dim_list: another per-axis split gets the first one's",
        fastvideo_rope(FvRope(forget=("rope_dim_list",)))),
    Row("fv_key_grid_th", "key-incomplete",
        "RoPE cache key on rope_sizes (T, H) only: a latent of another width gets the first width's table",
        fastvideo_rope(FvRope(key_view=sizes_t_h))),
    Row("fv_key_rescale_first", "key-incomplete",
        "RoPE cache key holds str(theta_rescale_factor[0]): per-axis rescales differing past t share one",
        fastvideo_rope(FvRope(key_view=first_rescale))),
    Row("fv_key_interp_first_two", "key-incomplete",
        "RoPE cache key holds the first two interpolation factors (a 2-D key): W's factor left out",
        fastvideo_rope(FvRope(key_view=first_two_interpolations))),
])
