"""The layout planner: its counts against the real model, its arithmetic, and `mtp plan` end to end.

Memory against real training steps is a benchmark (`mtp plan --measure`,
docs/benchmarks.md), not a test; here each part of the model is held to
what it claims to count.
"""

import json

import pytest
import torch

from parallel.planner import (
    GB,
    Hardware,
    Layout,
    estimate,
    head_block_params,
    layer_activation_bytes,
    layout_problem,
    memory,
    search,
    stage_params,
    total_params,
)
from parallel.topology import stage_parts
from pretrain.config import load_config
from pretrain.errors import UserError
from pretrain.model.config import ModelConfig
from tests.integration.conftest import run_mtp

SMALL = dict(vocab_size=300, d_model=64, n_layers=5, n_heads=4, max_seq_len=64)
SEVEN_B = ModelConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, ffn_hidden=11008, n_future=4,
                      match_params=True)


@pytest.mark.parametrize("extra", [
    dict(n_future=4), dict(n_future=1), dict(n_future=4, match_params=True),
    dict(n_future=2, n_kv_heads=2), dict(n_future=3, head_type="linear"), dict(n_future=3, head_type="sequential"),
])
def test_parameter_count_equals_the_built_model(extra):
    from parallel.megatron_setup import init_model_parallel
    from pretrain.model.counting import param_counts
    from pretrain.model.mtp import MTPModel

    init_model_parallel()
    cfg = ModelConfig(**SMALL, **extra)
    assert total_params(cfg) == param_counts(MTPModel(cfg))["total"]


def test_stage_params_split_the_model_and_divide_matrices_by_tp():
    cfg = ModelConfig(**SMALL, n_future=4)
    parts = stage_parts(cfg, 2)
    whole = stage_params(cfg, 1, [0, cfg.trunk_layers + 2])[0]
    assert sum(stage_params(cfg, 1, parts)) == pytest.approx(whole)
    norms = 2 * cfg.d_model * (cfg.trunk_layers + cfg.n_future) + cfg.d_model
    vocab_growth = (cfg.padded_vocab(2) - cfg.padded_vocab(1)) * cfg.d_model * 2  # embedding + unembedding
    assert sum(stage_params(cfg, 2, parts)) == pytest.approx((whole - norms + vocab_growth) / 2 + norms)


@pytest.mark.parametrize("dtype, width", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_layer_activations_equal_what_autograd_saves(dtype, width):
    """The formula against the bytes a real megatron layer hands to autograd (tp=1; bf16 norms save fp32)."""
    from pretrain.model.mtp import MTPModel

    cfg = ModelConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, n_future=1, max_seq_len=256)
    model = MTPModel(cfg, params_dtype=dtype)
    s, b = 128, 2
    x = torch.randn(s, b, cfg.d_model, requires_grad=True, dtype=dtype)
    rotary = model.rotary(s, x.device)
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()} | {rotary.untyped_storage().data_ptr()}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.layers[0](x, attention_mask=None, rotary_pos_emb=rotary)
    predicted = layer_activation_bytes(cfg, s * b, tp=1, width=width)
    assert sum(storages.values()) == pytest.approx(predicted, rel=0.05)


@pytest.mark.parametrize("dtype, expected", [
    # bytes per parameter (weights, gradients, optimizer) with dp = 8, as DeepSpeed 0.19.8 allocates
    # them with fp32 gradient accumulation (docs/planner.md); bf16 has no ZeRO-0
    # (gradients: the backward's; buffers: the fp32 ones DeepSpeed's optimizers keep all run)
    ("float32", {0: (4, 4, 0, 8), 1: (4, 4, 0, 12 / 8), 2: (4, 4 / 8, 0, 12 / 8)}),
    ("bfloat16", {1: (2, 2, 4, 12 / 8), 2: (2, 2, 4 / 8, 12 / 8)}),
])
def test_state_bytes_follow_deepspeed_per_zero_stage(dtype, expected):
    cfg = ModelConfig(**{**SMALL, "vocab_size": 32000, "d_model": 512}, n_future=4, loss_chunk_tokens=64)
    parts = [0, cfg.trunk_layers + 2]
    params = stage_params(cfg, 1, parts)[0]
    for zero, (w, g, b, o) in expected.items():
        mem = memory(cfg, Layout(1, 1, 8, 1, False, zero, dtype), 256, 4, parts)[0]
        assert (mem.weights, mem.grads, mem.grad_buffers, mem.optimizer) == pytest.approx(
            (w * params, g * params, b * params, o * params))


