"""Stage 1's fast launch on Hopper, written in Gluon: the same outputs as the tl fast launch of ``intra.py``.

Per (chunk of 64 tokens, value head), with Gamma the in-chunk cumulative log-decay (see ``intra.py`` for the
mathematics and the exactness argument): qg, kd, k exp(Gamma) (parked in w's buffer), dl, and A_qk, P from anchored
pair products, with the key blocks whose within-half factors would exceed exp(SAFE_SPAN) flagged for the exact launch.
The exact launch and the solve that follow are the tl kernels, unchanged.

What differs from the tl launch is where the work sits:

- Each 32-row half of a [64, 64] key-block tile is its own register tile, laid out so that a warp owns 8 whole
  columns (a thread 2 rows x 4 adjacent columns). The gate's cumsum, the anchor rows (an in-warp gather) and the half
  totals are then in-thread and in-warp operations. Only two steps cross warps: the rows' l2 norms (one joined
  reduction) and both key blocks' spans (another), the second beside the barrier the products need anyway.
- Every global load is issued first; every operand tile goes to shared memory as one [64, BK] store (two stores into
  slices of one buffer get a CTA barrier between them from the compiler); the within-half factors are stored
  unconditionally and zeroed afterwards in the rare flagged key block. 10 barriers per program against 39 in a first
  version, 30 per key block in the tl launch.
- The pair products are wgmma from shared memory, three per key block into two [64, 64] accumulators whose rows are
  two halves of two different matrices:

      X1 = [k_hi e ; q_hi e] (k_lo e')^T  +  [k_hi m ; q_hi m] (k_hi m')^T     -> rows 32..63 of P, then of A_qk
      X2 = [k_lo m ; q_lo m] [k_lo m' ; k_hi m']^T                             -> rows 0..31 of P, then of A_qk

  with e, e' the cross-half factors about row 31 (both <= 1) and m, m' the within-half factors about rows 15 and 47.
  The operands' zero halves keep each kept entry a sum of its own terms only (a masked-out entry may overflow to inf;
  the final select drops it), so no per-key-block select is needed: three products per key block against the tl
  launch's four, each followed there by a select.
- Eight warps (two warpgroups, each owning 32 of the accumulators' 64 columns), 128 registers: two programs per SM.

Hopper only (wgmma). ``intra.kda_intra_fwd`` uses it where ``intra.INTRA_WGMMA`` (by default: in forwards that feed
no backward; see there for why) and ``fast_wgmma_supported`` say so, and the tl fast launch elsewhere (other GPUs,
fp16 / fp32 inputs, the interpreter, explicit launch overrides).

Measured (H200, session 16; the intra stage = this launch + the exact launch + the solve, against the tl fast launch
in the same process, ms, Kimi / bounded gate): B1 T8192 H32 0.580 / 0.546 against 0.641 / 0.587; B4 2.215 / 2.100
against 2.397 / 2.228; B1 T32768 2.165 / 2.101 against 2.342 / 2.227; B1 T8192 H96 1.657 / 1.612 against 1.803 /
1.716: 6-10% less. The version with 39 barriers took the same time as the tl launch; ncu then read 16 warps per SM,
11.7 cycles per issued instruction, stalls on shared-memory / shuffle dependencies (short scoreboard 25%, MIO 15%)
and barriers (11%). 3208 SASS instructions per warp for both key blocks (8 warps) against the tl launch's 4720 per
key block (4 warps).

Session 20: Gamma in log2 units (no x log2(e) multiply before each of the ~200 ex2 a thread), two factors of ten an
element as products of others, the bounded gate's division as one MUFU rcp, Kimi's softplus as lg2(1 + ex2) and one
compare an entry for the final masks: 3208 -> 2552 SASS a warp (Kimi gate), 3064 -> 2520 (bounded). The launch
itself 0.331 -> 0.322 ms (Kimi), 0.342 -> 0.326 (bounded) at B1 (torch.profiler, H200); the forward 1-2.5% less.
So the launch was not issue-bound alone: its 16 warps an SM also wait on the loads, shuffles and barriers.

Session 21 (ncu, B1 T8192 H96 bounded gate): the L1 was the limit (77% busy), not the issue rate (27%): the row
norms' cross-warp sum (gl.sum's exchange through shared memory) had 16-way bank conflicts, 25 M of the launch's 59 M
shared-memory wavefronts, and the per-thread loads of q, k, g (8 bytes a row, a warp 16 bytes a row) moved each
32-byte sector twice. Now the norms go through a buffer of each warp's partial sums that every warp reads whole
(broadcast loads), and q, k, g come by TMA into three of the operand buffers (TMA_LOADS): the launch 1.008 -> 0.813
ms at H96, the forward 1.889 -> 1.690 (bounded gate), same outputs bit for bit with the gate fused.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from hla.ops.kda.triton.common import LOG2E, MAX_GRID_Y, on_hopper, reg_cap, tma_descriptor
from hla.ops.kda.triton.launch import LeanLaunch

BLOCK_K = 64  # key-block width: also the flags' width, which the exact launch reads
NUM_WARPS = 8
# ~175 registers uncapped (one program of 8 warps per SM); at 128, 56-84 B of spills (132 B with the TMA loads, whose
# tiles come from shared memory) and two programs per SM (their 2 x 100 KB of operand tiles and norms fit). Offline
# sm_90a compile, kda_prefill_regs.py. H200, B1 T8192 H32, a first version: the intra stage 0.896 ms uncapped against
# 0.675 at 128.
MAX_REGISTERS: int | None = 128
# Programs in head-major order (the grid (HV, NC): the programs running together read and write neighbouring token
# rows) where the chunks fit the grid's second dimension. H200, forward ms (session 20, with the solve's the same):
# B1 T8192 H96 1.891 -> 1.864 bounded, B4 2.365 -> 2.299, T32K 2.436 -> 2.400, B1 0.638 -> 0.630: 1-3%.
HEAD_MAJOR_GRID = True
# q, k, g by TMA into three of the operand buffers, then read into the tiles' layout, where g is bf16 and the three are
# contiguous (else per-thread loads of 8 bytes a row, which move each 32-byte sector twice). H200, session 21, forward
# ms: B1 T8192 H96 1.842 -> 1.690 bounded, 1.891 -> 1.751 Kimi; B4 2.268 -> 2.110; the launch 0.956 -> 0.813 at H96.
TMA_LOADS = True


def fast_wgmma_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the Gluon fast launch runs these inputs: CUDA sm_90 (wgmma), bf16 q, k, v, K in {64, 128}."""
    return on_hopper(q) and (q.dtype == k.dtype == v.dtype == torch.bfloat16) and q.shape[-1] in (64, 128)


