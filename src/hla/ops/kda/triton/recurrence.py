"""Stage 3: the state recurrence across chunks, forward and backward.

One program per (sequence, value head, value block) walks its chunks in order, keeping the fp32
state block ``S: [K, BV]`` in registers. Per chunk (Gamma_last = the chunk's last cumulative gate):

    v_new = u - w S
    o     = (scale q exp(Gamma)) S + A_qk v_new
    S    <- exp(Gamma_last) S + (k exp(Gamma_last - Gamma))^T v_new

The output is written here, so the per-chunk states never travel through memory in the forward
(FLA stores them and reads them back in a separate output kernel). The backward walks the chunks
in reverse with dS in registers; it needs each chunk's entry state and v_new, which the backward
pass recomputes by running this forward once more with STORE_H (states are not kept from the
forward: that would cost ``NC * HV * K * V * 4`` bytes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hla.ops.kda.triton.common import next_pow2


@triton.jit
def _load_chunk_qk(q, k, gcum, o_t, m_t, o_k, m_k, eos, i_h, i_hv, scale,
                   H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, USE_L2: tl.constexpr):
    """-> q exp(Gamma) scale, k exp(Gamma_last - Gamma), exp(Gamma_last): [BT, BK], [BT, BK], [BK]."""
    m_tk = m_t[:, None] & m_k[None, :]
    p_qk = (o_t[:, None] * H + i_h) * K + o_k[None, :]
    b_q = tl.load(q + p_qk, mask=m_tk, other=0.0).to(tl.float32)
    b_k = tl.load(k + p_qk, mask=m_tk, other=0.0).to(tl.float32)
    if USE_L2:
        b_q = b_q / tl.sqrt(tl.sum(b_q * b_q, axis=1) + 1e-6)[:, None]
        b_k = b_k / tl.sqrt(tl.sum(b_k * b_k, axis=1) + 1e-6)[:, None]
    b_G = tl.load(gcum + (o_t[:, None] * HV + i_hv) * K + o_k[None, :], mask=m_tk, other=0.0)
    b_Gl = tl.load(gcum + ((eos - 1) * HV + i_hv) * K + o_k, mask=m_k, other=0.0)
    b_qg = b_q * tl.exp(b_G) * scale
    b_kd = b_k * tl.exp(tl.where(m_tk, b_Gl[None, :] - b_G, float("-inf")))
    return b_qg, b_kd, tl.exp(b_Gl)


@triton.jit
def kda_recurrence_fwd_kernel(
    q, k, w, u, gcum, Aqk, h0, o, ht, h, vnew, chunk_offsets, chunk_bounds,
    scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    USE_L2: tl.constexpr, HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr, STORE_H: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_h = i_hv // (HV // H)
    DT = w.dtype.element_ty
    c_lo = tl.load(chunk_offsets + i_n)
    c_hi = tl.load(chunk_offsets + i_n + 1)
    o_i = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_s = m_k[:, None] & m_v[None, :]
    p_s = (o_k[:, None] * V + o_v[None, :])
    if HAS_H0:
        b_s = tl.load(h0 + (i_n * HV + i_hv).to(tl.int64) * K * V + p_s, mask=m_s, other=0.0).to(tl.float32)
    else:
        b_s = tl.zeros([BK, BV], dtype=tl.float32)

    for i_c in range(c_lo, c_hi):
        bos = tl.load(chunk_bounds + 2 * i_c).to(tl.int64)
        eos = tl.load(chunk_bounds + 2 * i_c + 1).to(tl.int64)
        o_t = bos + o_i
        m_t = o_t < eos
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        if STORE_H:
            tl.store(h + (i_c * HV + i_hv).to(tl.int64) * K * V + p_s, b_s, mask=m_s)
        b_w = tl.load(w + (o_t[:, None] * HV + i_hv) * K + o_k[None, :], mask=m_tk, other=0.0)
        p_tv = (o_t[:, None] * HV + i_hv) * V + o_v[None, :]
        b_u = tl.load(u + p_tv, mask=m_tv, other=0.0).to(tl.float32)
        b_A = tl.load(Aqk + (o_t[:, None] * HV + i_hv) * BT + o_i[None, :], mask=m_t[:, None], other=0.0)
        b_qg, b_kd, b_dl = _load_chunk_qk(q, k, gcum, o_t, m_t, o_k, m_k, eos, i_h, i_hv, scale,
                                          H, HV, K, USE_L2)
        b_sd = b_s.to(DT)
        b_vn = b_u - tl.dot(b_w.to(DT), b_sd)  # [BT, BV]
        if STORE_H:
            tl.store(vnew + p_tv, b_vn, mask=m_tv)
        b_vnd = b_vn.to(DT)
        b_o = tl.dot(b_qg.to(DT), b_sd) + tl.dot(b_A.to(DT), b_vnd)
        tl.store(o + p_tv, b_o.to(o.dtype.element_ty), mask=m_tv)
        b_s = b_s * b_dl[:, None] + tl.dot(tl.trans(b_kd).to(DT), b_vnd)

    if STORE_FINAL:
        tl.store(ht + (i_n * HV + i_hv).to(tl.int64) * K * V + p_s, b_s, mask=m_s)


@triton.jit
def kda_recurrence_bwd_kernel(
    q, k, w, gcum, Aqk, h, vnew, do, dht, dh0, du, dqg, dw, dkd, dA, ddl, chunk_offsets, chunk_bounds,
    scale, TT, NC,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    USE_L2: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
):
    """Partial gradients of one value block; the callers sum dqg, dw, dkd, dA, ddl over value blocks."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_h = i_hv // (HV // H)
    c_lo = tl.load(chunk_offsets + i_n)
    c_hi = tl.load(chunk_offsets + i_n + 1)
    o_i = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_s = m_k[:, None] & m_v[None, :]
    p_s = (o_k[:, None] * V + o_v[None, :])
    if HAS_DHT:
        b_ds = tl.load(dht + (i_n * HV + i_hv).to(tl.int64) * K * V + p_s, mask=m_s, other=0.0)
    else:
        b_ds = tl.zeros([BK, BV], dtype=tl.float32)
    # Partial-sum buffers carry a leading value-block axis.
    off_tk = i_v.to(tl.int64) * TT * HV * K
    off_tt = i_v.to(tl.int64) * TT * HV * BT
    off_ck = i_v.to(tl.int64) * NC * HV * K

    for i_r in range(c_hi - c_lo):
        i_c = c_hi - 1 - i_r
        bos = tl.load(chunk_bounds + 2 * i_c).to(tl.int64)
        eos = tl.load(chunk_bounds + 2 * i_c + 1).to(tl.int64)
        o_t = bos + o_i
        m_t = o_t < eos
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        p_tk = (o_t[:, None] * HV + i_hv) * K + o_k[None, :]
        p_tv = (o_t[:, None] * HV + i_hv) * V + o_v[None, :]
        p_tt = (o_t[:, None] * HV + i_hv) * BT + o_i[None, :]
        b_s = tl.load(h + (i_c * HV + i_hv).to(tl.int64) * K * V + p_s, mask=m_s, other=0.0)  # [BK, BV]
        b_vn = tl.load(vnew + p_tv, mask=m_tv, other=0.0)
        b_do = tl.load(do + p_tv, mask=m_tv, other=0.0).to(tl.float32)
        b_w = tl.load(w + p_tk, mask=m_tk, other=0.0).to(tl.float32)
        b_A = tl.load(Aqk + p_tt, mask=m_t[:, None], other=0.0)
        b_qg, b_kd, b_dl = _load_chunk_qk(q, k, gcum, o_t, m_t, o_k, m_k, eos, i_h, i_hv, scale,
                                          H, HV, K, USE_L2)
        b_dvn = tl.dot(tl.trans(b_A), b_do) + tl.dot(b_kd, b_ds)  # [BT, BV]
        tl.store(du + p_tv, b_dvn, mask=m_tv)
        tl.store(dqg + off_tk + p_tk, tl.dot(b_do, tl.trans(b_s)), mask=m_tk)
        tl.store(dw + off_tk + p_tk, -tl.dot(b_dvn, tl.trans(b_s)), mask=m_tk)
        tl.store(dkd + off_tk + p_tk, tl.dot(b_vn, tl.trans(b_ds)), mask=m_tk)
        b_dA = tl.where(o_i[:, None] >= o_i[None, :], tl.dot(b_do, tl.trans(b_vn)), 0.0)
        tl.store(dA + off_tt + p_tt, b_dA, mask=m_t[:, None])
        tl.store(ddl + off_ck + (i_c * HV + i_hv).to(tl.int64) * K + o_k, tl.sum(b_s * b_ds, axis=1), mask=m_k)
        b_ds = b_ds * b_dl[:, None] + tl.dot(tl.trans(b_qg), b_do) - tl.dot(tl.trans(b_w), b_dvn)

    if STORE_DH0:
        tl.store(dh0 + (i_n * HV + i_hv).to(tl.int64) * K * V + p_s, b_ds, mask=m_s)


