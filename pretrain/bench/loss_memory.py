"""`mtp bench loss-memory`: peak memory and time of heads + unembedding + loss, naive against fused.

One forward + backward of the output side of an MTP model (heads, shared
unembedding, cross-entropy) on a random trunk output z, for n in {1, 4}:
"naive" materialises every head's logits and runs one backward; "fused" is
the training schedule (head by head, chunked logits); "liger" and "cce" are
the same schedule with liger-kernel's or cut-cross-entropy's fused linear +
cross-entropy in place of ours (pretrain/loss/library_ce.py), when
`--impls` names them. Every impl but naive also reports its gradient parity
with naive on the same weights and batch, measured after the timed steps
so the naive graph does not count in its memory. Each case runs in a
fresh subprocess so no allocator state leaks between cases. A warm-up step
runs first, then `--repeats` steps, each from no gradients (as after
`zero_grad(set_to_none=True)`); the fastest time is reported (the box may be
shared) and the peak over all of them.

Memory: on CPU, the peak resident set (VmHWM) minus the resident set
after setup (model, inputs); the high-water mark is reset after setup
through /proc/self/clear_refs so setup's own transient peak does not count,
and glibc is told to return every block >= 128 KiB to the OS on free
(MALLOC_MMAP_THRESHOLD_) so the resident set follows live tensors. On GPU,
torch.cuda.max_memory_allocated minus the allocation after setup, in bf16.
Setup ends after the warm-up step, so the baseline holds the model, the
inputs and one set of gradients, as in steady-state training; the measured
steps free and re-create those gradients, so the peak above the baseline is
the step's activations, logits and other temporaries.

Heavy imports happen inside the handlers so `mtp --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from pretrain.errors import UserError

if TYPE_CHECKING:
    import torch

N_VALUES = (1, 4)
IMPLS = ("naive", "fused", "liger", "cce")
# The paper's claims as checkable targets: (description, measured ratio, limit, "<=" or ">=").
TARGETS = (
    ("fused n=4 memory / fused n=1 memory", ("fused", 4, "peak_mib"), ("fused", 1, "peak_mib"), 1.10, "<="),
    ("naive n=4 memory / fused n=4 memory", ("naive", 4, "peak_mib"), ("fused", 4, "peak_mib"), 4.0, ">="),
    ("fused n=4 time / naive n=4 time", ("fused", 4, "seconds"), ("naive", 4, "seconds"), 1.15, "<="),
)


@dataclass
class Case:
    impl: str
    n_future: int
    tokens: int
    seq_len: int
    vocab: int
    d_model: int
    head_type: str
    chunk_tokens: int
    device: str
    repeats: int


def register(subparsers, bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "loss-memory",
        help="peak memory and time of the MTP loss, naive vs fused",
        description="One forward+backward of heads + unembedding + loss for n=1 and n=4, naive "
        "(all logits, one backward) against the fused head-by-head schedule, each in a fresh process.",
    )
    p.add_argument("--tokens", type=int, default=8192, help="tokens per step (batch x sequence)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (attention length of the heads)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--d-model", type=int, default=1024, help="hidden size; attention heads of 64 dims")
    p.add_argument("--head-type", default="transformer", choices=("transformer", "linear", "sequential"))
    p.add_argument("--chunk-tokens", type=int, default=1024, help="tokens per chunk of the fused loss")
    p.add_argument("--small", action="store_true",
                   help="a quick shape: 1024 tokens, seq 256, vocab 4096, d 256, chunks of 256")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per case; the fastest is reported")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--impls", default="naive,fused",
                   help="comma-separated from naive, fused, liger, cce; 'available': naive, fused and each "
                        "library that runs here")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.set_defaults(func=run)


def _cases(args: argparse.Namespace) -> list[Case]:
    if args.small:
        args.tokens, args.seq_len, args.vocab, args.d_model, args.chunk_tokens = 1024, 256, 4096, 256, 256
    if min(args.tokens, args.seq_len, args.vocab, args.d_model, args.chunk_tokens, args.repeats) < 1:
        raise UserError("--tokens, --seq-len, --vocab, --d-model, --chunk-tokens and --repeats must be >= 1")
    if args.tokens % args.seq_len or args.d_model % 64:
        raise UserError("--tokens must be a multiple of --seq-len and --d-model a multiple of 64")
    from parallel.runtime import local_decision

    decided = local_decision().device.split(":")[0]
    if args.device == "cuda" and decided != "cuda":
        raise UserError("--device cuda but no CUDA GPU is visible; use --device cpu")
    device = decided if args.device == "auto" else args.device
    impls = _impls(args.impls, device)
    shape = dict(tokens=args.tokens, seq_len=args.seq_len, vocab=args.vocab, d_model=args.d_model,
                 head_type=args.head_type, chunk_tokens=args.chunk_tokens, device=device, repeats=args.repeats)
    return [Case(impl=impl, n_future=n, **shape) for n in N_VALUES for impl in impls]


def _impls(spec: str, device: str) -> list[str]:
    """The impls to measure, in IMPLS order; a library that cannot run here is a UserError naming the fix."""
    from parallel.kernels import LIBRARIES, library_problem

    if spec == "available":
        return ["naive", "fused", *(name for name in LIBRARIES if library_problem(name, device) is None)]
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = sorted(set(names) - set(IMPLS))
    if unknown or not names:
        raise UserError(f"--impls takes names from {', '.join(IMPLS)} (or 'available'), got '{spec}'")
    for name in names:
        why = library_problem(name, device) if name in LIBRARIES else None
        if why:
            raise UserError(f"--impls {name}: {why}")
    return [name for name in IMPLS if name in names]


def _run_in_subprocess(case: Case) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    cmd = [sys.executable, "-m", "pretrain.bench.loss_memory", json.dumps(asdict(case))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"case {case.impl} n={case.n_future} failed ({tail[0]}); try a smaller shape, e.g. --small")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratios(rows: list[dict]) -> list[dict]:
    """The paper's targets whose two cases were measured."""
    table = {(r["impl"], r["n_future"]): r for r in rows}
    checks = []
    for name, (ia, na, key), (ib, nb, _), limit, op in TARGETS:
        if (ia, na) not in table or (ib, nb) not in table:
            continue
        ratio = table[(ia, na)][key] / table[(ib, nb)][key]
        met = ratio <= limit if op == "<=" else ratio >= limit
        checks.append({"ratio": name, "value": round(ratio, 3), "target": f"{op} {limit}", "met": met})
    return checks


