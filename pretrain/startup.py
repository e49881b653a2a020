"""Everything `mtp train` checks before it imports torch, MLflow or matplotlib.

A bad value must cost a second, not the 20-40 s those imports take, and must
end in one line naming the key and the fix: so the config, the paths, the
tracking URI, the prepared data's tokenizer, the fault spec and the CLI
arguments are all checked here, torch-free, before `pretrain.train` is
imported (`pretrain.commands._train`).
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from pretrain.config import RunConfig, check_data_dir, load_config, validate
from pretrain.errors import UserError

# MLflow's tracking URI schemes (a plain path is a local file store).
TRACKING_SCHEMES = ("", "file", "sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")


def prepare(args) -> RunConfig:
    """The checked config of `mtp train ARGS`, with `model.vocab_size` filled in from the tokenizer."""
    if args.stop_after is not None and args.stop_after < 1:
        raise UserError(f"--stop-after must be >= 1, got {args.stop_after}")
    cfg = load_config(args.config, args.overrides)
    validate(cfg, world_size())
    check_writable_dir(cfg.run.dir, "run.dir")
    if cfg.checkpoint.dir:
        check_writable_dir(cfg.checkpoint.dir, "checkpoint.dir")
    check_tracking_uri(cfg)
    check_data_dir(cfg)
    check_fault_spec()
    from data_pipeline.feed import tokenizer_location

    data_dir = tokenizer_location(cfg.data)
    vocab = tokenizer_vocab(data_dir)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = vocab
    elif cfg.model.vocab_size < vocab:
        raise UserError(f"model.vocab_size={cfg.model.vocab_size} is below the {vocab} tokens of the tokenizer in "
                        f"{data_dir}; set model.vocab_size >= {vocab}, or null to take it from the data")
    return cfg


def world_size() -> int:
    text = os.environ.get("WORLD_SIZE", "1")
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"WORLD_SIZE={text!r} must be a positive integer (torchrun and srun set it)")
    return int(text)


def check_writable_dir(path: str, key: str) -> None:
    """`path` is, or can become, a directory: not a file, not below one, creatable."""
    target = Path(path)
    for part in [target, *target.parents]:
        if part.exists() and not part.is_dir():
            where = "names" if part == target else f"is below {part}, which is"
            raise UserError(f"{key}={path} {where} a file, not a directory; choose another {key}")
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{key}={path} cannot be created: {err.strerror}; choose a writable {key}") from None
    if not os.access(target, os.W_OK | os.X_OK):
        raise UserError(f"{key}={path} is not writable by this user; choose a writable {key}")


def check_output_file(path: str, flag: str, replaceable: bool = False) -> None:
    """`path` can be written: it does not exist (or may be replaced) and no part of its directory is a file."""
    target = Path(path)
    if target.exists() and not replaceable:
        raise UserError(f"{path} already exists; choose another {flag} or delete it first")
    for part in target.parents:
        if part.exists() and not part.is_dir():
            raise UserError(f"{flag} {path} is below {part}, which is a file, not a directory; choose another {flag}")
        if part.exists():
            break
    if not target.parent.exists():
        try:
            target.parent.mkdir(parents=True)
        except OSError as err:
            raise UserError(f"{flag} {path}: its directory cannot be created ({err.strerror})") from None


def check_tracking_uri(cfg: RunConfig) -> None:
    """tracking.uri (or MLFLOW_TRACKING_URI) must be a scheme MLflow can log to."""
    if not cfg.tracking.enabled:
        return
    uri, origin = (cfg.tracking.uri, "tracking.uri") if cfg.tracking.uri else (
        os.environ.get("MLFLOW_TRACKING_URI"), "MLFLOW_TRACKING_URI")
    if not uri:
        return
    scheme = urlparse(uri).scheme
    if scheme not in TRACKING_SCHEMES:
        raise UserError(f"{origin}={uri} has an unknown scheme '{scheme}'; use http(s)://host:port, "
                        "sqlite:///path/mlflow.db, a directory, or tracking.enabled=false")
    if scheme in ("http", "https") and not urlparse(uri).hostname:
        raise UserError(f"{origin}={uri} names no host; use e.g. http://mlflow.example.org:5000")


def check_fault_spec() -> None:
    from pretrain.faults import parse_all

    spec = os.environ.get("MTP_FAULT")
    if not spec:
        return
    try:
        faults = parse_all(spec)
    except ValueError as err:
        raise UserError(f"{err}; unset MTP_FAULT for a normal run") from None
    if any(f.kind.startswith("gate") for f in faults) and not os.environ.get("MTP_FAULT_GATE"):
        raise UserError(f"MTP_FAULT={spec} has a gate but MTP_FAULT_GATE (the file that opens it) is not set")


def tokenizer_vocab(data_dir: str) -> int:
    """The vocabulary size of the prepared data's tokenizer; an unreadable tokenizer file is one line."""
    from data_pipeline.tokenizer import load_tokenizer

    try:
        return load_tokenizer(data_dir).vocab_size
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # JSON, UTF-8 and shape errors of the files
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"the tokenizer files in data.dir={data_dir} cannot be read ({type(err).__name__}: {detail}); "
                        f"prepare the data again with `mtp prepare --out {data_dir}`") from None
