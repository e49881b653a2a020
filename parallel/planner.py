"""Memory and throughput model of every (tp, pp, dp, micro-batch, recompute, ZeRO) layout of a run.

Torch-free arithmetic, so `mtp plan` answers in well under a second. The
formulas are written out in docs/planner.md; in short, per GPU and per
pipeline stage (the worst stage decides):

    weights, gradients, optimizer   as DeepSpeed allocates them per ZeRO stage and dtype
                (`_state_bytes`); ZeRO-3 partitions all three over dp and gathers the head block
                (heads, final norm, unembedding) whole while the loss runs
    activations in_flight * L_stage * A_layer   without recompute
                in_flight * L_stage * s b d w             with recompute (layer inputs kept), and one
                                                          layer's A_layer rebuilt during backward
                A_layer = s b w (6 d + (3 d + 3 d_kv + 5 f) / tp)    (flash attention: no s^2 term)
    loss        last stage: one head layer's activations, the stored gradients of the heads,
                final norm and unembedding, the fp32 weight-gradient accumulator and one chunk of
                logits (chunk x V/tp); unchunked, the chunk is every token of the micro-batch
    p2p         2 s b d w per micro-batch in flight on a pipeline stage
    total       the larger of two peaks: end of a forward, when the loss runs,
                    weights + optimizer + activations + p2p + loss (+ gradients if earlier
                    micro-batches of the step have made them: micro-batches > in_flight)
                and backward, when a layer is rebuilt,
                    weights + optimizer + activations + p2p + gradients + rebuilt layer

P_local counts this stage's matrices / tp and its norms whole. in_flight =
min(pp - stage, micro-batches): DeepSpeed's 1F1B schedule. Step time is
FLOPs / (GPUs x peak x MFU), the FLOPs being `flops_per_token` x tokens
(plus one more forward of every recomputed trunk layer), stretched by the
pipeline bubble (m + pp - 1) / m.
"""

from dataclasses import dataclass, field

from parallel.topology import stage_parts
from pretrain.model.config import ModelConfig

GB = 1024**3
MICRO_BATCHES = (1, 2, 4, 8, 16)
ZERO_STAGES = (0, 1, 2, 3)


@dataclass(frozen=True)
class Hardware:
    gpus: int
    gpu_memory_gb: float
    gpu_tflops: float = 989.0  # dense bf16 peak of an H100 SXM
    mfu: float = 0.4  # fraction of peak the non-bubble compute reaches, communication included
    gpus_per_node: int = 8  # tensor parallelism stays inside a node
    reserve_gb: float = 4.0  # CUDA context, communication buffers, allocator fragmentation


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    micro_batch: int
    recompute: bool
    zero_stage: int
    dtype: str = "bfloat16"


@dataclass
class Memory:
    """Bytes on one GPU of one pipeline stage."""

    weights: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0  # kept for backward, every micro-batch in flight
    loss: float = 0.0  # last stage, while the loss runs (end of a forward)
    recompute: float = 0.0  # one trunk layer rebuilt during backward
    p2p: float = 0.0
    grads_in_forward: bool = True  # gradients of earlier micro-batches exist while a forward runs
    loss_unchunked: float = 0.0  # what `loss` would be without chunking the unembedding (not in total)

    @property
    def total(self) -> float:
        """The larger of the two peaks: end of a forward (loss running) and backward (a layer rebuilt)."""
        kept = self.weights + self.optimizer + self.activations + self.p2p
        forward = kept + self.loss + (self.grads if self.grads_in_forward else 0.0)
        backward = kept + self.grads + self.recompute
        return max(forward, backward)

    def largest(self) -> str:
        names = ("weights", "grads", "optimizer", "activations", "loss", "recompute", "p2p")
        parts = {k: getattr(self, k) for k in names}
        name = max(parts, key=parts.get)
        return f"{name} {parts[name] / GB:.1f} GB"


