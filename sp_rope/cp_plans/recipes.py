"""Tiny seeded configurations of diffusers' context-parallel models, and where each consumes its RoPE.

A recipe builds one model small enough for CPU (a layer or two, 4 heads, a grid of 16 tokens) and its
inputs, sized so that 2 or 4 ranks divide every sequence the model's ``_cp_plan`` splits and Ulysses
attention divides the heads. A probe names an attention module that receives the rotary embedding,
the argument carrying it, and the arguments carrying the tokens it rotates, in the order the rotary
embedding's rows follow them (text before image for the joint Flux blocks).

The numbers in the configurations are arbitrary small values, not taken from any checkpoint.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

SEED = 20260521
HEADS = 4  # Ulysses splits heads over the ranks: 4 heads serve 2 or 4 ranks
SUPPORTED_NPROC = (2, 4)


@dataclass(frozen=True)
class Stream:
    """An argument of the attention module holding tokens the rotary embedding rotates."""

    arg: str
    grid: tuple[int, ...] | None = None  # (t, h, w) of the stream's tokens, to name a bad token


@dataclass(frozen=True)
class RopeProbe:
    module: str  # attention module consuming the rotary embedding, e.g. "blocks.0.attn1"
    rope_arg: str  # its argument carrying the rotary embedding
    streams: tuple[Stream, ...]  # the tokens the rows rotate, in row order
    items: tuple[int, ...] | None  # entries of a tuple-valued rope argument to check; None: one tensor
    token_dim: int  # the token dimension of each checked rope tensor

    @property
    def label(self) -> str:
        return f"{self.module}({self.rope_arg})"


@dataclass(frozen=True)
class Recipe:
    name: str  # what --models and the table call it
    class_name: str  # the diffusers class
    config: dict[str, Any]
    inputs: Callable[[torch.Generator], dict[str, Any]]
    probes: tuple[RopeProbe, ...]
    covers: str = ""  # what the tiny case exercises, for the table's notes
    extra: dict[str, Any] = field(default_factory=dict)


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


# --- Wan and ChronoEdit: the rope module's output is split on dim 1, hidden states at blocks.0 ----------

_WAN_CONFIG = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": HEADS,
    "attention_head_dim": 12,
    "in_channels": 4,
    "out_channels": 4,
    "text_dim": 16,
    "freq_dim": 32,
    "ffn_dim": 32,
    "num_layers": 2,
    "rope_max_seq_len": 32,
}


def _wan_inputs(gen: torch.Generator) -> dict[str, Any]:
    return {
        "hidden_states": _randn(gen, 1, 4, 4, 4, 4),  # 4 frames of 4x4 latents -> 4x2x2 tokens
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": _randn(gen, 1, 6, 16),
    }


def _wan_ti2v_inputs(gen: torch.Generator) -> dict[str, Any]:
    inputs = _wan_inputs(gen)
    # Wan 2.2 TI2V: one timestep per token; the plan splits it at the model's input on dim 1.
    inputs["timestep"] = torch.arange(16).unsqueeze(0) * 50 + 100
    return inputs


def _chronoedit_inputs(gen: torch.Generator) -> dict[str, Any]:
    return {
        "hidden_states": _randn(gen, 1, 4, 2, 4, 8),  # 2 frames: ChronoEdit's temporal-skip rope path
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": _randn(gen, 1, 6, 16),
    }


def _video_probe(module: str, rope_arg: str, grid: tuple[int, ...], items: tuple[int, ...] | None, dim: int):
    return RopeProbe(module, rope_arg, (Stream("hidden_states", grid),), items, dim)


# --- Flux and Flux2: position ids split at the model's input, RoPE computed from the shards ------------

_FLUX_CONFIG = {
    "patch_size": 1,
    "in_channels": 8,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": HEADS,
    "joint_attention_dim": 16,
    "pooled_projection_dim": 8,
    "axes_dims_rope": (4, 6, 6),
}


def _image_ids(height: int, width: int, axes: int) -> torch.Tensor:
    h, w = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    ids = torch.zeros(height * width, axes)
    ids[:, 1], ids[:, 2] = h.flatten().float(), w.flatten().float()
    return ids


def _flux_inputs(gen: torch.Generator) -> dict[str, Any]:
    return {
        "hidden_states": _randn(gen, 1, 16, 8),
        "encoder_hidden_states": _randn(gen, 1, 8, 16),
        "pooled_projections": _randn(gen, 1, 8),
        "timestep": torch.tensor([0.5]),
        "img_ids": _image_ids(4, 4, 3),  # (0, h, w), as the Flux pipeline builds them
        "txt_ids": torch.zeros(8, 3),
    }


def _joint_probes(single_module: str, double_module: str, grid: tuple[int, ...]) -> tuple[RopeProbe, ...]:
    return (
        # The double-stream attention concatenates text before image; the rope's rows follow that order.
        RopeProbe(
            double_module,
            "image_rotary_emb",
            (Stream("encoder_hidden_states"), Stream("hidden_states", grid)),
            (0, 1),
            0,
        ),
        # The single-stream block's input already is the joint [text, image] sequence.
        RopeProbe(single_module, "image_rotary_emb", (Stream("hidden_states"),), (0, 1), 0),
    )


_FLUX2_CONFIG = {
    "patch_size": 1,
    "in_channels": 8,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": HEADS,
    "joint_attention_dim": 16,
    "timestep_guidance_channels": 16,
    "mlp_ratio": 2.0,
    "axes_dims_rope": (4, 4, 4, 4),
    "guidance_embeds": False,
}


def _flux2_inputs(gen: torch.Generator) -> dict[str, Any]:
    txt_ids = torch.zeros(8, 4)
    txt_ids[:, 3] = torch.arange(8).float()  # text positions on the last axis
    return {
        "hidden_states": _randn(gen, 1, 16, 8),
        "encoder_hidden_states": _randn(gen, 1, 8, 16),
        "timestep": torch.tensor([0.5]),
        "img_ids": _image_ids(4, 4, 4).unsqueeze(0),  # batched (B, S, 4), as the Flux2 pipeline passes them
        "txt_ids": txt_ids.unsqueeze(0),
    }


# --- QwenImage: the RoPE module's (image, text) outputs split on dim 0 ---------------------------------

_QWEN_CONFIG = {
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 4,
    "num_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": HEADS,
    "joint_attention_dim": 16,
    "axes_dims_rope": (4, 6, 6),
}


def _qwen_inputs(gen: torch.Generator) -> dict[str, Any]:
    mask = torch.ones(1, 8, dtype=torch.long)
    mask[0, -1] = 0  # one padded text token: exercises the joint mask under Ulysses
    return {
        "hidden_states": _randn(gen, 1, 16, 16),
        "encoder_hidden_states": _randn(gen, 1, 8, 16),
        "encoder_hidden_states_mask": mask,
        "timestep": torch.tensor([0.5]),
        "img_shapes": [[(1, 4, 4)]],
    }


# --- LTX and LTX2: hidden states split at the model's input, the rope module's outputs on dim 1 ----------

_LTX_CONFIG = {
    "in_channels": 8,
    "out_channels": 8,
    "num_attention_heads": HEADS,
    "attention_head_dim": 8,
    "cross_attention_dim": 32,
    "num_layers": 1,
    "caption_channels": 16,
}


def _ltx_inputs(gen: torch.Generator) -> dict[str, Any]:
    mask = torch.ones(1, 8, dtype=torch.long)
    mask[0, -2:] = 0
    return {
        "hidden_states": _randn(gen, 1, 16, 8),  # 4 frames of 2x2 latents
        "encoder_hidden_states": _randn(gen, 1, 8, 16),
        "timestep": torch.tensor([500]),
        "encoder_attention_mask": mask,
        "num_frames": 4,
        "height": 2,
        "width": 2,
        "rope_interpolation_scale": (8 / 25, 32, 32),
    }


InputBuilder = Callable[[torch.Generator], dict[str, Any]]


def _without_text_masks(inputs: InputBuilder) -> InputBuilder:
    def build(gen: torch.Generator) -> dict[str, Any]:
        return {k: None if k.endswith("encoder_attention_mask") else v for k, v in inputs(gen).items()}

    return build


_LTX2_CONFIG = {
    "in_channels": 8,
    "out_channels": 8,
    "num_attention_heads": HEADS,
    "attention_head_dim": 8,
    "cross_attention_dim": 32,
    "audio_in_channels": 8,
    "audio_out_channels": 8,
    "audio_num_attention_heads": HEADS,
    "audio_attention_head_dim": 8,
    "audio_cross_attention_dim": 32,
    "num_layers": 1,
    "caption_channels": 16,
}


_LTX2_PROBES = (
    _video_probe("transformer_blocks.0.attn1", "query_rotary_emb", (4, 2, 2), (0, 1), 1),
    # Audio-to-video cross attention: video queries rotated by the cross-attention rope.
    _video_probe("transformer_blocks.0.audio_to_video_attn", "query_rotary_emb", (4, 2, 2), (0, 1), 1),
    # Video-to-audio cross attention: video keys rotated by the same rope.
    RopeProbe(
        "transformer_blocks.0.video_to_audio_attn",
        "key_rotary_emb",
        (Stream("encoder_hidden_states", (4, 2, 2)),),
        (0, 1),
        1,
    ),
)


# rope_type="split" (the LTX-2.0 and 2.3 checkpoints' setting): (B, heads, S, D/2) tables, tokens on dim 2.
_LTX2_SPLIT_PROBES = (
    _video_probe("transformer_blocks.0.attn1", "query_rotary_emb", (4, 2, 2), (0, 1), 2),
    _video_probe("transformer_blocks.0.audio_to_video_attn", "query_rotary_emb", (4, 2, 2), (0, 1), 2),
    RopeProbe(
        "transformer_blocks.0.video_to_audio_attn",
        "key_rotary_emb",
        (Stream("encoder_hidden_states", (4, 2, 2)),),
        (0, 1),
        2,
    ),
)


def _ltx2_inputs(gen: torch.Generator) -> dict[str, Any]:
    return {
        "hidden_states": _randn(gen, 1, 16, 8),
        "audio_hidden_states": _randn(gen, 1, 8, 8),
        "encoder_hidden_states": _randn(gen, 1, 8, 16),
        "audio_encoder_hidden_states": _randn(gen, 1, 8, 16),
        "timestep": torch.tensor([500.0]),  # one per batch element, as the LTX2 pipeline passes it
        "encoder_attention_mask": torch.ones(1, 8, dtype=torch.long),
        "audio_encoder_attention_mask": torch.ones(1, 8, dtype=torch.long),
        "num_frames": 4,
        "height": 2,
        "width": 2,
        "audio_num_frames": 8,
    }


# --- Helios: hidden states and the rotary embedding split at every attn1's input -------------------------

_HELIOS_CONFIG = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": HEADS,
    "attention_head_dim": 12,
    "in_channels": 4,
    "out_channels": 4,
    "text_dim": 16,
    "freq_dim": 32,
    "ffn_dim": 32,
    # Helios' _cp_plan names blocks.0 .. blocks.39 one by one: fewer layers and enable_parallelism
    # cannot find the submodules it names, so the tiny model keeps the 40 layers (of width 48).
    "num_layers": 40,
    "rope_dim": (4, 4, 4),
}


# --- MiniMax-H3: one packed text/video/audio sequence; rope split on dim 0, hidden states at block 0 --

_MINIMAX_CONFIG = {
    "num_attention_heads": HEADS,
    "attention_head_dim": 16,
    "hidden_size": 64,
    "num_layers": 1,
    "num_refiner_layers": 1,
    "ffn_dim": 32,
    "in_channels": 2,
    "audio_in_channels": 4,
    "patch_size": (1, 2, 2),
    "text_dim": 16,
    "freq_dim": 32,
    "time_embed_hidden_dim": 32,
    "time_embed_dim": 16,
    "rope_freq_dim": 2,
}


def _minimax_inputs(gen: torch.Generator) -> dict[str, Any]:
    # Packed sequence of 16 rows: 4 text, 8 video (2x2x2), 4 audio.
    t, h, w = torch.meshgrid(torch.arange(2), torch.arange(2), torch.arange(2), indexing="ij")
    video_pos = torch.stack([t.flatten() + 1, h.flatten(), w.flatten()], dim=-1)
    zeros = torch.zeros(4, dtype=torch.long)
    text_pos = torch.stack([zeros, torch.arange(4), torch.arange(4)], dim=-1)
    audio_pos = torch.stack([torch.arange(4) + 1, zeros, zeros], dim=-1)
    return {
        "hidden_states": _randn(gen, 1, 8, 8),
        "audio_hidden_states": _randn(gen, 1, 4, 4),
        "encoder_hidden_states": _randn(gen, 1, 4, 16),
        "timestep": torch.tensor([0.7]),
        "timestep_indices": torch.zeros(16, dtype=torch.long),
        "token_tags": torch.tensor([1] * 4 + [0] * 8 + [2] * 4),
        "position_ids": torch.cat([text_pos, video_pos, audio_pos]),
        "video_indices": torch.arange(4, 12),
        "audio_indices": torch.arange(12, 16),
        "text_indices": torch.arange(0, 4),
    }


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "Wan",
            "WanTransformer3DModel",
            _WAN_CONFIG,
            _wan_inputs,
            (_video_probe("blocks.0.attn1", "rotary_emb", (4, 2, 2), (0, 1), 1),),
            "T2V, one timestep",
        ),
        Recipe(
            "Wan-TI2V",
            "WanTransformer3DModel",
            _WAN_CONFIG,
            _wan_ti2v_inputs,
            (_video_probe("blocks.0.attn1", "rotary_emb", (4, 2, 2), (0, 1), 1),),
            "Wan 2.2 TI2V: a timestep per token",
        ),
        Recipe(
            "ChronoEdit",
            "ChronoEditTransformer3DModel",
            {**_WAN_CONFIG, "rope_temporal_skip_len": 8},
            _chronoedit_inputs,
            (_video_probe("blocks.0.attn1", "rotary_emb", (2, 2, 4), (0, 1), 1),),
            "2 frames (temporal-skip rope)",
        ),
        Recipe(
            "Flux",
            "FluxTransformer2DModel",
            _FLUX_CONFIG,
            _flux_inputs,
            _joint_probes("single_transformer_blocks.0.attn", "transformer_blocks.0.attn", (1, 4, 4)),
            "double + single stream",
        ),
        Recipe(
            "Flux2",
            "Flux2Transformer2DModel",
            _FLUX2_CONFIG,
            _flux2_inputs,
            _joint_probes("single_transformer_blocks.0.attn", "transformer_blocks.0.attn", (1, 4, 4)),
            "double + single stream",
        ),
        Recipe(
            "QwenImage",
            "QwenImageTransformer2DModel",
            _QWEN_CONFIG,
            _qwen_inputs,
            (
                RopeProbe(
                    "transformer_blocks.0.attn", "image_rotary_emb", (Stream("hidden_states", (1, 4, 4)),), (0,), 0
                ),
                RopeProbe("transformer_blocks.0.attn", "image_rotary_emb", (Stream("encoder_hidden_states"),), (1,), 0),
            ),
            "image + text rope, padded text mask",
        ),
        Recipe(
            "LTX",
            "LTXVideoTransformer3DModel",
            _LTX_CONFIG,
            _ltx_inputs,
            (_video_probe("transformer_blocks.0.attn1", "image_rotary_emb", (4, 2, 2), (0, 1), 1),),
            "text mask, as the LTX pipeline passes it",
        ),
        Recipe(
            "LTX-nomask",
            "LTXVideoTransformer3DModel",
            _LTX_CONFIG,
            _without_text_masks(_ltx_inputs),
            (_video_probe("transformer_blocks.0.attn1", "image_rotary_emb", (4, 2, 2), (0, 1), 1),),
            "no text mask",
        ),
        Recipe(
            "LTX2",
            "LTX2VideoTransformer3DModel",
            _LTX2_CONFIG,
            _ltx2_inputs,
            _LTX2_PROBES,
            "video + audio, text masks as the LTX2 pipeline passes them",
        ),
        Recipe(
            "LTX2-nomask",
            "LTX2VideoTransformer3DModel",
            _LTX2_CONFIG,
            _without_text_masks(_ltx2_inputs),
            _LTX2_PROBES,
            "video + audio, no text masks",
        ),
        Recipe(
            "LTX2-split",
            "LTX2VideoTransformer3DModel",
            {**_LTX2_CONFIG, "rope_type": "split"},
            _without_text_masks(_ltx2_inputs),
            _LTX2_SPLIT_PROBES,
            'rope_type="split" (as the LTX-2 checkpoints), no text masks',
        ),
        Recipe(
            "Helios",
            "HeliosTransformer3DModel",
            _HELIOS_CONFIG,
            _wan_inputs,
            (_video_probe("blocks.0.attn1", "rotary_emb", (4, 2, 2), None, 1),),
            "40 layers (the plan names each)",
        ),
        Recipe(
            "MiniMaxH3",
            "MiniMaxH3Transformer3DModel",
            _MINIMAX_CONFIG,
            _minimax_inputs,
            (RopeProbe("transformer_blocks.0.attn", "rotary_emb", (Stream("hidden_states"),), (0, 1), 0),),
            "packed text/video/audio",
        ),
    )
}


# --- Planted wrong splits: a deep copy of one model's plan with a known bug, set on the instance -----


def _rope_input_split(plan: dict[str, Any]) -> dict[str, Any]:
    """Split the rope module's input latents on the frame dim instead of its output on the token dim:
    every rank then computes the positions of the first frames, shaped exactly like its real rows."""
    from diffusers.models._modeling_parallel import ContextParallelInput

    plan["rope"] = {"hidden_states": ContextParallelInput(split_dim=2, expected_dims=5)}
    return plan


def _rope_joint_split(plan: dict[str, Any]) -> dict[str, Any]:
    """Split the joint [text, image] rope evenly instead of splitting the text and image ids each:
    rank r gets chunk r of the concatenation, the same number of rows as its tokens but other tokens'."""
    from diffusers.models._modeling_parallel import ContextParallelInput

    del plan[""]["img_ids"], plan[""]["txt_ids"]
    row = ContextParallelInput(split_dim=0, expected_dims=2, split_output=True)
    plan["pos_embed"] = {0: row, 1: row}
    return plan


PLANTS: dict[str, tuple[tuple[str, ...], Callable[[dict[str, Any]], dict[str, Any]]]] = {
    # kind: (recipes it applies to, plan edit)
    "rope-input": (("Wan", "Wan-TI2V", "ChronoEdit"), _rope_input_split),
    "rope-joint": (("Flux",), _rope_joint_split),
}


def planted_plan(plan: dict[str, Any], kind: str) -> dict[str, Any]:
    """A deep copy of ``plan`` with the planted bug ``kind`` (the class's own plan is never touched)."""
    return PLANTS[kind][1](copy.deepcopy(plan))
