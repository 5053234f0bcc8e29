"""Backward of stage 1 (intra.py): from the gradients of w, u, qg, kd, A_qk and exp(Gamma_last) to
those of q, k, v, the raw gate (and A_log, dt_bias) and beta, in three launches:

1. kda_intra_bwd_dkk_kernel (one program per chunk and value head): dX, d(beta v), dv, dA_kk; writes
   dX, dP and a partial dbeta.
2. kda_intra_bwd_block_kernel (one program per chunk, value head and 16-row block): the pair-sum
   gradients, the per-token terms, dbeta and the l2norm backward of the block's rows. It reads Gamma
   and the rows' inverse norms that the backward's stage-1 recompute stored (``store_gamma``), so
   any row is one load away. Pairs across blocks take the anchor Gamma at the block boundary, both
   factors <= 1 for every gate (no span test, no exponent split: exact where the forward needs its
   exact launch), one other 16-row block at a time; pairs inside a block are four [16, 16] x [16, BK]
   bf16x3 products (IN_BLOCK_PRECISION) about the block's row 7 where no |Gamma_i - Gamma_7| exceeds
   IN_BLOCK_SPAN (else 16 steps on CUDA cores in fp32, one exponential each).
3. kda_intra_bwd_gate_kernel (one program per chunk, value head and key block): the in-chunk reverse
   cumsum of dGamma and the gate backward (raw gate, A_log, dt_bias).

With X = diag(beta) k exp(Gamma), w = M X, u = M diag(beta) v and M = (I + diag(beta) P)^-1:

    dX = M^T dw,  d(beta v) = M^T du
    dA_kk = -(dX w^T + d(beta v) u^T), strictly lower        (the inverse's gradient, M never inverted again)
    dP = diag(beta) dA_kk,  dbeta_i += sum_j dA_kk[i, j] P[i, j]

The pair sums A[i, j] = sum_d x_id y_jd exp(Gamma_id - Gamma_jd) (x, y = q, k for A_qk; k, k for P)
have gradients of the same form, dx = (dA * E) y and dy = (dA * E)^T x per channel, and
dGamma = x dx - y dy. dGamma then goes through the in-chunk cumsum (a reverse cumsum), the gate, the
l2norm and the beta sigmoid, all fused. dq and dk are written per value head; the caller sums
grouped heads.

All products take fp32 operands: tf32 on the GPU in the dA_kk launch, bf16x3 (each operand as bf16 hi + lo,
three bf16 products, ~16 mantissa bits) for the block launch's pair sums (BLOCK_PRECISION, IN_BLOCK_PRECISION).
dGamma = x dx - y dy is a difference of terms larger than itself: with bf16 operands the H200 check gave dg
errors of 2e-2 and 4e-1 at T=1024 (session 2's exponent-split launch), against 3e-3 and 4e-4 with fp32
operands; and dA_log / ddt_bias sum dGamma over every token with cancellation on top (see BLOCK_PRECISION).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hla.ops.kda.triton.common import (
    INTERPRET,
    beta_rows,
    exp_ftz,
    kda_gate_f32_and_grads,
    next_pow2,
    reg_cap,
)

# Launch settings, read at each call, timed on the H200 (B1 T8192 H32 D128, benchmark Kimi gate,
# 2026-11-26, benchmarks/kda_notes.md session 4; launches 1-3 together): block BK 128 / 8 warps /
# 128 registers 3.27 ms, BK 32 / 4 warps / 128 registers 3.62 ms (no cap 4.71), BK 64 / 4 / 128 3.65;
# session 3's one-program-per-chunk exponent-split launch took 5.64 ms in the same run. tf32 products
# (tf32x3: +0.5 ms, dA_log 3e-3 closer to an all-tf32x3 run). Launch 1 alone: 0.43 ms. Session 5 (in-block
# accumulators apart from the products' layout, next row prefetched): 2.81 ms at BK 128 / 8 / 128, against
# BK 32 / 4 / 128 3.39, BK 64 / 4 / 128 3.91, BK 64 / 8 / 128 3.53, BK 128 / 8 / no cap 3.27. With the 16-bit
# gradients written by the kernels (no fp32 copy + cast): 2.53. Gate launch: BK 32 / 4 warps 2.49, BK 64 / 4
# 2.53, BK 64 / 8 2.69; the reverse cumsum as a triangular tf32x3 product instead of tl.cumsum: +0.03-0.06.
DKK_PRECISION = "tf32"
# dA_kk launch (session 8, H200, B1 T8192 H32 D128): BK 32 / 2 warps 0.338 ms, 32 / 4 0.347, 64 / 4 0.387,
# 16 / 4 0.400, 32 / 8 and 64 / 8 slower still.
# Session 10, two runs: 4 warps 0.346, 4 warps capped at 168 0.346 and at 128 0.333 (300 B of spills), 2 warps
# capped at 168 0.548, against 0.336 for 2 warps uncapped (255 registers, 596 B of spills offline).
DKK_BLOCK_K, DKK_NUM_WARPS = 32, 2
DKK_MAX_REGISTERS = None
# Session 13 (two runs, bounded gate): its two block loops software-pipelined at 2 stages 0.337 / 0.337 ->
# 0.311 / 0.312 ms, at 3 stages 0.456 / 0.457; at 2 stages, 4 warps 0.457 / 0.454, BK 64 0.325 / 0.325, BK 16
# 0.372 / 0.370.
DKK_STAGES = 2
# The block launch's pairs with the other 16-row blocks (``_other_rows``). Session 14 (H200): with "tf32" the
# summed gate gradients failed on very negative gates, six fresh draws of check_kda_gpu.py's T2048 veryneg case:
# dA_log 1.6e-2 / 3.4e-2 / 5.0e-3 / 2.4e-3 / 5.8e-2 / 6.2e-2, ddt_bias up to 1.4e-2 (limit 1e-2; every per-token
# gradient <= 4.9e-3); "bf16x3" 9.0e-4 / 1.9e-2 / 2.0e-3 / 6.7e-4 / 2.0e-3 / 5.1e-3, ddt_bias <= 2.8e-3 ("tf32x3"
# the same to two digits). Over those draws of the check's five backward cases 10 values failed with tf32, 5 with
# bf16x3 (the others are the state path's, see results/kda_kernels.md). Cost, fwd+bwd B1 T8192 H32 D128, two runs:
# bounded gate 3.492 / 3.495 -> 3.528 / 3.527 ms (tf32x3 3.585 / 3.593), Kimi 3.568 / 3.568 -> 3.604 / 3.599, B4
# 13.72 / 13.75 -> 13.89 / 13.86 (tf32x3 14.10); offline 292 B of spills against 192 (tf32x3 324).
BLOCK_PRECISION = "bf16x3"
# The in-block pairs as anchored products where max |Gamma_i - Gamma_anchor| over the 16-row block and
# key block is <= IN_BLOCK_SPAN, else 16 CUDA-core steps (tests set -1 to force the steps). Unlike the
# forward's half-anchor products, masked pairs here multiply zeros of dA_qk / dP loaded as such, so no
# product holds exp(2 span): the largest operand is exp(span) |x| and a sum of 16 of them, 1e26 * 16 |dA x|
# at 60, far from fp32's 3e38. At the benchmark's Kimi gate 9.4% of blocks exceed 40, 0.5% exceed 60
# (float64 count, T 2048 H 32). H200, B1 T8192 H32 D128 Kimi gate, the three launches (session 7): steps
# everywhere 2.49 ms, products to span 40 2.20, to span 60 2.12; tf32 instead of tf32x3 2.14 at span 40
# but K = V = 64 dA_log 1.3e-2 in check_kda_gpu.py (tf32x3: 2.1e-3): these are the closest pairs (largest
# decay factors) and dGamma = x dx - y dy cancels (see the module docstring).
# Session 8: Triton 3.6's bf16x3 (each fp32 operand as two bf16 parts, three bf16 products: ~16 mantissa
# bits, bf16 products at twice the tf32 rate, half the operand registers) 1.92 ms against tf32x3's 2.04
# (bf16x6, ~24 bits: 2.00); check_kda_gpu.py: K = V = 64 dA_log 1.96e-3 (tf32x3 2.1e-3), every other value
# within 1e-4 of the tf32x3 run, the known varlen near0 dA_log (1.85e-2) the only failure. Offline spills
# 440 / 356 -> 352 / 256 B. The cross-block products as bf16x3 instead of tf32 spill twice as much (836 /
# 764 B).
IN_BLOCK_PRECISION = "bf16x3"
IN_BLOCK_SPAN = 60.0
# Session 8: the block launch at 16 warps (128 registers, no spills, one program per SM) 2.69 ms against
# 2.06; uncapped (248 registers) 2.31, capped at 168 2.51; its earlier / later rows in tiles of the rows
# that exist (16 / 32 / 64 instead of 64) 2.04 against 2.01-2.04 (more spills): not taken.
# Session 12 (the other blocks' rows one 16-row block at a time, ``_other_rows``; same-run, intra backward's three
# launches, bounded gate, two runs): 8 warps / 128 registers 1.797 / 1.798 ms (212 B spills), 4 warps uncapped
# 1.609 / 1.606 (255 registers, 156 B spills, 2 programs per SM), 4 / 224 1.762 / 1.755, BK 64 at 4 warps 2.232 /
# 2.233, at 4 / 168 2.350 / 2.353, at 2 warps 2.148 / 2.149; the [64, BK] tiles before: 1.883 / 1.879 at 8 / 128.
# Session 13 (the three launches, same-run pairs, bounded gate; Kimi within 0.02 ms): the block launch's loops over
# the other 16-row blocks software-pipelined, each block's loads issued while the previous one's products run, at
# 2 stages 1.628 / 1.630 -> 1.546 / 1.546 ms, at 3 stages 1.603 / 1.603 -> 1.514 / 1.519 (offline: 192 B of spills,
# 54 KB of shared memory, still 2 programs per SM), 4 stages 1.542 / 1.537; 8 warps / 128 registers at 2 or 3
# stages 1.67-1.68, 4 warps at 3 stages capped at 224 1.62.
BLOCK_K, NUM_WARPS, MAX_REGISTERS = 128, 4, None
BLOCK_STAGES = 3
# Gate launch, one program per (chunk, head, key block) since session 8 (a loop over key blocks before:
# 141 registers, 3 programs per SM): the three launches 2.126 -> 2.062 ms; BK 16 / 2 warps 2.074, 32 / 2
# 2.067, 64 / 4 2.110. Session 10 (the three launches, two runs each): 32 / 2 1.887 / 1.894 against 32 / 4
# 1.913 / 1.915 (taken: 128 registers, 8 programs per SM), 32 / 2 capped at 96 1.882 / 1.890, 32 / 4 at 64
# 1.954; then, with 32 / 2 as the reference at 1.920: 32 / 1 1.942, 64 / 2 1.951, 16 / 1 1.948, 64 / 4 1.971.
GATE_BLOCK_K, GATE_NUM_WARPS = 32, 2
GATE_MAX_REGISTERS = None


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
    b_eG = exp_ftz(b_G)
    b_ed = exp_ftz(tl.minimum(b_Gl[None, :] - b_G, 0.0))
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
def _l2norm_bwd(b_dy, b_y, b_c, b_inv):
    """Gradient of rows x [R, BK] through y = x / |x|, from dy, y, c = sum_d y dy ([R]) and 1 / |x| ([R])."""
    return (b_dy - b_y * b_c[:, None]) * b_inv[:, None]


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
            tl.store(dq + p_tk, _l2norm_bwd(b_dyq, b_yq, b_cq, b_iq), mask=m)
            tl.store(dk + p_tk, _l2norm_bwd(b_dyk, b_yk, b_ck, b_ik), mask=m)


@triton.jit
def _step_loads(g_base, k_base, q_base, n_base, a_base, p_base, r_c, m_c, o16, o_k, m_k, c, t, n_rows, scale,
                HV: tl.constexpr, SQ: tl.constexpr, SG: tl.constexpr, SA: tl.constexpr, BT: tl.constexpr):
    """Row t of block c (Gamma, k and q scaled by their inverse norms, [BK] each) and the four [16]
    slices of dA_qk / dP that in-block step t reads; all zero for t = 16 (the prefetch past the end)."""
    r_t = c * 16 + t
    m_t = (r_t < n_rows) & (t < 16)
    mk_t = m_k & m_t
    b_Gt = tl.load(g_base + r_t * SG + o_k, mask=mk_t, other=0.0)
    b_kt = tl.load(k_base + r_t * SQ + o_k, mask=mk_t, other=0.0).to(tl.float32) \
        * tl.load(n_base + r_t * (2 * HV) + 1, mask=m_t, other=0.0)
    b_qt = tl.load(q_base + r_t * SQ + o_k, mask=mk_t, other=0.0).to(tl.float32) \
        * (tl.load(n_base + r_t * (2 * HV), mask=m_t, other=0.0) * scale)
    b_ac = tl.load(a_base + r_c * SA + r_t, mask=m_c & (o16 >= t) & m_t, other=0.0)
    b_pc = tl.load(p_base + r_c * BT + r_t, mask=m_c & (o16 > t) & m_t, other=0.0)
    b_ar = tl.load(a_base + r_t * SA + r_c, mask=m_t & (o16 <= t), other=0.0)
    b_pr = tl.load(p_base + r_t * BT + r_c, mask=m_t & (o16 < t), other=0.0)
    return b_Gt, b_kt, b_qt, b_ac, b_pc, b_ar, b_pr


@triton.jit
def _step_math(b_Gc, b_Gt, b_kt, b_qt, b_ac, b_pc, b_ar, b_pr, b_dqr, b_dkr, b_dkc):
    """One in-block step: exp(-|G_i - G_t|) <= 1 both ways, then the row sides' column t and the
    column side's row t."""
    b_E = exp_ftz(-tl.abs(b_Gc - b_Gt[None, :]))
    b_dqr += b_ac[:, None] * b_E * b_kt[None, :]
    b_dkr += b_pc[:, None] * b_E * b_kt[None, :]
    b_dkc += (b_ar[:, None] * b_qt[None, :] + b_pr[:, None] * b_kt[None, :]) * b_E
    return b_dqr, b_dkr, b_dkc


