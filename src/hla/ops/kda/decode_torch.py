"""KDA decode in PyTorch: a few tokens per sequence against a state pool, updated in place.

Written for CUDA-graph capture: no ``.item()``, no Python branch on tensor values, fixed shapes;
the only loop is over the (static) number of new tokens T.
"""

from __future__ import annotations

import torch


def kda_decode_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    *,
    scale: float,
    state_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Recurrent KDA steps; inputs are assumed validated (see :func:`hla.ops.kda.kda_decode`).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, HV, V]``; g: ``[B, T, HV, K]`` log-decay; beta: ``[B, T, HV]``.
        state: ``[P, HV, K, V]`` float32 (or float64) pool; rows ``state_indices`` are read and
            written back in place.
        scale: query scale. state_indices: ``[B]`` int, default ``arange(B)``.

    Returns:
        ``o: [B, T, HV, V]`` in ``v.dtype``.
    """
    B, T, H, K = q.shape
    HV = v.shape[2]
    if T == 0:
        return v.new_zeros(B, 0, HV, v.shape[3])
    G = HV // H
    acc = state.dtype
    if state_indices is None:
        idx = torch.arange(B, device=state.device)
    else:
        idx = state_indices.long()
    S = state.index_select(0, idx).to(acc)  # [B, HV, K, V]
    qh = q.to(acc) * scale
    kh = k.to(acc)
    if G > 1:
        qh, kh = qh.repeat_interleave(G, dim=2), kh.repeat_interleave(G, dim=2)
    decay = g.to(acc).exp()
    vf, bf = v.to(acc), beta.to(acc)
    outs = []
    for t in range(T):
        S = S * decay[:, t, :, :, None]
        k_t = kh[:, t]  # [B, HV, K]
        kv = (k_t.unsqueeze(-2) @ S).squeeze(-2)  # S^T k: [B, HV, V]
        S = S + k_t.unsqueeze(-1) * (bf[:, t, :, None] * (vf[:, t] - kv)).unsqueeze(-2)
        outs.append((qh[:, t].unsqueeze(-2) @ S).squeeze(-2))
    state.index_copy_(0, idx, S.to(state.dtype))
    return torch.stack(outs, 1).to(v.dtype)
