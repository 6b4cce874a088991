"""Stage 1, on each rank: ask the implementation for its slices, as a model would.

Every call goes through the implementation's own cache. The first call of a case hands its
slice to judging at once (nothing is copied or sent); repeated calls (denoising steps) and
re-entries after other start_frames only have to return the same contents, which a digest
shows. Every returned tensor is registered for retention checks, every cache key is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .cache import CacheMutationError, RopeSlice
from .dist import Job
from .judge import KeyRecord, Retention, content_digest, key_digest
from .matrix import Case, Family
from .providers import Provider, WrongDevice, as_a_model_calls, require_device


@dataclass(frozen=True)
class Seat:
    """Where this rank sits for one family: its SP rank, its group's index and global ranks."""

    family: Family
    sp_rank: int
    group: int
    ranks: tuple[int, ...]


@dataclass
class RankState:
    """What one rank accumulates while it builds: findings per case, keys, digests."""

    job: Job
    provider: Provider
    findings: dict[int, list[tuple[str, str, float]]] = field(default_factory=dict)  # (diagnosis, detail, error)
    records: dict[tuple[str, str, int], KeyRecord] = field(default_factory=dict)  # one per key, table and case
    retention: Retention = field(default_factory=Retention)
    first_digest: dict[int, tuple[object, ...]] = field(default_factory=dict)
    key_names: dict[object, tuple[str, str]] = field(default_factory=dict)  # key -> (digest, short repr)
    _last: dict[int, tuple[tuple[int, int], ...]] = field(default_factory=dict, repr=False)
    _last_digest: dict[int, tuple[object, ...]] = field(default_factory=dict, repr=False)

    def fail(self, case: int, diagnosis: str, detail: str, error: float = 0.0) -> None:
        self.findings.setdefault(case, []).append((diagnosis, detail, error))


def call(state: RankState, seat: Seat, case: Case, when: str) -> RopeSlice | None:
    """One call of the implementation for ``case``; returns the slice while it is the case's
    first table (the first call, and cache hits handing back those very tensors unchanged), for
    judging; None for other calls and when the call found a corrupted cache entry."""
    fam, rank = seat.family, state.job.rank
    try:
        with as_a_model_calls(state.job.device):
            sl = state.provider.get(case.spec, fam.plan, seat.sp_rank, fam.sp.size, state.job.device)
        require_device(sl, state.job.device)
    except WrongDevice as exc:
        state.fail(case.index, "wrong-device", f"rank {rank} ({when}): {exc}")
        return None
    except CacheMutationError as exc:
        state.fail(case.index, "mutated-in-place", f"rank {rank}: {exc}")
        return None
    except Exception as exc:  # noqa: BLE001 - the implementation under test failed: a verdict, not a crash
        state.fail(case.index, "implementation-error", f"rank {rank} ({when}): {type(exc).__name__}: {_line(exc)}")
        return None
    digest = _digest(state, case.index, sl)
    for name, tensor, part in (("cos", sl.cos, digest[0]), ("sin", sl.sin, digest[1])):
        changed = state.retention.handed_out(tensor, (part,), case.index, f"{name} table (rank {rank}, {when})")
        if changed is not None:  # the earlier case's table is what changed
            state.fail(changed[0], "overwritten-after-return", changed[1])
    if sl.key is not None:
        digest_of_key, short = _key_name(state, sl.key)
        record = KeyRecord(
            digest_of_key,
            short,
            str(digest[:2]),
            rank,
            fam.sp.size,
            f"{fam.sp.kind}{seat.group}",
            case.index,
        )
        state.records.setdefault((record.key, record.table, case.index), record)
    first = state.first_digest.setdefault(case.index, digest)
    if first is digest:
        return sl
    if digest != first:
        diagnosis = "stale-after-eviction" if when == "reentry" else "unstable-across-steps"
        state.fail(
            case.index, diagnosis, f"rank {rank} got a different table on {when} for start_frame {case.start_frame}"
        )
    return None


def _digest(state: RankState, case: int, sl: RopeSlice) -> tuple[object, ...]:
    # A cache hit hands back the very tensors of the last call: unchanged version counters mean
    # unchanged contents (writes that bypass them are caught by the retention re-check).
    versions = tuple((id(t), t._version) for t in (sl.cos, sl.sin, sl.indices))
    if state._last.get(case) == versions:
        return state._last_digest[case]
    digest = content_digest(sl.cos, sl.sin, sl.indices)
    state._last[case], state._last_digest[case] = versions, digest
    return digest


def _key_name(state: RankState, key: object) -> tuple[str, str]:
    """(digest, short repr) of a cache key; a key's repr is built once (a dataclass repr of a
    spec and a plan costs more than the cache hit that returned it)."""
    try:
        known = state.key_names.get(key)
    except Exception:  # noqa: BLE001 - unhashable (a list), or an __eq__ that raises (holds a tensor)
        return key_digest(key), repr(key)[:160]
    if known is None:
        known = state.key_names[key] = (key_digest(key), repr(key)[:160])
    return known


def _line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""