@triton.jit
def _in_block_products(a_base, p_base, r_c, m_c, o16, m, b_Gc, b_Ga, b_q, b_yk, SA: tl.constexpr, BT: tl.constexpr,
                       IN_SPAN: tl.constexpr, IN_PREC: tl.constexpr):
    """The in-block pairs as [16, 16] x [16, BK] products about one anchor row a of the block (when no
    |Gamma_i - Gamma_a| over the block exceeds IN_SPAN): exp(G_i - G_t) = exp(G_i - G_a) exp(G_a - G_t)
    with both factors <= exp(IN_SPAN), exact up to rounding; masked pairs multiply a zero entry of
    dA_qk / dP. Same sums as the 16 steps of ``_step_math`` -> (dq_r, dk_r, dk_c) parts [16, BK]."""
    b_up = tl.where(m, exp_ftz(tl.minimum(b_Gc - b_Ga[None, :], IN_SPAN)), 0.0)  # exp(G_i - G_a)
    b_dn = tl.where(m, exp_ftz(tl.minimum(b_Ga[None, :] - b_Gc, IN_SPAN)), 0.0)  # exp(G_a - G_i)
    m2 = m_c[:, None] & m_c[None, :]
    p_blk = r_c[:, None] * SA + r_c[None, :]
    b_A = tl.load(a_base + p_blk, mask=m2 & (o16[:, None] >= o16[None, :]), other=0.0)  # dA_qk[i, t], t <= i
    b_P = tl.load(p_base + r_c[:, None] * BT + r_c[None, :], mask=m2 & (o16[:, None] > o16[None, :]), other=0.0)
    b_kdn = b_yk * b_dn
    i_dqr = b_up * tl.dot(b_A, b_kdn, input_precision=IN_PREC)
    i_dkr = b_up * tl.dot(b_P, b_kdn, input_precision=IN_PREC)
    i_dkc = b_dn * (tl.dot(tl.trans(b_A), b_q * b_up, input_precision=IN_PREC)
                    + tl.dot(tl.trans(b_P), b_yk * b_up, input_precision=IN_PREC))
    return i_dqr, i_dkr, i_dkc


