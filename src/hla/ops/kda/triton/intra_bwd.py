"""Backward of stage 1 (intra.py): from the gradients of w, u, qg, kd, A_qk and exp(Gamma_last) to
those of q, k, v, the raw gate (and A_log, dt_bias) and beta. Launch 1 (kda_intra_bwd_dkk_kernel,
one program per chunk and value head) forms dX, d(beta v), dv, dA_kk and writes dX, dP and a partial
dbeta. The pair sums then take one of two routes (PAIR_LAUNCH):

- "block": kda_intra_bwd_block_kernel, one program per 16-row block of a chunk, then
  kda_intra_bwd_gate_kernel per chunk for the in-chunk reverse cumsum and the gate backward. Pairs
  across blocks take the anchor Gamma at the end of the earlier block, so both factors are <= 1 for
  every gate (no span test, no exponent split); pairs inside a block take one exponential each.
- "pair": kda_intra_bwd_pair_kernel, one program per chunk and value head, with the forward's
  exponent split (a level-32 product plus one anchor per half while the factors stay within
  exp(+-SAFE_SPAN), the six-level split otherwise).

With X = diag(beta) k exp(Gamma), w = M X, u = M diag(beta) v and M = (I + diag(beta) P)^-1:

    dX = M^T dw,  d(beta v) = M^T du
    dA_kk = -(dX w^T + d(beta v) u^T), strictly lower        (the inverse's gradient, M never inverted again)
    dP = diag(beta) dA_kk,  dbeta_i += sum_j dA_kk[i, j] P[i, j]

The pair sums A[i, j] = sum_d x_id y_jd exp(Gamma_id - Gamma_jd) (x, y = q, k for A_qk; k, k for P)
have gradients of the same form, dx = (dA * E) y and dy = (dA * E)^T x per channel, and
dGamma = x dx - y dy. dGamma then goes through the in-chunk cumsum (a reverse cumsum), the gate, the
l2norm and the beta sigmoid, all fused. dq and dk are written per value head; the caller sums
grouped heads.

All products take fp32 operands (tf32 / tf32x3 on the GPU). dGamma = x dx - y dy is a difference of
terms larger than itself: with bf16 operands the H200 check gave dg errors of 2e-2 (six-level split)
and 4e-1 (one anchor) at T=1024, against 3e-3 and 4e-4 with fp32 operands.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hla.ops.kda.triton import intra as _intra
from hla.ops.kda.triton.common import (
    INTERPRET,
    beta_rows,
    half_anchors,
    kda_gate_f32_and_grads,
    level_factors,
    next_pow2,
    qk_row_sumsq,
    tile_row,
)

# Products of the intra backward on the GPU (read at each call). "tf32x3" is three tf32 products (~fp32
# accuracy). With plain tf32 everywhere the H200 check gave dA_log errors of 5e-2 at ~-100 per token
# gates: such chunks take the six-level split, where dGamma = x dx - y dy cancels to a small remainder,
# so the six-level products keep tf32x3. The one-anchor fast path and the dA_kk launch take plain tf32:
# the check's backward cases stay within 4.9e-3 (H200, 2026-11-26, benchmarks/kda_notes.md session 3).
DKK_PRECISION = "tf32"
FAST_PRECISION = "tf32"
EXACT_PRECISION = "tf32x3"
# Launch settings: timed on the H200 (B1 T8192 H32 D128, benchmark Kimi gate, both launches, the
# precisions above): pair BK 32 / 4 warps 5.39 ms, BK 16 / 4 warps 6.08, BK 32 / 8 warps 5.84. Offline
# sm_90a (benchmarks/kda_prefill_regs.py --only intra_bwd): every pair variant uses 255 registers
# (2 blocks per SM); spill stores / loads per thread at BK 32 / 4 warps 960 / 1488 B, BK 16 504 / 568 B.
# Most of the pressure is the fast path itself (without the six-level branch BK 16 still needs 255).
BLOCK_K, NUM_WARPS = 32, 4
DKK_BLOCK_K, DKK_NUM_WARPS = 32, 4
# Which launch does the pair sums (read at each call): "pair" (one program per chunk, exponent split
# with a span test; the timed default) or "block" (one program per 16-row block, every pair exact,
# 3-10x fewer tensor-core MACs; CPU-tested and compiled offline, not yet run on a GPU; the
# benchmark's --stages times both).
PAIR_LAUNCH = "pair"
BLOCK_PRECISION = "tf32x3"
# Block launch settings from the offline sm_90a compile (benchmarks/kda_prefill_regs.py): BK 32 / 4 warps
# 255 registers, 80 / 80 B spills (2 blocks per SM); capped at 168 registers 736 / 996 B (3 blocks), at
# 128 1148 / 2384 B (4 blocks). BLOCK_MAX_REGISTERS sets the cap (None: ptxas' choice); untimed.
BLOCK_BLOCK_K, BLOCK_NUM_WARPS, BLOCK_MAX_REGISTERS = 32, 4, None


@triton.jit
def kda_intra_bwd_dkk_kernel(
    v, beta, w, u, M, P, du, dw,
    dv, dx, dP, dbeta, chunk_bounds,
    HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    USE_SIGMOID: tl.constexpr, PREC: tl.constexpr,
):
    """Launch 1: everything up to dA_kk. Writes dv, dX = M^T dw ([TT, HV, K] fp32, read back by
    launch 2 instead of a second M^T product), dP = diag(beta) dA_kk ([NC, HV, 64, 64] fp32) and the
    partial dbeta ([TT, HV] fp32, into dbeta's buffer: sum_v d(beta v) v + sum_j dA_kk P, before the
    sigmoid backward)."""
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    bos = tl.load(chunk_bounds + 2 * i_c).to(tl.int64)
    n_rows = tl.load(chunk_bounds + 2 * i_c + 1) - tl.load(chunk_bounds + 2 * i_c)
    hk = (bos * HV + i_hv) * K  # w, dw, dx
    hv = (bos * HV + i_hv) * V  # v, u, du, dv
    s_base = (i_c * HV + i_hv).to(tl.int64) * BT * BT
    SG: tl.constexpr = HV * K
    SV: tl.constexpr = HV * V
    o_t = tl.arange(0, BT)
    m_t = o_t < n_rows
    b_beta = beta_rows(beta + bos * HV + i_hv, o_t, m_t, HV, USE_SIGMOID)

    b_mt = tl.trans(tl.load(M + s_base + o_t[:, None] * BT + o_t[None, :]))  # M^T
    b_dakk = tl.zeros([BT, BT], dtype=tl.float32)
    b_db = tl.zeros([BT], dtype=tl.float32)
    # Pass A (value blocks): d(beta v) = M^T du -> dv, dbeta, dA_kk.
    for i_v in range(0, V, BV):
        o_v = i_v + tl.arange(0, BV)
        m = m_t[:, None] & (o_v < V)[None, :]
        p_tv = hv + o_t[:, None] * SV + o_v[None, :]
        b_du = tl.load(du + p_tv, mask=m, other=0.0)
        b_dvb = tl.dot(b_mt, b_du, input_precision=PREC)
        b_v = tl.load(v + p_tv, mask=m, other=0.0).to(tl.float32)
        tl.store(dv + p_tv, (b_dvb * b_beta[:, None]).to(dv.dtype.element_ty), mask=m)
        b_db += tl.sum(b_dvb * b_v, axis=1)
        b_u = tl.load(u + p_tv, mask=m, other=0.0)
        b_dakk -= tl.dot(b_dvb, tl.trans(b_u), input_precision=PREC)
    # Pass B (key blocks): dX = M^T dw -> dA_kk.
    for i_k in range(0, K, BK):
        o_k = i_k + tl.arange(0, BK)
        m = m_t[:, None] & (o_k < K)[None, :]
        p_tk = hk + o_t[:, None] * SG + o_k[None, :]
        b_dx = tl.dot(b_mt, tl.load(dw + p_tk, mask=m, other=0.0), input_precision=PREC)
        tl.store(dx + p_tk, b_dx, mask=m)
        b_w = tl.load(w + p_tk, mask=m, other=0.0).to(tl.float32)
        b_dakk -= tl.dot(b_dx, tl.trans(b_w), input_precision=PREC)
    b_dakk = tl.where(o_t[:, None] > o_t[None, :], b_dakk, 0.0)
    b_db += tl.sum(b_dakk * tl.load(P + s_base + o_t[:, None] * BT + o_t[None, :]), axis=1)
    tl.store(dP + s_base + o_t[:, None] * BT + o_t[None, :], b_dakk * b_beta[:, None])
    tl.store(dbeta + (bos * HV + i_hv) + o_t * HV, b_db, mask=m_t)


@triton.jit
def _fast_factors(b_G, b_G1, b_G2, b_G3, lo, SAFE_SPAN: tl.constexpr):
    """The fast path's factors ([BT, BK] each): e for the level-32 product (anchor row BT/2 - 1, <= 1),
    eq = exp(Gamma - Gamma_m) and ek = exp(Gamma_m - Gamma) around the half's anchor m (rows BT/4 - 1,
    3BT/4 - 1), clamped at exp(SAFE_SPAN) for the masked-out pairs."""
    b_e = tl.exp(tl.minimum(tl.where(lo[:, None], b_G2[None, :] - b_G, b_G - b_G2[None, :]), 0.0))
    b_Gm = tl.where(lo[:, None], b_G1[None, :], b_G3[None, :])
    return b_e, tl.exp(tl.minimum(b_G - b_Gm, SAFE_SPAN)), tl.exp(tl.minimum(b_Gm - b_G, SAFE_SPAN))


@triton.jit
def _grad_tile(base, stride, o_t, n_rows, DIAG: tl.constexpr, TRANS: tl.constexpr, PART: tl.constexpr,
               lvl=0):
    """A [BT, BT] fp32 gradient tile from base[r * stride + c] (dA_qk: DIAG, lower with the diagonal;
    dP: strictly lower), transposed by the load's addressing with TRANS, restricted to the pairs of
    one product: PART 0 all, 1 across the halves (r >= BT/2 > c), 2 inside a half, 3 inside one pair
    of blocks of level lvl of the six-level split. Loaded (from L1/L2) for each product instead of
    masking a tile held in registers: the held tiles and their masked copies made the kernel spill."""
    BT: tl.constexpr = o_t.shape[0]
    if TRANS:
        r = o_t[None, :]
        c = o_t[:, None]
    else:
        r = o_t[:, None]
        c = o_t[None, :]
    keep = ((r >= c) if DIAG else (r > c)) & (r < n_rows)
    if PART == 1:
        keep = keep & (r >= BT // 2) & (c < BT // 2)
    elif PART == 2:
        keep = keep & ((r < BT // 2) == (c < BT // 2))
    elif PART == 3:
        S = (BT // 2) >> lvl
        keep = keep & ((r // (2 * S)) == (c // (2 * S)))
    return tl.load(base + r * stride + c, mask=keep, other=0.0)


@triton.jit
def _gate_backward(b_dg, p_graw, m, p_bias, m_k, b_a, lower_bound, HAS_BIAS: tl.constexpr, HAS_LB: tl.constexpr):
    """dg [BT, BK] of the log-decay -> that of the raw gate at p_graw, and dA_log's part per channel
    (a = exp(A_log); dt_bias at p_bias)."""
    if HAS_BIAS:
        b_bias = tl.load(p_bias, mask=m_k, other=0.0).to(tl.float32)
    else:
        b_bias = tl.zeros([b_dg.shape[1]], dtype=tl.float32)
    b_graw = tl.load(p_graw, mask=m, other=0.0).to(tl.float32)
    _, b_gx, b_ga = kda_gate_f32_and_grads(b_graw, b_a, b_bias[None, :], lower_bound, HAS_BIAS, HAS_LB)
    return b_dg * b_gx, tl.sum(b_dg * b_ga, axis=0)


@triton.jit
def _token_terms(b_q, b_yk, b_G, b_Gl, b_beta, b_dqr, b_dkr, b_dkc, dx, dqg, dkd, p_tk, m):
    """Rows' gradients from the pair sums (row sides dq_r, dk_r, column side dk_c) plus the per-token
    terms of qg = q exp(Gamma), kd = k exp(Gamma_last - Gamma) and X = beta k exp(Gamma) -> dq, dk,
    dGamma (before the in-chunk reverse cumsum), the rows' dbeta part sum_d dX X / beta, and the
    column sums of dkd * kd (dGamma_last's token part)."""
    b_dq = b_dqr
    b_dk = b_dkr + b_dkc
    b_dG = b_q * b_dqr + b_yk * (b_dkr - b_dkc)
    b_eG = tl.exp(b_G)
    b_ed = tl.exp(tl.minimum(b_Gl[None, :] - b_G, 0.0))
    b_dx = tl.load(dx + p_tk, mask=m, other=0.0)
    b_dqg = tl.load(dqg + p_tk, mask=m, other=0.0)
    b_dkd = tl.load(dkd + p_tk, mask=m, other=0.0)
    b_kd = b_yk * b_ed
    b_xb = b_yk * b_eG  # X / beta
    b_db = tl.sum(b_dx * b_xb, axis=1)
    b_dq += b_dqg * b_eG
    b_dk += b_dx * b_eG * b_beta[:, None] + b_dkd * b_ed
    b_dG += b_dqg * b_q * b_eG + b_dx * b_xb * b_beta[:, None] - b_dkd * b_kd
    return b_dq, b_dk, b_dG, b_db, tl.sum(b_dkd * b_kd, axis=0)


@triton.jit
def _finish_rows(q_base, k_base, dq, dk, dbeta_base, hk, rows, m_rows, b_db, b_beta, b_iq, b_ik, b_cq, b_ck,
                 HV: tl.constexpr, SQ: tl.constexpr, SG: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
                 USE_SIGMOID: tl.constexpr, USE_L2: tl.constexpr):
    """The last steps for a set of a chunk's rows: dbeta (launch 1's partial + b_db, through the
    sigmoid) and the l2norm backward of the dq / dk rows stored so far (b_iq, b_ik: 1 / |row|; b_cq,
    b_ck: sum_d y dy per row)."""
    p_b = dbeta_base + rows * HV
    b_db += tl.load(p_b, mask=m_rows, other=0.0)
    if USE_SIGMOID:
        b_db = b_db * b_beta * (1.0 - b_beta)
    tl.store(p_b, b_db.to(dbeta_base.dtype.element_ty), mask=m_rows)
    if USE_L2:
        tl.debug_barrier()  # dq / dk rows written by other threads are read back below
        for i_k in range(0, K, BK):
            o_k = i_k + tl.arange(0, BK)
            m = m_rows[:, None] & (o_k < K)[None, :]
            p_qk = rows[:, None] * SQ + o_k[None, :]
            p_tk = hk + rows[:, None] * SG + o_k[None, :]
            b_yq = tl.load(q_base + p_qk, mask=m, other=0.0).to(tl.float32) * b_iq[:, None]
            b_yk = tl.load(k_base + p_qk, mask=m, other=0.0).to(tl.float32) * b_ik[:, None]
            b_dyq = tl.load(dq + p_tk, mask=m, other=0.0)
            b_dyk = tl.load(dk + p_tk, mask=m, other=0.0)
            tl.store(dq + p_tk, (b_dyq - b_yq * b_cq[:, None]) * b_iq[:, None], mask=m)
            tl.store(dk + p_tk, (b_dyk - b_yk * b_ck[:, None]) * b_ik[:, None], mask=m)


@triton.jit
def kda_intra_bwd_pair_kernel(
    q, k, g, beta, A_log, dt_bias, dx, dP, dqg, dkd, dA, ddl,
    dq, dk, dg, dbeta, dbias_part, dalog_part, chunk_bounds,
    scale, lower_bound,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr,
    HAS_GATE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LB: tl.constexpr,
    USE_L2: tl.constexpr, USE_SIGMOID: tl.constexpr, PREC: tl.constexpr, PREC_EXACT: tl.constexpr,
    SAFE_SPAN: tl.constexpr,
):
    """Launch 2: the pair-sum gradients per key block (pass C), dGamma -> dg, then the l2norm
    backward (pass D); finishes dbeta from launch 1's partial. dA_qk and dP are never held in
    registers: each product loads the part of the tile it needs (_grad_tile)."""
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    i_h = i_hv // (HV // H)
    bos = tl.load(chunk_bounds + 2 * i_c).to(tl.int64)
    n_rows = tl.load(chunk_bounds + 2 * i_c + 1) - tl.load(chunk_bounds + 2 * i_c)
    q_base = q + (bos * H + i_h) * K
    k_base = k + (bos * H + i_h) * K
    hk = (bos * HV + i_hv) * K  # g, dx, dqg, dkd, dq, dk, dg
    a_base = (bos * HV + i_hv) * BT
    s_base = (i_c * HV + i_hv).to(tl.int64) * BT * BT
    SQ: tl.constexpr = H * K
    SG: tl.constexpr = HV * K
    SA: tl.constexpr = HV * BT
    o_t = tl.arange(0, BT)
    m_t = o_t < n_rows
    b_beta = beta_rows(beta + bos * HV + i_hv, o_t, m_t, HV, USE_SIGMOID)
    if HAS_GATE:
        b_a = tl.exp(tl.load(A_log + i_hv).to(tl.float32))
    if USE_L2:
        b_nq, b_nk = qk_row_sumsq(q_base, k_base, o_t, m_t, SQ, K, BK)
        b_iq = 1.0 / tl.sqrt(b_nq + 1e-6)
        b_ik = 1.0 / tl.sqrt(b_nk + 1e-6)
    else:
        b_iq = tl.zeros([BT], dtype=tl.float32) + 1.0
        b_ik = tl.zeros([BT], dtype=tl.float32) + 1.0

    # Pass C (key blocks): everything per channel, then dGamma -> dg (reverse cumsum, gate).
    b_db = tl.zeros([BT], dtype=tl.float32)
    b_cq = tl.zeros([BT], dtype=tl.float32)  # sum_d y dy for the l2norm backward
    b_ck = tl.zeros([BT], dtype=tl.float32)
    b_dalog = tl.zeros([BK], dtype=tl.float32)
    # Pass R: the row sides of the pair sums (dq_r from dA_qk, dk_r from dP), parked in dq and dk. Apart
    # from pass C so that only half the products' operands are live at a time (the single pass spilled).
    for i_k in range(0, K, BK):
        o_k = i_k + tl.arange(0, BK)
        m_k = o_k < K
        m = m_t[:, None] & m_k[None, :]
        p_qk = o_t[:, None] * SQ + o_k[None, :]
        p_tk = hk + o_t[:, None] * SG + o_k[None, :]
        b_yk = tl.load(k_base + p_qk, mask=m, other=0.0).to(tl.float32) * b_ik[:, None]
        b_G = _intra._load_gamma(g + hk, A_log, dt_bias, lower_bound, o_t, m_t, o_k, m_k, i_hv, SG, K,
                                 HAS_GATE, HAS_BIAS, HAS_LB)
        b_Gl = tile_row(b_G, o_t, BT - 1)
        # the forward's fast path: a level-32 product across the halves, one anchor inside each half
        lo = o_t < BT // 2
        b_G1, b_G2, b_G3, span = half_anchors(b_G, b_Gl, o_t, BT)
        if span <= SAFE_SPAN:
            b_e, b_eq, b_ek = _fast_factors(b_G, b_G1, b_G2, b_G3, lo, SAFE_SPAN)
            b_kcc = tl.where(lo[:, None], b_yk * b_e, 0.0)
            b_kb = b_yk * b_ek
            b_dqr = (tl.where(lo[:, None], 0.0, b_e * tl.dot(_grad_tile(dA + a_base, SA, o_t, n_rows, True, False, 1),
                                                             b_kcc, input_precision=PREC))
                     + b_eq * tl.dot(_grad_tile(dA + a_base, SA, o_t, n_rows, True, False, 2), b_kb,
                                     input_precision=PREC))
            b_dkr = (tl.where(lo[:, None], 0.0, b_e * tl.dot(_grad_tile(dP + s_base, BT, o_t, n_rows, False, False, 1),
                                                             b_kcc, input_precision=PREC))
                     + b_eq * tl.dot(_grad_tile(dP + s_base, BT, o_t, n_rows, False, False, 2), b_kb,
                                     input_precision=PREC))
        else:
            # the diagonal of A_qk (factor 1) as a row term; the six levels, both factors <= 1
            b_dd = tl.load(dA + a_base + o_t * (SA + 1), mask=m_t, other=0.0)
            b_dqr = b_dd[:, None] * b_yk
            b_dkr = tl.zeros([BT, BK], dtype=tl.float32)
            for lvl in range(6):
                up, b_e, pair = level_factors(b_G, o_t, lvl, BT, BK)
                b_kc = tl.where(up[:, None], 0.0, b_yk * b_e)
                b_dqr += tl.where(up[:, None], b_e * tl.dot(_grad_tile(dA + a_base, SA, o_t, n_rows, False, False, 3, lvl),
                                                            b_kc, input_precision=PREC_EXACT), 0.0)
                b_dkr += tl.where(up[:, None], b_e * tl.dot(_grad_tile(dP + s_base, BT, o_t, n_rows, False, False, 3, lvl),
                                                            b_kc, input_precision=PREC_EXACT), 0.0)
        tl.store(dq + p_tk, b_dqr, mask=m)
        tl.store(dk + p_tk, b_dkr, mask=m)
    tl.debug_barrier()  # pass C reads back rows stored by other threads

    # Pass C: the column sides (dk_c from dA_qk^T and dP^T), then everything per channel.
    for i_k in range(0, K, BK):
        o_k = i_k + tl.arange(0, BK)
        m_k = o_k < K
        m = m_t[:, None] & m_k[None, :]
        p_qk = o_t[:, None] * SQ + o_k[None, :]
        p_tk = hk + o_t[:, None] * SG + o_k[None, :]
        b_yk = tl.load(k_base + p_qk, mask=m, other=0.0).to(tl.float32) * b_ik[:, None]
        b_q = tl.load(q_base + p_qk, mask=m, other=0.0).to(tl.float32) * b_iq[:, None] * scale
        b_G = _intra._load_gamma(g + hk, A_log, dt_bias, lower_bound, o_t, m_t, o_k, m_k, i_hv, SG, K,
                                 HAS_GATE, HAS_BIAS, HAS_LB)
        b_Gl = tile_row(b_G, o_t, BT - 1)
        lo = o_t < BT // 2
        b_G1, b_G2, b_G3, span = half_anchors(b_G, b_Gl, o_t, BT)
        if span <= SAFE_SPAN:
            b_e, b_eq, b_ek = _fast_factors(b_G, b_G1, b_G2, b_G3, lo, SAFE_SPAN)
            b_dkc = (tl.where(lo[:, None], b_e * tl.dot(_grad_tile(dA + a_base, SA, o_t, n_rows, True, True, 1),
                                                        tl.where(lo[:, None], 0.0, b_q * b_e), input_precision=PREC),
                              0.0)
                     + b_ek * tl.dot(_grad_tile(dA + a_base, SA, o_t, n_rows, True, True, 2), b_q * b_eq,
                                     input_precision=PREC))
            b_dkc += (tl.where(lo[:, None], b_e * tl.dot(_grad_tile(dP + s_base, BT, o_t, n_rows, False, True, 1),
                                                         tl.where(lo[:, None], 0.0, b_yk * b_e), input_precision=PREC),
                               0.0)
                      + b_ek * tl.dot(_grad_tile(dP + s_base, BT, o_t, n_rows, False, True, 2), b_yk * b_eq,
                                      input_precision=PREC))
        else:
            b_dkc = tl.load(dA + a_base + o_t * (SA + 1), mask=m_t, other=0.0)[:, None] * b_q
            for lvl in range(6):
                up, b_e, pair = level_factors(b_G, o_t, lvl, BT, BK)
                b_dkc += tl.where(up[:, None], 0.0, b_e * (
                    tl.dot(_grad_tile(dA + a_base, SA, o_t, n_rows, False, True, 3, lvl),
                           tl.where(up[:, None], b_q * b_e, 0.0), input_precision=PREC_EXACT)
                    + tl.dot(_grad_tile(dP + s_base, BT, o_t, n_rows, False, True, 3, lvl),
                             tl.where(up[:, None], b_yk * b_e, 0.0), input_precision=PREC_EXACT)))
        b_dqr = tl.load(dq + p_tk, mask=m, other=0.0)
        b_dkr = tl.load(dk + p_tk, mask=m, other=0.0)
        tl.debug_barrier()  # this block's dq / dk are rewritten below, possibly by other threads
        b_dq, b_dk, b_dG, b_dbr, b_dkk = _token_terms(b_q, b_yk, b_G, b_Gl, b_beta, b_dqr, b_dkr, b_dkc, dx, dqg, dkd,
                                                      p_tk, m)
        b_db += b_dbr
        b_dGl = b_dkk + tl.load(ddl + (i_c * HV + i_hv).to(tl.int64) * K + o_k, mask=m_k, other=0.0) * tl.exp(b_Gl)
        # Gamma = cumsum(g): dg_i = sum_{r >= i} dGamma_r, plus dGamma_last for every valid row
        b_dg = tl.where(m, tl.cumsum(b_dG, axis=0, reverse=True) + b_dGl[None, :], 0.0)
        if HAS_GATE:
            b_dx_raw, b_dal = _gate_backward(b_dg, g + p_tk, m, dt_bias + i_hv * K + o_k, m_k, b_a, lower_bound,
                                             HAS_BIAS, HAS_LB)
            b_dalog += b_dal
            tl.store(dg + p_tk, b_dx_raw.to(dg.dtype.element_ty), mask=m)
            if HAS_BIAS:
                tl.store(dbias_part + (i_c * HV + i_hv).to(tl.int64) * K + o_k, tl.sum(b_dx_raw, axis=0), mask=m_k)
        else:
            tl.store(dg + p_tk, b_dg.to(dg.dtype.element_ty), mask=m)
        # q = scale y: dy = scale dq; the l2norm backward needs sum_d y dy over all key blocks
        b_dyq = b_dq * scale
        b_cq += tl.sum(b_dq * b_q, axis=1)  # = sum_d dy * y
        b_ck += tl.sum(b_dk * b_yk, axis=1)
        tl.store(dq + p_tk, b_dyq, mask=m)
        tl.store(dk + p_tk, b_dk, mask=m)
    if HAS_GATE:
        tl.store(dalog_part + i_c * HV + i_hv, tl.sum(b_dalog, axis=0))
    _finish_rows(q_base, k_base, dq, dk, dbeta + (bos * HV + i_hv), hk, o_t, m_t, b_db, b_beta, b_iq, b_ik,
                 b_cq, b_ck, HV, SQ, SG, K, BK, USE_SIGMOID, USE_L2)


@triton.jit
def _rows16(x, r16, BT: tl.constexpr):
    """Rows r16 ([16] indices into 0..BT-1) of a [BT] vector, as [16] (a masked sum: no gather)."""
    o_t = tl.arange(0, BT)
    return tl.sum(tl.where(o_t[None, :] == r16[:, None], x[None, :], 0.0), axis=1)


@triton.jit
def kda_intra_bwd_block_kernel(
    q, k, g, beta, A_log, dt_bias, dx, dP, dqg, dkd, dA,
    dq, dk, dgam, dbeta, dkk_part, chunk_bounds,
    scale, lower_bound,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr,
    HAS_GATE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LB: tl.constexpr,
    USE_L2: tl.constexpr, USE_SIGMOID: tl.constexpr, PREC: tl.constexpr,
):
    """Launch 2 (one program per chunk, value head and 16-row block c): the pair-sum gradients of the
    block's rows (row sides) and columns (column sides), exactly and without a span test: every pair
    across blocks takes the anchor Gamma at the end of the block before the later one, so both factors
    are <= 1; pairs inside the block take one exponential each (CUDA cores, 16 steps). Then the
    per-token terms, dbeta and the l2norm backward of the block's rows; dGamma (before the in-chunk
    reverse cumsum) goes to dgam and the block's sum of dkd * kd to dkk_part, for the finishing launch.
    Tiles are [16, 64] / [16, 16] parts of dA_qk and dP, operands [16, BK] or [64, BK]."""
    i_c, i_hv, c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h = i_hv // (HV // H)
    bos = tl.load(chunk_bounds + 2 * i_c).to(tl.int64)
    n_rows = tl.load(chunk_bounds + 2 * i_c + 1) - tl.load(chunk_bounds + 2 * i_c)
    if c * 16 >= n_rows:
        return
    q_base = q + (bos * H + i_h) * K
    k_base = k + (bos * H + i_h) * K
    hk = (bos * HV + i_hv) * K  # g, dx, dqg, dkd, dq, dk, dgam
    a_base = dA + (bos * HV + i_hv) * BT
    p_base = dP + (i_c * HV + i_hv).to(tl.int64) * BT * BT
    SQ: tl.constexpr = H * K
    SG: tl.constexpr = HV * K
    SA: tl.constexpr = HV * BT
    o_t = tl.arange(0, BT)
    m_t = o_t < n_rows
    o16 = tl.arange(0, 16)
    r_c = c * 16 + o16  # the block's rows
    m_c = r_c < n_rows
    b_beta = beta_rows(beta + bos * HV + i_hv, r_c, m_c, HV, USE_SIGMOID)
    if USE_L2:
        b_nq, b_nk = qk_row_sumsq(q_base, k_base, o_t, m_t, SQ, K, BK)
        b_iq = 1.0 / tl.sqrt(b_nq + 1e-6)
        b_ik = 1.0 / tl.sqrt(b_nk + 1e-6)
    else:
        b_iq = tl.zeros([BT], dtype=tl.float32) + 1.0
        b_ik = tl.zeros([BT], dtype=tl.float32) + 1.0
    b_iq_c = _rows16(b_iq, r_c, BT)
    b_ik_c = _rows16(b_ik, r_c, BT)

    b_db = tl.zeros([16], dtype=tl.float32)
    b_cq = tl.zeros([16], dtype=tl.float32)  # sum_d y dy for the l2norm backward
    b_ck = tl.zeros([16], dtype=tl.float32)
    for i_k in range(0, K, BK):
        o_k = i_k + tl.arange(0, BK)
        m_k = o_k < K
        m = m_c[:, None] & m_k[None, :]
        p_ck = r_c[:, None] * SQ + o_k[None, :]
        p_tk = hk + r_c[:, None] * SG + o_k[None, :]
        b_G64 = _intra._load_gamma(g + hk, A_log, dt_bias, lower_bound, o_t, m_t, o_k, m_k, i_hv, SG, K,
                                   HAS_GATE, HAS_BIAS, HAS_LB)
        b_Pc = tile_row(b_G64, o_t, c * 16 - 1)  # Gamma before the block (0 at c = 0)
        b_Gl = tile_row(b_G64, o_t, BT - 1)
        # the block's rows of the same Gamma (a recomputed cumsum would round differently, and the
        # factors below take differences of the two)
        b_Gc = tl.gather(b_G64, tl.broadcast_to(r_c[:, None], [16, BK]), 0)
        b_yk = tl.load(k_base + p_ck, mask=m, other=0.0).to(tl.float32) * b_ik_c[:, None]
        b_q = tl.load(q_base + p_ck, mask=m, other=0.0).to(tl.float32) * b_iq_c[:, None] * scale

        # row sides, pairs with earlier blocks (j < 16c): anchor Gamma_{16c-1}
        b_eo = tl.exp(tl.minimum(b_Gc - b_Pc[None, :], 0.0))
        b_dqr = tl.zeros([16, BK], dtype=tl.float32)
        b_dkr = tl.zeros([16, BK], dtype=tl.float32)
        if c > 0:
            m_j = o_t < c * 16
            b_y64 = tl.load(k_base + o_t[:, None] * SQ + o_k[None, :], mask=m_j[:, None] & m_k[None, :],
                            other=0.0).to(tl.float32) * b_ik[:, None]
            b_kx = tl.where(m_j[:, None], b_y64 * tl.exp(tl.minimum(b_Pc[None, :] - b_G64, 0.0)), 0.0)
            m_tile = m_c[:, None] & (o_t[None, :] < c * 16)
            b_tA = tl.load(a_base + r_c[:, None] * SA + o_t[None, :], mask=m_tile, other=0.0)
            b_tP = tl.load(p_base + r_c[:, None] * BT + o_t[None, :], mask=m_tile, other=0.0)
            b_dqr += b_eo * tl.dot(b_tA, b_kx, input_precision=PREC)
            b_dkr += b_eo * tl.dot(b_tP, b_kx, input_precision=PREC)

        # column sides, pairs with later blocks a > c: anchor Gamma_{16a-1}
        b_dkc = tl.zeros([16, BK], dtype=tl.float32)
        for a in tl.static_range(1, 4):
            if a > c:
                r_a = a * 16 + o16
                m_a = r_a < n_rows
                ma = m_a[:, None] & m_k[None, :]
                b_Pa = tile_row(b_G64, o_t, a * 16 - 1)
                b_Ga = tl.gather(b_G64, tl.broadcast_to(r_a[:, None], [16, BK]), 0)
                b_ea = tl.exp(tl.minimum(b_Ga - b_Pa[None, :], 0.0))
                b_xq = tl.load(q_base + r_a[:, None] * SQ + o_k[None, :], mask=ma, other=0.0).to(tl.float32) \
                    * (_rows16(b_iq, r_a, BT) * scale)[:, None] * b_ea
                b_xk = tl.load(k_base + r_a[:, None] * SQ + o_k[None, :], mask=ma, other=0.0).to(tl.float32) \
                    * _rows16(b_ik, r_a, BT)[:, None] * b_ea
                # transposed [16 (j in c), 16 (i in a)] parts of the gradient tiles
                m_tt = m_a[None, :] & m_c[:, None]
                b_tAT = tl.load(a_base + r_a[None, :] * SA + r_c[:, None], mask=m_tt, other=0.0)
                b_tPT = tl.load(p_base + r_a[None, :] * BT + r_c[:, None], mask=m_tt, other=0.0)
                b_dkc += tl.exp(tl.minimum(b_Pa[None, :] - b_Gc, 0.0)) * (
                    tl.dot(b_tAT, b_xq, input_precision=PREC) + tl.dot(b_tPT, b_xk, input_precision=PREC))

        # pairs inside the block (j <= i for A_qk, j < i for P), one column j at a time
        for jj in tl.static_range(16):
            sel = o16[:, None] == jj
            b_Gj = tl.sum(tl.where(sel, b_Gc, 0.0), axis=0)
            b_yj = tl.sum(tl.where(sel, b_yk, 0.0), axis=0)
            b_e = tl.exp(tl.minimum(b_Gc - b_Gj[None, :], 0.0))
            b_ac = tl.load(a_base + r_c * SA + c * 16 + jj, mask=m_c & (o16 >= jj), other=0.0)
            b_pc = tl.load(p_base + r_c * BT + c * 16 + jj, mask=m_c & (o16 > jj), other=0.0)
            b_dqr += b_ac[:, None] * b_e * b_yj[None, :]
            b_dkr += b_pc[:, None] * b_e * b_yj[None, :]
            b_cj = tl.sum((b_ac[:, None] * b_q + b_pc[:, None] * b_yk) * b_e, axis=0)
            b_dkc += tl.where(sel, b_cj[None, :], 0.0)

        b_dq, b_dk, b_dG, b_dbr, b_dkk = _token_terms(b_q, b_yk, b_Gc, b_Gl, b_beta, b_dqr, b_dkr, b_dkc, dx, dqg,
                                                      dkd, p_tk, m)
        b_db += b_dbr
        tl.store(dgam + p_tk, tl.where(m, b_dG, 0.0), mask=m)
        tl.store(dkk_part + ((i_c * HV + i_hv) * 4 + c).to(tl.int64) * K + o_k, b_dkk,
                 mask=m_k)
        b_cq += tl.sum(b_dq * b_q, axis=1)  # = sum_d dy * y for q = scale y
        b_ck += tl.sum(b_dk * b_yk, axis=1)
        tl.store(dq + p_tk, b_dq * scale, mask=m)
        tl.store(dk + p_tk, b_dk, mask=m)
    _finish_rows(q_base, k_base, dq, dk, dbeta + (bos * HV + i_hv), hk, r_c, m_c, b_db, b_beta, b_iq_c, b_ik_c,
                 b_cq, b_ck, HV, SQ, SG, K, BK, USE_SIGMOID, USE_L2)


@triton.jit
def kda_intra_bwd_gate_kernel(
    g, A_log, dt_bias, dgam, dkk_part, ddl, dbias_part, dalog_part, chunk_bounds,
    lower_bound,
    HV: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr,
    HAS_GATE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LB: tl.constexpr,
):
    """Launch 3 (one program per chunk and value head): dGamma -> dg. Gamma = cumsum(g), so dg_i =
    sum_{r >= i} dGamma_r + dGamma_last (= sum of the blocks' dkd * kd + ddl exp(Gamma_last)), then
    the gate backward (raw gate, A_log, dt_bias). Writes dg over dgam."""
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    bos = tl.load(chunk_bounds + 2 * i_c).to(tl.int64)
    n_rows = tl.load(chunk_bounds + 2 * i_c + 1) - tl.load(chunk_bounds + 2 * i_c)
    hk = (bos * HV + i_hv) * K
    SG: tl.constexpr = HV * K
    o_t = tl.arange(0, BT)
    m_t = o_t < n_rows
    if HAS_GATE:
        b_a = tl.exp(tl.load(A_log + i_hv).to(tl.float32))
    b_dalog = tl.zeros([BK], dtype=tl.float32)
    for i_k in range(0, K, BK):
        o_k = i_k + tl.arange(0, BK)
        m_k = o_k < K
        m = m_t[:, None] & m_k[None, :]
        p_tk = hk + o_t[:, None] * SG + o_k[None, :]
        b_G = _intra._load_gamma(g + hk, A_log, dt_bias, lower_bound, o_t, m_t, o_k, m_k, i_hv, SG, K,
                                 HAS_GATE, HAS_BIAS, HAS_LB)
        b_Gl = tile_row(b_G, o_t, BT - 1)
        p_part = dkk_part + ((i_c * HV + i_hv) * 4).to(tl.int64) * K + o_k
        b_dGl = (tl.load(p_part, mask=m_k, other=0.0) + tl.load(p_part + K, mask=m_k & (n_rows > 16), other=0.0)
                 + tl.load(p_part + 2 * K, mask=m_k & (n_rows > 32), other=0.0)
                 + tl.load(p_part + 3 * K, mask=m_k & (n_rows > 48), other=0.0)
                 + tl.load(ddl + (i_c * HV + i_hv).to(tl.int64) * K + o_k, mask=m_k, other=0.0) * tl.exp(b_Gl))
        b_dG = tl.load(dgam + p_tk, mask=m, other=0.0)
        tl.debug_barrier()  # dg is written over dgam below, possibly by other threads
        b_dg = tl.where(m, tl.cumsum(b_dG, axis=0, reverse=True) + b_dGl[None, :], 0.0)
        if HAS_GATE:
            b_dxr, b_dal = _gate_backward(b_dg, g + p_tk, m, dt_bias + i_hv * K + o_k, m_k, b_a, lower_bound,
                                          HAS_BIAS, HAS_LB)
            b_dalog += b_dal
            tl.store(dgam + p_tk, b_dxr, mask=m)
            if HAS_BIAS:
                tl.store(dbias_part + (i_c * HV + i_hv).to(tl.int64) * K + o_k, tl.sum(b_dxr, axis=0), mask=m_k)
        else:
            tl.store(dgam + p_tk, b_dg, mask=m)
    if HAS_GATE:
        tl.store(dalog_part + i_c * HV + i_hv, tl.sum(b_dalog, axis=0))


def intra_bwd_dkk(
    v: torch.Tensor,
    beta: torch.Tensor,
    chunk_bounds: torch.Tensor,
    st: dict[str, torch.Tensor],
    gr: dict[str, torch.Tensor],
    *,
    use_beta_sigmoid: bool,
    block_k: int = DKK_BLOCK_K,
    num_warps: int = DKK_NUM_WARPS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch 1 of the intra backward alone (the benchmark times it apart) -> dv ``[TT, HV, V]``,
    dX = M^T dw ``[TT, HV, K]``, dP ``[NC, HV, 64, 64]`` and the partial dbeta ``[TT, HV]``, all fp32."""
    TT, HV, V = v.shape
    K = gr["dw"].shape[-1]
    NC = chunk_bounds.shape[0]
    dev, f32 = v.device, torch.float32
    dv = torch.empty(TT, HV, V, device=dev, dtype=f32)
    dx = torch.empty(TT, HV, K, device=dev, dtype=f32)
    dP = torch.empty(NC, HV, 64, 64, device=dev, dtype=f32)
    dbeta = torch.empty(TT, HV, device=dev, dtype=f32)
    kda_intra_bwd_dkk_kernel[(NC, HV)](
        v, beta, st["w"], st["u"], st["M"], st["P"], gr["du"], gr["dw"],
        dv, dx, dP, dbeta, chunk_bounds,
        HV=HV, K=K, V=V, BK=min(block_k, next_pow2(K)), BV=min(64, next_pow2(V)), BT=64,
        USE_SIGMOID=use_beta_sigmoid, PREC="ieee" if INTERPRET else DKK_PRECISION,
        num_warps=num_warps, num_stages=1,
    )
    return dv, dx, dP, dbeta


def kda_intra_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    chunk_bounds: torch.Tensor,
    st: dict[str, torch.Tensor],
    gr: dict[str, torch.Tensor],
    *,
    scale: float,
    A_log: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    lower_bound: float | None,
    use_qk_l2norm: bool,
    use_beta_sigmoid: bool,
    block_k: int = BLOCK_K,
    num_warps: int = NUM_WARPS,
    dkk_block_k: int = DKK_BLOCK_K,
    dkk_num_warps: int = DKK_NUM_WARPS,
    safe_span: float | None = None,
) -> dict[str, torch.Tensor | None]:
    """Flattened inputs as in ``kda_intra_fwd``; st: its outputs (w, u, M, P); gr: the stage-3
    gradients (du, dqg, dw, dkd: fp32 token tensors, dA ``[TT, HV, 64]``, ddl ``[NC, HV, K]``).
    block_k / num_warps: the pair-sum launch; dkk_block_k / dkk_num_warps: the dA_kk launch.

    Returns dq, dk ``[TT, H, K]`` fp32 (grouped value heads summed), dv ``[TT, HV, V]`` fp32, dg
    ``[TT, HV, K]`` fp32 (of the raw gate when A_log is given), dbeta ``[TT, HV]`` fp32, dA_log
    ``[HV]`` and ddt_bias ``[HV * K]`` fp32 (or None)."""
    TT, H, K = q.shape
    HV = v.shape[-2]
    NC = chunk_bounds.shape[0]
    dev, f32 = q.device, torch.float32
    dv, dx, dP, dbeta = intra_bwd_dkk(v, beta, chunk_bounds, st, gr, use_beta_sigmoid=use_beta_sigmoid,
                                      block_k=dkk_block_k, num_warps=dkk_num_warps)
    dq = torch.empty(TT, HV, K, device=dev, dtype=f32)
    dk = torch.empty(TT, HV, K, device=dev, dtype=f32)
    dg = torch.empty(TT, HV, K, device=dev, dtype=f32)
    has_gate = A_log is not None
    has_bias = has_gate and dt_bias is not None
    dbias_part = torch.empty(NC, HV, K, device=dev, dtype=f32) if has_bias else dq
    dalog_part = torch.empty(NC, HV, device=dev, dtype=f32) if has_gate else dq
    gate_kw = dict(HAS_GATE=has_gate, HAS_BIAS=has_bias, HAS_LB=has_gate and lower_bound is not None)
    A_log_arg = A_log if has_gate else g
    bias_arg = dt_bias if dt_bias is not None else g
    lb = float(lower_bound) if lower_bound is not None else 0.0
    if PAIR_LAUNCH == "block":
        dkk_part = torch.empty(NC, HV, 4, K, device=dev, dtype=f32)
        kda_intra_bwd_block_kernel[(NC, HV, 4)](
            q, k, g, beta, A_log_arg, bias_arg, dx, dP, gr["dqg"], gr["dkd"], gr["dA"],
            dq, dk, dg, dbeta, dkk_part, chunk_bounds, float(scale), lb,
            H=H, HV=HV, K=K, BK=min(BLOCK_BLOCK_K, next_pow2(K)), BT=64, **gate_kw,
            USE_L2=use_qk_l2norm, USE_SIGMOID=use_beta_sigmoid, PREC="ieee" if INTERPRET else BLOCK_PRECISION,
            num_warps=BLOCK_NUM_WARPS, num_stages=1,
            **({"maxnreg": BLOCK_MAX_REGISTERS} if BLOCK_MAX_REGISTERS and not INTERPRET else {}),
        )
        kda_intra_bwd_gate_kernel[(NC, HV)](
            g, A_log_arg, bias_arg, dg, dkk_part, gr["ddl"], dbias_part, dalog_part, chunk_bounds, lb,
            HV=HV, K=K, BK=min(64, next_pow2(K)), BT=64, **gate_kw, num_warps=4, num_stages=1,
        )
    else:
        kda_intra_bwd_pair_kernel[(NC, HV)](
            q, k, g, beta, A_log if has_gate else g, dt_bias if dt_bias is not None else g,
            dx, dP, gr["dqg"], gr["dkd"], gr["dA"], gr["ddl"],
            dq, dk, dg, dbeta, dbias_part, dalog_part, chunk_bounds,
            float(scale), float(lower_bound) if lower_bound is not None else 0.0,
            H=H, HV=HV, K=K, BK=min(block_k, next_pow2(K)), BT=64,
            HAS_GATE=has_gate, HAS_BIAS=has_bias, HAS_LB=has_gate and lower_bound is not None,
            USE_L2=use_qk_l2norm, USE_SIGMOID=use_beta_sigmoid, PREC="ieee" if INTERPRET else FAST_PRECISION,
            PREC_EXACT="ieee" if INTERPRET else EXACT_PRECISION,
            SAFE_SPAN=_intra.SAFE_SPAN if safe_span is None else safe_span,
            num_warps=num_warps, num_stages=1,
        )
    if HV != H:
        dq = dq.view(TT, H, HV // H, K).sum(2)
        dk = dk.view(TT, H, HV // H, K).sum(2)
    return dict(dq=dq, dk=dk, dv=dv, dg=dg, dbeta=dbeta,
                dA_log=dalog_part.sum(0) if has_gate else None,
                ddt_bias=dbias_part.sum(0).reshape(-1) if has_bias else None)
