"""`mtp export`: one self-contained file from a training checkpoint.

The file is a safetensors archive of the consolidated single-process weights;
its metadata carries the model config and the tokenizer's files, so
generation and evaluation need nothing else and can never pair weights with
the wrong tokenizer.
"""

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from pretrain import checkpoint as ckpt
from pretrain.errors import UserError
from pretrain.model.config import ModelConfig

FORMAT = "mtp-export-1"


def resolve_checkpoint(path: str) -> Path:
    """A step dir as given, or the newest complete one under a checkpoints dir or a run dir."""
    root = Path(path)
    if not root.exists():
        raise UserError(f"checkpoint {path} does not exist; pass a run dir, its checkpoints/ dir or one step_* dir")
    if (root / ckpt.MANIFEST).is_file() or (root / ckpt.COMPLETE).is_file():
        problems = ckpt.verify(root)
        if problems:
            raise UserError(f"checkpoint {path} is unusable: {'; '.join(problems)}; pass an older step_* dir")
        return root
    for candidate in (root, root / "checkpoints"):
        found = ckpt.CheckpointStore(str(candidate), keep=1).latest() if candidate.is_dir() else None
        if found:
            return Path(found[0])
    raise UserError(f"no complete checkpoint under {path}; train first (mtp train) or pass a step_* dir")


def consolidated_state_dict(step_dir: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a single-process model, whatever layout and ZeRO stage wrote them."""
    from parallel.reshard import full_model_state

    return full_model_state(str(step_dir), cfg.padded_vocab(1))


def export(checkpoint: str, out: str) -> Path:
    """Write `out`; refuses to overwrite an existing file."""
    from safetensors.torch import save_file

    target = Path(out)
    if target.exists():
        raise UserError(f"{out} already exists; choose another --out or delete it first")
    step_dir = resolve_checkpoint(checkpoint)
    extra = json.loads((step_dir / ckpt.EXTRA).read_text())
    cfg = ModelConfig(**extra["model"])
    state = {k: v.contiguous() for k, v in consolidated_state_dict(step_dir, cfg).items()}
    metadata = {
        "format": FORMAT,
        "model_config": json.dumps(asdict(cfg)),
        "tokenizer_files": json.dumps(_read_dir(step_dir / "tokenizer")),
        "step": str(extra["step"]),
        "tokens": str(extra["tokens"]),
        "train_seq_len": _train_seq_len(step_dir),
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    save_file(state, str(tmp), metadata=metadata)
    os.replace(tmp, target)
    return step_dir


def load_exported(path: str, device: str = "cpu"):
    """(model, tokenizer, ModelConfig) from an exported file, ready for eval or generation."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from data_pipeline.tokenizer import load_tokenizer

    if not os.path.isfile(path):
        raise UserError(f"model file {path} not found; create one with `mtp export --checkpoint RUN_DIR --out {path}`")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as err:  # noqa: BLE001 -- safetensors raises its own error types for damaged headers
        raise UserError(f"{path} is not a readable safetensors file ({err}); export it again") from None
    if metadata.get("format") != FORMAT:
        raise UserError(f"{path} was not written by `mtp export` (no {FORMAT} metadata); export it again")
    cfg = ModelConfig(**json.loads(metadata["model_config"]))
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in json.loads(metadata["tokenizer_files"]).items():
            Path(tmp, name).write_text(text)
        tokenizer = load_tokenizer(tmp)
    model = model_with_weights(cfg, load_file(path), source=path)
    return model.to(device).eval(), tokenizer, cfg


def model_with_weights(cfg: ModelConfig, state: dict[str, torch.Tensor], source: str):
    """A single-process MTPModel holding `state`; UserError naming `source` when they do not fit."""
    from parallel.megatron_setup import init_model_parallel
    from pretrain.model.mtp import MTPModel

    init_model_parallel(tp=1, pp=1)
    model = MTPModel(cfg, seed=None)  # every weight comes from `state`
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("._extra_state")]  # megatron's, always None
    if missing or unexpected:
        raise UserError(
            f"{source} does not match its own model config (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "export it again or pass another checkpoint"
        )
    return model


def _train_seq_len(step_dir: Path) -> str:
    """The sequence length the model trained at (evaluation's default window), "" when unknown."""
    import yaml

    config = step_dir / "config.yaml"
    if not config.is_file():
        return ""
    return str((yaml.safe_load(config.read_text()) or {}).get("train", {}).get("seq_len", ""))


def _read_dir(directory: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(directory.iterdir()) if p.is_file()}


def run(args) -> int:
    if args.format == "hf":
        from pretrain.hf.export import export_hf

        step_dir = export_hf(args.checkpoint, args.out, args.dtype, args.overwrite)
        print(f"exported {step_dir} -> {args.out} (Hugging Face Llama + MTP heads, {args.dtype})")
        return 0
    if args.dtype != "float32" or args.overwrite:
        raise UserError("--dtype and --overwrite apply to --format hf; the mtp format is float32 and never overwrites")
    step_dir = export(args.checkpoint, args.out)
    print(f"exported {step_dir} -> {args.out}")
    return 0