@pytest.mark.parametrize("dtype, width, grads", [("float32", 4, 4), ("bfloat16", 2, 2)])
def test_zero3_partitions_weights_and_gathers_the_head_block(dtype, width, grads):
    """ZeRO-3: weights, gradients and optimizer state / dp, plus the head block whole while the loss runs."""
    cfg = ModelConfig(**{**SMALL, "vocab_size": 32000, "d_model": 512}, n_future=4, loss_chunk_tokens=64)
    parts = [0, cfg.trunk_layers + 2]
    params = stage_params(cfg, 2, parts)[0]
    mem = memory(cfg, Layout(2, 1, 8, 1, False, 3, dtype), 256, 4, parts)[0]
    gathered = head_block_params(cfg, 2) * width
    assert 0 < gathered < params * width
    buffers = 4 if dtype == "bfloat16" else 0  # bf16: the fp32 gradient partition, kept all run
    assert (mem.weights, mem.grads, mem.grad_buffers, mem.optimizer) == pytest.approx(
        (width * params / 8 + gathered, grads * params / 8, buffers * params / 8, 12 * params / 8))
    zero2 = memory(cfg, Layout(2, 1, 8, 1, False, 2, dtype), 256, 4, parts)[0]
    assert mem.total < zero2.total


def test_zero3_runs_without_pipelines_only():
    cfg = ModelConfig(**{**SMALL, "n_layers": 8}, n_future=4)
    found, ruled_out = search(cfg, 64, 8, "float32", Hardware(gpus=4, gpu_memory_gb=80), flops_per_token=1e6)
    zero3 = [e.layout for e in found if e.layout.zero_stage == 3]
    assert zero3 and all(lay.pp == 1 for lay in zero3)
    assert any("ZeRO-3" in reason for reason in ruled_out)


def test_chunking_and_recompute_lower_memory():
    cfg = ModelConfig(**{**SMALL, "vocab_size": 32000, "d_model": 512}, n_future=4, loss_chunk_tokens=64)
    parts = [0, cfg.trunk_layers + 2]
    plain = memory(cfg, Layout(1, 1, 8, 1, False, 1, "bfloat16"), 256, 4, parts)[0]
    assert plain.loss_unchunked > plain.loss  # 256 tokens in 64-token chunks
    recompute = memory(cfg, Layout(1, 1, 8, 1, True, 1, "bfloat16"), 256, 4, parts)[0]
    assert recompute.activations < plain.activations and recompute.total < plain.total


def test_sequence_parallelism_splits_activations_and_stage_boundaries():
    cfg = ModelConfig(**{**SMALL, "n_layers": 8, "vocab_size": 32000}, n_future=4)
    # every tensor a layer saves is split: sp at tp=2 is exactly half of tp=1's layer
    assert layer_activation_bytes(cfg, 256, 2, 2, True) == pytest.approx(layer_activation_bytes(cfg, 256, 1, 2) / 2)
    assert layer_activation_bytes(cfg, 256, 2, 2, True) < layer_activation_bytes(cfg, 256, 2, 2)
    hw = Hardware(gpus=4, gpu_memory_gb=80)
    plain, sp = (estimate(cfg, Layout(2, 2, 1, 1, False, 1, "bfloat16", on), 256, 8, hw, flops_per_token=1e6)
                 for on in (False, True))
    for a, b in zip(plain.stages, sp.stages):
        assert b.weights == a.weights and b.optimizer == a.optimizer  # the same model and optimizer
        assert b.activations < a.activations and b.p2p == pytest.approx(a.p2p / 2)
    assert sp.stages[-1].loss < plain.stages[-1].loss
    assert sp.comm.pipeline_s == pytest.approx(plain.comm.pipeline_s / 2)
    assert sp.comm.tensor_s > plain.comm.tensor_s  # each head's normalised state is gathered for the loss


def test_sequence_parallelism_needs_tensor_parallelism_and_transformer_heads():
    cfg = ModelConfig(**SMALL, n_future=4)
    hw = Hardware(gpus=4, gpu_memory_gb=80)
    assert layout_problem(cfg, Layout(1, 1, 4, 1, False, 1, "bfloat16", True), 8, hw) == \
        "sequence parallelism needs tp > 1"
    linear = ModelConfig(**SMALL, n_future=4, head_type="linear")
    assert "transformer heads" in layout_problem(linear, Layout(2, 1, 2, 1, False, 1, "bfloat16", True), 8, hw)
    found, _ = search(cfg, 64, 8, "bfloat16", hw, flops_per_token=1e6)
    sp = [e.layout for e in found if e.layout.sequence_parallel]
    assert sp and all(lay.tp > 1 for lay in sp)


def test_pipeline_bubble_and_in_flight_micro_batches():
    cfg = ModelConfig(**{**SMALL, "n_layers": 8}, n_future=4)
    hw = Hardware(gpus=4, gpu_memory_gb=80)
    est = estimate(cfg, Layout(1, 4, 1, 1, False, 0, "float32"), 64, 8, hw, flops_per_token=1e6)
    assert est.bubble == pytest.approx(3 / (8 + 3))
    parts = stage_parts(cfg, 4)
    trunk = [sum(1 for i in range(a, b) if 1 <= i <= cfg.trunk_layers) for a, b in zip(parts, parts[1:])]
    per_layer = layer_activation_bytes(cfg, 64, 1, 4)
    in_flight = [4, 3, 2, 1]  # 1F1B: stage k holds pp - k micro-batches
    assert [s.activations for s in est.stages] == pytest.approx([n * t * per_layer for n, t in zip(in_flight, trunk)])
    assert est.stages[-1].loss > 0 and all(s.loss == 0 for s in est.stages[:-1])


