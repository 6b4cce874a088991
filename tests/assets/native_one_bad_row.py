"""A native implementation with one wrong value: SP rank 1 of a 2-rank contiguous:t split gets
sin of token (t=5, h=2, w=3) off by exactly 0.25, so the check's report can be compared with
what is known to be wrong (which rank, scheme, first bad token, max abs error)."""

from sp_rope import RopeSlice, build_table

BAD_TOKEN = (5 * 6 + 2) * 12 + 3  # (t=5, h=2, w=3) on the quick preset's 8x6x12 grid


def rope(spec, plan, sp_rank, sp_size, device):
    indices = plan.indices(spec.grid, sp_rank, sp_size)
    cos, sin = build_table(spec, indices)
    if str(plan) == "contiguous:t" and sp_size == 2 and sp_rank == 1 and spec.grid == (8, 6, 12):
        row = int((indices == BAD_TOKEN).nonzero()[0])
        sin = sin.clone()
        sin[row, 3] += 0.25
    return RopeSlice(cos.to(device), sin.to(device), indices)
