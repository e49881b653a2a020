"""pretrain/hf in one process: the tensor mapping against the real `transformers` Llama, tokenizers, import.

Models here are random (float32, CPU); trained models through the real
`mtp` commands are in tests/integration/test_hf.py.
"""

import json
import os

import pytest
import torch

from data_pipeline.tokenizer import ByteTokenizer, load_tokenizer_path, train_bpe
from pretrain.errors import UserError
from pretrain.hf import mapping
from pretrain.hf.export import check_representable, write_directory
from pretrain.hf.load import pretrained_state
from pretrain.hf.shape import apply_llama_shape
from pretrain.hf.tokenizer import read_tokenizer, vocabulary_problem, write_tokenizer
from pretrain.model.config import ModelConfig
from pretrain.model.mtp import MTPModel
from tests.hf_llama import llama_weights, make_llama, set_config

TEXTS = ["def f(x):\n    return x * 2\n", "class A:\n    pass\n", "import json\nprint(json.dumps({'a': 1}))\n"] * 20
TRICKY = ["hello world", "  def f():\n\tx = 'é€😀'\r\n", "a<|eod|>b<|pad|>c", "\x00\x7f", " ", "Ġ ĉ", ""]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """(our BPE tokenizer, the directory holding its tokenizer.json)."""
    tokenizer = train_bpe(TEXTS, 300)
    directory = tmp_path_factory.mktemp("bpe")
    tokenizer.save(str(directory))
    return tokenizer, directory


