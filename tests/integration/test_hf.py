"""Hugging Face interop end to end: real `mtp train` / `mtp export --format hf` / `mtp generate` and real `transformers`.

Export parity: tiny models trained a few steps (MHA and GQA, byte and BPE
tokenizers, transformer and sequential heads) load in `transformers` as a
LlamaForCausalLM whose logits and greedy output are ours; the remote-code
model gives every head's logits. Import round trip: a LlamaForCausalLM made
here from a config with random weights starts a run (`model.init_from=hf:`)
and comes back out of `mtp export --format hf` unchanged.
"""

import sysconfig
from pathlib import Path

import pytest
import torch

from tests.hf_llama import llama_weights, make_llama, set_config
from tests.integration.conftest import run_mtp

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TINY = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=64", "model.loss_chunk_tokens=48",
    "train.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=4", "train.max_steps=4",
    "train.eval_interval=100", "train.log_interval=2", "checkpoint.interval=4", "schedule.warmup_steps=1",
    "optimizer.lr=3e-3", "tracking.enabled=false",
]
# One optimizer step whose updates (about 1e-30) are far below float32's resolution at the weights' size:
# the trainer, the engine, the checkpoint and the export all run, and the weights stay bit for bit.
NO_CHANGE = ["train.max_steps=1", "optimizer.lr=1e-30", "optimizer.weight_decay=0", "train.eval_interval=0",
             "checkpoint.interval=1", "schedule.warmup_steps=1", "train.seq_len=32", "model.max_seq_len=64",
             "train.global_batch_size=4", "train.micro_batch_size=4", "tracking.enabled=false"]
PROMPTS = ["def parse(self, text):\n    ", "import json\n", "class Message(object):"]
VARIANTS = {  # name: (corpus, model overrides)
    "byte-mha-transformer": ("byte", ["model.n_future=3"]),
    "bpe-gqa-transformer": ("bpe", ["model.n_future=2", "model.n_kv_heads=2"]),
    "byte-gqa-sequential": ("byte", ["model.n_future=3", "model.n_kv_heads=2", "model.head_type=sequential"]),
}


@pytest.fixture(autouse=True)
def modules_cache(tmp_path, monkeypatch):
    """trust_remote_code copies modeling files into HF_MODULES_CACHE: keep that inside the test's folder."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))


@pytest.fixture(scope="module")
def bpe_corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "stdlib-bpe"
    run_mtp("prepare", "--source", str(STDLIB / "json"), str(STDLIB / "email"), "--tokenizer", "bpe:400",
            "--out", str(out), "--val-fraction", "0.2", "--shard-tokens", "100000", "--workers", "1")
    return out


@pytest.fixture(scope="module")
def trained(small_corpus, bpe_corpus, tmp_path_factory):
    """name -> (run dir, hf export dir) of that variant trained 4 steps; each trained once per module."""
    done: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in done:
            corpus, overrides = VARIANTS[name]
            run_dir = tmp_path_factory.mktemp("runs") / name
            data = small_corpus if corpus == "byte" else bpe_corpus
            run_mtp("train", "--config", "configs/tiny-cpu.yaml", *TINY, *overrides, f"data.dir={data}",
                    f"run.dir={run_dir}")
            run_mtp("export", "--format", "hf", "--checkpoint", str(run_dir), "--out", str(run_dir / "hf"))
            done[name] = run_dir, run_dir / "hf"
        return done[name]

    return get


@pytest.fixture(params=list(VARIANTS))
def exported(request, trained) -> tuple[Path, Path]:
    return trained(request.param)


@pytest.fixture
def one_exported(trained) -> tuple[Path, Path]:
    """The GQA + BPE variant, for the command-line checks that need only one model."""
    return trained("bpe-gqa-transformer")


def load_ours(run_dir: Path):
    from pretrain.inference.loading import load_model

    return load_model(str(run_dir))


def greedy_ours(model, tokenizer, prompt: str, new_tokens: int) -> list[int]:
    """`mtp generate --speculative off`'s decoder: completion ids, the end-of-document id excluded."""
    from pretrain.inference.decode import Decoder
    from pretrain.inference.stopping import StopRules

    return Decoder(model, StopRules(tokenizer, new_tokens), 1).generate([tokenizer.encode(prompt)]).completions[0].tokens


def greedy_hf(hf, tokenizer, prompt: str, new_tokens: int) -> list[int]:
    ids = torch.tensor([tokenizer.encode(prompt)])
    out = hf.generate(ids, max_new_tokens=new_tokens, do_sample=False)[0, ids.shape[1]:].tolist()
    return out[: out.index(tokenizer.eod_id)] if tokenizer.eod_id in out else out


