"""Where every rank sits: tensor x data x pipeline coordinates, stage partitions, checks.

Two libraries build process groups and both must agree on the rank layout:
megatron-core's `parallel_state` (its tensor-parallel layers find their group
there) and DeepSpeed's `PipeModelDataParallelTopology` (the pipeline engine's
p2p, data-parallel and gradient-norm groups). Both order ranks tensor-fastest,
then data, then pipeline:

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

`describe_groups` reports both sides so a test (and `check_groups_agree`, run
at engine build) can hold them to it.

The functions above the torch imports are torch-free so `mtp plan` and config
validation stay fast.
"""

from dataclasses import dataclass

from pretrain.errors import UserError
from pretrain.model.config import ModelConfig


@dataclass(frozen=True)
class Place:
    """This process's coordinates. `feeds_data`: only the first and last pipeline stages read batches."""

    rank: int
    world_size: int
    local_rank: int
    dp_rank: int
    dp_size: int
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def feeds_data(self) -> bool:
        return self.is_first_stage or self.is_last_stage


def place_of(rank: int, world_size: int, local_rank: int, tp: int, pp: int) -> Place:
    """Coordinates of `rank` in the tensor-fastest, then data, then pipeline order."""
    dp = world_size // (tp * pp)
    return Place(rank, world_size, local_rank, dp_rank=(rank // tp) % dp, dp_size=dp,
                 tp_rank=rank % tp, tp_size=tp, pp_rank=rank // (tp * dp), pp_size=pp)


def layout_record(cfg, place: Place) -> dict:
    """What decides how a checkpoint's files are cut; equal records load with DeepSpeed's own loader."""
    p = cfg.parallel
    return {"tp": p.tp, "pp": p.pp, "dp": place.dp_size, "zero_stage": p.zero_stage, "dtype": p.dtype,
            "layers_per_stage": p.layers_per_stage}


# ---- pipeline partition -----------------------------------------------------------

def pipeline_weights(model: ModelConfig) -> list[int]:
    """Weight of each pipeline layer: [embedding, trunk layer 1..L, heads + unembedding + loss].

    A trunk layer weighs 1 and the head block n_future, one per head (each
    head is one transformer layer), so an n=4 model's last stage counts as
    four layers. The embedding lookup and the unembedding weigh nothing here:
    they are memory, not layers of compute; `mtp plan` accounts for both.
    """
    return [0] + [1] * model.trunk_layers + [model.n_future]


def stage_parts(model: ModelConfig, pp: int, layers_per_stage: list[int] | None = None) -> list[int]:
    """Boundaries (pp + 1 indices into the pipeline layers) of every stage.

    `layers_per_stage` gives the trunk layers of each stage by hand; the
    embedding always opens stage 0 and the head block always closes the last
    stage. Otherwise the split minimises the heaviest stage, ties broken
    towards equal stages.
    """
    n_layers = model.trunk_layers + 2
    if layers_per_stage is not None:
        check_layers_per_stage(model, pp, layers_per_stage)
        bounds = [0]
        for i, count in enumerate(layers_per_stage):
            bounds.append(bounds[-1] + count + (1 if i == 0 else 0))
        bounds[-1] = n_layers
        return bounds
    if pp > n_layers:
        raise UserError(f"parallel.pp={pp} exceeds the {n_layers} pipeline layers (embedding, "
                        f"{model.trunk_layers} trunk layers, head block); use parallel.pp <= {n_layers}")
    return _balanced(pipeline_weights(model), pp)


def check_layers_per_stage(model: ModelConfig, pp: int, layers_per_stage: list[int]) -> None:
    """A hand split must cover every trunk layer once; only the first and last stages may hold none."""
    if len(layers_per_stage) != pp or sum(layers_per_stage) != model.trunk_layers or min(layers_per_stage) < 0:
        raise UserError(
            f"parallel.layers_per_stage={layers_per_stage} must list parallel.pp={pp} non-negative trunk-layer "
            f"counts summing to the model's {model.trunk_layers} trunk layers"
        )
    if 0 in layers_per_stage[1:-1]:
        raise UserError(f"parallel.layers_per_stage={layers_per_stage} leaves a middle stage empty; "
                        "give every middle stage at least one trunk layer")


def _balanced(weights: list[int], parts: int) -> list[int]:
    """Contiguous split of `weights` into `parts` non-empty runs minimising (max run, sum of squares)."""
    n = len(weights)
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = (float("inf"), float("inf"))
    best = [[inf] * (parts + 1) for _ in range(n + 1)]  # best[i][j]: first i layers in j runs
    cut = [[0] * (parts + 1) for _ in range(n + 1)]
    best[0][0] = (0, 0)
    for i in range(1, n + 1):
        for j in range(1, min(i, parts) + 1):
            for k in range(j - 1, i):
                run = prefix[i] - prefix[k]
                prev = best[k][j - 1]
                cand = (max(prev[0], run), prev[1] + run * run)
                if cand < best[i][j]:
                    best[i][j], cut[i][j] = cand, k
    bounds = [n]
    for j in range(parts, 0, -1):
        bounds.append(cut[bounds[-1]][j])
    return bounds[::-1]


# ---- checks a run config must pass before any process group exists ---------------------

def check_parallel(cfg, layers_per_stage: list[int] | None = None) -> None:
    """Layout checks that need the model beyond `pretrain.config.validate`; raise UserError."""
    p, m = cfg.parallel, cfg.model
    if p.pp > 1 and m.head_type == "sequential":
        raise UserError(
            "model.head_type=sequential embeds tokens in its heads with the trunk's embedding, which lives on "
            "pipeline stage 0; use parallel.pp=1 or model.head_type=transformer/linear"
        )
    if p.pp > 1:
        stage_parts(m, p.pp, layers_per_stage)


# ---- process groups (torch and DeepSpeed from here on) ----------------------------------

def deepspeed_topology(tp: int, pp: int, dp: int):
    """DeepSpeed's topology with axes pipe, data, model: model (tensor) fastest, as megatron's tp-dp-pp."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    return PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)


def deepspeed_grid(tp: int, pp: int, dp: int):
    """DeepSpeed's process grid, the `mpu` its engine uses for data-parallel and gradient-norm groups.

    A pipeline module builds its own from the same topology; a pp=1 engine
    gets this one, so gradients are averaged over data-parallel peers only,
    never over tensor-parallel peers that hold other shards.
    """
    from deepspeed.runtime.pipe.topology import PipelineParallelGrid

    return PipelineParallelGrid(topology=deepspeed_topology(tp, pp, dp))


def describe_groups(grid) -> dict:
    """Coordinates and group members of this rank as megatron and DeepSpeed see them."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    topo = grid.topology()
    coord = topo.get_coord(dist.get_rank())
    return {
        "megatron": {
            "tp": ps.get_tensor_model_parallel_rank(),
            "dp": ps.get_data_parallel_rank(),
            "pp": ps.get_pipeline_model_parallel_rank(),
            "tp_group": dist.get_process_group_ranks(ps.get_tensor_model_parallel_group()),
            "dp_group": dist.get_process_group_ranks(ps.get_data_parallel_group()),
            "pp_group": dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group()),
        },
        "deepspeed": {
            "tp": coord.model,
            "dp": coord.data,
            "pp": coord.pipe,
            "tp_group": sorted(topo.filter_match(pipe=coord.pipe, data=coord.data)),
            "dp_group": list(grid.get_data_parallel_group_ranks()),
            "pp_group": list(grid.pp_group),
        },
    }


def check_groups_agree(grid) -> None:
    """Fail loudly if megatron's and DeepSpeed's groups differ: every later collective would be wrong."""
    groups = describe_groups(grid)
    if groups["megatron"] != groups["deepspeed"]:
        raise RuntimeError(f"megatron and DeepSpeed disagree on the rank layout: {groups}")
