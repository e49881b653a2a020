"""The n output heads: each turns the trunk output z into the hidden state of one future token.

Every head type exposes the same generator, `hidden_states(z, ...)`, yielding
head 1's hidden state, then head 2's, ... ([s, b, d] each). The loss
schedule pulls them one at a time, so a head's activations can be freed
before the next head runs. `chained` says whether head k's output feeds head
k+1 (then the graph of earlier heads must be kept until the last head is done).

Head i (0-based) predicts token t+i+1.
"""

from collections.abc import Callable, Iterator

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from pretrain.model.config import ModelConfig
from pretrain.model.layers import ParallelProjection, build_layer, rms_norm

# (i, hidden state of head i [s, b, d]) -> ids [s, b] of token t+i+1, the one head i predicts.
TokensFor = Callable[[int, torch.Tensor], torch.Tensor]
Embed = Callable[[torch.Tensor], torch.Tensor]  # ids [s, b] -> [s, b, d]


class TransformerHeads(torch.nn.Module):
    """The paper's heads: n independent transformer layers, all reading z."""

    chained = False

    def __init__(self, tcfg: TransformerConfig, n_future: int, first_layer_number: int):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            build_layer(tcfg, first_layer_number + i) for i in range(n_future)
        )

    def hidden_states(
        self, z: torch.Tensor, rotary_pos_emb: torch.Tensor, embed: Embed, tokens_for: TokensFor
    ) -> Iterator[torch.Tensor]:
        for layer in self.layers:
            hidden, _ = layer(z, attention_mask=None, rotary_pos_emb=rotary_pos_emb)
            yield hidden  # [s, b, d]


class LinearHeads(torch.nn.Module):
    """The paper's linear ablation: head i is one d x d matrix applied to z.

    Head 1 is a linear map too (not the identity), so every head has the
    same form and an n=1 linear model is the trunk plus one linear layer.
    """

    chained = False

    def __init__(self, tcfg: TransformerConfig, n_future: int):
        super().__init__()
        d = tcfg.hidden_size
        self.projections = torch.nn.ModuleList(ParallelProjection(tcfg, d, d) for _ in range(n_future))

    def hidden_states(
        self, z: torch.Tensor, rotary_pos_emb: torch.Tensor, embed: Embed, tokens_for: TokensFor
    ) -> Iterator[torch.Tensor]:
        for projection in self.projections:
            yield projection(z)  # [s, b, d]


class SequentialHeads(torch.nn.Module):
    """DeepSeek-V3 style chained modules.

    Module 1 is a transformer layer on z. Module k >= 2 reads
    [RMSNorm(h_{k-1}); RMSNorm(embedding of token t+k-1)], projects 2d -> d
    and runs a transformer layer. Token t+k-1 is what head k-1 predicts: its
    label in training, its greedy guess when drafting. The embedding is the
    trunk's (shared, as in DeepSeek-V3), passed in as `embed`.
    """

    chained = True

    def __init__(self, tcfg: TransformerConfig, n_future: int, first_layer_number: int):
        super().__init__()
        d = tcfg.hidden_size
        self.layers = torch.nn.ModuleList(
            build_layer(tcfg, first_layer_number + i) for i in range(n_future)
        )
        self.hidden_norms = torch.nn.ModuleList(rms_norm(tcfg) for _ in range(n_future - 1))
        self.embed_norms = torch.nn.ModuleList(rms_norm(tcfg) for _ in range(n_future - 1))
        self.projections = torch.nn.ModuleList(
            ParallelProjection(tcfg, 2 * d, d) for _ in range(n_future - 1)
        )

    def hidden_states(
        self, z: torch.Tensor, rotary_pos_emb: torch.Tensor, embed: Embed, tokens_for: TokensFor
    ) -> Iterator[torch.Tensor]:
        hidden, _ = self.layers[0](z, attention_mask=None, rotary_pos_emb=rotary_pos_emb)
        yield hidden  # [s, b, d]
        for i in range(1, len(self.layers)):
            previous = self.hidden_norms[i - 1](hidden)  # [s, b, d]
            token_embedding = self.embed_norms[i - 1](embed(tokens_for(i - 1, hidden)))  # [s, b, d]
            mixed = self.projections[i - 1](torch.cat([previous, token_embedding], dim=-1))  # [s, b, d]
            hidden, _ = self.layers[i](mixed, attention_mask=None, rotary_pos_emb=rotary_pos_emb)
            yield hidden  # [s, b, d]


def build_heads(cfg: ModelConfig, tcfg: TransformerConfig) -> torch.nn.Module:
    """The head stack `cfg.head_type` names; its layers are numbered after the trunk's."""
    first = cfg.trunk_layers + 1
    if cfg.head_type == "transformer":
        return TransformerHeads(tcfg, cfg.n_future, first)
    if cfg.head_type == "linear":
        return LinearHeads(tcfg, cfg.n_future)
    return SequentialHeads(tcfg, cfg.n_future, first)
