"""A multi-token-prediction Llama for `transformers` (`trust_remote_code=True`): every head's logits.

Written by `mtp export --format hf` next to `config.json`, whose `auto_map`
names this file. Without `trust_remote_code` the directory loads as a plain
`LlamaForCausalLM`: the trunk, head 1 (its last decoder layer), the shared
final norm and unembedding. With it, `AutoModelForCausalLM` returns
`MTPLlamaForCausalLM`, which also loads heads 2..n from
`extra_heads.safetensors` (described by `mtp_heads.json`) and adds
`head_logits` [batch, seq, n, vocab] to the output: head k's logits for
token t+k at position t, head 1 first.

- Transformer heads: head k is one more Llama decoder layer on the trunk
  output (the input of head 1's layer), unembedded by the shared final norm
  and lm_head.
- Sequential heads (DeepSeek-V3 style): module k >= 2 reads
  proj([hidden_norm(h_{k-1}); embed_norm(embedding(x_{t+k-1}))]), where
  x_{t+k-1} is head k-1's greedy guess, as the MTP model drafts.

`head_logits` is computed when the forward sees the whole sequence (no
cached past, e.g. `model(input_ids)` or the prefill of `generate`); later
cached steps return head 1 alone, because heads 2..n keep no KV cache here.
This file needs only torch and transformers: it is copied, not imported
from the training code.
"""

import json
from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm
from transformers.utils import cached_file

HEADS_FILE = "mtp_heads.json"
WEIGHTS_FILE = "extra_heads.safetensors"
PREFIX = "extra_heads."
CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "use_cache")
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


@dataclass
class MTPCausalLMOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus `head_logits` [b, s, n, vocab] (None in cached decoding steps)."""

    head_logits: torch.FloatTensor | None = None


class SequentialHead(LlamaDecoderLayer):
    """A decoder layer behind the mixing of h_{k-1} with the embedding of token t+k-1 (2d -> d)."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.hidden_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.embed_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)


def _layer_output(out) -> torch.Tensor:
    """transformers 5 decoder layers return the hidden states, 4.x a tuple starting with them."""
    return out[0] if isinstance(out, tuple) else out


class MTPLlamaForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM (trunk + head 1) with the MTP model's heads 2..n."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        hub = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
        model.attach_extra_heads(str(pretrained_model_name_or_path), hub)
        return model

    def attach_extra_heads(self, source: str, hub: dict) -> None:
        """Build heads 2..n as `mtp_heads.json` describes and load `extra_heads.safetensors` into them."""
        from safetensors.torch import load_file

        with open(cached_file(source, HEADS_FILE, **hub), encoding="utf-8") as f:
            self.mtp_heads = json.load(f)
        kind, n = self.mtp_heads["head_type"], self.mtp_heads["n_future"]
        layer_class = SequentialHead if kind == "sequential" else LlamaDecoderLayer
        first = self.config.num_hidden_layers
        self.extra_heads = nn.ModuleList(layer_class(self.config, first + i) for i in range(n - 1))
        weight = self.lm_head.weight
        self.extra_heads.to(device=weight.device, dtype=weight.dtype)
        if n > 1:
            state = load_file(cached_file(source, WEIGHTS_FILE, **hub))
            self.extra_heads.load_state_dict({k[len(PREFIX):]: v for k, v in state.items()}, strict=True)

    def forward(self, *args, logits_to_keep: int | torch.Tensor = 0, **kwargs):
        cache = next((kwargs[k] for k in CACHE_KWARGS[:3] if kwargs.get(k) is not None), None)
        past = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
        seen = {}

        def keep(_module, layer_args, layer_kwargs, output):
            seen.update(z=layer_args[0] if layer_args else layer_kwargs["hidden_states"], kwargs=layer_kwargs,
                        h1=_layer_output(output))

        head_1 = self.model.layers[self.config.num_hidden_layers - 1]
        handle = head_1.register_forward_hook(keep, with_kwargs=True)
        try:
            out = super().forward(*args, logits_to_keep=logits_to_keep, **kwargs)
        finally:
            handle.remove()
        head_logits = None
        if past == 0 and seen and getattr(self, "extra_heads", None) is not None:
            head_logits = self._head_logits(seen["z"], seen["h1"], seen["kwargs"])  # [b, s, n, V]
            if isinstance(logits_to_keep, int) and logits_to_keep > 0:
                head_logits = head_logits[:, -logits_to_keep:]
        return MTPCausalLMOutput(**out, head_logits=head_logits)

    def _head_logits(self, z: torch.Tensor, h1: torch.Tensor, layer_kwargs: dict) -> torch.Tensor:
        """Heads 1..n on the trunk output z [b, s, d]; h1 is head 1's hidden state."""
        kwargs = {k: v for k, v in layer_kwargs.items() if k not in CACHE_KWARGS}
        hidden = h1
        logits = [self.lm_head(self.model.norm(h1))]  # [b, s, V]
        for head in self.extra_heads:
            x = z
            if isinstance(head, SequentialHead):
                guess = self.model.embed_tokens(logits[-1].argmax(dim=-1))  # [b, s, d]
                x = head.proj(torch.cat([head.hidden_norm(hidden), head.embed_norm(guess)], dim=-1))
            hidden = _layer_output(head(x, use_cache=False, **kwargs))  # [b, s, d]
            logits.append(self.lm_head(self.model.norm(hidden)))
        return torch.stack(logits, dim=2)  # [b, s, n, V]
