"""A Hugging Face Llama `config.json` read as our model shape, with everything we cannot represent refused.

Torch-free (plain JSON), so `model.init_from=hf:DIR` fixes the model's shape
while the run config loads, before any process group or model exists, and
every command that loads the config (`mtp train`, `mtp plan`, `mtp submit`)
sees the same shape.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from pretrain.errors import UserError

CONFIG_FILE = "config.json"
LLAMA_ARCHITECTURE = "LlamaForCausalLM"
PREFIX = "hf:"


@dataclass(frozen=True)
class LlamaShape:
    """What an MTP model must match to hold a Llama's weights."""

    hidden_size: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    rope_theta: float
    norm_eps: float
    vocab_rows: int  # rows of its embedding (may exceed its tokenizer's ids)
    tied: bool  # lm_head shares the embedding's weight


def hf_dir(init_from: str) -> Path:
    """`hf:DIR` -> DIR, which must be a directory holding a config.json."""
    directory = Path(init_from[len(PREFIX):])
    if not init_from.startswith(PREFIX) or not str(directory):
        raise UserError(f"model.init_from={init_from}: write hf:DIR, DIR a local Hugging Face model directory")
    if not directory.is_dir():
        raise UserError(f"model.init_from={init_from}: {directory} is not a directory; "
                        "download the model first (nothing is fetched at run time) and pass its local path")
    if not (directory / CONFIG_FILE).is_file():
        raise UserError(f"model.init_from={init_from}: {directory} has no {CONFIG_FILE}; "
                        "pass a directory written by save_pretrained (config.json, *.safetensors, tokenizer.json)")
    return directory


def read_config(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); re-download or re-save the model") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} must hold a JSON object")
    return raw


def llama_shape(directory: Path) -> LlamaShape:
    """The Llama shape of `directory`'s config.json; UserError for anything that is not a plain Llama."""
    raw = read_config(directory)
    where = directory / CONFIG_FILE
    architectures = raw.get("architectures") or []
    if raw.get("model_type") != "llama" or (architectures and LLAMA_ARCHITECTURE not in architectures):
        found = raw.get("model_type"), architectures
        raise UserError(f"{where} describes model_type={found[0]!r}, architectures={found[1]}; only "
                        f"{LLAMA_ARCHITECTURE} (model_type llama) checkpoints can start an MTP run")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if not isinstance(raw.get(key), int):
            raise UserError(f"{where} has no integer {key}; it is not a complete Llama config")
    heads = raw["num_attention_heads"]
    _refuse_unsupported(raw, where, heads)
    return LlamaShape(
        hidden_size=raw["hidden_size"], layers=raw["num_hidden_layers"], heads=heads,
        kv_heads=raw.get("num_key_value_heads") or heads, ffn=raw["intermediate_size"],
        rope_theta=float(_rope(raw, where).get("rope_theta", raw.get("rope_theta", 10000.0))),
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)), vocab_rows=raw["vocab_size"],
        tied=bool(raw.get("tie_word_embeddings", False)),
    )


def _rope(raw: dict, where: Path) -> dict:
    """rope_parameters (transformers 5) or rope_scaling (4.x); only plain rotary positions fit our model."""
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise UserError(f"{where} uses rope_type={kind!r} (scaled rotary positions); the MTP model implements "
                        "plain rotary positions only (rope_type default)")
    return rope


def _refuse_unsupported(raw: dict, where: Path, heads: int) -> None:
    head_dim = raw.get("head_dim") or raw["hidden_size"] // heads
    checks = [
        (raw.get("hidden_act", "silu") == "silu", f"hidden_act={raw.get('hidden_act')!r} (the MTP model's MLP is SwiGLU)"),
        (not raw.get("attention_bias") and not raw.get("mlp_bias"), "biases in attention or MLP (ours have none)"),
        (raw["hidden_size"] % heads == 0 and head_dim * heads == raw["hidden_size"],
         f"head_dim={head_dim} x {heads} heads != hidden_size {raw['hidden_size']}"),
        ((raw.get("pretraining_tp") or 1) == 1, "pretraining_tp > 1 (sliced matmuls)"),
        (raw["num_hidden_layers"] >= 2, "fewer than 2 layers (trunk + head 1 need at least one each)"),
    ]
    for ok, what in checks:
        if not ok:
            raise UserError(f"{where} has {what}, which the MTP model cannot represent; pick another checkpoint")


def apply_llama_shape(model) -> None:
    """Set a `ModelConfig`'s shape from `model.init_from` (in place): trunk + head 1 = the Llama's layers.

    The layer count is set through `trunk_layers` (the Llama's last layer
    becomes head 1), whatever `n_layers` counts: n_layers is moved by the
    difference, which holds for any definition that is n_layers plus a
    constant.
    """
    if not model.init_from:
        return
    directory = hf_dir(model.init_from)
    shape = llama_shape(directory)
    if model.head_type == "linear":
        raise UserError("model.head_type=linear cannot start from a Llama: its head 1 is a d x d matrix, not the "
                        "Llama's last decoder layer; use model.head_type=transformer or sequential")
    if shape.tied and not model.init_untie_embeddings:
        raise UserError(f"{directory} ties its embedding and output weights (tie_word_embeddings), which an MTP "
                        "model keeps apart; set model.init_untie_embeddings=true to start the unembedding as a "
                        "copy of the embedding")
    model.d_model = shape.hidden_size
    model.n_heads = shape.heads
    model.n_kv_heads = None if shape.kv_heads == shape.heads else shape.kv_heads
    model.ffn_hidden = shape.ffn
    model.rope_theta = shape.rope_theta
    model.norm_eps = shape.norm_eps
    model.n_layers += (shape.layers - 1) - model.trunk_layers
