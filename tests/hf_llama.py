"""A Hugging Face Llama directory made here: a config, random weights, a tokenizer (nothing is downloaded)."""

import json
from pathlib import Path

import torch


def make_llama(out: Path, tokenizer_json: Path, *, layers: int = 3, kv_heads: int = 2, tied: bool = False,
               extra_rows: int = 0, shard_size: str = "100KB", seed: int = 0) -> Path:
    """`save_pretrained` of a random LlamaForCausalLM whose vocabulary is `tokenizer_json`'s (+ `extra_rows`).

    The tokenizer is saved as transformers saves any fast tokenizer (no
    tokenizer_info.json), eos = `<|eod|>`, so the directory looks like one
    from the Hub. A small `shard_size` splits the weights over several files.
    """
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    core = Tokenizer.from_file(str(tokenizer_json))
    eod = core.token_to_id("<|eod|>")
    config = LlamaConfig(
        vocab_size=core.get_vocab_size(with_added_tokens=True) + extra_rows, hidden_size=32, intermediate_size=96,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        bos_token_id=None, eos_token_id=eod, pad_token_id=None, tie_word_embeddings=tied, initializer_range=0.2,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(str(out), max_shard_size=shard_size)
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|eod|>", bos_token=None).save_pretrained(str(out))
    return out


def llama_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a directory's model*.safetensors shards."""
    from safetensors.torch import load_file

    weights = {}
    for file in sorted(directory.glob("model*.safetensors")):
        weights.update(load_file(str(file)))
    return weights


def set_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
