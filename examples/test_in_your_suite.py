"""Prove in your own test suite that your RoPE is exact under sequence parallelism."""

from pathlib import Path

ROPE = Path(__file__).with_name("fv_rope.py")  # or a module: impl="my_framework.rope:rope"


def test_rope_is_exact_under_sequence_parallelism(sp_rope_check):
    result = sp_rope_check(
        impl=f"{ROPE}:rope",
        impl_cache=f"{ROPE}:CACHE",
        convention="fastvideo",
        nproc=2,
        configs=["quick"],
        schemes=["contiguous:t", "contiguous:w"],
        layouts=["interleaved", "half"],
        dtypes=["float64"],
        start_frames=[0, 17],
    )
    assert result.ok, result
