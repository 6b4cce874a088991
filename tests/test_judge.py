"""judge_slice on its own: slices judged against the unsharded table's row digests, or against
the table itself where the pipeline holds it (``hold``): both paths must give the same verdicts
and the same messages.

The grid has 10 x 30 x 40 = 12,000 tokens, so a P=2 slice spans several of the digests' 1024-row
blocks and two of a mismatch report's 4096-row blocks, and a stripe's tokens are never one run.
Expected messages are written out here by hand, from the token the test corrupts.
"""

from __future__ import annotations

import pytest
import torch

from sp_rope.cache import RopeSlice
from sp_rope.judge import JUDGE_ROWS, RankSlice, ReferenceRows, Watched, judge_slice, row_digests
from sp_rope.report import CaseResult
from sp_rope.sharding import parse_plan
from sp_rope.spec import RopeSpec
from sp_rope.tables import build_table

SPEC = RopeSpec(grid=(10, 30, 40), rope_dim_list=(8, 12, 12), dtype="float64", layout="interleaved")


def _reference() -> RopeSlice:
    cos, sin = build_table(SPEC)
    return RopeSlice(cos, sin, torch.arange(SPEC.num_tokens))


def _rows(table: RopeSlice, rebuilds: list[int] | None = None, hold: bool = False) -> ReferenceRows:
    """The table's row digests (and the table, with ``hold``); its rebuild hands back the same
    table, counting the calls."""

    def rebuild() -> RopeSlice:
        if rebuilds is not None:
            rebuilds.append(1)
        return table

    return ReferenceRows.of(table, 7, rebuild, Watched.of(table) if hold else None)


HOLD = pytest.mark.parametrize("hold", [False, True], ids=["digests", "held"])


def _rank_slice(scheme: str, sp_rank: int, sp_size: int) -> tuple[RankSlice, torch.Tensor]:
    plan = parse_plan(scheme)
    tokens = plan.indices(SPEC.grid, sp_rank, sp_size)
    cos, sin = build_table(SPEC, tokens)
    return RankSlice(sp_rank, sp_rank, plan, RopeSlice(cos, sin, tokens)), tokens


def _judge(
    got: RankSlice, scheme: str, sp_size: int, rebuilds: list[int] | None = None, hold: bool = False
) -> CaseResult:
    case = CaseResult("t", scheme, sp_size, 0, "float64", "interleaved")
    judge_slice(case, SPEC, got, _rows(_reference(), rebuilds, hold))
    return case


@HOLD
def test_a_correct_strided_slice_over_several_blocks_passes_without_building_the_table_again(hold: bool):
    got, tokens = _rank_slice("stripe", 1, 2)
    assert len(tokens) > JUDGE_ROWS and not bool((tokens.diff() == 1).all())
    rebuilds: list[int] = []
    case = _judge(got, "stripe", 2, rebuilds, hold)
    assert case.status == "passed", case.details
    assert rebuilds == []  # the digests (or the held rows) alone pass a correct slice


@HOLD
def test_a_bad_row_in_a_later_block_names_its_token_and_the_largest_error(hold: bool):
    got, tokens = _rank_slice("stripe", 1, 2)
    row = JUDGE_ROWS + 7  # inside the second block
    token = int(tokens[row])
    t, rest = divmod(token, 30 * 40)
    h, w = divmod(rest, 40)
    got.table.sin[row, 3] += 0.5
    got.table.sin[row + 100, 5] -= 0.125  # a smaller error further on: the maximum is still 0.5
    rebuilds: list[int] = []
    case = _judge(got, "stripe", 2, rebuilds, hold)
    assert rebuilds == ([] if hold else [1])  # the table is built again once to size the error, unless held
    assert case.diagnoses == ["slice-mismatch"], case.details
    assert case.details == [
        f"slice-mismatch: rank 1 (stripe, P=2) sin differs from the unsharded table at token "
        f"(t={t}, h={h}, w={w}) (local row {row}), max abs error 0.5"
    ]
    assert case.max_abs_error == 0.5


@HOLD
def test_a_row_swapped_with_its_neighbour_is_a_mismatch(hold: bool):
    got, tokens = _rank_slice("zigzag", 0, 2)
    row = JUDGE_ROWS + 1
    for part in (got.table.cos, got.table.sin):
        part[[row, row + 1]] = part[[row + 1, row]].clone()
    case = _judge(got, "zigzag", 2, hold=hold)
    assert case.diagnoses == ["slice-mismatch"]
    assert f"(local row {row})" in case.details[0]


@HOLD
def test_padding_rows_must_be_the_identity_and_real_rows_still_match(hold: bool):
    scheme = "flat:pad"
    plan = parse_plan(scheme)
    tokens = plan.indices((7, 30, 41), 1, 4)  # 8,610 tokens over 4 ranks: the last rank pads
    spec = RopeSpec(grid=(7, 30, 41), rope_dim_list=(8, 12, 12), dtype="float64", layout="interleaved")
    last = plan.indices(spec.grid, 3, 4)
    assert bool((last < 0).any()) and not bool((tokens < 0).any())
    cos, sin = build_table(spec, last)
    reference_cos, reference_sin = build_table(spec)
    reference = RopeSlice(reference_cos, reference_sin, torch.arange(spec.num_tokens))

    def judge(c: torch.Tensor, s: torch.Tensor) -> CaseResult:
        case = CaseResult("t", scheme, 4, 0, "float64", "interleaved")
        judge_slice(case, spec, RankSlice(3, 3, plan, RopeSlice(c, s, last)), _rows(reference, hold=hold))
        return case

    assert judge(cos, sin).status == "passed"
    bad_pad = sin.clone()
    bad_pad[-1, 0] = 0.25
    assert judge(cos, bad_pad).details == [
        "slice-mismatch: rank 3 (flat:pad, P=4) padding rows of sin are not 0.0"
    ]
    bad_real = cos.clone()
    bad_real[0, 1] = 2.0
    case = judge(bad_real, sin)
    token = int(last[0])
    t, rest = divmod(token, 30 * 41)
    h, w = divmod(rest, 41)
    assert case.details[0].startswith(
        f"slice-mismatch: rank 3 (flat:pad, P=4) cos differs from the unsharded table at token (t={t}, h={h}, w={w}) "
        "(local row 0)"
    ), case.details


