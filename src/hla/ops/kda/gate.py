"""The KDA forget gate and the q/k normalisation, in fp32.

Kimi Linear's gate (spec section 2): ``g = -exp(A_log[h]) * softplus(raw + dt_bias)``, a
per-channel log-decay, ``g <= 0``. FLA's bounded "safe" variant maps to
``lower_bound * sigmoid(exp(A_log[h]) * (raw + dt_bias))``, which keeps ``g`` in
``[lower_bound, 0]`` so chunk-local exponentials cannot overflow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def softplus(x: torch.Tensor) -> torch.Tensor:
    """``log(1 + exp(x))`` without overflow for large ``x`` and exact for very negative ``x``."""
    return F.softplus(x, beta=1.0, threshold=20.0)


def kda_gate(
    raw: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor | None = None,
    lower_bound: float | None = None,
) -> torch.Tensor:
    """Per-channel log-decay from the raw gate projection.

    Args:
        raw: ``[..., HV, K]`` output of ``f_b(f_a(x))``, any float dtype.
        A_log: ``[HV]`` (or any shape with HV elements, e.g. the checkpoint's ``[1, 1, HV, 1]``).
        dt_bias: ``[HV * K]`` or ``[HV, K]``, or None.
        lower_bound: None for Kimi-Linear's unbounded softplus gate; a negative float for the
            bounded sigmoid gate.

    Returns:
        ``g``: ``[..., HV, K]`` float32 (float64 if ``raw`` is float64), ``g <= 0``.
    """
    HV, K = raw.shape[-2], raw.shape[-1]
    dtype = torch.float64 if raw.dtype == torch.float64 else torch.float32
    x = raw.to(dtype)
    if dt_bias is not None:
        if dt_bias.numel() != HV * K:
            raise ValueError(f"dt_bias: expected {HV * K} elements (HV*K), got shape {tuple(dt_bias.shape)}")
        x = x + dt_bias.reshape(HV, K).to(dtype)
    if A_log.numel() != HV:
        raise ValueError(f"A_log: expected {HV} elements (one per value head), got shape {tuple(A_log.shape)}")
    a = A_log.reshape(HV, 1).to(dtype).exp()
    if lower_bound is None:
        return -a * softplus(x)
    if lower_bound >= 0:
        raise ValueError(f"lower_bound: expected a negative float, got {lower_bound}")
    return lower_bound * torch.sigmoid(a * x)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dim, computed in fp32, returned in ``x.dtype``.

    The eps sits inside the square root, as in FLA and the Kimi reference code.
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(dtype)
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)
