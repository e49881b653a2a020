"""`mtp generate` and `mtp bench speculative` end to end: a real trained, exported model in real subprocesses."""

import json
from pathlib import Path

import pytest

from data_pipeline.tokenizer import ByteTokenizer
from pretrain.inference.prompts import heldout_function_prompt
from tests.integration.conftest import run_mtp

TINY = [
    "model.d_model=32", "model.n_layers=3", "model.n_heads=4", "model.max_seq_len=64", "model.n_future=3",
    "model.loss_chunk_tokens=48", "train.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=4",
    "train.max_steps=4", "train.eval_interval=100", "train.log_interval=2", "checkpoint.interval=4",
    "schedule.warmup_steps=1", "optimizer.lr=3e-3", "tracking.enabled=false",
]
PROMPTS = ["--prompt", "def parse(self, text):\n    ", "--prompt", "import", "--prompt", "class Message(object):"]


@pytest.fixture(scope="module")
def exported(small_corpus, tmp_path_factory) -> tuple[Path, Path]:
    """(run dir, exported file) of a 4-step n=3 model."""
    run_dir = tmp_path_factory.mktemp("runs") / "gen"
    run_mtp("train", "--config", "configs/tiny-cpu.yaml", *TINY, f"data.dir={small_corpus}", f"run.dir={run_dir}")
    out = run_dir / "model.safetensors"
    run_mtp("export", "--checkpoint", str(run_dir), "--out", str(out))
    return run_dir, out


def generate(model: Path, *args: str, check: bool = True):
    return run_mtp("generate", "--model", str(model), *args, check=check)


def test_speculative_greedy_prints_what_plain_greedy_prints(exported):
    run_dir, model = exported
    plain = generate(model, *PROMPTS, "--max-new-tokens", "20", "--stats")
    spec = generate(model, *PROMPTS, "--max-new-tokens", "20", "--speculative", "3", "--batch-size", "2", "--stats")
    assert spec.stdout == plain.stdout
    assert plain.stdout.count("=== completion") == 3
    assert "plain: " in plain.stderr and "1.00 tokens/forward" in plain.stderr
    assert "speculative K=3: " in spec.stderr and "tokens/s" in spec.stderr
    from_run_dir = generate(run_dir, *PROMPTS, "--max-new-tokens", "20", "--speculative", "2")
    assert from_run_dir.stdout == plain.stdout


def test_sampling_repeats_with_its_seed_and_reads_prompt_files(exported, tmp_path):
    _, model = exported
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps("def f(x):") + "\n" + json.dumps({"prompt": "for i in"}) + "\n")
    args = ["--prompt-file", str(prompts), "--temperature", "0.8", "--top-p", "0.9", "--speculative", "3",
            "--seed", "7", "--max-new-tokens", "12"]
    first, again = generate(model, *args), generate(model, *args)
    assert first.stdout == again.stdout and first.stdout.count("=== completion") == 2


def test_bfloat16_generation_runs_on_cpu_and_speculation_keeps_the_output(exported):
    """The GPU's dtype on the CPU: speculative greedy equals plain greedy in bf16 too."""
    _, model = exported
    plain = generate(model, *PROMPTS, "--max-new-tokens", "12", "--dtype", "bfloat16")
    spec = generate(model, *PROMPTS, "--max-new-tokens", "12", "--dtype", "bfloat16", "--speculative", "3")
    assert spec.stdout == plain.stdout and plain.stdout.count("=== completion") == 3


def test_heldout_function_prompt(exported):
    _, model = exported
    out = generate(model, "--heldout-function", "0", "--max-new-tokens", "8", "--speculative", "3", "--stats", "--echo")
    assert out.stdout.startswith(heldout_function_prompt(0, ByteTokenizer(), 64 - 8))  # max_seq_len - new tokens
    assert "speculative K=3: " in out.stderr
    wrong = generate(model, "--heldout-function", "100000", "--max-new-tokens", "8", check=False)
    assert wrong.returncode == 2 and "--heldout-function 100000: choose 0.." in wrong.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--speculative", "4"], "this model has 3 heads"),
        (["--speculative", "two"], "--speculative two"),
        (["--temperature", "-1"], "--temperature -1.0 must be >= 0"),
        (["--top-p", "1.5", "--temperature", "1"], "--top-p 1.5"),
        (["--max-new-tokens", "100"], "max_seq_len 64"),
    ],
)
def test_bad_inputs_are_one_clear_line(exported, args, needle):
    _, model = exported
    out = generate(model, "--prompt", "x", *args, check=False)
    assert out.returncode == 2, out.stderr
    assert needle in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_missing_model_is_one_clear_line(tmp_path):
    out = generate(tmp_path / "nope.safetensors", "--prompt", "x", check=False)
    assert out.returncode == 2 and "does not exist" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_bench_speculative_reports_every_k_and_batch_size(exported):
    _, model = exported
    out = run_mtp("bench", "speculative", "--model", str(model), "--prompts", "2", "--prompt-tokens", "24",
                  "--new-tokens", "16", "--batch-sizes", "1,2", "--json")
    report = json.loads(out.stdout)
    rows = {(r["batch_size"], r["heads"]): r for r in report["rows"]}
    assert set(rows) == {(b, k) for b in (1, 2) for k in (1, 2, 3)}
    for row in rows.values():
        assert row["identical"] == row["prompts"] == 2  # greedy speculation never changes a completion
        assert 1.0 <= row["tokens_per_forward"] <= row["heads"]
        assert row["speedup"] > 0 and row["tokens"] > 0
    assert rows[(1, 1)]["speedup"] == 1.0 and rows[(1, 1)]["tokens_per_forward"] == 1.0
    assert report["setup"]["n_future"] == 3
