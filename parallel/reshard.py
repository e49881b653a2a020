"""Checkpoints across layouts: read any (tp, pp, dp, ZeRO) checkpoint as whole tensors, load into any other.

DeepSpeed writes a checkpoint as its ranks hold it: tensor-parallel shards
(`mp_rank_XX`), pipeline layers (`layer_NN-model_XX`), ZeRO partitions of
flat optimizer buffers (`zero_pp_rank_D_mp_rank_XX_optim_states.pt`). Its
own loader only reads a checkpoint back into the layout that wrote it. So
next to DeepSpeed's files every checkpoint gets a small description of what
each (pipeline stage, tensor rank) held (`layout/ppNN_tpNN.json`: the
MTPModel name, local shape and tensor-parallel split of every parameter),
and from that this module rebuilds, per parameter, the whole fp32 weight
and its Adam moments:

    DeepSpeed files --(SavedCheckpoint.full)--> whole tensors --(load_resharded)--> this rank's slices

Resuming under another layout reads, on every rank, only the parameters
that rank holds (files are memory-mapped), cuts its tensor-parallel slice,
re-pads the vocabulary rows for the new tensor-parallel size, and writes
weights, fp32 master weights, Adam moments, step counters and the learning
rate schedule into the freshly built engine. `full_model_state` gives export
the consolidated weights of any layout.

Supported sources and targets: ZeRO stages 0, 1 and 2 (and DeepSpeed's
bf16 optimizer, which uses the ZeRO file format). ZeRO-3 checkpoints resume
only under the layout that wrote them.
"""

import json
from pathlib import Path

import torch

from parallel.pipeline import named_global_parameters
from pretrain.checkpoint import ENGINE_TAG
from pretrain.ckpt_writer import PendingFile
from pretrain.errors import UserError
from pretrain.model.sharding import VOCAB_PARAMS, local_slice, pad_rows, unshard

LAYOUT_DIR = "layout"
MOMENTS = ("exp_avg", "exp_avg_sq")


def layout_file(step_dir: str, engine, place) -> PendingFile | None:
    """This rank's shard description, to be written with its engine files (one writer per stage and
    tensor rank: data-parallel rank 0; None on the others)."""
    if place.dp_rank != 0:
        return None
    opt_index = _optimizer_indices(engine)
    params = []
    for local, name, p in named_global_parameters(engine.module):
        params.append({
            "name": name, "local": local, "shape": list(getattr(p, "ds_shape", p.shape)),  # ZeRO-3 holds a slice
            "split": bool(getattr(p, "tensor_model_parallel", False)),
            "dim": int(getattr(p, "partition_dim", 0)), "stride": int(getattr(p, "partition_stride", 1)),
            "opt_index": opt_index.get(id(p)),
        })
    record = {"pp": place.pp_rank, "tp": place.tp_rank, "mp_rank": engine.checkpoint_mp_rank, "params": params}
    path = Path(step_dir) / LAYOUT_DIR / f"pp{place.pp_rank:02d}_tp{place.tp_rank:02d}.json"
    return PendingFile(str(path), data=json.dumps(record).encode())


def _optimizer_indices(engine) -> dict[int, int]:
    """Position of each parameter in a plain torch optimizer's state_dict (ZeRO stores no such thing)."""
    if engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled():
        return {}
    flat = [p for group in engine.optimizer.param_groups for p in group["params"]]
    return {id(p): i for i, p in enumerate(flat)}


