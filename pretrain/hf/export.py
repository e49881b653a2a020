"""`mtp export --format hf`: a directory `transformers` loads as a `LlamaForCausalLM`, plus the MTP heads.

Contents:

| file | what |
|---|---|
| `config.json`, `model*.safetensors` | trunk + head 1 + final norm + lm_head as a Llama (vocabulary padding cut) |
| `generation_config.json` | greedy, eos = our end-of-document id, pad = our pad id, no BOS |
| tokenizer files | see `pretrain.hf.tokenizer` |
| `extra_heads.safetensors`, `mtp_heads.json` | heads 2..n (`extra_heads.{k-2}.*`, decoder-layer names), n, head type, order |
| `modeling_mtp_llama.py` | `trust_remote_code=True`: every head's logits |

The directory is written under a temporary name beside `--out` and renamed
into place when complete; an existing one is replaced only with
`--overwrite`, and only after the new one is complete.
"""

import json
import os
import shutil
from pathlib import Path

import torch

from pretrain.errors import UserError
from pretrain.model.config import ModelConfig

HEADS_FILE = "mtp_heads.json"
EXTRA_FILE = "extra_heads.safetensors"
MODELING_FILE = "modeling_mtp_llama.py"
REMOTE_CLASS = "modeling_mtp_llama.MTPLlamaForCausalLM"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SHARD_SIZE = "5GB"  # the Hub's usual shard size; every loader reads the index


def export_hf(checkpoint: str, out: str, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write the directory `out` from a checkpoint of any layout; returns the step dir it read."""
    from parallel.reshard import full_model_state
    from pretrain import checkpoint as ckpt
    from pretrain.export import resolve_checkpoint

    target = Path(out)
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    if target.exists() and not overwrite:
        raise UserError(f"{out} already exists; choose another --out, or pass --overwrite to replace it")
    if target.exists() and not target.is_dir():
        raise UserError(f"{out} is a file; --format hf writes a directory, choose another --out")
    step_dir = resolve_checkpoint(checkpoint)
    extra = json.loads((step_dir / ckpt.EXTRA).read_text())
    cfg = ModelConfig(**extra["model"])
    check_representable(cfg)
    from data_pipeline.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(step_dir / "tokenizer"))
    state = full_model_state(str(step_dir), cfg.vocab_size)  # vocabulary rows = the tokenizer's ids, unpadded
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    try:
        write_directory(temp, cfg, state, tokenizer, DTYPES[dtype], {"step": extra["step"], "tokens": extra["tokens"]})
        _publish(temp, target)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return step_dir


def check_representable(cfg: ModelConfig) -> None:
    """Linear heads have no Llama form: head 1 is a d x d matrix between the trunk and the final norm."""
    if cfg.head_type == "linear":
        raise UserError(
            "this model has linear heads: head 1 is a d x d matrix between the trunk and the final norm, which "
            "a LlamaForCausalLM has no place for (a decoder layer adds a residual and a SwiGLU, it cannot equal "
            "a plain matrix), so no exact Llama exists; use `mtp export` (the mtp format) for this model"
        )


def write_directory(directory: Path, cfg: ModelConfig, state: dict[str, torch.Tensor], tokenizer,
                    dtype: torch.dtype, source: dict) -> None:
    """Every file of the export into the (empty) `directory`."""
    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import save_file

    from pretrain.hf.mapping import to_hf
    from pretrain.hf.tokenizer import write_tokenizer

    llama, extra = (_cast(part, dtype) for part in to_hf(state, cfg))
    save_torch_state_dict(llama, str(directory), max_shard_size=SHARD_SIZE, metadata={"format": "pt"})
    if extra:
        save_file(extra, str(directory / EXTRA_FILE), metadata={"format": "pt"})
    _write_configs(directory, cfg, tokenizer, dtype)
    (directory / HEADS_FILE).write_text(json.dumps(heads_description(cfg, source), indent=2) + "\n")
    shutil.copyfile(Path(__file__).with_name(MODELING_FILE), directory / MODELING_FILE)
    write_tokenizer(tokenizer, directory, cfg.max_seq_len)
    _readable(directory)


def _readable(directory: Path) -> None:
    """Files as the umask allows: safetensors writes 0600, and a served model is often read by another user."""
    umask = os.umask(0)
    os.umask(umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`dtype` tensors that own their storage (the vocabulary cut leaves views of the padded rows)."""
    out = {}
    for name, t in tensors.items():
        t = t.to(dtype).contiguous()
        out[name] = t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t
    return out


def llama_config(cfg: ModelConfig, tokenizer, dtype: torch.dtype):
    """The `LlamaConfig` of trunk + head 1 (norm_eps, rope_theta and GQA from our config; untied)."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.trunk_layers + 1, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.d_model // cfg.n_heads, hidden_act="silu", max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, initializer_range=cfg.init_std, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        bos_token_id=None, eos_token_id=tokenizer.eod_id, pad_token_id=tokenizer.pad_id,
        architectures=["LlamaForCausalLM"], dtype=dtype,
    )
    config.auto_map = {"AutoModelForCausalLM": REMOTE_CLASS}  # used only with trust_remote_code=True
    return config


def _write_configs(directory: Path, cfg: ModelConfig, tokenizer, dtype: torch.dtype) -> None:
    from transformers import GenerationConfig

    llama_config(cfg, tokenizer, dtype).save_pretrained(str(directory))
    path = directory / "config.json"
    raw = json.loads(path.read_text())
    # transformers 4.x and vLLM read these two keys; 5.x reads rope_parameters and dtype and accepts both
    raw.update(rope_theta=cfg.rope_theta, torch_dtype=str(dtype).removeprefix("torch."))
    path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    GenerationConfig(bos_token_id=None, eos_token_id=tokenizer.eod_id, pad_token_id=tokenizer.pad_id,
                     do_sample=False).save_pretrained(str(directory))


def heads_description(cfg: ModelConfig, source: dict) -> dict:
    """`mtp_heads.json`: what a reader needs to run heads 2..n, and what plain Llama loading leaves out."""
    last = cfg.trunk_layers
    order = [f"head 1 (token t+1): model.layers.{last}, in the Llama itself"]
    order += [f"head {k} (token t+{k}): extra_heads.{k - 2}.*" for k in range(2, cfg.n_future + 1)]
    reads = {"transformer": f"every head reads the trunk output z, the input of model.layers.{last}",
             "sequential": f"head 1 reads z (the input of model.layers.{last}); head k >= 2 reads "
                           "proj([hidden_norm(h_{k-1}); embed_norm(embed_tokens(x_{t+k-1}))])"}[cfg.head_type]
    return {
        "format": "mtp-hf-heads-1", "n_future": cfg.n_future, "head_type": cfg.head_type,
        "trunk_layers": cfg.trunk_layers, "order": order, "reads": reads,
        "unembedding": "every head's hidden state goes through model.norm and lm_head",
        "plain_llama": "LlamaForCausalLM loads the trunk and head 1 only; trust_remote_code=True loads every head",
        **source,
    }


def _publish(temp: Path, target: Path) -> None:
    """Move the finished directory into place; an old one is removed only after the swap."""
    if not target.exists():
        os.rename(temp, target)
        return
    old = temp.with_name(temp.name + ".old")
    os.rename(target, old)
    os.rename(temp, target)
    shutil.rmtree(old)