def _record(key: str, table: str, rank: int, group: str = "consecutive0", case: int = 0):  # type: ignore[no-untyped-def]
    from sp_rope.judge import KeyRecord

    return KeyRecord(key, key, table, rank, 2, group, case)


def test_a_key_two_ranks_share_for_different_tables_is_a_collision_naming_the_ranks():
    from sp_rope.judge import find_key_collisions

    (found,) = find_key_collisions([_record("k", "t0", 0, case=3), _record("k", "t1", 1, case=4)])
    assert found.cases == {3, 4} and (found.first.rank, found.other.rank) == (0, 1)  # the calls to replay
    assert found.message == "ranks [0, 1] of SP group consecutive0 (P=2) share cache key k, for different tables"


def test_a_key_two_ranks_share_for_one_table_is_no_collision():
    from sp_rope.judge import find_key_collisions

    assert find_key_collisions([_record("k", "t0", 0, case=3), _record("k", "t0", 1, case=4)]) == []


def test_a_key_for_two_tables_across_groups_is_a_collision():
    from sp_rope.judge import find_key_collisions

    (found,) = find_key_collisions([_record("k", "t0", 0), _record("k", "t1", 3, group="strided1")])
    assert found.message == "cache key k maps to two different tables (rank 0 P=2 and rank 3 P=2)"


def test_row_digests_see_any_one_changed_bit_of_any_word_and_read_minus_zero_as_zero():
    """Every bit of every 16-bit word of a row, flipped alone, changes the row's digest; two
    changes that cancel in a sum of the words (a sign flip in two entries) do too."""
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        rows = torch.randn(3, 6).to(dtype)
        base = row_digests(rows, 7)
        words = rows.view(torch.int16)
        for word in range(words.shape[1]):
            for bit in range(16):
                flipped = words.clone()
                flipped[1, word] ^= torch.tensor(1 << bit).to(torch.int16)
                got = row_digests(flipped.view(dtype), 7)
                assert not torch.equal(got[1], base[1]), (dtype, word, bit)
                assert torch.equal(got[[0, 2]], base[[0, 2]])
        signs = rows.clone()
        signs[1, :2] = -signs[1, :2]
        assert not torch.equal(row_digests(signs, 7)[1], base[1])
        zeros = torch.zeros(1, 6, dtype=dtype)
        assert torch.equal(row_digests(-zeros, 7), row_digests(zeros, 7))


def test_the_digests_coefficients_follow_the_seed():
    rows = torch.randn(4, 8, dtype=torch.float64)
    assert torch.equal(row_digests(rows, 3), row_digests(rows.clone(), 3))
    assert not torch.equal(row_digests(rows, 3), row_digests(rows, 4))


def test_held_rows_find_exactly_the_rows_the_digests_find():
    """The direct comparison with a held table makes the digests' test: any changed bit of any
    word differs, -0.0 reads as 0.0, and a NaN equals only the very same NaN."""
    from sp_rope.judge import RowsUnderJudgement, _rows_differ

    def both(got: torch.Tensor, table: torch.Tensor) -> list[bool]:
        tokens = torch.arange(len(got))
        held = _rows_differ(RowsUnderJudgement("r", "cos", got, tokens, (len(got),)), table)
        digests = (row_digests(got, 7) != row_digests(table, 7)).any(dim=1)
        assert held.tolist() == digests.tolist(), (got, table)
        return held.tolist()

    for dtype in (torch.float64, torch.float32):
        table = torch.randn(3, 4).to(dtype)
        words = table.view(torch.int16)
        for word in range(words.shape[1]):
            for bit in range(16):
                flipped = words.clone()
                flipped[1, word] ^= torch.tensor(1 << bit).to(torch.int16)
                assert both(flipped.view(dtype), table) == [False, True, False], (dtype, word, bit)
        zeros = table.clone()
        zeros[0] = 0.0
        minus = zeros.clone()
        minus[0, 1] = -0.0
        assert both(minus, zeros) == [False, False, False]
        nan = table.clone()
        nan[2, 0] = float("nan")
        assert both(nan.clone(), nan) == [False, False, False]
        other_nan = nan.clone()
        other_nan.view(torch.int16)[2, 0] ^= 1  # a NaN's payload: another NaN, other bits
        assert both(other_nan, nan) == [False, False, True]
        assert both(nan, table) == [False, False, True]


def test_a_held_table_written_into_after_its_digests_is_judged_by_its_digests():
    """What was digested is what slices are judged against: a write into the held table after
    that (reported apart, as ``mutated-in-place``) does not make a correct slice wrong."""
    reference = _reference()
    rows = ReferenceRows.of(reference, 7, _reference, Watched.of(reference))
    assert rows.intact() is reference
    got, tokens = _rank_slice("stripe", 1, 2)
    reference.sin[int(tokens[3])] += 1.0  # a row this slice claims
    assert rows.intact() is None
    case = CaseResult("t", "stripe", 2, 0, "float64", "interleaved")
    judge_slice(case, SPEC, got, rows)
    assert case.status == "passed", case.details
