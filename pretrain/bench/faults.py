"""`mtp bench faults`: break real training runs on purpose and measure the recovery.

Every drill is a real `torchrun` group (2 gloo processes by default, dp=2,
ZeRO-1, the tiny model) running `mtp train` with a fault injected through
`MTP_FAULT` (pretrain/faults.py) or done to its files. Each is compared with
an undisturbed reference run of the same command:

- steps lost: finished steps whose work was redone (last step done before the
  restart minus the checkpoint step it resumed from);
- samples lost / repeated: window ids in the runs' sample logs
  (`data.log_sample_ids`) that the reference trained on and the drill did
  not, or that the drill trained on twice;
- losses equal: every head's loss at every step within 1e-6 of the reference;
- recovery: seconds from the fault to the first step finished after it.

`--out docs/reliability.md` writes the report the docs hold.
"""

import dataclasses
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import date
from pathlib import Path

from pretrain.errors import UserError

REPO = Path(__file__).resolve().parents[2]
STEPS = 12
SHAPE = [
    "model.d_model=64", "model.n_layers=3", "model.n_heads=4", "model.max_seq_len=64", "model.n_future=4",
    "model.loss_chunk_tokens=48", "train.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=4",
    f"train.max_steps={STEPS}", "train.eval_interval=0", "train.log_interval=1", "checkpoint.interval=4",
    "checkpoint.keep=5", "schedule.warmup_steps=2", "optimizer.lr=3e-3", "tracking.enabled=false",
    "parallel.zero_stage=1", "data.log_sample_ids=true", "fault.collective_timeout_s=10",
]
STEP_LINE = re.compile(r"^step (\d+)/\d+ \|")
RESUMED = re.compile(r"resumed from \S+ at step (\d+)")


@dataclasses.dataclass(frozen=True)
class Drill:
    name: str
    how: str  # the fault and how it is made, for the report
    fault: str | None = None  # MTP_FAULT
    overrides: tuple[str, ...] = ()
    expect_exit: int = 0
    same_losses: bool = True  # a drill that skips steps on purpose trains differently
    loss_tolerance: float = 1e-6  # relative; a drill that changes the world changes the reduction order


DRILLS = [
    Drill("worker-killed", "SIGKILL to rank 1 before step 7 (lost node, OOM killer); torchrun restarts the group",
          "kill@7:1"),
    Drill("preempted", "SIGUSR1 to every rank before step 7 (SLURM `--signal` ahead of preemption); "
          "the same command is run again, as a requeued job would", "stop@7"),
    Drill("rank-hung", "rank 1 sleeps before step 7 (wedged device, stalled filesystem); rank 0 waits in the "
          "gradient all-reduce until `fault.collective_timeout_s=10`, exits 1, torchrun restarts", "hang@7:1"),
    Drill("killed-while-saving", "SIGKILL to rank 0 while it writes the step-8 checkpoint (engine files on disk, "
          "not sealed); torchrun restarts", "kill-in-save@8:0"),
    Drill("killed-during-async-save", "`checkpoint.async=true`: SIGKILL to rank 1 from its background writer, "
          "with the first file of the step-8 checkpoint on disk, while the main thread trains on; torchrun restarts",
          "kill-in-save@8:1", ("checkpoint.async=true",)),
    Drill("corrupt-checkpoint", "a byte of the newest checkpoint (step 8) flipped after the run stopped "
          "(`--stop-after 8`); the same command is run again"),
    Drill("nan-skipped", "NaN embeddings at steps 5-8 (NaN loss and gradients); `fault.max_skipped_steps=5`; "
          "the step-8 checkpoint must hold the step-4 weights and optimizer state", "nan@5-8", same_losses=False),
    Drill("nan-diverged", "NaN embeddings from step 5 on; `fault.max_skipped_steps=2`", "nan@5-12",
          ("fault.max_skipped_steps=2",), expect_exit=1, same_losses=False),
    Drill("node-lost", "two torchrun agents as two nodes (`--nnodes=1:2`, c10d on loopback, one worker each); "
          "node B (agent and worker) SIGKILLed before step 7; node A goes on alone at the same global batch "
          "(gradient accumulation 1 -> 2)", loss_tolerance=1e-4),
    Drill("node-joined", "node A trains alone (`--nnodes=1:2`); node B starts before step 7; A's agent stops its "
          "worker (SIGTERM: step 7 finished and checkpointed) and both resume at dp=2 (accumulation 2 -> 1)",
          loss_tolerance=1e-4),
    Drill("second-trainer", "the same command started again on the same run directory while the first run "
          "waits before step 7; the second must refuse at once and the first finish undisturbed"),
    Drill("tracking-down", "a real `mlflow server` (tracking on) stopped before step 5 and started again on the "
          "same store before step 10; training must not wait for it and the MLflow run must end complete"),
    Drill("disk-full", "the checkpoint directory on a 64 MB tmpfs, filled before step 8; step 8's checkpoint "
          "fails with ENOSPC (exit 1), the space is freed when the trainer's line appears, torchrun restarts"),
]
ELASTIC = {"node-lost", "node-joined", "second-trainer"}  # pretrain/bench/elastic.py launches these
OUTAGES = {"tracking-down", "disk-full"}  # pretrain/bench/outages.py


