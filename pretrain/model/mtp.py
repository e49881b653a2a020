"""The MTP language model: shared trunk, n output heads, one shared unembedding.

Submodules are kept apart (`embedding`, `layers`, `heads`, `unembedding`)
so a pipeline engine can place the embedding on the first stage, split the
trunk layers, and put heads + unembedding + loss on the last stage
(`head_loss` is that last stage's work). Activations are [s, b, d], as in
megatron; [s / tp, b, d] (this rank's positions) under sequence parallelism.
"""

import contextlib
from collections.abc import Mapping

import torch
from megatron.core import parallel_state

from pretrain.errors import UserError
from pretrain.loss import HeadStack, mtp_loss
from pretrain.model.config import ModelConfig
from pretrain.model.heads import TokensFor, build_heads
from pretrain.model.init import initialize
from pretrain.model.layers import build_layer
from pretrain.model.megatron_config import residual_depth, transformer_config
from pretrain.model.rotary import rotary_angles
from pretrain.model.vocab import TokenEmbedding, Unembedding


class LossScope(torch.nn.Module):
    """A module call around the loss, holding no weights: `scope(fn, *args)` is `fn(*args)`.

    ZeRO-3 keeps every weight as a 1/dp slice and gathers it whole only inside
    the forward and backward of the module that owns it. The loss breaks that
    pattern: it runs each head's backward inside its own forward, reads the
    unembedding weight without calling its module, and hands the weights'
    gradients out in its backward (autograd checks them against the shapes
    the weights had when the loss was called). Under ZeRO-3,
    `parallel.engine.build_engine` registers every weight the loss reads
    (`MTPModel.loss_params`) as an external parameter of this module, so
    DeepSpeed gathers them when this call starts and keeps them until it ends
    (a head's own hooks cannot release what this module still uses), then
    again when the backward reaches the loss's output until it has passed z:
    autograd accumulates their gradients meanwhile, which fires ZeRO-3's
    reduce-scatter hooks. Without ZeRO-3 this is a plain call.
    """

    def forward(self, fn, *args):
        return fn(*args)


