"""Shape and loss settings of an MTP model: the `model:` section of a run config.

Kept free of torch so configs load and validate before any heavy import.
"""

from dataclasses import dataclass, field

from pretrain.errors import UserError

HEAD_TYPES = ("transformer", "linear", "sequential")
KERNELS = ("auto", "te", "apex", "torch")
# Settings that change how a model is computed, not what it is: a checkpoint resumes under any of them.
NOT_IDENTITY = ("kernels",)
INIT_EXTRA_HEADS = ("last_layer", "random")  # how model.init_from starts heads 2..n


@dataclass
class ModelConfig:
    vocab_size: int | None = None  # None: taken from the prepared data's tokenizer
    d_model: int = 256
    n_layers: int = 4  # transformer layers of the n=1 model: its trunk plus head 1 (a Llama of this depth)
    n_heads: int = 4
    n_kv_heads: int | None = None  # grouped-query attention; None = n_heads
    ffn_hidden: int | None = None  # None: Llama's rule, 8/3 d rounded up to 64
    max_seq_len: int = 512
    n_future: int = 4  # 1 = ordinary next-token model
    head_type: str = "transformer"
    match_params: bool = False  # keep n_layers layers in all: n_future-1 trunk layers make room for the heads
    head_weights: list[float] | None = None  # per-head loss weights; None = all 1
    # Factor on heads 2..n. `aux_schedule` is [[start_step, factor], ...]
    # (e.g. [[0, 0.3], [10000, 0.1]]); empty means the constant `aux_factor`.
    aux_factor: float = 1.0
    aux_schedule: list[list[float]] = field(default_factory=list)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    loss_chunk_tokens: int = 1024  # tokens per chunk of the fused unembedding + CE
    kernels: str = "auto"  # auto | te | apex | torch: which kernels build the layers (parallel/kernels.py)
    # A fresh run's weights from a pretrained model (pretrain/hf, docs/huggingface.md):
    init_from: str | None = None  # "hf:DIR", a local Hugging Face Llama; None = random initialisation
    init_extra_heads: str = "last_layer"  # heads 2..n start as copies of its last layer, or "random"
    init_untie_embeddings: bool = False  # a tied checkpoint: start the unembedding as a copy of the embedding

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        return -(-int(8 * self.d_model / 3) // 64) * 64

    @property
    def trunk_layers(self) -> int:
        """Trunk layers, heads excluded.

        `n_layers` counts the n=1 model's layers, trunk plus head 1. Without
        `match_params` the heads come on top of that trunk (n_layers - 1 trunk
        layers); with it the model keeps n_layers transformer layers in all,
        as the paper's and Meta's parameter-matched models do: the 7B n=4
        model has 28 trunk layers + 4 heads = 32, like its n=1 baseline's 31 + 1.
        """
        return self.n_layers - (self.n_future if self.match_params else 1)

    @property
    def weights(self) -> list[float]:
        return list(self.head_weights) if self.head_weights else [1.0] * self.n_future

    def padded_vocab(self, tp: int = 1) -> int:
        """Vocabulary rounded up to a multiple of 128 x tp.

        Every tensor-parallel shard of the embedding and unembedding then has
        the same, matmul-friendly size. The padding rows never win: the loss
        and `head_logits` ignore ids >= vocab_size.
        """
        if self.vocab_size is None:
            raise UserError("model.vocab_size is not set; prepare the data first or set model.vocab_size")
        multiple = 128 * tp
        return -(-self.vocab_size // multiple) * multiple

    def aux_factor_at(self, step: int) -> float:
        """The factor on heads 2..n at optimizer step `step`."""
        factor = self.aux_factor
        for start, value in sorted(self.aux_schedule):
            if step >= start:
                factor = value
        return factor

    def head_scales(self, step: int) -> list[float]:
        """Final loss multiplier of every head at `step`: weight x aux factor."""
        aux = self.aux_factor_at(step)
        return [w * (1.0 if k == 0 else aux) for k, w in enumerate(self.weights)]

    def validate(self) -> None:
        """Raise UserError naming the first impossible setting and its fix."""
        checks = [
            (self.n_future >= 1, "model.n_future must be >= 1"),
            (self.head_type in HEAD_TYPES, f"model.head_type must be one of {', '.join(HEAD_TYPES)}"),
            (self.d_model % self.n_heads == 0, "model.d_model must be divisible by model.n_heads"),
            (self.n_heads % self.kv_heads == 0, "model.n_heads must be divisible by model.n_kv_heads"),
            ((self.d_model // self.n_heads) % 2 == 0, "model.d_model / model.n_heads (head dim) must be even for rotary positions"),
            (self.trunk_layers >= 1,
             "model.n_layers must exceed model.n_future when model.match_params is true (and be >= 2 otherwise): "
             "the trunk needs a layer of its own"),
            (self.head_weights is None or len(self.head_weights) == self.n_future,
             "model.head_weights must list one weight per head (model.n_future entries)"),
            (all(len(p) == 2 for p in self.aux_schedule), "model.aux_schedule entries must be [start_step, factor] pairs"),
            (self.loss_chunk_tokens >= 1, "model.loss_chunk_tokens must be >= 1"),
            (self.vocab_size is None or self.vocab_size >= 2, "model.vocab_size must be >= 2"),
            (self.max_seq_len >= 1, "model.max_seq_len must be >= 1"),
            (self.kernels in KERNELS, f"model.kernels must be one of {', '.join(KERNELS)}, got '{self.kernels}'"),
            (self.init_from is None or self.init_from.startswith("hf:"),
             "model.init_from must be hf:DIR (a local Hugging Face Llama directory) or null"),
            (self.init_extra_heads in INIT_EXTRA_HEADS,
             f"model.init_extra_heads must be one of {', '.join(INIT_EXTRA_HEADS)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
