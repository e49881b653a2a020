"""The loss suite: every head's mean cross-entropy on a prepared split, in nats per token and bits per byte.

Head k's loss is the training loss of head k (`MTPModel.forward`, the same
fused per-head schedule) on the split's windows: predicting token t+k from
the prefix up to t, averaged over every window of one epoch of the split
(each token is an input exactly once) or the first `max_windows` of the
loader's seeded order. Bits per byte divide by ln 2 and by the corpus's
bytes per token, so models with different tokenizers compare.
"""

import time

import torch

from pretrain.evaluation.text import bits_per_byte, open_split


def evaluate_loss(model, tokenizer, data_dir: str, split: str, seq_len: int, batch_size: int,
                  max_windows: int | None = None) -> dict:
    """{"nats_per_token": {k: loss}, "bits_per_byte": {k: ...}, windows, tokens, ...} on `split`."""
    n = model.cfg.n_future
    loader, info = open_split(data_dir, split, tokenizer, seq_len, n, batch_size)
    windows = min(info.windows_per_epoch, max_windows or info.windows_per_epoch)
    device = next(model.parameters()).device
    total = torch.zeros(n, dtype=torch.float64)
    seen, start = 0, time.perf_counter()
    model.eval()
    with torch.no_grad():
        for batch in loader:
            take = min(len(batch["input_ids"]), windows - seen)
            ids = batch["input_ids"][:take].to(device)  # [b, s]
            labels = batch["labels"][:take].to(device)  # [b, n, s]
            _, head_losses = model(ids, labels)  # [n] means over the batch's tokens
            total += head_losses.double().cpu() * take
            seen += take
            if seen >= windows:
                break
    nats = {k + 1: float(v) for k, v in enumerate(total / seen)}
    return {
        "data": data_dir, "split": split, "seq_len": seq_len, "windows": seen, "tokens_per_head": seen * seq_len,
        "split_windows": info.windows_per_epoch, "bytes_per_token": round(info.bytes_per_token, 6),
        "nats_per_token": nats,
        "bits_per_byte": {k: bits_per_byte(v, info.bytes_per_token) for k, v in nats.items()},
        "seconds": round(time.perf_counter() - start, 2),
    }
