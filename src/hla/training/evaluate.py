"""Evaluation: answer-token accuracy of the synthetic tasks by sequence length, and held-out perplexity."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from hla.data.tasks import IGNORE_INDEX, batch_at

EVAL_SEED = 1_000_003  # a stream the training seeds (small integers) never use
DEFAULT_LENGTHS = (256, 512, 1024, 2048)


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


@torch.no_grad()
def task_accuracy(model: torch.nn.Module, task, seq_len: int, *, num_examples: int = 256, batch_size: int = 32,
                  seed: int = EVAL_SEED) -> float:
    """Fraction of scored answer tokens predicted exactly (greedy argmax, teacher-forced), over ``num_examples``
    fresh sequences of length ``seq_len``."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = total = 0
    for i in range(math.ceil(num_examples / batch_size)):
        bs = min(batch_size, num_examples - i * batch_size)
        x, y = batch_at(task, i, bs, seq_len, seed + seq_len)
        x, y = x.to(device), y.to(device)
        with _autocast(device):
            logits = model(x).logits
        pred = logits[:, :-1].argmax(-1)
        target = y[:, 1:]
        mask = target != IGNORE_INDEX
        correct += int((pred[mask] == target[mask]).sum())
        total += int(mask.sum())
    model.train(was_training)
    return correct / max(total, 1)


def accuracy_by_length(model: torch.nn.Module, task, lengths=DEFAULT_LENGTHS, *, num_examples: int = 256,
                       batch_size: int = 32, seed: int = EVAL_SEED) -> dict[int, float]:
    """:func:`task_accuracy` at each length (default 256, 512, 1024, 2048, as in the Kimi Linear report)."""
    return {int(L): task_accuracy(model, task, int(L), num_examples=num_examples, batch_size=batch_size, seed=seed)
            for L in lengths}


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokens: torch.Tensor, seq_len: int, *, batch_size: int = 8,
               max_windows: int | None = None) -> float:
    """exp(mean next-token loss) over non-overlapping windows of ``tokens`` ([N] int64) of length ``seq_len``."""
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    n_win = (tokens.numel() - 1) // seq_len
    if max_windows is not None:
        n_win = min(n_win, max_windows)
    if n_win <= 0:
        raise ValueError(f"need more than seq_len={seq_len} tokens, got {tokens.numel()}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # window w covers tokens[w*L : w*L + L + 1]: L inputs and their L next tokens
    windows = tokens[: n_win * seq_len + 1]
    loss_sum, count = 0.0, 0
    for b in range(0, n_win, batch_size):
        idx = torch.arange(b, min(b + batch_size, n_win))
        pos = idx[:, None] * seq_len + torch.arange(seq_len + 1)[None, :]
        chunk = windows[pos].to(device)
        with _autocast(device):
            logits = model(chunk[:, :-1]).logits
        loss_sum += float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                                          reduction="sum"))
        count += chunk[:, 1:].numel()
    model.train(was_training)
    return math.exp(loss_sum / count)
