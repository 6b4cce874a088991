"""The check's collective pickling: CPU tensors travel as raw bytes and come back bit for bit."""

from __future__ import annotations

import pickle

import pytest
import torch

from sp_rope.dist import dumps, loads


def _bits(t: torch.Tensor) -> list[int]:
    # Byte values through torch alone: the package must work without numpy.
    return t.detach().contiguous().reshape(-1).view(torch.uint8).tolist()


@pytest.mark.parametrize(
    "tensor",
    [
        torch.tensor([0.0, -0.0, float("nan"), float("inf"), 5e-324], dtype=torch.float64),  # bits, not values
        torch.randn(6, 5, dtype=torch.float32).t(),  # not contiguous
        torch.arange(10)[3:7],  # a view with a storage offset
        torch.tensor(2.5),  # 0-d
        torch.empty(0, 7),
        torch.ones(2, 3, dtype=torch.bfloat16),
        torch.tensor([True, False]),
    ],
    ids=["special-floats", "transposed", "offset-view", "0-d", "empty", "bfloat16", "bool"],
)
def test_tensors_round_trip_bit_for_bit(tensor: torch.Tensor) -> None:
    back = loads(dumps({"payload": [tensor, "text", 3]}))
    got = back["payload"][0]
    assert (got.dtype, got.shape) == (tensor.dtype, tensor.shape)
    assert _bits(got) == _bits(tensor)
    assert back["payload"][1:] == ["text", 3]
    # Writable, and not the sender's memory.
    if got.dtype == torch.bool:
        got.logical_not_()
    else:
        got.add_(1)
    assert _bits(tensor) != _bits(got) or tensor.numel() == 0


def test_tensors_travel_as_raw_bytes_not_torch_storages() -> None:
    blob = dumps([torch.zeros(4)])
    assert b"_rebuild_tensor" not in blob and b"_tensor_from_bytes" in blob
    assert len(blob) < len(pickle.dumps([torch.zeros(4)]))


_FRESH_TABLE = r"""
import ctypes, sys, torch
from sp_rope.dist import keep_freed_memory

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
t = torch.empty(64 * 2**20, dtype=torch.uint8)  # a 64 MiB table
print(kept, libc.mallinfo2().hblkhd >= 64 * 2**20)
"""


@pytest.mark.skipif(not hasattr(__import__("ctypes").CDLL(None), "mallinfo2"), reason="not glibc >= 2.33")
def test_keep_freed_memory_serves_big_tables_from_the_heap():
    """glibc maps a table above its mmap threshold freshly (and unmaps it on free, so the next
    one page-faults again); after keep_freed_memory it comes from the heap, which keeps it."""
    import subprocess
    import sys

    def run(mode: str) -> str:
        out = subprocess.run([sys.executable, "-c", _FRESH_TABLE, mode], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert run("default") == "None True"  # mmapped: what every big table used to cost
    assert run("keep") == "True False"  # from the heap


_FRAGMENTS = r"""
import torch
from sp_rope.dist import keep_freed_memory, return_freed_memory

def resident_mib() -> int:
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon")).split()[1]) // 1024

assert keep_freed_memory()
tables = [torch.ones(8 * 2**20, dtype=torch.uint8) for _ in range(16)]  # 128 MiB, touched
pins = []
for t in tables:  # a small block after each table keeps the heap from shrinking at its top
    pins.append(torch.ones(2048, dtype=torch.uint8))
del tables
before = resident_mib()
return_freed_memory()
print(before - resident_mib())
"""


@pytest.mark.skipif(not hasattr(__import__("ctypes").CDLL(None), "malloc_trim"), reason="not glibc")
def test_return_freed_memory_gives_back_the_heap_that_keep_freed_memory_keeps():
    """Freed tables stay resident in a heap that keeps them; the trim before the probe returns
    their pages even where small blocks still pin the heap around them."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _FRAGMENTS], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) >= 100, out.stdout  # of the 128 MiB freed
