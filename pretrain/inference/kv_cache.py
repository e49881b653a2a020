"""KV cache for incremental and speculative decoding, with rollback by pointer.

Every attention layer that decoding runs (the trunk's, and the heads' when
they are transformer layers) gets preallocated key and value buffers
[max_len, b, ng, hn]. One `CacheState` shared by all of them holds each
sequence's length, i.e. how many of its cached positions are valid. A forward
of `s` new tokens writes them at positions length .. length + s - 1 of their
own sequence; `commit(kept)` then advances every length by the tokens that
were kept. Rejected draft positions are simply left behind the pointer and
overwritten by the next forward: a rollback copies nothing.

Why this is correct: a query at position p attends keys 0 .. p only, and
every forward writes its own positions before attending, so a stale entry
beyond a sequence's length is always overwritten before anyone reads it.
Sequences have no padding in the cache: sequence i's token j sits at
position j, so ragged prompts in one batch need no position shifts.
"""

from contextlib import contextmanager

import torch

from pretrain.model.attention import SDPAttention


class CacheState:
    """Per-sequence lengths and the positions / mask of the forward in flight."""

    def __init__(self, batch: int, max_len: int, rotary_table: torch.Tensor):
        self.max_len = max_len
        self.device = rotary_table.device
        self.lengths = torch.zeros(batch, dtype=torch.long, device=self.device)  # [b] valid positions
        self.rotary_table = rotary_table[:, 0, 0, :]  # [max_len, hn] angles of every position
        self.positions: torch.Tensor | None = None  # [s, b] positions of the tokens in flight
        self.mask: torch.Tensor | None = None  # [b, 1, s, used]

    def begin(self, s: int) -> torch.Tensor:
        """Place `s` new tokens of every sequence after its valid ones; returns rotary [s, b, 1, hn]."""
        offsets = torch.arange(s, device=self.device)[:, None]  # [s, 1]
        self.positions = self.lengths[None, :] + offsets  # [s, b]
        used = int(self.positions.max()) + 1
        if used > self.max_len:
            raise RuntimeError(f"KV cache overflow: position {used - 1} >= max_len {self.max_len}")
        keys = torch.arange(used, device=self.device)  # [used]
        self.mask = (keys[None, None, :] <= self.positions.t()[:, :, None])[:, None]  # [b, 1, s, used]
        return self.rotary_table[self.positions][:, :, None, :]  # [s, b, 1, hn]

    def seek(self, lengths: torch.Tensor) -> None:
        """Set every sequence's valid length [b]: a rollback to any earlier position, by pointer only.

        Positions before the new length must hold what the caller wants
        attended; the next forward overwrites those from the length on.
        """
        self.lengths = lengths.to(device=self.device, dtype=torch.long).clone()
        self.positions = self.mask = None

    def commit(self, kept: torch.Tensor) -> None:
        """Keep the first `kept[i]` of sequence i's tokens in flight; the rest roll back."""
        self.lengths += kept.to(self.lengths.device)
        self.positions = self.mask = None


class LayerCache:
    """Keys and values of one attention layer, [max_len, b, ng, hn] each."""

    def __init__(self, state: CacheState, kv_heads: int, head_dim: int, dtype: torch.dtype):
        self.state = state
        shape = (state.max_len, len(state.lengths), kv_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=state.device)
        self.values = torch.zeros(shape, dtype=dtype, device=state.device)

    def extend(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store key/value [s, b, ng, hn] at the positions in flight; return every key, value and the mask."""
        positions = self.state.positions  # [s, b]
        batch = torch.arange(positions.shape[1], device=positions.device).expand_as(positions)  # [s, b]
        self.keys[positions, batch] = key.to(self.keys.dtype)
        self.values[positions, batch] = value.to(self.values.dtype)
        used = self.state.mask.shape[-1]
        return self.keys[:used], self.values[:used], self.state.mask  # [used, b, ng, hn] x2, [b, 1, s, used]


def attention_modules(model, n_heads: int) -> list[SDPAttention]:
    """The core attentions a decode with `n_heads` heads runs: the trunk's, then heads 1..n_heads'."""
    found = [m for layer in model.layers for m in layer.modules() if isinstance(m, SDPAttention)]
    head_layers = getattr(model.heads, "layers", [])  # linear heads have no attention
    for layer in list(head_layers)[:n_heads]:
        found += [m for m in layer.modules() if isinstance(m, SDPAttention)]
    return found


@contextmanager
def kv_cached(model, n_heads: int, batch: int, max_len: int):
    """Attach fresh caches to the attention layers decoding needs; yields the shared `CacheState`.

    The caches are detached again on exit, so the model trains and
    evaluates exactly as before.
    """
    cfg = model.cfg
    param = next(model.parameters())
    state = CacheState(batch, max_len, model.rotary(max_len, param.device))
    modules = attention_modules(model, n_heads)
    head_dim = cfg.d_model // cfg.n_heads
    for module in modules:
        module.kv_cache = LayerCache(state, cfg.kv_heads, head_dim, param.dtype)
    try:
        yield state
    finally:
        for module in modules:
            module.kv_cache = None
