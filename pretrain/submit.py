"""`mtp submit`: validate a run config, then hand it to SLURM as `slurm/train.sbatch`.

A bad config should fail on the login node in a second, not after the job
waited hours in the queue. What is submitted is written into the run dir
first (the script and the exact `sbatch` command, as `submit.sh`), so a user
can read it, and re-run it, without reverse-engineering this module.
"""

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pretrain.config import RunConfig, check_data_dir, load_config, validate
from pretrain.errors import UserError
from pretrain.submit_container import add_arguments as add_container_arguments
from pretrain.submit_container import container_settings

DEFAULT_SCRIPT = Path(__file__).resolve().parents[1] / "slurm" / "train.sbatch"
SUBMIT_DIR = "slurm"  # inside run.dir: the submitted script and submit.sh


@dataclass(frozen=True)
class Submission:
    script: Path  # the copy in the run dir that sbatch gets
    command: list[str]  # the full sbatch command line
    log: str  # where the job's output goes (%j = job id)


def run(args) -> int:
    _check_args(args)
    cfg = load_config(args.config, args.overrides)
    _validate_every_size(cfg, args)
    check_data_dir(cfg)
    plan = _plan(args, cfg)
    _write(plan, args.script)
    print(f"script: {plan.script}\ncommand: {shlex.join(plan.command)}", flush=True)
    if args.dry_run:
        print(f"dry run: nothing submitted; submit with {plan.script.parent / 'submit.sh'}")
        return 0
    job_id = _sbatch(plan.command)
    print(f"submitted job {job_id}; log: {plan.log.replace('%j', job_id)}")
    return 0


def _check_args(args) -> None:
    if args.nodes < 1:
        raise UserError(f"--nodes must be >= 1, got {args.nodes}")
    if args.min_nodes is not None and not 1 <= args.min_nodes <= args.nodes:
        raise UserError(f"--min-nodes must be between 1 and --nodes={args.nodes}, got {args.min_nodes}")
    for flag, value in (("--nproc-per-node", args.nproc_per_node), ("--gpus-per-node", args.gpus_per_node)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if args.max_restarts < 0:
        raise UserError(f"--max-restarts must be >= 0, got {args.max_restarts}")
    if not Path(args.script).is_file():
        raise UserError(f"batch script {args.script} not found; pass --script PATH (the default is {DEFAULT_SCRIPT})")


def _nproc(args) -> int:
    return args.nproc_per_node or args.gpus_per_node or 1


def _min_nodes(args) -> int:
    return args.min_nodes or args.nodes


def _validate_every_size(cfg: RunConfig, args) -> None:
    """The layout must work for every node count an elastic job may shrink to.

    Device questions wait for the job: the login node's devices say nothing
    about the compute nodes' (each rank decides at start, parallel/runtime.py).
    """
    validate(cfg, args.nodes * _nproc(args))
    for nodes in range(_min_nodes(args), args.nodes):
        world = nodes * _nproc(args)
        try:
            validate(cfg, world)
        except UserError as err:
            raise UserError(f"with {nodes} of {args.nodes} nodes ({world} processes), which --min-nodes "
                            f"allows: {err}") from None


def _plan(args, cfg: RunConfig) -> Submission:
    run_dir = Path(cfg.run.dir).resolve()
    script = run_dir / SUBMIT_DIR / "train.sbatch"
    log = str(run_dir / "slurm-%j.out")
    command = ["sbatch", "--parsable", f"--nodes={args.nodes}", f"--job-name=mtp-{cfg.run_name}",
               f"--output={log}", f"--chdir={os.getcwd()}", f"--export={_export(args, cfg)}"]
    command += [f"--partition={args.partition}"] if args.partition else []
    command += [f"--time={args.time}"] if args.time else []
    command += [f"--gpus-per-node={args.gpus_per_node}"] if args.gpus_per_node else []
    command += ["--no-kill"] if _min_nodes(args) < args.nodes else []  # survive a node loss, torchrun regroups
    command += args.sbatch_arg or []
    command += [str(script), "--config", args.config, *args.overrides]
    return Submission(script, command, log)


def _export(args, cfg: RunConfig) -> str:
    """The script's settings, after ALL of the submitting environment (sbatch's default)."""
    final = Path(cfg.checkpoint_dir).resolve() / f"step_{cfg.train.max_steps:06d}"  # checkpoint.py's layout
    values = {
        "NPROC_PER_NODE": _nproc(args), "MIN_NODES": _min_nodes(args), "MAX_RESTARTS": args.max_restarts,
        "MTP_PYTHON": sys.executable, "MTP_FINAL_CHECKPOINT": final,
        "MTP_CONTROL_DIR": Path(cfg.run.dir).resolve() / SUBMIT_DIR,  # the stop/ready handshake of the script
    }
    values.update(container_settings(args))  # an image's own Python replaces this one's
    for name, value in values.items():
        if "," in str(value):
            raise UserError(f"{name}={value} contains a comma, which sbatch --export cannot carry; "
                            "use paths without commas")
    return ",".join(["ALL", *(f"{name}={value}" for name, value in values.items())])


def _write(plan: Submission, source: str) -> None:
    plan.script.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, plan.script)
    plan.script.chmod(0o755)
    submit = plan.script.parent / "submit.sh"
    submit.write_text("#!/bin/bash\n# Written by `mtp submit`; running it submits the same job again.\n"
                      f"exec {shlex.join(plan.command)}\n")
    submit.chmod(0o755)


def _sbatch(command: list[str]) -> str:
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise UserError("sbatch not found on PATH; run `mtp submit` where SLURM's client tools are installed "
                        "(a login node), or add --dry-run to only write the script") from None
    except subprocess.TimeoutExpired:
        raise UserError("sbatch did not answer within 120 s; check the SLURM controller (`scontrol ping`)") from None
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()] or [f"exit status {proc.returncode}"]
        raise UserError(f"sbatch failed: {lines[-1].strip()}")
    return proc.stdout.strip().split(";")[0]


def register(subparsers, bench_subparsers) -> None:
    parser = subparsers.add_parser(
        "submit", help="submit training to SLURM",
        description="Validate the config, write slurm/train.sbatch and the sbatch command (submit.sh) into "
                    "<run.dir>/slurm/, then submit it. The job runs one torchrun per node and is "
                    "requeued on preemption, resuming from the newest checkpoint.",
    )
    parser.add_argument("--config", required=True, help="YAML run config, e.g. configs/1b.yaml")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, as for `mtp train`")
    parser.add_argument("--nodes", type=int, required=True, help="nodes to allocate")
    parser.add_argument("--min-nodes", type=int, help="fewest nodes training may continue on (default: --nodes)")
    parser.add_argument("--nproc-per-node", type=int,
                        help="training processes per node (default: --gpus-per-node, else 1)")
    parser.add_argument("--gpus-per-node", type=int, help="GPUs to request on each node")
    parser.add_argument("--partition", help="SLURM partition")
    parser.add_argument("--time", help="time limit, e.g. 2-00:00:00; the job checkpoints 120 s before it")
    parser.add_argument("--max-restarts", type=int, default=3, help="torchrun restarts after a worker failure")
    parser.add_argument("--sbatch-arg", action="append", metavar="ARG",
                        help="extra sbatch option, e.g. --sbatch-arg=--account=lm (repeatable)")
    parser.add_argument("--script", default=str(DEFAULT_SCRIPT), help="batch script to submit")
    add_container_arguments(parser)
    parser.add_argument("--dry-run", action="store_true", help="write and print, but do not submit")
    parser.set_defaults(func=run)
