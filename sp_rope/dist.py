"""Process groups for the check: timeouts on everything, named phases, named culprits.

Every collective runs under the job's ``--timeout``. Before each collective phase the ranks
meet at a gloo ``monitored_barrier`` (:meth:`Job.sync`). Every phase change is published on
the liveness board (:mod:`sp_rope.board`), so when a barrier or collective fails, the rank that
noticed names the rank(s) that stopped making progress and the phase each was in (a hung,
stopped or crashed rank), not the healthy neighbour that timed out waiting for it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import os
import pickle
import re
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from . import board

# The longest --timeout: a collective that waits a day is a hang; past this, timedelta and the
# store's millisecond timeouts overflow (what made --timeout 1e300 an exit 3).
MAX_TIMEOUT_S = 86_400


class UsageError(ValueError):
    """Bad input found at run time: exit code 2 on every rank."""


class PhaseError(RuntimeError):
    """An infrastructure failure (timeout, missing rank, crash) inside a named phase."""


class SyncError(PhaseError):
    """Some rank did not reach a monitored barrier: which ones the barrier saw, and how long
    this rank waited (a peer that crashed fails the barrier long before the timeout)."""

    def __init__(self, name: str, missing: list[int], waited: float, cause: str) -> None:
        who = f"rank(s) {', '.join(map(str, missing))}" if missing else "some rank"
        super().__init__(f"{who} did not reach phase {name!r} (waited {waited:.1f}s): {cause}")
        self.name, self.missing, self.waited, self.cause = name, missing, waited, cause


_current_phase = "startup"


def current_phase() -> str:
    return _current_phase


def phase_of(exc: BaseException) -> str:
    """The phase an exception escaped from (the innermost one), else the current phase."""
    return getattr(exc, "sp_rope_phase", _current_phase)


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    global _current_phase
    previous, _current_phase = _current_phase, name
    board.set_phase(name)
    start = time.monotonic()
    try:
        yield
    except BaseException as exc:
        if not hasattr(exc, "sp_rope_phase"):
            exc.sp_rope_phase = name  # type: ignore[attr-defined]
            exc.sp_rope_elapsed = time.monotonic() - start  # type: ignore[attr-defined]
        raise
    finally:
        _current_phase = previous
        board.set_phase(previous)


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def launch_env() -> LaunchEnv | None:
    """Rank facts set by torchrun / the elastic launcher, or None when not launched."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    world = int(os.environ["WORLD_SIZE"])
    return LaunchEnv(
        rank=int(os.environ["RANK"]),
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
    )


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_FREED_BYTES = 1 << 30


@functools.cache
def _glibc(name: str, argtypes: tuple[type, ...]) -> Any:
    """One of glibc's malloc functions (returning int), looked up once; None elsewhere."""
    try:
        fn = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):  # not glibc (macOS, musl): the allocator's defaults stay
        return None
    fn.argtypes, fn.restype = list(argtypes), ctypes.c_int
    return fn


def keep_freed_memory() -> bool:
    """Have this rank's allocator keep freed blocks for reuse; True where glibc accepted it.

    A rank allocates and frees tables of tens of MiB thousands of times (every build of the
    implementation under test, every reference). glibc serves blocks above its mmap threshold
    (32 MiB at most) with fresh mappings and unmaps them on free, so every such table paid a
    page fault per 4 KiB again: 9 of a 480p run's 56 CPU seconds were the kernel's.
    With the thresholds raised, freed blocks go back to the heap and the next table reuses
    them. What the implementation computes is the same either way; its untouched memory may hold
    old bytes instead of zeros, as on a GPU's caching allocator."""
    mallopt = _glibc("mallopt", (ctypes.c_int, ctypes.c_int))
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_FREED_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED_BYTES))


