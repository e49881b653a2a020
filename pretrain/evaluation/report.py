"""What an evaluation leaves behind: summary.json, summary.md, and metrics in MLflow.

MLflow: when the model is a training checkpoint whose run recorded an
MLflow run id, the metrics go into that run at the checkpoint's step (the
run's status is left alone: it may still be training); otherwise into a new
run of experiment `mtp-eval`. Metric names: `eval.loss.head{k}` (nats per
token), `eval.bits_per_byte.head{k}`, `eval.acceptance.head{k}` (draft k
kept), `eval.tokens_per_forward.k{K}` (expected), `eval.humaneval.pass_at_{k}`.
"""

import json
import logging
import os
from pathlib import Path

log = logging.getLogger("mtp.eval")


def metrics(results: dict) -> dict[str, float]:
    """Flat MLflow metrics of every suite that ran."""
    out: dict[str, float] = {}
    loss = results.get("loss")
    if loss:
        out.update({f"eval.loss.head{k}": v for k, v in loss["nats_per_token"].items()})
        out.update({f"eval.bits_per_byte.head{k}": v for k, v in loss["bits_per_byte"].items()})
    acceptance = results.get("acceptance")
    if acceptance:
        out.update({f"eval.acceptance.head{k}": v for k, v in acceptance["kept_rate"].items()})
        out.update({f"eval.tokens_per_forward.k{k}": v for k, v in acceptance["expected_tokens_per_forward"].items()})
    humaneval = results.get("humaneval")
    if humaneval:
        out.update({f"eval.humaneval.pass_at_{k[5:]}": v for k, v in humaneval.items() if k.startswith("pass@")})
        rate = humaneval["this_invocation"].get("problems_per_minute")
        if rate:
            out["eval.humaneval.problems_per_minute"] = rate
    return out


def markdown(results: dict) -> str:
    """The tables a person reads: per-head loss and acceptance, expected tokens per forward, pass@k."""
    lines = []
    loss, acceptance = results.get("loss"), results.get("acceptance")
    heads = sorted({1} | {int(k) for k in (loss or {}).get("nats_per_token", {})}
                   | {int(k) for k in (acceptance or {}).get("match_rate", {})})
    if loss or acceptance:
        lines += ["| head | loss (nats/token) | bits/byte | draft matches head 1 | draft kept |", "|---|---|---|---|---|"]
        for k in heads:
            row = [str(k), _get(loss, "nats_per_token", k, "{:.4f}"), _get(loss, "bits_per_byte", k, "{:.4f}"),
                   _get(acceptance, "match_rate", k, "{:.3f}"), _get(acceptance, "kept_rate", k, "{:.3f}")]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    if acceptance:
        lines += ["| heads used K | expected tokens/forward |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in sorted(acceptance["expected_tokens_per_forward"].items(),
                                                           key=lambda kv: int(kv[0]))]
        lines += ["", f"acceptance: {acceptance['positions']} prefixes of {acceptance['text']}", ""]
    if loss:
        lines += [f"loss: {loss['windows']} windows x {loss['seq_len']} tokens of the {loss['split']} split of "
                  f"{loss['data']} ({loss['bytes_per_token']:.3f} bytes/token)", ""]
    humaneval = results.get("humaneval")
    if humaneval:
        scores = ", ".join(f"{k} {100 * v:.2f}%" for k, v in humaneval.items() if k.startswith("pass@"))
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(humaneval["kinds"].items()))
        inv = humaneval["this_invocation"]
        lines += [f"humaneval: {humaneval['problems']} problems x {humaneval['samples_per_problem']} samples: {scores}",
                  f"outcomes: {kinds}",
                  f"this run: {inv['samples']} samples in {inv['seconds']} s ({inv['problems_per_minute']} problems/min, "
                  f"speculative heads {humaneval['speculative_heads']}, tokens/forward {inv['tokens_per_forward']})", ""]
    return "\n".join(lines)


def _get(part: dict | None, key: str, head: int, fmt: str) -> str:
    if not part:
        return "-"
    values = part.get(key, {})
    value = values.get(head, values.get(str(head)))
    return "-" if value is None else fmt.format(value)


def write(out_dir: Path, results: dict) -> None:
    """summary.json and summary.md, each replaced atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("summary.json", json.dumps(results, indent=1) + "\n"), ("summary.md", markdown(results))):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out_dir / name)


def log_mlflow(values: dict[str, float], source, uri: str | None, name: str) -> str | None:
    """Log into the training run at its step, or into a new run; returns the run id (None when nothing to log)."""
    if not values:
        return None
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    from pretrain.tracking_mlflow import Tracker, send_rows

    step = source.step or 0
    if source.mlflow_run_id and uri == source.tracking_uri:  # beside the training run's own metrics, at its step
        send_rows(MlflowClient(tracking_uri=uri), source.mlflow_run_id, [{"step": step, **values}])
        return source.mlflow_run_id
    tracker = Tracker(uri, "mtp-eval", name, None)
    tracker.log_params({"model": source.path, "step": step})
    tracker.send([{"step": step, **values}])
    tracker.terminate("FINISHED")
    return tracker.run_id
