"""apply_rope against an independent complex-number formulation, for every layout."""

import pytest
import torch

from sp_rope import RopeSpec, build_table
from sp_rope.apply import apply_rope, masked_attention, ulysses_attention


def _complex_reference(x: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """Rotate with complex multiplication by e^{i·angle}, angles from the float64 formula."""
    t, h, w = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in spec.grid), indexing="ij")
    angles = []
    for pos, d in zip((t + spec.start_frame, h, w), spec.rope_dim_list):
        k = torch.arange(d // 2, dtype=torch.float64)
        angles.append(pos.reshape(-1, 1) * spec.theta ** (-2 * k / d))
    rotor = torch.polar(torch.ones(1, dtype=torch.float64), torch.cat(angles, dim=1))[None, :, None, :]
    xd = x.double()
    if spec.layout == "neox":
        half = xd.shape[-1] // 2
        z = torch.complex(xd[..., :half], xd[..., half:]) * rotor
        return torch.cat([z.real, z.imag], dim=-1)
    z = torch.view_as_complex(xd.unflatten(-1, (-1, 2)).contiguous()) * rotor
    return torch.view_as_real(z).flatten(-2)


@pytest.mark.parametrize("layout", ["interleaved", "half", "neox"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_apply_matches_complex_rotation(layout, dtype, x_dtype):
    spec = RopeSpec((3, 4, 5), (8, 8, 8), dtype=dtype, layout=layout, start_frame=7)
    x = torch.randn(2, spec.num_tokens, 3, spec.head_dim, generator=torch.Generator().manual_seed(0)).to(x_dtype)
    cos, sin = build_table(spec)
    out = apply_rope(x, cos, sin, layout)
    assert out.dtype == x_dtype and out.shape == x.shape
    tol = 2e-6 if x_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), _complex_reference(x, spec).to(x_dtype).double(), atol=tol, rtol=tol)


def test_apply_does_not_modify_its_inputs():
    spec = RopeSpec((2, 2, 2), (8, 8, 8))
    cos, sin = build_table(spec)
    x = torch.randn(1, 8, 1, 24)
    before = (x.clone(), cos.clone(), sin.clone())
    apply_rope(x, cos, sin, "interleaved")
    assert all(torch.equal(a, b) for a, b in zip(before, (x, cos, sin)))


def test_wrong_pairing_is_visible():
    # Interleaved tables applied with NeoX pairing rotate the wrong coordinates.
    spec = RopeSpec((2, 3, 4), (8, 8, 8), layout="interleaved")
    cos, sin = build_table(spec)
    x = torch.randn(1, spec.num_tokens, 2, 24)
    assert not torch.allclose(apply_rope(x, cos, sin, "interleaved"), apply_rope(x, cos, sin, "neox"))


def test_masked_attention_is_order_free_and_ignores_padding():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 6, 2, 4, generator=g) for _ in range(3))
    positions = torch.arange(6)
    for causal in (False, True):
        ref = masked_attention(q, k, v, positions, causal)
        perm = torch.tensor([3, 0, 5, 1, 4, 2])
        out = masked_attention(q[:, perm], k[:, perm], v[:, perm], positions[perm], causal)
        torch.testing.assert_close(out, ref[:, perm])
        # A padding row (position -1) with garbage keys changes nothing for the real rows.
        pad = torch.full((1, 1, 2, 4), 1e3)
        out = masked_attention(
            torch.cat([q, pad], 1),
            torch.cat([k, pad], 1),
            torch.cat([v, pad], 1),
            torch.cat([positions, torch.tensor([-1])]),
            causal,
        )
        torch.testing.assert_close(out[:, :6], ref)


def _ulysses_rank(rank: int, size: int, store_path: str, items: list) -> None:  # type: ignore[type-arg]
    import datetime

    import torch.distributed as dist

    store = dist.FileStore(store_path, size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=size, timeout=datetime.timedelta(seconds=60))
    try:
        batch = []
        for q, k, v, positions in items:
            length = len(positions) // size
            rows = positions[rank * length : (rank + 1) * length]
            real = rows.clamp(min=0)
            batch.append((q[:, real], k[:, real], v[:, real], positions))
        outs = ulysses_attention(batch, None)
        for (q, k, v, positions), (plain, causal) in zip(items, outs):
            length = len(positions) // size
            rows = positions[rank * length : (rank + 1) * length]
            real = rows >= 0
            order = torch.arange(q.shape[1])
            for got, is_causal in ((plain, False), (causal, True)):
                want = masked_attention(q, k, v, order, is_causal)[:, rows[real]]
                torch.testing.assert_close(got[:, real], want, atol=1e-5, rtol=1e-5)
    finally:
        dist.destroy_process_group()


def test_ulysses_attention_batches_items_of_different_shapes(tmp_path):
    """Two spawned ranks, three items (different lengths, heads, head dims, padding, a permuted
    order) through one pair of all-to-alls: each equals single-process attention at its rows."""
    g = torch.Generator().manual_seed(2)
    items = []
    for tokens, heads, dim, order in ((6, 2, 4, None), (5, 4, 8, None), (8, 2, 6, [3, 0, 7, 1, 4, 6, 2, 5])):
        q, k, v = (torch.randn(1, tokens, heads, dim, generator=g) for _ in range(3))
        positions = torch.tensor(order) if order else torch.arange(tokens)
        if tokens % 2:  # pad to an even split: the last rank's last row is padding
            positions = torch.cat([positions, torch.tensor([-1])])
        items.append((q, k, v, positions))
    torch.multiprocessing.spawn(_ulysses_rank, args=(2, str(tmp_path / "store"), items), nprocs=2, join=True)
