"""`mtp train` and `mtp export` argument parsing, kept free of heavy imports.

`mtp --help` and every other subcommand build the whole parser; importing
torch, DeepSpeed and MLflow for that would cost seconds, so the handlers
import their modules only when they run.
"""

import os


def _train(args) -> int:
    from pretrain import signals
    from pretrain.faults import FaultInjector, from_env
    from pretrain.startup import prepare

    FaultInjector(from_env(), int(os.environ.get("RANK", "0"))).at("launch")
    signals.install()  # before anything slow: a stop during start-up is kept, not fatal
    cfg = prepare(args)  # every value checked before torch is imported
    from pretrain.train import run

    return run(args, cfg)


def _export(args) -> int:
    from pretrain.startup import check_output_file

    # Before the checkpoint is read: seconds, not minutes, for a typo. An hf export may replace a directory
    # (--overwrite; pretrain/hf/export.py swaps it in only once the new one is complete).
    check_output_file(args.out, "--out", replaceable=args.format == "hf" and args.overwrite)
    from pretrain.export import run

    return run(args)


def register(subparsers, bench_subparsers) -> None:
    train = subparsers.add_parser(
        "train", help="train an MTP model",
        description="Train (or continue training) an MTP model. Re-running the same command resumes "
                    "from the newest complete checkpoint in the run directory.",
    )
    train.add_argument("--config", required=True, help="YAML run config, e.g. configs/tiny-cpu.yaml")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="overrides such as train.max_steps=20 model.n_future=4 run.dir=runs/x")
    train.add_argument("--stop-after", type=int, metavar="STEPS",
                       help="checkpoint and exit after this many steps of this invocation (e.g. to fit a "
                            "job's time slot); re-run the same command to continue")
    train.add_argument("--from-scratch", action="store_true",
                       help="start at step 0 even though the run directory has checkpoints; they, metrics.jsonl "
                            "and samples/ are moved into <checkpoints>/set-aside/<time>/, never deleted")
    train.set_defaults(func=_train)

    export = subparsers.add_parser(
        "export", help="write a consolidated model file (or a Hugging Face directory) from a checkpoint",
        description="Consolidate a training checkpoint, whatever layout wrote it. --format mtp (default): one "
                    "safetensors file holding the weights, the model config and the tokenizer. --format hf: a "
                    "directory transformers loads as a LlamaForCausalLM (trunk + head 1), with heads 2..n in "
                    "extra_heads.safetensors and a trust_remote_code model that returns every head's logits.",
    )
    export.add_argument("--checkpoint", required=True, help="a run dir, its checkpoints/ dir, or one step_* dir")
    export.add_argument("--out", required=True,
                        help="output file (mtp), e.g. runs/demo/model.safetensors, or directory (hf)")
    export.add_argument("--format", choices=["mtp", "hf"], default="mtp", help="mtp (default) or hf (transformers)")
    export.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="weights of an hf export (default float32)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing hf export directory")
    export.set_defaults(func=_export)
