"""Tensor parallelism (tp=2, two gloo processes) against tp=1 in this process.

megatron initialises weights on the CPU as one master tensor split over
ranks, so with the same seed a tp=2 model holds exactly the shards of the
tp=1 model: losses and gradients must agree. The vocab-parallel fused
cross-entropy is also checked against megatron's own
`vocab_parallel_cross_entropy` on the same shards.
"""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pretrain.loss import IGNORE_INDEX, fused_cross_entropy
from pretrain.model.config import HEAD_TYPES, ModelConfig
from pretrain.model.mtp import MTPModel

VOCAB = 256  # a multiple of 128 * 2: the same padded vocabulary at tp=1 and tp=2
B, S, N = 2, 9, 2


def run_case(head_type: str) -> dict:
    """Loss, head losses and gradients of one float64 model on a fixed batch."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48,
                      n_future=N, head_type=head_type, loss_chunk_tokens=4)
    model = MTPModel(cfg, params_dtype=torch.float64)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (B, S), generator=gen)
    labels = torch.randint(0, VOCAB, (B, N, S), generator=gen)
    labels[0, :, -2:] = IGNORE_INDEX
    loss, head_losses = model(ids, labels)
    (loss * 8.0).backward()
    with torch.no_grad():
        logits = model.head_logits(ids)  # [b, s, n, V], gathered over ranks
    return {
        "logits": logits,
        "loss": loss.detach(),
        "head_losses": head_losses,
        "sq_norms": {n: p.grad.double().pow(2).sum() for n, p in model.named_parameters()},
        "split": {n: getattr(p, "tensor_model_parallel", False) for n, p in model.named_parameters()},
        "embedding": model.embedding.embed.weight.grad,
        "unembedding": model.unembedding.weight.grad,
    }


def megatron_ce_case(rank: int) -> dict:
    """Our fused CE and megatron's vocab-parallel CE on this rank's half of the vocabulary (float32)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(13, 16, generator=gen)
    weight = torch.randn(VOCAB, 16, generator=gen)[rank * 128 : (rank + 1) * 128]
    targets = torch.randint(0, VOCAB, (13,), generator=gen)
    grad_weight = torch.zeros_like(weight)
    ours, grad_hidden = fused_cross_entropy(hidden, weight, targets, VOCAB, 5, 1.0, grad_weight)
    hidden_leaf, weight_leaf = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    theirs = vocab_parallel_cross_entropy(hidden_leaf @ weight_leaf.t(), targets).sum()
    theirs.backward()
    dist.all_reduce(hidden_leaf.grad)  # the column-parallel input gradient is a sum over ranks
    return {"ours": (ours, grad_hidden, grad_weight), "theirs": (theirs.detach(), hidden_leaf.grad, weight_leaf.grad)}


def _worker(rank: int, port: int, out_dir: str) -> None:
    from parallel.megatron_setup import init_model_parallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    init_model_parallel(tp=2)
    results = {head_type: run_case(head_type) for head_type in HEAD_TYPES}
    results["ce"] = megatron_ce_case(rank)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def tp2_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("tp2")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_worker, args=(port, str(out_dir)), nprocs=2, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_tp2_matches_tp1(tp2_results, head_type):
    ref = run_case(head_type)
    ranks = [r[head_type] for r in tp2_results]
    for got in ranks:
        torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-10, atol=0)
        torch.testing.assert_close(got["head_losses"], ref["head_losses"], rtol=1e-10, atol=0)
        torch.testing.assert_close(got["logits"], ref["logits"], rtol=1e-10, atol=1e-12)
    for name, want in ref["sq_norms"].items():
        assert want > 0, name
        if ranks[0]["split"][name]:
            got = ranks[0]["sq_norms"][name] + ranks[1]["sq_norms"][name]
        else:
            got = ranks[0]["sq_norms"][name]
            torch.testing.assert_close(ranks[1]["sq_norms"][name], got, rtol=1e-10, atol=0)
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-20, msg=name)
    for part in ("embedding", "unembedding"):
        gathered = torch.cat([ranks[0][part], ranks[1][part]])
        torch.testing.assert_close(gathered, ref[part], rtol=1e-9, atol=1e-14, msg=part)


def test_vocab_parallel_fused_ce_matches_megatron(tp2_results):
    for rank in range(2):
        ours, theirs = tp2_results[rank]["ce"]["ours"], tp2_results[rank]["ce"]["theirs"]
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    full_logits_loss = tp2_results[0]["ce"]["ours"][0]
    gen = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(13, 16, generator=gen), torch.randn(VOCAB, 16, generator=gen)
    targets = torch.randint(0, VOCAB, (13,), generator=gen)
    torch.testing.assert_close(full_logits_loss, F.cross_entropy(hidden @ weight.t(), targets, reduction="sum"),
                               rtol=1e-5, atol=1e-5)