def test_stage_parts_count_each_head_as_a_layer():
    cfg = ModelConfig(**SMALL, n_future=4)  # weights [0, 1, 1, 1, 1, 4]
    assert stage_parts(cfg, 2) == [0, 5, 6]  # all trunk layers on stage 0, the 4 heads alone on stage 1
    seven_b = ModelConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_future=4, match_params=True)  # 28 + 4
    parts = stage_parts(seven_b, 4)
    weights = [0] + [1] * 28 + [4]
    loads = [sum(weights[a:b]) for a, b in zip(parts, parts[1:])]
    assert max(loads) == 8 and parts[-2] < 29  # 32 layer-equivalents over 4 stages; the last holds the heads
    assert stage_parts(cfg, 2, [1, 3]) == [0, 2, 6]
    with pytest.raises(UserError, match="layers_per_stage"):
        stage_parts(cfg, 2, [2, 3])
    with pytest.raises(UserError, match="middle stage"):
        stage_parts(cfg, 3, [2, 0, 2])


def test_search_prefers_fitting_then_faster_layouts():
    cfg = SEVEN_B
    hw = Hardware(gpus=64, gpu_memory_gb=80)
    found, ruled_out = search(cfg, 4096, 2048, "bfloat16", hw, flops_per_token=6 * 7e9)
    fitting = [e for e in found if e.fits]
    assert fitting and not found[-1].fits
    assert [e.step_s for e in fitting] == sorted(e.step_s for e in fitting)
    assert all(e.peak_bytes + 4 * GB <= 80 * GB for e in fitting)
    assert any("spans nodes" in reason for reason in ruled_out)
    best = fitting[0]
    assert best.tokens_per_s == pytest.approx(2048 * 4096 / best.step_s)


def test_communication_is_charged_per_parallel_dimension():
    """tp all-reduces cost time on NVLink, a data-parallel group across nodes costs InfiniBand time."""
    hw = Hardware(gpus=64, gpu_memory_gb=80)
    fpt = 6 * 7e9

    def est(tp, pp, zero, mb=1, **kw):
        return estimate(SEVEN_B, Layout(tp, pp, 64 // (tp * pp), mb, True, zero, "bfloat16"), 4096, 2048,
                        Hardware(gpus=64, gpu_memory_gb=80, **kw), fpt)

    single = est(1, 1, 1)
    assert single.comm.tensor_s == 0 and single.comm.pipeline_s == 0
    assert single.comm.data_s == single.comm.data_exposed_s > 0  # ZeRO-1 reduces after the backward
    tp8 = est(8, 1, 1)
    assert tp8.comm.tensor_s > est(2, 1, 1).comm.tensor_s > 0
    assert tp8.step_s > single.step_s - single.comm.data_exposed_s, "tp=8 is no longer free"
    assert est(1, 4, 1).comm.pipeline_s > 0
    zero2 = est(1, 1, 2)
    assert zero2.comm.data_s > single.comm.data_s  # a reduce-scatter for every micro-batch
    assert zero2.comm.data_exposed_s < zero2.comm.data_s  # overlapped with the backward passes
    slow = est(1, 1, 2, overlap=False)
    assert slow.comm.data_exposed_s == pytest.approx(slow.comm.data_s) and slow.step_s > zero2.step_s
    slower_links = est(1, 1, 1, inter_node_gbs=hw.inter_node_gbs / 2)
    assert slower_links.comm.data_s == pytest.approx(2 * single.comm.data_s)


def test_mtp_plan_7b_prints_layouts(tmp_path):
    out = run_mtp("plan", "--config", "configs/7b.yaml", "--gpus", "64", "--gpu-memory-gb", "80", "--json")
    result = json.loads(out.stdout)
    assert result["best"] and result["best"][0]["fits"]
    assert result["params"] == pytest.approx(6.74e9, rel=0.01)
    cfg = load_config("configs/7b.yaml", [])
    best = result["best"][0]
    assert (best["tp"], best["pp"], best["zero_stage"], best["micro_batch"], best["recompute"]) == \
        (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.zero_stage, cfg.train.micro_batch_size,
         cfg.parallel.recompute), "configs/7b.yaml ships the layout mtp plan picks for 64 x 80 GB"
    text = run_mtp("plan", "--config", "configs/13b.yaml", "--gpus", "64", "--gpu-memory-gb", "80").stdout
    assert "days/100B" in text and "Why other layouts are out" in text


def test_mtp_plan_errors_are_one_line():
    out = run_mtp("plan", "--config", "configs/7b.yaml", "--gpus", "8", "--gpu-memory-gb", "0", check=False)
    assert out.returncode == 2 and "--gpu-memory-gb" in out.stderr and "Traceback" not in out.stderr
    small = run_mtp("plan", "--config", "configs/13b.yaml", "--gpus", "8", "--gpu-memory-gb", "16")
    assert "No layout fits" in small.stdout
