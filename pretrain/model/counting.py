"""Parameter counts of a built model and training FLOPs per token of a config.

`param_counts` reports whole-model numbers even under tensor parallelism
(megatron marks split weights with `tensor_model_parallel`), so every rank
logs the same size. `flops_per_token` is the model-FLOPs numerator of MFU.
"""

from pretrain.model.config import ModelConfig


def _global_numel(module) -> int:
    from megatron.core import parallel_state  # here: `mtp plan` counts FLOPs without torch

    tp = parallel_state.get_tensor_model_parallel_world_size()
    return sum(p.numel() * (tp if getattr(p, "tensor_model_parallel", False) else 1) for p in module.parameters())


def param_counts(model) -> dict[str, int]:
    """Parameters by part: embedding, trunk, heads, unembedding (final norm + output), total.

    The vocabulary parts count the padded vocabulary, as stored.
    """
    counts = {
        "embedding": _global_numel(model.embedding),
        "trunk": _global_numel(model.layers),
        "heads": _global_numel(model.heads),
        "unembedding": _global_numel(model.unembedding),
    }
    counts["total"] = sum(counts.values())
    return counts


def _layer_matmul_params(cfg: ModelConfig) -> int:
    """Weights of one decoder layer's matmuls: Q, K, V, output, SwiGLU (gate, up, down)."""
    head_dim = cfg.d_model // cfg.n_heads
    attention = cfg.d_model * head_dim * (2 * cfg.n_heads + 2 * cfg.kv_heads)
    return attention + 3 * cfg.d_model * cfg.ffn_size


def _head_matmul_params(cfg: ModelConfig) -> int:
    d = cfg.d_model
    if cfg.head_type == "transformer":
        return cfg.n_future * _layer_matmul_params(cfg)
    if cfg.head_type == "linear":
        return cfg.n_future * d * d
    return cfg.n_future * _layer_matmul_params(cfg) + (cfg.n_future - 1) * 2 * d * d


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token: 6 N + 12 L d s.

    N counts the matmul weights a token passes through: trunk, every head,
    and the unembedding once per head (each head's output is unembedded).
    The unembedding counts the real vocabulary, not the padding. The
    attention term is PaLM's (no causal halving, as nanoGPT's MFU estimate)
    over the L layers that attend: trunk plus transformer/sequential heads.
    Norms, softmax and the embedding lookup are left out.
    """
    if cfg.vocab_size is None:
        raise ValueError("flops_per_token needs cfg.vocab_size")
    matmul = (
        cfg.trunk_layers * _layer_matmul_params(cfg)
        + _head_matmul_params(cfg)
        + cfg.n_future * cfg.vocab_size * cfg.d_model
    )
    attending = cfg.trunk_layers + (0 if cfg.head_type == "linear" else cfg.n_future)
    return 6.0 * matmul + 12.0 * attending * cfg.d_model * seq_len
