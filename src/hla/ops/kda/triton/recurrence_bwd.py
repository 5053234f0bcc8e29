"""Stage 3 backward in two launches: a sequential chain for dS, then the per-chunk products in parallel.

Per chunk c (S = the state at chunk entry, fp32 ``[K, V]``; dS = the gradient of the chunk's exit state):

    dv_new   = A_qk^T do + kd dS                       (chain)
    dS_entry = dl[:, None] dS + qg^T do - w^T dv_new   (chain: the previous chunk's dS)
    dqg = do S^T,  dw = -dv_new S^T,  dkd = v_new dS^T  (products)
    dA_qk = tril(do v_new^T),  ddl = sum_v S * dS        (products)

Only ``dv_new`` and the state update sit on the reverse dependency chain, so the chain kernel keeps
just dS ``[K, BV]`` in registers and writes dS per chunk; A_qk^T do and qg^T do do not depend on dS:
their loads come first in the loop body. A_qk^T do is, for bf16 tiles, one bf16 product in the walk of the
bf16 A_qk the forward stored (intra.AQK_BF16; with an fp32 A_qk two bf16 products of its hi + lo halves,
CHAIN_ADV); for fp16 tiles a parallel launch (``kda_chain_adv_kernel``) writes it into
dv_new's buffer before the walk; fp32 tiles and K > 128 take one tf32 product in the walk. Every other
product needs dS and S of one chunk only: one program per (chunk, value head) sums them over all value
blocks in registers and writes each gradient once, instead of one partial per value block
(recurrence.py's single-kernel backward wrote ``[NV, ...]`` partials and spilled).

Registers (the single kernel spilled): pointers are an int64 scalar base per chunk plus int32 tile
offsets, never int64 offset tiles. Precision: the chain's products of bf16 tiles with the fp32 dS and
dv_new are bf16 hi + lo halves (two bf16 tensor-core products, ~16 mantissa bits against tf32's 10;
FLA 0.6.0 rounds dS to bf16); fp32 inputs multiply in tf32. The chain carries dS in fp32 and writes
it per chunk as a bf16 snapshot for bf16 inputs (SNAPSHOT_DH); with the forward's bf16 h and v_new
snapshots (recurrence.py) the products kernel multiplies them with do in bf16, fp32 accumulation
(dw's product, with the fp32 dv_new, in tf32); other inputs keep fp32 snapshots and tf32 products.
``_chain_launch`` gives the launch and its history; register and spill rows:
benchmarks/kda_prefill_regs.py --only chain,products.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from hla.ops.kda.triton.common import INTERPRET, bf16_halves, next_pow2, refuse_one_stage_16bit, reg_cap

BT = 64
# kda_chain_adv_kernel's value columns per program and warps (read at each call). H200, B1 T8192 H32
# D128, the chain stage (this launch + the walk), two runs (session 9): BV 64 / 2 warps 0.377 / 0.376 ms,
# 64 / 4 0.395 / 0.396, 128 / 4 0.403, 128 / 8 0.407, 32 / 2 0.405, 32 / 4 0.432.
ADV_BLOCK_V, ADV_WARPS = 64, 2
# The products launch's register cap (None: ptxas chooses, 255 at 8 warps, one program per SM): capped at 168
# 0.706 ms and at 128 0.863 against 0.418 (session 10, H200, B1 T8192 H32 D128).
PRODUCTS_MAX_REGISTERS = None
# The products launch's pipeline stages. fp32 snapshots (PRODUCTS_STAGES_FP32): 1 stage 0.578 ms against 0.418 at 2;
# 3 do not fit (245 KB of shared memory asked; session 13). bf16 snapshots (PRODUCTS_STAGES, session 14, fwd+bwd
# B1 T8192 H32 D128 bounded gate, two runs): 2 stages 3.553 / 3.552 ms, 3 stages 3.528 / 3.512.
PRODUCTS_STAGES = 3
PRODUCTS_STAGES_FP32 = 2
# Where the 16-bit chain (K <= 128) forms A_qk^T do: "mixed" inside the walk, A_qk's fp32 tile as bf16 hi + lo
# meeting the bf16 do (two bf16 products, ~16 bits against the launch's tf32 10), or "launch" by
# kda_chain_adv_kernel before the walk. Session 13 (H200, B1 T8192 H32 D128, two runs): chain stage 0.377 / 0.375
# ms ("launch": 0.10 of it the adv launch, which also writes and the walk re-reads an fp32 [TT, HV, V]) -> 0.312 /
# 0.311 ("mixed"); fwd+bwd bounded 3.730 / 3.717 -> 3.651 / 3.659, Kimi 3.810 / 3.793 -> 3.731 / 3.731. Offline
# 255 registers, no spills, 205 KB of shared memory at 3 stages. dh and dv_new moved by 1.2e-4 / 2.3e-4 relative
# to the "launch" chain (its tf32 product), against 4.5e-4 for an all-tf32 chain. Sessions 5-6 saw every bf16
# walk with a *tf32* A_qk^T do fault (see _chain_launch); with the hi + lo form compute-sanitizer ran clean (fwd+bwd
# with varlen and an initial state, D128) and the check and timing runs (hundreds of launches) did not fault.
# Since session 14 bf16 inputs store A_qk in bf16 (intra.AQK_BF16): "mixed" is then one bf16 product.
CHAIN_ADV = "mixed"
# The dS snapshot per chunk (dh, read once by the products: dkd = v_new dS^T, ddl = sum_v h dS) for bf16 tiles:
# "bf16" rounded to it (FLA 0.6.0 stores its dh in bf16 too), "fp32" as the walk holds it. The walk itself
# carries dS in fp32 either way. Session 14 (H200, B1 T8192 H32 D128, fwd+bwd bounded gate, two runs): all three
# snapshots (h, v_new, dS) fp32 3.660 / 3.648 ms, bf16 3.564 / 3.550 (3.528 / 3.512 with PRODUCTS_STAGES 3); B4
# 14.36 -> 13.94; dq / dk / dg against float64 +0.3-0.6e-3 (check_kda_gpu.py passes).
SNAPSHOT_DH = "bf16"


def dh_snapshot_dtype(tile_dtype: torch.dtype) -> torch.dtype:
    """dh's dtype for tiles of this dtype: SNAPSHOT_DH for bf16 tiles, fp32 otherwise."""
    return torch.bfloat16 if tile_dtype == torch.bfloat16 and SNAPSHOT_DH == "bf16" else torch.float32