class SavedCheckpoint:
    """Whole fp32 tensors of one checkpoint, read lazily from DeepSpeed's files (memory-mapped)."""

    def __init__(self, step_dir: str):
        self.root = Path(step_dir)
        extra = json.loads((self.root / "extra.json").read_text())
        self.layout = extra.get("layout") or {"tp": 1, "pp": 1, "dp": 1, "zero_stage": 0, "dtype": "float32"}
        self.vocab_size = extra["model"]["vocab_size"]
        if self.layout["zero_stage"] == 3:
            raise UserError(f"{step_dir} is a ZeRO-3 checkpoint, which resumes only under its own layout "
                            f"(parallel.tp/pp/dp/zero_stage = {self._saved_layout()}); resume with those settings")
        self._files: dict[str, dict] = {}
        self.shards = self._read_shards()
        self.by_name: dict[str, list[tuple[dict, dict]]] = {}
        for shard in sorted(self.shards, key=lambda s: s["tp"]):
            for rec in shard["params"]:
                self.by_name.setdefault(rec["name"], []).append((shard, rec))

    def _saved_layout(self) -> str:
        return "/".join(str(self.layout[k]) for k in ("tp", "pp", "dp", "zero_stage"))

    def _read_shards(self) -> list[dict]:
        files = sorted((self.root / LAYOUT_DIR).glob("pp*_tp*.json"))
        if files:
            return [json.loads(f.read_text()) for f in files]
        if (self.layout["tp"], self.layout["pp"]) != (1, 1):
            raise UserError(f"{self.root} has no {LAYOUT_DIR}/ description of its shards; resume it with the "
                            f"layout that wrote it (parallel.tp/pp/dp/zero_stage = {self._saved_layout()})")
        return [self._single_shard()]

    def _single_shard(self) -> dict:
        """tp=pp=1 checkpoints written before layouts were recorded: the module holds every name."""
        module = self._file("mp_rank_00_model_states.pt")["module"]
        names = [k for k, v in module.items() if torch.is_tensor(v)]
        return {"pp": 0, "tp": 0, "mp_rank": 0, "params": [
            {"name": n, "local": n, "shape": list(module[n].shape), "split": False, "dim": 0, "stride": 1,
             "opt_index": None} for n in names]}

    def _file(self, name: str) -> dict:
        """A DeepSpeed file, memory-mapped once: only the bytes of tensors actually sliced are read."""
        if name not in self._files:
            path = self.root / ENGINE_TAG / name
            if not path.is_file():
                raise UserError(f"checkpoint file {path} is missing; the checkpoint is incomplete, resume from another")
            self._files[name] = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        return self._files[name]

    def names(self) -> list[str]:
        return list(self.by_name)

    def full(self, name: str) -> dict[str, torch.Tensor]:
        """{'param', 'exp_avg', 'exp_avg_sq'} of MTPModel parameter `name`, whole, vocabulary rows unpadded."""
        pieces = [self._local(shard, rec) for shard, rec in self.by_name[name]]
        rec = self.by_name[name][0][1]
        out = {}
        for kind in pieces[0]:
            parts = [piece[kind] for piece in pieces]
            whole = unshard(parts, rec["dim"], rec["stride"]) if rec["split"] and len(parts) > 1 else parts[0]
            out[kind] = (whole[: self.vocab_size] if name in VOCAB_PARAMS else whole).detach()
        return out

    def _local(self, shard: dict, rec: dict) -> dict[str, torch.Tensor]:
        if self.layout["zero_stage"] == 0 and self.layout["dtype"] == "float32":
            return self._plain(shard, rec)
        return self._zero(shard, rec)

    def _plain(self, shard: dict, rec: dict) -> dict[str, torch.Tensor]:
        """ZeRO stage 0: weights in the module (or layer) files, Adam moments in the torch optimizer's state."""
        engine_file = self._file(f"mp_rank_{shard['mp_rank']:02d}_model_states.pt")
        if self.layout["pp"] == 1:
            param = engine_file["module"][rec["local"]]
        else:
            layer, _, key = rec["local"].partition(".")
            param = self._file(f"layer_{int(layer):02d}-model_{shard['tp']:02d}-model_states.pt")[key]
        out = {"param": param.float()}
        if rec["opt_index"] is not None:
            state = engine_file["optimizer"]["state"][rec["opt_index"]]
            out.update({k: state[k].float() for k in MOMENTS})
        return out

    def _zero(self, shard: dict, rec: dict) -> dict[str, torch.Tensor]:
        """ZeRO 1/2 (and bf16): each data-parallel rank holds consecutive fragments of flat fp32 buffers."""
        prefix = "bf16_" if self.layout["dtype"] == "bfloat16" else ""
        fragments = {"param": [], "exp_avg": [], "exp_avg_sq": []}
        for d in range(self.layout["dp"]):
            osd = self._file(f"{prefix}zero_pp_rank_{d}_mp_rank_{shard['mp_rank']:02d}_optim_states.pt")
            osd = osd["optimizer_state_dict"]
            for group, mapping in enumerate(osd["param_slice_mappings"]):
                address = mapping.get(rec["local"])
                if address is None:
                    continue
                state = osd["base_optimizer_state"]["state"][group]
                sources = {"param": osd["single_partition_of_fp32_groups"][group], **{k: state[k] for k in MOMENTS}}
                for kind, flat in sources.items():
                    fragments[kind].append(flat.narrow(0, address.start, address.numel))
        return {kind: torch.cat(parts).float().view(rec["shape"]) for kind, parts in fragments.items()}

    def counters(self) -> dict:
        """Optimizer step, engine step counters and the learning-rate schedule's state."""
        engine_file = self._file("mp_rank_00_model_states.pt")
        if self.layout["zero_stage"] == 0 and self.layout["dtype"] == "float32":
            step = next(iter(engine_file["optimizer"]["state"].values()))["step"]
        else:
            prefix = "bf16_" if self.layout["dtype"] == "bfloat16" else ""
            osd = self._file(f"{prefix}zero_pp_rank_0_mp_rank_00_optim_states.pt")["optimizer_state_dict"]
            step = osd["base_optimizer_state"]["state"][0]["step"]
        keys = ("lr_scheduler", "global_steps", "global_samples", "skipped_steps")
        return {"step": float(step), **{k: engine_file[k] for k in keys}}


