"""The two ends of the model that touch the vocabulary: token embedding and shared unembedding.

Both are vocab-parallel under tensor parallelism (each rank holds
padded_vocab / tp rows). The unembedding's weight shard is read directly by
the fused loss in training, so the full [tokens, vocab] logits never exist;
`Unembedding.forward` (whole logits) is only for evaluation and generation.
"""

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding
from megatron.core.transformer.transformer_config import TransformerConfig

from pretrain.model.layers import gather_last_dim, rms_norm


class TokenEmbedding(torch.nn.Module):
    """ids [s, b] -> vectors [s, b, d] through megatron's `VocabParallelEmbedding`.

    Under sequence parallelism the vocabulary shards' partial vectors are
    reduce-scattered along the sequence instead of all-reduced: [s / tp, b, d],
    this rank's positions, at half the all-reduce's traffic.
    """

    def __init__(self, tcfg: TransformerConfig, padded_vocab: int):
        super().__init__()
        self.sequence_parallel = tcfg.sequence_parallel
        self.embed = VocabParallelEmbedding(
            padded_vocab,
            tcfg.hidden_size,
            init_method=tcfg.init_method,
            config=tcfg,
            reduce_scatter_embeddings=tcfg.sequence_parallel,
            tp_group=parallel_state.get_tensor_model_parallel_group(),
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:  # megatron's reduce-scatter path reads [b, s] ids and returns [s / tp, b, d]
            return self.embed(ids.t())
        return self.embed(ids)  # [s, b, d]


class Unembedding(torch.nn.Module):
    """Final RMSNorm + vocabulary projection, shared by every head."""

    def __init__(self, tcfg: TransformerConfig, padded_vocab: int, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.norm = rms_norm(tcfg)
        self.output = ColumnParallelLinear(
            tcfg.hidden_size,
            padded_vocab,
            config=tcfg,
            init_method=tcfg.init_method,
            bias=False,
            gather_output=False,
            tp_group=parallel_state.get_tensor_model_parallel_group(),
        )

    @property
    def weight(self) -> torch.nn.Parameter:
        """This rank's shard of the projection, [padded_vocab / tp, d]."""
        return self.output.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Whole logits [..., vocab_size] of hidden states [..., d], on every rank."""
        logits, _ = self.output(self.norm(hidden))  # [..., padded_vocab / tp]
        return gather_last_dim(logits)[..., : self.vocab_size]  # [..., vocab_size]