@triton.jit
def _dot_bf16(a, b, acc, F32_DOTS: tl.constexpr):
    # F32_DOTS multiplies the same (bf16-exact) values as fp32 tiles, tf32 on the GPU, which is exact
    # for them: the interpreter multiplies bf16 tiles wrongly. (Session 5 also took it on the H200,
    # where the bf16 chain faulted; the trigger was the tf32 A_qk^T do product in the same loop, which
    # the 16-bit launch now forms first: _chain_launch.)
    if F32_DOTS:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def _dot_mixed(a, b, acc, F32_DOTS: tl.constexpr, MIXED: tl.constexpr):
    """acc + a @ b in fp32, each operand in its storage dtype.

    Two bf16 tiles go to the tensor cores as they are (their products are exact in fp32). An fp32 tile
    meeting a bf16 one is multiplied by MIXED: "hilo" splits it into bf16 hi + lo (two bf16 products
    keep ~16 of its mantissa bits, and the bf16 tile never becomes an fp32 copy in registers), "bf16"
    rounds it to bf16 (one product, 8 bits, as FLA 0.6.0's chain does), "tf32" multiplies both as fp32
    (tf32 on the GPU, 10 bits). Any other pair is multiplied in fp32 (tf32 on the GPU).
    """
    if (a.dtype == tl.bfloat16) and (b.dtype == tl.bfloat16):
        return _dot_bf16(a, b, acc, F32_DOTS)
    elif MIXED == "tf32":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif MIXED == "bf16":
        return _dot_bf16(a.to(tl.bfloat16), b.to(tl.bfloat16), acc, F32_DOTS)
    elif (a.dtype == tl.bfloat16) and (b.dtype == tl.float32):
        b_hi, b_lo = bf16_halves(b)
        return _dot_bf16(a, b_lo, _dot_bf16(a, b_hi, acc, F32_DOTS), F32_DOTS)
    elif (a.dtype == tl.float32) and (b.dtype == tl.bfloat16):
        a_hi, a_lo = bf16_halves(a)
        return _dot_bf16(a_lo, b, _dot_bf16(a_hi, b, acc, F32_DOTS), F32_DOTS)
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)