@gluon.jit
def _rcp(x):
    # 1 / x on one MUFU rcp (x >= 1 here: no subnormal to flush); `/` lowers to div.full with its range checks
    return gl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=gl.float32, is_pure=True,
                                     pack=1)


@gluon.jit
def _lg2(x):
    return gl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=gl.float32, is_pure=True, pack=1)


@gluon.jit
def _add(a, b):
    return a + b


@gluon.jit
def _gate(x, mask, a, bias, lower_bound, HAS_GATE: gl.constexpr, HAS_BIAS: gl.constexpr, HAS_LB: gl.constexpr):
    """The per-token log-decay of one loaded half tile [32, BK] in log2 units (g log2(e)) -> fp32, 0 on masked rows
    when the gate is fused. With the gate fused, a and lower_bound come scaled by the caller: a = -exp(A_log)
    log2(e) for the bounded gate (the sigmoid's exponent), -exp(A_log) for Kimi's; lower_bound log2(e).

    Kimi's softplus as lg2(1 + 2^(x log2 e)) (x itself above 20, as torch): where e^x is small, lg2.approx's
    absolute error (~2^-22) is most of the result, where ``common.softplus_f32`` keeps its relative precision for the
    backward's dA_log. A forward's outputs see only the absolute error of Gamma: <= 64 x 2^-22 x |a| over a chunk."""
    x = x.to(gl.float32)
    if HAS_GATE:
        if HAS_BIAS:
            x = x + bias[None, :]
        if HAS_LB:
            x = lower_bound * _rcp(1.0 + gl.exp2(a * x))
        else:
            xl = x * LOG2E
            x = a * gl.where(x > 20.0, xl, _lg2(1.0 + gl.exp2(xl)))
        x = gl.where(mask, x, 0.0)
    else:
        x = x * LOG2E
    return x


@gluon.jit
def _sq(x):
    x = x.to(gl.float32)
    return x * x