def full_model_state(step_dir: str, padded_vocab: int) -> dict[str, torch.Tensor]:
    """Consolidated fp32 weights of any layout's checkpoint, vocabulary rows padded to `padded_vocab`."""
    extra = json.loads((Path(step_dir) / "extra.json").read_text())
    if (extra.get("layout") or {}).get("zero_stage") == 3:
        whole = zero3_model_state(step_dir)
    else:
        saved = SavedCheckpoint(step_dir)
        whole = {name: saved.full(name)["param"] for name in saved.names()}
    return {name: pad_rows(w, padded_vocab) if name in VOCAB_PARAMS else w.contiguous() for name, w in whole.items()}


def zero3_model_state(step_dir: str) -> dict[str, torch.Tensor]:
    """Whole fp32 weights of a ZeRO-3 checkpoint (pp=1): DeepSpeed's consolidation per tensor rank, shards joined.

    DeepSpeed's `zero_to_fp32` reads tensor rank 0's files (`mp_rank_00`)
    only, so each tensor rank's files are linked under that name in a
    folder of their own; the layout records say how the shards join.
    """
    import tempfile

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    step = Path(step_dir)
    vocab = json.loads((step / "extra.json").read_text())["model"]["vocab_size"]
    records = [json.loads(f.read_text()) for f in sorted((step / LAYOUT_DIR).glob("pp00_tp*.json"))]
    if not records:
        raise UserError(f"{step} has no {LAYOUT_DIR}/ description of its shards; the checkpoint is incomplete")
    shards = []
    with tempfile.TemporaryDirectory(prefix="mtp-zero3-") as links:
        for rec in records:
            rank = f"mp_rank_{rec['mp_rank']:02d}"
            folder = Path(links) / f"tp{rec['tp']}" / ENGINE_TAG
            folder.mkdir(parents=True)
            for file in (step / ENGINE_TAG).glob(f"*_{rank}_*.pt"):
                (folder / file.name.replace(rank, "mp_rank_00")).symlink_to(file.resolve())
            shards.append(get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=ENGINE_TAG))
    out = {}
    for p in records[0]["params"]:
        parts = [shard[p["local"]] for shard in shards]
        whole = unshard(parts, p["dim"], p["stride"]) if p["split"] and len(parts) > 1 else parts[0]
        out[p["name"]] = (whole[:vocab] if p["name"] in VOCAB_PARAMS else whole).detach()
    return out