def register(subparsers, bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "faults", help="inject faults into real torchrun training and measure the recovery",
        description="Run the tiny model under torchrun with each fault of pretrain/faults.py and report "
                    "steps lost, samples lost or repeated, whether losses match an undisturbed run, and "
                    "the time to recover.",
    )
    p.add_argument("--data", default="runs/data/stdlib-byte", help="a directory written by mtp prepare")
    p.add_argument("--drills", default=",".join(d.name for d in DRILLS),
                   help="comma-separated drills to run (default: all)")
    p.add_argument("--nproc", type=int, default=2, help="processes in the torchrun group (data-parallel)")
    p.add_argument("--workdir", default=None, help="where runs go (default: a temp dir, removed after)")
    p.add_argument("--out", default=None, help="also write the markdown report here (e.g. docs/reliability.md)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=run)


@dataclasses.dataclass
class Attempt:
    """One launch: exit status and every output line with the second it arrived."""
    exit_code: int
    lines: list[tuple[float, str]]


@dataclasses.dataclass
class Result:
    drill: str
    how: str
    exit_code: int
    expected_exit: int
    resumed_at: int | None  # checkpoint step the recovery started from
    steps_lost: int | None  # finished steps redone
    samples_lost: int
    samples_repeated: int
    samples_skipped: int  # in steps the trainer skipped on purpose (NaN)
    losses_equal: bool | None  # None where the drill trains differently by design
    state_kept: bool | None  # skipped steps left weights and optimizer state as they were (NaN drills)
    recover_s: float | None
    wall_s: float
    note: str
    longest_stall_s: float | None = None  # longest gap between two steps with no fault or restart between them

    @property
    def ok(self) -> bool:
        return (self.exit_code == self.expected_exit and self.samples_lost == 0 and self.samples_repeated == 0
                and self.losses_equal in (True, None) and self.state_kept in (True, None)
                and "INCOMPLETE" not in self.note)


class Runner:
    """Launches `mtp train` under torchrun into run dirs below `root`."""

    def __init__(self, root: Path, data: str, nproc: int):
        self.root, self.data, self.nproc = root, data, nproc

    def command(self, run_dir: Path, extra: tuple[str, ...] = ()) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={self.nproc}",
                "--max-restarts=1", "-m", "pretrain.cli", "train", "--config", "configs/tiny-cpu.yaml",
                *SHAPE, f"data.dir={self.data}", f"run.dir={run_dir}", *extra]

    def launch(self, run_dir: Path, fault: str | None, extra: tuple[str, ...] = ()) -> Attempt:
        env = _env(fault)
        lines, start = [], time.monotonic()
        with subprocess.Popen(self.command(run_dir, extra), cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT,
                              text=True, errors="replace") as proc:
            for line in proc.stdout:
                lines.append((time.monotonic() - start, line.rstrip("\n")))
        return Attempt(proc.returncode, lines)


