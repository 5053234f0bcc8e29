"""Stage 2: the state recurrence across chunks (forward; the backward is recurrence_bwd.py).

One program per (sequence, value head, value block) walks its chunks in order, keeping the fp32
state block ``S: [K, BV]`` in registers. Per chunk (Gamma_last = the chunk's last cumulative gate):

    v_new = u - w S
    o     = (scale q exp(Gamma)) S + A_qk v_new
    S    <- exp(Gamma_last) S + (k exp(Gamma_last - Gamma))^T v_new

The output is written here, so the per-chunk states never travel through memory in the forward
(FLA stores them and reads them back in a separate output kernel). The intra stage hands over
qg = scale q exp(Gamma), kd = k exp(Gamma_last - Gamma) and exp(Gamma_last), so this loop does no
exponentials and no normalisation, only the products. The backward walks the chunks
in reverse with dS in registers; it needs each chunk's entry state and v_new, which the backward
pass recomputes by running this forward once more with STORE_H (states are not kept from the
forward: that would cost ``NC * HV * K * V`` elements), as bf16 snapshots for bf16 inputs
(SNAPSHOT_H, SNAPSHOT_VNEW) while the walk itself keeps the fp32 state.

On Hopper with bf16 tiles both walks (the output walk and the states walk) run the Gluon kernel of
``recurrence_wgmma.py`` instead (WGMMA_WALK): the same products, transposed, with the state as a wgmma accumulator.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hla.ops.kda.triton.common import next_pow2, refuse_one_stage_16bit


@triton.jit
def kda_recurrence_fwd_kernel(
    w, u, qg, kd, dl, Aqk, h0, o, ht, h, vnew, cu_seqlens, chunk_offsets,
    HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr, STORE_H: tl.constexpr, WRITE_O: tl.constexpr,
    SPLIT: tl.constexpr, NUM_STAGES: tl.constexpr, VN_SPLIT: tl.constexpr = False,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_hv = i_nh // HV, i_nh % HV
    seq_bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    seq_len = tl.load(cu_seqlens + i_n + 1) - tl.load(cu_seqlens + i_n)
    c_lo = tl.load(chunk_offsets + i_n).to(tl.int64)
    NT = tl.cdiv(seq_len, BT)
    o_i = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_s = m_k[:, None] & m_v[None, :]
    # int64 scalar bases + int32 tile offsets (int64 [64, 128] offset tiles made this kernel spill)
    p_s = o_k[:, None] * V + o_v[None, :]
    p_tk = o_i[:, None] * (HV * K) + o_k[None, :]
    p_tv = o_i[:, None] * (HV * V) + o_v[None, :]
    p_tt = o_i[:, None] * (HV * BT) + o_i[None, :]
    if HAS_H0:
        b_s = tl.load(h0 + (i_n * HV + i_hv).to(tl.int64) * K * V + p_s, mask=m_s, other=0.0).to(tl.float32)
    else:
        b_s = tl.zeros([BK, BV], dtype=tl.float32)

    for i_t in tl.range(0, NT, num_stages=NUM_STAGES):
        i_c = c_lo + i_t
        tok = seq_bos + i_t * BT
        m_t = (i_t * BT + o_i) < seq_len
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        off_k = (tok * HV + i_hv) * K  # int64 scalars; the tiles below stay int32
        off_v = (tok * HV + i_hv) * V
        # everything that does not depend on the state is loaded first
        b_w = tl.load((w + off_k) + p_tk, mask=m_tk, other=0.0)
        b_kd = tl.load((kd + off_k) + p_tk, mask=m_tk, other=0.0)
        b_u = tl.load((u + off_v) + p_tv, mask=m_tv, other=0.0)
        b_dl = tl.load(dl + (i_c * HV + i_hv) * K + o_k, mask=m_k, other=0.0)
        if WRITE_O:
            b_qg = tl.load((qg + off_k) + p_tk, mask=m_tk, other=0.0)
            b_A = tl.load((Aqk + (tok * HV + i_hv) * BT) + p_tt, mask=m_t[:, None], other=0.0)
        if STORE_H:
            tl.store((h + (i_c * HV + i_hv) * K * V) + p_s, b_s.to(h.dtype.element_ty), mask=m_s)
        # Products in the operands' dtype (bf16 tensor cores, fp32 accumulation). The state itself
        # stays fp32; with SPLIT it enters the products as hi + lo halves (two bf16 products, ~16
        # mantissa bits) where v_new = u - w S can cancel.
        b_sh = b_s.to(b_w.dtype)
        b_ws = tl.dot(b_w, b_sh)
        if SPLIT:
            b_sl = (b_s - b_sh.to(tl.float32)).to(b_w.dtype)
            b_ws += tl.dot(b_w, b_sl)
        b_vn = b_u - b_ws  # [BT, BV] fp32
        b_vnc = b_vn.to(b_w.dtype)
        if STORE_H:
            tl.store((vnew + off_v) + p_tv, b_vn.to(vnew.dtype.element_ty), mask=m_tv)
        if WRITE_O:
            b_o = tl.dot(b_qg, b_sh) + tl.dot(b_A.to(b_w.dtype), b_vnc)
            if SPLIT:
                b_o += tl.dot(b_qg, b_sl)
            tl.store((o + off_v) + p_tv, b_o.to(o.dtype.element_ty), mask=m_tv)
        if VN_SPLIT:  # v_new's hi + lo halves into the state (the premultiplied walk: see kda_recurrence_fwd)
            b_s = b_s * b_dl[:, None] + tl.dot(tl.trans(b_kd), (b_vn - b_vnc.to(tl.float32)).to(b_w.dtype),
                                                 tl.dot(tl.trans(b_kd), b_vnc))
        else:
            b_s = b_s * b_dl[:, None] + tl.dot(tl.trans(b_kd), b_vnc)

    if STORE_FINAL:
        tl.store(ht + (i_n * HV + i_hv).to(tl.int64) * K * V + p_s, b_s, mask=m_s)


# The backward's snapshots (STORE_H) for bf16 tiles, read once by the state-grad products (recurrence_bwd.py):
# "bf16" stores h, each chunk's entry state, rounded to bf16 (the products dqg = do h^T, dw = -dv_new h^T and
# ddl = sum_v h dh then read that copy; FLA 0.6.0 stores its h in bf16 too), "fp32" the state as it is. v_new:
# "tiles" stores the bf16 copy the forward multiplied (kd^T v_new and A_qk v_new take it), so dkd = v_new dS^T and
# dA = do v_new^T are the gradients of what was computed; "fp32" the unrounded u - w S.
SNAPSHOT_H = "bf16"
SNAPSHOT_VNEW = "tiles"


def snapshot_dtypes(tile_dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """(h, v_new) snapshot dtypes for tiles of this dtype: SNAPSHOT_H / SNAPSHOT_VNEW for bf16 tiles, fp32
    otherwise (fp16 cannot hold every state: its range ends at 65504)."""
    if tile_dtype != torch.bfloat16:
        return torch.float32, torch.float32
    return (torch.bfloat16 if SNAPSHOT_H == "bf16" else torch.float32,
            torch.bfloat16 if SNAPSHOT_VNEW == "tiles" else torch.float32)


# On Hopper the walks (output and states) run the Gluon kernel of recurrence_wgmma.py (the state as a wgmma
# accumulator, tiles by TMA) where it applies; False keeps the tl kernel below everywhere. H200, session 15, same-run
# pairs, ms, tl / Gluon, bounded gate, output walk: B1 T8192 H32 D128 0.230 / 0.210-0.234, B4 0.90-0.92 / 0.49-0.52,
# B1 T32768 0.89-0.92 / 0.82-0.85, B1 T8192 H96 0.68 / 0.44-0.46; states walk: 0.207 / 0.199, 0.778 / 0.476,
# 0.794 / 0.707, 0.617 / 0.422.
WGMMA_WALK = True


def _use_wgmma_walk(st: dict, write_o: bool, store_h: bool, split: bool, overrides: tuple,
                    h_dtype: torch.dtype | None = None, vnew_dtype: torch.dtype | None = None,
                    out_dtype: torch.dtype = torch.bfloat16, premultiplied: bool = False) -> bool:
    if not (WGMMA_WALK and split) or any(x is not None for x in overrides):
        return False
    from hla.ops.kda.triton.recurrence_wgmma import wgmma_walk_supported

    return wgmma_walk_supported(st["w"], st["u"], st["Aqk"], write_o, store_h, h_dtype, vnew_dtype, out_dtype,
                                premultiplied)


def _pick_bv(n_programs_per_block: int, V: int) -> int:
    # A sequential walk over chunks: at small batch, more value blocks keep more SMs busy. H200, B1 T8192
    # H32 D128 (session 10, forward / states launch, ms): BV 32 at 4 warps 0.233 / 0.208, at 8 warps 0.372 /
    # 0.283; BV 16 at 4 warps 0.392 / 0.242, at 8 warps 0.637 / 0.375.
    if n_programs_per_block >= 256:
        return min(64, next_pow2(V))
    return min(32, next_pow2(V))


def kda_recurrence_fwd(
    st: dict[str, torch.Tensor], cu_seqlens: torch.Tensor, chunk_offsets: torch.Tensor, *,
    initial_state: torch.Tensor | None, output_final_state: bool, out_dtype: torch.dtype,
    store_h: bool = False, write_o: bool = True, block_v: int | None = None, num_warps: int | None = None,
    num_stages: int | None = None, split: bool = True, h_dtype: torch.dtype | None = None,
    vnew_dtype: torch.dtype | None = None, premultiplied: bool = False, out: torch.Tensor | None = None,
    ready: torch.Tensor | None = None,
):
    """st: the intra stage's dict (w, u, qg, kd, dl, Aqk) -> (o ``[TT, HV, V]``, final ``[N, HV, K, V]``
    or None, h ``[NC, HV, K, V]`` or None, v_new ``[TT, HV, V]`` or None); h, v_new for the backward, in
    h_dtype / vnew_dtype (None: ``snapshot_dtypes``).

    premultiplied: st from ``kda_intra_fwd(..., premultiply=True)`` with Aqk = its AqkM (u is then v in its own
    dtype, and what the walk calls v_new is Z = v - k exp(Gamma) S, whose M diag(beta) sits in kd and A_qk). Z enters
    the state update as bf16 hi + lo halves: with it rounded once, the float64 model
    (benchmarks/kda_premultiplied_model.py) put the final state's error 8-20% above the unpremultiplied walk's, with
    the halves 2-9% below it.

    out: o's tensor (``[TT, HV, V]``, out_dtype) to write into instead of a new one. ready: the Gluon output walk's
    per-chunk flags, set by a solve running beside it (recurrence_wgmma.kda_walk_wgmma); refused where the tl walk
    would run."""
    TT, HV, K = st["w"].shape
    V = st["u"].shape[-1]
    N = cu_seqlens.shape[0] - 1
    NC = st["dl"].shape[0]
    h_default, vnew_default = snapshot_dtypes(st["w"].dtype)
    h_dtype, vnew_dtype = h_dtype or h_default, vnew_dtype or vnew_default
    if premultiplied and (store_h or not write_o):
        raise ValueError("kda_recurrence_fwd: the premultiplied walk is the output walk (write_o, no store_h)")
    wgmma = _use_wgmma_walk(st, write_o, store_h, split, (block_v, num_warps, num_stages), h_dtype, vnew_dtype,
                            out_dtype, premultiplied)
    if K > 128:
        # K = 256 on the H200 (2026-11-26, compute-sanitizer): BV 16 / 4 warps, BV 32 / 4 or 8 warps read
        # shared memory out of bounds in the output product (a code-generation fault; the chain's, in
        # recurrence_bwd.py, came from a tf32 product beside bf16 ones in one loop, as this loop has
        # too); BV 16 and 64 at 8 warps ran clean.
        BV, num_warps = block_v or min(64, next_pow2(V)), num_warps or 8
    else:
        BV, num_warps = block_v or _pick_bv(N * HV, V), num_warps or 4
    dev = st["w"].device
    if out is not None and (not write_o or tuple(out.shape) != (TT, HV, V) or out.dtype != out_dtype):
        raise ValueError(f"kda_recurrence_fwd: out expected [{TT}, {HV}, {V}] {out_dtype} with write_o, got "
                         f"{list(out.shape)} {out.dtype}")
    o = (out if out is not None else torch.empty(TT, HV, V, device=dev, dtype=out_dtype)) if write_o else None
    ht = torch.empty(N, HV, K, V, device=dev, dtype=torch.float32) if output_final_state else None
    h = torch.empty(NC, HV, K, V, device=dev, dtype=h_dtype) if store_h else None
    vnew = torch.empty(TT, HV, V, device=dev, dtype=vnew_dtype) if store_h else None
    if ready is not None and not wgmma:
        raise ValueError("kda_recurrence_fwd: ready (a walk beside the solve) needs the Gluon output walk")
    if wgmma:
        from hla.ops.kda.triton.recurrence_wgmma import kda_walk_wgmma

        kda_walk_wgmma(st, cu_seqlens, chunk_offsets, initial_state, o, ht, h, vnew, vn_split=premultiplied,
                       ready=ready)
        return o, ht, h, vnew
    dummy = st["u"]
    if num_stages is None:
        # Each pipeline stage holds one chunk's w, kd, qg [64, K], u [64, BV] (fp32; the premultiplied walk's u is v
        # itself) and A_qk [64, 64]: 64 KB for bf16 at K=128, BV=32 with the bf16 A_qk (3 stages measured at 197 KB of
        # the 227 KB of an sm_90 SM; 213 KB with an fp32 A_qk). fp32 inputs or K=256 fit one stage only.
        per_stage = 64 * (3 * K * st["w"].element_size() + st["u"].element_size() * BV
                          + 64 * st["Aqk"].element_size())
        num_stages = max(1, min(3, (220 * 1024) // per_stage))
    refuse_one_stage_16bit(num_stages, K, st["w"].element_size(), "recurrence")
    kda_recurrence_fwd_kernel[(triton.cdiv(V, BV), N * HV)](
        st["w"], st["u"], st["qg"], st["kd"], st["dl"], st["Aqk"],
        initial_state if initial_state is not None else dummy, o if o is not None else dummy,
        ht if ht is not None else dummy, h if h is not None else dummy, vnew if vnew is not None else dummy,
        cu_seqlens, chunk_offsets,
        HV=HV, K=K, V=V, BK=next_pow2(K), BV=BV, BT=64,
        HAS_H0=initial_state is not None, STORE_FINAL=output_final_state, STORE_H=store_h, WRITE_O=write_o,
        SPLIT=split, NUM_STAGES=num_stages, VN_SPLIT=premultiplied, num_warps=num_warps,
    )
    return o, ht, h, vnew

