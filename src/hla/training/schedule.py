"""Learning-rate schedules as plain functions of the step (no optimizer state to save or restore).

Both return a multiplier in [0, 1] for the peak learning rate at optimizer step ``step`` (0-based):
the trainer sets ``lr = peak_lr * multiplier`` before every step, so resuming only needs the step.
"""

from __future__ import annotations

import math


def _check(step: int, total_steps: int, warmup_steps: int) -> None:
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.1) -> float:
    """Linear warmup from 1/warmup to 1 over ``warmup_steps``, then cosine down to ``min_ratio`` at the last step."""
    _check(step, total_steps, warmup_steps)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 1:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (decay_steps - 1))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def wsd(step: int, total_steps: int, warmup_steps: int, decay_frac: float = 0.2, min_ratio: float = 0.0) -> float:
    """Warmup-Stable-Decay: linear warmup, a flat plateau, then a linear decay over the last ``decay_frac``.

    WSD is what the Kimi models were pre-trained with; its plateau lets a run be extended without restarting the
    cosine, and the final decay recovers most of the gap to a tuned cosine.
    """
    _check(step, total_steps, warmup_steps)
    if not 0.0 <= decay_frac <= 1.0:
        raise ValueError(f"decay_frac must be in [0, 1], got {decay_frac}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = int(round(decay_frac * (total_steps - warmup_steps)))
    decay_start = total_steps - decay_steps
    if step < decay_start or decay_steps == 0:
        return 1.0
    progress = (step - decay_start + 1) / decay_steps
    return 1.0 - (1.0 - min_ratio) * progress


def constant(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warmup, then the peak learning rate."""
    _check(step, total_steps, warmup_steps)
    return (step + 1) / warmup_steps if step < warmup_steps else 1.0


SCHEDULES = {"cosine": warmup_cosine, "wsd": wsd, "constant": constant}


def lr_multiplier(name: str, step: int, total_steps: int, warmup_steps: int, **kwargs: float) -> float:
    """Dispatch by schedule name ("cosine", "wsd", "constant")."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {name!r}")
    return SCHEDULES[name](step, total_steps, warmup_steps, **kwargs)
