"""Stage 1 of the chunked forward: everything inside one chunk that does not need the state.

One program per (chunk of BT = 64 tokens, value head). With Gamma the in-chunk cumulative log-decay
(gate fused, computed in registers, never written):

    P[i, j]    = sum_d k_id k_jd exp(Gamma_id - Gamma_jd)          (j < i),  A_kk = diag(beta) P
    A_qk[i, j] = scale sum_d q_id k_jd exp(Gamma_id - Gamma_jd)    (j <= i)
    M = (I + A_kk)^-1,  w = M (beta k exp(Gamma)),  u = M (beta v)

plus what the recurrence needs without touching Gamma again: qg = scale q exp(Gamma),
kd = k exp(Gamma_last - Gamma) and dl = exp(Gamma_last).

Pair decays on tensor cores, exactly, with no exponential that can overflow (FLA #1240 is what goes
wrong otherwise). Three launches:

1. Fast pass (every chunk-head): gate, cumsum, l2norm, qg, kd, dl and k exp(Gamma) (parked in w's
   buffer), and A_qk, P from two products per key block (BK = 64 channels): pairs across the two
   32-row halves use the anchor a = 31, ``exp(G_i - G_j) = exp(G_i - G_a) exp(G_a - G_j)`` with both
   factors <= 1 (always exact, always added); pairs inside a half and the diagonal use one anchor per
   half (rows 15, 47), exact up to rounding when no factor exceeds exp(SAFE_SPAN) (see there for why
   the masked-out products may overflow). A key block where some factor would exceed it gets no
   within-half product and is flagged (exact_flag[c, h, key block] = 1).
2. Exact pass (chunk-heads with a flagged key block; the others return at once): for the flagged
   key blocks only, the within-half pairs and the diagonal, by the level-16 product (anchors 15, 47:
   exact) plus one anchor per 16-row quarter (row 7 of it) when max |Gamma_i - Gamma_anchor| <=
   SAFE_SPAN over the key block, else by the five levels 16, 8, 4, 2, 1 of the six-level split (every
   pair j < i split at the highest bit where i and j differ; at level s row i lies in an odd block
   of s rows, column j in the even block before it, their anchor is the last row of that even block,
   so both factors are <= 1 and underflow is harmless). It adds these to the A_qk and P the fast
   launch stored (read-modify-write: the two launches run one after the other on the stream and each
   program owns its chunk-head's rows, so there is no race) and marks key blocks that needed the five
   levels with exact_flag = 2. It reads the flags in its own key-block width (32 by default: no
   spills at sm_90a, 4 warps, against 512 B at 64).

   Why these tiers (benchmarks/kda_gate_spans.py, the benchmark's Kimi gate: A_log = log U(1, 16),
   dt_bias ~ N(-3, 0.5), raw gate ~ N(0, 1); float64, 8 draws of T 1024 H 32 D 128). With SAFE_SPAN 80
   (l2norm fused) 4.4% of the (chunk, head, key block)s fail the fast test (7.9% of chunk-heads),
   3.8% also the quarter-anchor test, none the next. With 40 (sessions 1-6, and raw q / k now): 45%
   fail the fast test (51% of chunk-heads, 42-67% per draw); 12.6% of all key blocks also fail the
   quarter-anchor test, 1.1% the next (eighth-row anchors) and none the finer ones; the counts below
   are for 40. Counting [64, 64]-sized tensor-core products per key block (not the gathers, nor the
   exact launch's reloads of q, k and the gate): 5.0 on average before (2 + 6 for every key block of
   a flagged chunk-head), 3.8 with per-key-block flags and six levels, 2.8 with the quarter tier
   added (3 products instead of 6 for the 31% of key blocks that need exactly it), 2.6 with every
   tier (not worth more code and registers). The bounded gate (lower_bound = -5) flags nothing.
3. Solve: M = (I + diag(beta) P)^-1 from the 16x16 diagonal inverses (product form ``(I + N)^-1 =
   (I - N)(I + N^2)(I + N^4)(I + N^8)``, N^16 = 0, fp32; the 16x16 products in bf16x3 for 16-bit inputs,
   ieee for fp32: SOLVE_INV_PRECISION) and ``M_IJ = -D_I sum_{J <= L < I} A_IL M_LJ``,
   then w = M diag(beta) (k exp(Gamma)) and u = M diag(beta) v as one [64, 64] product each (two with
   bf16 inputs: M's bf16 hi and lo halves, SOLVE_M_PIECES). P and M
   go through per-chunk buffers (Triton cannot slice register tiles); the backward reads both.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hla.ops.kda.triton import intra_wgmma as wgmma_intra
from hla.ops.kda.triton.common import (
    INTERPRET,
    MAX_GRID_Y,
    beta_rows,
    bf16_halves,
    exp_ftz,
    half_anchors,
    kda_gate_f32,
    level_factors,
    next_pow2,
    qk_row_sumsq,
    reg_cap,
    tile_row,
)
from hla.ops.kda.triton.launch import LeanLaunch

# A chunk's key block takes the one-anchor fast path (and, in the exact launch, the quarter-anchor tier)
# when no factor exp(|Gamma_i - Gamma_anchor|) exceeds exp(SAFE_SPAN). What bounds it is the operands:
# q_i exp(G_i - G_a) and k_j exp(G_a - G_j) must stay finite in bf16 / fp32 (max 3.4e38 = exp(88.7)),
# i.e. |x| exp(SAFE_SPAN) < 3.4e38: |x| < 6e3 at 80. With the l2norm fused, |q| <= |scale| (taken when <=
# 1e3) and |k| <= 1 per element; raw q / k are unbounded, so without it the limit is RAW_SAFE_SPAN (|x| <
# 1.5e21). Every kept entry (j <= i) is a sum of terms each <= |q_id k_jd| (both factors of channel d
# multiply to exp(G_id - G_jd) <= 1); the masked-out entries (j > i, or the other half) reach exp(2
# SAFE_SPAN) and overflow to inf in the fp32 accumulator, which is harmless: each output entry
# accumulates only its own terms and the select that masks it drops it. Session 1-6 kept the masked
# entries finite too (40); at the benchmark's Kimi gate 45% of key blocks fail the fast test at 40, 4.4%
# at 80 (benchmarks/kda_gate_spans.py). Tests set SAFE_SPAN to -1 to force the six-level split
# everywhere.
SAFE_SPAN = 80.0
RAW_SAFE_SPAN = 40.0
# The backward's recompute (per-token tensors only): default key-block width and warps. H200, B1 T8192
# H32 D128 (session 7): BK 32 0.460 ms (167 registers, 3 programs per SM), BK 64 0.495 (255, 2), BK 128
# / 8 warps 0.61; its key-block loop software-pipelined (tl.range num_stages 2) was slower at every
# width (0.49-0.69 ms), so the loop stays a plain range. Session 8 (exponentials on one MUFU op each):
# BK 64 0.456-0.458 against BK 32 0.463-0.465 in three runs (Kimi gate; bounded 0.449 / 0.455), BK 64 / 8
# warps 0.616, BK 16 / 2 warps 0.546.
RECOMPUTE_BLOCK_K, RECOMPUTE_WARPS = 64, 4
# The forward's launches (read at each call): the fast launch's key-block width, warps and pipeline
# stages (the width is also the flags' key-block width), the exact launch's, and the solve's warps. H200,
# B1 T8192 H32 D128 Kimi gate, the intra stage (fast + exact + solve), session 8: fast BK 64 / 4 warps
# 0.840 ms, BK 32 / 4 0.915, BK 32 / 8 1.096, BK 64 / 8 1.041; 2 stages (the second key block's loads
# issued during the first's products; 136 B of spills, 41 KB of shared memory) 0.699 against 0.720 at
# 1 (bounded gate 0.640 / 0.661); solve 1 warp 1.054, 2 0.840, 4 0.938; exact BK 16 / 4 0.847, 32 / 8
# 0.851 against 32 / 4 0.840. A split solve (the inverse alone, then w and u one column block per
# program) was slower: 0.865 against 0.803 (the backward's recompute 0.538 against 0.474).
# Session 10 (same-run pairs, intra stage): 3 fast stages 0.659 / 0.657 ms against 2 stages' 0.665 / 0.662.
FAST_BLOCK_K, FAST_WARPS = 64, 4
FAST_STAGES = 3
EXACT_BLOCK_K, EXACT_WARPS = 32, 4
SOLVE_WARPS = 2
# Software-pipeline stages of the solve (both uses), the backward's recompute and the exact launch (the fast
# launch's are FAST_STAGES). Session 13 (H200, B1 T8192 H32 D128, two runs each, bounded gate; Kimi alike): the
# solve at 3 stages (its key- and value-block loops' loads issued a block ahead) intra stage 0.594 / 0.597 ->
# 0.583 / 0.586 ms, the backward's recompute 0.440 / 0.439 -> 0.424 / 0.424; 2 stages 0.601 / 0.603 and 0.439 /
# 0.441, 4 stages within 0.001 of 3. The recompute's first launch at 2 / 3 stages and the exact launch at 2 / 3
# (Kimi gate) moved nothing beyond 0.002 ms: both stay at 1.
SOLVE_STAGES = 3
# The solve's programs in head-major order (grid (HV, NC)) where the chunks fit the grid's second dimension: 0.3-1.4%
# off the forward (H200, session 20; intra_wgmma.HEAD_MAJOR_GRID has the numbers of both). The solve beside the walk
# always runs so (its chunks complete in order across heads).
SOLVE_HEAD_MAJOR = True
RECOMPUTE_STAGES = 1
EXACT_STAGES = 1
# Register caps (None: ptxas chooses) of the fast launch, the backward's recompute (its first launch) and
# the solve (both uses), for 16-bit inputs (fp32 inputs launch uncapped: not measured). H200, B1 T8192 H32
# D128 Kimi gate, session 10, two runs each: the solve at 168 registers (6 programs per SM instead of 4,
# 84 B of spills) intra stage 0.664 / 0.663 -> 0.657 / 0.658 ms, at 128 0.692, 4 warps at 128 0.718, and
# the backward's saved-M solve unchanged (0.4527 / 0.4529); the recompute at 168 (3 programs per SM, 172 B
# of spills) 0.456 -> 0.450 in both runs, at 128 0.537; the fast launch at 168 0.785 and 128 0.987 against
# 0.663 uncapped, 8 warps 0.840 (0.890 at 128). The solve's cap applies where w, u are one tf32 product
# (fp16 inputs, or SOLVE_M_PIECES off); with M as bf16 hi + lo halves (bf16 inputs) the solve launches
# uncapped: session 11, the halves spill 244 B at 168 and the cap then costs intra 0.597 / 0.597 ms uncapped,
# 0.608 / 0.607 at 168, 0.601 / 0.602 at 200 (bounded gate; Kimi 0.651 / 0.650, 0.666 / 0.665, 0.657 /
# 0.652), the backward's recompute 0.439 / 0.439, 0.458 / 0.458, 0.443 / 0.443 (Kimi 0.446 / 0.445, 0.463 /
# 0.463).
FAST_MAX_REGISTERS = None
RECOMPUTE_MAX_REGISTERS = 168
SOLVE_MAX_REGISTERS = 168
# The solve's 16x16 inverses and off-diagonal blocks for 16-bit inputs (fp32 inputs and the interpreter
# take ieee). H200, B1 T8192 H32 D128, intra stage at 2 solve warps, and the relative error of M against a
# float64 inverse of the same P (session 9): ieee 0.703 ms / 3.2e-9, tf32x3 0.833 / 3.7e-9, bf16x6 0.714 /
# 2.9e-9, bf16x3 0.673 / 7.1e-8, tf32 0.649 / 1.5e-5 (Kimi gate); bounded gate 0.643 / 0.770 / 0.652 /
# 0.609 / 0.588 ms, tf32 1.4e-4; 4 warps slower at every precision. tf32 took 0.05 ms off the forward but
# moved check_kda_gpu.py's bounded-gate dA_log from 4.1e-3 to 9.7e-3 (limit 1e-2): dA_log sums every
# token's gradient, so M's rounding adds up. bf16x3 (~16 bits): fwd 0.962 -> 0.932 ms (bounded 0.900 ->
# 0.869), that dA_log 4.1e-3, the veryneg one 2.5e-3 -> 3.0e-3, the known varlen near0 one 1.85e-2 -> 1.96e-2.
SOLVE_INV_PRECISION = "bf16x3"
# w = M diag(beta) (k exp(Gamma)) and u = M diag(beta) v with M as its bf16 hi + lo halves (bf16 inputs, whose v
# and parked k exp(Gamma) are exact bf16 operands; fp16 / fp32 inputs keep one tf32 product, which rounds M to
# 10 bits where the halves keep ~16). H200, session 11, against the tf32 product: 3 draws each of
# check_kda_gpu.py's varlen near0 and T2048 bounded / veryneg / benchmark-gate backward cases (float64
# reference): every draw's o, final state, dq and dk error equal or lower (dk 2.11-2.19e-3 -> 1.89-1.97e-3 at
# the benchmark gate), dA_log moving either way within its draw-to-draw spread; the check's own draw: varlen
# near0 dA_log 1.96e-2 -> 1.26e-2. Time (same-run pairs, uncapped against the tf32 product at 168
# registers): the backward's recompute 0.445 -> 0.439 ms, intra stage 0.600 -> 0.595 / 0.599, fwd+bwd
# 4.147 -> 4.144 / 4.149 -> 4.147 (bounded gate), 4.233 -> 4.216 / 4.225 -> 4.220 (Kimi).
SOLVE_M_PIECES = True
# A_qk stored in bf16 for bf16 inputs (aqk_dtype): the recurrence rounds it to bf16 for its A_qk v_new product anyway,
# so the output does not change (where the exact launch completes a chunk-head's A_qk, the fast launch's fp32 partial
# waits in a scratch: every entry is rounded once); the forward writes and the recurrence and the chain read half
# the bytes, the chain's A_qk^T do is one bf16 product, and the autograd graph keeps 33.5 MB less at B1 T8192 H32.
# Session 14 (H200, B1 T8192 H32 D128, two same-run pairs): fwd 0.813 / 0.815 -> 0.808 / 0.810 ms (bounded gate),
# 0.868 / 0.869 -> 0.861 / 0.864 (Kimi); fwd+bwd 3.509 / 3.509 -> 3.464 / 3.467, 3.580 / 3.584 -> 3.537 / 3.543.
AQK_BF16 = True
# The fast launch in Gluon on Hopper (intra_wgmma.py) where it applies: "inference" (forwards whose results feed no
# backward: kda_intra_fwd's for_backward=False), "always", or "off". It takes 6-10% off the intra stage and 3-7% off
# the forward (H200, session 16, all four benchmark shapes, both gates: B4 T8192 H32 Kimi gate 2.859 -> 2.692 ms), and
# its outputs are as accurate as the tl launch's (the same bf16 operands and products, summed in another order). Not
# in training forwards: with it, check_kda_gpu.py's borderline value, the varlen near0 dA_log (the gate gradient
# summed over every token; 9.3e-3 with the tl launch, which left 5 of 300 values over 1e-2 on fresh draws in session
# 14), read 1.09e-2, past the 1e-2 bound (measured on a version that forms the same operands and products in the same
# order; every other value stayed within the check's spread). The backward reads the forward's A_qk, P and M, so a
# training forward keeps the launch the check passed with. Tests choose either (tests/ops/kda/triton/test_intra_wgmma.py).
INTRA_WGMMA = "inference"


def _mode_on(name: str, mode: str, for_backward: bool) -> bool:
    if mode not in ("inference", "always", "off"):
        raise ValueError(f"intra.{name}: expected 'inference', 'always' or 'off', got {mode!r}")
    return mode == "always" or (mode == "inference" and not for_backward)


@triton.jit
def _load_gamma(g_base, A_log, dt_bias, lower_bound, o_t, m_t, o_k, m_k, i_hv, SG: tl.constexpr, K: tl.constexpr,
                HAS_GATE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LB: tl.constexpr):
    """In-chunk cumulative log-decay [BT, BK] fp32; rows past the chunk end carry g = 0."""
    m = m_t[:, None] & m_k[None, :]
    b_g = tl.load(g_base + o_t[:, None] * SG + o_k[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_GATE:
        b_a = tl.exp(tl.load(A_log + i_hv).to(tl.float32))
        if HAS_BIAS:
            b_bias = tl.load(dt_bias + i_hv * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        else:
            b_bias = tl.zeros_like(o_k).to(tl.float32)
        b_g = tl.where(m, kda_gate_f32(b_g, b_a, b_bias[None, :], lower_bound, HAS_BIAS, HAS_LB), 0.0)
    return tl.cumsum(b_g, axis=0)


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
def _tile16(base, b_b, i_r: tl.constexpr, i_c: tl.constexpr, o_c, BT: tl.constexpr):
    """16x16 tile (row block i_r, column block i_c) of the [BT, BT] scratch, rows scaled by beta."""
    return tl.load(base + (i_r * 16 + o_c[:, None]) * BT + i_c * 16 + o_c[None, :]) * b_b[:, None]


@triton.jit
def _store16(base, x, i_r: tl.constexpr, i_c: tl.constexpr, o_c, BT: tl.constexpr):
    tl.store(base + (i_r * 16 + o_c[:, None]) * BT + i_c * 16 + o_c[None, :], x)


@triton.jit
def _within_halves_exact(b_aqk, b_p, b_q, b_k, b_G, o_t, BT: tl.constexpr, BK: tl.constexpr, OP: tl.constexpr,
                         PREC: tl.constexpr, SAFE_SPAN: tl.constexpr):
    """The pairs the level-32 product leaves (inside each 32-row half, and the diagonal) of one key
    block, exactly: the level-16 product (anchors 15, 47) plus one anchor per 16-row quarter (row 7 of
    it) when no factor exceeds exp(SAFE_SPAN) over the key block (tier 1), else the five levels 16 .. 1
    and the diagonal as a plain row sum (tier 2). b_q, b_k [BT, BK] fp32 (scaled, normalised), b_G
    [BT, BK] the in-chunk cumulative log-decay; the parts are added to b_aqk, b_p -> (b_aqk, b_p, tier)."""
    QB: tl.constexpr = BT // 4
    up, b_e, pair = level_factors(b_G, o_t, 1, BT, BK)
    b_qs = tl.where(up[:, None], b_q * b_e, 0.0).to(OP)
    b_kr = tl.where(up[:, None], b_k * b_e, 0.0).to(OP)
    b_kc = tl.trans(tl.where(up[:, None], 0.0, b_k * b_e).to(OP))
    b_aqk += tl.where(pair, tl.dot(b_qs, b_kc, input_precision=PREC), 0.0)
    b_p += tl.where(pair, tl.dot(b_kr, b_kc, input_precision=PREC), 0.0)
    b_Ga = tl.gather(b_G, tl.broadcast_to((o_t // QB * QB + QB // 2 - 1)[:, None], [BT, BK]), 0)
    tier = 1
    if tl.max(tl.max(tl.abs(b_G - b_Ga), axis=1), axis=0) <= SAFE_SPAN:
        b_eq = exp_ftz(tl.minimum(b_G - b_Ga, SAFE_SPAN))
        b_kc = tl.trans((b_k * exp_ftz(tl.minimum(b_Ga - b_G, SAFE_SPAN))).to(OP))
        same = (o_t[:, None] // QB) == (o_t[None, :] // QB)
        b_aqk += tl.where(same & (o_t[:, None] >= o_t[None, :]),
                          tl.dot((b_q * b_eq).to(OP), b_kc, input_precision=PREC), 0.0)
        b_p += tl.where(same & (o_t[:, None] > o_t[None, :]), tl.dot((b_k * b_eq).to(OP), b_kc, input_precision=PREC),
                        0.0)
    else:
        b_aqk += tl.where(o_t[:, None] == o_t[None, :], tl.sum(b_q * b_k, axis=1)[:, None], 0.0)
        for lvl in range(2, 6):
            up, b_e, pair = level_factors(b_G, o_t, lvl, BT, BK)
            b_qs = tl.where(up[:, None], b_q * b_e, 0.0).to(OP)
            b_kr = tl.where(up[:, None], b_k * b_e, 0.0).to(OP)
            b_kc = tl.trans(tl.where(up[:, None], 0.0, b_k * b_e).to(OP))
            b_aqk += tl.where(pair, tl.dot(b_qs, b_kc, input_precision=PREC), 0.0)
            b_p += tl.where(pair, tl.dot(b_kr, b_kc, input_precision=PREC), 0.0)
        tier = 2
    return b_aqk, b_p, tier


@triton.jit
def kda_intra_fwd_kernel(
    q, k, g, A_log, dt_bias, Aqk, Apart, w, qg, kd, dl, Pbuf, exact_flag, gam, inorm, chunk_bounds,
    scale, lower_bound,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr,
    BK: tl.constexpr, FBK: tl.constexpr, BT: tl.constexpr,
    HAS_GATE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LB: tl.constexpr,
    USE_L2: tl.constexpr, PREC: tl.constexpr, SAFE_SPAN: tl.constexpr, EXACT: tl.constexpr,
    PAIRS: tl.constexpr = True, STORE_GAMMA: tl.constexpr = False, OP: tl.constexpr = tl.bfloat16,
    SPLIT_A: tl.constexpr = False,
):
    """EXACT=False: everything, with the one-anchor product where the span allows, flagging the key
    blocks (of FBK = BK channels) where it did not. EXACT=True (second launch, BK <= FBK): the
    within-half pairs of the flagged key blocks only, added to the stored A_qk and P; programs with
    no flagged key block return at once. PAIRS=False (the backward, with A_qk and P saved by the
    forward): only the per-token tensors qg, kd, dl and k exp(Gamma). STORE_GAMMA: also Gamma ([TT, HV,
    K] fp32) and the rows' inverse norms 1 / |q|, 1 / |k| ([TT, HV, 2] fp32), which the intra backward
    reads row by row. OP: the pair products' operand dtype (bf16 for 16-bit inputs: the factors reach
    exp(SAFE_SPAN), past fp16's 65504; fp32 inputs, and the interpreter, whose bf16 products
    overflowed at the same place, keep fp32). SPLIT_A (A_qk stored in bf16): a chunk-head with a flagged key
    block parks its fp32 partial A_qk in Apart (same layout) for the exact launch, which adds to it and
    stores the bf16 sum, so every A_qk entry is rounded once."""
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    NK: tl.constexpr = (K + FBK - 1) // FBK
    if EXACT:
        n_flag = tl.load(exact_flag + (i_c * HV + i_hv) * NK)
        for i_f in range(1, NK):
            n_flag += tl.load(exact_flag + (i_c * HV + i_hv) * NK + i_f)
        if n_flag == 0:
            return
    i_h = i_hv // (HV // H)
    bos = tl.load(chunk_bounds + 2 * i_c).to(tl.int64)
    n_rows = tl.load(chunk_bounds + 2 * i_c + 1) - tl.load(chunk_bounds + 2 * i_c)
    # int64 scalar bases, int32 tile offsets: keeps pointer tiles at one register per element.
    q_base = q + (bos * H + i_h) * K
    k_base = k + (bos * H + i_h) * K
    g_base = g + (bos * HV + i_hv) * K
    hk_base = (bos * HV + i_hv) * K  # qg, kd, w
    a_base = Aqk + (bos * HV + i_hv) * BT
    s_base = (i_c * HV + i_hv).to(tl.int64) * BT * BT  # P scratch
    SQ: tl.constexpr = H * K
    SG: tl.constexpr = HV * K
    SA: tl.constexpr = HV * BT
    o_t = tl.arange(0, BT)
    m_t = o_t < n_rows

    if USE_L2:
        b_nq, b_nk = qk_row_sumsq(q_base, k_base, o_t, m_t, SQ, K, BK)
        b_rk = 1.0 / tl.sqrt(b_nk + 1e-6)
        if STORE_GAMMA:
            p_n = inorm + (bos * HV + i_hv) * 2 + o_t * (2 * HV)
            tl.store(p_n, 1.0 / tl.sqrt(b_nq + 1e-6), mask=m_t)
            tl.store(p_n + 1, b_rk, mask=m_t)
        b_rq = scale / tl.sqrt(b_nq + 1e-6)
    else:
        b_rq = tl.zeros([BT], dtype=tl.float32) + scale
        b_rk = tl.zeros([BT], dtype=tl.float32) + 1.0

    # Phase 1: A_qk and P, one K block at a time; qg, kd, dl stored on the way. The exact launch
    # accumulates only what the fast launch left out (flagged key blocks) and adds it to the stored A, P.
    b_aqk = tl.zeros([BT, BT], dtype=tl.float32)
    b_p = tl.zeros([BT, BT], dtype=tl.float32)
    f_base = exact_flag + (i_c * HV + i_hv) * NK
    n_flagged = tl.full([], 0, tl.int32)
    for i_k in range(0, K, BK):
        o_k = i_k + tl.arange(0, BK)
        m_k = o_k < K
        m = m_t[:, None] & m_k[None, :]
        p_tk = o_t[:, None] * SQ + o_k[None, :]
        p_hk = o_t[:, None] * SG + o_k[None, :]
        if EXACT:
            if tl.load(f_base + i_k // FBK) != 0:
                b_q = tl.load(q_base + p_tk, mask=m, other=0.0).to(tl.float32) * b_rq[:, None]
                b_k = tl.load(k_base + p_tk, mask=m, other=0.0).to(tl.float32) * b_rk[:, None]
                b_G = _load_gamma(g_base, A_log, dt_bias, lower_bound, o_t, m_t, o_k, m_k, i_hv, SG, K,
                                  HAS_GATE, HAS_BIAS, HAS_LB)
                b_aqk, b_p, tier = _within_halves_exact(b_aqk, b_p, b_q, b_k, b_G, o_t, BT, BK, OP, PREC, SAFE_SPAN)
                if tier == 2:
                    tl.store(f_base + i_k // FBK + tl.arange(0, 1), tl.full([1], 2, tl.int32))
        else:
            b_q = tl.load(q_base + p_tk, mask=m, other=0.0).to(tl.float32) * b_rq[:, None]
            b_k = tl.load(k_base + p_tk, mask=m, other=0.0).to(tl.float32) * b_rk[:, None]
            b_G = _load_gamma(g_base, A_log, dt_bias, lower_bound, o_t, m_t, o_k, m_k, i_hv, SG, K,
                              HAS_GATE, HAS_BIAS, HAS_LB)
            # padding rows carry g = 0, so the last row holds Gamma at the chunk's last token
            b_Gl = tile_row(b_G, o_t, BT - 1)
            b_eG = exp_ftz(b_G)
            if STORE_GAMMA:
                tl.store((gam + hk_base) + p_hk, b_G, mask=m)
            tl.store(dl + (i_c * HV + i_hv).to(tl.int64) * K + o_k, exp_ftz(b_Gl), mask=m_k)
            tl.store((qg + hk_base) + p_hk, (b_q * b_eG).to(qg.dtype.element_ty), mask=m)
            tl.store((kd + hk_base) + p_hk, (b_k * exp_ftz(tl.minimum(b_Gl[None, :] - b_G, 0.0))).to(kd.dtype.element_ty),
                     mask=m)
            # k exp(Gamma), parked in w's buffer until the solve kernel turns it into w
            tl.store((w + hk_base) + p_hk, (b_k * b_eG).to(w.dtype.element_ty), mask=m)
            if PAIRS:
                # Pairs across the two halves (i >= 32 > j): the level-32 anchor (row 31), both factors <= 1,
                # always exact. Pairs inside a half (and the diagonal): one anchor per half (rows 15 and 47),
                # exact up to rounding when no factor exceeds exp(SAFE_SPAN); otherwise this key block is
                # flagged and left to the exact launch.
                lo = o_t < BT // 2
                b_G1, b_G2, b_G3, span = half_anchors(b_G, b_Gl, o_t, BT)
                b_e = exp_ftz(tl.minimum(tl.where(lo[:, None], b_G2[None, :] - b_G, b_G - b_G2[None, :]), 0.0))
                b_kc = tl.trans(tl.where(lo[:, None], b_k * b_e, 0.0).to(OP))
                b_aqk += tl.dot(tl.where(lo[:, None], 0.0, b_q * b_e).to(OP), b_kc, input_precision=PREC)
                b_p += tl.dot(tl.where(lo[:, None], 0.0, b_k * b_e).to(OP), b_kc, input_precision=PREC)
                if span <= SAFE_SPAN:
                    b_Gm = tl.where(lo[:, None], b_G1[None, :], b_G3[None, :])
                    b_eq = exp_ftz(tl.minimum(b_G - b_Gm, SAFE_SPAN))
                    b_kc = tl.trans((b_k * exp_ftz(tl.minimum(b_Gm - b_G, SAFE_SPAN))).to(OP))
                    same = lo[:, None] == lo[None, :]
                    b_aqk += tl.where(same & (o_t[:, None] >= o_t[None, :]),
                                      tl.dot((b_q * b_eq).to(OP), b_kc, input_precision=PREC), 0.0)
                    b_p += tl.where(same & (o_t[:, None] > o_t[None, :]),
                                    tl.dot((b_k * b_eq).to(OP), b_kc, input_precision=PREC), 0.0)
                    flag = 0
                else:
                    flag = 1  # left to the exact launch
                n_flagged += flag
                tl.store(f_base + i_k // FBK + tl.arange(0, 1), tl.full([1], 0, tl.int32) + flag)
    if not PAIRS:
        return
    p_a = a_base + o_t[:, None] * SA + o_t[None, :]
    p_p = Pbuf + s_base + o_t[:, None] * BT + o_t[None, :]
    p_ap = (Apart + (bos * HV + i_hv) * BT) + o_t[:, None] * SA + o_t[None, :]
    if EXACT:
        # read-modify-write: the fast launch (earlier on the stream) stored its partial sums here (A_qk's in
        # Apart when A_qk is stored in bf16)
        if SPLIT_A:
            b_aqk += tl.load(p_ap, mask=m_t[:, None], other=0.0)
        else:
            b_aqk += tl.load(p_a, mask=m_t[:, None], other=0.0)
        b_p += tl.load(p_p)
        tl.store(p_a, b_aqk.to(Aqk.dtype.element_ty), mask=m_t[:, None])
    elif SPLIT_A:
        if n_flagged > 0:
            tl.store(p_ap, b_aqk, mask=m_t[:, None])  # fp32, completed and rounded by the exact launch
        else:
            tl.store(p_a, b_aqk.to(Aqk.dtype.element_ty), mask=m_t[:, None])
    else:
        tl.store(p_a, b_aqk.to(Aqk.dtype.element_ty), mask=m_t[:, None])
    tl.store(p_p, b_p)


@triton.jit
def kda_intra_solve_kernel(
    v, beta, w, u, Pbuf, Mbuf, chunk_bounds, kd, Aqk, AqkM, ready,
    HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    USE_SIGMOID: tl.constexpr, PREC: tl.constexpr, PREC_INV: tl.constexpr, INVERT: tl.constexpr = True,
    M_PIECES: tl.constexpr = False, PREMUL: tl.constexpr = False, SIGNAL: tl.constexpr = False,
    HEAD_MAJOR: tl.constexpr = False,
):
    """Second launch of stage 1 (its own registers, so more programs fit per SM): M from P, then
    w = M diag(beta) (k exp(Gamma)) in place over w's buffer and u = M diag(beta) v. INVERT=False:
    M is read from Mbuf (saved by the forward). PREMUL (the forward's output walk): no w, u; instead
    kd <- (M diag(beta))^T kd in place and AqkM = A_qk M diag(beta) (see ``kda_intra_fwd``). SIGNAL (PREMUL, for a
    walk running beside this launch, with HEAD_MAJOR): each program sets ready[i_c, i_hv] = 1 with release semantics
    once its kd and AqkM are stored; chunks complete in order across heads. HEAD_MAJOR: the grid is (HV, NC) instead
    of (NC, HV)."""
    if HEAD_MAJOR:
        i_hv, i_c = tl.program_id(0), tl.program_id(1)
    else:
        i_c, i_hv = tl.program_id(0), tl.program_id(1)
    bos = tl.load(chunk_bounds + 2 * i_c).to(tl.int64)
    n_rows = tl.load(chunk_bounds + 2 * i_c + 1) - tl.load(chunk_bounds + 2 * i_c)
    hk_base = (bos * HV + i_hv) * K
    u_base = u + (bos * HV + i_hv) * V
    v_base = v + (bos * HV + i_hv) * V
    s_base = (i_c * HV + i_hv).to(tl.int64) * BT * BT
    SG: tl.constexpr = HV * K
    SV: tl.constexpr = HV * V
    o_t = tl.arange(0, BT)
    m_t = o_t < n_rows
    b_beta = beta_rows(beta + bos * HV + i_hv, o_t, m_t, HV, USE_SIGMOID)

    # Phase 2: M = (I + diag(beta) P)^-1 by 16x16 blocks, into the M scratch.
    o_c = tl.arange(0, 16)
    p_base = Pbuf + s_base
    m_base = Mbuf + s_base
    if INVERT:
        b0 = beta_rows(beta + bos * HV + i_hv, 0 * 16 + o_c, 0 * 16 + o_c < n_rows, HV, USE_SIGMOID)
        b1 = beta_rows(beta + bos * HV + i_hv, 1 * 16 + o_c, 1 * 16 + o_c < n_rows, HV, USE_SIGMOID)
        b2 = beta_rows(beta + bos * HV + i_hv, 2 * 16 + o_c, 2 * 16 + o_c < n_rows, HV, USE_SIGMOID)
        b3 = beta_rows(beta + bos * HV + i_hv, 3 * 16 + o_c, 3 * 16 + o_c < n_rows, HV, USE_SIGMOID)
        D0 = _inv_unit_lower(_tile16(p_base, b0, 0, 0, o_c, BT), o_c, PREC_INV)
        D1 = _inv_unit_lower(_tile16(p_base, b1, 1, 1, o_c, BT), o_c, PREC_INV)
        D2 = _inv_unit_lower(_tile16(p_base, b2, 2, 2, o_c, BT), o_c, PREC_INV)
        D3 = _inv_unit_lower(_tile16(p_base, b3, 3, 3, o_c, BT), o_c, PREC_INV)
        A10 = _tile16(p_base, b1, 1, 0, o_c, BT)
        A20 = _tile16(p_base, b2, 2, 0, o_c, BT)
        A21 = _tile16(p_base, b2, 2, 1, o_c, BT)
        A30 = _tile16(p_base, b3, 3, 0, o_c, BT)
        A31 = _tile16(p_base, b3, 3, 1, o_c, BT)
        A32 = _tile16(p_base, b3, 3, 2, o_c, BT)
        M10 = -tl.dot(D1, tl.dot(A10, D0, input_precision=PREC_INV), input_precision=PREC_INV)
        M21 = -tl.dot(D2, tl.dot(A21, D1, input_precision=PREC_INV), input_precision=PREC_INV)
        M20 = -tl.dot(D2, tl.dot(A20, D0, input_precision=PREC_INV) + tl.dot(A21, M10, input_precision=PREC_INV),
                      input_precision=PREC_INV)
        M32 = -tl.dot(D3, tl.dot(A32, D2, input_precision=PREC_INV), input_precision=PREC_INV)
        M31 = -tl.dot(D3, tl.dot(A31, D1, input_precision=PREC_INV) + tl.dot(A32, M21, input_precision=PREC_INV),
                      input_precision=PREC_INV)
        M30 = -tl.dot(D3, tl.dot(A30, D0, input_precision=PREC_INV) + tl.dot(A31, M10, input_precision=PREC_INV)
                      + tl.dot(A32, M20, input_precision=PREC_INV), input_precision=PREC_INV)
        z = tl.zeros([16, 16], dtype=tl.float32)
        _store16(m_base, D0, 0, 0, o_c, BT)
        _store16(m_base, z, 0, 1, o_c, BT)
        _store16(m_base, z, 0, 2, o_c, BT)
        _store16(m_base, z, 0, 3, o_c, BT)
        _store16(m_base, M10, 1, 0, o_c, BT)
        _store16(m_base, D1, 1, 1, o_c, BT)
        _store16(m_base, z, 1, 2, o_c, BT)
        _store16(m_base, z, 1, 3, o_c, BT)
        _store16(m_base, M20, 2, 0, o_c, BT)
        _store16(m_base, M21, 2, 1, o_c, BT)
        _store16(m_base, D2, 2, 2, o_c, BT)
        _store16(m_base, z, 2, 3, o_c, BT)
        _store16(m_base, M30, 3, 0, o_c, BT)
        _store16(m_base, M31, 3, 1, o_c, BT)
        _store16(m_base, M32, 3, 2, o_c, BT)
        _store16(m_base, D3, 3, 3, o_c, BT)
        tl.debug_barrier()

    # Phase 3: w = M (beta k exp(Gamma)), u = M (beta v): one [BT, BT] product per block of columns. With
    # M_PIECES (bf16 v and k exp(Gamma), both exact as bf16 operands) M enters as its bf16 hi + lo halves:
    # two bf16 products, ~16 bits of M against tf32's 10, at the tf32 product's tensor-core cost.
    b_m = tl.load(m_base + o_t[:, None] * BT + o_t[None, :]) * b_beta[None, :]
    if M_PIECES:
        b_mh, b_ml = bf16_halves(b_m)
    if PREMUL:
        # AqkM = A_qk (M diag(beta)); then kd <- (M diag(beta))^T kd, key block by key block, in place
        off_a = (bos * HV + i_hv) * BT + o_t[:, None] * (HV * BT) + o_t[None, :]
        b_a = tl.load(Aqk + off_a, mask=m_t[:, None], other=0.0)
        if M_PIECES:
            b_am = tl.dot(b_a, b_ml, tl.dot(b_a, b_mh))
        else:
            b_am = tl.dot(b_a.to(tl.float32), b_m, input_precision=PREC)
        tl.store(AqkM + off_a, b_am.to(AqkM.dtype.element_ty), mask=m_t[:, None])
        b_mt = tl.load(m_base + o_t[None, :] * BT + o_t[:, None]) * b_beta[:, None]
        if M_PIECES:
            b_mth, b_mtl = bf16_halves(b_mt)
        for i_k in range(0, K, BK):
            o_k = i_k + tl.arange(0, BK)
            m = m_t[:, None] & (o_k < K)[None, :]
            p_kd = (kd + hk_base) + o_t[:, None] * SG + o_k[None, :]
            b_x = tl.load(p_kd, mask=m, other=0.0)
            if M_PIECES:
                b_kx = tl.dot(b_mtl, b_x, tl.dot(b_mth, b_x))
            else:
                b_kx = tl.dot(b_mt, b_x.to(tl.float32), input_precision=PREC)
            tl.store(p_kd, b_kx.to(kd.dtype.element_ty), mask=m)
        if SIGNAL:
            # every thread's stores are done (CTA barrier), then one release at GPU scope publishes them all
            tl.debug_barrier()
            tl.atomic_xchg(ready + i_c * HV + i_hv, 1, sem="release", scope="gpu")
        return
    for i_v in range(0, V, BV):
        o_v = i_v + tl.arange(0, BV)
        m = m_t[:, None] & (o_v < V)[None, :]
        b_v = tl.load(v_base + o_t[:, None] * SV + o_v[None, :], mask=m, other=0.0)
        if M_PIECES:
            b_u = tl.dot(b_ml, b_v, tl.dot(b_mh, b_v))
        else:
            b_u = tl.dot(b_m, b_v.to(tl.float32), input_precision=PREC)
        tl.store(u_base + o_t[:, None] * SV + o_v[None, :], b_u, mask=m)
    for i_k in range(0, K, BK):
        o_k = i_k + tl.arange(0, BK)
        m = m_t[:, None] & (o_k < K)[None, :]
        p_w = (w + hk_base) + o_t[:, None] * SG + o_k[None, :]
        b_x = tl.load(p_w, mask=m, other=0.0)
        if M_PIECES:
            b_wx = tl.dot(b_ml, b_x, tl.dot(b_mh, b_x))
        else:
            b_wx = tl.dot(b_m, b_x.to(tl.float32), input_precision=PREC)
        tl.store(p_w, b_wx.to(w.dtype.element_ty), mask=m)


def aqk_dtype(tile_dtype: torch.dtype) -> torch.dtype:
    """A_qk's storage dtype for value tiles (w, qg, kd) of this dtype: bf16 for bf16 tiles when AQK_BF16, the
    dtype the recurrence multiplies A_qk v_new in (so the stored copy is the one the output used, and the chain's
    A_qk^T do the gradient of that), fp32 otherwise."""
    return torch.bfloat16 if AQK_BF16 and tile_dtype == torch.bfloat16 else torch.float32


def pair_operand_dtype(dtype: torch.dtype):
    """The pair products' operand dtype for inputs of this dtype: bf16 for 16-bit inputs (the factors
    reach exp(SAFE_SPAN), 5.5e34, past fp16's 65504: fp16 operands gave inf outputs on the H200), fp32
    for fp32 inputs and under the interpreter (whose bf16 products overflowed at the same place)."""
    return tl.float32 if dtype == torch.float32 or INTERPRET else tl.bfloat16


_FWD_LAUNCH = LeanLaunch(kda_intra_fwd_kernel)
_SOLVE_LAUNCH = LeanLaunch(kda_intra_solve_kernel)


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
    num_warps: int | None = None,
    block_k: int | None = None,
    exact_block_k: int | None = None,
    exact_warps: int | None = None,
    prec_inv: str | None = None,
    solve_warps: int | None = None,
    safe_span: float | None = None,
    saved: dict[str, torch.Tensor] | None = None,
    store_gamma: bool = False,
    premultiply: bool = False,
    for_backward: bool = True,
    beside_solve=None,
) -> dict[str, torch.Tensor]:
    """q, k ``[TT, H, K]``, v ``[TT, HV, V]``, g ``[TT, HV, K]`` (raw when A_log), beta ``[TT, HV]``
    (flattened tokens), chunk_bounds int32 ``[NC, 2]`` -> dict: Aqk ``[TT, HV, 64]`` (zero above the
    diagonal; bf16 for bf16 v, else fp32: ``aqk_dtype``), w / qg / kd ``[TT, HV, K]`` in v.dtype, u
    ``[TT, HV, V]`` fp32, dl ``[NC, HV, K]`` fp32, and per chunk-head P (the unscaled strictly-lower
    key-key products) and M = (I + diag(beta) P)^-1, both ``[NC, HV, 64, 64]`` fp32 (the backward reads
    them), and exact_flag ``[NC, HV, cdiv(K, block_k)]`` int32 per key block: 0 fast pass, 1 level-16 +
    quarter anchors, 2 six levels.
    block_k / num_warps: the first launch's key-block width and warps (None: FAST_BLOCK_K / FAST_WARPS
    with the pair products, RECOMPUTE_BLOCK_K / RECOMPUTE_WARPS without); the solve's key blocks: block_k
    (None: 64). exact_block_k / exact_warps: the exact launch's key-block width (<= block_k) and warps
    (None: EXACT_BLOCK_K / EXACT_WARPS); solve_warps (None: SOLVE_WARPS); prec_inv: the inverse's
    products (None: SOLVE_INV_PRECISION for 16-bit inputs, ieee for fp32).
    store_gamma: also return gam, Gamma ``[TT, HV, K]`` fp32, and inorm, the rows' 1 / |q| and 1 / |k|
    ``[TT, HV, 2]`` fp32 (ones without the l2norm): the intra backward's block launch reads them.

    saved: Aqk, P and M from an earlier call on the same inputs (the forward keeps them for the
    backward): then only the per-token tensors are recomputed (qg, kd, dl, w, u; no pair products, no
    exact launch, no inverse), the saved three are returned as they are and there is no exact_flag.

    premultiply (the forward's output walk; not with saved): M diag(beta) goes into the walk's other operands
    instead of into w and u. With v_new = M diag(beta) Z, Z = v - k exp(Gamma) S, the walk's o = qg S + A_qk v_new
    and S <- diag(dl) S + kd^T v_new become o = qg S + (A_qk M diag(beta)) Z and S <- diag(dl) S + ((M diag(beta))^T
    kd)^T Z: the same walk over w = k exp(Gamma) (as the fast pass left it), u = v (the input itself, not an fp32
    copy), kd = (M diag(beta))^T kd (in place) and A_qk = AqkM = A_qk M diag(beta) (returned beside the unchanged
    Aqk, which the backward keeps). The solve then reads P and kd, A_qk and writes kd, AqkM: neither v nor an fp32 u
    is read or written (at K = V = 128, bf16: 96 instead of 128 KB a chunk-head in the solve, 64 instead of 72 KB a
    chunk in each 64-column walk program).

    for_backward: the results (A_qk, P, M) feed a backward. False (a forward whose outputs need no gradient) lets
    INTRA_WGMMA = "inference" take the Gluon fast launch.

    beside_solve (with premultiply): called as beside_solve(out, issue_solve) once the launches before the solve are
    issued, in place of the solve's launch: issue_solve(ready) issues it, ready an int32 tensor ``[NC, HV]`` of zeros
    whose entries the solve sets to 1 as each chunk-head's kd and AqkM are stored (release semantics; the grid then
    runs chunk by chunk across heads), for a walk that runs beside it. The walk must be launched after the solve: a
    kernel's first launch may load its module, which can wait for the device, and so for a walk that waits for a solve
    not yet issued (CUDA's lazy loading)."""
    if premultiply and saved is not None:
        raise ValueError("kda_intra_fwd: premultiply is for the forward's own pair products, not with saved")
    if chunk_size != 64:
        raise ValueError(f"chunk_size: the triton backend supports 64, got {chunk_size}")
    TT, H, K = q.shape
    HV, V = v.shape[-2], v.shape[-1]
    NC = chunk_bounds.shape[0]
    dev, f32 = q.device, torch.float32
    pairs = saved is None  # else A_qk, P, M come from the forward
    if pairs:
        mats = dict(Aqk=torch.empty(TT, HV, 64, device=dev, dtype=aqk_dtype(v.dtype)),
                    P=torch.empty(NC, HV, 64, 64, device=dev, dtype=f32),
                    M=torch.empty(NC, HV, 64, 64, device=dev, dtype=f32))
    else:
        mats = {n: saved[n] for n in ("Aqk", "P", "M")}
    out = dict(
        w=torch.empty(TT, HV, K, device=dev, dtype=v.dtype),
        u=v if premultiply else torch.empty(TT, HV, V, device=dev, dtype=f32),
        qg=torch.empty(TT, HV, K, device=dev, dtype=v.dtype),
        kd=torch.empty(TT, HV, K, device=dev, dtype=v.dtype),
        dl=torch.empty(NC, HV, K, device=dev, dtype=f32),
        **mats,
    )
    if store_gamma:
        out["gam"] = torch.empty(TT, HV, K, device=dev, dtype=f32)
        out["inorm"] = (torch.empty(TT, HV, 2, device=dev, dtype=f32) if use_qk_l2norm
                        else torch.ones(TT, HV, 2, device=dev, dtype=f32))
    has_gate = A_log is not None
    span_limit = safe_span if safe_span is not None else (
        SAFE_SPAN if use_qk_l2norm and abs(scale) <= 1e3 else min(SAFE_SPAN, RAW_SAFE_SPAN))
    solve_bk = min(block_k or 64, next_pow2(K))
    fast_overridden = block_k is not None or num_warps is not None
    BK = min(block_k or (FAST_BLOCK_K if pairs else RECOMPUTE_BLOCK_K), next_pow2(K))
    num_warps = num_warps or (FAST_WARPS if pairs else RECOMPUTE_WARPS)
    exact_block_k, exact_warps = exact_block_k or EXACT_BLOCK_K, exact_warps or EXACT_WARPS
    # the register caps and the inverse's precision were measured with 16-bit inputs; fp32 inputs (fp32 tiles)
    # launch uncapped, with the ieee inverse
    half_inputs = q.dtype != torch.float32
    # the flags are neither written nor read without the pair products
    flag = torch.empty(NC, HV, triton.cdiv(K, BK) if pairs else 1, device=dev, dtype=torch.int32)
    # A_qk in bf16: the fast launch's fp32 partial sums of flagged chunk-heads wait in a scratch for the exact launch
    split_a = pairs and mats["Aqk"].dtype != f32
    apart = torch.empty(TT, HV, 64, device=dev, dtype=f32) if split_a else flag
    # the exact launch may use narrower key blocks than the flags' (fewer spills, see the docstring)
    launches = [(False, BK, num_warps)] + ([(True, min(exact_block_k, BK), exact_warps)] if pairs else [])
    # on Hopper, the fast launch in Gluon (same outputs; its flags are per BK = 64 channels, the tl default's width)
    if (pairs and _mode_on("INTRA_WGMMA", INTRA_WGMMA, for_backward) and not fast_overridden and BK == wgmma_intra.BLOCK_K
            and wgmma_intra.fast_wgmma_supported(q, k, v)):
        wgmma_intra.kda_intra_fast_wgmma(q, k, g, A_log, dt_bias, out, apart, flag, chunk_bounds, scale=scale,
                                         lower_bound=lower_bound, use_qk_l2norm=use_qk_l2norm, safe_span=span_limit,
                                         split_a=split_a)
        launches = launches[1:]
    for exact, bk, nw in launches:
        _FWD_LAUNCH[(NC, HV)](
            q, k, g, A_log if has_gate else g, dt_bias if dt_bias is not None else g,
            out["Aqk"], apart, out["w"], out["qg"], out["kd"], out["dl"], out["P"], flag,
            out.get("gam", flag), out.get("inorm", flag), chunk_bounds,
            float(scale), float(lower_bound) if lower_bound is not None else 0.0,
            H=H, HV=HV, K=K, BK=bk, FBK=BK, BT=64,
            HAS_GATE=has_gate, HAS_BIAS=has_gate and dt_bias is not None, HAS_LB=has_gate and lower_bound is not None,
            USE_L2=use_qk_l2norm, PREC="ieee" if INTERPRET else "tf32",
            SAFE_SPAN=span_limit, EXACT=exact, PAIRS=pairs,
            STORE_GAMMA=store_gamma and not exact, OP=pair_operand_dtype(q.dtype), SPLIT_A=split_a,
            num_warps=nw, num_stages=(EXACT_STAGES if exact else FAST_STAGES) if pairs else RECOMPUTE_STAGES,
            **reg_cap(None if exact or not half_inputs else FAST_MAX_REGISTERS if pairs else RECOMPUTE_MAX_REGISTERS),
        )
    if pairs:
        out["exact_flag"] = flag
    inv_prec = "ieee" if INTERPRET else prec_inv or (SOLVE_INV_PRECISION if half_inputs else "ieee")
    m_pieces = SOLVE_M_PIECES and not INTERPRET and v.dtype == torch.bfloat16
    if premultiply:
        out["AqkM"] = torch.empty_like(out["Aqk"])

    def issue_solve(ready: torch.Tensor | None) -> None:
        head_major = (ready is not None or SOLVE_HEAD_MAJOR) and NC <= MAX_GRID_Y
        if ready is not None and not head_major:
            raise ValueError(f"kda_intra_fwd: the solve beside the walk needs NC <= {MAX_GRID_Y} chunks, got {NC}")
        _SOLVE_LAUNCH[(HV, NC) if head_major else (NC, HV)](
            v, beta, out["w"], out["u"], out["P"], out["M"], chunk_bounds, out["kd"], out["Aqk"],
            out.get("AqkM", out["Aqk"]), ready if ready is not None else flag,
            HV=HV, K=K, V=V, BK=solve_bk, BV=min(64, next_pow2(V)), BT=64, USE_SIGMOID=use_beta_sigmoid,
            PREC="ieee" if INTERPRET else "tf32", PREC_INV=inv_prec, INVERT=pairs, M_PIECES=m_pieces,
            PREMUL=premultiply, SIGNAL=ready is not None, HEAD_MAJOR=head_major,
            num_warps=solve_warps or SOLVE_WARPS, num_stages=SOLVE_STAGES,
            **reg_cap(SOLVE_MAX_REGISTERS if half_inputs and not m_pieces else None),
        )

    if beside_solve is not None and premultiply:
        beside_solve(out, issue_solve)
    else:
        issue_solve(None)
    return out
