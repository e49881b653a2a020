"""One torchrun launch per layout: every training variant of that layout, through the real `mtp train`.

Run by tests/distributed/test_layouts.py as

    torchrun --nproc-per-node K tests/distributed/layout_worker.py PLAN.json

PLAN.json: {"tp", "pp", "out", "data", "variants": [{"name", "overrides", "resume_from"}]}, and
optionally "zero_optimization": settings merged into DeepSpeed's ZeRO config
(`zero_settings`).
Each variant is `mtp train` (pretrain.cli.main, in this process: the launch
and its imports are shared) with run.dir=<out>/<name>; `resume_from` is a
step_* directory of another layout's run, copied in first so the run
resumes from it. Each rank also records its process-group coordinates as
megatron and DeepSpeed see them (<out>/groups/rank_N.json).
"""

import json
import shutil
import sys
from pathlib import Path

import torch.distributed as dist


def run_variant(plan: dict, variant: dict) -> None:
    from pretrain.cli import main

    run_dir = Path(plan["out"]) / variant["name"]
    if variant.get("resume_from") and dist.get_rank() == 0:
        source = Path(variant["resume_from"])
        shutil.copytree(source, run_dir / "checkpoints" / source.name)
    if dist.is_initialized():
        dist.barrier()
    args = ["train", "--config", "configs/tiny-cpu.yaml", f"data.dir={plan['data']}", f"run.dir={run_dir}",
            f"parallel.tp={plan['tp']}", f"parallel.pp={plan['pp']}", *variant["overrides"]]
    code = main(args)
    if code != 0:
        raise SystemExit(f"variant {variant['name']} exited {code}")


def zero_settings(settings: dict) -> None:
    """Merge `settings` into the ZeRO section of every DeepSpeed config this process builds.

    The ZeRO-3 tests set `stage3_param_persistence_threshold: 0`: by default
    DeepSpeed keeps every weight under 1e5 elements whole after its first
    gather, which at the tests' d_model=64 is every weight, and would leave
    ZeRO-3's partitioning untested from the second step on.
    """
    import parallel.engine

    build = parallel.engine.deepspeed_config

    def with_settings(cfg, dp_size: int, pipelined: bool) -> dict:
        config = build(cfg, dp_size, pipelined)
        config["zero_optimization"].update(settings)
        return config

    parallel.engine.deepspeed_config = with_settings


def record_groups(plan: dict) -> None:
    from parallel.topology import deepspeed_grid, describe_groups

    tp, pp = plan["tp"], plan["pp"]
    grid = deepspeed_grid(tp, pp, dist.get_world_size() // (tp * pp))
    out = Path(plan["out"]) / "groups" / f"rank_{dist.get_rank()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(describe_groups(grid)))


def main(plan_path: str) -> None:
    plan = json.loads(Path(plan_path).read_text())
    if "zero_optimization" in plan:
        zero_settings(plan["zero_optimization"])
    for variant in plan["variants"]:
        run_variant(plan, variant)
    record_groups(plan)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