@triton.jit
def _other_rows(g_base, k_base, q_base, n_base, a_base, p_base, r_c, m_c, o16, o_k, m_k, c, n_rows, b_Gc, scale,
                HV: tl.constexpr, SQ: tl.constexpr, SG: tl.constexpr, SA: tl.constexpr, BT: tl.constexpr,
                PREC: tl.constexpr):
    """The pair sums of block c's rows (row sides) and columns (column side) with the other blocks, one other
    16-row block at a time: [16, BK] tiles and [16, 16] x [16, BK] products (PREC), accumulated over the blocks.
    Earlier rows j < 16c take the anchor a = 16c - 1, later rows i >= 16c + 16 the anchor a = 16c + 15; both
    factors exp(G_i - G_a), exp(G_a - G_j) are <= 1 for every gate. -> (dq_r, dk_r, dk_c), [16, BK] fp32 each.

    Until session 12 these were one [64, BK] tile of all earlier rows and one of all later rows: 5/8 of their rows
    masked on average, and at 8 warps / 128 registers the tiles spilled 352 B a thread (ncu: 14.5 M spill requests,
    long-scoreboard stalls 29% of the samples). One block at a time they take 16 registers each at 4 warps."""
    acc_q = tl.zeros(b_Gc.shape, dtype=tl.float32)
    acc_k = tl.zeros(b_Gc.shape, dtype=tl.float32)
    acc_c = tl.zeros(b_Gc.shape, dtype=tl.float32)
    # earlier rows j < 16c, anchor a = 16c - 1: exp(G_i - G_a) <= 1 outside, exp(G_a - G_j) <= 1 inside
    b_Ga = tl.load(g_base + (c * 16 - 1) * SG + o_k, mask=m_k & (c > 0), other=0.0)
    for e in range(0, c):
        r_e = e * 16 + o16
        b_Ge = tl.load(g_base + r_e[:, None] * SG + o_k[None, :], mask=m_k[None, :], other=0.0)
        b_ke = tl.load(k_base + r_e[:, None] * SQ + o_k[None, :], mask=m_k[None, :], other=0.0).to(tl.float32) \
            * (tl.load(n_base + r_e * (2 * HV) + 1)[:, None] * exp_ftz(tl.minimum(b_Ga[None, :] - b_Ge, 0.0)))
        b_tA = tl.load(a_base + r_c[:, None] * SA + r_e[None, :], mask=m_c[:, None], other=0.0)
        b_tP = tl.load(p_base + r_c[:, None] * BT + r_e[None, :], mask=m_c[:, None], other=0.0)
        acc_q = tl.dot(b_tA, b_ke, acc_q, input_precision=PREC)
        acc_k = tl.dot(b_tP, b_ke, acc_k, input_precision=PREC)
    b_eo = exp_ftz(tl.minimum(b_Gc - b_Ga[None, :], 0.0))
    # later rows i >= 16c + 16, anchor a = 16c + 15, transposed entries [j in the block, i later]
    b_Ga = tl.load(g_base + tl.minimum(c * 16 + 15, n_rows - 1) * SG + o_k, mask=m_k, other=0.0)
    for l in range(c + 1, tl.cdiv(n_rows, 16)):
        r_l = l * 16 + o16
        m_l = r_l < n_rows
        ml = m_l[:, None] & m_k[None, :]
        b_Gl = tl.load(g_base + r_l[:, None] * SG + o_k[None, :], mask=ml, other=0.0)
        b_ea = tl.where(ml, exp_ftz(tl.minimum(b_Gl - b_Ga[None, :], 0.0)), 0.0)
        b_xq = tl.load(q_base + r_l[:, None] * SQ + o_k[None, :], mask=ml, other=0.0).to(tl.float32) \
            * ((tl.load(n_base + r_l * (2 * HV), mask=m_l, other=0.0) * scale)[:, None] * b_ea)
        b_xk = tl.load(k_base + r_l[:, None] * SQ + o_k[None, :], mask=ml, other=0.0).to(tl.float32) \
            * (tl.load(n_base + r_l * (2 * HV) + 1, mask=m_l, other=0.0)[:, None] * b_ea)
        b_tAT = tl.load(a_base + r_l[None, :] * SA + r_c[:, None], mask=m_l[None, :], other=0.0)
        b_tPT = tl.load(p_base + r_l[None, :] * BT + r_c[:, None], mask=m_l[None, :], other=0.0)
        acc_c = tl.dot(b_tPT, b_xk, tl.dot(b_tAT, b_xq, acc_c, input_precision=PREC), input_precision=PREC)
    return b_eo * acc_q, b_eo * acc_k, exp_ftz(tl.minimum(b_Ga[None, :] - b_Gc, 0.0)) * acc_c


