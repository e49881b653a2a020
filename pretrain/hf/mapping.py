"""Tensor names and layouts between an MTPModel's logical state and a Hugging Face Llama.

A logical state is `{MTPModel parameter name: whole tensor}` (no
tensor-parallel split, vocabulary rows = the tokenizer's ids), as
`parallel.reshard.full_model_state` gives it. The conventions that differ
from Hugging Face's:

- megatron fuses Q, K and V into one `linear_qkv` whose rows are interleaved
  per query group: for each of the `kv_heads` groups, its `heads / kv_heads`
  query heads, then its key head, then its value head (`hn` rows each);
- `linear_fc1` stacks the SwiGLU gate projection above the up projection;
- rotary positions rotate halves (megatron's `_rotate_half`, HF's
  `rotate_half`), so Q and K rows need no permutation.

Depths come from `ModelConfig.trunk_layers` and `n_future` only: Llama layer
i < trunk_layers is trunk layer i, Llama layer trunk_layers is head 1, and
heads 2..n go to `extra_heads.{k-2}.*` with the same decoder-layer names.
"""

from collections.abc import Callable

import torch

from pretrain.model.config import ModelConfig

EMBED, NORM, OUTPUT = "embedding.embed.weight", "unembedding.norm.weight", "unembedding.output.weight"
HF_EMBED, HF_NORM, HF_OUTPUT = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
QKV, FC1 = "self_attention.linear_qkv.weight", "mlp.linear_fc1.weight"
HF_Q, HF_K, HF_V = "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"
HF_GATE, HF_UP = "mlp.gate_proj.weight", "mlp.up_proj.weight"
# Decoder-layer tensors that are the same matrix under both names.
SAME_IN_LAYER = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
EXTRA = "extra_heads"  # prefix of heads 2..n in extra_heads.safetensors


