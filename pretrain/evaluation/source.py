"""What `mtp eval --model` points at: an exported file or a run's checkpoint, and what follows from it.

From a run directory (or its checkpoints/ or one step_* directory) the
newest complete checkpoint is evaluated, consolidated as `mtp export`
does; its saved config gives the training sequence length and data
directory, and its record gives the MLflow run and step the metrics go
to. An exported file carries its step and training sequence length in its
metadata; its metrics go to a new MLflow run.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.errors import UserError


@dataclass
class ModelSource:
    path: str
    step: int | None
    train_seq_len: int | None
    data_dir: str | None  # the run's data.dir, for the loss suite
    default_out: Path
    identity: dict  # what a resumed evaluation must find unchanged
    mlflow_run_id: str | None = None  # the training run's, when evaluating a checkpoint
    tracking_uri: str | None = None
    tracking_enabled: bool = True
    extra: dict = field(default_factory=dict)


def resolve_source(path: str) -> ModelSource:
    target = Path(path)
    if not target.exists():
        raise UserError(f"--model {path} does not exist; pass a file written by `mtp export` or a run directory")
    return _checkpoint(path) if target.is_dir() else _file(path)


def _file(path: str) -> ModelSource:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # noqa: BLE001 -- safetensors raises its own error types for damaged headers
        raise UserError(f"{path} is not a readable safetensors file ({err}); export it again") from None
    step = int(meta["step"]) if meta.get("step", "").isdigit() else None
    seq_len = int(meta["train_seq_len"]) if meta.get("train_seq_len", "").isdigit() else None
    real = Path(path).resolve()
    identity = {"file": str(real), "bytes": real.stat().st_size, "step": step}
    return ModelSource(path, step, seq_len, None, real.parent / "eval" / real.stem, identity)


def _checkpoint(path: str) -> ModelSource:
    from pretrain import checkpoint as ckpt
    from pretrain.config import load_config
    from pretrain.export import resolve_checkpoint

    step_dir = resolve_checkpoint(path).resolve()
    extra = json.loads((step_dir / ckpt.EXTRA).read_text())
    cfg = load_config(str(step_dir / "config.yaml"), []) if (step_dir / "config.yaml").is_file() else None
    run_dir = step_dir.parent.parent
    source = ModelSource(
        path=str(step_dir), step=int(extra["step"]), train_seq_len=cfg.train.seq_len if cfg else None,
        data_dir=cfg.data.dir if cfg else None, default_out=run_dir / "eval" / step_dir.name,
        identity={"checkpoint": str(step_dir), "step": int(extra["step"])},
        mlflow_run_id=extra.get("mlflow_run_id"),
    )
    if cfg is not None:
        source.tracking_enabled = cfg.tracking.enabled
        source.tracking_uri = _training_store(cfg, run_dir)
    return source


def _training_store(cfg, run_dir: Path) -> str:
    """Where the training run logged: tracking.uri, else MLFLOW_TRACKING_URI, else the run dir's SQLite store."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{run_dir / 'mlflow.db'}"