def _pick_bv(n_programs_per_block: int, V: int) -> int:
    # A sequential walk over chunks: at small batch, more value blocks keep more SMs busy.
    if n_programs_per_block >= 256:
        return min(64, next_pow2(V))
    return min(32, next_pow2(V))


def kda_recurrence_fwd(
    q, k, w, u, gcum, Aqk, chunk_offsets, chunk_bounds, *,
    scale: float, initial_state: torch.Tensor | None, output_final_state: bool, use_qk_l2norm: bool,
    chunk_size: int, store_h: bool = False, block_v: int | None = None,
):
    """-> (o ``[TT, HV, V]`` in u.dtype, final ``[N, HV, K, V]`` or None, h ``[NC, HV, K, V]`` or None,
    v_new ``[TT, HV, V]`` fp32 or None). h and v_new are for the backward (store_h)."""
    TT, H, K = q.shape
    HV, V = u.shape[-2], u.shape[-1]
    N = chunk_offsets.shape[0] - 1
    NC = chunk_bounds.shape[0]
    BV = block_v or _pick_bv(N * HV, V)
    o = torch.empty(TT, HV, V, device=q.device, dtype=u.dtype)
    ht = torch.empty(N, HV, K, V, device=q.device, dtype=torch.float32) if output_final_state else None
    h = torch.empty(NC, HV, K, V, device=q.device, dtype=torch.float32) if store_h else None
    vnew = torch.empty(TT, HV, V, device=q.device, dtype=torch.float32) if store_h else None
    grid = (triton.cdiv(V, BV), N * HV)
    kda_recurrence_fwd_kernel[grid](
        q, k, w, u, gcum, Aqk, initial_state if initial_state is not None else q, o,
        ht if ht is not None else q, h if h is not None else q, vnew if vnew is not None else q,
        chunk_offsets, chunk_bounds, float(scale),
        H=H, HV=HV, K=K, V=V, BK=next_pow2(K), BV=BV, BT=chunk_size,
        USE_L2=use_qk_l2norm, HAS_H0=initial_state is not None, STORE_FINAL=output_final_state, STORE_H=store_h,
        num_warps=4,
    )
    return o, ht, h, vnew


