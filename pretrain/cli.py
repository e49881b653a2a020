"""The `mtp` console script: one entry point, a subcommand per job.

Each feature module owns its subcommands and exposes
`register(subparsers, bench_subparsers)`; this file only wires them together
and turns `UserError` and `RunFailure` into one clear line and a non-zero exit.
"""

import argparse
import importlib
import os
import sys

# MLflow starts usage telemetry on import unless told not to; nothing here may
# reach the network except a tracking URI the user configured.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from pretrain.errors import RunFailure, UserError

# Modules that add subcommands, in the order `mtp --help` lists them.
COMMAND_MODULES = [
    "data_pipeline.cli",
    "pretrain.commands",
    "pretrain.ckpt_cli",
    "pretrain.submit",
    "pretrain.bench.loss_memory",
    "pretrain.bench.train_step",
    "pretrain.bench.faults",
    "pretrain.bench.gpu_check",
    "pretrain.bench.checkpoint",
    "pretrain.inference.cli",
    "pretrain.evaluation.cli",
    "pretrain.plan",
]


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (the problem and where help is), not a usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="mtp", description="Pretrain multi-token-prediction language models."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    bench = subparsers.add_parser("bench", help="measure speed and memory")
    bench_subparsers = bench.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers, bench_subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"mtp {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RunFailure as err:
        print(f"mtp {args.command}: failed: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
