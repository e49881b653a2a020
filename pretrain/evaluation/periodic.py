"""Evaluation during training: `eval.suites` every `eval.interval` steps, on the checkpoint just saved.

Rank 0 runs `mtp eval` on that checkpoint in a child process: the child
builds its own single-process model from the consolidated checkpoint
(whatever tensor/pipeline/ZeRO layout wrote it, as `mtp export` does)
without touching the trainer's process groups, megatron state or memory
bookkeeping, and logs into the training run's MLflow run at the step.
The other ranks wait: every few seconds rank 0 broadcasts whether the
child has finished, so each collective lasts seconds and
`fault.collective_timeout_s` never fires however long the evaluation
takes. An evaluation that fails or overruns `eval.timeout_s` is reported
and training goes on.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 2.0
# What torchrun / SLURM set for the trainer; the child is a world of its own.
DISTRIBUTED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                   "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")


def due(cfg, step: int) -> bool:
    e = cfg.eval
    return bool(e.suites) and e.interval > 0 and step % e.interval == 0


def evaluate_checkpoint(cfg, step: int, runtime) -> None:
    """Run the configured suites on step `step`'s checkpoint (rank 0); every rank returns when it is done.

    The ranks agree over the runtime's host (gloo) group: waiting costs no GPU synchronisation.
    """
    if not due(cfg, step):
        return
    child = _start(cfg, step) if runtime.is_main else None
    deadline = time.monotonic() + cfg.eval.timeout_s
    done = child is None or child.process.poll() is not None
    while not _agree(done or time.monotonic() > deadline, runtime.control_group):
        time.sleep(POLL_S if runtime.is_main else 0.0)
        done = child is None or child.process.poll() is not None
    if child is not None:
        child.finish(step)


def _agree(done: bool, group) -> bool:
    """Rank 0's answer, on every rank."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return done
    flag = [done]
    dist.broadcast_object_list(flag, src=0, group=group)
    return bool(flag[0])


class _Child:
    def __init__(self, process: subprocess.Popen, out_dir: Path, log_file):
        self.process = process
        self.out_dir = out_dir
        self.log_file = log_file

    def finish(self, step: int) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
            print(f"eval step {step}: stopped after eval.timeout_s; see {self.out_dir / 'eval.log'}", flush=True)
        self.log_file.close()
        if self.process.returncode != 0:
            print(f"eval step {step}: mtp eval exited {self.process.returncode}; training goes on "
                  f"(see {self.out_dir / 'eval.log'})", flush=True)
            return
        print(f"eval step {step} | {summary_line(json.loads((self.out_dir / 'summary.json').read_text()))}", flush=True)


def _start(cfg, step: int) -> _Child:
    from pretrain.export import resolve_checkpoint

    step_dir = resolve_checkpoint(cfg.checkpoint_dir)
    out_dir = Path(cfg.run.dir) / "eval" / step_dir.name
    out_dir.mkdir(parents=True, exist_ok=True)
    e = cfg.eval
    command = [sys.executable, "-m", "pretrain.cli", "eval", "--model", str(step_dir), "--suite", ",".join(e.suites),
               "--out", str(out_dir), "--dtype", cfg.parallel.dtype]
    if e.max_new_tokens:
        command += ["--max-new-tokens", str(e.max_new_tokens)]
    if e.humaneval_limit:
        command += ["--limit", str(e.humaneval_limit)]
    if e.loss_windows:
        command += ["--max-windows", str(e.loss_windows)]
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
    log_file = open(out_dir / "eval.log", "a")
    print(f"eval step {step}: {', '.join(e.suites)} on {step_dir} (log {out_dir / 'eval.log'})", flush=True)
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    return _Child(process, out_dir, log_file)


def summary_line(results: dict) -> str:
    """One progress line: per-head loss, expected tokens per forward, pass@k."""
    parts = []
    if "loss" in results:
        parts.append("loss heads " + " ".join(f"{v:.3f}" for v in results["loss"]["nats_per_token"].values()))
    if "acceptance" in results:
        tpf = results["acceptance"]["expected_tokens_per_forward"]
        parts.append("expected tokens/forward " + " ".join(f"K={k}:{v:.2f}" for k, v in tpf.items() if int(k) > 1))
    if "humaneval" in results:
        parts.append(" ".join(f"{k} {100 * v:.1f}%" for k, v in results["humaneval"].items() if k.startswith("pass@")))
    return " | ".join(parts)
