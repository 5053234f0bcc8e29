"""KDA as the specification writes it: one token at a time.

This loop is the ground truth every fast path is compared against. It has no options for
speed; run it in float64 for tests. Per value head, with state ``S: [K, V]``::

    S   <- Diag(exp(g_t)) S
    S   <- S + beta_t * k_t (v_t - S^T k_t)^T
    o_t  = S^T (scale * q_t)

Value head ``j`` reads query/key head ``j // (HV // H)`` (grouped value attention).
"""

from __future__ import annotations

import torch


def kda_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token KDA recurrence.

    Args:
        q, k: ``[B, T, H, K]``; already l2-normalised if the caller wants that.
        v: ``[B, T, HV, V]`` with ``HV`` a multiple of ``H``.
        g: ``[B, T, HV, K]`` log-decay (``<= 0`` for a forgetting state).
        beta: ``[B, T, HV]`` write strength.
        scale: query scale, default ``K ** -0.5``.
        initial_state: ``[N, HV, K, V]``; ``N = B``, or the number of sequences with ``cu_seqlens``.
        output_final_state: return the final state as well.
        cu_seqlens: ``[N + 1]`` int boundaries of packed sequences (then ``B == 1``).

    Returns:
        ``o: [B, T, HV, V]`` in ``v.dtype`` and the final state ``[N, HV, K, V]`` (float32, or
        float64 when the inputs are float64) or None.
    """
    B, T, H, K = q.shape
    HV, V = v.shape[-2], v.shape[-1]
    G = HV // H
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = K**-0.5 if scale is None else scale

    if cu_seqlens is None:
        bounds = [(b, 0, T) for b in range(B)]
    else:
        cu = cu_seqlens.tolist()
        bounds = [(0, cu[n], cu[n + 1]) for n in range(len(cu) - 1)]

    qh = q.to(acc).repeat_interleave(G, dim=2)
    kh = k.to(acc).repeat_interleave(G, dim=2)
    vf, gf, bf = v.to(acc), g.to(acc), beta.to(acc)

    o = torch.zeros(B, T, HV, V, dtype=acc, device=q.device)
    finals = []
    for n, (b, start, end) in enumerate(bounds):
        if initial_state is None:
            S = torch.zeros(HV, K, V, dtype=acc, device=q.device)
        else:
            S = initial_state[n].to(acc)
        for t in range(start, end):
            S = S * gf[b, t].exp()[..., None]
            k_t = kh[b, t]
            kv = torch.einsum("hkv,hk->hv", S, k_t)
            S = S + bf[b, t][:, None, None] * k_t[..., None] * (vf[b, t] - kv)[:, None, :]
            o[b, t] = torch.einsum("hkv,hk->hv", S, qh[b, t] * scale)
        finals.append(S)
    final = torch.stack(finals) if output_final_state else None
    return o.to(v.dtype), final
