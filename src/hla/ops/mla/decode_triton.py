"""Flash-decoding for absorbed MLA (MQA over the 576-wide latent) in Triton.

Every head reads the same latent rows, so one program loads a ``[BS, R]`` latent block and a
``[BS, dr]`` k_pe block once and scores all ``T*H`` query rows against it with ``tl.dot``
(``[BM, R] x [R, BS]``, query rows padded to >= 16). The sequence is split over programs
(split-K, grid ``(splits, B, M-blocks)``, ``splits`` chosen so the grid fills the SMs); each
keeps an fp32 online softmax (running max, sum, ``[BM, R]`` accumulator) and writes them to a
workspace, then ``mla_combine_kernel`` merges the splits. With ``T*H <= 64`` (decode: T = 1,
H = 32) there is one M-block, so the latent is read from HBM exactly once.

Blocks past a row's last visible key (``lengths[b] + T - 1``) are never loaded: the loop bound
comes from ``lengths`` inside the kernel, so nothing is read on the host (CUDA-graph capturable).
Loads are masked to visible slots, so stale or NaN slots never enter the arithmetic.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from hla.ops.device import sm_count

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Split lengths are a multiple of this, so every BS below divides them.
_CHUNK_ALIGN = 64
# Programs launched per SM (split count = WAVES * SMs / (B * M-blocks), splits >= 256 keys).
WAVES = 2  # benchmarks/mla_decode.py sweeps it by setting this attribute


def _configs():
    if INTERPRET:
        return [triton.Config({"BS": 16}, num_warps=4)]
    return [
        triton.Config({"BS": bs}, num_warps=w, num_stages=s)
        for bs, w, s in [(16, 4, 2), (32, 4, 2), (32, 8, 2), (64, 8, 2), (32, 8, 3), (16, 8, 3), (64, 4, 1)]
    ]


@triton.autotune(configs=_configs(), key=["M", "R", "DR", "BM"])
@triton.jit
def mla_decode_split_kernel(
    q_ptr, qpe_ptr, c_ptr, pe_ptr, len_ptr, mws_ptr, lws_ptr, ows_ptr,
    S, CHUNK, scale,
    s_cb, s_cs, s_pb, s_ps, NSPLIT,
    M, H: tl.constexpr, T: tl.constexpr, R: tl.constexpr, DR: tl.constexpr,
    BR: tl.constexpr, BDR: tl.constexpr, BM: tl.constexpr,
    IEEE: tl.constexpr, BS: tl.constexpr,
):
    i_s, i_b, i_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c_row = c_ptr + i_b.to(tl.int64) * s_cb  # int64: B * S_alloc * R passes 2**31 at batch 8, 1M
    pe_row = pe_ptr + i_b.to(tl.int64) * s_pb
    rows = i_m * BM + tl.arange(0, BM)  # query rows m = t * H + h
    row_ok = rows < M
    o_r = tl.arange(0, BR)
    o_d = tl.arange(0, BDR)
    r_ok = o_r < R
    d_ok = o_d < DR

    length = tl.load(len_ptr + i_b).to(tl.int32)
    # Row m (token t = m // H) sees keys j <= length + t; padded rows see none.
    limit = tl.where(row_ok, length + rows // H, -1)
    k_end = tl.minimum(S, length + T)  # one past the last key any row of b sees
    start = i_s * CHUNK
    stop = tl.minimum(start + CHUNK, k_end)

    q_base = (i_b * M + rows) * R
    q = tl.load(q_ptr + q_base[:, None] + o_r[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
    qpe_base = (i_b * M + rows) * DR
    qpe = tl.load(qpe_ptr + qpe_base[:, None] + o_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BR], dtype=tl.float32)
    # Empty when the split starts past the row's last key: the block is skipped, nothing is read.
    for j0 in range(start, stop, BS):
        o_j = j0 + tl.arange(0, BS)
        j_ok = o_j < stop
        c = tl.load(c_row + o_j[:, None] * s_cs + o_r[None, :],
                    mask=j_ok[:, None] & r_ok[None, :], other=0.0)  # [BS, BR]
        pe = tl.load(pe_row + o_j[:, None] * s_ps + o_d[None, :],
                     mask=j_ok[:, None] & d_ok[None, :], other=0.0)  # [BS, BDR]
        if IEEE:
            s = tl.dot(q, tl.trans(c), input_precision="ieee") + tl.dot(qpe, tl.trans(pe), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(c)) + tl.dot(qpe, tl.trans(pe))
        s = s * scale
        vis = (o_j[None, :] <= limit[:, None]) & j_ok[None, :]
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row with nothing visible yet keeps m = -inf; subtract 0 instead so exp gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            pv = tl.dot(p.to(c.dtype), c, input_precision="ieee")
        else:
            pv = tl.dot(p.to(c.dtype), c)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    ws_row = (i_b * NSPLIT + i_s) * M + rows
    tl.store(mws_ptr + ws_row, m_i, mask=row_ok)
    tl.store(lws_ptr + ws_row, l_i, mask=row_ok)
    tl.store(ows_ptr + ws_row[:, None] * R + o_r[None, :], acc, mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def mla_combine_kernel(
    mws_ptr, lws_ptr, ows_ptr, o_ptr, M, R,
    NSPLIT: tl.constexpr, BSP: tl.constexpr, BRC: tl.constexpr,
):
    i_row, i_r = tl.program_id(0), tl.program_id(1)  # i_row = b * M + m
    i_b = i_row // M
    i_m = i_row % M
    o_sp = tl.arange(0, BSP)
    sp_ok = o_sp < NSPLIT
    ws = (i_b * NSPLIT + o_sp) * M + i_m
    m_s = tl.load(mws_ptr + ws, mask=sp_ok, other=float("-inf"))
    l_s = tl.load(lws_ptr + ws, mask=sp_ok, other=0.0)
    m_max = tl.max(m_s, axis=0)  # finite: key 0 is visible to every query
    w = tl.where(m_s == float("-inf"), 0.0, tl.exp(m_s - m_max))
    denom = tl.sum(w * l_s, axis=0)
    o_r = i_r * BRC + tl.arange(0, BRC)
    r_ok = o_r < R
    o = tl.load(ows_ptr + ws[:, None] * R + o_r[None, :], mask=sp_ok[:, None] & r_ok[None, :], other=0.0)
    out = tl.sum(o * w[:, None], axis=0) / denom
    tl.store(o_ptr + i_row * R + o_r, out.to(o_ptr.dtype.element_ty), mask=r_ok)


def mla_decode(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    latent: torch.Tensor,
    k_pe: torch.Tensor,
    lengths: torch.Tensor,
    span: int,
    scale: float,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Absorbed MLA attention for few new tokens; same math as ``mla_decode_reference``.

    ``q_lat: [B, T, H, R]``, ``q_pe: [B, T, H, dr]``, ``latent: [B, S_alloc, R]``,
    ``k_pe: [B, S_alloc, dr]`` (fp32/bf16/fp16; queries are cast to the cache dtype; the cache
    may be a strided view whose last dim is contiguous), ``lengths: [B]`` integer on the same
    device, ``span`` a host int ``<= S_alloc`` (keys ``[0, span)``; query ``t`` of row ``b``
    sees keys ``j <= lengths[b] + t``). ``num_splits`` overrides the split count (tests); ``out``
    (``[B, T, H, R]`` contiguous, ``q_lat.dtype``) receives the result if given.
    Returns ``o_lat: [B, T, H, R]`` in ``q_lat.dtype``; fp32 scores, softmax and accumulation.
    """
    if q_lat.dim() != 4:
        raise ValueError(f"q_lat must be [B, T, H, R], got shape {tuple(q_lat.shape)}")
    B, T, H, R = q_lat.shape
    if latent.dim() != 3 or latent.shape[0] != B or latent.shape[2] != R:
        raise ValueError(f"latent must be [{B}, S_alloc, {R}], got {tuple(latent.shape)}")
    DR = k_pe.shape[-1]
    if k_pe.dim() != 3 or k_pe.shape[:2] != latent.shape[:2]:
        raise ValueError(f"k_pe must be [{B}, {latent.shape[1]}, dr], got {tuple(k_pe.shape)}")
    if q_pe.shape != (B, T, H, DR):
        raise ValueError(f"q_pe must be [{B}, {T}, {H}, {DR}], got {tuple(q_pe.shape)}")
    if lengths.shape != (B,) or lengths.dtype.is_floating_point:
        raise ValueError(f"lengths must be an integer [{B}] tensor, got {tuple(lengths.shape)} {lengths.dtype}")
    if not 0 < span <= latent.shape[1]:
        raise ValueError(f"span must be in [1, {latent.shape[1]}], got {span}")
    for name, t in (("latent", latent), ("k_pe", k_pe)):
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}")
    dt = latent.dtype
    M = T * H
    q = q_lat.to(dt).reshape(B, M, R).contiguous()
    qpe = q_pe.to(dt).reshape(B, M, DR).contiguous()
    BM = max(16, min(64, triton.next_power_of_2(M)))
    n_m = triton.cdiv(M, BM)
    if num_splits is None:
        # Enough programs for WAVES per SM, but no split shorter than 256 keys.
        num_splits = max(1, min(triton.cdiv(span, 256), triton.cdiv(WAVES * sm_count(latent.device), B * n_m)))
    chunk = triton.cdiv(triton.cdiv(span, num_splits), _CHUNK_ALIGN) * _CHUNK_ALIGN
    nsplit = triton.cdiv(span, chunk)
    f32 = torch.float32
    m_ws = torch.empty(B, nsplit, M, device=q.device, dtype=f32)
    l_ws = torch.empty(B, nsplit, M, device=q.device, dtype=f32)
    o_ws = torch.empty(B, nsplit, M, R, device=q.device, dtype=f32)
    if out is None:
        out = torch.empty(B, T, H, R, device=q.device, dtype=q_lat.dtype)
    elif out.shape != (B, T, H, R) or out.dtype != q_lat.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{B}, {T}, {H}, {R}] {q_lat.dtype} tensor, "
                         f"got {tuple(out.shape)} {out.dtype}")
    mla_decode_split_kernel[(nsplit, B, n_m)](
        q, qpe, latent, k_pe, lengths, m_ws, l_ws, o_ws,
        span, chunk, float(scale),
        latent.stride(0), latent.stride(1), k_pe.stride(0), k_pe.stride(1), nsplit,
        M, H=H, T=T, R=R, DR=DR,
        BR=triton.next_power_of_2(R), BDR=max(16, triton.next_power_of_2(DR)), BM=BM,
        IEEE=dt == torch.float32,
    )
    BSP = max(2, triton.next_power_of_2(nsplit))
    BRC = max(16, min(128, triton.next_power_of_2(R), 8192 // BSP))  # bounds the [BSP, BRC] tile
    mla_combine_kernel[(B * M, triton.cdiv(R, BRC))](
        m_ws, l_ws, o_ws, out, M, R,
        NSPLIT=nsplit, BSP=BSP, BRC=BRC,
    )
    return out
