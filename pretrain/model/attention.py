"""Core attention for megatron's `SelfAttention`, on torch SDPA.

megatron's `DotProductAttention` allocates through `torch.cuda` and its
fused softmax wants CUDA kernels; `torch.nn.functional.scaled_dot_product_attention`
runs everywhere and picks flash / memory-efficient kernels by itself on GPUs.
This module is the `core_attention` of our layer spec: megatron does the
QKV projection, rotary positions and output projection around it.

Keys may be longer than queries (`sk >= sq`): the causal mask is then
aligned to the end, query i sitting at absolute position `sk - sq + i`. That
is what a KV cache needs.

For incremental decoding `pretrain.inference` attaches a cache to the module
(`kv_cache`, None in training). The layer around it still does everything
else exactly as in training (norms, QKV projection, rotary positions of the
new tokens, output projection, MLP); this module only stores the new keys
and values in the cache and attends over the cached ones under the cache's
mask, which follows every sequence's own length. Keeping the cache here,
below megatron's `SelfAttention`, means the trunk and the transformer heads
get incremental decoding with no second copy of the layer's code.
"""

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


def causal_mask(sq: int, sk: int, device: torch.device) -> torch.Tensor:
    """[sq, sk] bool, True where query i (at position sk - sq + i) may attend key j."""
    return torch.ones(sq, sk, dtype=torch.bool, device=device).tril(diagonal=sk - sq)


class SDPAttention(MegatronModule):
    """Causal (grouped-query) attention: [sq, b, np, hn] queries -> [sq, b, np * hn].

    The constructor takes megatron's core-attention keyword arguments so it
    drops into a `SelfAttentionSubmodules` spec; the ones that only matter
    for megatron's own kernels (context parallelism, process groups) are
    accepted and unused.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"SDPAttention only implements causal attention, got {attn_mask_type}")
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale  # None: SDPA's 1/sqrt(hn)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.kv_cache = None  # a pretrain.inference.kv_cache.LayerCache while decoding

    def forward(
        self,
        query: torch.Tensor,  # [sq, b, np, hn]
        key: torch.Tensor,  # [sk, b, ng, hn]
        value: torch.Tensor,  # [sk, b, ng, hn]
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if attention_mask is not None or attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SDPAttention takes no explicit mask, bias or packed sequences: it is causal")
        sq, b, n_q, hn = query.shape
        if self.kv_cache is not None:
            key, value, mask = self.kv_cache.extend(key, value)  # [sk, b, ng, hn] x2, [b, 1, sq, sk]
        else:
            mask = None if sq == key.shape[0] else causal_mask(sq, key.shape[0], query.device)
        q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
        k = key.permute(1, 2, 0, 3)  # [b, ng, sk, hn]
        v = value.permute(1, 2, 0, 3)  # [b, ng, sk, hn]
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None,
            dropout_p=self.dropout_p if self.training else 0.0,
            scale=self.softmax_scale,
            enable_gqa=k.shape[1] != n_q,
        )  # [b, np, sq, hn]
        return out.permute(2, 0, 1, 3).reshape(sq, b, n_q * hn)  # [sq, b, np * hn]
