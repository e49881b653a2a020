"""`mtp generate` and `mtp bench speculative`: argument parsing only, heavy imports inside the handlers."""


def _generate(args) -> int:
    from pretrain.inference.generate_command import run

    return run(args)


def _bench(args) -> int:
    from pretrain.inference.bench import run

    return run(args)


def _add_model_arguments(p) -> None:
    p.add_argument("--model", required=True,
                   help="file written by `mtp export`, or a run / checkpoints / step_* directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights and activations; bfloat16 needs a GPU (default float32)")


def register(subparsers, bench_subparsers) -> None:
    g = subparsers.add_parser(
        "generate", help="complete prompts, optionally with self-speculative decoding",
        description="Complete prompts with head 1 of an MTP model. With --speculative K, heads 2..K draft "
                    "tokens that head 1 verifies in the next forward: greedy output is identical to plain "
                    "decoding, sampled output has the same distribution, and fewer forwards are needed.",
    )
    _add_model_arguments(g)
    source = g.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt; repeat for a batch")
    source.add_argument("--prompt-file", metavar="FILE",
                        help="a .jsonl file of prompts (one JSON string or {\"prompt\": ...} per line), "
                             "or any other file whose whole text is one prompt")
    source.add_argument("--heldout-function", type=int, metavar="I",
                        help="prompt with the signature and docstring of held-out stdlib function I")
    g.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    g.add_argument("--speculative", default="off", metavar="K|off",
                   help="draft with heads 2..K (K <= the model's n_future); off = plain decoding (default)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop a completion before this text; repeatable")
    g.add_argument("--stop-on-loop", type=int, default=0, metavar="N",
                   help="end a completion once its last N tokens repeat a pattern of at most 8 tokens "
                        "(a run of spaces, `____`, ...); 0 = off (default)")
    g.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default 8)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g.add_argument("--echo", action="store_true", help="print each prompt before its completion")
    g.add_argument("--stats", action="store_true", help="print tokens per forward and tokens/s to stderr")
    g.set_defaults(func=_generate)

    b = bench_subparsers.add_parser(
        "speculative", help="speedup of self-speculative decoding against plain greedy decoding",
        description="Greedy completions of held-out stdlib prompts with K = 1 .. n_future heads: wall-clock "
                    "speedup over plain decoding and tokens per forward (the paper's Table S2), per batch size.",
    )
    _add_model_arguments(b)
    b.add_argument("--prompts", type=int, default=8, help="prompts per batch size (default 8)")
    b.add_argument("--prompt-tokens", type=int, default=512, help="tokens per prompt (default 512)")
    b.add_argument("--new-tokens", type=int, default=256, help="greedy tokens per completion (default 256)")
    b.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes (default 1,8)")
    b.add_argument("--heads", default=None, help="comma-separated K values (default 1..n_future)")
    b.add_argument("--acceptance-positions", type=int, default=32,
                   help="held-out prefixes per prompt for the expected tokens per forward (default 32)")
    b.add_argument("--json", action="store_true", help="print the results as JSON")
    b.set_defaults(func=_bench)