@triton.jit
def kda_chain_adv_kernel(Aqk, do, adv, chunk_bounds, HV: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
                         BT: tl.constexpr):
    """adv = A_qk^T do per (chunk, value head, value block), fp32: the chain's one term that needs no dS."""
    i_c, i_hv, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos = tl.load(chunk_bounds + 2 * i_c)
    eos = tl.load(chunk_bounds + 2 * i_c + 1)
    o_i = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_t = o_i < eos - bos
    m_tv = m_t[:, None] & (o_v < V)[None, :]
    row = bos.to(tl.int64) * HV + i_hv
    p_tv = o_i[:, None] * (HV * V) + o_v[None, :]
    b_A = tl.load(Aqk + row * BT + o_i[:, None] * (HV * BT) + o_i[None, :], mask=m_t[:, None], other=0.0)
    b_A = b_A.to(tl.float32)
    b_do = tl.load(do + row * V + p_tv, mask=m_tv, other=0.0).to(tl.float32)
    tl.store(adv + row * V + p_tv, tl.dot(tl.trans(b_A), b_do), mask=m_tv)


@triton.jit
def kda_state_grad_chain_kernel(
    w, qg, kd, dl, Aqk, do, dht, dh, dvnew, dh0, cu_seqlens, chunk_offsets,
    HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, NUM_STAGES: tl.constexpr, F32_DOTS: tl.constexpr,
    MIXED: tl.constexpr, ADV: tl.constexpr,
):
    # ADV == "launch": dvnew holds A_qk^T do on entry (kda_chain_adv_kernel), read and overwritten here,
    # instead of the product inside the walk ("mixed" / "tf32").
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_hv = i_nh // HV, i_nh % HV
    seq_bos = tl.load(cu_seqlens + i_n)
    seq_eos = tl.load(cu_seqlens + i_n + 1)
    c_lo = tl.load(chunk_offsets + i_n)
    NT = tl.cdiv(seq_eos - seq_bos, BT)
    o_i = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_s = m_k[:, None] & m_v[None, :]
    # int32 tile offsets; the int64 part is always a scalar base.
    p_s = o_k[:, None] * V + o_v[None, :]  # [BK, BV] into one [K, V] state
    p_tk = o_i[:, None] * (HV * K) + o_k[None, :]  # [BT, BK] rows of a [TT, HV, K] tensor
    p_kt = o_k[:, None] + o_i[None, :] * (HV * K)  # the same, transposed: [BK, BT]
    p_tv = o_i[:, None] * (HV * V) + o_v[None, :]  # [BT, BV]
    p_tt = o_i[:, None] * (HV * BT) + o_i[None, :]  # [BT, BT]
    if HAS_DHT:
        b_ds = tl.load(dht + (i_n * HV + i_hv).to(tl.int64) * (K * V) + p_s, mask=m_s, other=0.0).to(tl.float32)
    else:
        b_ds = tl.zeros([BK, BV], dtype=tl.float32)

    for i_r in tl.range(0, NT, num_stages=NUM_STAGES):
        i_t = NT - 1 - i_r
        t0 = seq_bos + i_t * BT
        m_t = o_i < seq_eos - t0
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        row = t0.to(tl.int64) * HV + i_hv  # flattened (token, head) row of the chunk's first token
        i_ch = (c_lo + i_t).to(tl.int64) * HV + i_hv  # (chunk, head)
        # Off the chain first: the products that do not depend on dS. kd and w are loaded next to
        # their products below: with two stages the pipeliner prefetches every load of the next chunk
        # anyway, and with one stage this spills less (76 B against 240 B at BV = 32, 4 warps).
        b_do = tl.load(do + row * V + p_tv, mask=m_tv, other=0.0)  # [BT, BV]
        # qg and w are loaded transposed ([BK, BT]) rather than tl.trans'd: tried against the bf16 dot
        # fault (it did not fix it), kept because the launch was timed and sanitizer-checked this way
        b_qgt = tl.load(qg + row * K + p_kt, mask=tl.trans(m_tk), other=0.0)
        b_dl = tl.load(dl + i_ch * K + o_k, mask=m_k, other=0.0)  # [BK]
        if ADV == "launch":
            b_adv = tl.load(dvnew + row * V + p_tv, mask=m_tv, other=0.0)
        elif ADV == "mixed":
            # A^T loaded transposed ([BT, BT]); stored in bf16 for bf16 inputs (intra.aqk_dtype): one bf16 product
            # with do. An fp32 A_qk meets the bf16 do as MIXED says: with "hilo" two bf16 products, so the walk
            # has no tf32 product beside its bf16 ones (that pair faulted, _chain_launch)
            b_At = tl.load(Aqk + row * BT + tl.trans(p_tt), mask=m_t[None, :], other=0.0)
            b_adv = _dot_mixed(b_At, b_do, tl.zeros([BT, BV], dtype=tl.float32), F32_DOTS, MIXED)
        else:
            # A^T do in tf32: splitting A as well costs spills (164 B at BV = 64) for an off-chain term.
            b_A = tl.load(Aqk + row * BT + p_tt, mask=m_t[:, None], other=0.0).to(tl.float32)  # [BT, BT]
            b_adv = tl.dot(tl.trans(b_A), b_do.to(tl.float32))  # [BT, BV]
        b_acc = _dot_mixed(b_qgt, b_do, tl.zeros([BK, BV], dtype=tl.float32), F32_DOTS, MIXED)  # qg^T do
        # The chain.
        tl.store(dh + i_ch * (K * V) + p_s, b_ds.to(dh.dtype.element_ty), mask=m_s)
        b_kd = tl.load(kd + row * K + p_tk, mask=m_tk, other=0.0)
        b_dvn = _dot_mixed(b_kd, b_ds, b_adv, F32_DOTS, MIXED)  # [BT, BV]
        tl.store(dvnew + row * V + p_tv, b_dvn, mask=m_tv)
        b_wt = tl.load(w + row * K + p_kt, mask=tl.trans(m_tk), other=0.0)  # [BK, BT]
        b_ds = _dot_mixed(b_wt, -b_dvn, b_acc + b_ds * b_dl[:, None], F32_DOTS, MIXED)

    if STORE_DH0:
        tl.store(dh0 + (i_n * HV + i_hv).to(tl.int64) * (K * V) + p_s, b_ds, mask=m_s)


