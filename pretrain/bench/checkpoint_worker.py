"""One `mtp bench checkpoint` measurement: run as `torchrun ... -m pretrain.bench.checkpoint_worker PLAN.json`.

Every rank builds the real engine (DeepSpeed, ZeRO-1, float32) of the
benchmark model and uses the trainer's own saver (pretrain/ckpt_save.py):

- write and checksum: the rank's captured files written by `write_files`
  with XXH3-128 computed on the way and without any checksum, alternately,
  fastest of `repeats` each; the checksum alone (XXH3-128 and sha256) over
  the largest file, held in memory;
- host copy: `stage` of the rank's state (what an asynchronous save costs
  the training loop besides DeepSpeed's own state-dict assembly);
- stall: wall time of the training loop from the save call until the
  checkpoint is sealed, minus the same number of undisturbed steps, with
  `checkpoint.async` off and on, median of `repeats` saves each (after a
  first asynchronous save that allocates the host buffers the later ones
  reuse); `save_call_s` is the part the loop is blocked in the save call
  (capture and host copy), the rest is what the overlapped steps lost to the
  background writer (on a CPU box it shares the cores with training);
- load: the collective choice (every rank verifies its files) and
  DeepSpeed's `load_checkpoint`.

Rank 0 writes every rank's figures to PLAN["out"]; checkpoints go to PLAN["dir"] (every rank's).
"""

import itertools
import json
import shutil
import statistics
import sys
import time
from pathlib import Path


def bench_config(plan: dict, world: int):
    from pretrain.config import load_config

    return load_config("configs/tiny-cpu.yaml", [
        f"model.d_model={plan['d_model']}", f"model.n_layers={plan['layers']}", "model.n_heads=16",
        "model.n_future=2", "model.vocab_size=258", "model.max_seq_len=64", "train.seq_len=32",
        "train.micro_batch_size=1", f"train.global_batch_size={world}", "parallel.zero_stage=1",
        "tracking.enabled=false", "checkpoint.keep=1", f"run.dir={plan['dir']}",
    ])


def random_batches(cfg):
    import torch

    s, n = cfg.train.seq_len, cfg.model.n_future
    tokens = torch.randint(0, cfg.model.vocab_size, (1, s + n), generator=torch.Generator().manual_seed(0))  # [1, s+n]
    labels = torch.stack([tokens[:, k:k + s] for k in range(1, n + 1)], dim=1)  # [1, n, s]
    return itertools.repeat({"input_ids": tokens[:, :s], "labels": labels})