@triton.jit
def kda_intra_bwd_block_kernel(
    q, k, gam, inorm, beta, dx, dP, dqg, dkd, dA,
    dq, dk, dgam, dbeta, dkk_part, chunk_bounds,
    scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr,
    USE_L2: tl.constexpr, USE_SIGMOID: tl.constexpr, PREC: tl.constexpr, ONE_PASS: tl.constexpr,
    IN_SPAN: tl.constexpr, IN_PREC: tl.constexpr,
):
    """Launch 2 (one program per chunk, value head and 16-row block c): the pair-sum gradients of the
    block's rows (row sides dq_r, dk_r) and columns (column side dk_c), exact for any gate, with Gamma
    and the rows' inverse norms read from the recompute's gam / inorm (nothing recomputed, no
    cumsum, no row extraction from register tiles):

    - pairs with earlier rows (j < 16c): anchor a = 16c - 1, exp(G_i - G_a) <= 1 and exp(G_a - G_j) <= 1,
      one [16, 16] x [16, BK] product each for dA_qk and dP per earlier 16-row block (``_other_rows``);
    - pairs with later rows (i >= 16c + 16): anchor a = 16c + 15, likewise, transposed tiles;
    - pairs inside the block: about the anchor a = 16c + 7 (``_in_block_products``, IN_PREC products)
      when no |G_i - G_a| over the block and key block exceeds IN_SPAN, else 16 steps on CUDA cores,
      step t taking row t as the column of the row sides and as the row of the column side, one
      exp(-|G_i - G_t|) per step (<= 1 both ways).

    Then the per-token terms, dbeta and the l2norm backward of the block's rows; dGamma (before the
    in-chunk reverse cumsum) goes to dgam and the block's sum of dkd * kd to dkk_part, for the gate
    launch."""
    i_c, i_hv, c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h = i_hv // (HV // H)
    bos = tl.load(chunk_bounds + 2 * i_c).to(tl.int64)
    n_rows = tl.load(chunk_bounds + 2 * i_c + 1) - tl.load(chunk_bounds + 2 * i_c)
    if c * 16 >= n_rows:
        return
    q_base = q + (bos * H + i_h) * K
    k_base = k + (bos * H + i_h) * K
    hk = (bos * HV + i_hv) * K  # gam, dx, dqg, dkd, dq, dk, dgam
    n_base = inorm + (bos * HV + i_hv) * 2
    a_base = dA + (bos * HV + i_hv) * BT
    p_base = dP + (i_c * HV + i_hv).to(tl.int64) * BT * BT
    g_base = gam + hk
    SQ: tl.constexpr = H * K
    SG: tl.constexpr = HV * K
    SA: tl.constexpr = HV * BT
    o16 = tl.arange(0, 16)
    r_c = c * 16 + o16  # the block's rows
    m_c = r_c < n_rows
    b_beta = beta_rows(beta + bos * HV + i_hv, r_c, m_c, HV, USE_SIGMOID)
    b_iq_c = tl.load(n_base + r_c * (2 * HV), mask=m_c, other=0.0)
    b_ik_c = tl.load(n_base + r_c * (2 * HV) + 1, mask=m_c, other=0.0)

    b_db = tl.zeros([16], dtype=tl.float32)
    b_cq = tl.zeros([16], dtype=tl.float32)  # sum_d y dy for the l2norm backward
    b_ck = tl.zeros([16], dtype=tl.float32)
    for i_k in range(0, K, BK):
        o_k = i_k + tl.arange(0, BK)
        m_k = o_k < K
        m = m_c[:, None] & m_k[None, :]
        p_ck = r_c[:, None] * SQ + o_k[None, :]
        p_tk = hk + r_c[:, None] * SG + o_k[None, :]
        b_Gc = tl.load(g_base + r_c[:, None] * SG + o_k[None, :], mask=m, other=0.0)
        b_Gl = tl.load(g_base + (n_rows - 1) * SG + o_k, mask=m_k, other=0.0)
        b_yk = tl.load(k_base + p_ck, mask=m, other=0.0).to(tl.float32) * b_ik_c[:, None]
        b_q = tl.load(q_base + p_ck, mask=m, other=0.0).to(tl.float32) * (b_iq_c * scale)[:, None]

        # pairs with the other blocks' rows (dq_r, dk_r from earlier rows, dk_c from later ones)
        b_dqr, b_dkr, b_dkc = _other_rows(g_base, k_base, q_base, n_base, a_base, p_base, r_c, m_c, o16, o_k, m_k, c,
                                          n_rows, b_Gc, scale, HV, SQ, SG, SA, BT, PREC)

        # pairs inside the block: one anchor (row 7, or the last row of a short block) when the span allows
        b_Ga = tl.load(g_base + tl.minimum(c * 16 + 7, n_rows - 1) * SG + o_k, mask=m_k, other=0.0)
        span = tl.max(tl.max(tl.where(m, tl.abs(b_Gc - b_Ga[None, :]), 0.0), axis=1), axis=0)
        if span <= IN_SPAN:
            i_dqr, i_dkr, i_dkc = _in_block_products(a_base, p_base, r_c, m_c, o16, m, b_Gc, b_Ga, b_q, b_yk, SA, BT,
                                                     IN_SPAN, IN_PREC)
        else:
            # pairs inside the block: step t is column t of the row sides (rows i >= t of dA_qk, i > t of
            # dP) and row t of the column side (columns j <= t of dA_qk, j < t of dP)
            # separate accumulators: the cross-block sums above sit in the products' (mma) layout, and
            # carrying them through these steps cost three [16, BK] layout conversions (shared memory and
            # barriers) per step (TTGIR; 3.12 -> 2.81 ms for the three launches, H200, B1 T8192 H32 Kimi gate)
            i_dqr = tl.zeros([16, BK], dtype=tl.float32)
            i_dkr = tl.zeros([16, BK], dtype=tl.float32)
            i_dkc = tl.zeros([16, BK], dtype=tl.float32)
            # the next step's row loads are issued before this step's arithmetic: their latency, not the
            # arithmetic, is what the loop waits on (2.93 -> 2.81 ms, same run)
            n_Gt, n_kt, n_qt, n_ac, n_pc, n_ar, n_pr = _step_loads(
                g_base, k_base, q_base, n_base, a_base, p_base, r_c, m_c, o16, o_k, m_k, c, 0, n_rows, scale,
                HV, SQ, SG, SA, BT)
            for t in range(16):
                b_Gt, b_kt, b_qt, b_ac, b_pc, b_ar, b_pr = n_Gt, n_kt, n_qt, n_ac, n_pc, n_ar, n_pr
                n_Gt, n_kt, n_qt, n_ac, n_pc, n_ar, n_pr = _step_loads(
                    g_base, k_base, q_base, n_base, a_base, p_base, r_c, m_c, o16, o_k, m_k, c, t + 1, n_rows,
                    scale, HV, SQ, SG, SA, BT)
                i_dqr, i_dkr, i_dkc = _step_math(b_Gc, b_Gt, b_kt, b_qt, b_ac, b_pc, b_ar, b_pr, i_dqr, i_dkr, i_dkc)
        b_dqr += i_dqr
        b_dkr += i_dkr
        b_dkc += i_dkc

        b_dq, b_dk, b_dG, b_dbr, b_dkk = _token_terms(b_q, b_yk, b_Gc, b_Gl, b_beta, b_dqr, b_dkr, b_dkc, dx, dqg,
                                                      dkd, p_tk, m)
        b_db += b_dbr
        tl.store(dgam + p_tk, b_dG, mask=m)
        tl.store(dkk_part + ((i_c * HV + i_hv) * 4 + c).to(tl.int64) * K + o_k, b_dkk, mask=m_k)
        b_cq += tl.sum(b_dq * b_q, axis=1)  # = sum_d dy * y for q = scale y
        b_ck += tl.sum(b_dk * b_yk, axis=1)
        if ONE_PASS and USE_L2:
            # one key block holds the whole rows, so b_cq / b_ck are complete: the l2norm backward here,
            # one store in dq's / dk's dtype, no read-back (y = q / |q| = b_q / scale, dy = scale b_dq)
            b_dq = _l2norm_bwd(b_dq * scale, b_q * (1.0 / scale), b_cq, b_iq_c)
            b_dk = _l2norm_bwd(b_dk, b_yk, b_ck, b_ik_c)
        else:
            b_dq = b_dq * scale
        tl.store(dq + p_tk, b_dq.to(dq.dtype.element_ty), mask=m)
        tl.store(dk + p_tk, b_dk.to(dk.dtype.element_ty), mask=m)
    _finish_rows(q_base, k_base, dq, dk, dbeta + (bos * HV + i_hv), hk, r_c, m_c, b_db, b_beta, b_iq_c, b_ik_c,
                 b_cq, b_ck, HV, SQ, SG, K, BK, USE_SIGMOID, USE_L2 and not ONE_PASS)


