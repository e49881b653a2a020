"""Memory and throughput model of every (tp, pp, dp, micro-batch, recompute, ZeRO, SP) layout of a run.

Torch-free arithmetic, so `mtp plan` answers in well under a second. The
formulas are written out in docs/planner.md; in short, per GPU and per
pipeline stage (the worst stage decides):

    weights, gradients, optimizer   as DeepSpeed allocates them per ZeRO stage and dtype
                (`_state_bytes`); ZeRO-3 partitions all three over dp and gathers the head block
                (heads, final norm, unembedding) whole while the loss runs
    activations in_flight * L_stage * A_layer   without recompute
                in_flight * L_stage * s b d w             with recompute (layer inputs kept), and one
                                                          layer's A_layer rebuilt during backward
                A_layer = s b (2 (8 + w) d + w (3 d + 3 d_kv + 5 f) / tp)    (flash attention: no s^2)
                sequence parallelism (SP) splits the norms' part and the kept layer inputs over tp too
    loss        last stage: one head layer's activations, the stored gradients of the heads,
                final norm and unembedding, the fp32 weight-gradient accumulator and one chunk of
                logits (chunk x V/tp); unchunked, the chunk is every token of the micro-batch
    p2p         2 s b d w per micro-batch in flight on a pipeline stage (/ tp with SP)
    total       the larger of two peaks: end of a forward, when the loss runs,
                    weights + optimizer + activations + p2p + loss (+ gradients if earlier
                    micro-batches of the step have made them: micro-batches > in_flight)
                and backward, when a layer is rebuilt,
                    weights + optimizer + activations + p2p + gradients + rebuilt layer

P_local counts this stage's matrices / tp and its norms whole. in_flight =
min(pp - stage, micro-batches): DeepSpeed's 1F1B schedule.

Step time, per GPU:
    compute     FLOPs / (GPUs x peak x MFU), the FLOPs being `flops_per_token` x tokens (plus one
                more forward of every recomputed trunk layer); MFU is the computation's own efficiency
    tensor      4 all-reduces of [s b, d] per layer per micro-batch (2 forward, 2 backward; 2 more
                forward when recomputed), the embedding's and each head's loss gradient, on NVLink;
                SP turns each all-reduce into a reduce-scatter + all-gather (the same bytes) and adds
                an all-gather of each head's normalised state for the vocabulary-parallel loss
    pipeline    a forward activation and a backward gradient [s b, d] per micro-batch and stage
    per micro-batch, the slowest stage's (compute + tensor + pipeline) x (m + pp - 1) micro-batch slots
    data        the gradient reduction once per step (ZeRO-0/1: all-reduce of the fp32 gradients, then
                ZeRO-1 all-gathers the updated weights; ZeRO-2: reduce-scatter + all-gather; ZeRO-3:
                every micro-batch all-gathers the weights twice and reduce-scatters the gradients),
                over NVLink when the data-parallel group fits in a node, else over InfiniBand; ZeRO-2/3
                overlap it with the backward pass at pp=1 (DeepSpeed's overlap_comm), ZeRO-0/1 and
                pipelines reduce after it. `Hardware.overlap=False` charges every byte.
An all-reduce of B bytes over n ranks costs 2 (n-1)/n B / bandwidth (ring), a
reduce-scatter or all-gather half of that; bandwidths are NCCL bus bandwidths
per GPU.
"""

import itertools
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
    mfu: float = 0.55  # fraction of peak the computation itself reaches (communication modelled apart)
    gpus_per_node: int = 8  # tensor parallelism stays inside a node
    reserve_gb: float = 4.0  # CUDA context, communication buffers, allocator fragmentation
    intra_node_gbs: float = 360.0  # NCCL bus bandwidth per GPU on NVLink 4 (H100 SXM: 450 GB/s each way)
    inter_node_gbs: float = 45.0  # per GPU across nodes: one 400 Gb/s InfiniBand NIC each (50 GB/s line rate)
    overlap: bool = True  # the data-parallel reduction overlaps the backward pass where DeepSpeed does so


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    micro_batch: int
    recompute: bool
    zero_stage: int
    dtype: str = "bfloat16"
    sequence_parallel: bool = False


