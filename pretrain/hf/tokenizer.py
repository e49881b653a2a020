"""Tokenizers across the boundary: ours as files `AutoTokenizer` loads with our ids, a model directory's as ours.

Export writes, with transformers' own `PreTrainedTokenizerFast.save_pretrained`:
- `tokenizer.json`: for BPE (or any tokenizer.json tokenizer) the very file we
  trained or were given; for the byte tokenizer one built from its byte -> id
  table (a byte-level BPE with no merges, ids 0..255 = the bytes, then the
  end-of-document and padding tokens at their ids);
- `tokenizer_config.json`: our end-of-document token as eos, our pad token as
  pad, no BOS (transformers' Llama defaults, bos 1 / eos 2, are real bytes
  here), and `split_special_tokens: true`, so text that spells a special
  token stays text, as our tokenizers encode it;
- `tokenizer_info.json`: ours, so `mtp prepare --tokenizer DIR` and
  `model.init_from=hf:DIR` read the exported tokenizer back exactly.

A model directory from elsewhere has no `tokenizer_info.json`: its
`tokenizer.json` is read with the eos and pad tokens its
`tokenizer_config.json` (or `config.json`) names.
"""

import json
from pathlib import Path

from data_pipeline.tokenizer import (
    EOD_TOKEN,
    HF_FILE,
    INFO_FILE,
    PAD_TOKEN,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    hf_from_json,
    load_tokenizer,
)
from pretrain.errors import UserError

CONFIG_FILE = "tokenizer_config.json"
# Texts both tokenizers must encode alike before a run mixes a checkpoint's weights with a data set's ids.
PROBES = ("def f(x):\n    return x ** 2  # square\n", "\tÜber naïve café 東京 😀\r\n", "<|eod|> <s> </s> [PAD]")


def byte_level_core(tokenizer: ByteTokenizer):
    """A `tokenizers.Tokenizer` giving exactly the byte tokenizer's ids (and decoding them back)."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Core
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbol = bytes_to_unicode()  # byte -> the printable character byte-level BPE stands it for
    core = Core(models.BPE(vocab={symbol[b]: b for b in range(256)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    specials = sorted([(tokenizer.eod_id, EOD_TOKEN), (tokenizer.pad_id, PAD_TOKEN)])
    core.add_special_tokens([AddedToken(text, special=True, normalized=False) for _, text in specials])
    for token_id, text in specials:
        if core.token_to_id(text) != token_id:
            raise AssertionError(f"byte tokenizer: {text} landed on id {core.token_to_id(text)}, not {token_id}")
    return core


def special_tokens(tokenizer: Tokenizer) -> tuple[str, str]:
    """(end-of-document text, pad text) of one of our tokenizers."""
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.eod_token, tokenizer.pad_token
    return EOD_TOKEN, PAD_TOKEN


def write_tokenizer(tokenizer: Tokenizer, directory: Path, max_length: int) -> None:
    """The tokenizer files of an exported model directory (see the module docstring)."""
    from tokenizers import Tokenizer as Core
    from transformers import PreTrainedTokenizerFast

    core = byte_level_core(tokenizer) if isinstance(tokenizer, ByteTokenizer) else Core.from_str(tokenizer.to_json())
    eod, pad = special_tokens(tokenizer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=eod, pad_token=pad, bos_token=None, unk_token=None,
        split_special_tokens=True, model_max_length=max_length, clean_up_tokenization_spaces=False,
    )
    wrapped.save_pretrained(str(directory))
    config_path = directory / CONFIG_FILE
    config = json.loads(config_path.read_text())
    # transformers 5 writes its new class name; 4.x readers (vLLM, lm-eval installs) know the old one, 5.x both
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save(str(directory))  # tokenizer_info.json, and for BPE our own tokenizer.json byte for byte


def read_tokenizer(directory: Path) -> Tokenizer:
    """The tokenizer of a model directory: ours if we exported it, else its tokenizer.json and eos/pad tokens."""
    if (directory / INFO_FILE).is_file():
        return load_tokenizer(str(directory))
    path = directory / HF_FILE
    if not path.is_file():
        raise UserError(f"{directory} has no {HF_FILE} (a fast tokenizer); write one with "
                        f"AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR) and try again")
    eod, pad = _named_specials(directory)
    tokenizer = hf_from_json(path.read_text(encoding="utf-8"), str(path), "hf", eod, pad)
    if tokenizer.eod_id is None or tokenizer.pad_id is None:
        raise UserError(f"{directory}: the eos token {eod!r} or pad token {pad!r} its configs name is not in "
                        f"{HF_FILE}; fix eos_token / pad_token in {CONFIG_FILE}")
    return tokenizer


def _named_specials(directory: Path) -> tuple[str | None, str | None]:
    """eos and pad texts from tokenizer_config.json, else the token of config.json's eos_token_id; None: guess."""
    config = _json(directory / CONFIG_FILE)
    eod, pad = _text(config.get("eos_token")), _text(config.get("pad_token"))
    if eod is None:
        model_config = _json(directory / "config.json")
        eos_id = model_config.get("eos_token_id")
        eos_id = eos_id[0] if isinstance(eos_id, list) and eos_id else eos_id
        if isinstance(eos_id, int):
            from tokenizers import Tokenizer as Core

            eod = Core.from_file(str(directory / HF_FILE)).id_to_token(eos_id)
    return eod, pad or eod


def _json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise UserError(f"{path} is not valid JSON ({err}); re-save the model directory") from None
    return data if isinstance(data, dict) else {}


def _text(token) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) and token else None


def vocabulary_problem(data: Tokenizer, model: Tokenizer) -> str | None:
    """Why token ids of `data` would mean other tokens to `model`, or None when they agree."""
    if data.vocab_size != model.vocab_size:
        return f"{data.vocab_size} ids against the model's {model.vocab_size}"
    if data.eod_id != model.eod_id:
        return f"end-of-document id {data.eod_id} against the model's {model.eod_id}"
    if isinstance(data, HFTokenizer) and isinstance(model, HFTokenizer):
        if data.tok.get_vocab(with_added_tokens=True) != model.tok.get_vocab(with_added_tokens=True):
            return "the same number of ids for different tokens"
    for text in PROBES:
        if data.encode(text) != model.encode(text):
            return f"different ids for {text!r}"
    return None
