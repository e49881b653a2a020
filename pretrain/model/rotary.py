"""Rotary position angles in the layout megatron's `apply_rotary_pos_emb` expects.

megatron's `RotaryEmbedding` calls `torch.cuda` when built and when run, so
the angles are computed here and handed to every `TransformerLayer` as
`rotary_pos_emb`. Layout (non-interleaved, as megatron's `_rotate_half`):
the same half-size frequency table twice along the last dimension.
"""

import torch


def rotary_angles(
    seq_len: int,
    head_dim: int,
    theta: float,
    device: torch.device,
    offset: int = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """[seq_len, 1, 1, head_dim] angles for positions offset .. offset + seq_len - 1.

    `offset` places new tokens after earlier ones (incremental decoding).
    Angles stay in float32 even for bf16 models (megatron casts cos/sin to
    the activations' dtype itself); float64 models get float64 angles.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=dtype) / head_dim)
    positions = torch.arange(offset, offset + seq_len, device=device, dtype=dtype)
    freqs = torch.outer(positions, inv_freq)  # [s, head_dim / 2]
    return torch.cat([freqs, freqs], dim=-1)[:, None, None, :]  # [s, 1, 1, head_dim]