def _env(fault: str | None) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               # one rendezvous store per restart round; see slurm/train.sbatch
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MTP_FAULT"):
        env.pop(key, None)
    if fault:
        env["MTP_FAULT"] = fault
    return env


def run(args) -> int:
    chosen = _choose(args.drills)
    if args.nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {args.nproc}")
    if not (Path(args.data) / "manifest.json").is_file():
        raise UserError(f"{args.data} holds no prepared data; run `mtp prepare --source stdlib --tokenizer byte "
                        f"--out {args.data}` first, or pass --data DIR")
    from parallel.runtime import export_deepspeed_accelerator

    export_deepspeed_accelerator()  # reading DeepSpeed's checkpoint files imports it: no guess, no stdout warning
    root = Path(args.workdir or tempfile.mkdtemp(prefix="mtp-faults-"))
    try:
        results = drill_all(Runner(root, str(Path(args.data).resolve()), args.nproc), chosen)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    report = markdown(results, args)
    if args.out:
        Path(args.out).write_text(report)
    print(json.dumps([dataclasses.asdict(r) for r in results], indent=2) if args.json else report)
    return 0 if all(r.ok for r in results) else 1


def _choose(names: str) -> list[Drill]:
    known = {d.name: d for d in DRILLS}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in known]
    if unknown or not wanted:
        raise UserError(f"unknown drill(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)}")
    return [known[n] for n in wanted]


def drill_all(runner: Runner, drills: list[Drill]) -> list[Result]:
    reference_dir = runner.root / "reference"
    reference = runner.launch(reference_dir, None)
    if reference.exit_code != 0:
        raise UserError("the undisturbed reference run failed:\n" + _tail(reference))
    return [_drill(runner, d, reference_dir) for d in drills]


def _drill(runner: Runner, drill: Drill, reference_dir: Path) -> Result:
    run_dir = runner.root / drill.name
    if drill.name in ELASTIC | OUTAGES:
        from pretrain.bench import elastic, outages

        module = elastic if drill.name in ELASTIC else outages
        try:
            attempts = getattr(module, drill.name.replace("-", "_"))(runner, run_dir)
        except elastic.DrillStalled as err:
            return _stalled(drill, str(err))
    elif drill.name == "corrupt-checkpoint":
        attempts = _corrupt_then_rerun(runner, run_dir)
    else:
        attempts = [runner.launch(run_dir, drill.fault, drill.overrides)]
        if drill.name == "preempted":
            attempts.append(runner.launch(run_dir, None, drill.overrides))
    return _measure(drill, run_dir, reference_dir, attempts)


def _stalled(drill: Drill, why: str) -> Result:
    """A drill that never reached its moment: FAILED, with what its processes printed last."""
    print(f"drill {drill.name}: {why}", file=sys.stderr)
    return Result(drill=drill.name, how=drill.how, exit_code=-1, expected_exit=drill.expect_exit, resumed_at=None,
                  steps_lost=None, samples_lost=0, samples_repeated=0, samples_skipped=0, losses_equal=None,
                  state_kept=None, recover_s=None, wall_s=0.0, note="the drill stalled: " + why.splitlines()[0])