def _print_table(result: dict) -> None:
    print(f"device: {result['device']}  shape: {result['shape']}")
    print(f"{'impl':<6} {'n':>2} {'peak MiB':>10} {'seconds':>9} {'loss err':>9} {'grad err':>9}")
    for row in result["rows"]:
        errors = "".join(f" {row[key]:>9.1e}" if key in row else f" {'-':>9}" for key in ("loss_err", "grad_err"))
        print(f"{row['impl']:<6} {row['n_future']:>2} {row['peak_mib']:>10.1f} {row['seconds']:>9.2f}{errors}")
    for check in result["targets"]:
        status = "met" if check["met"] else "NOT met"
        print(f"{check['ratio']}: {check['value']} (target {check['target']}: {status})")


def run(args: argparse.Namespace) -> int:
    cases = _cases(args)
    rows = [_run_in_subprocess(case) for case in cases]
    first = cases[0]
    result = {
        "device": rows[0]["device_name"],
        "shape": f"tokens={first.tokens} seq_len={first.seq_len} vocab={first.vocab} d_model={first.d_model} "
        f"head_type={first.head_type} chunk_tokens={first.chunk_tokens} dtype={rows[0]['dtype']}",
        "rows": rows,
        "targets": _ratios(rows),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_table(result)
    return 0


def _build(case: Case):
    """Model (1 trunk layer, unused), random trunk output z [s, b, d] and labels [b, n, s]."""
    import torch

    from parallel.megatron_setup import init_model_parallel
    from pretrain.model.config import ModelConfig
    from pretrain.model.mtp import MTPModel

    init_model_parallel()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if case.device == "cuda" else torch.float32
    cfg = ModelConfig(vocab_size=case.vocab, d_model=case.d_model, n_heads=case.d_model // 64, n_layers=2,
                      n_future=case.n_future, head_type=case.head_type, max_seq_len=case.seq_len,
                      loss_chunk_tokens=case.chunk_tokens)
    model = MTPModel(cfg, params_dtype=dtype).to(case.device)  # built on the CPU, as generation builds models
    batch = case.tokens // case.seq_len
    z = torch.randn(case.seq_len, batch, case.d_model, device=case.device, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, case.vocab, (batch, case.n_future, case.seq_len), device=case.device)
    return model, z, labels


def _step(impl: str, model, z, labels) -> torch.Tensor:
    """One forward + backward of heads + unembedding + loss; returns the per-head losses [n]."""
    from pretrain.loss import mtp_loss, naive_mtp_loss
    from pretrain.loss.library_ce import library_cross_entropy

    if impl == "fused":
        loss, head_losses = model.head_loss(z, labels)
    else:
        targets = labels.permute(1, 2, 0).contiguous()  # [n, s, b]
        stack = model.head_stack(z.shape[0], z.device, lambda i, _: targets[i].clamp(min=0))
        scales = model.cfg.head_scales(0)
        if impl == "naive":
            loss, head_losses = naive_mtp_loss(z, targets, stack, scales)
        else:
            cross_entropy = library_cross_entropy(impl, z.device.type)
            loss, head_losses = mtp_loss(z, targets, stack, scales, model.cfg.loss_chunk_tokens, cross_entropy)
    loss.backward()
    return head_losses


def _gradients(impl: str, model, z, labels) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-head losses [n] and, in float32 and by name, the gradients of z and every parameter, from none."""
    import torch

    model.zero_grad(set_to_none=True)
    z.grad = None
    head_losses = _step(impl, model, z, labels).float()
    grads = {name: torch.zeros_like(p) if p.grad is None else p.grad for name, p in model.named_parameters()}
    return head_losses, {name: g.float() for name, g in {"z": z.grad, **grads}.items()}


def _parity(impl: str, model, z, labels) -> dict:
    """Largest relative error of the per-head losses and of any one gradient tensor, against naive."""
    losses, grads = _gradients(impl, model, z, labels)
    ref_losses, ref_grads = _gradients("naive", model, z, labels)
    grad_err = max(((grads[k] - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()
                   for k, ref in ref_grads.items())
    return {"loss_err": ((losses - ref_losses).abs().max() / ref_losses.abs().max()).item(), "grad_err": grad_err}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """The process's resident high-water mark (VmHWM), which clear_refs resets.

    Not getrusage's ru_maxrss: that also keeps the peak recorded when any
    thread exits, so a thread ending after setup would bring setup's peak back.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line")


def measure(case: Case) -> dict:
    """Peak extra memory (MiB) and seconds of one step, in this (fresh) process."""
    import platform
    import time

    import torch

    model, z, labels = _build(case)
    _step(case.impl, model, z, labels)  # warm-up: one-time kernel and allocator set-up is not timed
    cuda = case.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS to the current RSS: setup's transient peak must not count
        base = _rss_bytes()
    times = []
    for _ in range(case.repeats):
        model.zero_grad(set_to_none=True)
        z.grad = None
        start = time.perf_counter()
        _step(case.impl, model, z, labels)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else _peak_rss_bytes()
    parity = {} if case.impl == "naive" else _parity(case.impl, model, z, labels)
    return {
        "impl": case.impl,
        "n_future": case.n_future,
        "peak_mib": (peak - base) / 2**20,
        "seconds": min(times),
        "dtype": str(z.dtype).removeprefix("torch."),
        "device_name": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        **parity,
    }


if __name__ == "__main__":
    print(json.dumps(measure(Case(**json.loads(sys.argv[1])))))