def return_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    With freed blocks kept (``keep_freed_memory``), tables of several sizes never fit each other's
    holes exactly, so the heap grows by fragments it keeps. Called once, after the cases and
    before the probe. Not between specs: every table built after a trim pays a page fault per
    4 KiB again, which made the 480p preset 30 % slower on our VM without lowering its peak."""
    trim = _glibc("malloc_trim", (ctypes.c_size_t,))
    if trim is not None:
        trim(0)


def resolve_backend(requested: str, env: LaunchEnv) -> tuple[str, str]:
    """(backend, device) for this rank; NCCL needs one visible GPU per local rank."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested == "auto":
        requested = "nccl" if gpus >= env.local_world_size and dist.is_nccl_available() else "gloo"
    if requested == "nccl":
        if not dist.is_nccl_available() or gpus < env.local_world_size:
            # Two NCCL ranks on one GPU die inside NCCL with a bare exit 1; refuse up front.
            raise UsageError(
                f"--backend nccl needs one GPU per rank: {env.local_world_size} ranks on this node, "
                f"{gpus} GPU(s) visible"
            )
        return "nccl", f"cuda:{env.local_rank}"
    if requested == "gloo":
        return "gloo", "cpu"
    raise UsageError(f"--backend: unknown value {requested!r} (choose from auto, gloo, nccl)")


