"""Run tracking as the trainer sees it: a tracker per rank, and the per-head loss plot.

Rank 0 with tracking on gets MLflow (`pretrain.tracking_mlflow`, through a
`pretrain.tracking_background.BackgroundTracker`); every other rank, and a
run with tracking off, gets a `NullTracker`. MLflow is imported only in the
first case: its import costs each process a second or two, and a GPU node
without MLflow installed still trains with `tracking.enabled=false`.
"""

import json
import os
from pathlib import Path

from pretrain.config import RunConfig
from pretrain.errors import UserError


class NullTracker:
    """What ranks other than 0, and runs with tracking disabled, log into."""

    run_id: str | None = None
    uri: str | None = None

    def log_params(self, params: dict) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str) -> None:
        pass

    def close(self, status: str = "FINISHED") -> str | None:
        return None


def make_tracker(cfg: RunConfig, rank: int, run_id: str | None = None, resume_step: int | None = None):
    """Rank 0 with tracking enabled: a `BackgroundTracker` of the run (`run_id` resumes it); else a NullTracker."""
    if rank != 0 or not cfg.tracking.enabled:
        return NullTracker()
    try:
        from pretrain.tracking_mlflow import Tracker
    except ImportError as err:
        raise UserError(f"tracking.enabled=true but MLflow does not import here ({first_line(err)}); install it "
                        "(make setup, or make gpu-wheels for a machine without network) or set "
                        "tracking.enabled=false") from None
    from pretrain.tracking_background import BackgroundTracker

    tracker = Tracker(resolve_tracking_uri(cfg), cfg.tracking.experiment, cfg.run_name, run_id)
    return BackgroundTracker(tracker, Path(cfg.run.dir), resume_step, cfg.tracking.close_timeout_s)


def resolve_tracking_uri(cfg: RunConfig) -> str:
    """tracking.uri, else env MLFLOW_TRACKING_URI, else a SQLite store inside the run dir."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    run_dir = Path(cfg.run.dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{run_dir / 'mlflow.db'}"


def first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def plot_head_curves(metrics_jsonl: str, out_png: str) -> None:
    """Plot every head's training loss against the step from a metrics.jsonl file."""
    from matplotlib.figure import Figure

    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    heads = sorted({k for row in rows for k in row if k.startswith("loss_head")}, key=lambda k: int(k[9:]))
    if not heads:
        raise UserError(f"{metrics_jsonl} holds no per-head losses (loss_head1, ...) to plot")
    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    for key in heads:
        points = [(row["step"], row[key]) for row in rows if key in row]
        ax.plot([p[0] for p in points], [p[1] for p in points], label=f"head {key[9:]} (t+{key[9:]})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("loss of every MTP head")
    ax.grid(alpha=0.3)
    ax.legend()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100, bbox_inches="tight")
