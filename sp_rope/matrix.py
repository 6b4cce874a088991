"""What one run checks, expanded: SP layouts, case families (one causal sweep each) and cases.

Stage 0 of the pipeline. Everything here is a pure function of the settings, the seed and the
world size, so every rank expands the same matrix without talking to the others.

The default matrix is built to leave no plausible bug standing, not to look tidy:

- **SP layouts**: for every divisor P > 1 of the world size, consecutive groups; for every
  P < world, strided groups as well (``{0, 2}, {1, 3}``: an SP rank that is not the global rank
  mod P); and one group of ``world - 1`` ranks on ranks 1.. with rank 0 sitting out (an SP size
  that is not a power of two, a group that does not start at rank 0).
- **Breadth geometries** (default run only): fixed ones with unequal dims, theta != 1e4, factors
  != 1 on every axis (t included) spelled as scalars and as lists, theta and factors not exact in
  float32 or bfloat16, T = 1, a 96 x 96 grid, several head dims, plain ones a restricted
  convention can express; h and w equal in size and dims but not factors; seeded random
  geometries (split zigzag along a spatial long axis too: token order not row-major); 2-D and
  1-D grids; sequences that do not divide (35 and 5 tokens, flat with padding and uneven); Wan
  720p's latent at its real size, 1080p's with a thin head; small grids at far offsets (past 16k
  frames, past 128k positions). Each runs at a causal offset != 0 too.
- **Call patterns**: calls per (family, start_frame) vary with the seed; the second pass revisits
  start_frames in a seeded order; one deep sweep of 40 block-causal start_frames (0, T, 2T, ...)
  split along t on a tiny grid evicts a 32-entry cache and then re-enters it.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass, field, replace

from .config import GeometryConfig, Matrix
from .report import CaseResult
from .sharding import ShardPlan, parse_plan
from .spec import RopeSpec

DEEP_SWEEP_FRAMES = 40  # deeper than a 32-entry cache, so re-entry meets evicted entries


@dataclass(frozen=True)
class SpLayout:
    """How the world's ranks form SP groups of one size (ranks in no group sit the family out)."""

    kind: str  # "consecutive", "strided" or "offset"
    size: int
    groups: tuple[tuple[int, ...], ...]

    def group_of(self, rank: int) -> tuple[int, tuple[int, ...]] | None:
        """(group index, the group's global ranks in SP-rank order), or None when ``rank`` sits out."""
        for index, ranks in enumerate(self.groups):
            if rank in ranks:
                return index, ranks
        return None

    @property
    def label(self) -> str:
        if self.kind == "consecutive":
            return ""
        if self.kind == "strided":
            return "strided"
        idle = sorted(set(range(max(max(g) for g in self.groups) + 1)) - {r for g in self.groups for r in g})
        return "ranks " + ",".join(str(r) for r in self.groups[0]) + (f"; rank {idle[0]} idle" if idle else "")


def sp_layouts(world_size: int) -> tuple[SpLayout, ...]:
    """Every SP layout of a world: consecutive and strided groups per divisor, plus an offset group."""
    if world_size == 1:
        return (SpLayout("consecutive", 1, ((0,),)),)
    layouts = []
    for size in divisors(world_size):
        if size == 1:
            continue
        count = world_size // size
        layouts.append(
            SpLayout("consecutive", size, tuple(tuple(range(g * size, (g + 1) * size)) for g in range(count)))
        )
        if count > 1:  # rank r of group g is global rank g + r * count
            layouts.append(SpLayout("strided", size, tuple(tuple(range(g, world_size, count)) for g in range(count))))
    if world_size >= 3 and world_size % (world_size - 1):
        layouts.append(SpLayout("offset", world_size - 1, (tuple(range(1, world_size)),)))
    return tuple(layouts)