class Job:
    """The initialized default group plus a gloo group for monitored barriers."""

    def __init__(self, env: LaunchEnv, backend: str, device: str, timeout_s: float) -> None:
        self.env = env
        self.backend = backend
        self.device = device
        self.timeout = timedelta(seconds=timeout_s)
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        with phase("init_process_group"):
            dist.init_process_group(
                backend,
                rank=env.rank,
                world_size=env.world_size,
                timeout=self.timeout,
                device_id=torch.device(device) if backend == "nccl" else None,
            )
        self.barrier_group: dist.ProcessGroup | None = None  # None: the default (gloo) group
        if backend != "gloo":
            group = dist.new_group(backend="gloo", timeout=self.timeout)
            # From torch 2.14 new_group is typed to return a non-member sentinel too; every rank
            # is a member of this one.
            assert isinstance(group, dist.ProcessGroup)
            self.barrier_group = group
        publisher = board.publisher()
        if publisher is not None and publisher.board_dir is None:
            publisher.store = _board_store()  # no board directory (torchrun): the job's store
        self._sp_groups: dict[tuple[tuple[int, ...], ...], Any | None] = {}

    @property
    def rank(self) -> int:
        return self.env.rank

    def sp_group(self, groups: tuple[tuple[int, ...], ...]) -> Any | None:
        """The process group of this rank among ``groups`` (an SP layout's groups of global ranks,
        each sorted), or None when this rank is in none of them. Every rank must create every
        group, in the same order, so every rank calls this for the same layouts."""
        if groups not in self._sp_groups:
            mine = None
            for ranks in groups:
                group = dist.new_group(list(ranks), timeout=self.timeout)
                if self.rank in ranks:
                    mine = group
            self._sp_groups[groups] = mine
        return self._sp_groups[groups]

    def sync(self, name: str) -> None:
        """Meet every rank before phase ``name``; raise :class:`SyncError` if some rank does not
        come (:func:`diagnose` then reads the board for which rank stopped, and where)."""
        with phase(name):
            start = time.monotonic()
            try:
                dist.monitored_barrier(self.barrier_group, timeout=self.timeout, wait_all_ranks=True)
            except RuntimeError as exc:
                found = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", str(exc))
                missing = [int(r) for r in re.findall(r"\d+", found.group(1))] if found else []
                raise SyncError(name, missing, time.monotonic() - start, _first_line(exc)) from exc

    def gather(self, obj: Any, group: Any, group_ranks: list[int]) -> list[Any] | None:
        """Objects of ``group`` at its first rank (None elsewhere).

        Not ``dist.gather_object``: torch unpickles through ``.numpy()``, and numpy is not a
        dependency. Objects travel as pickled bytes in uint8 tensors, padded to the longest."""
        leader = group_ranks[0]
        blob = self._bytes_tensor(dumps(obj))
        sizes = [torch.zeros(1, dtype=torch.int64, device=blob.device) for _ in group_ranks]
        dist.all_gather(sizes, torch.tensor([blob.numel()], device=blob.device), group=group)
        lengths = [int(n) for n in sizes]
        padded = torch.zeros(max(lengths), dtype=torch.uint8, device=blob.device)
        padded[: blob.numel()] = blob
        out = [torch.empty_like(padded) for _ in group_ranks] if self.rank == leader else None
        dist.gather(padded, out, dst=leader, group=group)
        if out is None:
            return None
        return [loads(tensor_bytes(t[:n].cpu())) for t, n in zip(out, lengths)]

    def broadcast(self, obj: Any) -> Any:
        """``obj`` of rank 0 on every rank (pickled bytes in a uint8 tensor, as in ``gather``)."""
        blob = self._bytes_tensor(dumps(obj) if self.rank == 0 else b"")
        size = torch.tensor([blob.numel()], device=blob.device)
        dist.broadcast(size, src=0)
        data = blob if self.rank == 0 else torch.empty(int(size), dtype=torch.uint8, device=blob.device)
        dist.broadcast(data, src=0)
        return loads(tensor_bytes(data.cpu()))

    def _bytes_tensor(self, blob: bytes) -> torch.Tensor:
        # NCCL moves only device tensors; gloo takes CPU ones.
        data = torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else torch.empty(0, dtype=torch.uint8)
        return data.to(self.device) if self.backend == "nccl" else data

    def close(self) -> None:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _board_store() -> Any:
    """A client of the job's c10d store for the board, or None where there is none to reach."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return None
    try:
        return dist.TCPStore(addr, int(port), is_master=False, timeout=timedelta(seconds=10), wait_for_workers=False)
    except Exception:  # noqa: BLE001 - no board across nodes; failures are still named, less precisely
        return None


@dataclass(frozen=True)
class Diagnosis:
    """What a rank's infrastructure failure says: the message, the ranks it blames, and the
    phase the (first) blamed rank was in."""

    message: str
    culprits: tuple[int, ...]
    phase: str
    own: bool  # this rank's own code failed (its traceback is worth showing)


def diagnose(exc: BaseException, rank: int, world_size: int) -> Diagnosis:
    """Blame for a failure on this rank: this rank, if its own code failed; if a collective or
    barrier failed, the rank(s) the board shows stopped, or busy elsewhere while this one waited."""
    where = phase_of(exc)
    board.failing(where)
    itself = f"rank {rank} failed in phase {where!r}: {type(exc).__name__}: {_first_line(exc)}"
    if not _in_collective(exc):
        return Diagnosis(itself, (rank,), where, True)
    culprits = board.find_culprits(world_size, rank)
    blamed = tuple(sorted({c.rank for c in culprits})) or (tuple(exc.missing) if isinstance(exc, SyncError) else ())
    if not blamed:
        return Diagnosis(itself, (), where, False)
    waited = exc.waited if isinstance(exc, SyncError) else getattr(exc, "sp_rope_elapsed", 0.0)
    # With the board's account, gloo's own words ("check rank 0 logs") would only mislead.
    found = "; ".join(map(str, culprits)) if culprits else exc.cause if isinstance(exc, SyncError) else _first_line(exc)
    message = (
        f"rank(s) {', '.join(map(str, blamed))} did not reach phase {where!r}: {found}; "
        f"rank {rank} gave up after {waited:.1f}s"
    )
    return Diagnosis(message, blamed, culprits[0].phase if culprits else where, False)


def _in_collective(exc: BaseException) -> bool:
    """Did the exception (or what caused it) come out of torch.distributed: a barrier or
    collective that failed because of another rank, not this rank's own code?"""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, SyncError) or isinstance(seen, getattr(dist, "DistError", ())):
            return True
        frames = traceback.extract_tb(seen.__traceback__)
        if frames and "/torch/distributed/" in frames[-1].filename.replace(os.sep, "/"):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _tensor_from_bytes(dtype: str, shape: tuple[int, ...], data: bytes) -> torch.Tensor:
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    return flat.view(getattr(torch, dtype)).reshape(shape)


class _TensorBytesPickler(pickle.Pickler):
    """Pickles CPU tensors as their raw bytes. torch's own tensor pickling goes through its storage
    machinery at ~0.5 ms a tensor; a check gathers thousands of small tables, so that was seconds
    per rank (raw bytes: ~0.1 ms)."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is torch.Tensor and obj.device.type == "cpu" and obj.layout == torch.strided:
            return _tensor_from_bytes, (str(obj.dtype).removeprefix("torch."), tuple(obj.shape), tensor_bytes(obj))
        return NotImplemented


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a CPU tensor, copied straight from its memory. Not ``.numpy()``: numpy is
    not a dependency of sp_rope, and a venv holding only torch has none."""
    flat = t.detach().contiguous()
    return ctypes.string_at(flat.data_ptr(), flat.numel() * flat.element_size())


def dumps(obj: Any) -> bytes:
    """Pickle for collectives: CPU tensors travel as raw bytes (see _TensorBytesPickler)."""
    buf = io.BytesIO()
    _TensorBytesPickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


def loads(blob: bytes) -> Any:
    return pickle.loads(blob)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