@dataclass
class Estimate:
    layout: Layout
    stages: list[Memory]
    micro_batches: int  # per optimizer step on each pipeline
    bubble: float
    step_s: float
    tokens_per_s: float
    model_mfu: float  # model FLOPs / (time x GPUs x peak): what the trainer would log
    fits: bool = False
    peak_stage: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> float:
        return self.stages[self.peak_stage].total

    def days_per(self, tokens: float) -> float:
        return tokens / self.tokens_per_s / 86400


# ---- parameter counts (elements), per stage and tensor rank ----------------------

def _layer_params(m: ModelConfig) -> tuple[int, int]:
    """(tensor-parallel matrices, replicated norm gains) of one decoder layer."""
    head_dim = m.d_model // m.n_heads
    kv = m.kv_heads * head_dim
    attention = m.d_model * (m.d_model + 2 * kv) + m.d_model * m.d_model
    return attention + 3 * m.d_model * m.ffn_size, 2 * m.d_model


def _head_block_params(m: ModelConfig, padded_vocab: int) -> tuple[int, int]:
    """(split, replicated) of the heads, the final norm and the unembedding."""
    split, norms = _layer_params(m)
    d, n = m.d_model, m.n_future
    if m.head_type == "transformer":
        heads = (n * split, n * norms)
    elif m.head_type == "linear":
        heads = (n * d * d, 0)
    else:
        heads = (n * split + (n - 1) * 2 * d * d, n * norms + (n - 1) * 2 * d)
    return heads[0] + padded_vocab * d, heads[1] + d


def head_block_params(m: ModelConfig, tp: int) -> float:
    """Parameters of the head block on one GPU of the last stage (matrices / tp, norms whole)."""
    split, norms = _head_block_params(m, m.padded_vocab(tp))
    return split / tp + norms


def stage_params(m: ModelConfig, tp: int, parts: list[int]) -> list[float]:
    """Parameters held by one GPU of each stage (matrices / tp, norms whole)."""
    padded = m.padded_vocab(tp)
    layer_split, layer_norms = _layer_params(m)
    heads_split, heads_norms = _head_block_params(m, padded)
    per_layer = [(padded * m.d_model, 0)] + [(layer_split, layer_norms)] * m.trunk_layers
    per_layer.append((heads_split, heads_norms))
    out = []
    for start, stop in zip(parts, parts[1:]):
        out.append(sum(split / tp + norms for split, norms in per_layer[start:stop]))
    return out


def total_params(m: ModelConfig) -> int:
    """Whole-model parameters with the tp=1 padded vocabulary (MTPModel's `param_counts()['total']`)."""
    return int(stage_params(m, 1, [0, m.trunk_layers + 2])[0])


# ---- memory -------------------------------------------------------------------------

