"""`mtp bench gpu-check` (what `make gpu-check` runs): one prepared command that validates a checkout on one GPU.

GPU time is scarce, so one run must be enough and must finish in under 9
minutes on one H100/H200. Every stage is a subprocess with its own time
limit; a stage that fails is recorded and the next one still runs, so a
single run says everything it can. Stages:

1. environment  torch, CUDA, the device, which fused kernel libraries import
2. tests        `pytest tests/gpu` (the bf16 / NCCL contracts on the GPU)
3. train        `mtp bench train` of a 1B-class trunk (configs/1b.yaml's shape) in bf16: n=1, n=4
                parameter-matched and n=4, one process each (three 1.3B models with fp32 masters
                do not fit one 80 GB GPU together): tokens/s, MFU, peak memory, step time vs n=1
4. loss-memory  `mtp bench loss-memory --device cuda --impls available` at 32k and 128k vocabularies:
                ours against naive and against liger-kernel / cut-cross-entropy where installed
5. speculative  a small n=4 model trained for a few minutes on the GPU, exported, then
                `mtp bench speculative` (measured tokens per forward and speedup)

It writes `gpu-check.json` and `gpu-check.md` into `--out`, anew after
every stage, so a check killed from outside still leaves what it found.
`--budget-s` (540 s) bounds the whole check: each stage's limit is cut to
the time left, and the stages the budget does not reach are reported as
not run, so one run ends with a report inside a 10-minute lease.
`--dry-run` runs the same stages at toy sizes, on a CPU too, to check the
command itself (the GPU tests then skip).
"""

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

from pretrain.errors import UserError

MTP = [sys.executable, "-m", "pretrain.cli"]
BUDGET_S = 9 * 60
MIN_STAGE_S = 10  # a stage with less time left than this is not started


@dataclass
class Stage:
    name: str
    command: list[str]
    timeout_s: int
    ran: bool = False
    ok: bool = False
    seconds: float = 0.0
    result: object = None
    tail: str = ""


@dataclass
class Sizes:
    """Shapes of one check: the real ones, or toy ones for --dry-run."""

    train_overrides: list[str]
    train_steps: int
    vocabs: list[int]
    loss_shape: list[str]
    spec_steps: int
    spec_overrides: list[str] = field(default_factory=list)
    spec_bench: list[str] = field(default_factory=list)


REAL = Sizes(
    train_overrides=["model.vocab_size=32000", "train.seq_len=2048", "model.max_seq_len=2048",
                     "train.micro_batch_size=4", "train.global_batch_size=4", "parallel.recompute=false"],
    train_steps=6, vocabs=[32000, 128000], loss_shape=["--tokens", "8192", "--seq-len", "2048"],
    spec_steps=1500, spec_overrides=["model.d_model=512", "model.n_heads=8"],
    spec_bench=["--prompts", "16", "--prompt-tokens", "128", "--new-tokens", "96", "--batch-sizes", "1,8"],
)
DRY = Sizes(
    train_overrides=["model.vocab_size=512", "model.d_model=64", "model.n_heads=4", "model.n_layers=6",
                     "model.ffn_hidden=128", "train.seq_len=32", "model.max_seq_len=64", "train.micro_batch_size=2",
                     "train.global_batch_size=2", "parallel.recompute=false"],
    train_steps=1, vocabs=[512], loss_shape=["--small"], spec_steps=4,
    spec_overrides=["model.d_model=64", "model.n_heads=4", "model.max_seq_len=64", "train.seq_len=32"],
    spec_bench=["--prompts", "2", "--prompt-tokens", "24", "--new-tokens", "16", "--batch-sizes", "1"],
)


def register(subparsers, bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "gpu-check", help="validate this checkout on one GPU: tests, step speed, loss memory, speculative decoding",
        description="Run the GPU tests and benchmarks in one go (under 9 minutes on one H100/H200) and write a "
                    "JSON and a markdown report.",
    )
    p.add_argument("--out", default="runs/gpu-check", help="directory for gpu-check.json, gpu-check.md and logs")
    p.add_argument("--data", help="prepared data for the speculative model (default: prepare the stdlib corpus)")
    p.add_argument("--dry-run", action="store_true", help="toy sizes, on any machine: checks the command itself")
    p.add_argument("--budget-s", type=int, default=BUDGET_S,
                   help=f"seconds for the whole check (default {BUDGET_S}); stages it does not reach are not run")
    p.set_defaults(func=run)


