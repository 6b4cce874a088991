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
