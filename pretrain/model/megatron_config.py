"""Translate our `ModelConfig` into megatron-core's `TransformerConfig`.

One place decides every megatron switch, so the trunk and the heads are built
from the same settings: Llama-style (RMSNorm, SwiGLU, no biases, no dropout),
parameters allocated where the runtime says (on the CPU, or straight on the
GPU) in the run's dtype, and every fusion that needs Transformer Engine,
apex or CUDA turned off (megatron falls back to torch).

megatron's initialisation methods are replaced by `_leave_for_init`: the
weights are drawn afterwards from layout-independent logical tensors
(`pretrain.model.init`). megatron still runs its initialisation path,
because that is where it marks each weight's tensor-parallel split.
"""

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from pretrain.model.config import ModelConfig


def residual_depth(cfg: ModelConfig) -> int:
    """Transformer layers on the deepest path from the embedding to a loss.

    megatron scales output projections by 1/sqrt(2 * num_layers) so the
    residual stream's variance stays put with depth; the depth that matters
    is the longest chain of residual additions a token goes through.
    """
    head_depth = {"transformer": 1, "linear": 0, "sequential": cfg.n_future}[cfg.head_type]
    return cfg.trunk_layers + head_depth


def _leave_for_init(tensor: torch.Tensor) -> None:
    """megatron's init hook, doing nothing: `pretrain.model.init` fills the weights once built."""


def transformer_config(cfg: ModelConfig, tp: int, params_dtype: torch.dtype, on_gpu: bool = False,
                       sequence_parallel: bool = False) -> TransformerConfig:
    """The megatron config every TransformerLayer of the model is built from.

    `on_gpu`: allocate weights on the current CUDA device (the runtime set
    it) rather than on the CPU. `sequence_parallel`: megatron's sequence
    parallelism (activations [s / tp, b, d] between the tensor-parallel
    matmuls, which all-gather their input and reduce-scatter their output).
    """
    return TransformerConfig(
        num_layers=max(1, residual_depth(cfg)),
        hidden_size=cfg.d_model,
        num_attention_heads=cfg.n_heads,
        num_query_groups=cfg.kv_heads,
        ffn_hidden_size=cfg.ffn_size,
        tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_eps,
        gated_linear_unit=True,  # SwiGLU: fc1 holds gate and up projections
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_std,
        init_method=_leave_for_init,
        output_layer_init_method=_leave_for_init,
        embedding_init_method=_leave_for_init,
        perform_initialization=True,
        use_cpu_initialization=not on_gpu,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
    )
