"""`mtp bench checkpoint`: save and load a model of about a gigabyte of training state, and project to 7B/13B.

For each rank count a real torchrun group (pretrain/bench/checkpoint_worker.py)
builds the model under DeepSpeed (ZeRO-1, float32: weights 4 + fp32
master 4 + Adam 8 bytes per parameter) and measures, per rank, the write
with and without the on-the-fly checksum, the checksum rates, the host copy
of an asynchronous save, the training stall of one checkpoint with
`checkpoint.async` off and on, and the resume (verification + load).

Projections: a 7B or 13B run checkpoints bf16 weights (2 bytes per
parameter, once per model replica) and the fp32 master + Adam partitions (12)
= 14 bytes per parameter. Every rank writes its share at once, so the write
takes checkpoint / (nodes x per-node file-system bandwidth); each rank
checksums its share at the measured XXH3 rate; an asynchronous save stalls
training for the host copy of a rank's share (at `--host-copy-gbps`, device
to pinned host memory on a GPU) plus the time the save call blocked here. The
synchronous figure is the write itself; before this change rank 0 also
hashed the whole checkpoint alone with sha256 (the column "rank-0 sha256").
"""

import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

from pretrain.errors import UserError

REPO = Path(__file__).resolve().parents[2]
BYTES_PER_PARAM = 14  # bf16 weights + fp32 master + Adam m and v (ZeRO-1/bf16, the 7B/13B configs' layout)


