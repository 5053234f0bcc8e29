"""Stage 1 of the chunked forward: the fused gate and its in-chunk cumulative sum.

Per chunk of BT tokens and value head: ``Gamma[i] = sum_{j <= i} g[j]`` (per channel, fp32), and
``beta`` (through the sigmoid when asked) in fp32. Every later stage reads ``Gamma`` and ``beta``
from here, so the gate is computed once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hla.ops.kda.triton.common import kda_gate_f32, next_pow2


@triton.jit
def kda_gate_cumsum_fwd_kernel(
    g, beta, A_log, dt_bias, gcum, beta_out, chunk_bounds,
    lower_bound,
    HV: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr,
    HAS_GATE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LB: tl.constexpr, USE_SIGMOID: tl.constexpr,
):
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    bos = tl.load(chunk_bounds + 2 * i_c).to(tl.int64)
    eos = tl.load(chunk_bounds + 2 * i_c + 1).to(tl.int64)
    o_t = bos + tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m_t, m_k = o_t < eos, o_k < K
    m = m_t[:, None] & m_k[None, :]
    p_g = (o_t[:, None] * HV + i_hv) * K + o_k[None, :]
    b_g = tl.load(g + p_g, mask=m, other=0.0).to(tl.float32)  # [BT, BK]
    if HAS_GATE:
        b_a = tl.exp(tl.load(A_log + i_hv).to(tl.float32))
        if HAS_BIAS:
            b_bias = tl.load(dt_bias + i_hv * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        else:
            b_bias = tl.zeros([BK], dtype=tl.float32)
        b_g = kda_gate_f32(b_g, b_a, b_bias[None, :], lower_bound, HAS_BIAS, HAS_LB)
        b_g = tl.where(m, b_g, 0.0)
    b_gc = tl.cumsum(b_g, axis=0)
    tl.store(gcum + p_g, b_gc, mask=m)

    b_beta = tl.load(beta + o_t * HV + i_hv, mask=m_t, other=0.0).to(tl.float32)
    if USE_SIGMOID:
        b_beta = tl.sigmoid(b_beta)
    tl.store(beta_out + o_t * HV + i_hv, b_beta, mask=m_t)


def kda_gate_cumsum_fwd(
    g: torch.Tensor,
    beta: torch.Tensor,
    chunk_bounds: torch.Tensor,
    *,
    A_log: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    lower_bound: float | None,
    use_beta_sigmoid: bool,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """g: ``[TT, HV, K]`` (flattened tokens), beta ``[TT, HV]`` -> (Gamma fp32 ``[TT, HV, K]``, beta fp32 ``[TT, HV]``)."""
    TT, HV, K = g.shape
    gcum = torch.empty(TT, HV, K, device=g.device, dtype=torch.float32)
    beta_out = torch.empty(TT, HV, device=g.device, dtype=torch.float32)
    NC = chunk_bounds.shape[0]
    has_gate = A_log is not None
    kda_gate_cumsum_fwd_kernel[(NC, HV)](
        g, beta, A_log if has_gate else g, dt_bias if dt_bias is not None else g, gcum, beta_out, chunk_bounds,
        float(lower_bound) if lower_bound is not None else 0.0,
        HV=HV, K=K, BK=next_pow2(K), BT=chunk_size,
        HAS_GATE=has_gate, HAS_BIAS=has_gate and dt_bias is not None, HAS_LB=has_gate and lower_bound is not None,
        USE_SIGMOID=use_beta_sigmoid,
        num_warps=4,
    )
    return gcum, beta_out