def kda_recurrence_bwd(
    q, k, w, gcum, Aqk, h, vnew, do, dht, chunk_offsets, chunk_bounds, *,
    scale: float, use_qk_l2norm: bool, chunk_size: int, need_dh0: bool, block_v: int | None = None,
):
    """-> dict of du, dqg, dw, dkd ``[TT, HV, *]``, dA ``[TT, HV, BT]``, ddl ``[NC, HV, K]`` (fp32,
    summed over value blocks) and dh0 ``[N, HV, K, V]`` or None."""
    TT, H, K = q.shape
    HV, V = do.shape[-2], do.shape[-1]
    N = chunk_offsets.shape[0] - 1
    NC = chunk_bounds.shape[0]
    BT = chunk_size
    BV = block_v or _pick_bv(N * HV, V)
    NV = triton.cdiv(V, BV)
    dev, f32 = q.device, torch.float32
    du = torch.empty(TT, HV, V, device=dev, dtype=f32)
    dqg = torch.empty(NV, TT, HV, K, device=dev, dtype=f32)
    dw = torch.empty(NV, TT, HV, K, device=dev, dtype=f32)
    dkd = torch.empty(NV, TT, HV, K, device=dev, dtype=f32)
    dA = torch.empty(NV, TT, HV, BT, device=dev, dtype=f32)
    ddl = torch.empty(NV, NC, HV, K, device=dev, dtype=f32)
    dh0 = torch.empty(N, HV, K, V, device=dev, dtype=f32) if need_dh0 else None
    kda_recurrence_bwd_kernel[(NV, N * HV)](
        q, k, w, gcum, Aqk, h, vnew, do.contiguous(), dht if dht is not None else q, dh0 if dh0 is not None else q,
        du, dqg, dw, dkd, dA, ddl, chunk_offsets, chunk_bounds, float(scale), TT, NC,
        H=H, HV=HV, K=K, V=V, BK=next_pow2(K), BV=BV, BT=BT,
        USE_L2=use_qk_l2norm, HAS_DHT=dht is not None, STORE_DH0=need_dh0,
        num_warps=4,
    )
    return dict(du=du, dqg=dqg.sum(0), dw=dw.sum(0), dkd=dkd.sum(0), dA=dA.sum(0), ddl=ddl.sum(0), dh0=dh0)