class Bench:
    def __init__(self, plan: dict):
        import torch.distributed as dist

        from parallel.runtime import start
        from parallel.steps import Steps
        from pretrain.checkpoint import CheckpointStore
        from pretrain.ckpt_save import CheckpointSaver
        from pretrain.faults import FaultInjector

        self.plan = plan
        self.runtime = start(1, 1, "float32", 600)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.cfg = bench_config(plan, self.world)
        self.steps = Steps.open(self.cfg, self.runtime)
        self.batches = random_batches(self.cfg)
        self.store = CheckpointStore(self.cfg.checkpoint_dir, keep=1)
        self.saver = CheckpointSaver(self.cfg, self.runtime, self.store, FaultInjector([], self.rank))
        self.step = 0

    def train(self, n: int) -> list[float]:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            self.steps.train_step(self.batches, self.step)
            self.runtime.synchronize()
            self.step += 1
            self.saver.poll(self.step)
            times.append(time.perf_counter() - start)
        return times

    def engine_files(self, tmp: str) -> list:
        from pretrain.checkpoint import ENGINE_TAG, rng_state_file

        return [*self.steps.save(tmp, ENGINE_TAG), rng_state_file(tmp, self.rank, self.runtime.device)]

    def stall(self, asynchronous: bool, base: float) -> dict:
        """Seconds the loop lost to one checkpoint: from the save call until it is sealed."""
        import torch.distributed as dist

        self.saver.asynchronous = asynchronous
        dist.barrier()
        start = time.perf_counter()
        extra = {"step": self.step} if self.rank == 0 else None
        self.saver.save(self.step, self.engine_files, lambda tmp: None, extra, wait=False)
        call = time.perf_counter() - start
        steps = 0
        while self.saver.in_flight is not None or steps == 0:
            self.train(1)
            steps += 1
        total = time.perf_counter() - start
        return {"stall_s": max(0.0, total - steps * base), "save_call_s": call, "steps_during": steps}

    def write_and_checksum(self, repeats: int) -> dict:
        """This rank's files written with and without the on-the-fly checksum; checksum and host-copy rates."""
        import torch.distributed as dist

        from pretrain.ckpt_writer import ALGORITHM, HASHES, make_stager, stage, write_files

        scratch = Path(self.plan["dir"]) / f"scratch-rank{self.rank}"
        files = self.engine_files(str(scratch / "capture"))
        stager = make_stager(pinned=self.runtime.cuda)
        start = time.perf_counter()
        staged = stage(stager, files)
        host_copy = time.perf_counter() - start
        times: dict[str, list[float]] = {"hashed": [], "plain": []}
        nbytes = 0
        order = (("hashed", ALGORITHM), ("plain", ""))
        for i in range(repeats):
            for kind, algorithm in order if i % 2 == 0 else order[::-1]:  # neither always goes first
                dist.barrier()
                root = scratch / f"{kind}{i}"
                retarget = [type(f)(str(root / Path(f.path).relative_to(scratch / "capture")), f.state, f.data)
                            for f in staged]
                result = write_files(retarget, str(root), self.rank, algorithm=algorithm)
                assert result.error is None, result.error
                times[kind].append(result.write_s)
                nbytes = result.nbytes
        biggest = max((p for p in (scratch / "hashed0").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        data = memoryview(biggest.read_bytes())  # in memory: the checksum's own speed, no file system in it
        rates = {}
        for algorithm in (ALGORITHM, "sha256"):
            start = time.perf_counter()
            digest = HASHES[algorithm]()
            for offset in range(0, len(data), 1 << 24):
                digest.update(data[offset:offset + (1 << 24)])
            rates[algorithm] = len(data) / (time.perf_counter() - start) / 1e9
        stager.close()
        shutil.rmtree(scratch, ignore_errors=True)
        return {"bytes": nbytes, "write_hashed_s": min(times["hashed"]), "write_plain_s": min(times["plain"]),
                "xxh3_gbps": rates[ALGORITHM], "sha256_gbps": rates["sha256"], "host_copy_s": host_copy}

    def load(self) -> dict:
        import torch.distributed as dist

        from pretrain.checkpoint import ENGINE_TAG
        from pretrain.ckpt_resume import choose

        dist.barrier()
        start = time.perf_counter()
        path, _ = choose(self.store, self.saver.group)
        verified = time.perf_counter()
        self.steps.load(path, ENGINE_TAG, reshard=False)
        dist.barrier()
        return {"verify_s": verified - start, "load_s": time.perf_counter() - verified,
                "checkpoint_bytes": self.store.survey()[0].nbytes}


def main(plan_path: str) -> None:
    import torch.distributed as dist

    plan = json.loads(Path(plan_path).read_text())
    bench = Bench(plan)
    bench.train(2)  # warm-up
    base = statistics.median(bench.train(plan["steps"]))
    row = {"rank": bench.rank, "step_s": base, **bench.write_and_checksum(plan["repeats"])}
    row["async_first"] = bench.stall(True, base)  # allocates the host buffers the later saves reuse
    for mode, asynchronous in (("sync", False), ("async", True)):
        runs = [bench.stall(asynchronous, base) for _ in range(plan["repeats"])]
        row[mode] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    row.update(bench.load())
    rows = [None] * bench.world
    dist.all_gather_object(rows, row)
    if bench.rank == 0:
        Path(plan["out"]).write_text(json.dumps({"ranks": bench.world, "rows": rows}))
    bench.saver.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
