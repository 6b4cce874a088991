"""The reverse: RoPE is built for zigzag load balancing while the hidden states were split
contiguously. Rows are right for the tokens they claim; the table level passes."""

from sp_rope import RopeSlice, ShardError, build_table
from sp_rope.sharding import flat, zigzag

CONVENTION = "native"
EXPECTED = "apply-mismatch"
DESCRIPTION = "contiguously split hidden states rotated with a zigzag-permuted RoPE table"
IMPL = "rope"
CACHE = None


def rope(spec, plan, sp_rank, sp_size, device):
    try:
        indices = zigzag(spec.grid, sp_rank, sp_size)  # ignores the plan actually used
    except ShardError:
        indices = flat(spec.grid, sp_rank, sp_size, "uneven")
    cos, sin = build_table(spec, indices)
    return RopeSlice(cos.to(device), sin.to(device), indices)