class MTPModel(torch.nn.Module):
    """Llama-style decoder on megatron-core with `cfg.n_future` output heads.

    Builds on the tensor-parallel groups that exist (`parallel.runtime.start`
    or, for one process, `parallel.megatron_setup.init_model_parallel`): the
    model creates no process group and touches no RNG state. Weights are
    `params_dtype` on `device` (float32 or bfloat16 for training, float64
    for gradient checks; "meta" to count parameters without memory), drawn
    from `seed` by `pretrain.model.init`, the same under every layout;
    `seed=None` leaves them unset for a caller that loads weights next;
    `pretrained` (logical tensors by name) replaces the seed's draw for every
    name it holds. `sequence_parallel` (training with tp > 1 only) splits the
    activations along the sequence over the tensor-parallel ranks; the
    weights are the same either way.
    """

    def __init__(self, cfg: ModelConfig, params_dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", seed: int | None = 0,
                 pretrained: Mapping[str, torch.Tensor] | None = None, sequence_parallel: bool = False):
        super().__init__()
        if cfg.vocab_size is None:
            raise UserError("model.vocab_size is not set; prepare the data first or set model.vocab_size")
        cfg.validate()
        device = torch.device(device)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.cfg = cfg
        self.params_dtype = params_dtype
        self.sequence_parallel = sequence_parallel
        tcfg = transformer_config(cfg, tp, params_dtype, on_gpu=device.type == "cuda",
                                  sequence_parallel=sequence_parallel)
        with torch.device(device) if device.type != "cuda" else contextlib.nullcontext():
            self.embedding = TokenEmbedding(tcfg, cfg.padded_vocab(tp))
            self.layers = torch.nn.ModuleList(build_layer(tcfg, i + 1) for i in range(cfg.trunk_layers))
            self.heads = build_heads(cfg, tcfg)
            self.unembedding = Unembedding(tcfg, cfg.padded_vocab(tp), cfg.vocab_size)
        self.loss_scope = LossScope()
        # megatron's torch norms are created on the CPU in float32 whatever the other weights are
        self.to(device=device, dtype=params_dtype)
        if seed is not None and device.type != "meta":
            initialize(self.named_parameters(), cfg, seed, residual_depth(cfg), pretrained)

    def rotary(self, seq_len: int, device: torch.device) -> torch.Tensor:
        """Rotary angles [s, 1, 1, head_dim] for positions 0 .. seq_len - 1."""
        dtype = torch.float64 if self.params_dtype == torch.float64 else torch.float32
        head_dim = self.cfg.d_model // self.cfg.n_heads
        return rotary_angles(seq_len, head_dim, self.cfg.rope_theta, device, dtype=dtype)

    def trunk(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [b, s] -> z [s, b, d] ([s / tp, b, d] sequence-parallel), what every head reads."""
        hidden = self.embedding(input_ids.t())  # [s, b, d]
        rotary = self.rotary(input_ids.shape[1], hidden.device)  # every position: attention gathers them
        for layer in self.layers:
            hidden, _ = layer(hidden, attention_mask=None, rotary_pos_emb=rotary)
        return hidden

    def head_stack(self, seq_len: int, device: torch.device, tokens_for: TokensFor) -> HeadStack:
        """The output side in the form the loss schedule consumes."""
        rotary = self.rotary(seq_len, device)
        chained = self.heads.chained
        params = [*self.heads.parameters(), *self.unembedding.norm.parameters()]
        if chained:  # sequential heads embed tokens with the trunk's embedding
            params += list(self.embedding.parameters())
        return HeadStack(
            hidden_states=lambda z: self.heads.hidden_states(z, rotary, self.embedding, tokens_for),
            chained=chained,
            norm=self.unembedding.norm,
            weight=self.unembedding.weight,
            vocab_size=self.cfg.vocab_size,
            params=params,
            sequence_parallel=self.sequence_parallel,
        )

    def loss_params(self) -> list[torch.nn.Parameter]:
        """Every weight `head_loss` reads, which ZeRO-3 must hold whole around it (see `LossScope`).

        The heads', the unembedding's (final norm and projection) and, when
        sequential heads embed tokens with it, the embedding's.
        """
        modules = [self.heads, self.unembedding, *([self.embedding] if self.heads.chained else [])]
        return [p for module in modules for p in module.parameters()]

    def head_loss(self, z: torch.Tensor, labels: torch.Tensor, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Heads + unembedding + loss on the trunk output z [s, b, d] ([s / tp, b, d]); see `forward`."""
        b, s = z.shape[1], z.shape[0]
        if self.sequence_parallel:
            s *= parallel_state.get_tensor_model_parallel_world_size()
        if labels.shape != (b, self.cfg.n_future, s):
            raise ValueError(f"labels must be [b, n_future, s] = {(b, self.cfg.n_future, s)}, got {tuple(labels.shape)}")
        targets = labels.permute(1, 2, 0).contiguous()  # [n, s, b]
        stack = self.head_stack(s, z.device, tokens_for=lambda i, _: targets[i].clamp(min=0))
        return mtp_loss(z, targets, stack, self.cfg.head_scales(step), self.cfg.loss_chunk_tokens)

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor, step: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [b, s], labels [b, n_future, s] (-100 = no loss) -> (loss, head_losses [n]).

        `loss` is sum_k head_scales(step)[k] * mean CE of head k; call
        `.backward()` on it. `head_losses` are the unscaled per-head means,
        detached, for logging (head 1 = the next-token loss).
        """
        return self.loss_scope(self.head_loss, self.trunk(input_ids), labels, step)

    def head_logits(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Whole logits [b, s, n_future, vocab] of every head, for evaluation and drafting.

        Sequential heads need token t+k-1 to predict t+k: from `labels`
        ([b, n_future, s]) when given, else head k-1's greedy guess, as
        when drafting. Materialises all logits: small inputs only.
        """
        if self.sequence_parallel:
            raise RuntimeError("head_logits needs every position on every rank: build the model without "
                               "sequence_parallel (generation and evaluation do)")
        z = self.trunk(input_ids)  # [s, b, d]
        logits: list[torch.Tensor] = []

        def tokens_for(i: int, _hidden: torch.Tensor) -> torch.Tensor:
            if labels is not None:
                return labels[:, i].t().clamp(min=0)  # [s, b]
            return logits[i].argmax(dim=-1)  # [s, b]

        stack = self.head_stack(z.shape[0], z.device, tokens_for)
        for hidden in stack.hidden_states(z):
            logits.append(self.unembedding(hidden))  # [s, b, vocab]
        return torch.stack(logits, dim=2).transpose(0, 1)  # [b, s, n, vocab]