def stages(sizes: Sizes, out: Path, data: Path) -> list[Stage]:
    train = ["bench", "train", "--config", "configs/1b.yaml", "--steps", str(sizes.train_steps), "--warmup", "2",
             "--json", *sizes.train_overrides, "parallel.dtype=bfloat16", "parallel.zero_stage=1", "parallel.tp=1",
             "parallel.pp=1"]
    run_dir = out / "speculative-run"
    spec_train = ["train", "--config", "configs/tiny-cpu.yaml", f"data.dir={data}", f"run.dir={run_dir}",
                  f"train.max_steps={sizes.spec_steps}", "schedule.warmup_steps=1", "train.eval_interval=0",
                  f"checkpoint.interval={sizes.spec_steps}", "tracking.enabled=false", "parallel.dtype=bfloat16",
                  "parallel.zero_stage=1", *sizes.spec_overrides]
    model = out / "speculative.safetensors"
    found = [
        Stage("environment", [sys.executable, "-c", _ENVIRONMENT], 120),
        Stage("tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/gpu"], 200),
        *(Stage(f"train {key}", [*MTP, *train, "--variants", key], 100) for key in ("n1", "matched", "n4")),
        *(Stage(f"loss-memory vocab {v}", [*MTP, "bench", "loss-memory", "--device", "auto", "--vocab", str(v),
                                           "--impls", "available", *sizes.loss_shape, "--json"], 150)
          for v in sizes.vocabs),
        Stage("speculative: train", [*MTP, *spec_train], 200),
        Stage("speculative: export", [*MTP, "export", "--checkpoint", str(run_dir), "--out", str(model)], 60),
        Stage("speculative: bench", [*MTP, "bench", "speculative", "--model", str(model), *sizes.spec_bench,
                                     "--json"], 120),
    ]
    return found


_ENVIRONMENT = """
import json, platform, torch
from parallel.kernels import import_problem
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "kernels": {k: import_problem(k) or "imports" for k in ("te", "apex")}}
for name in ("deepspeed", "megatron.core", "liger_kernel", "cut_cross_entropy"):
    try:
        module = __import__(name, fromlist=["__version__"])
        info[name] = getattr(module, "__version__", "imports")
    except Exception as err:  # noqa: BLE001 -- reported, not raised: the check goes on
        info[name] = f"missing ({type(err).__name__})"
print(json.dumps(info))
"""


def run_stage(stage: Stage, log_dir: Path) -> None:
    stage.ran = True
    start = time.monotonic()
    returncode, stdout, stderr = run_group(stage.command, stage.timeout_s)
    stage.ok = returncode == 0
    output = stdout + stderr + ("" if returncode is not None else f"\ntimed out after {stage.timeout_s} s")
    stage.seconds = time.monotonic() - start
    (log_dir / f"{stage.name.replace(' ', '_').replace(':', '')}.log").write_text(output)
    stage.tail = "\n".join(output.strip().splitlines()[-8:])
    stage.result = _last_json(stdout) if stage.ok else None


def run_group(command: list[str], timeout_s: float) -> tuple[int | None, str, str]:
    """(exit status or None when it timed out, stdout, stderr) of `command`, run in a process group of its own.

    At the limit, or when this process is interrupted, the whole group is
    killed: a stage's children (pytest's `mtp train`, torchrun's workers)
    hold the GPU, and killing only the direct child would leave them
    running into the next stage.
    """
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
        return proc.returncode, stdout, stderr
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()  # what it wrote before the limit
        return None, stdout, stderr
    finally:
        if proc.poll() is None:  # interrupted (Ctrl-C): take the stage's processes down with us
            os.killpg(proc.pid, signal.SIGKILL)


def _last_json(output: str):
    """The JSON a stage printed last (a one-line object or an indented document), if any."""
    text = output.strip()
    for start in (i for i, ch in enumerate(text) if ch in "[{" and (i == 0 or text[i - 1] == "\n")):
        try:
            return json.loads(text[start:])
        except ValueError:
            continue
    return None


