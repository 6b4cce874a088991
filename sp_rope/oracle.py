"""An independent float64 RoPE oracle: the formula, written without the table builder.

Per token and axis: ``angle = position * interpolation * theta_a ** (-2k/d)``, evaluated with
``exp``/``log`` in float64 from integer coordinates (no per-axis tables, no shared code).
Scaled positions are rounded to float32, as the convention prescribes. A bug shared by the
sharded and unsharded builder paths still disagrees with this.
"""

from __future__ import annotations

import math

import torch

from .spec import RopeSpec


def oracle_table(spec: RopeSpec, indices: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 cos/sin ``[tokens, spec.width]`` in ``spec.layout`` (padding rows -1: cos 1, sin 0)."""
    tokens = torch.arange(spec.num_tokens) if indices is None else indices.to(torch.int64).cpu()
    flat = tokens.clamp(min=0).to(torch.float64)
    halves = []
    stride = spec.num_tokens
    for axis, (size, d) in enumerate(zip(spec.grid, spec.rope_dim_list)):
        stride //= size
        coord = torch.floor(flat / stride) - size * torch.floor(flat / (stride * size))
        if axis == 0:
            coord = coord + spec.start_frame
        rescale = spec.theta_rescale_factor[axis]  # type: ignore[index]
        log_theta = math.log(spec.theta)
        if rescale != 1.0:  # the spec refuses a rescale on a dim-2 axis, where d - 2 == 0
            log_theta += (d / (d - 2)) * math.log(rescale)
        k = torch.arange(d // 2, dtype=torch.float64)
        inv_freq = torch.exp(-(2.0 * k / d) * log_theta)
        # The convention (FastVideo, diffusers) keeps scaled positions in float32.
        scale = spec.interpolation_factor[axis]  # type: ignore[index]
        position = (coord.to(torch.float32) * scale).to(torch.float64)
        halves.append(position[:, None] * inv_freq[None, :])
    angles = torch.cat(halves, dim=1)
    if spec.layout == "interleaved":
        angles = torch.stack([angles, angles], dim=2).flatten(1)
    elif spec.layout == "neox":
        angles = torch.cat([angles, angles], dim=1)
    cos, sin = torch.cos(angles), torch.sin(angles)
    pad = tokens < 0
    cos[pad], sin[pad] = 1.0, 0.0
    return cos, sin


def tolerance(spec: RopeSpec) -> float:
    """Allowed |table - oracle| for a table computed in ``spec.dtype``.

    The angle carries a relative rounding error of a few ulps of the frequency dtype, so the
    absolute error of cos/sin grows with the largest angle: ``16 * eps * (1 + max_angle)``.
    float64 at start_frame 4096: ~1.5e-11; float32: ~8e-3 (float32 positions past 4096 are
    only good to ~5e-4 rad by themselves).
    """
    eps = torch.finfo(spec.torch_dtype).eps
    max_angle = max(
        (size - 1 + (spec.start_frame if axis == 0 else 0)) * scale
        for axis, (size, scale) in enumerate(zip(spec.grid, spec.interpolation_factor))  # type: ignore[arg-type]
    )
    return 16 * eps * (1 + max_angle)