def split_qkv(qkv: torch.Tensor, heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron's fused [kv_heads * (heads/kv_heads + 2) * hn, d] -> q [heads * hn, d], k, v [kv_heads * hn, d]."""
    per_group = heads // kv_heads
    d = qkv.shape[1]
    grouped = qkv.view(kv_heads, per_group + 2, -1, d)  # [ng, np/ng + 2, hn, d]
    q = grouped[:, :per_group].reshape(-1, d)  # [np * hn, d], query head g * np/ng + j
    return q, grouped[:, per_group].reshape(-1, d), grouped[:, per_group + 1].reshape(-1, d)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """The inverse of `split_qkv`."""
    per_group = heads // kv_heads
    d = q.shape[1]
    groups = [q.view(kv_heads, per_group, -1, d), k.view(kv_heads, 1, -1, d), v.view(kv_heads, 1, -1, d)]
    return torch.cat(groups, dim=1).reshape(-1, d)  # [ng * (np/ng + 2) * hn, d]


def layer_to_hf(get: Callable[[str], torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """One decoder layer, our suffixes (read through `get`) -> HF suffixes."""
    out = {hf: get(ours) for ours, hf in SAME_IN_LAYER.items()}
    out[HF_Q], out[HF_K], out[HF_V] = split_qkv(get(QKV), cfg.n_heads, cfg.kv_heads)
    out[HF_GATE], out[HF_UP] = get(FC1).chunk(2, dim=0)  # [ffn, d] each
    return out


def layer_from_hf(get: Callable[[str], torch.Tensor], cfg: ModelConfig) -> dict[str, Callable[[], torch.Tensor]]:
    """One decoder layer, HF suffixes (read through `get`) -> our suffixes, each a thunk (read when asked)."""
    out: dict[str, Callable[[], torch.Tensor]] = {ours: (lambda hf=hf: get(hf)) for ours, hf in SAME_IN_LAYER.items()}
    out[QKV] = lambda: fuse_qkv(get(HF_Q), get(HF_K), get(HF_V), cfg.n_heads, cfg.kv_heads)
    out[FC1] = lambda: torch.cat([get(HF_GATE), get(HF_UP)], dim=0)  # [2 ffn, d]
    return out


def llama_layer_prefixes(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(our prefix, HF prefix) of every decoder layer of the Llama: the trunk, then head 1."""
    trunk = [(f"layers.{i}.", f"model.layers.{i}.") for i in range(cfg.trunk_layers)]
    return [*trunk, ("heads.layers.0.", f"model.layers.{cfg.trunk_layers}.")]


def extra_head_names(cfg: ModelConfig, k: int) -> tuple[str, str, dict[str, str]]:
    """Head k (2..n): (our layer prefix, HF prefix, {our name: HF name} of its other tensors)."""
    ours, hf = f"heads.layers.{k - 1}.", f"{EXTRA}.{k - 2}."
    others = {}
    if cfg.head_type == "sequential":  # module k >= 2 mixes h_{k-1} with the embedding of token t+k-1
        j = k - 2
        others = {f"heads.hidden_norms.{j}.weight": f"{hf}hidden_norm.weight",
                  f"heads.embed_norms.{j}.weight": f"{hf}embed_norm.weight",
                  f"heads.projections.{j}.linear.weight": f"{hf}proj.weight"}
    return ours, hf, others


def to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A logical state -> (the LlamaForCausalLM state dict, heads 2..n as `extra_heads.*`).

    Raises ValueError if `state` holds a tensor this mapping does not place,
    so no weight is ever dropped silently.
    """
    used: set[str] = set()

    def read(name: str) -> torch.Tensor:
        used.add(name)
        return state[name]

    llama = {HF_EMBED: read(EMBED), HF_NORM: read(NORM), HF_OUTPUT: read(OUTPUT)}
    for ours, hf in llama_layer_prefixes(cfg):
        llama.update({hf + k: v for k, v in layer_to_hf(lambda s, p=ours: read(p + s), cfg).items()})
    extra = {}
    for k in range(2, cfg.n_future + 1):
        ours, hf, others = extra_head_names(cfg, k)
        extra.update({hf + n: v for n, v in layer_to_hf(lambda s, p=ours: read(p + s), cfg).items()})
        extra.update({name: read(ours_name) for ours_name, name in others.items()})
    left = sorted(set(state) - used)
    if left:
        raise ValueError(f"tensors with no Hugging Face name: {left[:4]}")
    return llama, extra


def from_hf(read: Callable[[str], torch.Tensor], cfg: ModelConfig, vocab_size: int, extra_heads: str,
            untie: bool) -> dict[str, Callable[[], torch.Tensor]]:
    """Our name -> thunk building that whole fp32 tensor from a Llama checkpoint read through `read`.

    Heads 2..n are copies of the Llama's last layer when `extra_heads` is
    "last_layer" and absent (left to the model's own initialisation) when
    "random"; sequential heads' mixing norms and projections are always left
    to it. `untie`: the checkpoint has no lm_head, the unembedding starts as
    the embedding.
    """

    def whole(name: str) -> torch.Tensor:
        return read(name).float()

    plan: dict[str, Callable[[], torch.Tensor]] = {
        EMBED: lambda: whole(HF_EMBED)[:vocab_size],
        NORM: lambda: whole(HF_NORM),
        OUTPUT: lambda: whole(HF_EMBED if untie else HF_OUTPUT)[:vocab_size],
    }
    for ours, hf in llama_layer_prefixes(cfg):
        plan.update({ours + k: f for k, f in layer_from_hf(lambda s, p=hf: whole(p + s), cfg).items()})
    if extra_heads == "last_layer":
        last = llama_layer_prefixes(cfg)[-1][1]
        for k in range(2, cfg.n_future + 1):
            ours = extra_head_names(cfg, k)[0]
            plan.update({ours + n: f for n, f in layer_from_hf(lambda s: whole(last + s), cfg).items()})
    return plan