@dataclass
class Memory:
    """Bytes on one GPU of one pipeline stage."""

    weights: float = 0.0
    grads: float = 0.0  # the backward's gradients, freed at the optimizer step
    grad_buffers: float = 0.0  # fp32 gradient buffers the optimizer keeps for the whole run
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
        kept = self.weights + self.grad_buffers + self.optimizer + self.activations + self.p2p
        forward = kept + self.loss + (self.grads if self.grads_in_forward else 0.0)
        backward = kept + self.grads + self.recompute
        return max(forward, backward)

    def largest(self) -> str:
        names = ("weights", "grads", "grad_buffers", "optimizer", "activations", "loss", "recompute", "p2p")
        parts = {k: getattr(self, k) for k in names}
        name = max(parts, key=parts.get)
        return f"{name} {parts[name] / GB:.1f} GB"


@dataclass
class Comm:
    """Communication seconds of one step on one GPU."""

    tensor_s: float = 0.0  # tensor-parallel all-reduces, on the critical path of the slowest stage
    pipeline_s: float = 0.0  # pipeline sends and receives of the slowest stage
    data_s: float = 0.0  # data-parallel reduction (and ZeRO gathers), all of it
    data_exposed_s: float = 0.0  # the part of data_s not hidden behind the backward pass


@dataclass
class Estimate:
    layout: Layout
    stages: list[Memory]
    micro_batches: int  # per optimizer step on each pipeline
    bubble: float
    step_s: float
    tokens_per_s: float
    model_mfu: float  # model FLOPs / (time x GPUs x peak): what the trainer would log
    comm: Comm = field(default_factory=Comm)
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

def _width(lay: Layout) -> int:
    """Bytes of one weight or activation element in the run's dtype."""
    return 2 if lay.dtype == "bfloat16" else 4


