"""Stage 2 of the chunked forward: everything inside one chunk that does not need the state.

Per chunk (BT = 64 tokens) and value head, with Gamma the in-chunk cumulative log-decay:

    A_kk[i, j] = beta_i sum_d k_id k_jd exp(Gamma_id - Gamma_jd)   (j < i)
    A_qk[i, j] = scale sum_d q_id k_jd exp(Gamma_id - Gamma_jd)    (j <= i)
    M = (I + A_kk)^-1,  w = M (beta k exp(Gamma)),  u = M (beta v)

Exponent safety with the unbounded Kimi gate (FLA #1240 is what goes wrong otherwise): no factor
``exp(-Gamma)`` is ever formed. The chunk is cut into 16-row blocks. For row block I and columns
j before it, the anchor is the block's first row a: ``exp(Gamma_i - Gamma_a) <= 1`` on the query
side and ``exp(Gamma_a - Gamma_j) <= 1`` on the key side, so one tensor-core product covers all
earlier columns and nothing overflows. Inside the diagonal block ``exp(Gamma_i - Gamma_j)`` is
taken per (i, j) pair (j <= i, so <= 1). Only tokens j <= i enter row i: causality is exact.

M comes from the product form ``(I + N)^-1 = (I - N)(I + N^2)(I + N^4)...(I + N^32)`` (N strictly
lower triangular, so N^64 = 0): ten 64x64 products on the tensor cores instead of a 64-step
row-by-row substitution.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hla.ops.kda.triton.common import INTERPRET, next_pow2


@triton.jit
def kda_intra_fwd_kernel(
    q, k, v, gcum, beta, Akk, Aqk, w, u, chunk_bounds,
    scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BKD: tl.constexpr,
    LOG2_BT: tl.constexpr, USE_L2: tl.constexpr, DOT_PREC: tl.constexpr,
):
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    i_h = i_hv // (HV // H)
    bos = tl.load(chunk_bounds + 2 * i_c).to(tl.int64)
    eos = tl.load(chunk_bounds + 2 * i_c + 1).to(tl.int64)

    o_i = tl.arange(0, BT)
    o_t = bos + o_i
    m_t = o_t < eos
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]

    # Column side of the off-diagonal products: the whole chunk's keys and cumulative gates.
    b_k = tl.load(k + (o_t[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
    if USE_L2:
        b_k = b_k / tl.sqrt(tl.sum(b_k * b_k, axis=1) + 1e-6)[:, None]
    b_G = tl.load(gcum + (o_t[:, None] * HV + i_hv) * K + o_k[None, :], mask=m_tk, other=0.0)  # [BT, BK]

    o_c = tl.arange(0, BC)
    for i_b in tl.static_range(BT // BC):
        o_r = bos + i_b * BC + o_c
        m_r = o_r < eos
        m_rk = m_r[:, None] & m_k[None, :]
        p_r = (o_r[:, None] * H + i_h) * K + o_k[None, :]
        b_qr = tl.load(q + p_r, mask=m_rk, other=0.0).to(tl.float32)
        b_kr = tl.load(k + p_r, mask=m_rk, other=0.0).to(tl.float32)
        if USE_L2:
            f_q = 1.0 / tl.sqrt(tl.sum(b_qr * b_qr, axis=1) + 1e-6)
            f_k = 1.0 / tl.sqrt(tl.sum(b_kr * b_kr, axis=1) + 1e-6)
        else:
            f_q = tl.full([BC], 1.0, tl.float32)
            f_k = tl.full([BC], 1.0, tl.float32)
        b_qr = b_qr * (f_q * scale)[:, None]
        b_kr = b_kr * f_k[:, None]
        b_Gr = tl.load(gcum + (o_r[:, None] * HV + i_hv) * K + o_k[None, :], mask=m_rk, other=0.0)
        b_beta = tl.load(beta + o_r * HV + i_hv, mask=m_r, other=0.0)

        # Diagonal block, pair by pair.
        b_dqk = tl.zeros([BC, BC], dtype=tl.float32)
        b_dkk = tl.zeros([BC, BC], dtype=tl.float32)
        m_pair = (o_c[:, None] >= o_c[None, :]) & m_r[:, None] & m_r[None, :]
        for i_kb in tl.static_range(BK // BKD):
            o_kd = i_kb * BKD + tl.arange(0, BKD)
            m_kd = m_r[:, None] & (o_kd < K)[None, :]
            p_d = (o_r[:, None] * H + i_h) * K + o_kd[None, :]
            b_qd = tl.load(q + p_d, mask=m_kd, other=0.0).to(tl.float32) * (f_q * scale)[:, None]
            b_kd = tl.load(k + p_d, mask=m_kd, other=0.0).to(tl.float32) * f_k[:, None]
            b_Gd = tl.load(gcum + (o_r[:, None] * HV + i_hv) * K + o_kd[None, :], mask=m_kd, other=0.0)
            b_e = tl.exp(tl.where(m_pair[:, :, None], b_Gd[:, None, :] - b_Gd[None, :, :], float("-inf")))
            b_kde = b_kd[None, :, :] * b_e  # [BC(i), BC(j), BKD]
            b_dqk += tl.sum(b_qd[:, None, :] * b_kde, axis=2)
            b_dkk += tl.sum(b_kd[:, None, :] * b_kde, axis=2)
        b_dkk = tl.where(o_c[:, None] > o_c[None, :], b_dkk * b_beta[:, None], 0.0)

        # Earlier columns, anchored at this block's first row a.
        a = bos + i_b * BC
        b_Ga = tl.load(gcum + (a * HV + i_hv) * K + o_k, mask=m_k & (a < eos), other=0.0)  # [BK]
        # An empty block (a >= eos) has no anchor: mask every column rather than exponentiate garbage.
        m_col = (o_i < i_b * BC) & m_t & (a < eos)
        b_kf = b_k * tl.exp(tl.where(m_col[:, None], b_Ga[None, :] - b_G, float("-inf")))  # [BT, BK]
        b_ef = tl.exp(tl.where(m_r[:, None], b_Gr - b_Ga[None, :], 0.0))  # [BC, BK], <= 1 on valid rows
        b_oqk = tl.dot(b_qr * b_ef, tl.trans(b_kf), input_precision=DOT_PREC)  # [BC, BT]
        b_okk = tl.dot(b_kr * b_ef, tl.trans(b_kf), input_precision=DOT_PREC) * b_beta[:, None]

        m_off = m_r[:, None] & ((o_i < i_b * BC) | (o_i >= i_b * BC + BC))[None, :]
        p_A = (o_r[:, None] * HV + i_hv) * BT + o_i[None, :]
        tl.store(Aqk + p_A, b_oqk, mask=m_off)
        tl.store(Akk + p_A, b_okk, mask=m_off)
        p_Ad = (o_r[:, None] * HV + i_hv) * BT + i_b * BC + o_c[None, :]
        tl.store(Aqk + p_Ad, b_dqk, mask=m_r[:, None])
        tl.store(Akk + p_Ad, b_dkk, mask=m_r[:, None])

    # The row blocks above were written by other threads of this program.
    tl.debug_barrier()
    m_tt = m_t[:, None] & m_t[None, :]
    b_N = tl.load(Akk + (o_t[:, None] * HV + i_hv) * BT + o_i[None, :], mask=m_tt, other=0.0)
    b_M = tl.where(o_i[:, None] == o_i[None, :], 1.0, 0.0) - b_N
    b_P = b_N
    for _ in tl.static_range(LOG2_BT - 1):
        b_P = tl.dot(b_P, b_P, input_precision=DOT_PREC)
        b_M = b_M + tl.dot(b_M, b_P, input_precision=DOT_PREC)

    b_beta_t = tl.load(beta + o_t * HV + i_hv, mask=m_t, other=0.0)
    b_x = b_k * tl.exp(b_G) * b_beta_t[:, None]
    b_w = tl.dot(b_M, b_x, input_precision=DOT_PREC)
    tl.store(w + (o_t[:, None] * HV + i_hv) * K + o_k[None, :], b_w.to(w.dtype.element_ty), mask=m_tk)

    o_v = tl.arange(0, BV)
    m_tv = m_t[:, None] & (o_v < V)[None, :]
    b_v = tl.load(v + (o_t[:, None] * HV + i_hv) * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
    b_u = tl.dot(b_M, b_v * b_beta_t[:, None], input_precision=DOT_PREC)
    tl.store(u + (o_t[:, None] * HV + i_hv) * V + o_v[None, :], b_u.to(u.dtype.element_ty), mask=m_tv)


def kda_intra_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gcum: torch.Tensor,
    beta: torch.Tensor,
    chunk_bounds: torch.Tensor,
    *,
    scale: float,
    use_qk_l2norm: bool,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k ``[TT, H, K]``, v ``[TT, HV, V]``, gcum ``[TT, HV, K]`` fp32, beta ``[TT, HV]`` fp32
    -> (A_qk ``[TT, HV, BT]`` fp32, w ``[TT, HV, K]``, u ``[TT, HV, V]``), w and u in v.dtype."""
    TT, H, K = q.shape
    HV, V = v.shape[-2], v.shape[-1]
    BT = chunk_size
    Akk = torch.empty(TT, HV, BT, device=q.device, dtype=torch.float32)
    Aqk = torch.empty(TT, HV, BT, device=q.device, dtype=torch.float32)
    w = torch.empty(TT, HV, K, device=q.device, dtype=v.dtype)
    u = torch.empty(TT, HV, V, device=q.device, dtype=v.dtype)
    NC = chunk_bounds.shape[0]
    BK = next_pow2(K)
    kda_intra_fwd_kernel[(NC, HV)](
        q, k, v, gcum, beta, Akk, Aqk, w, u, chunk_bounds, float(scale),
        H=H, HV=HV, K=K, V=V, BK=BK, BV=next_pow2(V), BT=BT, BC=16, BKD=min(32, BK),
        LOG2_BT=BT.bit_length() - 1, USE_L2=use_qk_l2norm,
        DOT_PREC="ieee" if INTERPRET else "tf32x3",
        num_warps=8,
    )
    return Aqk, w, u
