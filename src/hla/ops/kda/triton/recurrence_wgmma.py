"""Stage 2 on Hopper: the state recurrence written in Gluon, with the state held as a wgmma accumulator.

Same mathematics as ``recurrence.py`` (per chunk: v_new = u - w S, o = qg S + A_qk v_new, S <- diag(dl) S +
kd^T v_new), computed transposed, so that the state never leaves the registers of one warpgroup:

    v_new^T = u^T - S^T w^T        o^T = S^T qg^T + v_new^T A_qk^T        S^T <- S^T diag(dl) + v_new^T kd

One CTA (one warpgroup, 4 warps) per (sequence, value head, 64 value columns) holds S^T ``[64, K]`` fp32 in the
accumulator layout of ``wgmma``. Every product takes its left operand from registers (S^T as its bf16 hi + lo halves,
v_new^T rounded to bf16, as ``recurrence.py`` does with SPLIT) and its right operand (w, qg, A_qk, kd) from shared
memory, where TMA puts each chunk's tiles (and its decay row dl) three chunks ahead (where the grid has more programs
than SMs, the forward's walk keeps two programs per SM instead: TWO_PER_SM). The Triton (tl) walk stages S
through shared memory twice per chunk and waits on CTA barriers for it; here S never leaves the registers. (The
compiler still places barriers in each chunk's SASS: around the TMA issues and in the four rounds of the o store's
layout change.) The forward's walk may run over premultiplied operands (u = v, VN_SPLIT: see
``recurrence.kda_recurrence_fwd``).

Written in Gluon (``triton.experimental.gluon``, Triton 3.6) because tl cannot keep an accumulator as a register
operand of the next product, nor place loads with TMA into a ring the program manages. Hopper only (wgmma); the
launcher in ``recurrence.py`` falls back to the tl kernel elsewhere, under the interpreter, and for shapes outside
``wgmma_walk_supported``. The same kernel is the backward's states walk (STORE_H: each chunk's entry state and v_new
as bf16 snapshots, no output).
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from hla.ops.device import sm_count
from hla.ops.kda.triton.common import on_hopper, tma_descriptor
from hla.ops.kda.triton.launch import LeanLaunch

# Ring slots (chunks in flight). H200, B1 T8192 H32 D128 (session 15, forward walk): 3 slots 0.210 / 0.219 ms,
# 2 slots 0.256: TMA's latency is not covered by one chunk's products. A slot holds w, kd, qg [64, K] bf16,
# A_qk [64, 64] bf16, u [64, 64] fp32 (bf16 in the premultiplied walk) and dl [K] fp32: 72.5 KB at K = 128, so 3
# slots take 218 KB of the SM's 227 (194 KB premultiplied).
WALK_SLOTS = 3
BV = 64  # value columns per CTA: the M of one wgmma
# The premultiplied output walk with its o products' tiles in a slot of their own and two ring slots (the kernel's
# O_SLOT: ~105 KB, two programs per SM) where its grid has more programs than the GPU has SMs (B4 or H96 at T8192 H32
# D128: 256 and 192 programs against the H200's 132); with fewer programs (B1: 64) one program per SM keeps three slots.
TWO_PER_SM = True
# a chunk's decay row [1, K] fp32 in shared memory, unswizzled (read as a [1, K] row in the state's accumulator layout)
DL_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)


def wgmma_walk_supported(w: torch.Tensor, u: torch.Tensor, aqk: torch.Tensor, write_o: bool, store_h: bool,
                         h_dtype: torch.dtype | None = None, vnew_dtype: torch.dtype | None = None,
                         out_dtype: torch.dtype = torch.bfloat16, premultiplied: bool = False) -> bool:
    """Whether the Gluon walk runs these tiles: CUDA sm_90 (wgmma), bf16 w / qg / kd with a bf16 A_qk, K in {64, 128},
    V a multiple of 64; either the output walk (write_o, bf16 o: an fp32 o's store staging would not fit beside three
    slots) or the backward's states walk (store_h, bf16 snapshots of h and v_new), not both in one launch (their tiles
    would not fit the shared memory together). u is fp32, or bf16 for the premultiplied output walk (u = v)."""
    if not on_hopper(w) or write_o == store_h or (write_o and out_dtype != torch.bfloat16):
        return False
    if store_h and (h_dtype != torch.bfloat16 or vnew_dtype != torch.bfloat16):
        return False
    K, V = w.shape[-1], u.shape[-1]
    # the premultiplied walk's u is the caller's v: TMA needs its rows at 16-byte aligned addresses
    u_ok = (u.dtype == torch.float32 or (premultiplied and write_o and u.dtype == torch.bfloat16)) and (
        u.is_contiguous() and u.data_ptr() % 16 == 0)
    return w.dtype == torch.bfloat16 and aqk.dtype == torch.bfloat16 and u_ok and K in (64, 128) and V % BV == 0


@gluon.jit
def _split_hi_lo(x, L: gl.constexpr):
    """fp32 x -> bf16 (hi, lo) in layout L with x ~ hi + lo to ~17 bits: hi is x rounded to bf16 on its bits (add half
    an ulp, clear the low 16 bits: exact, two integer operations), lo = x - hi (exact in fp32) rounded to bf16.
    (Truncating instead of rounding hi doubled the walk's difference to float64 on session 15's draws.)"""
    hi32 = ((x.to(gl.int32, bitcast=True) + 32768) & -65536).to(gl.float32, bitcast=True)
    return gl.convert_layout(hi32.to(gl.bfloat16), L), gl.convert_layout((x - hi32).to(gl.bfloat16), L)


@gluon.jit
def _acquire_flag(p):
    """The ready flag at p: an acquire load at GPU scope, by every thread (no atomic, no CTA broadcast)."""
    return gl.inline_asm_elementwise("ld.acquire.gpu.global.b32 $0, [$1];", "=r,l", [p], dtype=gl.int32,
                                     is_pure=False, pack=1)


@gluon.jit
def _await_chunk(ready, c, i_hv, ok, seen, HV: gl.constexpr, WAIT: gl.constexpr):
    """WAIT: make sure the solve running beside this walk has published chunk c's kd and AqkM (ready[c, i_hv] = 1,
    set with release semantics after the CTA's stores) before the TMA loads that read them. seen is that flag as an
    acquire load read it earlier (the kernel issues it where the walk waits for its products anyway); only while it
    reads 0 is the flag read again. Then a proxy fence: the loads are the async proxy's, the stores were the generic
    proxy's."""
    if WAIT:
        if ok:
            f = seen
            while f == 0:
                f = _acquire_flag(ready + (c * HV + i_hv))
            gl.inline_asm_elementwise("fence.proxy.async.global;", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _fill_o(qg_desc, a_desc, qg_s, a_s, bar, tn, NT, seq_bos, i_hv, K: gl.constexpr, BT: gl.constexpr):
    """TMA loads of chunk tn's qg and A_qk tiles into the o slot (O_SLOT; nothing past the sequence)."""
    ok = tn < NT
    tok = seq_bos + tn * BT
    mbarrier.expect(bar, BT * K * 2 + BT * BT * 2, pred=ok)
    tma.async_copy_global_to_shared(qg_desc, [tok, i_hv * K], bar, qg_s, pred=ok)
    tma.async_copy_global_to_shared(a_desc, [tok, i_hv * BT], bar, a_s, pred=ok)


@gluon.jit
def _fill(w_desc, kd_desc, qg_desc, a_desc, u_desc, dl_desc, w_s, kd_s, qg_s, a_s, u_s, dl_s, bars, slot, tn, NT,
          seq_bos, c_lo, i_hv, i_v, HV: gl.constexpr, K: gl.constexpr, V: gl.constexpr, BT: gl.constexpr,
          BV: gl.constexpr, NBYTES: gl.constexpr, WRITE_O: gl.constexpr):
    """TMA loads of chunk tn's tiles and decay row dl into ring slot `slot` (nothing when tn is past the sequence; qg
    and A_qk only for the output walk). Rows past the sequence's end come from the next sequence (or are zero past
    the tensor): the walk zeroes v_new there."""
    ok = tn < NT
    tok = seq_bos + tn * BT
    bar = bars.index(slot)
    mbarrier.expect(bar, NBYTES, pred=ok)
    tma.async_copy_global_to_shared(dl_desc, [((c_lo + tn) * HV + i_hv).to(gl.int32), 0], bar, dl_s.index(slot),
                                    pred=ok)
    tma.async_copy_global_to_shared(w_desc, [tok, i_hv * K], bar, w_s.index(slot), pred=ok)
    tma.async_copy_global_to_shared(kd_desc, [tok, i_hv * K], bar, kd_s.index(slot), pred=ok)
    if WRITE_O:
        tma.async_copy_global_to_shared(qg_desc, [tok, i_hv * K], bar, qg_s.index(slot), pred=ok)
        tma.async_copy_global_to_shared(a_desc, [tok, i_hv * BT], bar, a_s.index(slot), pred=ok)
    tma.async_copy_global_to_shared(u_desc, [tok, i_hv * V + i_v * BV], bar, u_s.index(slot), pred=ok)


@gluon.jit
def kda_walk_wgmma_kernel(
    w_desc, kd_desc, qg_desc, a_desc, u_desc, dl_desc, h0, o, ht, h, vnew, cu_seqlens, chunk_offsets, ready,
    HV: gl.constexpr, K: gl.constexpr, V: gl.constexpr, BT: gl.constexpr,
    HAS_H0: gl.constexpr, STORE_FINAL: gl.constexpr, WRITE_O: gl.constexpr, STORE_H: gl.constexpr, NS: gl.constexpr,
    VN_SPLIT: gl.constexpr = False, O_SLOT: gl.constexpr = False, WAIT: gl.constexpr = False,
):
    """WRITE_O: the forward's walk (o, and the final state with STORE_FINAL). STORE_H: the backward's states walk,
    storing each chunk's entry state h ``[NC, HV, K, V]`` and the v_new tiles ``[TT, HV, V]`` (both bf16), no o.
    VN_SPLIT (the premultiplied output walk, u bf16): v_new enters the state update as bf16 hi + lo halves.
    O_SLOT (the output walk): the ring's NS slots hold what the state chain reads (w, kd, u, dl) and the o products'
    tiles (qg, A_qk) have one slot of their own, filled for the next chunk once this chunk's products are done: with
    NS = 2 and the premultiplied walk's bf16 u that is ~105 KB, so two programs share an SM (where the grid has more
    programs than SMs, each hides the other's waits). WAIT (the output walk beside the solve that writes its kd and
    A_qk): each chunk's tiles are loaded once ready[chunk, head] is set (``_await_chunk``)."""
    BV: gl.constexpr = 64
    # wgmma accumulators: [BV, BT] (v_new^T, o^T) and [BV, K] (S^T); each warp owns 16 of the BV rows
    MT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BT, 16])
    MK: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, K, 16])
    AT: gl.constexpr = gl.DotOperandLayout(0, MT, 2)
    AK: gl.constexpr = gl.DotOperandLayout(0, MK, 2)
    # o^T, v_new^T [BV, BT] and S^T [BV, K] for the stores: 8 consecutive value columns per thread (16-byte stores)
    LO: gl.constexpr = gl.BlockedLayout([8, 1], [8, 4], [1, 4], [0, 1])
    U_BYTES: gl.constexpr = u_desc.dtype.primitive_bitwidth // 8
    RING_O: gl.constexpr = WRITE_O and not O_SLOT  # the o tiles travel in the ring
    NBYTES: gl.constexpr = ((3 if RING_O else 2) * BT * K * 2 + (BT * BT * 2 if RING_O else 0) + BT * BV * U_BYTES
                            + K * 4)

    i_v, i_nh = gl.program_id(0), gl.program_id(1)
    i_n, i_hv = i_nh // HV, i_nh % HV
    seq_bos = gl.load(cu_seqlens + i_n)
    seq_len = gl.load(cu_seqlens + i_n + 1) - seq_bos
    c_lo = gl.load(chunk_offsets + i_n).to(gl.int64)
    NT = gl.cdiv(seq_len, BT)

    w_s = gl.allocate_shared_memory(gl.bfloat16, [NS, BT, K], w_desc.layout)
    kd_s = gl.allocate_shared_memory(gl.bfloat16, [NS, BT, K], kd_desc.layout)
    if RING_O:
        qg_s = gl.allocate_shared_memory(gl.bfloat16, [NS, BT, K], qg_desc.layout)
        a_s = gl.allocate_shared_memory(gl.bfloat16, [NS, BT, BT], a_desc.layout)
    elif O_SLOT:
        qg_s = gl.allocate_shared_memory(gl.bfloat16, [1, BT, K], qg_desc.layout)
        a_s = gl.allocate_shared_memory(gl.bfloat16, [1, BT, BT], a_desc.layout)
        obar = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
        mbarrier.init(obar.index(0), count=1)
    else:  # never read: _fill's qg / A_qk loads are compiled out
        qg_s = w_s
        a_s = w_s
    u_s = gl.allocate_shared_memory(u_desc.dtype, [NS, BT, BV], u_desc.layout)
    # each chunk's decay row exp(Gamma_last) [K] fp32 travels with its tiles (a load per chunk from the kernel cost
    # ~10% of the walk: its latency sat on the state update, session 17)
    dl_s = gl.allocate_shared_memory(gl.float32, [NS, 1, K], dl_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(NS):
        mbarrier.init(bars.index(s), count=1)
    for s in gl.static_range(NS - 1):
        _await_chunk(ready, c_lo + s, i_hv, s < NT, 0, HV, WAIT)
        _fill(w_desc, kd_desc, qg_desc, a_desc, u_desc, dl_desc, w_s, kd_s, qg_s, a_s, u_s, dl_s, bars, s, s, NT,
              seq_bos, c_lo, i_hv, i_v, HV, K, V, BT, BV, NBYTES, RING_O)
    if O_SLOT:
        _fill_o(qg_desc, a_desc, qg_s.index(0), a_s.index(0), obar.index(0), 0, NT, seq_bos, i_hv, K, BT)

    rv = i_v * BV + gl.arange(0, BV, gl.SliceLayout(1, MK))
    ck = gl.arange(0, K, gl.SliceLayout(0, MK))
    p_s = ck[None, :] * V + rv[:, None]  # S^T[v, k] = S[k, v] of a [K, V] state
    if HAS_H0:
        b_s = gl.load(h0 + (i_n * HV + i_hv).to(gl.int64) * K * V + p_s)
    else:
        b_s = gl.zeros([BV, K], gl.float32, MK)
    ct = gl.arange(0, BT, gl.SliceLayout(0, MT))
    ro = gl.arange(0, BV, gl.SliceLayout(1, LO))
    co = gl.arange(0, BT, gl.SliceLayout(0, LO))
    ck_o = gl.arange(0, K, gl.SliceLayout(0, LO))

    # WAIT: the flag of the chunk an iteration's fill loads, read by the iteration before (chunk 0 for an empty sequence:
    # an index inside the flags, value unused)
    seen = 0
    if WAIT:
        seen = _acquire_flag(ready + gl.where(NT > 0, c_lo + gl.minimum(NS - 1, NT - 1), 0) * HV + i_hv)
    for t in range(0, NT):
        sl = t % NS
        mbarrier.wait(bars.index(sl), (t // NS) & 1)
        b_dl = dl_s.index(sl).load(MK)  # [1, K], broadcast over the rows of S^T
        if STORE_H:  # the chunk's entry state, rounded to bf16
            gl.store((h + ((c_lo + t) * HV + i_hv) * K * V + i_v * BV) + (ck_o[None, :] * V + ro[:, None]),
                     gl.convert_layout(b_s.to(h.dtype.element_ty), LO))
        a_hi, a_lo = _split_hi_lo(b_s, AT)
        wT = w_s.index(sl).permute([1, 0])
        y = warpgroup_mma(a_hi, wT, gl.zeros([BV, BT], gl.float32, MT), is_async=True)
        y = warpgroup_mma(a_lo, wT, y, is_async=True)
        if WRITE_O:
            osl = 0 if O_SLOT else sl
            if O_SLOT:  # this chunk's qg, A_qk (loaded at the end of the last chunk)
                mbarrier.wait(obar.index(0), t & 1)
            qT = qg_s.index(osl).permute([1, 0])
            oT = warpgroup_mma(a_hi, qT, gl.zeros([BV, BT], gl.float32, MT), is_async=True)
            oT = warpgroup_mma(a_lo, qT, oT, is_async=True)
        # every warp is past chunk t-1 (its products were waited for): its slot takes chunk t+NS-1
        gl.thread_barrier()
        tn = t + NS - 1
        _await_chunk(ready, c_lo + tn, i_hv, tn < NT, seen, HV, WAIT)
        _fill(w_desc, kd_desc, qg_desc, a_desc, u_desc, dl_desc, w_s, kd_s, qg_s, a_s, u_s, dl_s, bars, tn % NS, tn, NT,
              seq_bos, c_lo, i_hv, i_v, HV, K, V, BT, BV, NBYTES, RING_O)
        y = warpgroup_mma_wait(2 if WRITE_O else 0, deps=(y,))
        # rows past the sequence end hold the next sequence's tokens: v_new = 0 there keeps them out of S
        m_t = (t * BT + ct) < seq_len
        vn32 = gl.where(m_t[None, :], u_s.index(sl).permute([1, 0]).load(MT).to(gl.float32) - y, 0.0)
        vn = vn32.to(gl.bfloat16)
        tok = (seq_bos + t * BT).to(gl.int64)
        m_o = (t * BT + co < seq_len)[None, :]
        p_o = (tok * HV + i_hv) * V + i_v * BV + (co[None, :] * (HV * V) + ro[:, None])
        if STORE_H:  # the v_new tile the products below take
            gl.store(vnew + p_o, gl.convert_layout(vn.to(vnew.dtype.element_ty), LO), mask=m_o)
        if WRITE_O:
            oT = warpgroup_mma(gl.convert_layout(vn, AT), a_s.index(osl).permute([1, 0]), oT, is_async=True)
        b_s = warpgroup_mma(gl.convert_layout(vn, AK), kd_s.index(sl), b_s * b_dl, is_async=True)
        if VN_SPLIT:
            vn_lo = (vn32 - vn.to(gl.float32)).to(gl.bfloat16)
            b_s = warpgroup_mma(gl.convert_layout(vn_lo, AK), kd_s.index(sl), b_s, is_async=True)
        if WAIT:
            # The next iteration's flag, here: an acquire load holds the warp until it returns (its SASS invalidates
            # the L1 after it), and here the warp would wait for the products in flight anyway. The acquire atomic
            # when the tiles were due (session 19) cost the walk ~25% (H200: alone with every flag set, B1 T8192
            # 0.229 -> 0.286 ms; 0.257 here), the forward 0.06 (B1) to 0.19 ms (T32K): kda_notes.md, session 20.
            seen = _acquire_flag(ready + (c_lo + gl.minimum(t + NS, NT - 1)) * HV + i_hv)
        if WRITE_O:
            oT, b_s, a_hi, a_lo = warpgroup_mma_wait(0, deps=(oT, b_s, a_hi, a_lo))
            if O_SLOT:  # every warp is past this chunk's products: the o slot takes the next chunk's tiles
                gl.thread_barrier()
                _fill_o(qg_desc, a_desc, qg_s.index(0), a_s.index(0), obar.index(0), t + 1, NT, seq_bos, i_hv, K, BT)
            gl.store(o + p_o, gl.convert_layout(oT.to(o.dtype.element_ty), LO), mask=m_o)
        else:
            b_s, a_hi, a_lo = warpgroup_mma_wait(0, deps=(b_s, a_hi, a_lo))
    for s in gl.static_range(NS):
        mbarrier.invalidate(bars.index(s))
    if O_SLOT:
        mbarrier.invalidate(obar.index(0))
    if STORE_FINAL:
        gl.store(ht + (i_n * HV + i_hv).to(gl.int64) * K * V + p_s, b_s)


_WALK_LAUNCH = LeanLaunch(kda_walk_wgmma_kernel)


def kda_walk_wgmma(st: dict[str, torch.Tensor], cu_seqlens: torch.Tensor, chunk_offsets: torch.Tensor,
                   initial_state: torch.Tensor | None, o: torch.Tensor | None, ht: torch.Tensor | None,
                   h: torch.Tensor | None = None, vnew: torch.Tensor | None = None,
                   num_slots: int | None = None, vn_split: bool = False,
                   ready: torch.Tensor | None = None) -> None:
    """The walk over the intra stage's w, qg, kd ``[TT, HV, K]`` bf16, u ``[TT, HV, V]`` fp32 (v itself, bf16, for the
    premultiplied walk: vn_split), A_qk ``[TT, HV, 64]``
    bf16 and dl ``[NC, HV, K]`` fp32, from initial_state ``[N, HV, K, V]`` fp32 (or zeros), writing what is given:
    o ``[TT, HV, V]`` (the output walk), or h ``[NC, HV, K, V]`` and vnew ``[TT, HV, V]`` bf16 (the states walk), and
    the final state ht ``[N, HV, K, V]`` fp32. Check ``wgmma_walk_supported`` first. The premultiplied output walk takes
    the kernel's O_SLOT (two ring slots unless num_slots says otherwise) by TWO_PER_SM's rule.
    ready (the output walk): int32 ``[NC, HV]`` flags the solve sets as it goes (``intra.kda_intra_fwd``'s
    beside_solve): each chunk's tiles wait for theirs, so the walk can run beside the solve."""
    TT, HV, K = st["w"].shape
    V = st["u"].shape[-1]
    N = cu_seqlens.shape[0] - 1
    write_o = o is not None
    # The output walk keeps three chunks in flight (two, and qg / A_qk one chunk ahead, with the o slot); the states walk
    # loads no qg / A_qk (48 KB a slot) and keeps three as well (its stores take the scratch the output walk's tiles
    # would).
    w_desc = tma_descriptor(st["w"], [64, K])
    dummy = st["u"]
    o_slot = (TWO_PER_SM and write_o and st["u"].dtype == torch.bfloat16
              and walk_programs(N, HV, V) > sm_count(st["w"].device))
    _WALK_LAUNCH[(V // BV, N * HV)](
        w_desc, tma_descriptor(st["kd"], [64, K]), tma_descriptor(st["qg"], [64, K]) if write_o else w_desc,
        tma_descriptor(st["Aqk"], [64, 64]) if write_o else w_desc, tma_descriptor(st["u"], [64, BV]),
        TensorDescriptor.from_tensor(st["dl"].view(-1, K), [1, K], DL_LAYOUT),
        initial_state if initial_state is not None else dummy, o if write_o else dummy,
        ht if ht is not None else dummy, h if h is not None else dummy, vnew if vnew is not None else dummy,
        cu_seqlens, chunk_offsets, ready if ready is not None else cu_seqlens,
        HV=HV, K=K, V=V, BT=64, HAS_H0=initial_state is not None, STORE_FINAL=ht is not None, WRITE_O=write_o,
        STORE_H=h is not None, NS=num_slots or (2 if o_slot else WALK_SLOTS), VN_SPLIT=vn_split, O_SLOT=o_slot,
        WAIT=ready is not None, num_warps=4,
    )


def walk_programs(N: int, HV: int, V: int) -> int:
    """The walk's grid size: one program per (sequence, value head, BV value columns)."""
    return -(-V // BV) * N * HV