def markdown(stages_run: list[Stage], dry_run: bool) -> str:
    env = next((s.result for s in stages_run if s.name == "environment" and s.result), {}) or {}
    lines = [f"# GPU check ({'dry run, toy sizes' if dry_run else 'full'})", "",
             f"{date.today().isoformat()}, {platform.node()}, device {env.get('device', '?')}, torch "
             f"{env.get('torch', '?')} (CUDA {env.get('cuda', '-')}), DeepSpeed {env.get('deepspeed', '?')}, "
             f"megatron-core {env.get('megatron.core', '?')}; fused kernels: {env.get('kernels', {})}", "",
             "| stage | ok | seconds |", "|---|---|---|"]
    lines += [f"| {s.name} | {_verdict(s)} | {s.seconds:.0f} |" for s in stages_run]
    rows = [row for s in stages_run if s.name.startswith("train") and isinstance(s.result, list) for row in s.result]
    if rows:
        base = next((r["step_s"] for r in rows if r["variant"] == "n=1"), None)
        lines += ["", "| variant | params | step (s) | tokens/s | time vs n=1 | MFU | peak memory |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
            ratio = f"{r['step_s'] / base:.3f}" if base else "-"
            lines.append(f"| {r['variant']} | {r['params'] / 1e9:.2f}B | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} "
                         f"| {ratio} | {mfu} | {r['peak_memory_gb']:.1f} GB |")
    for s in stages_run:
        if s.ran and not s.ok:
            lines += ["", f"`{s.name}` failed; the end of its output:", "```", s.tail, "```"]
    return "\n".join(lines) + "\n"


def _verdict(stage: Stage) -> str:
    return "yes" if stage.ok else "NO" if stage.ran else "not run"


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; name a directory")
    if args.budget_s < MIN_STAGE_S:
        raise UserError(f"--budget-s {args.budget_s} leaves no time for a stage; give at least {MIN_STAGE_S} s")
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else out / "data-stdlib-byte"
    if args.data and not (data / "manifest.json").is_file():
        raise UserError(f"--data {data} holds no prepared data (no manifest.json); prepare it with mtp prepare")
    plan = stages(DRY if args.dry_run else REAL, out, data)
    if not args.data:
        plan.insert(1, Stage("prepare", [*MTP, "prepare", "--source", "stdlib", "--tokenizer", "byte", "--out",
                                         str(data), "--overwrite"], 120))
    total = run_all(plan, out, args.budget_s, args.dry_run)
    print(f"gpu-check: {sum(s.ok for s in plan)}/{len(plan)} stages ok in {total:.0f} s; report in "
          f"{out / 'gpu-check.md'}", flush=True)
    return 0 if all(s.ok for s in plan) else 1


def run_all(plan: list[Stage], out: Path, budget_s: float, dry_run: bool) -> float:
    """Run the stages in order within `budget_s`, rewriting the reports after each; the seconds taken."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    for stage in plan:
        left = budget_s - (time.monotonic() - started)
        if left < MIN_STAGE_S:
            print(f"gpu-check: {stage.name}: not run (the budget of {budget_s:.0f} s is spent)", flush=True)
            continue
        stage.timeout_s = min(stage.timeout_s, int(left))
        print(f"gpu-check: {stage.name} ...", flush=True)
        run_stage(stage, logs)
        print(f"gpu-check: {stage.name}: {'ok' if stage.ok else 'FAILED'} ({stage.seconds:.0f} s)", flush=True)
        write_reports(plan, out, dry_run, time.monotonic() - started, budget_s)
    total = time.monotonic() - started
    write_reports(plan, out, dry_run, total, budget_s)
    return total


def write_reports(plan: list[Stage], out: Path, dry_run: bool, seconds: float, budget_s: float) -> None:
    report = {"dry_run": dry_run, "seconds": seconds, "budget_s": budget_s,
              "within_budget": all(s.ran for s in plan) and seconds <= budget_s,
              "stages": [asdict(s) for s in plan]}
    (out / "gpu-check.json").write_text(json.dumps(report, indent=2))
    (out / "gpu-check.md").write_text(markdown(plan, dry_run))
