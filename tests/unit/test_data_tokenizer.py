"""Tokenizers: exact round trips on real code, special-token handling, save/load, spec errors."""

import os

import pytest

from data_pipeline.sources import stdlib_files, stdlib_root
from data_pipeline.tokenizer import (
    ByteTokenizer,
    hf_from_json,
    load_tokenizer,
    load_tokenizer_path,
    parse_spec,
    train_bpe,
)
from pretrain.errors import UserError


def _text(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


def _stdlib_dir(name: str) -> list[str]:
    root = os.path.join(stdlib_root(), name)
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".py"))


@pytest.fixture(scope="module")
def bpe():
    texts = [_text(p) for p in _stdlib_dir("json") + _stdlib_dir("tomllib")]
    return train_bpe(texts, 600)


def test_byte_round_trip_on_every_stdlib_file():
    tok = ByteTokenizer()
    files = stdlib_files()
    assert len(files) > 1000
    for path in files:
        text = _text(path)
        ids = tok.encode(text)
        assert max(ids, default=0) < 256
        assert tok.decode(ids) == text, path


def test_byte_specials_decode_to_nothing_and_arrays_match():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eod_id, tok.pad_id) == (258, 256, 257)
    text = "héllo, 日本 <|eod|>\n"
    assert tok.decode(tok.encode(text) + [tok.eod_id, tok.pad_id]) == text
    assert tok.encode_array(text, "<u2").tolist() == tok.encode(text)


def test_bpe_round_trip_on_training_files_and_unseen_files(bpe):
    assert 258 < bpe.vocab_size <= 600
    assert bpe.eod_id != bpe.pad_id
    seen = _stdlib_dir("json") + _stdlib_dir("tomllib")
    unseen = _stdlib_dir("email") + _stdlib_dir("http")
    total_ids = total_bytes = 0
    for path in seen + unseen:
        text = _text(path)
        ids = bpe.encode(text)
        assert bpe.decode(ids) == text, path
        assert bpe.eod_id not in ids and bpe.pad_id not in ids
        total_ids += len(ids)
        total_bytes += len(text.encode())
    assert total_ids < 0.8 * total_bytes  # merges were learned and used


def test_special_token_strings_in_text_stay_text(bpe):
    text = "model.generate(stop='<|eod|>') # also <|pad|> and <|endoftext|>"
    ids = bpe.encode(text)
    assert bpe.eod_id not in ids and bpe.pad_id not in ids
    assert bpe.decode(ids) == text
    assert bpe.decode(ids + [bpe.eod_id]) == text


def test_save_and_load_give_identical_ids(bpe, tmp_path):
    bpe.save(str(tmp_path / "bpe"))
    text = _text(_stdlib_dir("email")[0])
    loaded = load_tokenizer(str(tmp_path / "bpe"))
    assert loaded.encode(text) == bpe.encode(text)
    assert (loaded.vocab_size, loaded.eod_id, loaded.pad_id) == (bpe.vocab_size, bpe.eod_id, bpe.pad_id)
    ByteTokenizer().save(str(tmp_path / "byte"))
    assert isinstance(load_tokenizer(str(tmp_path / "byte")), ByteTokenizer)


def _foreign_bpe(special_tokens: list[str]) -> str:
    """A tokenizer.json made by the tokenizers library alone, as users bring them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator([_text(p) for p in _stdlib_dir("json")], trainer)
    return core.to_str()


def test_foreign_tokenizer_json_without_eod_gets_one(tmp_path):
    path = tmp_path / "foreign.json"
    path.write_text(_foreign_bpe([]))
    tok = load_tokenizer_path(str(path))
    assert tok.eod_token == "<|eod|>" and tok.pad_id == tok.eod_id
    assert tok.eod_id == tok.vocab_size - 1  # appended after the learned vocabulary
    text = _text(_stdlib_dir("email")[0])
    assert tok.decode(tok.encode(text)) == text
    assert tok.eod_id not in tok.encode(text + "<|eod|>")


def test_foreign_tokenizer_json_uses_its_own_end_and_pad_tokens():
    tok = hf_from_json(_foreign_bpe(["<|endoftext|>", "<pad>"]), "test")
    assert (tok.eod_token, tok.eod_id) == ("<|endoftext|>", 0)
    assert (tok.pad_token, tok.pad_id) == ("<pad>", 1)


@pytest.mark.parametrize("spec", ["bpe:abc", "bpe:100", "no/such/tokenizer.json", "bytes"])
def test_bad_tokenizer_spec_is_a_user_error(spec):
    with pytest.raises(UserError, match="--tokenizer"):
        parse_spec(spec)


def test_parse_spec_accepts_the_three_forms(tmp_path):
    path = tmp_path / "t.json"
    path.write_text("{}")
    assert parse_spec("byte") == ("byte", None)
    assert parse_spec("bpe:8192") == ("bpe", 8192)
    assert parse_spec(str(path)) == ("file", str(path))


def test_missing_or_broken_tokenizer_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no tokenizer"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        load_tokenizer_path(str(tmp_path / "bad.json"))