def test_export_loads_as_llama_with_our_logits_greedy_output_and_tokenizer(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    run_dir, out = exported
    model, tokenizer, cfg = load_ours(run_dir)
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(hf) is LlamaForCausalLM and hf.config.num_hidden_layers == cfg.trunk_layers + 1
    hf_tokenizer = AutoTokenizer.from_pretrained(str(out))
    text = "".join(PROMPTS) + " <|eod|> é😀\n"
    assert hf_tokenizer(text).input_ids == tokenizer.encode(text)
    assert (hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id, hf_tokenizer.bos_token_id) == (
        tokenizer.eod_id, tokenizer.pad_id, None)
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        ours = model.head_logits(ids)  # [1, s, n, V]
        theirs = hf(ids).logits
    assert theirs.shape == ours[:, :, 0].shape  # padding rows cut: exactly the tokenizer's ids
    assert torch.allclose(theirs, ours[:, :, 0], rtol=0, atol=1e-5)
    for prompt in PROMPTS:
        assert greedy_hf(hf, tokenizer, prompt, 24) == greedy_ours(model, tokenizer, prompt, 24), prompt


def test_remote_code_model_returns_our_heads(exported):
    from transformers import AutoModelForCausalLM

    run_dir, out = exported
    model, tokenizer, cfg = load_ours(run_dir)
    remote = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    ids = torch.tensor([tokenizer.encode("".join(PROMPTS))])
    with torch.no_grad():
        ours = model.head_logits(ids)
        heads = remote(ids).head_logits
    assert heads.shape == ours.shape and heads.shape[2] == cfg.n_future
    assert torch.allclose(heads, ours, rtol=0, atol=1e-5)


def test_mtp_generate_prints_what_transformers_generates(one_exported):
    from transformers import AutoModelForCausalLM

    run_dir, out = one_exported
    _, tokenizer, _ = load_ours(run_dir)
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    printed = run_mtp("generate", "--model", str(run_dir), "--prompt", PROMPTS[0], "--max-new-tokens", "20",
                      "--speculative", "off").stdout
    assert printed == tokenizer.decode(greedy_hf(hf, tokenizer, PROMPTS[0], 20)) + "\n"


def test_export_refuses_an_existing_directory_unless_overwrite(one_exported, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir, _ = one_exported
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    refused = run_mtp("export", "--format", "hf", "--checkpoint", str(run_dir), "--out", str(target), check=False)
    assert refused.returncode == 2 and "already exists" in refused.stderr and "Traceback" not in refused.stderr
    assert (target / "keep.txt").read_text() == "mine"
    run_mtp("export", "--format", "hf", "--checkpoint", str(run_dir), "--out", str(target), "--overwrite",
            "--dtype", "bfloat16")
    assert not (target / "keep.txt").exists()
    assert AutoModelForCausalLM.from_pretrained(str(target)).dtype == torch.bfloat16


def test_export_of_a_missing_checkpoint_is_one_line(tmp_path):
    proc = run_mtp("export", "--format", "hf", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
                   check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def llama(bpe_corpus, tmp_path_factory) -> tuple[Path, Path]:
    """(a local random GQA Llama in 3+ safetensors shards, corpus tokenized with its tokenizer)."""
    base = tmp_path_factory.mktemp("llama")
    directory = make_llama(base / "llama", bpe_corpus / "tokenizer.json", layers=3, kv_heads=2)
    assert len(list(directory.glob("model-*.safetensors"))) >= 3
    data = base / "data"
    run_mtp("prepare", "--source", str(STDLIB / "json"), "--tokenizer", str(directory), "--out", str(data),
            "--val-fraction", "0.2", "--shard-tokens", "100000", "--workers", "1")
    return directory, data


def test_import_round_trip_gives_back_the_same_weights_and_logits(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from pretrain.inference.forward import cached_logits
    from pretrain.inference.kv_cache import kv_cached

    directory, data = llama
    run_dir = tmp_path / "run"
    log = run_mtp("train", "--config", "configs/tiny-cpu.yaml", f"model.init_from=hf:{directory}", "model.n_future=3",
                  *NO_CHANGE, f"data.dir={data}", f"run.dir={run_dir}").stdout
    assert f"initialising from hf:{directory}" in log
    out = tmp_path / "hf"
    run_mtp("export", "--format", "hf", "--checkpoint", str(run_dir), "--out", str(out))
    original, back = llama_weights(directory), llama_weights(out)
    assert set(back) == set(original)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name
    from safetensors.torch import load_file

    for name, tensor in load_file(str(out / "extra_heads.safetensors")).items():  # heads 2, 3 = its last layer
        assert torch.equal(tensor, original["model.layers.2." + name.split(".", 2)[2]]), name

    model, tokenizer, cfg = load_ours(run_dir)
    hf = AutoModelForCausalLM.from_pretrained(str(directory)).eval()
    ids = torch.tensor([tokenizer.encode("".join(PROMPTS))])
    with torch.no_grad(), kv_cached(model, 1, 1, ids.shape[1]) as state:
        ours = cached_logits(model, state, ids, 1)[:, :, 0]  # mtp generate's forward, head 1
        theirs = hf(ids).logits
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-5)
    printed = run_mtp("generate", "--model", str(run_dir), "--prompt", PROMPTS[1], "--max-new-tokens", "20").stdout
    assert printed == tokenizer.decode(greedy_hf(hf, tokenizer, PROMPTS[1], 20)) + "\n"


def test_import_refuses_what_does_not_fit_with_one_line(llama, small_corpus, tmp_path):
    directory, data = llama

    def train(init_from: str, data_dir: Path):
        return run_mtp("train", "--config", "configs/tiny-cpu.yaml", f"model.init_from={init_from}", *NO_CHANGE,
                       f"data.dir={data_dir}", f"run.dir={tmp_path / 'run'}", check=False)

    gpt2 = tmp_path / "gpt2"
    make_llama(gpt2, directory / "tokenizer.json")
    set_config(gpt2, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    tied = tmp_path / "tied"
    make_llama(tied, directory / "tokenizer.json", tied=True)
    cases = [
        (f"hf:{tmp_path / 'missing'}", data, "is not a directory"),
        (f"hf:{gpt2}", data, "only LlamaForCausalLM"),
        (f"hf:{tied}", data, "model.init_untie_embeddings=true"),
        (f"hf:{directory}", small_corpus, "the data's tokenizer does not match"),
    ]
    for init_from, data_dir, needle in cases:
        proc = train(init_from, data_dir)
        assert proc.returncode == 2, proc.stderr
        assert needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not (tmp_path / "run" / "checkpoints").exists()
