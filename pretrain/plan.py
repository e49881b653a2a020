"""`mtp plan`: which tensor x pipeline x data layout fits a model on N GPUs, and how fast it would train.

    mtp plan --config configs/7b.yaml --gpus 64 --gpu-memory-gb 80 [--gpu-tflops 989] [--mfu 0.4]

prints the best layouts, the memory of the best one by part, and why the
others were ruled out (parallel/planner.py holds the model, docs/planner.md
the formulas). `--measure` instead runs real optimizer steps of the config
on this machine (CPU, float32; under torchrun for tp/pp/dp > 1) and sets
each rank's measured peak memory beside the model's prediction for its
stage: the check behind the planner's numbers.
"""

import json
import os

from pretrain.errors import UserError

TOKENS_100B = 100e9


def register(subparsers, bench_subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="find the tensor/pipeline/data layout that fits and trains fastest",
        description="Estimate memory per GPU and training speed of every tensor x pipeline x data parallel "
                    "layout (with micro-batch size, recomputation and ZeRO stage) of a run config.",
    )
    p.add_argument("--config", required=True, help="run config, e.g. configs/7b.yaml")
    p.add_argument("--gpus", type=int, help="GPUs in the job (required unless --measure)")
    p.add_argument("--gpu-memory-gb", type=float, help="memory of one GPU in GB, e.g. 80 (required unless --measure)")
    p.add_argument("--gpu-tflops", type=float, default=989.0, help="peak dense TFLOP/s of one GPU in the run's dtype")
    p.add_argument("--mfu", type=float, default=0.55,
                   help="fraction of peak the computation itself reaches (communication is modelled apart)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="tensor parallelism stays within a node")
    p.add_argument("--reserve-gb", type=float, default=4.0, help="memory kept free per GPU (context, buffers)")
    p.add_argument("--intra-node-gbs", type=float, default=360.0,
                   help="NCCL bus bandwidth per GPU inside a node, GB/s (default: H100 SXM, NVLink 4)")
    p.add_argument("--inter-node-gbs", type=float, default=45.0,
                   help="bandwidth per GPU across nodes, GB/s (default: one 400 Gb/s InfiniBand NIC per GPU)")
    p.add_argument("--no-overlap", action="store_true",
                   help="charge every data-parallel byte to the step (no overlap with the backward pass)")
    p.add_argument("--top", type=int, default=10, help="layouts to list")
    p.add_argument("--measure", action="store_true",
                   help="run real steps here and compare each rank's peak memory with the prediction")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps to measure (with --measure)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. model.n_future=4")
    p.set_defaults(func=run)


def run(args) -> int:
    from pretrain.config import load_config

    cfg = load_config(args.config, args.overrides)
    _fill_vocab(cfg)
    cfg.model.validate()
    if args.measure:
        return measure(cfg, args.steps, args.json)
    if not args.gpus or not args.gpu_memory_gb:
        raise UserError("mtp plan needs --gpus N and --gpu-memory-gb GB (or --measure to check the model here)")
    checks = [(args.gpus >= 1, "--gpus must be >= 1"), (args.gpu_memory_gb > 0, "--gpu-memory-gb must be > 0"),
              (args.gpu_tflops > 0, "--gpu-tflops must be > 0"), (0 < args.mfu <= 1, "--mfu must be in (0, 1]"),
              (args.gpus_per_node >= 1, "--gpus-per-node must be >= 1"), (args.top >= 1, "--top must be >= 1"),
              (args.reserve_gb >= 0, "--reserve-gb must be >= 0"),
              (args.intra_node_gbs > 0 and args.inter_node_gbs > 0, "--intra-node-gbs and --inter-node-gbs must be > 0")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    result = plan(cfg, args)
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


def _fill_vocab(cfg) -> None:
    """The planner needs the vocabulary size: from the config, else from the prepared data's tokenizer."""
    if cfg.model.vocab_size is not None:
        return
    from data_pipeline.feed import tokenizer_location

    info = os.path.join(tokenizer_location(cfg.data), "tokenizer_info.json")
    if not os.path.isfile(info):
        raise UserError(f"model.vocab_size is not set and {info} does not exist; set model.vocab_size=N")
    with open(info) as f:
        cfg.model.vocab_size = json.load(f)["vocab_size"]


def plan(cfg, args) -> dict:
    """Search every layout; return plain data for the table (or --json)."""
    from parallel.planner import Hardware, Layout, estimate, search, total_params
    from pretrain.model.counting import flops_per_token

    hw = Hardware(args.gpus, args.gpu_memory_gb, args.gpu_tflops, args.mfu, args.gpus_per_node, args.reserve_gb,
                  args.intra_node_gbs, args.inter_node_gbs, overlap=not args.no_overlap)
    m, t, p = cfg.model, cfg.train, cfg.parallel
    fpt = flops_per_token(m, t.seq_len)
    found, ruled_out = search(m, t.seq_len, t.global_batch_size, p.dtype, hw, fpt)
    fitting = [e for e in found if e.fits]
    shapes = _best_per_shape(fitting)
    result = {
        "config": args.config, "params": total_params(m), "n_future": m.n_future,
        "trunk_layers": m.trunk_layers, "seq_len": t.seq_len, "global_batch": t.global_batch_size,
        "dtype": p.dtype, "flops_per_token": fpt, "hardware": vars(hw),
        "best": [_row(e, hw) for e in shapes[: args.top]],
        "ruled_out": ruled_out,
        "too_big": [_row(e, hw) for e in _best_per_shape([e for e in found if not e.fits])][:5],
        "fitting_layouts": len(fitting), "layouts_considered": len(found),
    }
    if fitting:
        result["breakdown"] = _breakdown(fitting[0])
    dp = args.gpus // (p.tp * p.pp) if args.gpus % (p.tp * p.pp) == 0 else 0
    if dp:
        own = Layout(p.tp, p.pp, dp, t.micro_batch_size, p.recompute, p.zero_stage, p.dtype, p.sequence_parallel)
        try:
            result["config_layout"] = _row(estimate(m, own, t.seq_len, t.global_batch_size, hw, fpt), hw)
        except (UserError, ZeroDivisionError):
            pass
    return result


def _best_per_shape(ranked: list) -> list:
    """The first (best-ranked) variant (micro-batch, recompute, ZeRO, SP) of each (tp, pp), in rank order."""
    seen, out = set(), []
    for est in ranked:
        shape = (est.layout.tp, est.layout.pp)
        if shape not in seen:
            seen.add(shape)
            out.append(est)
    return out


def _row(est, hw) -> dict:
    lay = est.layout
    return {
        "tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "micro_batch": lay.micro_batch, "recompute": lay.recompute,
        "zero_stage": lay.zero_stage, "sequence_parallel": lay.sequence_parallel, "memory_gb": est.peak_bytes / 1024**3, "worst_stage": est.peak_stage,
        "largest": est.stages[est.peak_stage].largest(), "fits": est.fits, "bubble": est.bubble,
        "micro_batches": est.micro_batches, "step_s": est.step_s, "tokens_per_s": est.tokens_per_s,
        "days_per_100b": est.days_per(TOKENS_100B), "mfu": est.model_mfu,
        "comm_s": {"tensor": est.comm.tensor_s, "pipeline": est.comm.pipeline_s, "data": est.comm.data_s,
                   "data_exposed": est.comm.data_exposed_s},
    }


def _breakdown(est) -> dict:
    mem = est.stages[est.peak_stage]
    gb = 1024**3
    return {"stage": est.peak_stage, "weights": mem.weights / gb, "grads": (mem.grads + mem.grad_buffers) / gb,
            "optimizer": mem.optimizer / gb, "activations": mem.activations / gb, "loss": mem.loss / gb,
            "loss_unchunked": mem.loss_unchunked / gb, "p2p": mem.p2p / gb, "total": mem.total / gb,
            "stages_gb": [s.total / gb for s in est.stages]}


def _layout_text(row: dict) -> str:
    rc = "recompute" if row["recompute"] else "no recompute"
    sp = " sequence-parallel" if row["sequence_parallel"] else ""
    return (f"tp={row['tp']} pp={row['pp']} dp={row['dp']} micro-batch={row['micro_batch']} {rc} "
            f"ZeRO-{row['zero_stage']}{sp}")


def _table(rows: list[dict]) -> list[str]:
    head = f"{'tp':>3} {'pp':>3} {'dp':>4} {'mb':>3} {'recomp':>6} {'zero':>4} {'sp':>3} {'GB/GPU':>7} {'bubble':>7} " \
           f"{'comm s':>15} {'step s':>7} {'tokens/s':>10} {'days/100B':>9} {'MFU':>5}"
    lines = [head, f"{'(tensor/pipe/data)':>80}"]
    for r in rows:
        recompute = "yes" if r["recompute"] else "no"
        sp = "yes" if r["sequence_parallel"] else "no"
        c = r["comm_s"]
        comm = f"{c['tensor']:.2f}/{c['pipeline']:.2f}/{c['data_exposed']:.2f}"
        lines.append(f"{r['tp']:>3} {r['pp']:>3} {r['dp']:>4} {r['micro_batch']:>3} {recompute:>6} "
                     f"{r['zero_stage']:>4} {sp:>3} {r['memory_gb']:>7.1f} {r['bubble']:>6.1%} {comm:>15} {r['step_s']:>7.2f} "
                     f"{r['tokens_per_s']:>10,.0f} {r['days_per_100b']:>9.2f} {r['mfu']:>5.2f}")
    return lines


def render(result: dict) -> str:
    hw = result["hardware"]
    lines = [
        f"{result['config']}: {result['params'] / 1e9:.2f}B parameters, n_future={result['n_future']} "
        f"({result['trunk_layers']} trunk layers), seq {result['seq_len']}, {result['global_batch']} sequences/step, "
        f"{result['dtype']}",
        f"{hw['gpus']} GPUs x {hw['gpu_memory_gb']:g} GB ({hw['reserve_gb']:g} GB kept free), "
        f"{hw['gpu_tflops']:g} TFLOP/s peak, computation at {hw['mfu']:g} of it; NVLink {hw['intra_node_gbs']:g} GB/s, "
        f"InfiniBand {hw['inter_node_gbs']:g} GB/s per GPU, data-parallel overlap {'on' if hw['overlap'] else 'off'}",
        "",
    ]
    if not result["best"]:
        lines.append("No layout fits. Fastest layouts and what overflows:")
    else:
        lines.append(f"{result['fitting_layouts']} of {result['layouts_considered']} layouts fit; the best of each "
                     "tensor x pipeline shape, fastest first:")
        lines += _table(result["best"])
        lines += ["", _breakdown_text(result["best"][0], result["breakdown"])]
    if "config_layout" in result:
        row = result["config_layout"]
        verdict = "fits" if row["fits"] else f"does NOT fit ({row['largest']} is the largest part)"
        lines += ["", f"The config's own layout ({_layout_text(row)}): {row['memory_gb']:.1f} GB/GPU, {verdict}, "
                      f"{row['step_s']:.2f} s/step, {row['days_per_100b']:.2f} days/100B tokens"]
    lines += ["", "Why other layouts are out:"]
    lines += [f"  {count:>4} x {reason}" for reason, count in sorted(result["ruled_out"].items(), key=lambda x: -x[1])]
    for row in result["too_big"]:
        usable = hw["gpu_memory_gb"] - hw["reserve_gb"]
        lines.append(f"  {_layout_text(row)}: {row['memory_gb']:.1f} GB > {usable:g} GB "
                     f"usable (stage {row['worst_stage']}: {row['largest']})")
    return "\n".join(lines)


def _breakdown_text(row: dict, b: dict) -> str:
    stages = " / ".join(f"{gb:.1f}" for gb in b["stages_gb"])
    return (f"Best: {_layout_text(row)}, {row['micro_batches']} micro-batches per step.\n"
            f"  memory of its fullest stage ({b['stage']}), GB per GPU: weights {b['weights']:.1f}, gradients "
            f"{b['grads']:.1f}, optimizer {b['optimizer']:.1f}, activations {b['activations']:.1f}, loss buffers "
            f"{b['loss']:.2f} (unchunked: {b['loss_unchunked']:.2f}), pipeline buffers {b['p2p']:.2f}; "
            f"total {b['total']:.1f}\n  every stage, GB: {stages}")



# ---- --measure: the model against real steps on this machine -------------------------------

def measure(cfg, steps: int, as_json: bool) -> int:
    """Each rank's peak memory over real optimizer steps (CPU) beside the prediction for its stage.

    Measured = peak resident memory (VmHWM, reset after start-up) minus the
    resident memory just before the model is built, with glibc told to serve
    every block over 64 KiB by mmap so freed tensors leave the process and
    the peak follows live tensors rather than the allocator's free lists.
    The steps are the trainer's (`parallel.steps`), in the config's dtype:
    bf16 on a CPU holds exactly the tensors it holds on a GPU.
    """
    import itertools

    import torch.distributed as dist

    from parallel.planner import Layout, memory
    from parallel.runtime import local_decision, start
    from parallel.topology import check_parallel, stage_parts
    from pretrain.config import validate

    if local_decision().backend != "gloo" or steps < 1:
        raise UserError("--measure checks the memory model on CPUs with --steps >= 1; on GPUs read the engine's "
                        "own memory report instead")
    validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    check_parallel(cfg)
    _serve_big_blocks_by_mmap()
    p, t = cfg.parallel, cfg.train
    runtime = start(p.tp, p.pp, p.dtype, cfg.fault.collective_timeout_s, sequence_parallel=p.sequence_parallel)
    import parallel.steps  # noqa: F401  (imports happen before the baseline is taken)

    place = runtime.place
    baseline = _status_kb("VmRSS")
    _reset_peak()
    steps_engine = parallel.steps.Steps.open(cfg, runtime)
    batches = itertools.cycle(_batches(cfg, count=4)) if place.feeds_data else None
    for step in range(steps):
        steps_engine.train_step(batches, step)
    measured = (_status_kb("VmHWM") - baseline) * 1024
    lay = Layout(p.tp, p.pp, place.dp_size, t.micro_batch_size, p.recompute, p.zero_stage, p.dtype,
                 p.sequence_parallel)
    micro = t.global_batch_size // (place.dp_size * t.micro_batch_size)
    parts = stage_parts(cfg.model, p.pp)
    predicted = memory(cfg.model, lay, t.seq_len, micro, parts)[place.pp_rank]
    row = {"rank": place.rank, "stage": place.pp_rank, "tp_rank": place.tp_rank, "dp_rank": place.dp_rank,
           "predicted_mb": predicted.total / 2**20, "measured_mb": measured / 2**20}
    rows = [None] * place.world_size
    dist.all_gather_object(rows, row)
    if place.rank == 0:
        print(json.dumps(rows, indent=2) if as_json else _measure_table(rows, lay))
    dist.barrier()
    return 0


def _batches(cfg, count: int) -> list[dict]:
    """Random loader-shaped micro-batches (memory does not depend on the token values)."""
    import torch

    t, m = cfg.train, cfg.model
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        tokens = torch.randint(0, m.vocab_size, (t.micro_batch_size, t.seq_len + m.n_future), generator=gen)
        labels = torch.stack([tokens[:, k:k + t.seq_len] for k in range(1, m.n_future + 1)], dim=1)
        out.append({"input_ids": tokens[:, : t.seq_len], "labels": labels})  # [mb, s], [mb, n, s]
    return out


def _serve_big_blocks_by_mmap() -> None:
    import ctypes

    ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD: fixed, so large frees return to the OS


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} missing from /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size


def _measure_table(rows: list[dict], lay) -> str:
    lines = [f"layout tp={lay.tp} pp={lay.pp} dp={lay.dp} micro-batch={lay.micro_batch} "
             f"recompute={'yes' if lay.recompute else 'no'} ZeRO-{lay.zero_stage}"
             f"{' sequence-parallel' if lay.sequence_parallel else ''}",
             f"{'rank':>4} {'stage':>5} {'predicted MB':>12} {'measured MB':>11} {'error':>7}"]
    for r in rows:
        error = (r["predicted_mb"] - r["measured_mb"]) / r["measured_mb"]
        lines.append(f"{r['rank']:>4} {r['stage']:>5} {r['predicted_mb']:>12.1f} {r['measured_mb']:>11.1f} "
                     f"{error:>+7.1%}")
    return "\n".join(lines)
