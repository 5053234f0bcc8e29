"""Stage 1 of the chunked forward: everything inside one chunk that does not need the state.

Per chunk (BT = 64 tokens, four 16-row blocks) and value head, with Gamma the in-chunk cumulative
log-decay (gate fused here, computed once, never written to memory):

    A_kk[i, j] = beta_i sum_d k_id k_jd exp(Gamma_id - Gamma_jd)   (j < i)
    A_qk[i, j] = scale sum_d q_id k_jd exp(Gamma_id - Gamma_jd)    (j <= i)
    M = (I + A_kk)^-1,  w = M (beta k exp(Gamma)),  u = M (beta v)

plus what the recurrence needs without touching Gamma again: qg = scale q exp(Gamma),
kd = k exp(Gamma_last - Gamma) and dl = exp(Gamma_last).

Exponent safety with the unbounded Kimi gate (FLA #1240 is what goes wrong otherwise): no factor
``exp(-Gamma)`` is ever formed, every exponential taken has a non-positive argument. For blocks
I > J: ``exp(G_i - G_j) = exp(G_i - G_a) exp(G_a - G_b) exp(G_b - G_j)`` with a the first row of
I and b the last row of J (i >= a > b >= j), each factor <= 1; the outer factors scale whole
tiles, the middle one is a K-vector, and one tensor-core product gives the block. Inside a
diagonal block ``exp(G_i - G_j)`` is taken per pair, one column j at a time (j <= i). Only tokens
j <= i enter row i: causality is exact.

M is assembled from the four 16x16 diagonal inverses (product form
``(I + N)^-1 = (I - N)(I + N^2)(I + N^4)(I + N^8)``, N strictly lower so N^16 = 0, in fp32) and
the block recursion ``M_IJ = -D_I sum_{J <= L < I} A_IL M_LJ``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hla.ops.kda.triton.common import INTERPRET, kda_gate_f32, next_pow2


@triton.jit
def _load_block(q, k, g, beta, A_log, dt_bias, lower_bound, o_r, m_r, o_k, m_k, i_h, i_hv,
                H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, HAS_GATE: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_LB: tl.constexpr, USE_L2: tl.constexpr, USE_SIGMOID: tl.constexpr):
    """16 rows -> q, k (l2-normalised) [BC, BK], log-decay g [BC, BK] (0 on padding rows), beta [BC]; fp32."""
    m = m_r[:, None] & m_k[None, :]
    p_qk = (o_r[:, None] * H + i_h) * K + o_k[None, :]
    b_q = tl.load(q + p_qk, mask=m, other=0.0).to(tl.float32)
    b_k = tl.load(k + p_qk, mask=m, other=0.0).to(tl.float32)
    if USE_L2:
        b_q = b_q / tl.sqrt(tl.sum(b_q * b_q, axis=1) + 1e-6)[:, None]
        b_k = b_k / tl.sqrt(tl.sum(b_k * b_k, axis=1) + 1e-6)[:, None]
    b_g = tl.load(g + (o_r[:, None] * HV + i_hv) * K + o_k[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_GATE:
        b_a = tl.exp(tl.load(A_log + i_hv).to(tl.float32))
        if HAS_BIAS:
            b_bias = tl.load(dt_bias + i_hv * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        else:
            b_bias = tl.zeros_like(o_k).to(tl.float32)
        b_g = tl.where(m, kda_gate_f32(b_g, b_a, b_bias[None, :], lower_bound, HAS_BIAS, HAS_LB), 0.0)
    b_b = tl.load(beta + o_r * HV + i_hv, mask=m_r, other=0.0).to(tl.float32)
    if USE_SIGMOID:
        b_b = tl.where(m_r, tl.sigmoid(b_b), 0.0)
    return b_q, b_k, b_g, b_b


@triton.jit
def _first_row(x, o_c):
    return tl.sum(tl.where(o_c[:, None] == 0, x, 0.0), axis=0)


@triton.jit
def _diag_block(b_q, b_k, b_G, b_b, o_c, BC: tl.constexpr):
    """Diagonal 16x16 blocks of A_qk (j <= i) and A_kk (j < i, times beta_i), pair by pair."""
    b_aqk = tl.zeros([BC, BC], dtype=tl.float32)
    b_akk = tl.zeros([BC, BC], dtype=tl.float32)
    for j in tl.static_range(BC):
        sel = o_c[:, None] == j
        b_kj = tl.sum(tl.where(sel, b_k, 0.0), axis=0)
        b_Gj = tl.sum(tl.where(sel, b_G, 0.0), axis=0)
        b_t = b_kj[None, :] * tl.exp(tl.where((o_c >= j)[:, None], b_G - b_Gj[None, :], float("-inf")))
        c_qk = tl.sum(b_q * b_t, axis=1)
        c_kk = tl.sum(b_k * b_t, axis=1)
        b_aqk = tl.where(o_c[None, :] == j, c_qk[:, None], b_aqk)
        b_akk = tl.where(o_c[None, :] == j, c_kk[:, None], b_akk)
    b_akk = tl.where(o_c[:, None] > o_c[None, :], b_akk * b_b[:, None], 0.0)
    return b_aqk, b_akk


@triton.jit
def _inv_unit_lower(b_n, o_c, PREC: tl.constexpr):
    """(I + N)^-1 for a strictly lower 16x16 N."""
    b_m = tl.where(o_c[:, None] == o_c[None, :], 1.0, 0.0) - b_n
    b_p = b_n
    for _ in tl.static_range(3):
        b_p = tl.dot(b_p, b_p, input_precision=PREC)
        b_m = b_m + tl.dot(b_m, b_p, input_precision=PREC)
    return b_m


@triton.jit
def _store_tile(p, x, o_r, m_r, col0, o_c, HV: tl.constexpr, BT: tl.constexpr, i_hv):
    tl.store(p + (o_r[:, None] * HV + i_hv) * BT + col0 + o_c[None, :], x, mask=m_r[:, None])


@triton.jit
def _store_rows(p, x, o_r, m_r, o_k, m_k, i_hv, HV: tl.constexpr, K: tl.constexpr):
    tl.store(p + (o_r[:, None] * HV + i_hv) * K + o_k[None, :], x.to(p.dtype.element_ty),
             mask=m_r[:, None] & m_k[None, :])


@triton.jit
def kda_intra_fwd_kernel(
    q, k, v, g, beta, A_log, dt_bias, Aqk, w, u, qg, kd, dl, chunk_bounds,
    scale, lower_bound,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    HAS_GATE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LB: tl.constexpr,
    USE_L2: tl.constexpr, USE_SIGMOID: tl.constexpr, PREC_INV: tl.constexpr, PREC: tl.constexpr,
):
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    i_h = i_hv // (HV // H)
    bos = tl.load(chunk_bounds + 2 * i_c).to(tl.int64)
    eos = tl.load(chunk_bounds + 2 * i_c + 1).to(tl.int64)
    o_c = tl.arange(0, BC)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    r0 = bos + o_c
    r1 = r0 + BC
    r2 = r1 + BC
    r3 = r2 + BC
    m0, m1, m2, m3 = r0 < eos, r1 < eos, r2 < eos, r3 < eos

    q0, k0, g0, b0 = _load_block(q, k, g, beta, A_log, dt_bias, lower_bound, r0, m0, o_k, m_k, i_h, i_hv,
                                 H, HV, K, HAS_GATE, HAS_BIAS, HAS_LB, USE_L2, USE_SIGMOID)
    q1, k1, g1, b1 = _load_block(q, k, g, beta, A_log, dt_bias, lower_bound, r1, m1, o_k, m_k, i_h, i_hv,
                                 H, HV, K, HAS_GATE, HAS_BIAS, HAS_LB, USE_L2, USE_SIGMOID)
    q2, k2, g2, b2 = _load_block(q, k, g, beta, A_log, dt_bias, lower_bound, r2, m2, o_k, m_k, i_h, i_hv,
                                 H, HV, K, HAS_GATE, HAS_BIAS, HAS_LB, USE_L2, USE_SIGMOID)
    q3, k3, g3, b3 = _load_block(q, k, g, beta, A_log, dt_bias, lower_bound, r3, m3, o_k, m_k, i_h, i_hv,
                                 H, HV, K, HAS_GATE, HAS_BIAS, HAS_LB, USE_L2, USE_SIGMOID)
    # Cumulative gate per block; p_I = Gamma at the last row of block I - 1.
    G0 = tl.cumsum(g0, axis=0)
    p1 = tl.sum(g0, axis=0)
    G1 = p1[None, :] + tl.cumsum(g1, axis=0)
    p2 = p1 + tl.sum(g1, axis=0)
    G2 = p2[None, :] + tl.cumsum(g2, axis=0)
    p3 = p2 + tl.sum(g2, axis=0)
    G3 = p3[None, :] + tl.cumsum(g3, axis=0)
    p4 = p3 + tl.sum(g3, axis=0)  # Gamma_last (padding rows carry g = 0)
    a1, a2, a3 = _first_row(G1, o_c), _first_row(G2, o_c), _first_row(G3, o_c)

    # Outputs the recurrence reads instead of Gamma.
    _store_rows(qg, q0 * tl.exp(G0) * scale, r0, m0, o_k, m_k, i_hv, HV, K)
    _store_rows(qg, q1 * tl.exp(G1) * scale, r1, m1, o_k, m_k, i_hv, HV, K)
    _store_rows(qg, q2 * tl.exp(G2) * scale, r2, m2, o_k, m_k, i_hv, HV, K)
    _store_rows(qg, q3 * tl.exp(G3) * scale, r3, m3, o_k, m_k, i_hv, HV, K)
    _store_rows(kd, k0 * tl.exp(p4[None, :] - G0), r0, m0, o_k, m_k, i_hv, HV, K)
    _store_rows(kd, k1 * tl.exp(p4[None, :] - G1), r1, m1, o_k, m_k, i_hv, HV, K)
    _store_rows(kd, k2 * tl.exp(p4[None, :] - G2), r2, m2, o_k, m_k, i_hv, HV, K)
    _store_rows(kd, k3 * tl.exp(p4[None, :] - G3), r3, m3, o_k, m_k, i_hv, HV, K)
    tl.store(dl + (i_c * HV + i_hv).to(tl.int64) * K + o_k, tl.exp(p4), mask=m_k)

    # Diagonal blocks.
    q0 = q0 * scale
    q1 = q1 * scale
    q2 = q2 * scale
    q3 = q3 * scale
    Aqk00, Akk00 = _diag_block(q0, k0, G0, b0, o_c, BC)
    Aqk11, Akk11 = _diag_block(q1, k1, G1, b1, o_c, BC)
    Aqk22, Akk22 = _diag_block(q2, k2, G2, b2, o_c, BC)
    Aqk33, Akk33 = _diag_block(q3, k3, G3, b3, o_c, BC)

    # Off-diagonal blocks through the three-factor split (all exponents <= 0).
    kc0 = tl.trans(k0 * tl.exp(p1[None, :] - G0))
    kc1 = tl.trans(k1 * tl.exp(p2[None, :] - G1))
    kc2 = tl.trans(k2 * tl.exp(p3[None, :] - G2))
    e1 = tl.exp(G1 - a1[None, :])
    e2 = tl.exp(G2 - a2[None, :])
    e3 = tl.exp(G3 - a3[None, :])
    qs1, ks1 = q1 * e1, k1 * e1
    qs2, ks2 = q2 * e2, k2 * e2
    qs3, ks3 = q3 * e3, k3 * e3
    c10 = tl.exp(a1 - p1)[None, :]
    c20 = tl.exp(a2 - p1)[None, :]
    c21 = tl.exp(a2 - p2)[None, :]
    c30 = tl.exp(a3 - p1)[None, :]
    c31 = tl.exp(a3 - p2)[None, :]
    c32 = tl.exp(a3 - p3)[None, :]
    Aqk10 = tl.dot(qs1 * c10, kc0, input_precision=PREC)
    Aqk20 = tl.dot(qs2 * c20, kc0, input_precision=PREC)
    Aqk21 = tl.dot(qs2 * c21, kc1, input_precision=PREC)
    Aqk30 = tl.dot(qs3 * c30, kc0, input_precision=PREC)
    Aqk31 = tl.dot(qs3 * c31, kc1, input_precision=PREC)
    Aqk32 = tl.dot(qs3 * c32, kc2, input_precision=PREC)
    Akk10 = tl.dot(ks1 * c10, kc0, input_precision=PREC) * b1[:, None]
    Akk20 = tl.dot(ks2 * c20, kc0, input_precision=PREC) * b2[:, None]
    Akk21 = tl.dot(ks2 * c21, kc1, input_precision=PREC) * b2[:, None]
    Akk30 = tl.dot(ks3 * c30, kc0, input_precision=PREC) * b3[:, None]
    Akk31 = tl.dot(ks3 * c31, kc1, input_precision=PREC) * b3[:, None]
    Akk32 = tl.dot(ks3 * c32, kc2, input_precision=PREC) * b3[:, None]

    zero = tl.zeros([BC, BC], dtype=tl.float32)
    _store_tile(Aqk, Aqk00, r0, m0, 0, o_c, HV, BT, i_hv)
    _store_tile(Aqk, zero, r0, m0, BC, o_c, HV, BT, i_hv)
    _store_tile(Aqk, zero, r0, m0, 2 * BC, o_c, HV, BT, i_hv)
    _store_tile(Aqk, zero, r0, m0, 3 * BC, o_c, HV, BT, i_hv)
    _store_tile(Aqk, Aqk10, r1, m1, 0, o_c, HV, BT, i_hv)
    _store_tile(Aqk, Aqk11, r1, m1, BC, o_c, HV, BT, i_hv)
    _store_tile(Aqk, zero, r1, m1, 2 * BC, o_c, HV, BT, i_hv)
    _store_tile(Aqk, zero, r1, m1, 3 * BC, o_c, HV, BT, i_hv)
    _store_tile(Aqk, Aqk20, r2, m2, 0, o_c, HV, BT, i_hv)
    _store_tile(Aqk, Aqk21, r2, m2, BC, o_c, HV, BT, i_hv)
    _store_tile(Aqk, Aqk22, r2, m2, 2 * BC, o_c, HV, BT, i_hv)
    _store_tile(Aqk, zero, r2, m2, 3 * BC, o_c, HV, BT, i_hv)
    _store_tile(Aqk, Aqk30, r3, m3, 0, o_c, HV, BT, i_hv)
    _store_tile(Aqk, Aqk31, r3, m3, BC, o_c, HV, BT, i_hv)
    _store_tile(Aqk, Aqk32, r3, m3, 2 * BC, o_c, HV, BT, i_hv)
    _store_tile(Aqk, Aqk33, r3, m3, 3 * BC, o_c, HV, BT, i_hv)

    # M = (I + A_kk)^-1 by blocks.
    D0 = _inv_unit_lower(Akk00, o_c, PREC_INV)
    D1 = _inv_unit_lower(Akk11, o_c, PREC_INV)
    D2 = _inv_unit_lower(Akk22, o_c, PREC_INV)
    D3 = _inv_unit_lower(Akk33, o_c, PREC_INV)
    M10 = -tl.dot(D1, tl.dot(Akk10, D0, input_precision=PREC_INV), input_precision=PREC_INV)
    M21 = -tl.dot(D2, tl.dot(Akk21, D1, input_precision=PREC_INV), input_precision=PREC_INV)
    M20 = -tl.dot(D2, tl.dot(Akk20, D0, input_precision=PREC_INV) + tl.dot(Akk21, M10, input_precision=PREC_INV),
                  input_precision=PREC_INV)
    M32 = -tl.dot(D3, tl.dot(Akk32, D2, input_precision=PREC_INV), input_precision=PREC_INV)
    M31 = -tl.dot(D3, tl.dot(Akk31, D1, input_precision=PREC_INV) + tl.dot(Akk32, M21, input_precision=PREC_INV),
                  input_precision=PREC_INV)
    M30 = -tl.dot(D3, tl.dot(Akk30, D0, input_precision=PREC_INV) + tl.dot(Akk31, M10, input_precision=PREC_INV)
                  + tl.dot(Akk32, M20, input_precision=PREC_INV), input_precision=PREC_INV)

    # w = M (beta k exp(Gamma)), u = M (beta v).
    X0 = k0 * tl.exp(G0) * b0[:, None]
    X1 = k1 * tl.exp(G1) * b1[:, None]
    X2 = k2 * tl.exp(G2) * b2[:, None]
    X3 = k3 * tl.exp(G3) * b3[:, None]
    _store_rows(w, tl.dot(D0, X0, input_precision=PREC), r0, m0, o_k, m_k, i_hv, HV, K)
    _store_rows(w, tl.dot(M10, X0, input_precision=PREC) + tl.dot(D1, X1, input_precision=PREC),
                r1, m1, o_k, m_k, i_hv, HV, K)
    _store_rows(w, tl.dot(M20, X0, input_precision=PREC) + tl.dot(M21, X1, input_precision=PREC)
                + tl.dot(D2, X2, input_precision=PREC), r2, m2, o_k, m_k, i_hv, HV, K)
    _store_rows(w, tl.dot(M30, X0, input_precision=PREC) + tl.dot(M31, X1, input_precision=PREC)
                + tl.dot(M32, X2, input_precision=PREC) + tl.dot(D3, X3, input_precision=PREC),
                r3, m3, o_k, m_k, i_hv, HV, K)
    o_v = tl.arange(0, BV)
    m_v = o_v < V
    Y0 = tl.load(v + (r0[:, None] * HV + i_hv) * V + o_v[None, :], mask=m0[:, None] & m_v[None, :], other=0.0)
    Y1 = tl.load(v + (r1[:, None] * HV + i_hv) * V + o_v[None, :], mask=m1[:, None] & m_v[None, :], other=0.0)
    Y2 = tl.load(v + (r2[:, None] * HV + i_hv) * V + o_v[None, :], mask=m2[:, None] & m_v[None, :], other=0.0)
    Y3 = tl.load(v + (r3[:, None] * HV + i_hv) * V + o_v[None, :], mask=m3[:, None] & m_v[None, :], other=0.0)
    Y0 = Y0.to(tl.float32) * b0[:, None]
    Y1 = Y1.to(tl.float32) * b1[:, None]
    Y2 = Y2.to(tl.float32) * b2[:, None]
    Y3 = Y3.to(tl.float32) * b3[:, None]
    _store_rows(u, tl.dot(D0, Y0, input_precision=PREC), r0, m0, o_v, m_v, i_hv, HV, V)
    _store_rows(u, tl.dot(M10, Y0, input_precision=PREC) + tl.dot(D1, Y1, input_precision=PREC),
                r1, m1, o_v, m_v, i_hv, HV, V)
    _store_rows(u, tl.dot(M20, Y0, input_precision=PREC) + tl.dot(M21, Y1, input_precision=PREC)
                + tl.dot(D2, Y2, input_precision=PREC), r2, m2, o_v, m_v, i_hv, HV, V)
    _store_rows(u, tl.dot(M30, Y0, input_precision=PREC) + tl.dot(M31, Y1, input_precision=PREC)
                + tl.dot(M32, Y2, input_precision=PREC) + tl.dot(D3, Y3, input_precision=PREC),
                r3, m3, o_v, m_v, i_hv, HV, V)


def kda_intra_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    chunk_bounds: torch.Tensor,
    *,
    scale: float,
    A_log: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    lower_bound: float | None,
    use_qk_l2norm: bool,
    use_beta_sigmoid: bool,
    chunk_size: int = 64,
) -> dict[str, torch.Tensor]:
    """q, k ``[TT, H, K]``, v ``[TT, HV, V]``, g ``[TT, HV, K]`` (raw when A_log), beta ``[TT, HV]``
    (flattened tokens) -> dict: Aqk ``[TT, HV, 64]`` fp32, w / qg / kd ``[TT, HV, K]`` in v.dtype,
    u ``[TT, HV, V]`` fp32, dl ``[NC, HV, K]`` fp32."""
    if chunk_size != 64:
        raise ValueError(f"chunk_size: the triton backend supports 64, got {chunk_size}")
    TT, H, K = q.shape
    HV, V = v.shape[-2], v.shape[-1]
    NC = chunk_bounds.shape[0]
    dev = q.device
    out = dict(
        Aqk=torch.empty(TT, HV, 64, device=dev, dtype=torch.float32),
        w=torch.empty(TT, HV, K, device=dev, dtype=v.dtype),
        u=torch.empty(TT, HV, V, device=dev, dtype=torch.float32),
        qg=torch.empty(TT, HV, K, device=dev, dtype=v.dtype),
        kd=torch.empty(TT, HV, K, device=dev, dtype=v.dtype),
        dl=torch.empty(NC, HV, K, device=dev, dtype=torch.float32),
    )
    has_gate = A_log is not None
    kda_intra_fwd_kernel[(NC, HV)](
        q, k, v, g, beta, A_log if has_gate else g, dt_bias if dt_bias is not None else g,
        out["Aqk"], out["w"], out["u"], out["qg"], out["kd"], out["dl"], chunk_bounds,
        float(scale), float(lower_bound) if lower_bound is not None else 0.0,
        H=H, HV=HV, K=K, V=V, BK=next_pow2(K), BV=next_pow2(V), BT=64, BC=16,
        HAS_GATE=has_gate, HAS_BIAS=has_gate and dt_bias is not None, HAS_LB=has_gate and lower_bound is not None,
        USE_L2=use_qk_l2norm, USE_SIGMOID=use_beta_sigmoid,
        PREC_INV="ieee", PREC="ieee" if INTERPRET else "tf32",
        num_warps=4,
    )
    return out