def register(subparsers, bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "checkpoint", help="checkpoint write, checksum, load and training stall; 7B/13B projections",
        description="Save and load a model of about 1 GB of training state on 1 and 2 ranks (torchrun, gloo): "
                    "seconds and GB/s for write, checksum and load, the training stall per checkpoint with "
                    "checkpoint.async off and on, and projections for 7B and 13B.",
    )
    p.add_argument("--ranks", default="1,2", help="comma-separated rank counts to measure (default 1,2)")
    p.add_argument("--d-model", type=int, default=1024, help="model width (default 1024)")
    p.add_argument("--layers", type=int, default=5, help="model.n_layers (default 5: 4 trunk layers + 2 heads)")
    p.add_argument("--steps", type=int, default=3, help="undisturbed steps timed for the baseline")
    p.add_argument("--repeats", type=int, default=3,
                   help="writes with and without checksum (fastest kept) and saves per mode (median)")
    p.add_argument("--fs-gbps-per-node", type=float, default=2.0,
                   help="file-system write/read bandwidth per node for the projections (GB/s, default 2)")
    p.add_argument("--nodes", type=int, default=8, help="nodes of the projected 7B/13B runs (default 8)")
    p.add_argument("--ranks-per-node", type=int, default=8, help="GPUs per node of the projected runs (default 8)")
    p.add_argument("--host-copy-gbps", type=float, default=20.0,
                   help="device-to-host copy rate per GPU for the async projection (GB/s, default 20: PCIe 4 x16)")
    p.add_argument("--tmp", default=None, help="where checkpoints are written (default: the system temp dir)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    counts = _rank_counts(args.ranks)
    for name in ("d_model", "layers", "steps", "repeats", "nodes", "ranks_per_node"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.fs_gbps_per_node <= 0 or args.host_copy_gbps <= 0:
        raise UserError("--fs-gbps-per-node and --host-copy-gbps must be > 0")
    measured = [measure(n, args) for n in counts]
    projected = [project(label, cfg, args, measured) for label, cfg in (("7B", "configs/7b.yaml"),
                                                                        ("13B", "configs/13b.yaml"))]
    if args.json:
        print(json.dumps({"measured": measured, "projected": projected}, indent=2))
    else:
        print(markdown(measured, projected, args))
    return 0


def _rank_counts(text: str) -> list[int]:
    try:
        counts = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise UserError(f"--ranks must be comma-separated positive rank counts, e.g. 1,2; got {text!r}")
    return counts


def measure(ranks: int, args) -> dict:
    """One torchrun group of `ranks` processes; the slowest rank's figures (what the group waits for)."""
    with tempfile.TemporaryDirectory(prefix="mtp-bench-ckpt-", dir=args.tmp) as tmp:
        plan = Path(tmp) / "plan.json"
        out = Path(tmp) / "out.json"
        plan.write_text(json.dumps({"d_model": args.d_model, "layers": args.layers, "steps": args.steps,
                                    "repeats": args.repeats, "out": str(out), "dir": str(Path(tmp) / "run")}))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               "-m", "pretrain.bench.checkpoint_worker", str(plan)]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MTP_FAULT")}
        done = subprocess.run(cmd, cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
        if done.returncode != 0 or not out.is_file():
            raise UserError(f"the {ranks}-rank measurement failed:\n" + "\n".join(done.stderr.splitlines()[-20:]))
        rows = json.loads(out.read_text())["rows"]
    return summarize(ranks, rows)


def summarize(ranks: int, rows: list[dict]) -> dict:
    slowest = max(rows, key=lambda r: r["write_hashed_s"])
    total = sum(r["bytes"] for r in rows)

    def worst(key: str, sub: str | None = None) -> float:
        return max((r[sub][key] if sub else r[key]) for r in rows)

    return {
        "ranks": ranks, "checkpoint_gb": rows[0]["checkpoint_bytes"] / 1e9, "rank_gb": slowest["bytes"] / 1e9,
        "step_s": worst("step_s"),
        "write_s": worst("write_hashed_s"), "write_gbps": total / worst("write_hashed_s") / 1e9,
        "write_plain_s": worst("write_plain_s"),
        "checksum_overhead": worst("write_hashed_s") / worst("write_plain_s") - 1,
        # What hashing costs the writing thread (its bytes at the in-memory XXH3 rate) over the write's time:
        # on a shared machine the two writes' difference is mostly the disk's noise.
        "checksum_share": max(r["bytes"] / (r["xxh3_gbps"] * 1e9) / r["write_plain_s"] for r in rows),
        "xxh3_gbps": min(r["xxh3_gbps"] for r in rows), "sha256_gbps": min(r["sha256_gbps"] for r in rows),
        "host_copy_s": worst("host_copy_s"), "host_copy_gbps": slowest["bytes"] / worst("host_copy_s") / 1e9,
        "stall_sync_s": worst("stall_s", "sync"), "stall_async_s": worst("stall_s", "async"),
        "stall_async_first_s": worst("stall_s", "async_first"), "async_blocked_s": worst("save_call_s", "async"),
        "async_steps_during": worst("steps_during", "async"),
        "verify_s": worst("verify_s"), "load_s": worst("load_s"),
        "load_gbps": rows[0]["checkpoint_bytes"] / (worst("verify_s") + worst("load_s")) / 1e9,
    }


def project(label: str, config: str, args, measured: list[dict]) -> dict:
    """A 7B/13B checkpoint on the cluster of the flags, at the rates measured here.

    Checksum rates: the best measured (a rank with a core to itself, as on a
    GPU node); the time blocked in an asynchronous save: the worst.
    """
    from parallel.planner import total_params
    from pretrain.config import load_config

    cfg = load_config(config, [])
    params = total_params(cfg.model)
    size = params * BYTES_PER_PARAM
    ranks = args.nodes * args.ranks_per_node
    share = size / ranks
    write = size / (args.nodes * args.fs_gbps_per_node * 1e9)
    xxh3, sha256 = max(m["xxh3_gbps"] for m in measured), max(m["sha256_gbps"] for m in measured)
    checksum = share / (xxh3 * 1e9)
    # The loop is blocked for the capture and the host copy; on GPUs the copy runs at the device-to-host
    # rate and the writer thread does not compete with the training for the device. The time blocked here
    # (capture and a host-memory copy on this machine) is added whole: an upper bound of the fixed costs.
    async_stall = share / (args.host_copy_gbps * 1e9) + max(m["async_blocked_s"] for m in measured)
    return {
        "model": label, "params_b": params / 1e9, "checkpoint_gb": size / 1e9, "rank_gb": share / 1e9,
        "write_s": write, "checksum_s": checksum, "stall_sync_s": write + checksum, "stall_async_s": async_stall,
        "rank0_sha256_s": size / (sha256 * 1e9),
        "load_s": size / (args.nodes * args.fs_gbps_per_node * 1e9) + checksum,
    }


def markdown(measured: list[dict], projected: list[dict], args) -> str:
    from parallel.runtime import local_decision

    device = "CUDA" if local_decision().device != "cpu" else "no GPU"
    lines = [
        f"`mtp bench checkpoint --ranks {args.ranks} --d-model {args.d_model} --layers {args.layers}` on "
        f"{date.today().isoformat()}, {platform.node()} ({os.cpu_count()} CPU cores, {device}); "
        "the slowest rank's figures.", "",
        "| ranks | state GB (this rank) | write s (GB/s, all ranks) | without checksum s "
        "| checksum adds: measured; hash time / write time "
        "| XXH3 GB/s | sha256 GB/s | first host copy s (GB/s) | step s | stall sync s "
        "| stall async s: blocked in save + lost by overlapped steps | blocked / sync | first async save s "
        "| verify + load s (GB/s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in measured:
        lines.append(
            f"| {m['ranks']} | {m['checkpoint_gb']:.2f} ({m['rank_gb']:.2f}) | {m['write_s']:.2f} "
            f"({m['write_gbps']:.2f}) | {m['write_plain_s']:.2f} | {m['checksum_overhead']:+.1%}; "
            f"{m['checksum_share']:.1%} "
            f"| {m['xxh3_gbps']:.1f} | {m['sha256_gbps']:.2f} | {m['host_copy_s']:.2f} ({m['host_copy_gbps']:.1f}) "
            f"| {m['step_s']:.2f} | {m['stall_sync_s']:.2f} | {m['stall_async_s']:.2f}: {m['async_blocked_s']:.2f} + "
            f"{max(0.0, m['stall_async_s'] - m['async_blocked_s']):.2f} ({m['async_steps_during']:g} steps) "
            f"| {m['async_blocked_s'] / max(m['stall_sync_s'], 1e-9):.1%} | {m['stall_async_first_s']:.2f} "
            f"| {m['verify_s']:.2f} + {m['load_s']:.2f} ({m['load_gbps']:.2f}) |")
    lines += [
        "", f"Projection: {args.nodes} nodes x {args.ranks_per_node} GPUs, {args.fs_gbps_per_node:g} GB/s of file "
        f"system per node, {args.host_copy_gbps:g} GB/s device-to-host per GPU, {BYTES_PER_PARAM} bytes of state "
        "per parameter, checksum at the best XXH3 rate measured above.", "",
        "| model | params | checkpoint GB (per rank) | write s | checksum s (per rank, parallel) | stall sync s "
        "| stall async s | rank-0 sha256 of all (before) s | resume s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in projected:
        lines.append(
            f"| {p['model']} | {p['params_b']:.2f}B | {p['checkpoint_gb']:.0f} ({p['rank_gb']:.2f}) "
            f"| {p['write_s']:.1f} | {p['checksum_s']:.2f} | {p['stall_sync_s']:.1f} | {p['stall_async_s']:.2f} "
            f"| {p['rank0_sha256_s']:.0f} | {p['load_s']:.1f} |")
    return "\n".join(lines)
