"""`mtp train` and `mtp export` argument parsing, kept free of heavy imports.

`mtp --help` and every other subcommand build the whole parser; importing
torch, DeepSpeed and MLflow for that would cost seconds, so the handlers
import their modules only when they run.
"""


def _train(args) -> int:
    from pretrain.train import run

    return run(args)


def _export(args) -> int:
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
        "export", help="write a consolidated model file from a checkpoint",
        description="Consolidate a training checkpoint into one safetensors file holding the weights, "
                    "the model config and the tokenizer.",
    )
    export.add_argument("--checkpoint", required=True, help="a run dir, its checkpoints/ dir, or one step_* dir")
    export.add_argument("--out", required=True, help="output file, e.g. runs/demo/model.safetensors")
    export.set_defaults(func=_export)
