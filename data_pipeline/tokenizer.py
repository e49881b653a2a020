"""Tokenizers: built-in bytes, byte-level BPE trained on the corpus, or any `tokenizer.json`.

Every data set and checkpoint stores its tokenizer next to it (`tokenizer_info.json`,
plus `tokenizer.json` for BPE), and everything downstream calls `load_tokenizer` on
that directory, so training, evaluation and generation can never disagree on ids.
"""

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable

import numpy as np

from data_pipeline import locations
from pretrain.errors import UserError

INFO_FILE = "tokenizer_info.json"
HF_FILE = "tokenizer.json"
EOD_TOKEN = "<|eod|>"
PAD_TOKEN = "<|pad|>"
# Names other tokenizers use for the same roles, tried in order on a foreign tokenizer.json.
EOD_NAMES = (EOD_TOKEN, "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
PAD_NAMES = (PAD_TOKEN, "<pad>", "[PAD]", "<|padding|>")
MIN_BPE_VOCAB = 259  # 256 byte symbols + eod + pad + at least one merge
SPEC_HELP = "use byte, bpe:VOCAB_SIZE (e.g. bpe:8192), the path of a tokenizer.json or a directory holding one"


class Tokenizer(ABC):
    """What the rest of the project relies on: text <-> ids plus two special ids."""

    vocab_size: int
    eod_id: int
    pad_id: int

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of `text`; special-token strings inside `text` stay ordinary text."""

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; the eod and pad ids decode to nothing."""

    @abstractmethod
    def save(self, directory: str) -> None:
        """Write the files `load_tokenizer(directory)` reads back (creating `directory`)."""

    @abstractmethod
    def describe(self) -> dict:
        """JSON description for manifests and logs."""

    def encode_array(self, text: str, dtype: np.dtype) -> np.ndarray:
        """`encode` as a numpy array of `dtype`; subclasses override with a faster path."""
        return np.asarray(self.encode(text), dtype=dtype)

    def encode_joined(self, texts: list[str], dtype: np.dtype) -> np.ndarray:
        """The documents' ids, each document followed by the eod id, as one array of `dtype`."""
        eod = np.array([self.eod_id], dtype=dtype)
        return np.concatenate([a for text in texts for a in (self.encode_array(text, dtype), eod)])


class ByteTokenizer(Tokenizer):
    """Ids 0..255 are the UTF-8 bytes of the text; 256 ends a document, 257 pads.

    No vocabulary file and no training, so it suits tests and byte-level models
    (the paper's n=8 byte models).
    """

    vocab_size = 258
    eod_id = 256
    pad_id = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str, dtype: np.dtype) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(dtype)

    def encode_joined(self, texts: list[str], dtype: np.dtype) -> np.ndarray:
        """One encode and one insert for the whole batch: the per-document cost is a UTF-8 encode."""
        encoded = [text.encode("utf-8") for text in texts]
        ends = np.cumsum([len(b) for b in encoded])  # [docs]
        ids = np.frombuffer(b"".join(encoded), dtype=np.uint8).astype(dtype)  # [bytes]
        return np.insert(ids, ends, np.array(self.eod_id, dtype=dtype))

    def decode(self, ids: Iterable[int]) -> str:
        data = bytes(i for i in ids if 0 <= i < 256)
        return data.decode("utf-8", errors="replace")

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        _write_json(os.path.join(directory, INFO_FILE), self.describe())

    def describe(self) -> dict:
        return {"type": "byte", "vocab_size": self.vocab_size, "eod_id": self.eod_id, "pad_id": self.pad_id}


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (BPE trained here, or loaded from any tokenizer.json)."""

    def __init__(self, tokenizer, kind: str, eod_token: str, pad_token: str):
        # Special-token strings that occur in the corpus must stay text, or a file
        # mentioning "<|endoftext|>" would silently split a document in two.
        tokenizer.encode_special_tokens = True
        self.tok = tokenizer
        self.kind = kind
        self.eod_token = eod_token
        self.pad_token = pad_token
        self.eod_id = tokenizer.token_to_id(eod_token)
        self.pad_id = tokenizer.token_to_id(pad_token)
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [enc.ids for enc in self.tok.encode_batch(texts, add_special_tokens=False)]

    def encode_joined(self, texts: list[str], dtype: np.dtype) -> np.ndarray:
        eod = np.array([self.eod_id], dtype=dtype)
        return np.concatenate([a for ids in self.encode_batch(texts) for a in (np.asarray(ids, dtype=dtype), eod)])

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def to_json(self) -> str:
        return self.tok.to_str()

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, HF_FILE), "w", encoding="utf-8") as f:
            f.write(self.tok.to_str())
        _write_json(os.path.join(directory, INFO_FILE), self.describe())

    def describe(self) -> dict:
        return {
            "type": self.kind,
            "file": HF_FILE,
            "vocab_size": self.vocab_size,
            "eod_token": self.eod_token,
            "eod_id": self.eod_id,
            "pad_token": self.pad_token,
            "pad_id": self.pad_id,
        }


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """Byte-level BPE (GPT-2 style): every byte is in the base alphabet, so round trips are exact."""
    from tokenizers import Tokenizer as HFCore
    from tokenizers import decoders, models, pre_tokenizers, trainers

    core = HFCore(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    return HFTokenizer(core, "bpe", EOD_TOKEN, PAD_TOKEN)


def hf_from_json(text: str, origin: str, kind: str = "hf", eod: str | None = None, pad: str | None = None) -> HFTokenizer:
    """Wrap a tokenizer.json; find (or add) its end-of-document and padding tokens."""
    from tokenizers import Tokenizer as HFCore

    try:
        core = HFCore.from_str(text)
    except Exception as err:  # noqa: BLE001 -- the library raises bare Exception on malformed JSON
        raise UserError(f"{origin} is not a valid tokenizer.json ({err}); {SPEC_HELP}") from None
    eod = eod or _first_present(core, EOD_NAMES)
    if eod is None:
        core.add_special_tokens([EOD_TOKEN])
        eod = EOD_TOKEN
    pad = pad or _first_present(core, PAD_NAMES) or eod
    return HFTokenizer(core, kind, eod, pad)


def _first_present(core, names: tuple[str, ...]) -> str | None:
    return next((name for name in names if core.token_to_id(name) is not None), None)


def load_tokenizer(location: str) -> Tokenizer:
    """The tokenizer stored in a data set or checkpoint directory (or webdataset URL prefix)."""
    info_bytes = locations.read_optional(location, INFO_FILE)
    if info_bytes is None:
        hf_bytes = locations.read_optional(location, HF_FILE)
        if hf_bytes is None:
            raise UserError(
                f"no tokenizer in {location} (neither {INFO_FILE} nor {HF_FILE}); "
                "point at a directory written by `mtp prepare` or a checkpoint"
            )
        return hf_from_json(hf_bytes.decode("utf-8"), locations.resolve(location, HF_FILE))
    info = json.loads(info_bytes)
    if info.get("type") == "byte":
        return ByteTokenizer()
    if info.get("type") in ("bpe", "hf"):
        text = locations.read_bytes(location, info.get("file", HF_FILE)).decode("utf-8")
        return hf_from_json(text, location, info["type"], info.get("eod_token"), info.get("pad_token"))
    raise UserError(f"{locations.resolve(location, INFO_FILE)} names unknown tokenizer type {info.get('type')!r}")


def parse_spec(spec: str) -> tuple[str, int | str | None]:
    """`--tokenizer` value -> ("byte", None) | ("bpe", vocab_size) | ("file", path)."""
    if spec == "byte":
        return "byte", None
    if spec.startswith("bpe:"):
        size = spec[4:]
        if not size.isdigit() or int(size) < MIN_BPE_VOCAB:
            raise UserError(f"--tokenizer {spec}: the vocabulary size must be an integer >= {MIN_BPE_VOCAB}; {SPEC_HELP}")
        return "bpe", int(size)
    if os.path.exists(spec):
        return "file", spec
    raise UserError(f"--tokenizer {spec}: not byte, bpe:N, or an existing file; {SPEC_HELP}")


def load_tokenizer_path(path: str) -> Tokenizer:
    """A `--tokenizer PATH`: a tokenizer.json file, or a directory holding one (a data set, a checkpoint,
    a Hugging Face model directory, whose tokenizer_config.json names its eos and pad tokens)."""
    if os.path.isdir(path):
        from pathlib import Path

        from pretrain.hf.tokenizer import read_tokenizer

        return read_tokenizer(Path(path))
    with open(path, encoding="utf-8") as f:
        return hf_from_json(f.read(), path)


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