def _corrupt_then_rerun(runner: Runner, run_dir: Path) -> list[Attempt]:
    first = runner.launch(run_dir, None, ("--stop-after", "8"))
    newest = max((run_dir / "checkpoints").glob("step_*"))
    victim = max((p for p in newest.rglob("*.pt")), key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:  # a flipped byte: what bit rot or a bad copy leaves
        f.seek(victim.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    first.lines.append((first.lines[-1][0] if first.lines else 0.0, "MTP_FAULT: corrupted " + str(victim)))
    return [first, runner.launch(run_dir, None)]


def _measure(drill: Drill, run_dir: Path, reference_dir: Path, attempts: list[Attempt]) -> Result:
    timeline = _timeline(attempts)
    lost, repeated, skipped = _sample_audit(run_dir, reference_dir)
    resumed = [int(m.group(1)) for _, line in timeline if (m := RESUMED.search(line))]
    done_before = _last_step_before_restart(timeline)
    return Result(
        drill=drill.name, how=drill.how, exit_code=attempts[-1].exit_code, expected_exit=drill.expect_exit,
        resumed_at=resumed[0] if resumed else None,
        steps_lost=(done_before - resumed[0]) if resumed and done_before is not None else None,
        samples_lost=lost, samples_repeated=repeated, samples_skipped=skipped,
        losses_equal=_same_losses(run_dir, reference_dir, drill.loss_tolerance) if drill.same_losses else None,
        state_kept=same_state(run_dir / "checkpoints", 4, 8) if drill.name == "nan-skipped" else None,
        recover_s=_recovery_s(timeline), wall_s=round(timeline[-1][0], 1) if timeline else 0.0,
        longest_stall_s=_longest_stall_s(timeline),
        note=_note(timeline),
    )


def _timeline(attempts: list[Attempt]) -> list[tuple[float, str]]:
    """All attempts' lines on one clock (each attempt starts when the previous one ended)."""
    out, offset = [], 0.0
    for attempt in attempts:
        out += [(offset + t, line) for t, line in attempt.lines]
        offset = out[-1][0] if out else offset
    return out


def _fault_index(timeline) -> int | None:
    return next((i for i, (_, line) in enumerate(timeline) if "MTP_FAULT:" in line), None)


def _last_step_before_restart(timeline) -> int | None:
    cut = next((i for i, (_, line) in enumerate(timeline) if RESUMED.search(line)), None)
    steps = [int(m.group(1)) for _, line in timeline[:cut] if (m := STEP_LINE.match(line))]
    return max(steps) if steps and cut is not None else None


def _recovery_s(timeline) -> float | None:
    """Fault to the first step finished after the restart (None: nothing restarted)."""
    cut = _fault_index(timeline)
    resumed = next((i for i, (_, line) in enumerate(timeline) if RESUMED.search(line)), None)
    if cut is None or resumed is None:
        return None
    after = next((t for t, line in timeline[resumed:] if STEP_LINE.match(line)), None)
    return None if after is None else round(after - timeline[cut][0], 1)


def _longest_stall_s(timeline) -> float | None:
    """The longest wait between consecutive step lines of one run, gaps around a fault or a restart left out."""
    gaps, last = [], None
    for t, line in timeline:
        if "MTP_FAULT:" in line or RESUMED.search(line):
            last = None
        elif STEP_LINE.match(line):
            if last is not None:
                gaps.append(t - last)
            last = t
    return round(max(gaps), 2) if gaps else None


def _sample_ids(run_dir: Path) -> dict[int, list[int]]:
    """Step -> the window ids every data-parallel rank trained on in it."""
    steps: dict[int, list[int]] = {}
    for path in sorted((run_dir / "samples").glob("dp*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            steps.setdefault(row["step"], []).extend(row["ids"])
    return steps


def _sample_audit(run_dir: Path, reference_dir: Path) -> tuple[int, int, int]:
    """(lost, repeated, in skipped steps), counting window ids over the steps the drill finished."""
    got, want = _sample_ids(run_dir), _sample_ids(reference_dir)
    skipped_steps = {row["step"] for row in _metrics(run_dir) if _was_skipped(row)}
    trained = Counter(i for step, ids in got.items() for i in ids)
    expected = Counter(i for step, ids in want.items() if step in got for i in ids)
    lost = sum((expected - trained).values())
    repeated = sum(n - 1 for n in trained.values() if n > 1)
    skipped = sum(len(got[s]) for s in skipped_steps if s in got)
    return lost, repeated, skipped


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _was_skipped(row: dict) -> bool:
    return row["loss"] != row["loss"]  # NaN: the step the engine skipped


def _same_losses(run_dir: Path, reference_dir: Path, rel: float = 1e-6) -> bool:
    got, want = _metrics(run_dir), _metrics(reference_dir)
    if [r["step"] for r in got] != [r["step"] for r in want]:
        return False
    keys = [k for k in want[0] if k.startswith("loss_head")] if want else []
    return all(abs(g[k] - w[k]) <= rel * abs(w[k]) for g, w in zip(got, want) for k in keys)


def same_state(checkpoints: Path, before: int, after: int) -> bool:
    """Every tensor of every engine file (weights, Adam moments, ZeRO partitions) equal in both checkpoints."""
    import torch

    from parallel.runtime import fix_deepspeed_accelerator, local_decision

    # The files hold DeepSpeed objects: unpickling imports DeepSpeed, which must know its accelerator
    # first or it announces its guess on stdout (this command's --json output).
    fix_deepspeed_accelerator(local_decision().accelerator)

    def tensors(step: int) -> dict[str, list]:
        root = checkpoints / f"step_{step:06d}"
        return {str(p.relative_to(root)): _leaves(torch.load(p, map_location="cpu", weights_only=False))
                for p in sorted(root.rglob("*.pt"))}

    a, b = tensors(before), tensors(after)
    return bool(a) and a.keys() == b.keys() and all(
        len(a[k]) == len(b[k]) and all(torch.equal(x, y) for x, y in zip(a[k], b[k])) for k in a
    )


def _leaves(obj) -> list:
    """The tensors of a nested checkpoint object, in a fixed order (counters and flags left out)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for key in sorted(obj, key=str) for t in _leaves(obj[key])]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _leaves(item)]
    return []


RECORDS = ("a second trainer", "MLflow", "checkpoint directory after")  # what a drill found, for its note


def _note(timeline) -> str:
    """The trainer's own error line, if it printed one (what a user would read first), and the drill's findings."""
    errors = [line.removeprefix("mtp train: failed: ") for _, line in timeline if line.startswith("mtp train: failed:")]
    records = [line.removeprefix("MTP_FAULT: ") for _, line in timeline
               if line.startswith(tuple(f"MTP_FAULT: {r}" for r in RECORDS))]
    return " / ".join(errors[:1] + records)


def _tail(attempt: Attempt, n: int = 30) -> str:
    return "\n".join(line for _, line in attempt.lines[-n:])


def markdown(results: list[Result], args) -> str:
    import torch

    from parallel.runtime import local_decision

    head = [
        "# Reliability drills",
        "",
        "Produced by `mtp bench faults" + (f" --out {args.out}" if args.out else "") + "` "
        f"on {date.today().isoformat()}, {platform.node()} ({os.cpu_count()} CPU cores, "
        f"{'CUDA' if local_decision().device != 'cpu' else 'no GPU'}), torch {torch.__version__}: "
        f"`torchrun --standalone --nproc-per-node={args.nproc} --max-restarts=1 mtp train` of the tiny model "
        f"(d_model 64, 2 trunk layers, n_future 4), dp={args.nproc}, ZeRO-1, {STEPS} steps, a checkpoint every 4, "
        "against an undisturbed run of the same command. How each fault is made: `pretrain/faults.py`; "
        "what is measured: `pretrain/bench/faults.py`.",
        "",
        "| drill | exit | resumed at | steps lost | samples lost | samples repeated | samples in skipped steps "
        "| losses = reference | state kept over skips | recovery (s) | longest stall (s) | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [
        f"| {r.drill} | {r.exit_code} | {_cell(r.resumed_at)} | {_cell(r.steps_lost)} | {r.samples_lost} "
        f"| {r.samples_repeated} | {r.samples_skipped} | {_cell(r.losses_equal)} | {_cell(r.state_kept)} "
        f"| {_cell(r.recover_s)} | {_cell(r.longest_stall_s)} "
        f"| {'as designed' if r.ok else 'FAILED'} |"
        for r in results
    ]
    details = ["", "## The faults", ""] + [
        f"- **{r.drill}**: {r.how}." + (f" The trainer's message: `{r.note}`" if r.note else "") for r in results
    ]
    return "\n".join(head + rows + details + READING) + "\n"


READING = [
    "",
    "## Reading the table",
    "",
    "- *steps lost*: steps finished before the restart and done again after it. A restart resumes from the",
    "  newest sealed checkpoint, so at most `checkpoint.interval` steps are lost; a preemption loses none",
    "  (the signal makes every rank checkpoint the step in flight). A kill while writing, or a damaged",
    "  newest checkpoint, falls back one whole interval.",
    "- *samples lost / repeated*: window ids from the sample logs (`data.log_sample_ids=true`) of the",
    "  finished steps, against the undisturbed run. Redone steps read the same windows again only because",
    "  their first reading was never committed; the audit counts what the final model trained on.",
    "- *killed-during-async-save*: with `checkpoint.async=true` the step-8 checkpoint is written by a",
    "  background thread while the main thread trains on; rank 1 dies mid-write, so that checkpoint is",
    "  never sealed (rank 0 seals only when every rank reported its files) and the restart resumes from 4.",
    "- *losses = reference*: every head's loss at every step within a relative 1e-6 of the undisturbed run.",
    "  The NaN drills train differently on purpose: their skipped steps' windows are counted separately,",
    "  and *state kept* checks that weights, Adam moments and ZeRO partitions are bit-identical before",
    "  and after the skipped steps.",
    "- *recovery*: seconds from the fault to the first step finished after the restart, on this machine.",
    "  For the hung rank it is the collective timeout (10 s here), plus torchrun's 30 s grace between",
    "  SIGTERM and SIGKILL for the process that does not answer, plus the restart.",
    "- *nan-diverged* exits 1 twice: torchrun restarts it once (`--max-restarts=1`), the restarted run",
    "  meets the same NaN steps and stops again with the same message.",
    "- *node-lost / node-joined* change the world between 2 and 1 processes at the same global batch, so",
    "  their losses are held to the reference within a relative 1e-4 (the reduction order changes). The",
    "  audit counts every replica's log: the lost replica's rows of rolled-back steps are trimmed on resume.",
    "  A node-lost recovery includes torchrun's last-call wait (30 s) before the group re-forms alone.",
    "- *second-trainer*: its refusal is the note; the first run must finish as the reference.",
    "- *longest stall*: the longest gap between two consecutive step lines of a run, gaps around a fault",
    "  or a restart left out; compare it with the reference's steps on the same machine.",
    "- *tracking-down*: the note is what the MLflow run holds afterwards (every step once, FINISHED) and",
    "  the trainer's warnings; its *longest stall* covers the steps trained while the server was down.",
    "- *disk-full*: the note is the trainer's one line and what the checkpoint directory holds afterwards",
    "  (no partial checkpoint left; step 4 kept and resumed from).",
    "- Also tested, not drilled here (`tests/integration/test_reliability.py`, `tests/unit/test_tracking.py`):",
    "  a frozen server whose requests take an hour (logging stays instant, the end of the run is bounded by",
    "  `tracking.close_timeout_s`); a resume while the server is down (trains, the backlog arrives later);",
    "  a stop signal during start-up, resume, a checkpoint write and after the last step (exit 0 each, as",
    "  docs/training.md says); a full disk under the logs (one line, exit 1, nothing older lost).",
]


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return str(value)
