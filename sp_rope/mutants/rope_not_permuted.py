"""Hidden states are permuted by the plan (zigzag, stripe, usp...), RoPE is not: the table is
built for a plain contiguous split of the sequence. Every row is right for the tokens it
claims, so the table level passes; the rank's hidden states are other tokens."""

from sp_rope import RopeSlice, build_table
from sp_rope.sharding import flat

CONVENTION = "native"
EXPECTED = "apply-mismatch"
DESCRIPTION = "load-balanced (zigzag/stripe) hidden states rotated with a contiguous-split RoPE table"
IMPL = "rope"
CACHE = None


def rope(spec, plan, sp_rank, sp_size, device):
    indices = flat(spec.grid, sp_rank, sp_size, "uneven")  # ignores the plan's permutation
    cos, sin = build_table(spec, indices)
    return RopeSlice(cos.to(device), sin.to(device), indices)
