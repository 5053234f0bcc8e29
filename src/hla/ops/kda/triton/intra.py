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
def _gate_rows(g, A_log, dt_bias, lower_bound, o_r, m_r, o_k, m_k, i_hv,
               HV: tl.constexpr, K: tl.constexpr, HAS_GATE: tl.constexpr, HAS_BIAS: tl.constexpr,
               HAS_LB: tl.constexpr):
    """Log-decay of 16 rows [BC, BK] fp32, 0 on padding rows."""
    m = m_r[:, None] & m_k[None, :]
    b_g = tl.load(g + (o_r[:, None] * HV + i_hv) * K + o_k[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_GATE:
        b_a = tl.exp(tl.load(A_log + i_hv).to(tl.float32))
        if HAS_BIAS:
            b_bias = tl.load(dt_bias + i_hv * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        else:
            b_bias = tl.zeros_like(o_k).to(tl.float32)
        b_g = tl.where(m, kda_gate_f32(b_g, b_a, b_bias[None, :], lower_bound, HAS_BIAS, HAS_LB), 0.0)
    return b_g


@triton.jit
def _qk_rows(x, o_r, m_r, o_k, m_k, i_h, H: tl.constexpr, K: tl.constexpr, USE_L2: tl.constexpr):
    b_x = tl.load(x + (o_r[:, None] * H + i_h) * K + o_k[None, :], mask=m_r[:, None] & m_k[None, :],
                  other=0.0).to(tl.float32)
    if USE_L2:
        b_x = b_x / tl.sqrt(tl.sum(b_x * b_x, axis=1) + 1e-6)[:, None]
    return b_x


@triton.jit
def _rows(x, o_r, m_r, o_k, m_k, i_hv, HV: tl.constexpr, K: tl.constexpr):
    return tl.load(x + (o_r[:, None] * HV + i_hv) * K + o_k[None, :], mask=m_r[:, None] & m_k[None, :], other=0.0)


@triton.jit
def _row(x, r, m, o_k, m_k, i_hv, HV: tl.constexpr, K: tl.constexpr):
    return tl.load(x + (r * HV + i_hv) * K + o_k, mask=m_k & m, other=0.0)


@triton.jit
def _beta_rows(beta, o_r, m_r, i_hv, HV: tl.constexpr, USE_SIGMOID: tl.constexpr):
    b_b = tl.load(beta + o_r * HV + i_hv, mask=m_r, other=0.0).to(tl.float32)
    if USE_SIGMOID:
        b_b = tl.where(m_r, tl.sigmoid(b_b), 0.0)
    return b_b


@triton.jit
def _diag_block(q, k, G, bos, i_b, eos, b_q, b_k, b_G, b_b, o_c, o_k, m_k, i_h, i_hv,
                H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BC: tl.constexpr, USE_L2: tl.constexpr):
    """Diagonal 16x16 blocks of A_qk (j <= i) and A_kk (j < i, times beta_i), one column j at a time
    with exp(G_i - G_j) per pair; row j's key and gate come from memory (cache hits)."""
    b_aqk = tl.zeros([BC, BC], dtype=tl.float32)
    b_akk = tl.zeros([BC, BC], dtype=tl.float32)
    for j in range(BC):
        r = bos + i_b * BC + j
        m_j = r < eos
        b_kj = tl.load(k + (r * H + i_h) * K + o_k, mask=m_k & m_j, other=0.0).to(tl.float32)
        if USE_L2:
            b_kj = b_kj / tl.sqrt(tl.sum(b_kj * b_kj) + 1e-6)
        b_Gj = tl.load(G + (r * HV + i_hv) * K + o_k, mask=m_k & m_j, other=0.0)
        # rows past eos (G loaded as 0) would take exp of a positive value; they are never stored
        b_t = b_kj[None, :] * tl.exp(tl.where(((o_c >= j) & (bos + i_b * BC + o_c < eos))[:, None],
                                              b_G - b_Gj[None, :], float("-inf")))
        c_qk = tl.sum(b_q * b_t, axis=1)
        c_kk = tl.sum(b_k * b_t, axis=1)
        b_aqk = tl.where(o_c[None, :] == j, c_qk[:, None], b_aqk)
        b_akk = tl.where(o_c[None, :] == j, c_kk[:, None], b_akk)
    b_akk = tl.where(o_c[:, None] > o_c[None, :], b_akk * b_b[:, None], 0.0)
    return b_aqk, b_akk


@triton.jit
def _off_block(k, G, bos, i_b, j_b, eos, b_qs, b_ks, b_Ga, o_c, o_k, m_k, i_h, i_hv,
               H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BC: tl.constexpr, USE_L2: tl.constexpr,
               PREC: tl.constexpr):
    """Block (I, J), J < I: exp(G_i - G_j) = exp(G_i - G_a) exp(G_a - G_b) exp(G_b - G_j), a = first
    row of I, b = last row of J; b_qs / b_ks carry the first factor."""
    o_j = bos + j_b * BC + o_c
    m_j = o_j < eos
    b_kJ = _qk_rows(k, o_j, m_j, o_k, m_k, i_h, H, K, USE_L2)
    b_GJ = _rows(G, o_j, m_j, o_k, m_k, i_hv, HV, K)
    rb = bos + j_b * BC + BC - 1
    b_Gb = _row(G, rb, rb < eos, o_k, m_k, i_hv, HV, K)
    # rb past eos (G_b loaded as 0) means block I lies wholly past eos, its tiles never stored: no exp(> 0) there
    b_kc = tl.trans(b_kJ * tl.exp(tl.where(m_j[:, None] & (rb < eos), b_Gb[None, :] - b_GJ, float("-inf"))))
    # min(., 0) only matters for an empty block I (no anchor loaded); otherwise G_a <= G_b already.
    b_c = tl.exp(tl.minimum(b_Ga - b_Gb, 0.0))[None, :]
    return (tl.dot(b_qs * b_c, b_kc, input_precision=PREC), tl.dot(b_ks * b_c, b_kc, input_precision=PREC))


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
def _tile(p, o_r, m_r, col0, o_c, i_hv, HV: tl.constexpr, BT: tl.constexpr):
    return tl.load(p + (o_r[:, None] * HV + i_hv) * BT + col0 + o_c[None, :], mask=m_r[:, None], other=0.0)


@triton.jit
def _store_tile(p, x, o_r, m_r, col0, o_c, i_hv, HV: tl.constexpr, BT: tl.constexpr):
    tl.store(p + (o_r[:, None] * HV + i_hv) * BT + col0 + o_c[None, :], x, mask=m_r[:, None])


@triton.jit
def _store_rows(p, x, o_r, m_r, o_k, m_k, i_hv, HV: tl.constexpr, K: tl.constexpr):
    tl.store(p + (o_r[:, None] * HV + i_hv) * K + o_k[None, :], x.to(p.dtype.element_ty),
             mask=m_r[:, None] & m_k[None, :])


@triton.jit
def _a_row_block(q, k, G, beta, Aqk, Akk, qg, kd, bos, eos, i_b: tl.constexpr, b_Gl, scale, o_c, o_k, m_k,
                 i_h, i_hv, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                 BC: tl.constexpr, USE_L2: tl.constexpr, USE_SIGMOID: tl.constexpr, PREC: tl.constexpr):
    """Row block I of A_qk / A_kk (stored), and qg, kd of its rows."""
    o_r = bos + i_b * BC + o_c
    m_r = o_r < eos
    b_q = _qk_rows(q, o_r, m_r, o_k, m_k, i_h, H, K, USE_L2) * scale
    b_k = _qk_rows(k, o_r, m_r, o_k, m_k, i_h, H, K, USE_L2)
    b_G = _rows(G, o_r, m_r, o_k, m_k, i_hv, HV, K)
    b_b = _beta_rows(beta, o_r, m_r, i_hv, HV, USE_SIGMOID)
    _store_rows(qg, b_q * tl.exp(b_G), o_r, m_r, o_k, m_k, i_hv, HV, K)
    _store_rows(kd, b_k * tl.exp(tl.where(m_r[:, None], b_Gl[None, :] - b_G, float("-inf"))),
                o_r, m_r, o_k, m_k, i_hv, HV, K)
    b_aqk, b_akk = _diag_block(q, k, G, bos, i_b, eos, b_q, b_k, b_G, b_b, o_c, o_k, m_k, i_h, i_hv,
                               H, HV, K, BC, USE_L2)
    _store_tile(Aqk, b_aqk, o_r, m_r, i_b * BC, o_c, i_hv, HV, BT)
    _store_tile(Akk, b_akk, o_r, m_r, i_b * BC, o_c, i_hv, HV, BT)
    zero = tl.zeros([BC, BC], dtype=tl.float32)
    for j_b in tl.static_range(i_b + 1, BT // BC):
        _store_tile(Aqk, zero, o_r, m_r, j_b * BC, o_c, i_hv, HV, BT)
    if i_b > 0:
        b_Ga = _row(G, bos + i_b * BC, bos + i_b * BC < eos, o_k, m_k, i_hv, HV, K)
        b_e = tl.exp(tl.where(m_r[:, None], b_G - b_Ga[None, :], float("-inf")))
        b_qs = b_q * b_e
        b_ks = b_k * b_e
        for j_b in tl.static_range(i_b):
            b_oqk, b_okk = _off_block(k, G, bos, i_b, j_b, eos, b_qs, b_ks, b_Ga, o_c, o_k, m_k, i_h, i_hv,
                                      H, HV, K, BC, USE_L2, PREC)
            _store_tile(Aqk, b_oqk, o_r, m_r, j_b * BC, o_c, i_hv, HV, BT)
            _store_tile(Akk, b_okk * b_b[:, None], o_r, m_r, j_b * BC, o_c, i_hv, HV, BT)


@triton.jit
def _wu_rows(x, y, G, k, v, beta, M0, M1, M2, M3, bos, eos, n_b: tl.constexpr, o_c, o_k, m_k, o_v, m_v,
             i_h, i_hv, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BC: tl.constexpr,
             USE_L2: tl.constexpr, USE_SIGMOID: tl.constexpr, PREC: tl.constexpr):
    """Row block n_b of w = M (beta k exp(G)) and u = M (beta v); M0..M3 are that block row of M."""
    b_w = tl.zeros([BC, o_k.shape[0]], dtype=tl.float32)
    b_u = tl.zeros([BC, o_v.shape[0]], dtype=tl.float32)
    for j_b in tl.static_range(n_b + 1):
        o_j = bos + j_b * BC + o_c
        m_j = o_j < eos
        b_bj = _beta_rows(beta, o_j, m_j, i_hv, HV, USE_SIGMOID)
        b_X = _qk_rows(k, o_j, m_j, o_k, m_k, i_h, H, K, USE_L2) * tl.exp(_rows(G, o_j, m_j, o_k, m_k, i_hv, HV, K))
        b_Y = _rows(v, o_j, m_j, o_v, m_v, i_hv, HV, V).to(tl.float32)
        if j_b == 0:
            b_m = M0
        elif j_b == 1:
            b_m = M1
        elif j_b == 2:
            b_m = M2
        else:
            b_m = M3
        b_m = b_m * b_bj[None, :]
        b_w += tl.dot(b_m, b_X, input_precision=PREC)
        b_u += tl.dot(b_m, b_Y, input_precision=PREC)
    o_r = bos + n_b * BC + o_c
    m_r = o_r < eos
    _store_rows(x, b_w, o_r, m_r, o_k, m_k, i_hv, HV, K)
    _store_rows(y, b_u, o_r, m_r, o_v, m_v, i_hv, HV, V)


@triton.jit
def kda_intra_fwd_kernel(
    q, k, v, g, beta, A_log, dt_bias, G, Akk, Aqk, w, u, qg, kd, dl, chunk_bounds,
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

    # Phase 1: gate and in-chunk cumsum, block by block, into the G scratch (fp32).
    b_p = tl.zeros([BK], dtype=tl.float32)
    for i_b in tl.static_range(BT // BC):
        o_r = bos + i_b * BC + o_c
        m_r = o_r < eos
        b_g = _gate_rows(g, A_log, dt_bias, lower_bound, o_r, m_r, o_k, m_k, i_hv, HV, K, HAS_GATE, HAS_BIAS, HAS_LB)
        _store_rows(G, b_p[None, :] + tl.cumsum(b_g, axis=0), o_r, m_r, o_k, m_k, i_hv, HV, K)
        b_p += tl.sum(b_g, axis=0)
    b_Gl = b_p  # Gamma at the chunk's last row (padding rows carry g = 0)
    tl.store(dl + (i_c * HV + i_hv).to(tl.int64) * K + o_k, tl.exp(b_Gl), mask=m_k)
    tl.debug_barrier()  # G rows written by other threads of this program are read below

    # Phase 2: A_qk, A_kk, qg, kd, one 16-row block at a time.
    for i_b in tl.static_range(BT // BC):
        _a_row_block(q, k, G, beta, Aqk, Akk, qg, kd, bos, eos, i_b, b_Gl, scale, o_c, o_k, m_k, i_h, i_hv,
                     H, HV, K, BT, BC, USE_L2, USE_SIGMOID, PREC)
    tl.debug_barrier()

    # Phase 3: M = (I + A_kk)^-1 by blocks, then w and u.
    r0 = bos + o_c
    r1 = r0 + BC
    r2 = r1 + BC
    r3 = r2 + BC
    m0, m1, m2, m3 = r0 < eos, r1 < eos, r2 < eos, r3 < eos
    D0 = _inv_unit_lower(_tile(Akk, r0, m0, 0, o_c, i_hv, HV, BT), o_c, PREC_INV)
    D1 = _inv_unit_lower(_tile(Akk, r1, m1, BC, o_c, i_hv, HV, BT), o_c, PREC_INV)
    D2 = _inv_unit_lower(_tile(Akk, r2, m2, 2 * BC, o_c, i_hv, HV, BT), o_c, PREC_INV)
    D3 = _inv_unit_lower(_tile(Akk, r3, m3, 3 * BC, o_c, i_hv, HV, BT), o_c, PREC_INV)
    A10 = _tile(Akk, r1, m1, 0, o_c, i_hv, HV, BT)
    A20 = _tile(Akk, r2, m2, 0, o_c, i_hv, HV, BT)
    A21 = _tile(Akk, r2, m2, BC, o_c, i_hv, HV, BT)
    A30 = _tile(Akk, r3, m3, 0, o_c, i_hv, HV, BT)
    A31 = _tile(Akk, r3, m3, BC, o_c, i_hv, HV, BT)
    A32 = _tile(Akk, r3, m3, 2 * BC, o_c, i_hv, HV, BT)
    M10 = -tl.dot(D1, tl.dot(A10, D0, input_precision=PREC_INV), input_precision=PREC_INV)
    M21 = -tl.dot(D2, tl.dot(A21, D1, input_precision=PREC_INV), input_precision=PREC_INV)
    M20 = -tl.dot(D2, tl.dot(A20, D0, input_precision=PREC_INV) + tl.dot(A21, M10, input_precision=PREC_INV),
                  input_precision=PREC_INV)
    M32 = -tl.dot(D3, tl.dot(A32, D2, input_precision=PREC_INV), input_precision=PREC_INV)
    M31 = -tl.dot(D3, tl.dot(A31, D1, input_precision=PREC_INV) + tl.dot(A32, M21, input_precision=PREC_INV),
                  input_precision=PREC_INV)
    M30 = -tl.dot(D3, tl.dot(A30, D0, input_precision=PREC_INV) + tl.dot(A31, M10, input_precision=PREC_INV)
                  + tl.dot(A32, M20, input_precision=PREC_INV), input_precision=PREC_INV)
    o_v = tl.arange(0, BV)
    m_v = o_v < V
    z = tl.zeros([BC, BC], dtype=tl.float32)
    _wu_rows(w, u, G, k, v, beta, D0, z, z, z, bos, eos, 0, o_c, o_k, m_k, o_v, m_v, i_h, i_hv,
             H, HV, K, V, BC, USE_L2, USE_SIGMOID, PREC)
    _wu_rows(w, u, G, k, v, beta, M10, D1, z, z, bos, eos, 1, o_c, o_k, m_k, o_v, m_v, i_h, i_hv,
             H, HV, K, V, BC, USE_L2, USE_SIGMOID, PREC)
    _wu_rows(w, u, G, k, v, beta, M20, M21, D2, z, bos, eos, 2, o_c, o_k, m_k, o_v, m_v, i_h, i_hv,
             H, HV, K, V, BC, USE_L2, USE_SIGMOID, PREC)
    _wu_rows(w, u, G, k, v, beta, M30, M31, M32, D3, bos, eos, 3, o_c, o_k, m_k, o_v, m_v, i_h, i_hv,
             H, HV, K, V, BC, USE_L2, USE_SIGMOID, PREC)


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
    u ``[TT, HV, V]`` fp32, dl ``[NC, HV, K]`` fp32;
    G (cumulative gate) and Akk are the kernel's scratch."""
    if chunk_size != 64:
        raise ValueError(f"chunk_size: the triton backend supports 64, got {chunk_size}")
    TT, H, K = q.shape
    HV, V = v.shape[-2], v.shape[-1]
    NC = chunk_bounds.shape[0]
    dev = q.device
    out = dict(
        G=torch.empty(TT, HV, K, device=dev, dtype=torch.float32),
        Akk=torch.empty(TT, HV, 64, device=dev, dtype=torch.float32),
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
        out["G"], out["Akk"], out["Aqk"], out["w"], out["u"], out["qg"], out["kd"], out["dl"], chunk_bounds,
        float(scale), float(lower_bound) if lower_bound is not None else 0.0,
        H=H, HV=HV, K=K, V=V, BK=next_pow2(K), BV=next_pow2(V), BT=64, BC=16,
        HAS_GATE=has_gate, HAS_BIAS=has_gate and dt_bias is not None, HAS_LB=has_gate and lower_bound is not None,
        USE_L2=use_qk_l2norm, USE_SIGMOID=use_beta_sigmoid,
        PREC_INV="ieee", PREC="ieee" if INTERPRET else "tf32",
        num_warps=4, num_stages=1,
    )
    return out