def divisors(n: int) -> list[int]:
    """Divisors of n in increasing order, in O(sqrt(n))."""
    small, large = [], []
    for d in range(1, math.isqrt(n) + 1):
        if n % d == 0:
            small.append(d)
            if d != n // d:
                large.append(n // d)
    return small + large[::-1]


@dataclass(frozen=True)
class Family:
    """Cases that share everything but start_frame: one causal sweep through one SP layout."""

    config: GeometryConfig
    scheme: str
    dtype: str
    layout: str
    sp: SpLayout
    start_frames: tuple[int, ...]
    calls: tuple[int, ...]  # calls (denoising steps) per start_frame in the first pass
    reentry: tuple[int, ...]  # start_frames of the second pass, in order

    @functools.cached_property
    def plan(self) -> ShardPlan:
        return parse_plan(self.scheme)

    def spec(self, start_frame: int) -> RopeSpec:
        return self.config.spec(self.dtype, self.layout, start_frame)


@dataclass
class Case:
    """One (family, start_frame): the record that flows from build to judge to report."""

    index: int
    family: Family
    start_frame: int
    spec: RopeSpec = field(repr=False)
    result: CaseResult = field(repr=False)


def sweep_order(start_frames: tuple[int, ...]) -> tuple[int, ...]:
    """Ends first, moving inward (0, 4096, 1, 17 ...): entries evicted in the first pass are
    re-entered while others are still cached."""
    order, lo, hi = [], 0, len(start_frames) - 1
    while lo <= hi:
        order.append(start_frames[lo])
        if hi != lo:
            order.append(start_frames[hi])
        lo, hi = lo + 1, hi - 1
    return tuple(order)


def families(matrix: Matrix, world_size: int, seed: int, breadth: bool) -> list[Family]:
    """The run's families, grouped by geometry, then dtype and layout (one sweep group each).

    The matrix's configs run every scheme x dtype x layout on consecutive groups; the other SP
    layouts (an SP-rank bug does not depend on dtype or layout) run each scheme once, rotating
    through the dtype x layout combinations. With ``breadth`` the adversarial geometries follow,
    each with a seeded sample of schemes, combinations, start_frames and call counts."""
    rng = random.Random(seed)
    layouts = sp_layouts(world_size)
    combos = [(dtype, layout) for dtype in matrix.dtypes for layout in matrix.layouts]
    out: list[Family] = []
    order = combos
    for index, config in enumerate(matrix.configs):
        frames = tuple(dict.fromkeys((*matrix.start_frames, *config.start_frames)))
        calls, reentry = tuple(matrix.steps for _ in frames), sweep_order(frames)
        # The dtype x layout sweeps in a seeded order, reversed for every other config: a cache
        # whose tables depend on what it already holds (a float32 table rounded from its cached
        # float64 twin) meets both histories.
        order = rng.sample(combos, len(combos)) if index % 2 == 0 else order[::-1]
        for dtype, layout in order:
            for sp in layouts:
                for i, scheme in enumerate(matrix.schemes):
                    if sp.kind == "consecutive" or combos[i % len(combos)] == (dtype, layout):
                        out.append(Family(config, scheme, dtype, layout, sp, frames, calls, reentry))
    if breadth:
        for config in breadth_configs(rng):
            out.extend(_seeded_families(config, matrix, layouts, rng))
        out.extend(ragged_families(layouts, matrix))
        out.extend(large_families(layouts, matrix))
        out.extend(far_families(layouts, matrix))
        out.append(deep_sweep(layouts[0], matrix))
    return out


def _float64(matrix: Matrix) -> str:
    """Float64 where the matrix has it (FastVideo's tables; the tightest tolerance), else its first dtype."""
    return "float64" if "float64" in matrix.dtypes else matrix.dtypes[0]


def _plain(matrix: Matrix) -> tuple[str, str]:
    dtype = "float32" if "float32" in matrix.dtypes else matrix.dtypes[0]
    return dtype, "interleaved" if "interleaved" in matrix.layouts else matrix.layouts[0]


def ragged_families(layouts: tuple[SpLayout, ...], matrix: Matrix) -> list[Family]:
    """Sequences that do not divide: 35 tokens (remainders 1, 2 and 3 at P = 2, 3 and 4: who
    gets the extra tokens matters on every rank) and 5 tokens (at P = 4 the third rank is part
    padding and the last all padding), split flat with padding and unevenly, at two causal
    offsets (the 5-token one is 5 frames long)."""
    configs = (
        GeometryConfig("b-ragged", (1, 5, 7), 24, (8, 8, 8), 1.0e4, description="35 tokens"),
        GeometryConfig("b-tiny", (5, 1, 1), 24, (8, 8, 8), 1.0e4, description="5 tokens"),
    )
    schemes = [s for s in ("flat:pad", "flat:uneven") if s in matrix.schemes]
    dtype, layout = _plain(matrix)
    frames = (0, 3)
    out = [
        Family(config, scheme, dtype, layout, sp, frames, (2, 2), frames[::-1])
        for config in configs
        for sp in layouts
        for scheme in schemes
    ]
    # Token sequences of 33 and 34 at one offset (a prompt and the next one): padded to the same
    # length at P = 2 and 4, one right after the other, so a key on the padded length instead of
    # the sequence's gives the second the first's rows (its last real one as padding).
    if "flat:pad" in matrix.schemes:
        widest = max(layouts, key=lambda sp: sp.size)
        out += [Family(GeometryConfig(f"b-prompt-{n}", (n,), 16, (16,), 1.0e6, description=f"{n} tokens"),
                       "flat:pad", dtype, layout, widest, (5,), (1,), (5,)) for n in (33, 34)]
    return out


def large_families(layouts: tuple[SpLayout, ...], matrix: Matrix) -> list[Family]:
    """A real model's latent at its real size (Wan 720p: 21 x 45 x 80, 75,600 tokens; slices of
    up to 37,800): code paths an implementation switches to above some size, and positions
    far along every axis. One dtype x layout, split along t (only P = 3 divides 21 frames), along
    w, and flat; one block into a causal stream (start_frame 21) only: the cost of a table this
    size is paid once. Float64, as FastVideo builds it: its unsharded table (2 x 74 MiB) is then
    larger than a cache budget of 128 MiB, which a byte-bounded cache must still serve."""
    config = GeometryConfig("b-720p", (21, 45, 80), 128, (44, 42, 42), 1.0e4, description="Wan 720p latent")
    schemes = [s for s in ("contiguous:t", "contiguous:w", "flat") if s in matrix.schemes]
    layout = _plain(matrix)[1]
    dtype = _float64(matrix)
    frames = (21,)
    out = [Family(config, scheme, dtype, layout, sp, frames, (2,), frames) for sp in layouts for scheme in schemes]
    # Past 2^17 tokens (Wan 1080p's latent: 171,360) with a thin head (28, Wan's split 12/8/8),
    # so its tables stay small: an unsharded table that long is where code switches to building
    # in chunks. Float32 and start_frame 0: the real-size latent the Wan convention can express,
    # its unsharded table (37 MiB) past a size class of 16 or 32 MiB. At start_frame 21 with an
    # NTK rescale on t and interpolated h and w (a longer, higher-resolution video than trained
    # on): a path for long sequences must apply the factors as the short one does.
    plain = GeometryConfig("b-1080p-thin", (21, 68, 120), 28, (12, 8, 8), 1.0e4, description="Wan 1080p latent")
    scaled = replace(plain, name="b-1080p-scaled", theta_rescale_factor=(2.0, 1.0, 1.0),
                     interpolation_factor=(1.0, 0.5, 0.5), description="Wan 1080p latent, NTK and interpolation")
    flat = [s for s in ("flat",) if s in matrix.schemes]
    return out + [Family(config, scheme, _plain(matrix)[0], layout, sp, (sf,), (1,), (sf,))
                  for config, sf in ((plain, 0), (scaled, 21))
                  for sp in layouts if sp.kind == "consecutive" for scheme in flat]


def _seeded_families(
    config: GeometryConfig, matrix: Matrix, layouts: tuple[SpLayout, ...], rng: random.Random
) -> list[Family]:
    """One breadth geometry: a contiguous split of its long axis and a flat split (what the
    restricted conventions express), one more scheme drawn; float32 interleaved (the same) and
    two more dtype x layout combinations drawn (every one for a 1-D or 2-D grid); start_frame 0
    and one other."""
    long_axis = "thw"[config.grid.index(max(config.grid))]
    fixed = [s for s in (f"contiguous:{long_axis}", "flat") if s in matrix.schemes]
    if long_axis != "t" and any(s.startswith("zigzag") for s in matrix.schemes):
        # Two chunks of a spatial axis per rank: the plan's token order is not row-major order.
        fixed.append(f"zigzag:{long_axis}")
    others = [s for s in matrix.schemes if s not in fixed and (parse_plan(s).axis or 0) < len(config.grid)]
    schemes = fixed + rng.sample(others, min(max(3 - len(fixed), 1), len(others)))
    combos = [(dtype, layout) for dtype in matrix.dtypes for layout in matrix.layouts]
    plain = [c for c in combos if c == ("float32", "interleaved")]
    drawn = plain + rng.sample([c for c in combos if c not in plain], min(3 - len(plain), len(combos) - len(plain)))
    if len(config.grid) < 3:  # a separate path for fewer axes: every combination (their tables are tiny)
        drawn = plain + [c for c in combos if c not in plain]
    # A causal offset always (T = 1 grids and scalar factors on t only show one there).
    frames = tuple(dict.fromkeys((0, rng.choice([f for f in matrix.start_frames if f] or [0]))))
    out = []
    for dtype, layout in sorted(drawn):
        for sp in layouts:
            for scheme in schemes:
                calls = tuple(rng.randint(1, matrix.steps + 1) for _ in frames)
                reentry = tuple(rng.sample(frames, len(frames)))
                out.append(Family(config, scheme, dtype, layout, sp, frames, calls, reentry))
    return out


# Positions past every table precomputed up to a power of two (8k, 16k ... 128k positions) and
# grown on demand: an LLM's decode position past 128k (1-D, a zigzag split as ring attention
# uses) and a causal video stream past 16k frames.
# Each also runs just below the spec's limit (positions up to 2**24): a position table grown on
# demand but capped (at 2**15 frames, 2**18 positions, ...) is wrong only past its cap, wherever
# between the first offset and the limit that lies.
FAR = (
    (GeometryConfig("b-far-1d", (96,), 32, (32,), 5.0e5, description="decode past 128k positions"),
     (131_077, 2**24 - 96 - 9)),
    (GeometryConfig("b-far", (12, 4, 4), 24, (8, 8, 8), 1.0e4, description="a stream past 16k frames"),
     (16_387, 2**24 - 12 - 5)),
)


def far_families(layouts: tuple[SpLayout, ...], matrix: Matrix) -> list[Family]:
    """Small grids at far causal offsets (``FAR``), float64: a table built there in a narrower
    dtype, or from positions that wrapped, is off by far more than the tolerance."""
    schemes = [s for s in ("contiguous:t", "zigzag", "flat") if s in matrix.schemes]
    dtype = _float64(matrix)
    layout = _plain(matrix)[1]
    return [
        Family(config, scheme, dtype, layout, sp, frames, tuple(2 for _ in frames), frames[::-1])
        for config, frames in FAR
        for sp in layouts
        for scheme in schemes
    ]


def deep_sweep(sp: SpLayout, matrix: Matrix) -> Family:
    """40 start_frames on a tiny grid, one call each, then all of them again from the first:
    a cache of up to 32 entries has evicted the early ones by then. The start_frames step by the
    grid's T, as a block-causal model streams (0, T, 2T, ...), and the split is along t, so a rank
    holds T/P frames: an implementation that derives a block's offset from the previous block's
    local frame count is wrong from the second block on."""
    config = GeometryConfig("deep-sweep", (4, 2, 4), 12, (4, 4, 4), description="evicts a 32-entry cache")
    frames = tuple(range(0, 4 * DEEP_SWEEP_FRAMES, 4))
    dtype = _float64(matrix)
    layout = "interleaved" if "interleaved" in matrix.layouts else matrix.layouts[0]
    return Family(config, "contiguous:t", dtype, layout, sp, frames, tuple(1 for _ in frames), frames)


def breadth_configs(rng: random.Random) -> tuple[GeometryConfig, ...]:
    """Fixed adversarial geometries, then two drawn from ``rng``. Each has an axis of 12 (or a
    flattened size divisible by 12), so contiguous and flat schemes split at P = 2, 3 and 4."""
    fixed = (
        # T = 1, unequal dims, theta != 1e4, scalar factors != 1 (the t axis included).
        GeometryConfig("b-t1-scalar", (1, 12, 4), 32, (8, 14, 10), 256.0, 1.5, 0.75),
        # Per-axis factors, every element different and != 1, another head dim, a large theta;
        # theta and factors not representable in float32 or bfloat16 (a value held in a
        # narrower buffer, or rounded into a key, changes the table).
        GeometryConfig("b-lists", (12, 2, 3), 48, (20, 16, 12), 123456.7, (1.1, 0.5, 1.25), (0.8, 2.0, 1 / 3)),
        # Plain: the default split, factors 1, theta != 1e4 (what a restricted convention expresses).
        GeometryConfig("b-plain", (2, 12, 6), 48, (16, 16, 16), 2.0e4),
        GeometryConfig("b-plain-t1", (1, 4, 12), 36, (12, 12, 12), 1.0e4),
        GeometryConfig("b-plain-wan", (3, 4, 12), 128, (44, 42, 42), 1.0e4),  # Wan's head dim and split
        # Head dim 64 (many DiTs): Wan's split there, 24/20/20, is where 2*(d//6) and 2*round(d/6)
        # part (d = 4 mod 6).
        GeometryConfig("b-plain-64", (2, 4, 12), 64, (24, 20, 20), 1.0e4),
        # Long spatial axes (longer than a 720p latent's 45 x 80): positions past any small
        # precomputed per-axis table. One frame and a small head dim keep its tables cheap; over
        # MAX_ATTENTION_TOKENS, so only its rotation is checked above the table level.
        GeometryConfig("b-wide", (1, 96, 96), 24, (8, 8, 8), 1.0e4),
        # Equal dims and sizes on h and w, but not their factors: h's frequencies or positions
        # reused for w (an "equal axes" shortcut) are wrong.
        GeometryConfig("b-equal-hw", (3, 8, 8), 24, (8, 8, 8), 1.0e4, (1.0, 1.5, 2.0), (1.0, 0.5, 0.75)),
        # Fewer axes: an image (2-D) and a token sequence (1-D, an LLM's theta, an NTK rescale and a
        # linear context extension): code that lifts every grid to 3-D shifts the wrong axis, and a
        # separate 1-D path must apply the factors as the 3-D one does.
        GeometryConfig("b-2d", (12, 8), 32, (16, 16), 1.0e4, 1.0, (1.0, 0.5)),
        GeometryConfig("b-1d", (96,), 32, (32,), 5.0e5, 4.0, 0.25),
        # An axis past the integers bfloat16 (256) and float16 (2048) hold exactly: positions
        # made in the latent's dtype repeat and skip there. Wan's split, factors 1: every
        # convention expresses it (the t axis meets such positions through start_frame). Over
        # MAX_ATTENTION_TOKENS: whole-sequence attention at 8,400 tokens would cost more than
        # the rest of the run, and the positions are the table and apply levels' to judge.
        GeometryConfig("b-long", (2, 2, 2100), 24, (8, 8, 8), 1.0e4),
    )
    return fixed + tuple(_random_config(rng, i) for i in range(2))


def _random_config(rng: random.Random, index: int) -> GeometryConfig:
    grid = [rng.choice((1, 2, 3, 4, 5, 6)) for _ in range(3)]
    grid[rng.randrange(3)] = 12
    dims = tuple(2 * rng.randint(2, 12) for _ in range(3))
    theta = float(round(10 ** rng.uniform(2.0, 6.0), 1))
    rescale: float | tuple[float, ...]
    interpolation: float | tuple[float, ...]
    if rng.random() < 0.5:
        rescale, interpolation = rng.choice((0.5, 1.0, 2.0, 3.0)), rng.choice((0.25, 0.5, 1.0, 1.5))
    else:
        rescale = tuple(rng.choice((0.5, 1.0, 1.5, 2.0, 4.0)) for _ in range(3))
        interpolation = tuple(rng.choice((0.25, 0.5, 1.0, 2.0)) for _ in range(3))
    return GeometryConfig(f"b-random{index}", tuple(grid), sum(dims), dims, theta, rescale, interpolation)


def expand(fams: list[Family]) -> list[Case]:
    """One case per (family, start_frame), numbered in family order."""
    cases: list[Case] = []
    for fam in fams:
        for sf in fam.start_frames:
            result = CaseResult(fam.config.name, fam.scheme, fam.sp.size, sf, fam.dtype, fam.layout, group=fam.sp.label)
            cases.append(Case(len(cases), fam, sf, fam.spec(sf), result))
    return cases
