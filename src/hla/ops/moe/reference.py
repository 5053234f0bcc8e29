"""The spec of the routed-expert part of a sparse MoE: a plain loop over tokens and their slots."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def moe_experts_reference(
    x: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weight: torch.Tensor,
) -> torch.Tensor:
    """``y[t] = sum_s topk_weight[t, s] * w2[e] @ (silu(w1[e] @ x[t]) * (w3[e] @ x[t]))``, ``e = topk_idx[t, s]``.

    ``x: [N, d]``, ``w1/w3: [E, I, d]`` (gate, up), ``w2: [E, d, I]`` (down), ``topk_idx: [N, k]``
    (integer), ``topk_weight: [N, k]``. Computes in ``x``'s dtype (pass float64 copies for a
    reference); returns ``[N, d]`` in that dtype. No speed options on purpose.
    """
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for s in range(topk_idx.shape[1]):
            e = int(topk_idx[t, s])
            h = F.silu(w1[e].to(x.dtype) @ x[t]) * (w3[e].to(x.dtype) @ x[t])
            out[t] += topk_weight[t, s].to(x.dtype) * (w2[e].to(x.dtype) @ h)
    return out