@gluon.jit
def _warp_partials(buf, x0, x1, x2, x3, HB: gl.constexpr, BK: gl.constexpr, NW: gl.constexpr):
    """x0..x3 [HB, BK] (a warp owning BK // NW whole columns) -> each warp's row sums into buf [4 NW, HB] (xj's in
    rows j NW..j NW + NW - 1, each row's HB sums contiguous: the 16 row lanes of a store write consecutive words), in
    one store (stores into slices of one buffer get a CTA barrier between them)."""
    p0 = gl.sum(gl.reshape(x0, [HB, NW, BK // NW]), axis=2)
    p1 = gl.sum(gl.reshape(x1, [HB, NW, BK // NW]), axis=2)
    p2 = gl.sum(gl.reshape(x2, [HB, NW, BK // NW]), axis=2)
    p3 = gl.sum(gl.reshape(x3, [HB, NW, BK // NW]), axis=2)
    p = gl.permute(gl.join(gl.join(p0, p1), gl.join(p2, p3)), [3, 2, 1, 0])  # [2, 2, NW, HB]: x(2b + a) at [b, a]
    buf.store(gl.reshape(p, [4 * NW, HB]))


@gluon.jit
def _warp_total(buf, NW: gl.constexpr, RL: gl.constexpr):
    """The sum over buf [NW, HB]'s warps, in the row layout RL (the fast launch's: 2 rows a thread, 16 lanes down the
    rows): each thread reads all NW partials of its rows, the same words in every warp (broadcast loads)."""
    LW: gl.constexpr = gl.BlockedLayout([NW, 2], [2, 16], [NW, 1], [0, 1])
    return gl.convert_layout(gl.sum(buf.load(LW), axis=0), RL)


@gluon.jit
def _half(buf, kb: gl.constexpr, row: gl.constexpr, mask, HB: gl.constexpr, L: gl.constexpr):
    """Rows row..row + HB of key block kb of a TMA-filled [NK, BT, BK] buffer, in L, zero where mask is not set."""
    x = buf.index(kb).slice(row, HB).load(L)
    return gl.where(mask, x, gl.zeros_like(x))  # kept bf16 (a float 0.0 would promote the tile to fp32)


@gluon.jit
def _loaded_tiles(q_s, k_s, g_s, kb: gl.constexpr, m_lo, m_hi, HB: gl.constexpr, L: gl.constexpr):
    """Key block kb's six half tiles (q, k, g; rows 0..HB - 1, then HB..) from the TMA-filled buffers."""
    return (_half(q_s, kb, 0, m_lo, HB, L), _half(q_s, kb, HB, m_hi, HB, L), _half(k_s, kb, 0, m_lo, HB, L),
            _half(k_s, kb, HB, m_hi, HB, L), _half(g_s, kb, 0, m_lo, HB, L), _half(g_s, kb, HB, m_hi, HB, L))


@gluon.jit
def _stack(lo, hi):
    """Two [32, BK] half tiles as one [64, BK] tile (lo's rows first): one shared-memory store instead of two into
    slices of one buffer, between which the compiler places a CTA barrier."""
    x = gl.permute(gl.join(lo, hi), [2, 0, 1])
    return gl.reshape(x, [2 * x.shape[1], x.shape[2]])


@gluon.jit
def _row(x, i: gl.constexpr, BK: gl.constexpr, L: gl.constexpr):
    """Row i of a [32, BK] half tile, as a [1, BK] tile (an in-warp gather: the rows lie within one warp)."""
    return gl.gather(x, gl.full([1, BK], i, gl.int32, L), 0)


@gluon.jit
def _store_tokens(qg, w, kd, off, mask, x_qg, x_w, x_kd):
    """A half tile's per-token outputs qg = q 2^Gamma, k 2^Gamma (into w's buffer) and kd = k 2^(Gamma_last - Gamma)
    as bf16, at the chunk-head's scalar bases qg, w, kd plus the int32 tile offsets off."""
    gl.store(qg + off, x_qg.to(gl.bfloat16), mask=mask)
    gl.store(w + off, x_w.to(gl.bfloat16), mask=mask)
    gl.store(kd + off, x_kd.to(gl.bfloat16), mask=mask)


@gluon.jit
def _key_block(bq_lo, bq_hi, bk_lo, bk_hi, g_lo, g_hi, kb: gl.constexpr, rq_lo, rq_hi, rk_lo, rk_hi, m_lo, m_hi, t_lo,
               t_hi, a, dt_bias, lower_bound, dl, qg, w, kd, hk, i_c, i_hv, c, xa_s, ma_s, mb_s, km_s, kc_s,
               HV: gl.constexpr, K: gl.constexpr, BK: gl.constexpr, BT: gl.constexpr, L: gl.constexpr,
               CL: gl.constexpr, HAS_GATE: gl.constexpr, HAS_BIAS: gl.constexpr, HAS_LB: gl.constexpr,
               SPAN2: gl.constexpr):
    """One key block from its loaded half tiles: the gate and Gamma (log2 units, so that each factor is one ex2), dl,
    qg, k exp(Gamma), kd stored, the five operand tiles into shared memory (within-half factors unconditionally) -> the
    span's per-column part [1, BK], in log2 units (SPAN2 = SAFE_SPAN log2(e)).

    Two of the ten factors an element are products of others, both factors <= 1 (Gamma does not increase down the
    chunk), so a product underflows only where the factor itself does: kd's 2^(Gl - G) = 2^(G2 - G) 2^(Gl - G2) in
    rows 0..31, 2^G = 2^(G - G2) 2^G2 in rows 32..63."""
    HB: gl.constexpr = BT // 2
    QB: gl.constexpr = HB // 2
    i_k = kb * BK
    bias = gl.zeros([BK], gl.float32, CL)
    if HAS_BIAS:
        bias = gl.load(dt_bias + i_hv * K + i_k + c).to(gl.float32)
    g_lo = _gate(g_lo, m_lo, a, bias, lower_bound, HAS_GATE, HAS_BIAS, HAS_LB)
    g_hi = _gate(g_hi, m_hi, a, bias, lower_bound, HAS_GATE, HAS_BIAS, HAS_LB)
    # the anchors: Gamma at rows 15, 31, 47 and 63 (padding rows carry g = 0), as [1, BK] rows
    G_lo = gl.associative_scan(g_lo, 0, _add)
    G2 = _row(G_lo, HB - 1, BK, L)
    G_hi = gl.associative_scan(g_hi, 0, _add) + G2
    Gl = _row(G_hi, HB - 1, BK, L)
    G1 = _row(G_lo, QB - 1, BK, L)
    G3 = _row(G_hi, QB - 1, BK, L)
    gl.store(dl + (i_c * HV + i_hv).to(gl.int64) * K + i_k + c[None, :], gl.exp2(Gl))

    # rows 0..31
    bq = bq_lo.to(gl.float32) * rq_lo[:, None]
    bk = bk_lo.to(gl.float32) * rk_lo[:, None]
    eg = gl.exp2(G_lo)
    kc = bk * gl.exp2(G2 - G_lo)
    _store_tokens(qg + hk, w + hk, kd + hk, t_lo + i_k, m_lo, bq * eg, bk * eg, kc * gl.exp2(Gl - G2))
    zero = gl.zeros([HB, BK], gl.bfloat16, L)
    kc_s.index(kb).slice(0, BT).store(_stack(kc.to(gl.bfloat16), zero))
    d = G_lo - G1  # its negation is free in the min below: one subtraction for both within-half factors
    em = gl.exp2(gl.minimum(d, SPAN2))
    mb_s.index(kb).store(_stack((bk * em).to(gl.bfloat16), (bq * em).to(gl.bfloat16)))
    km_lo = (bk * gl.exp2(gl.minimum(-d, SPAN2))).to(gl.bfloat16)
    # rows 32..63
    bq = bq_hi.to(gl.float32) * rq_hi[:, None]
    bk = bk_hi.to(gl.float32) * rk_hi[:, None]
    ex = gl.exp2(G_hi - G2)
    bkx = bk * ex
    bqx = bq * ex
    xa_s.index(kb).store(_stack(bkx.to(gl.bfloat16), bqx.to(gl.bfloat16)))
    e2 = gl.exp2(G2)
    _store_tokens(qg + hk, w + hk, kd + hk, t_hi + i_k, m_hi, bqx * e2, bkx * e2, bk * gl.exp2(Gl - G_hi))
    d = G_hi - G3
    em = gl.exp2(gl.minimum(d, SPAN2))
    ma_s.index(kb).store(_stack((bk * em).to(gl.bfloat16), (bq * em).to(gl.bfloat16)))
    km_hi = (bk * gl.exp2(gl.minimum(-d, SPAN2))).to(gl.bfloat16)
    km_s.index(kb).store(_stack(km_lo, km_hi))
    kc_s.index(kb).slice(BT, BT).store(_stack(zero, km_hi))
    return gl.maximum(gl.maximum(-G1, G1 - G2), gl.maximum(G2 - G3, G3 - Gl))


@gluon.jit
def kda_intra_fast_wgmma_kernel(
    q, k, g, q_desc, k_desc, g_desc, A_log, dt_bias, Aqk, Apart, w, qg, kd, dl, Pbuf, exact_flag, chunk_bounds, scale,
    lower_bound,
    H: gl.constexpr, HV: gl.constexpr, K: gl.constexpr, BK: gl.constexpr, BT: gl.constexpr,
    HAS_GATE: gl.constexpr, HAS_BIAS: gl.constexpr, HAS_LB: gl.constexpr, USE_L2: gl.constexpr,
    SAFE_SPAN: gl.constexpr, SPLIT_A: gl.constexpr, HEAD_MAJOR: gl.constexpr = False,
    TMA_LOADS: gl.constexpr = False,
):
    """Arguments as ``intra.kda_intra_fwd_kernel``'s fast launch (EXACT=False, PAIRS=True); flags per BK channels.
    HEAD_MAJOR: the grid is (HV, NC) instead of (NC, HV). TMA_LOADS: q, k, g are read through q_desc, k_desc, g_desc
    (TMA descriptors of their [TT, heads * K] views, [BT, BK] boxes in the operand tiles' layout), else by pointer."""
    HB: gl.constexpr = BT // 2
    NK: gl.constexpr = K // BK
    # [32, 64] half tiles: a thread 2 rows x 4 columns, 16 lanes down the rows, a warp 8 whole columns
    L: gl.constexpr = gl.BlockedLayout([2, 4], [16, 2], [1, 8], [1, 0])
    RL: gl.constexpr = gl.SliceLayout(1, L)
    CL: gl.constexpr = gl.SliceLayout(0, L)
    L2: gl.constexpr = gl.BlockedLayout([4, 4], [16, 2], [1, 8], [1, 0])  # [64, 64] tiles (the zero fill)
    # [64, 64] accumulators: warpgroup 0 columns 0..31, warpgroup 1 columns 32..63
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, 32, 16])
    SL: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    SQ: gl.constexpr = H * K
    SG: gl.constexpr = HV * K
    SA: gl.constexpr = HV * BT

    if HEAD_MAJOR:
        i_hv, i_c = gl.program_id(0), gl.program_id(1)
    else:
        i_c, i_hv = gl.program_id(0), gl.program_id(1)
    i_h = i_hv // (HV // H)
    bos = gl.load(chunk_bounds + 2 * i_c).to(gl.int64)
    n_rows = gl.load(chunk_bounds + 2 * i_c + 1) - gl.load(chunk_bounds + 2 * i_c)
    hk = (bos * HV + i_hv) * K
    r = gl.arange(0, HB, RL)
    c = gl.arange(0, BK, CL)
    m_lo = (r < n_rows)[:, None]
    m_hi = (r + HB < n_rows)[:, None]
    t_lo = r[:, None] * SG + c[None, :]
    t_hi = t_lo + HB * SG

    # operand tiles, one set per key block (no reuse, so no wait between key blocks): xa = [k_hi e; q_hi e],
    # ma = [k_hi m; q_hi m], mb = [k_lo m; q_lo m], km = [k_lo m'; k_hi m'], kc = [k_lo e'; 0; 0; k_hi m'] (its
    # rows 0..63 and 64..127 are the two right operands of X1: a slice may only start at a multiple of its length)
    xa_s = gl.allocate_shared_memory(gl.bfloat16, [NK, BT, BK], SL)
    ma_s = gl.allocate_shared_memory(gl.bfloat16, [NK, BT, BK], SL)
    mb_s = gl.allocate_shared_memory(gl.bfloat16, [NK, BT, BK], SL)
    km_s = gl.allocate_shared_memory(gl.bfloat16, [NK, BT, BK], SL)
    kc_s = gl.allocate_shared_memory(gl.bfloat16, [NK, 2 * BT, BK], SL)

    if TMA_LOADS:
        # q, k, g of the chunk-head by TMA into three of the operand buffers (whole 32-byte sectors, no load
        # instructions: per-thread loads of 8 bytes a row used half of each sector they moved), then into registers;
        # rows past the sequence's end (the next sequence's tokens) are zeroed here, rows past the tensor by TMA
        bar = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
        mbarrier.init(bar.index(0), count=1)
        mbarrier.expect(bar.index(0), 3 * NK * BT * BK * 2)
        tok = bos.to(gl.int32)
        for kb in gl.static_range(NK):
            tma.async_copy_global_to_shared(q_desc, [tok, i_h * K + kb * BK], bar.index(0), xa_s.index(kb))
            tma.async_copy_global_to_shared(k_desc, [tok, i_h * K + kb * BK], bar.index(0), ma_s.index(kb))
            tma.async_copy_global_to_shared(g_desc, [tok, i_hv * K + kb * BK], bar.index(0), mb_s.index(kb))
        mbarrier.wait(bar.index(0), 0)
        q0l, q0h, k0l, k0h, g0l, g0h = _loaded_tiles(xa_s, ma_s, mb_s, 0, m_lo, m_hi, HB, L)
        if NK == 2:
            q1l, q1h, k1l, k1h, g1l, g1h = _loaded_tiles(xa_s, ma_s, mb_s, 1, m_lo, m_hi, HB, L)
        else:
            q1l, q1h, k1l, k1h, g1l, g1h = q0l, q0h, k0l, k0h, g0l, g0h
        if not USE_L2:  # every warp's reads done before the key blocks overwrite the buffers (else the norms' barrier)
            gl.thread_barrier()
    else:
        # every global load first (q, k, g of both key blocks: 12 half tiles, 48 registers as bf16), so their latency
        # overlaps; the l2 norms and the key blocks then work from registers
        q_base = q + (bos * H + i_h) * K
        k_base = k + (bos * H + i_h) * K
        g_base = g + (bos * HV + i_hv) * K
        p_lo = r[:, None] * SQ + c[None, :]
        p_hi = p_lo + HB * SQ
        q0l = gl.load(q_base + p_lo, mask=m_lo, other=0.0)
        q0h = gl.load(q_base + p_hi, mask=m_hi, other=0.0)
        k0l = gl.load(k_base + p_lo, mask=m_lo, other=0.0)
        k0h = gl.load(k_base + p_hi, mask=m_hi, other=0.0)
        g0l = gl.load(g_base + t_lo, mask=m_lo, other=0.0)
        g0h = gl.load(g_base + t_hi, mask=m_hi, other=0.0)
        if NK == 2:
            q1l = gl.load(q_base + (p_lo + BK), mask=m_lo, other=0.0)
            q1h = gl.load(q_base + (p_hi + BK), mask=m_hi, other=0.0)
            k1l = gl.load(k_base + (p_lo + BK), mask=m_lo, other=0.0)
            k1h = gl.load(k_base + (p_hi + BK), mask=m_hi, other=0.0)
            g1l = gl.load(g_base + (t_lo + BK), mask=m_lo, other=0.0)
            g1h = gl.load(g_base + (t_hi + BK), mask=m_hi, other=0.0)
        else:
            q1l, q1h, k1l, k1h, g1l, g1h = q0l, q0h, k0l, k0h, g0l, g0h

    if USE_L2:
        # the four row norms: squares summed over the key blocks, then over each warp's columns, then across warps
        sq_ql = _sq(q0l)
        sq_qh = _sq(q0h)
        sq_kl = _sq(k0l)
        sq_kh = _sq(k0h)
        if NK == 2:
            sq_ql += _sq(q1l)
            sq_qh += _sq(q1h)
            sq_kl += _sq(k1l)
            sq_kh += _sq(k1h)
        # the four row norms' cross-warp step through a buffer the 16 row lanes write in consecutive words and every
        # warp reads whole (broadcast loads): gl.sum's own exchange had 16-way bank conflicts, ~40% of the launch's
        # shared-memory traffic (ncu, session 21)
        NW: gl.constexpr = 8  # L's warps, along the columns
        nbuf = gl.allocate_shared_memory(gl.float32, [4 * NW, HB], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
        _warp_partials(nbuf, sq_ql, sq_qh, sq_kl, sq_kh, HB, BK, NW)
        gl.thread_barrier()  # also: every warp has read the TMA-filled buffers before the key blocks overwrite them
        nq_lo = _warp_total(nbuf.slice(0 * NW, NW), NW, RL)
        nq_hi = _warp_total(nbuf.slice(1 * NW, NW), NW, RL)
        nk_lo = _warp_total(nbuf.slice(2 * NW, NW), NW, RL)
        nk_hi = _warp_total(nbuf.slice(3 * NW, NW), NW, RL)
        rq_lo = scale / gl.sqrt(nq_lo + 1e-6)
        rq_hi = scale / gl.sqrt(nq_hi + 1e-6)
        rk_lo = 1.0 / gl.sqrt(nk_lo + 1e-6)
        rk_hi = 1.0 / gl.sqrt(nk_hi + 1e-6)
    else:
        rq_lo = gl.full([HB], scale, gl.float32, RL)
        rq_hi = rq_lo
        rk_lo = gl.full([HB], 1.0, gl.float32, RL)
        rk_hi = rk_lo

    # the gate's scalars in the log2 units of Gamma (see _gate)
    SPAN2: gl.constexpr = SAFE_SPAN * LOG2E
    a = 0.0
    lb2 = lower_bound * LOG2E
    if HAS_GATE:
        a = -gl.exp(gl.load(A_log + i_hv).to(gl.float32))
        if HAS_LB:
            a = a * LOG2E

    # Every key block's tiles first, with no cross-warp step between them: the within-half factors are stored
    # unconditionally and a flagged key block's are zeroed afterwards (rare: ~8% of chunk-heads at the benchmark's
    # Kimi gate, none bounded), so the one cross-warp reduction (both key blocks' spans) sits beside the barrier the
    # products need anyway.
    sp0 = _key_block(q0l, q0h, k0l, k0h, g0l, g0h, 0, rq_lo, rq_hi, rk_lo, rk_hi, m_lo, m_hi, t_lo, t_hi, a, dt_bias,
                     lb2, dl, qg, w, kd, hk, i_c, i_hv, c, xa_s, ma_s, mb_s, km_s, kc_s, HV, K, BK, BT, L, CL,
                     HAS_GATE, HAS_BIAS, HAS_LB, SPAN2)
    sp1 = sp0
    if NK == 2:
        sp1 = _key_block(q1l, q1h, k1l, k1h, g1l, g1h, 1, rq_lo, rq_hi, rk_lo, rk_hi, m_lo, m_hi, t_lo, t_hi, a,
                         dt_bias, lb2, dl, qg, w, kd, hk, i_c, i_hv, c, xa_s, ma_s, mb_s, km_s, kc_s, HV, K, BK,
                         BT, L, CL, HAS_GATE, HAS_BIAS, HAS_LB, SPAN2)
    span0, span1 = gl.split(gl.max(gl.join(sp0, sp1), axis=1))
    span0 = gl.max(span0, axis=0)
    span1 = gl.max(span1, axis=0)
    n_flagged = 0
    for kb in gl.static_range(NK):
        span = span0 if kb == 0 else span1
        flagged = span > SPAN2
        gl.store(exact_flag + (i_c * HV + i_hv) * NK + kb, flagged.to(gl.int32))
        n_flagged += flagged.to(gl.int32)
        if flagged:  # no within-half products for this key block: the exact launch adds them
            ma_s.index(kb).store(gl.zeros([BT, BK], gl.bfloat16, L2))
            mb_s.index(kb).store(gl.zeros([BT, BK], gl.bfloat16, L2))

    # every warp's tiles are written (and fenced for the async proxy) before either warpgroup reads them
    fence_async_shared()
    gl.thread_barrier()
    x1 = gl.zeros([BT, BT], gl.float32, MMA)
    x2 = gl.zeros([BT, BT], gl.float32, MMA)
    for kb in gl.static_range(NK):
        x1 = warpgroup_mma(xa_s.index(kb), kc_s.index(kb).slice(0, BT).permute([1, 0]), x1, is_async=True)
        x1 = warpgroup_mma(ma_s.index(kb), kc_s.index(kb).slice(BT, BT).permute([1, 0]), x1, is_async=True)
        x2 = warpgroup_mma(mb_s.index(kb), km_s.index(kb).permute([1, 0]), x2, is_async=True)
    x1, x2 = warpgroup_mma_wait(0, deps=(x1, x2))

    # X1's rows: 0..31 are P's rows 32..63, 32..63 are A_qk's rows 32..63; X2's: P's rows 0..31, A_qk's rows 0..31.
    # Kept: j < i in P, j <= i in A_qk (the cross-half entries of X1 are all j < i).
    ri = gl.arange(0, BT, gl.SliceLayout(1, MMA))
    cj = gl.arange(0, BT, gl.SliceLayout(0, MMA))[None, :]
    top = (ri < HB)[:, None]
    i1 = gl.where(ri < HB, ri + HB, ri)[:, None]
    i2 = gl.where(ri < HB, ri, ri - HB)[:, None]
    # kept where cj < i (P, the top rows) or cj < i + 1 (A_qk): one compare an entry against a per-row bound
    x1 = gl.where(cj < i1 + (ri >= HB).to(gl.int32)[:, None], x1, 0.0)
    x2 = gl.where(cj < i2 + (ri >= HB).to(gl.int32)[:, None], x2, 0.0)
    p_base = Pbuf + (i_c * HV + i_hv).to(gl.int64) * BT * BT
    gl.store(p_base + (i1 * BT + cj), x1, mask=top)
    gl.store(p_base + (i2 * BT + cj), x2, mask=top)
    a_off = (bos * HV + i_hv) * BT
    m1 = (ri >= HB)[:, None] & (i1 < n_rows)
    m2 = (ri >= HB)[:, None] & (i2 < n_rows)
    if SPLIT_A and n_flagged > 0:  # fp32 partial sums: the exact launch completes and rounds them
        gl.store(Apart + a_off + (i1 * SA + cj), x1, mask=m1)
        gl.store(Apart + a_off + (i2 * SA + cj), x2, mask=m2)
    else:
        gl.store(Aqk + a_off + (i1 * SA + cj), x1.to(Aqk.dtype.element_ty), mask=m1)
        gl.store(Aqk + a_off + (i2 * SA + cj), x2.to(Aqk.dtype.element_ty), mask=m2)
    if TMA_LOADS:  # here, so that no later buffer takes the barrier's place (a CTA barrier before each use of it)
        mbarrier.invalidate(bar.index(0))


_FAST_LAUNCH = LeanLaunch(kda_intra_fast_wgmma_kernel)


def kda_intra_fast_wgmma(q, k, g, A_log, dt_bias, out: dict, apart: torch.Tensor, flag: torch.Tensor,
                         chunk_bounds: torch.Tensor, *, scale: float, lower_bound: float | None, use_qk_l2norm: bool,
                         safe_span: float, split_a: bool) -> None:
    """The fast launch over q, k ``[TT, H, K]``, g ``[TT, HV, K]`` (raw when A_log) into ``out``'s Aqk, w, qg, kd, dl
    and P (shapes as ``intra.kda_intra_fwd``'s), the flags ``[NC, HV, K // BLOCK_K]`` and, with split_a, the fp32
    A_qk partials of flagged chunk-heads in apart. Check ``fast_wgmma_supported`` first."""
    TT, H, K = q.shape
    HV = g.shape[1]
    NC = chunk_bounds.shape[0]
    has_gate = A_log is not None
    head_major = HEAD_MAJOR_GRID and NC <= MAX_GRID_Y
    # TMA needs 16-byte aligned bases and row strides (the rows are heads * K >= 64 elements)
    tma_loads = TMA_LOADS and g.dtype == torch.bfloat16 and all(
        x.is_contiguous() and x.data_ptr() % 16 == 0 for x in (q, k, g))
    if tma_loads:
        q_desc, k_desc, g_desc = (tma_descriptor(x, [64, BLOCK_K]) for x in (q, k, g))
    else:
        q_desc = k_desc = g_desc = q  # never read
    _FAST_LAUNCH[(HV, NC) if head_major else (NC, HV)](
        q, k, g, q_desc, k_desc, g_desc, A_log if has_gate else g, dt_bias if dt_bias is not None else g, out["Aqk"],
        apart, out["w"], out["qg"], out["kd"], out["dl"], out["P"], flag, chunk_bounds, float(scale),
        float(lower_bound) if lower_bound is not None else 0.0,
        H=H, HV=HV, K=K, BK=BLOCK_K, BT=64, HAS_GATE=has_gate, HAS_BIAS=has_gate and dt_bias is not None,
        HAS_LB=has_gate and lower_bound is not None, USE_L2=use_qk_l2norm, SAFE_SPAN=safe_span, SPLIT_A=split_a,
        HEAD_MAJOR=head_major, TMA_LOADS=tma_loads, num_warps=NUM_WARPS, **reg_cap(MAX_REGISTERS),
    )
