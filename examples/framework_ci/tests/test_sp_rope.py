"""CI: sp_rope proves that the framework's RoPE is exact under sequence parallelism.

Each check starts 2 CPU ranks of its own, so the tests run in parallel under ``pytest -n 2``.
"""

import pytest

MATRIX = dict(
    convention="fastvideo",
    nproc=2,
    configs=["quick"],
    schemes="contiguous:t,contiguous:h,contiguous:w",
    layouts="interleaved,half",
)


class KnownBug(Exception):
    """The check caught the bug this implementation is kept for."""


def test_rope_is_exact_under_sequence_parallelism(sp_rope_check):
    result = sp_rope_check(impl="tiny_framework.rope:rope", impl_cache="tiny_framework.rope:CACHE", **MATRIX)
    assert result.ok, result


# A canary: if the check ever stops catching this bug (or catches it for another reason), CI fails.
@pytest.mark.xfail(strict=True, raises=KnownBug, reason="rope_no_sp_rank's cache key omits sp_rank")
def test_cache_key_without_sp_rank_is_caught(sp_rope_check):
    result = sp_rope_check(
        impl="tiny_framework.rope_no_sp_rank:rope", impl_cache="tiny_framework.rope_no_sp_rank:CACHE", **MATRIX
    )
    assert "key-collision" in result.diagnoses, result
    raise KnownBug(repr(result))