@pytest.fixture(autouse=True)
def modules_cache(tmp_path, monkeypatch):
    """trust_remote_code copies modeling files into HF_MODULES_CACHE: keep that inside the test's folder."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))


def random_mtp(head_type="transformer", kv_heads=None, n_future=3, vocab=ByteTokenizer.vocab_size) -> MTPModel:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, n_kv_heads=kv_heads, n_future=n_future,
                      head_type=head_type, max_seq_len=64, norm_eps=1e-5, rope_theta=5000.0, init_std=0.2)
    return MTPModel(cfg).eval()


def logical_state(model: MTPModel) -> dict[str, torch.Tensor]:
    vocab = model.cfg.vocab_size
    return {k: (v[:vocab] if k in (mapping.EMBED, mapping.OUTPUT) else v) for k, v in model.state_dict().items()
            if not k.endswith("_extra_state")}


def test_fused_qkv_is_interleaved_per_query_group():
    heads, kv_heads, hn, d = 4, 2, 3, 5
    qkv = torch.arange(kv_heads * (heads // kv_heads + 2) * hn * d, dtype=torch.float32).view(-1, d)
    q, k, v = mapping.split_qkv(qkv, heads, kv_heads)
    # group 0 is rows [q0 q1 k0 v0], group 1 [q2 q3 k1 v1], each hn rows
    assert torch.equal(q[:2 * hn], qkv[: 2 * hn]) and torch.equal(k[:hn], qkv[2 * hn : 3 * hn])
    assert torch.equal(v[hn:], qkv[-hn:]) and torch.equal(q[2 * hn :], qkv[4 * hn : 6 * hn])
    assert torch.equal(mapping.fuse_qkv(q, k, v, heads, kv_heads), qkv)


@pytest.mark.parametrize("head_type, kv_heads", [("transformer", None), ("transformer", 2), ("sequential", 2)])
def test_export_directory_gives_our_logits_for_every_head(head_type, kv_heads, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    model = random_mtp(head_type, kv_heads)
    write_directory(tmp_path, model.cfg, logical_state(model), ByteTokenizer(), torch.float32, {"step": 0, "tokens": 0})
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.head_logits(ids)  # [b, s, n, V]
        plain = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
        remote = AutoModelForCausalLM.from_pretrained(str(tmp_path), trust_remote_code=True).eval()
        assert type(plain) is LlamaForCausalLM and type(remote).__name__ == "MTPLlamaForCausalLM"
        assert torch.allclose(plain(ids).logits, ours[:, :, 0], rtol=0, atol=1e-5)
        out = remote(ids)
    assert torch.allclose(out.logits, ours[:, :, 0], rtol=0, atol=1e-5)
    assert out.head_logits.shape == ours.shape
    assert torch.allclose(out.head_logits, ours, rtol=0, atol=1e-5)
    heads = json.loads((tmp_path / "mtp_heads.json").read_text())
    assert (heads["n_future"], heads["head_type"], len(heads["order"])) == (3, head_type, 3)


def test_export_of_n1_model_has_no_extra_heads(tmp_path):
    model = random_mtp(n_future=1)
    write_directory(tmp_path, model.cfg, logical_state(model), ByteTokenizer(), torch.bfloat16, {"step": 0, "tokens": 0})
    assert not (tmp_path / "extra_heads.safetensors").exists()
    weights = llama_weights(tmp_path)
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    assert weights["model.embed_tokens.weight"].shape == (ByteTokenizer.vocab_size, 32)  # padding rows cut
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"


def test_linear_heads_are_refused_with_the_reason():
    with pytest.raises(UserError, match="linear heads: head 1 is a d x d matrix"):
        check_representable(ModelConfig(vocab_size=258, head_type="linear"))


def test_a_mapping_that_would_drop_a_tensor_fails():
    model = random_mtp()
    state = {**logical_state(model), "heads.surprise.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="heads.surprise.weight"):
        mapping.to_hf(state, model.cfg)


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_auto_tokenizer_gives_our_ids(kind, bpe, tmp_path):
    from transformers import AutoTokenizer

    ours = ByteTokenizer() if kind == "byte" else bpe[0]
    write_tokenizer(ours, tmp_path, 64)
    theirs = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TRICKY + TEXTS[:3]:
        assert theirs(text).input_ids == ours.encode(text), text
        assert theirs.decode(ours.encode(text) + [ours.eod_id], skip_special_tokens=True) == ours.decode(ours.encode(text))
    assert (theirs.eos_token_id, theirs.pad_token_id, theirs.bos_token_id) == (ours.eod_id, ours.pad_id, None)
    assert len(theirs) == ours.vocab_size
    assert type(read_tokenizer(tmp_path)) is type(ours)  # tokenizer_info.json: ours, exactly


def test_model_directory_tokenizer_uses_its_named_eos(bpe, tmp_path):
    llama = make_llama(tmp_path / "llama", bpe[1] / "tokenizer.json")
    theirs = load_tokenizer_path(str(llama))  # what `mtp prepare --tokenizer DIR` reads
    assert theirs.eod_id == bpe[0].eod_id and vocabulary_problem(bpe[0], theirs) is None
    assert "ids against" in vocabulary_problem(ByteTokenizer(), theirs)


def llama_cfg(directory, **fields) -> ModelConfig:
    cfg = ModelConfig(init_from=f"hf:{directory}", n_future=3, max_seq_len=64, **fields)
    apply_llama_shape(cfg)
    return cfg


def test_import_state_is_the_llama_with_heads_from_its_last_layer(bpe, tmp_path):
    llama = make_llama(tmp_path / "llama", bpe[1] / "tokenizer.json", extra_rows=5, layers=4)
    cfg = llama_cfg(llama, n_layers=7, d_model=999)  # shape keys are replaced by the checkpoint's
    assert (cfg.trunk_layers, cfg.d_model, cfg.kv_heads, cfg.ffn_size, cfg.rope_theta) == (3, 32, 2, 96, 500000.0)
    cfg.vocab_size = bpe[0].vocab_size
    state = pretrained_state(cfg, bpe[0])
    weights = llama_weights(llama)
    assert state[mapping.EMBED].shape[0] == bpe[0].vocab_size  # the 5 padding rows of the checkpoint are cut
    assert torch.equal(state[mapping.OUTPUT], weights["lm_head.weight"][: bpe[0].vocab_size])
    assert torch.equal(state["heads.layers.2.mlp.linear_fc1.weight"], state["heads.layers.0.mlp.linear_fc1.weight"])
    assert len(state) == len(list(MTPModel(cfg, device="meta").parameters()))  # every weight comes from the Llama
    model = MTPModel(cfg, pretrained=state)
    padded = model.embedding.embed.weight[bpe[0].vocab_size :]
    assert padded.shape[0] > 0 and not padded.any()
    hf_from_ours, _ = mapping.to_hf(logical_state(model), cfg)
    for name, tensor in hf_from_ours.items():
        assert torch.equal(tensor, weights[name][: tensor.shape[0]]), name


def test_random_extra_heads_and_untied_embeddings(bpe, tmp_path):
    llama = make_llama(tmp_path / "llama", bpe[1] / "tokenizer.json", tied=True)
    with pytest.raises(UserError, match="init_untie_embeddings=true"):
        llama_cfg(llama)
    cfg = llama_cfg(llama, init_untie_embeddings=True, init_extra_heads="random", vocab_size=bpe[0].vocab_size)
    state = pretrained_state(cfg, bpe[0])
    assert not any(name.startswith(("heads.layers.1.", "heads.layers.2.")) for name in state)
    assert torch.equal(state[mapping.OUTPUT], state[mapping.EMBED])


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "only LlamaForCausalLM"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope_type='llama3'"),
        ({"attention_bias": True}, "biases in attention"),
        ({"num_hidden_layers": 1}, "fewer than 2 layers"),
    ],
)
def test_configs_that_do_not_fit_are_refused(change, needle, bpe, tmp_path):
    llama = make_llama(tmp_path / "llama", bpe[1] / "tokenizer.json")
    set_config(llama, **change)
    with pytest.raises(UserError, match=needle):
        llama_cfg(llama)


def test_missing_or_broken_checkpoints_are_refused(bpe, tmp_path):
    with pytest.raises(UserError, match="is not a directory"):
        llama_cfg(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        llama_cfg(tmp_path / "empty")
    llama = make_llama(tmp_path / "llama", bpe[1] / "tokenizer.json", shard_size="10GB")
    cfg = llama_cfg(llama, vocab_size=bpe[0].vocab_size)
    with pytest.raises(UserError, match="does not match"):
        pretrained_state(cfg, ByteTokenizer())
    os.rename(llama / "model.safetensors", llama / "pytorch_model.bin")
    with pytest.raises(UserError, match="no \\*.safetensors weights .*pytorch_model.bin"):
        pretrained_state(cfg, bpe[0])
