"""Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty.

Everything here stays on the logits' device and never reads a value back to the host, so a
decode loop can run ahead of the GPU. Random draws use the exponential race
(``argmax(p / E)`` with ``E ~ Exp(1)`` picks index ``i`` with probability ``p_i``), which needs
no host sync, unlike ``torch.multinomial``'s input checks; a seeded ``torch.Generator`` makes it
reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens; validated on construction.

    temperature: 0 means greedy (argmax); otherwise logits are divided by it before sampling.
    top_k: keep the ``top_k`` most likely tokens (``None``: all).
    top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p``
        (nucleus sampling; ``None`` or 1.0: all).
    repetition_penalty: CTRL-style (Keskar et al. 2019, arXiv 1909.05858): a token already in the
        prompt or the output has its logit divided by the penalty when positive and multiplied
        by it when negative. 1.0 switches it off.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t == t or t < 0 or t == float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {k!r}")
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0):
            raise ValueError(f"top_p must be None or a number in (0, 1], got {p!r}")
        r = self.repetition_penalty
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not r == r or r <= 0 or r == float("inf"):
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1.0 = off), got {r!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator on ``device`` seeded with ``seed``; ``None`` (global RNG) when ``seed`` is None."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be None or an int, got {seed!r}")
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(seed)
    return g


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalise tokens marked in ``seen``.

    logits: ``[B, vocab]`` float; seen: ``[B, vocab]`` bool. Returns a new tensor.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def mask_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf. logits: ``[B, vocab]``.

    Ties with the k-th value are kept, so a row may keep more than k tokens.
    """
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def mask_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest prefix of tokens (most likely first) whose probability reaches ``p``.

    logits: ``[B, vocab]``. The most likely token is always kept.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.float().softmax(dim=-1)
    # Probability mass strictly before each token: a token is kept while that mass is below p.
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    *,
    generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick one token per row.

    Args:
        logits: ``[B, vocab]`` any float dtype (computed in fp32).
        params: sampling settings.
        generator: a generator on ``logits.device`` for reproducible draws.
        seen: ``[B, vocab]`` bool, tokens already in each row (needed when the penalty is not 1).

    Returns:
        ``[B]`` long token ids, on ``logits.device``.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, vocab], got shape {tuple(logits.shape)}")
    x = logits.float()
    if params.repetition_penalty != 1.0:
        if seen is None or seen.shape != x.shape or seen.dtype != torch.bool:
            got = None if seen is None else (tuple(seen.shape), seen.dtype)
            raise ValueError(f"repetition_penalty needs seen: bool {tuple(x.shape)}, got {got}")
        x = apply_repetition_penalty(x, seen, params.repetition_penalty)
    if params.greedy:
        return x.argmax(dim=-1)
    x = x / params.temperature
    if params.top_k is not None:
        x = mask_top_k(x, params.top_k)
    if params.top_p is not None:
        x = mask_top_p(x, params.top_p)
    probs = x.softmax(dim=-1)
    # A zero draw would turn a masked token's 0/0 into NaN; clamping keeps the race well defined.
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(1e-20)
    return (probs / race).argmax(dim=-1)