def layer_activation_bytes(m: ModelConfig, tokens: int, tp: int, width: int, sequence_parallel: bool = False
                           ) -> float:
    """Tensors one decoder layer saves for backward, for `tokens` tokens (flash attention, no dropout).

    Counted from autograd's saved tensors of our megatron layer (tests/unit/test_planner.py):
    each RMSNorm (torch's) keeps its input and normalised input in fp32 and its output in the
    layer's dtype ((8 + w) d, whole on every tensor rank); attention keeps the QKV projection's
    output (V is a view of it, d + 2 d_kv), the rotated Q and K (d + d_kv) and its output (d);
    the SwiGLU MLP keeps the gate|up projection (2f) and three f-wide intermediates (3f).
    Under sequence parallelism the norms see s / tp positions, and megatron's linear layers keep
    that un-gathered input, so the norms' part is split over tp too.
    """
    kv = m.kv_heads * (m.d_model // m.n_heads)
    norms = 2 * (8 + width) * m.d_model / (tp if sequence_parallel else 1)
    return tokens * (norms + width * (3 * m.d_model + 3 * kv + 5 * m.ffn_size) / tp)


def _state_bytes(params: float, lay: Layout) -> tuple[float, float, float, float]:
    """(weights, gradients, gradient buffers, optimizer) bytes of `params` local parameters, as DeepSpeed
    0.19.8 allocates them (gradient buffers: fp32 ones the optimizer keeps allocated for the whole run).

    float32: weights 4, gradients 4, Adam m and v 8 B/param at ZeRO-0; ZeRO >= 1 adds a float32 copy
    of its partition and partitions it with m and v (12 / dp); ZeRO-2 partitions the gradients too.
    bf16 (fp32 gradient accumulation, `parallel.engine.deepspeed_config`): ZeRO-0 is refused.
    ZeRO-1 is DeepSpeed's BF16_Optimizer: bf16 weights and gradients (2 + 2), a whole fp32 gradient
    buffer allocated at start (4) and the fp32 master + m + v partition (12 / dp). ZeRO-2: bf16
    weights (2), bf16 gradients of the micro-batch (2), the fp32 gradient partition (4 / dp), 12 / dp.
    ZeRO-3: the same with the weights and bf16 gradients partitioned too (2 / dp each; the whole
    weights of the modules running are `_gathered_bytes`).
    """
    dp, zero = lay.dp, lay.zero_stage
    if lay.dtype == "bfloat16":
        grads, buffers = {1: (2, 4), 2: (2, 4 / dp), 3: (2 / dp, 4 / dp)}[zero]
        return params * (2 / dp if zero == 3 else 2), params * grads, params * buffers, params * 12 / dp
    if zero == 0:
        return params * 4, params * 4, 0.0, params * 8
    return params * (4 / dp if zero == 3 else 4), params * (4 / dp if zero >= 2 else 4), 0.0, params * 12 / dp


def _gathered_bytes(m: ModelConfig, lay: Layout, width: int) -> float:
    """ZeRO-3: weights gathered whole on top of the partitions, at most the head block.

    The loss holds the heads', final norm's and unembedding's weights for
    its whole forward and backward (pretrain.model.mtp.LossScope); a trunk
    layer, gathered only around its own forward and backward, is smaller.
    """
    return head_block_params(m, lay.tp) * width if lay.zero_stage == 3 else 0.0


def _loss_bytes(m: ModelConfig, lay: Layout, tokens: int, width: int, chunk: int) -> float:
    """Last stage: the per-head schedule's buffers for one micro-batch (see pretrain/loss/schedule.py).

    The fp32 gradient of the normalised state is whole (every position); z, its gradient and the
    normalised state are this rank's positions, / tp under SP, which adds the gathered normalised state.
    """
    tp, sp = lay.tp, lay.sequence_parallel
    vocab_local = m.padded_vocab(tp) / tp
    heads_split, heads_norms = _head_block_params(m, m.padded_vocab(tp))
    stored_grads = (heads_split / tp + heads_norms) * width + vocab_local * m.d_model * 4
    logits = chunk * vocab_local * (4 + (width if width != 4 else 0))  # fp32 logits (+ low-precision copy)
    hidden = tokens * m.d_model * (4 + (width + 3 * width / tp if sp else 3 * width))
    return stored_grads + logits + hidden + layer_activation_bytes(m, tokens, tp, width, sp)


def memory(m: ModelConfig, lay: Layout, seq_len: int, micro_batches: int, parts: list[int]) -> list[Memory]:
    """Per-stage memory of one GPU; `parts` are the stage boundaries (topology.stage_parts)."""
    width = _width(lay)
    tokens = seq_len * lay.micro_batch
    act_layer = layer_activation_bytes(m, tokens, lay.tp, width, lay.sequence_parallel)
    positions = tokens / (lay.tp if lay.sequence_parallel else 1)  # of a layer input on this rank
    out = []
    for stage, params in enumerate(stage_params(m, lay.tp, parts)):
        weights, grads, buffers, optimizer = _state_bytes(params, lay)
        weights += _gathered_bytes(m, lay, width)
        trunk = sum(1 for i in range(parts[stage], parts[stage + 1]) if 1 <= i <= m.trunk_layers)
        in_flight = min(lay.pp - stage, micro_batches)
        kept = positions * m.d_model * width if lay.recompute else act_layer
        mem = Memory(weights, grads, buffers, optimizer, activations=in_flight * trunk * kept,
                     grads_in_forward=micro_batches > in_flight)
        if lay.recompute and trunk:
            mem.recompute = act_layer
        if lay.pp > 1:
            mem.p2p = in_flight * 2 * positions * m.d_model * width
        if stage == lay.pp - 1:
            chunk = min(m.loss_chunk_tokens, tokens)
            mem.loss = _loss_bytes(m, lay, tokens, width, chunk)
            mem.loss_unchunked = _loss_bytes(m, lay, tokens, width, tokens)
        out.append(mem)
    return out


# ---- time ------------------------------------------------------------------------------

def step_seconds(m: ModelConfig, lay: Layout, seq_len: int, global_batch: int, micro_batches: int,
                 hw: Hardware, flops_per_token: float, parts: list[int]) -> tuple[float, float, float, Comm]:
    """(step time, pipeline bubble fraction, model MFU, communication) of one optimizer step."""
    tokens = global_batch * seq_len
    model_flops = flops_per_token * tokens
    trunk_share = _trunk_flops_share(m, seq_len, flops_per_token)
    work = model_flops * (1 + trunk_share / 3 if lay.recompute else 1)  # one more trunk forward
    compute_s = work / (hw.gpus * hw.gpu_tflops * 1e12 * hw.mfu)
    comm = communication(m, lay, seq_len, micro_batches, hw, parts)
    slots = micro_batches + lay.pp - 1
    per_micro = compute_s / micro_batches + (comm.tensor_s + comm.pipeline_s) / micro_batches
    comm.data_exposed_s = _exposed(m, lay, hw, parts, compute_s / micro_batches, micro_batches, comm.data_s)
    step_s = per_micro * slots + comm.data_exposed_s
    bubble = (lay.pp - 1) / slots
    return step_s, bubble, model_flops / (step_s * hw.gpus * hw.gpu_tflops * 1e12), comm


def _exposed(m: ModelConfig, lay: Layout, hw: Hardware, parts: list[int], compute_per_micro: float,
             micro_batches: int, data_s: float) -> float:
    """The data-parallel seconds left on the step after DeepSpeed's overlap with compute.

    overlap_comm (pp=1): ZeRO-2 hides each micro-batch's reduce-scatter behind that micro-batch's
    backward (2/3 of its compute), ZeRO-3 its gathers and reduce-scatter behind its forward and
    backward; what does not fit in that window, and every byte of ZeRO-0/1 and of pipelines, stays.
    """
    if not hw.overlap or lay.pp > 1 or lay.zero_stage < 2:
        return data_s
    per_micro, once = _data_seconds(m, lay, hw, parts)
    window = compute_per_micro * (2 / 3 if lay.zero_stage == 2 else 1.0)
    return micro_batches * max(0.0, per_micro - window) + once


def _ring(bytes_: float, ranks: int, gbs: float, all_reduce: bool) -> float:
    """Seconds of a ring all-reduce (or, `all_reduce=False`, a reduce-scatter / all-gather) of `bytes_`."""
    if ranks <= 1:
        return 0.0
    return (2.0 if all_reduce else 1.0) * (ranks - 1) / ranks * bytes_ / (gbs * 1e9)


def communication(m: ModelConfig, lay: Layout, seq_len: int, micro_batches: int, hw: Hardware,
                  parts: list[int]) -> Comm:
    """Bytes every parallel dimension moves in one step, turned into seconds (see the module docstring)."""
    width = _width(lay)
    activation = seq_len * lay.micro_batch * m.d_model * width  # [s b, d] of one micro-batch
    tensor = 0.0
    pipeline = 0.0
    if lay.tp > 1:
        per_stage = []
        for stage in range(lay.pp):
            trunk = sum(1 for i in range(parts[stage], parts[stage + 1]) if 1 <= i <= m.trunk_layers)
            layers = trunk * (6 if lay.recompute else 4)
            if stage == lay.pp - 1:
                heads = m.n_future if m.head_type != "linear" else 0
                layers += 4 * heads + m.n_future * 4 / width  # each head's fp32 gradient of its hidden state
                if lay.sequence_parallel:
                    layers += m.n_future / 2  # each head's normalised state gathered for the loss
            if stage == 0:
                layers += 0.5 if lay.sequence_parallel else 1  # the embedding: reduce-scatter, or all-reduce
            per_stage.append(layers)
        tensor = max(per_stage) * micro_batches * _ring(activation, lay.tp, hw.intra_node_gbs, True)
    if lay.pp > 1:
        # neighbours sit tp x dp ranks apart: once the pipeline spans nodes some boundary crosses
        # between them, and the synchronous schedule runs at that boundary's pace
        crosses = lay.tp * lay.dp * lay.pp > hw.gpus_per_node
        bandwidth = hw.inter_node_gbs if crosses else hw.intra_node_gbs
        sent = activation / (lay.tp if lay.sequence_parallel else 1)
        pipeline = micro_batches * 2 * sent / (bandwidth * 1e9)
    per_micro, once = _data_seconds(m, lay, hw, parts)
    return Comm(tensor, pipeline, micro_batches * per_micro + once)


def _data_seconds(m: ModelConfig, lay: Layout, hw: Hardware, parts: list[int]) -> tuple[float, float]:
    """(per micro-batch, once per step) seconds of the data-parallel traffic of the fullest stage.

    ZeRO-0/1 reduce after the last micro-batch (DeepSpeed's buffered all-reduce, its bf16
    optimizer's fp32 all-reduce; ZeRO-1 then all-gathers the updated weights). ZeRO-2
    reduce-scatters every micro-batch's gradients and all-gathers the weights after the step;
    ZeRO-3 all-gathers the weights for each micro-batch's forward and backward and reduce-scatters
    its gradients.
    """
    if lay.dp == 1:
        return 0.0, 0.0
    params = max(stage_params(m, lay.tp, parts))
    bandwidth = hw.inter_node_gbs if lay.tp * lay.dp > hw.gpus_per_node else hw.intra_node_gbs
    grads, weights = params * 4, params * _width(lay)  # fp32 gradients, weights in the run's dtype
    gather = _ring(weights, lay.dp, bandwidth, False)
    scatter = _ring(grads, lay.dp, bandwidth, False)
    if lay.zero_stage <= 1:
        return 0.0, _ring(grads, lay.dp, bandwidth, True) + (gather if lay.zero_stage == 1 else 0.0)
    if lay.zero_stage == 2:
        return scatter, gather
    return 2 * gather + scatter, 0.0


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
    if lay.sequence_parallel and lay.tp == 1:
        return "sequence parallelism needs tp > 1"
    if lay.sequence_parallel and m.head_type != "transformer":
        return f"sequence parallelism needs transformer heads, not {m.head_type}"
    if lay.pp > m.trunk_layers:
        return f"pp={lay.pp} exceeds the {m.trunk_layers} trunk layers"
    if lay.pp > 1 and m.head_type == "sequential":
        return "sequential heads need pp=1"
    if lay.pp > 1 and lay.zero_stage > 1:
        return f"pp > 1 with ZeRO-{lay.zero_stage} (DeepSpeed pipelines take ZeRO-0/1)"
    if lay.dtype == "bfloat16" and lay.zero_stage == 0:
        return "bf16 with ZeRO-0 (fp32 gradient accumulation needs a ZeRO optimizer)"
    if global_batch % (lay.dp * lay.micro_batch):
        return f"global batch {global_batch} is not a multiple of dp x micro-batch = {lay.dp * lay.micro_batch}"
    return None


def estimate(m: ModelConfig, lay: Layout, seq_len: int, global_batch: int, hw: Hardware,
             flops_per_token: float, layers_per_stage: list[int] | None = None) -> Estimate:
    micro_batches = global_batch // (lay.dp * lay.micro_batch)
    parts = stage_parts(m, lay.pp, layers_per_stage)
    stages = memory(m, lay, seq_len, micro_batches, parts)
    step_s, bubble, mfu, comm = step_seconds(m, lay, seq_len, global_batch, micro_batches, hw, flops_per_token,
                                             parts)
    peak = max(range(lay.pp), key=lambda i: stages[i].total)
    est = Estimate(lay, stages, micro_batches, bubble, step_s, global_batch * seq_len / step_s, mfu, comm,
                   peak_stage=peak)
    est.fits = est.peak_bytes + hw.reserve_gb * GB <= hw.gpu_memory_gb * GB
    return est


def search(m: ModelConfig, seq_len: int, global_batch: int, dtype: str, hw: Hardware,
           flops_per_token: float) -> tuple[list[Estimate], dict[str, int]]:
    """Every layout that can run, best first, and how many others were ruled out by each reason."""
    found, ruled_out = [], {}
    for tp in _divisors(hw.gpus):
        for pp in _divisors(hw.gpus // tp):
            for mb in MICRO_BATCHES:
                for recompute, zero, sp in itertools.product((False, True), ZERO_STAGES, (False, True)):
                    if sp and tp == 1:
                        continue  # nothing to split the sequence over
                    lay = Layout(tp, pp, hw.gpus // (tp * pp), mb, recompute, zero, dtype, sp)
                    problem = layout_problem(m, lay, global_batch, hw)
                    if problem:
                        reason = problem.split(" (")[0] if "spans" in problem else problem
                        ruled_out[reason] = ruled_out.get(reason, 0) + 1
                        continue
                    found.append(estimate(m, lay, seq_len, global_batch, hw, flops_per_token))
    found.sort(key=_rank)
    return found, ruled_out


def _rank(est: Estimate) -> tuple:
    """Fitting first; then faster; on equal time fewer model-parallel ranks, lower ZeRO, less memory."""
    lay = est.layout
    return (not est.fits, round(est.step_s, 6), lay.tp * lay.pp, lay.zero_stage, lay.recompute,
            lay.sequence_parallel, est.peak_bytes)