@triton.jit
def kda_intra_bwd_gate_kernel(
    g, A_log, dt_bias, dl, dgam, dkk_part, ddl, dg, dbias_part, dalog_part, chunk_bounds,
    lower_bound,
    HV: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr,
    HAS_GATE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LB: tl.constexpr,
):
    """Launch 3 (one program per chunk, value head and key block of BK channels): dGamma -> dg. Gamma =
    cumsum(g), so dg_i = sum_{r >= i} dGamma_r + dGamma_last (= sum of the blocks' dkk_part + ddl
    exp(Gamma_last)), then the gate backward (raw gate, A_log, dt_bias). Writes dg (in g's dtype), the
    chunk's dt_bias part per channel and its A_log part per key block (dalog_part [NC, HV, NK])."""
    i_c, i_hv, i_kb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NK: tl.constexpr = (K + BK - 1) // BK
    bos = tl.load(chunk_bounds + 2 * i_c).to(tl.int64)
    n_rows = tl.load(chunk_bounds + 2 * i_c + 1) - tl.load(chunk_bounds + 2 * i_c)
    hk = (bos * HV + i_hv) * K
    SG: tl.constexpr = HV * K
    o_t = tl.arange(0, BT)
    m_t = o_t < n_rows
    o_k = i_kb * BK + tl.arange(0, BK)
    m_k = o_k < K
    m = m_t[:, None] & m_k[None, :]
    p_tk = hk + o_t[:, None] * SG + o_k[None, :]
    # the four blocks' partial sums (a block past the chunk's end wrote none), then ddl exp(Gamma_last)
    p_part = dkk_part + ((i_c * HV + i_hv) * 4).to(tl.int64) * K + o_k
    b_dGl = tl.load(p_part, mask=m_k, other=0.0)
    for blk in tl.static_range(1, 4):
        b_dGl += tl.load(p_part + blk * K, mask=m_k & (n_rows > 16 * blk), other=0.0)
    b_dGl += (tl.load(ddl + (i_c * HV + i_hv).to(tl.int64) * K + o_k, mask=m_k, other=0.0)
              * tl.load(dl + (i_c * HV + i_hv).to(tl.int64) * K + o_k, mask=m_k, other=0.0))
    b_dG = tl.load(dgam + p_tk, mask=m, other=0.0)
    b_dg = tl.where(m, tl.cumsum(b_dG, axis=0, reverse=True) + b_dGl[None, :], 0.0)
    if HAS_GATE:
        b_a = tl.exp(tl.load(A_log + i_hv).to(tl.float32))
        b_dxr, b_dal = _gate_backward(b_dg, g + p_tk, m, dt_bias + i_hv * K + o_k, m_k, b_a, lower_bound,
                                      HAS_BIAS, HAS_LB)
        tl.store(dg + p_tk, b_dxr.to(dg.dtype.element_ty), mask=m)
        if HAS_BIAS:
            tl.store(dbias_part + (i_c * HV + i_hv).to(tl.int64) * K + o_k, tl.sum(b_dxr, axis=0), mask=m_k)
        tl.store(dalog_part + (i_c * HV + i_hv) * NK + i_kb, tl.sum(b_dal, axis=0))
    else:
        tl.store(dg + p_tk, b_dg.to(dg.dtype.element_ty), mask=m)