@triton.jit
def kda_state_grad_products_kernel(
    h, vnew, dh, dvnew, do, dqg, dw, dkd, dA, ddl, chunk_bounds,
    HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr, NATIVE: tl.constexpr,
):
    # NATIVE: h, dh, v_new and do share one 16-bit dtype (the bf16 snapshots): dqg, dkd and dA_qk are products in
    # it (fp32 accumulation), dw's takes dv_new (fp32) with h upcast (tf32). Otherwise every operand is fp32
    # (tf32). Mixed forms are not offered: on the H200 (session 14) a launch with some of these products in bf16
    # and the others in tf32 of upcast copies of the same do / v_new tiles returned wrong gradients (dq 0.4-0.9
    # relative against float64, with h or dS in fp32); all-bf16 and all-tf32 launches agree with the reference.
    i_c, i_hv, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos = tl.load(chunk_bounds + 2 * i_c)
    eos = tl.load(chunk_bounds + 2 * i_c + 1)
    o_i = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_t = o_i < eos - bos
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    row = bos.to(tl.int64) * HV + i_hv
    i_ch = i_c.to(tl.int64) * HV + i_hv
    p_s = o_k[:, None] * V + o_v[None, :]  # [BK, BV]
    p_tv = o_i[:, None] * (HV * V) + o_v[None, :]  # [BT, BV]
    b_dqg = tl.zeros([BT, BK], dtype=tl.float32)
    b_ndw = tl.zeros([BT, BK], dtype=tl.float32)  # -dw
    b_dkd = tl.zeros([BT, BK], dtype=tl.float32)
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    b_ddl = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        m_v = i_v * BV + o_v < V
        m_s = m_k[:, None] & m_v[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_s = tl.load(h + i_ch * (K * V) + i_v * BV + p_s, mask=m_s, other=0.0)  # [BK, BV] entry state
        b_ds = tl.load(dh + i_ch * (K * V) + i_v * BV + p_s, mask=m_s, other=0.0)  # exit-state gradient
        b_do = tl.load(do + row * V + i_v * BV + p_tv, mask=m_tv, other=0.0)  # [BT, BV]
        b_vn = tl.load(vnew + row * V + i_v * BV + p_tv, mask=m_tv, other=0.0)
        b_dvn = tl.load(dvnew + row * V + i_v * BV + p_tv, mask=m_tv, other=0.0)
        b_sf = b_s.to(tl.float32)
        if not NATIVE:
            b_s, b_ds, b_do, b_vn = b_sf, b_ds.to(tl.float32), b_do.to(tl.float32), b_vn.to(tl.float32)
        b_dqg = tl.dot(b_do, tl.trans(b_s), b_dqg)
        b_ndw = tl.dot(b_dvn, tl.trans(b_sf), b_ndw)
        b_dkd = tl.dot(b_vn, tl.trans(b_ds), b_dkd)
        b_ddl += tl.sum(b_sf * b_ds.to(tl.float32), axis=1)
        if i_k == 0:
            b_dA = tl.dot(b_do, tl.trans(b_vn), b_dA)

    p_tk = o_i[:, None] * (HV * K) + o_k[None, :]
    tl.store(dqg + row * K + p_tk, b_dqg, mask=m_tk)
    tl.store(dw + row * K + p_tk, -b_ndw, mask=m_tk)
    tl.store(dkd + row * K + p_tk, b_dkd, mask=m_tk)
    tl.store(ddl + i_ch * K + o_k, b_ddl, mask=m_k)
    if i_k == 0:
        # Causal (j <= i) and only columns of this chunk's tokens (v_new past the end is 0 already).
        m_A = (o_i[:, None] >= o_i[None, :]) & m_t[None, :]
        b_dA = tl.where(m_A, b_dA, 0.0)
        tl.store(dA + row * BT + o_i[:, None] * (HV * BT) + o_i[None, :], b_dA, mask=m_t[:, None])


class ChainLaunch(NamedTuple):
    """The chain's launch: value columns per program, warps, pipeline stages, fp32 copies of bf16 tiles
    (tf32 products), how bf16 tiles meet the fp32 dS / dv_new ("tf32", "hilo", "bf16"), and where A_qk^T do is
    formed: "launch" (its own launch before the walk), "mixed" (in the walk, the fp32 A_qk meeting do as
    ``mixed`` says) or "tf32" (in the walk, one tf32 product)."""

    block_v: int
    num_warps: int
    num_stages: int
    f32_dots: bool
    mixed: str
    adv: str


def _chain_launch(K: int, V: int, dtype: torch.dtype) -> ChainLaunch:
    """The chain's launch (H200, B1 T8192 H32 D128, 2026-11-26; benchmarks/kda_notes.md, sessions 5-6 and 13).

    16-bit inputs, K <= 128: bf16 products, dS and dv_new as hi + lo halves, 32 value columns (128
    programs at B1 H32), 4 warps, 3 stages. A_qk^T do for bf16 tiles where CHAIN_ADV says (since session 13 in
    the walk as hi + lo products, 0.31 ms in all), for fp16 tiles by its own launch first (sessions 6-12 for both:
    0.40 ms with that launch, against 0.67 for session 5's tf32 launch). fp16 tiles take the same launch with
    tf32 products: the split and the bf16 products are for bf16 tiles only. With A_qk^T do as a *tf32* product of
    the fp32 tile inside the walk, every bf16 launch at 16 or 32 columns faulted or returned non-finite
    values (compute-sanitizer: out-of-bounds shared-memory reads at the bf16 tl.dot; a Triton
    code-generation fault we did not isolate further); without it they run clean, and so does the hi + lo form
    (session 13). One stage faults too (session 13, illegal address at B1 T8192 H32: refused in
    kda_state_grad_chain). 4 stages need 247 KB
    of shared memory. fp32 inputs: fp32 tiles (tf32), one stage (two asked for 279 KB; the H200 has
    227). K > 128 keeps the launch checked in session 4 (64 columns, bf16, 8 warps)."""
    if K <= 128 and dtype.itemsize <= 2:
        adv = CHAIN_ADV if dtype == torch.bfloat16 else "launch"
        return ChainLaunch(min(32, next_pow2(V)), 4, 3, False, "hilo", adv)
    if K <= 128:
        return ChainLaunch(min(32, next_pow2(V)), 4, 1, True, "tf32", "tf32")
    return ChainLaunch(min(64, next_pow2(V)), 8, 1, False, "hilo", "tf32")


def kda_state_grad_chain(
    st: dict[str, torch.Tensor], do: torch.Tensor, dht: torch.Tensor | None,
    cu_seqlens: torch.Tensor, chunk_offsets: torch.Tensor, chunk_bounds: torch.Tensor, *, need_dh0: bool,
    block_v: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
    f32_dots: bool | None = None, mixed: str | None = None, adv: str | None = None,
    dh_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Reverse walk over each sequence's chunks with dS ``[K, BV]`` fp32 in registers.

    Args:
        st: the intra stage's dict: w, qg, kd ``[TT, HV, K]`` (bf16 or fp32), Aqk ``[TT, HV, 64]`` fp32,
            dl ``[NC, HV, K]`` fp32 (exp of each chunk's last cumulative gate).
        do: ``[TT, HV, V]`` bf16 or fp32; dht: ``[N, HV, K, V]`` fp32 or None (zero).
        cu_seqlens: ``[N + 1]`` int32; chunk_offsets: ``[N + 1]`` int32, first global chunk of each sequence;
            chunk_bounds: ``[NC, 2]`` int32 (first token, end token) of each chunk.
        block_v, num_warps, num_stages, f32_dots, mixed, adv: the launch (None: ``_chain_launch``'s
            choice; mixed: "tf32", "hilo" or "bf16", how a bf16 tile meets the fp32 dS or dv_new; adv:
            "launch" forms A_qk^T do by a parallel launch first, "mixed" in the walk as ``mixed`` says,
            "tf32" in the walk as one tf32 product).

    Returns:
        dh ``[NC, HV, K, V]`` in dh_dtype (None: ``dh_snapshot_dtype``; the gradient of each chunk's exit
        state), dvnew ``[TT, HV, V]`` fp32 (of v_new) and dh0 ``[N, HV, K, V]`` fp32 (of the initial state)
        or None.
    """
    TT, HV, K = st["w"].shape
    V = do.shape[-1]
    N = cu_seqlens.shape[0] - 1
    NC = st["dl"].shape[0]
    if do.shape != (TT, HV, V):
        raise ValueError(f"do: expected [TT, HV, V] = {[TT, HV, V]}, got {list(do.shape)}")
    if dht is not None and dht.shape != (N, HV, K, V):
        raise ValueError(f"dht: expected [N, HV, K, V] = {[N, HV, K, V]}, got {list(dht.shape)}")
    launch = _chain_launch(K, V, st["w"].dtype)
    BV, num_warps, num_stages = block_v or launch.block_v, num_warps or launch.num_warps, num_stages or launch.num_stages
    f32_dots = launch.f32_dots if f32_dots is None else f32_dots
    mixed = launch.mixed if mixed is None else mixed
    adv = launch.adv if adv is None else adv
    if mixed not in ("tf32", "hilo", "bf16"):
        raise ValueError(f"mixed: expected 'tf32', 'hilo' or 'bf16', got {mixed!r}")
    if adv not in ("launch", "mixed", "tf32"):
        raise ValueError(f"adv: expected 'launch', 'mixed' or 'tf32', got {adv!r}")
    # f32_dots multiplies fp32 copies of the tiles
    refuse_one_stage_16bit(num_stages, K, 4 if f32_dots else st["w"].element_size(), "chain")
    if chunk_bounds.shape != (max(NC, 1), 2):
        raise ValueError(f"chunk_bounds: expected [NC, 2] = {[max(NC, 1), 2]}, got {list(chunk_bounds.shape)}")
    dev, f32 = do.device, torch.float32
    dh = torch.empty(NC, HV, K, V, device=dev, dtype=dh_dtype or dh_snapshot_dtype(st["w"].dtype))
    dvnew = torch.empty(TT, HV, V, device=dev, dtype=f32)
    dh0 = torch.empty(N, HV, K, V, device=dev, dtype=f32) if need_dh0 else None
    do = do.contiguous()
    if adv == "launch" and NC > 0:
        BVa = min(ADV_BLOCK_V, next_pow2(V))
        kda_chain_adv_kernel[(NC, HV, triton.cdiv(V, BVa))](st["Aqk"], do, dvnew, chunk_bounds, HV=HV, V=V, BV=BVa,
                                                             BT=BT, num_warps=ADV_WARPS, num_stages=1)
    kda_state_grad_chain_kernel[(triton.cdiv(V, BV), N * HV)](
        st["w"], st["qg"], st["kd"], st["dl"], st["Aqk"], do,
        dht.contiguous() if dht is not None else dvnew, dh, dvnew, dh0 if dh0 is not None else dvnew,
        cu_seqlens, chunk_offsets,
        HV=HV, K=K, V=V, BK=next_pow2(K), BV=BV, BT=BT,
        HAS_DHT=dht is not None, STORE_DH0=need_dh0, NUM_STAGES=num_stages,
        F32_DOTS=INTERPRET or f32_dots, MIXED=mixed, ADV=adv,
        num_warps=num_warps, num_stages=num_stages,
    )
    return dh, dvnew, dh0


def kda_state_grad_products(
    st: dict[str, torch.Tensor], h: torch.Tensor, vnew: torch.Tensor, dh: torch.Tensor, dvnew: torch.Tensor,
    do: torch.Tensor, chunk_bounds: torch.Tensor, *, block_v: int | None = None, block_k: int | None = None,
    num_warps: int = 8, num_stages: int | None = None,
) -> dict[str, torch.Tensor]:
    """Per (chunk, value head, key block): the gradients that need one chunk's S and dS, summed over V.

    Args:
        st: the intra stage's dict (shapes read from w ``[TT, HV, K]`` and dl ``[NC, HV, K]``).
        h: ``[NC, HV, K, V]`` fp32 or bf16, each chunk's entry state; dh: same shape, each chunk's exit-state
            gradient (from kda_state_grad_chain), fp32 or bf16; vnew: ``[TT, HV, V]`` fp32 or bf16; dvnew:
            ``[TT, HV, V]`` fp32; do: ``[TT, HV, V]``.
        chunk_bounds: ``[NC, 2]`` int32 (first token, end token) of each chunk, flattened indices.

    Returns:
        dict of dqg, dw, dkd ``[TT, HV, K]``, dA ``[TT, HV, 64]`` (zero above the diagonal and past the
        chunk's end) and ddl ``[NC, HV, K]``, all fp32.
    """
    TT, HV, K = st["w"].shape
    V = do.shape[-1]
    NC = st["dl"].shape[0]
    for name, x, shape in (("h", h, (NC, HV, K, V)), ("dh", dh, (NC, HV, K, V)),
                           ("vnew", vnew, (TT, HV, V)), ("dvnew", dvnew, (TT, HV, V)), ("do", do, (TT, HV, V))):
        if x.shape != shape:
            raise ValueError(f"{name}: expected {list(shape)}, got {list(x.shape)}")
    BK = block_k or min(128, next_pow2(K))
    BV = block_v or min(64, next_pow2(V))
    native = do.element_size() == 2 and h.dtype == dh.dtype == vnew.dtype == do.dtype and not INTERPRET
    dev, f32 = do.device, torch.float32
    out = dict(
        dqg=torch.empty(TT, HV, K, device=dev, dtype=f32),
        dw=torch.empty(TT, HV, K, device=dev, dtype=f32),
        dkd=torch.empty(TT, HV, K, device=dev, dtype=f32),
        dA=torch.empty(TT, HV, BT, device=dev, dtype=f32),
        ddl=torch.empty(NC, HV, K, device=dev, dtype=f32),
    )
    if NC == 0:
        return out
    kda_state_grad_products_kernel[(NC, HV, triton.cdiv(K, BK))](
        h.contiguous(), vnew.contiguous(), dh.contiguous(), dvnew.contiguous(), do.contiguous(),
        out["dqg"], out["dw"], out["dkd"], out["dA"], out["ddl"], chunk_bounds,
        HV=HV, K=K, V=V, BK=BK, BV=BV, BT=BT, NATIVE=native,
        num_warps=num_warps, num_stages=num_stages or (PRODUCTS_STAGES if native else PRODUCTS_STAGES_FP32),
        **reg_cap(PRODUCTS_MAX_REGISTERS),
    )
    return out


def kda_state_grad(
    st: dict[str, torch.Tensor], h: torch.Tensor, vnew: torch.Tensor, do: torch.Tensor, dht: torch.Tensor | None,
    cu_seqlens: torch.Tensor, chunk_offsets: torch.Tensor, chunk_bounds: torch.Tensor, *, need_dh0: bool,
) -> dict[str, torch.Tensor | None]:
    """The chain, then the products: one dict (du, dqg, dw, dkd
    ``[TT, HV, *]``, dA ``[TT, HV, 64]``, ddl ``[NC, HV, K]`` fp32, dh0 ``[N, HV, K, V]`` or None), with the
    chunks' ``[NC, 2]`` token bounds as one more argument. The ``[NC, HV, K, V]`` fp32 dh lives in between."""
    dh, dvnew, dh0 = kda_state_grad_chain(st, do, dht, cu_seqlens, chunk_offsets, chunk_bounds, need_dh0=need_dh0)
    out = kda_state_grad_products(st, h, vnew, dh, dvnew, do, chunk_bounds)
    return dict(out, du=dvnew, dh0=dh0)