def layer_activation_bytes(m: ModelConfig, tokens: int, tp: int, width: int) -> float:
    """Tensors one decoder layer saves for backward, for `tokens` tokens (flash attention, no dropout).

    Counted from autograd's saved tensors of our megatron layer (tests/unit/test_planner.py):
    each RMSNorm keeps its input, the normalised input and its output (6d, whole on every
    tensor rank); attention keeps the QKV projection's output (V is a view of it, d + 2 d_kv),
    the rotated Q and K (d + d_kv) and its output (d); the SwiGLU MLP keeps the gate|up
    projection (2f) and three f-wide intermediates (3f).
    """
    kv = m.kv_heads * (m.d_model // m.n_heads)
    return tokens * width * (6 * m.d_model + (3 * m.d_model + 3 * kv + 5 * m.ffn_size) / tp)


def _state_bytes(params: float, lay: Layout, bf16: bool) -> tuple[float, float, float]:
    """(weights, gradients, optimizer) bytes of `params` local parameters, as DeepSpeed allocates them.

    float32 (measured on CPU): weights 4, gradients 4, Adam m and v 8 B/param; ZeRO >= 1 adds a
    float32 copy of its partition and partitions it with m and v (12 / dp); ZeRO-2 partitions the
    gradients too. bf16: weights and gradients 2 each, float32 master + m + v (12) partitioned over
    dp at every stage (DeepSpeed's bf16 optimizer partitions them even at ZeRO-0), plus float32
    gradients: a whole buffer (4) at ZeRO-0, this rank's partition (4 / dp) at ZeRO-1 and 2.
    ZeRO-3 partitions the weights too (the whole weights of the modules running are `_gathered_bytes`).
    """
    dp, zero = lay.dp, lay.zero_stage
    if bf16:
        fp32_grads = 4 if zero == 0 else 4 / dp
        grads = (2 / dp if zero >= 2 else 2) + fp32_grads
        return params * (2 / dp if zero == 3 else 2), params * grads, params * 12 / dp
    if zero == 0:
        return params * 4, params * 4, params * 8
    return params * (4 / dp if zero == 3 else 4), params * (4 / dp if zero >= 2 else 4), params * 12 / dp


def _gathered_bytes(m: ModelConfig, lay: Layout, width: int) -> float:
    """ZeRO-3: weights gathered whole on top of the partitions, at most the head block.

    The loss holds the heads', final norm's and unembedding's weights for
    its whole forward and backward (pretrain.model.mtp.LossScope); a trunk
    layer, gathered only around its own forward and backward, is smaller.
    """
    return head_block_params(m, lay.tp) * width if lay.zero_stage == 3 else 0.0


def _loss_bytes(m: ModelConfig, tokens: int, tp: int, width: int, chunk: int) -> float:
    """Last stage: the per-head schedule's buffers for one micro-batch (see pretrain/loss/schedule.py)."""
    vocab_local = m.padded_vocab(tp) / tp
    heads_split, heads_norms = _head_block_params(m, m.padded_vocab(tp))
    stored_grads = (heads_split / tp + heads_norms) * width + vocab_local * m.d_model * 4
    logits = chunk * vocab_local * (4 + (width if width != 4 else 0))  # fp32 logits (+ low-precision copy)
    hidden = tokens * m.d_model * (4 + 3 * width)  # fp32 grad of the normed state, z, its grad, the normed state
    return stored_grads + logits + hidden + layer_activation_bytes(m, tokens, tp, width)


def memory(m: ModelConfig, lay: Layout, seq_len: int, micro_batches: int, bf16: bool,
           parts: list[int]) -> list[Memory]:
    """Per-stage memory of one GPU; `parts` are the stage boundaries (topology.stage_parts)."""
    width = 2 if bf16 else 4
    tokens = seq_len * lay.micro_batch
    act_layer = layer_activation_bytes(m, tokens, lay.tp, width)
    out = []
    for stage, params in enumerate(stage_params(m, lay.tp, parts)):
        weights, grads, optimizer = _state_bytes(params, lay, bf16)
        weights += _gathered_bytes(m, lay, width)
        trunk = sum(1 for i in range(parts[stage], parts[stage + 1]) if 1 <= i <= m.trunk_layers)
        in_flight = min(lay.pp - stage, micro_batches)
        kept = tokens * m.d_model * width if lay.recompute else act_layer
        mem = Memory(weights, grads, optimizer, activations=in_flight * trunk * kept,
                     grads_in_forward=micro_batches > in_flight)
        if lay.recompute and trunk:
            mem.recompute = act_layer
        if lay.pp > 1:
            mem.p2p = in_flight * 2 * tokens * m.d_model * width
        if stage == lay.pp - 1:
            chunk = min(m.loss_chunk_tokens, tokens)
            mem.loss = _loss_bytes(m, tokens, lay.tp, width, chunk)
            mem.loss_unchunked = _loss_bytes(m, tokens, lay.tp, width, tokens)
        out.append(mem)
    return out


# ---- time ------------------------------------------------------------------------------

def step_seconds(m: ModelConfig, lay: Layout, seq_len: int, global_batch: int, micro_batches: int,
                 hw: Hardware, flops_per_token: float) -> tuple[float, float, float]:
    """(step time, pipeline bubble fraction, model MFU) from FLOPs, the assumed MFU and the bubble."""
    tokens = global_batch * seq_len
    model_flops = flops_per_token * tokens
    trunk_share = _trunk_flops_share(m, seq_len, flops_per_token)
    work = model_flops * (1 + trunk_share / 3 if lay.recompute else 1)  # one more trunk forward
    compute_s = work / (hw.gpus * hw.gpu_tflops * 1e12 * hw.mfu)
    bubble = (lay.pp - 1) / (micro_batches + lay.pp - 1)
    step_s = compute_s / (1 - bubble)
    return step_s, bubble, model_flops / (step_s * hw.gpus * hw.gpu_tflops * 1e12)


def _trunk_flops_share(m: ModelConfig, seq_len: int, flops_per_token: float) -> float:
    """Fraction of a step's FLOPs spent in trunk layers (the part recomputation repeats)."""
    split, _ = _layer_params(m)
    trunk = m.trunk_layers * (6 * split + 12 * m.d_model * seq_len)
    return min(1.0, trunk / flops_per_token)


# ---- the search -------------------------------------------------------------------------

def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def layout_problem(m: ModelConfig, lay: Layout, global_batch: int, hw: Hardware) -> str | None:
    """Why a layout cannot run at all (before memory), or None."""
    for name, value in (("attention heads", m.n_heads), ("key/value heads", m.kv_heads),
                        ("feed-forward size", m.ffn_size)):
        if value % lay.tp:
            return f"tp={lay.tp} does not divide the {value} {name}"
    if lay.tp > hw.gpus_per_node:
        return f"tp={lay.tp} spans nodes ({hw.gpus_per_node} GPUs per node)"
    if lay.pp > m.trunk_layers:
        return f"pp={lay.pp} exceeds the {m.trunk_layers} trunk layers"
    if lay.pp > 1 and m.head_type == "sequential":
        return "sequential heads need pp=1"
    if lay.pp > 1 and lay.zero_stage > 1:
        return f"pp > 1 with ZeRO-{lay.zero_stage} (DeepSpeed pipelines take ZeRO-0/1)"
    if global_batch % (lay.dp * lay.micro_batch):
        return f"global batch {global_batch} is not a multiple of dp x micro-batch = {lay.dp * lay.micro_batch}"
    return None


def estimate(m: ModelConfig, lay: Layout, seq_len: int, global_batch: int, bf16: bool, hw: Hardware,
             flops_per_token: float, layers_per_stage: list[int] | None = None) -> Estimate:
    micro_batches = global_batch // (lay.dp * lay.micro_batch)
    parts = stage_parts(m, lay.pp, layers_per_stage)
    stages = memory(m, lay, seq_len, micro_batches, bf16, parts)
    step_s, bubble, mfu = step_seconds(m, lay, seq_len, global_batch, micro_batches, hw, flops_per_token)
    peak = max(range(lay.pp), key=lambda i: stages[i].total)
    est = Estimate(lay, stages, micro_batches, bubble, step_s, global_batch * seq_len / step_s, mfu, peak_stage=peak)
    est.fits = est.peak_bytes + hw.reserve_gb * GB <= hw.gpu_memory_gb * GB
    return est


def search(m: ModelConfig, seq_len: int, global_batch: int, bf16: bool, hw: Hardware,
           flops_per_token: float) -> tuple[list[Estimate], dict[str, int]]:
    """Every layout that can run, best first, and how many others were ruled out by each reason."""
    found, ruled_out = [], {}
    for tp in _divisors(hw.gpus):
        for pp in _divisors(hw.gpus // tp):
            for mb in MICRO_BATCHES:
                for recompute in (False, True):
                    for zero in ZERO_STAGES:
                        lay = Layout(tp, pp, hw.gpus // (tp * pp), mb, recompute, zero)
                        problem = layout_problem(m, lay, global_batch, hw)
                        if problem:
                            reason = problem.split(" (")[0] if "spans" in problem else problem
                            ruled_out[reason] = ruled_out.get(reason, 0) + 1
                            continue
                        found.append(estimate(m, lay, seq_len, global_batch, bf16, hw, flops_per_token))
    found.sort(key=_rank)
    return found, ruled_out


def _rank(est: Estimate) -> tuple:
    """Fitting first; then faster; on equal time fewer model-parallel ranks, lower ZeRO, less memory."""
    lay = est.layout
    return (not est.fits, round(est.step_s, 6), lay.tp * lay.pp, lay.zero_stage, lay.recompute, est.peak_bytes)