def intra_bwd_dkk(
    v: torch.Tensor,
    beta: torch.Tensor,
    chunk_bounds: torch.Tensor,
    st: dict[str, torch.Tensor],
    gr: dict[str, torch.Tensor],
    *,
    use_beta_sigmoid: bool,
    block_k: int | None = None,
    num_warps: int | None = None,
    dv_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch 1 of the intra backward alone (the benchmark times it apart) -> dv ``[TT, HV, V]`` (in
    dv_dtype), dX = M^T dw ``[TT, HV, K]``, dP ``[NC, HV, 64, 64]`` and the partial dbeta ``[TT, HV]``, fp32."""
    TT, HV, V = v.shape
    K = gr["dw"].shape[-1]
    NC = chunk_bounds.shape[0]
    dev, f32 = v.device, torch.float32
    dv = torch.empty(TT, HV, V, device=dev, dtype=dv_dtype)
    dx = torch.empty(TT, HV, K, device=dev, dtype=f32)
    dP = torch.empty(NC, HV, 64, 64, device=dev, dtype=f32)
    dbeta = torch.empty(TT, HV, device=dev, dtype=f32)
    kda_intra_bwd_dkk_kernel[(NC, HV)](
        v, beta, st["w"], st["u"], st["M"], st["P"], gr["du"], gr["dw"],
        dv, dx, dP, dbeta, chunk_bounds,
        HV=HV, K=K, V=V, BK=min(block_k or DKK_BLOCK_K, next_pow2(K)), BV=min(64, next_pow2(V)), BT=64,
        USE_SIGMOID=use_beta_sigmoid, PREC="ieee" if INTERPRET else DKK_PRECISION,
        num_warps=num_warps or DKK_NUM_WARPS, num_stages=DKK_STAGES, **reg_cap(DKK_MAX_REGISTERS),
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
    block_k: int | None = None,
    num_warps: int | None = None,
    max_registers: int | None = None,
    dkk_block_k: int | None = None,
    dkk_num_warps: int | None = None,
) -> dict[str, torch.Tensor | None]:
    """Flattened inputs as in ``kda_intra_fwd``; st: its outputs with ``store_gamma=True`` (w, u, M, P,
    dl, gam, inorm); gr: the stage-3 gradients (du, dqg, dw, dkd: fp32 token tensors, dA ``[TT, HV,
    64]``, ddl ``[NC, HV, K]``). block_k / num_warps / max_registers: the block launch (None: the
    module's BLOCK_K, NUM_WARPS, MAX_REGISTERS; max_registers 0 lets ptxas choose); dkk_block_k /
    dkk_num_warps: the dA_kk launch (None: DKK_BLOCK_K / DKK_NUM_WARPS).

    Returns dq, dk ``[TT, H, K]`` (grouped value heads summed) in q's / k's dtype, dv ``[TT, HV, V]`` in
    v's, dg ``[TT, HV, K]`` in g's (of the raw gate when A_log is given), dbeta ``[TT, HV]`` fp32, dA_log
    ``[HV]`` and ddt_bias ``[HV * K]`` fp32 (or None). The kernels accumulate in fp32 and write the
    16-bit gradients themselves (no fp32 copy and cast afterwards) except dq / dk under GVA or with K
    past one key block, which are summed / finished in fp32 first."""
    if "gam" not in st or "inorm" not in st:
        raise ValueError("st: the intra backward reads gam and inorm; recompute stage 1 with "
                         "kda_intra_fwd(..., store_gamma=True)")
    TT, H, K = q.shape
    HV = v.shape[-2]
    NC = chunk_bounds.shape[0]
    dev, f32 = q.device, torch.float32
    dv, dx, dP, dbeta = intra_bwd_dkk(v, beta, chunk_bounds, st, gr, use_beta_sigmoid=use_beta_sigmoid,
                                      block_k=dkk_block_k, num_warps=dkk_num_warps, dv_dtype=v.dtype)
    BK = min(block_k or BLOCK_K, next_pow2(K))
    one_pass = BK >= K
    direct = one_pass and HV == H  # dq / dk written once, in their final dtype
    dq = torch.empty(TT, HV, K, device=dev, dtype=q.dtype if direct else f32)
    dk = torch.empty(TT, HV, K, device=dev, dtype=k.dtype if direct else f32)
    dgam = torch.empty(TT, HV, K, device=dev, dtype=f32)
    dg = torch.empty(TT, HV, K, device=dev, dtype=g.dtype)
    has_gate = A_log is not None
    has_bias = has_gate and dt_bias is not None
    dbias_part = torch.empty(NC, HV, K, device=dev, dtype=f32) if has_bias else dq
    gate_bk = min(GATE_BLOCK_K, next_pow2(K))
    dalog_part = torch.empty(NC, HV, triton.cdiv(K, gate_bk), device=dev, dtype=f32) if has_gate else dq
    dkk_part = torch.empty(NC, HV, 4, K, device=dev, dtype=f32)
    cap = MAX_REGISTERS if max_registers is None else max_registers
    kda_intra_bwd_block_kernel[(NC, HV, 4)](
        q, k, st["gam"], st["inorm"], beta, dx, dP, gr["dqg"], gr["dkd"], gr["dA"],
        dq, dk, dgam, dbeta, dkk_part, chunk_bounds, float(scale),
        H=H, HV=HV, K=K, BK=BK, BT=64,
        USE_L2=use_qk_l2norm, USE_SIGMOID=use_beta_sigmoid, PREC="ieee" if INTERPRET else BLOCK_PRECISION,
        ONE_PASS=one_pass, IN_SPAN=IN_BLOCK_SPAN, IN_PREC="ieee" if INTERPRET else IN_BLOCK_PRECISION,
        num_warps=num_warps or NUM_WARPS, num_stages=BLOCK_STAGES, **reg_cap(cap),
    )
    kda_intra_bwd_gate_kernel[(NC, HV, triton.cdiv(K, gate_bk))](
        g, A_log if has_gate else g, dt_bias if dt_bias is not None else g, st["dl"], dgam, dkk_part, gr["ddl"],
        dg, dbias_part, dalog_part, chunk_bounds, float(lower_bound) if lower_bound is not None else 0.0,
        HV=HV, K=K, BK=gate_bk, BT=64, HAS_GATE=has_gate, HAS_BIAS=has_bias,
        HAS_LB=has_gate and lower_bound is not None, num_warps=GATE_NUM_WARPS, num_stages=1,
        **reg_cap(GATE_MAX_REGISTERS),
    )
    if HV != H:
        dq = dq.view(TT, H, HV // H, K).sum(2)
        dk = dk.view(TT, H, HV // H, K).sum(2)
    dq, dk = dq.to(q.dtype), dk.to(k.dtype)
    return dict(dq=dq, dk=dk, dv=dv, dg=dg, dbeta=dbeta,
                dA_log=dalog_part.sum((0, 2)) if has_gate else None,
                ddt_bias=dbias_part.sum(0).reshape(-1) if has_bias else None)
