"""`model.init_from=hf:DIR`: a fresh run starts from a local Hugging Face Llama checkpoint.

`pretrained_state(cfg.model, tokenizer)` is the logical state of the
checkpoint, `{MTPModel parameter name: whole fp32 tensor}` with the
vocabulary rows of the tokenizer (no padding, no tensor-parallel split):
the same form as the seeded initialisation's logical tensors, so the model
pads and shards it exactly as it does those (`pretrain.model.init`:
`MTPModel(..., pretrained=state)`; the trainer passes it for a fresh run
only). It is a lazy mapping: a tensor is read from the memory-mapped
safetensors files when it is asked for, so a rank reads only what it holds,
one tensor at a time. Trunk + head 1 come from the Llama's layers, heads
2..n from its last layer (`model.init_extra_heads=last_layer`) or keep the
seeded draw (`random`); see docs/model.md.
"""

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

from pretrain.errors import UserError
from pretrain.hf.shape import LlamaShape, hf_dir, llama_shape

INDEX_FILE = "model.safetensors.index.json"
NOT_WEIGHTS = ("extra_heads.safetensors",)  # our export's heads 2..n: not part of the Llama


class LogicalState(Mapping):
    """{MTPModel name: whole fp32 tensor}, each built when read."""

    def __init__(self, plan: dict[str, Callable[[], torch.Tensor]]):
        self._plan = plan

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._plan[name]()

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the tensor to find out
        return name in self._plan

    def __iter__(self) -> Iterator[str]:
        return iter(self._plan)

    def __len__(self) -> int:
        return len(self._plan)


class SafetensorsReader:
    """The tensors of a Hugging Face checkpoint in any number of safetensors shards, memory-mapped."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        self.directory = directory
        self._files = {}
        self.where: dict[str, str] = {}
        for name in self._shard_files():
            try:
                handle = safe_open(str(directory / name), framework="pt")
            except Exception as err:  # noqa: BLE001 -- safetensors raises its own error types for damaged headers
                raise UserError(f"{directory / name} is not a readable safetensors file ({err}); re-download it") from None
            self._files[name] = handle
            self.where.update({key: name for key in handle.keys()})

    def _shard_files(self) -> list[str]:
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError) as err:
                raise UserError(f"{index} is not a valid safetensors index ({err}); re-download it") from None
            missing = [f for f in files if not (self.directory / f).is_file()]
            if missing:
                raise UserError(f"{index} names {missing[0]}, which is missing; the download is incomplete")
            return files
        files = sorted(p.name for p in self.directory.glob("*.safetensors") if p.name not in NOT_WEIGHTS)
        if not files:
            legacy = sorted(p.name for p in self.directory.glob("*.bin"))
            hint = (f" (it has {legacy[0]}: re-save it with save_pretrained(DIR, safe_serialization=True))"
                    if legacy else "")
            raise UserError(f"{self.directory} holds no *.safetensors weights{hint}")
        return files

    def shape(self, name: str) -> tuple[int, ...] | None:
        if name not in self.where:
            return None
        return tuple(self._files[self.where[name]].get_slice(name).get_shape())

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise UserError(f"{self.directory} has no tensor {name}; it is not a complete Llama checkpoint")
        return self._files[self.where[name]].get_tensor(name)


def expected_shapes(shape: LlamaShape, tied: bool) -> dict[str, tuple[int, ...]]:
    """Every Llama tensor the import reads, with the shape its config.json promises."""
    d, hn = shape.hidden_size, shape.hidden_size // shape.heads
    layer = {
        "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (shape.heads * hn, d), "self_attn.k_proj.weight": (shape.kv_heads * hn, d),
        "self_attn.v_proj.weight": (shape.kv_heads * hn, d), "self_attn.o_proj.weight": (d, shape.heads * hn),
        "mlp.gate_proj.weight": (shape.ffn, d), "mlp.up_proj.weight": (shape.ffn, d),
        "mlp.down_proj.weight": (d, shape.ffn),
    }
    out = {"model.embed_tokens.weight": (shape.vocab_rows, d), "model.norm.weight": (d,)}
    if not tied:
        out["lm_head.weight"] = (shape.vocab_rows, d)
    for i in range(shape.layers):
        out.update({f"model.layers.{i}.{k}": v for k, v in layer.items()})
    return out


def pretrained_state(model_cfg, tokenizer) -> LogicalState:
    """The logical state of `model_cfg.init_from` for a model whose data uses `tokenizer`.

    Refuses, with one line each: a directory that is not a Llama, a shape
    other than the model's, a tokenizer whose ids differ from the data's,
    and tensors missing from or misshapen in the safetensors files.
    """
    from pretrain.hf.mapping import from_hf
    from pretrain.hf.tokenizer import read_tokenizer, vocabulary_problem

    directory = hf_dir(model_cfg.init_from)
    shape = llama_shape(directory)
    _check_model_shape(model_cfg, shape, directory)
    problem = vocabulary_problem(tokenizer, read_tokenizer(directory))
    if problem:
        raise UserError(f"the data's tokenizer does not match {directory}'s ({problem}); tokenize the corpus with "
                        f"`mtp prepare --tokenizer {directory} --out NEW_DIR` and set data.dir=NEW_DIR")
    if model_cfg.vocab_size != tokenizer.vocab_size:
        raise UserError(f"model.vocab_size={model_cfg.vocab_size} but the data's tokenizer has "
                        f"{tokenizer.vocab_size} ids; leave model.vocab_size null with model.init_from")
    if tokenizer.vocab_size > shape.vocab_rows:
        raise UserError(f"{directory}: its tokenizer has {tokenizer.vocab_size} ids but its embedding only "
                        f"{shape.vocab_rows} rows; the checkpoint and its tokenizer do not belong together")
    reader = SafetensorsReader(directory)
    for name, want in expected_shapes(shape, shape.tied).items():
        have = reader.shape(name)
        if have != want:
            what = "is missing" if have is None else f"has shape {list(have)}"
            raise UserError(f"{directory}: tensor {name} {what}, its config.json implies {list(want)}; "
                            "the checkpoint is incomplete or not a Llama")
    plan = from_hf(reader, model_cfg, tokenizer.vocab_size, model_cfg.init_extra_heads, untie=shape.tied)
    return LogicalState(plan)


def _check_model_shape(model_cfg, shape: LlamaShape, directory: Path) -> None:
    """The model must be the Llama's shape (set by `apply_llama_shape` when the run config loaded)."""
    wanted = {"d_model": shape.hidden_size, "n_heads": shape.heads, "kv_heads": shape.kv_heads,
              "ffn_size": shape.ffn, "trunk_layers": shape.layers - 1, "norm_eps": shape.norm_eps,
              "rope_theta": shape.rope_theta}
    for key, want in wanted.items():
        have = getattr(model_cfg, key)
        if have != want:
            raise UserError(f"model.{key}={have} but {directory}/config.json needs {want}; remove the model shape "
                            "overrides (with model.init_from the shape comes from the checkpoint)")
    if model_cfg.head_type == "linear":
        raise UserError("model.head_type=linear cannot start from a Llama; use transformer or sequential heads")