def load_resharded(step_dir: str, engine, place) -> None:
    """Load a checkpoint written under another layout into `engine` (this rank's slices only).

    Every rank must call it: nothing here communicates, but DeepSpeed's
    optimizers are left linked to the new optimizer state on each rank.
    """
    saved = SavedCheckpoint(step_dir)
    counters = saved.counters()
    optimizer = engine.optimizer
    zero_like = engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled()
    if engine.zero_optimization_stage() == 3:
        raise UserError(f"{step_dir} was saved as {saved._saved_layout()} (parallel.tp/pp/dp/zero_stage); "
                        "ZeRO-3 resumes only its own checkpoints under the same layout: resume with those "
                        "settings, or start parallel.zero_stage=3 in a new run.dir")
    base = optimizer.optimizer if zero_like else optimizer
    _create_adam_state(base, counters["step"])
    if zero_like:
        optimizer._lazy_init_hp_params_optimizer_state()  # point each weight's fragments at the new state
    for _local, name, param in named_global_parameters(engine.module):
        if name not in saved.by_name:
            raise UserError(f"{step_dir} has no weights for {name}; it is of another model, use a new run.dir")
        values = {k: _slice_for(name, v, param) for k, v in saved.full(name).items()}
        _assign(param, values, base if not zero_like else None)
    engine.lr_scheduler.load_state_dict(counters["lr_scheduler"])
    for group, lr in zip(base.param_groups, engine.lr_scheduler.get_last_lr()):
        group["lr"] = lr
    engine.global_steps = counters["global_steps"]
    engine.global_samples = counters["global_samples"]
    engine.skipped_steps = counters["skipped_steps"]


def _create_adam_state(base: torch.optim.Optimizer, step: float) -> None:
    """Adam state for every tensor the optimizer steps (flat ZeRO partitions or the weights), zeros for now."""
    for group in base.param_groups:
        for tensor in group["params"]:
            base.state[tensor] = {
                "step": torch.tensor(step, dtype=torch.float32),
                "exp_avg": torch.zeros_like(tensor, dtype=torch.float32),
                "exp_avg_sq": torch.zeros_like(tensor, dtype=torch.float32),
            }


def _slice_for(name: str, whole: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    """`whole` (logical) padded and cut to this rank's slice of `param`; refuses tensors of another model."""
    local = local_slice(name, whole, param)
    if tuple(local.shape) != tuple(param.shape):
        raise UserError(f"checkpoint tensor {name} has shape {tuple(local.shape)} here, the model wants "
                        f"{tuple(param.shape)}; it is of another model, use a new run.dir")
    return local


def _assign(param: torch.nn.Parameter, values: dict[str, torch.Tensor], plain_optimizer) -> None:
    """Weight, and fp32 master + moments: in the optimizer's state (stage 0) or its ZeRO fragments."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    with torch.no_grad():
        param.copy_(values["param"].to(param.dtype))
    if plain_optimizer is not None:
        state = plain_optimizer.state[param]
        for key in MOMENTS:
            state[key] = values[key].to(device=param.device, dtype=state[key].dtype).clone()
        return
    safe_set_full_fp32_param(param, values["param"].to(param.device))
    for key in MOMENTS:
        safe_set_full_optimizer_state(param, values[key].to(param.device), key)
