"""One incremental forward of the MTP model over a KV cache: new tokens in, every used head's logits out.

The model's own submodules run in the order training runs them (embedding,
trunk layers, heads, shared unembedding); only the rotary angles differ in
form: each token gets the angle of its own sequence's position ([s, b, 1,
hn] instead of one [s, 1, 1, hn] table for the batch), because sequences
in a batch sit at different lengths once they accept different numbers of
drafts. The attention layers read and extend the caches attached by
`kv_cache.kv_cached`.
"""

from itertools import islice

import torch

from pretrain.inference.kv_cache import CacheState


def cached_logits(
    model, state: CacheState, tokens: torch.Tensor, n_heads: int, only: torch.Tensor | None = None
) -> torch.Tensor:
    """tokens [b, s] placed after each sequence's cached ones -> logits [b, s, n_heads, vocab].

    Only heads 1..n_heads run: heads not used for drafting cost nothing and
    need no cache. With `only` ([b] indices into s) the vocabulary
    projection runs at that one position per sequence and the result is
    [b, 1, n_heads, vocab]: a prefill needs the last prompt token's logits,
    and a full [b, s, vocab] logits tensor of a long prompt can be larger
    than the model. `only` [b, P] picks P positions per sequence (the
    acceptance evaluation drafts at many) and gives [b, P, n_heads, vocab]. Every position still goes through every used head, to
    fill the heads' caches. Sequential heads get head k-1's greedy guess as
    token t+k-1, as `MTPModel.head_logits` drafts.
    """
    rotary = state.begin(tokens.shape[1])  # [s, b, 1, hn]
    hidden = model.embedding(tokens.t())  # [s, b, d]
    for layer in model.layers:
        hidden, _ = layer(hidden, attention_mask=None, rotary_pos_emb=rotary)  # [s, b, d]

    def tokens_for(_i: int, head_hidden: torch.Tensor) -> torch.Tensor:
        return model.unembedding(head_hidden).argmax(dim=-1)  # [s, b]

    if only is not None and only.dim() == 1:
        only = only[:, None]  # [b, 1]
    rows = None if only is None else torch.arange(tokens.shape[0], device=tokens.device)[None]  # [1, b]
    logits = []
    heads = model.heads.hidden_states(hidden, rotary, model.embedding, tokens_for)
    for head_hidden in islice(heads, n_heads):  # [s, b, d]
        wanted = head_hidden if only is None else head_hidden[only.t(), rows]  # [s or P, b, d]
        logits.append(model.unembedding(wanted))  # [s or P, b, vocab]
    return torch.stack(logits, dim=2).transpose(0, 1)  # [b, s or P, n_heads, vocab]
