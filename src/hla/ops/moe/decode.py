"""Routed experts for few tokens (decode): two Triton kernels that read only the chosen experts.

The stacked parameters ``w1/w3: [E, I, d]`` and ``w2: [E, d, I]`` are indexed by the expert ids
inside the kernels, so no weight is copied and nothing is read on the host: the path is sync-free
and can be captured in a CUDA graph.

- ``moe_gate_up_fwd_kernel``: one program per (pair, I-block), ``h[p] = silu(x_t @ w1[e]^T) *
  (x_t @ w3[e]^T)`` for its block, fp32 accumulate, into an fp32 ``[P, I]`` buffer. Weight loads
  run along the contiguous ``d`` of ``w1/w3``.
- ``moe_down_fwd_kernel``: one program per (token, d-block), looping over the token's ``k``
  slots: ``y[t] = sum_s weight[t, s] * h[t*k+s] @ w2[e_s]^T`` with loads along the contiguous
  ``I`` of ``w2``. A fixed summation order, no atomics: deterministic.

Pairs (resp. tokens) are the fastest grid axis, so the programs running together share a weight
block; pairs that chose the same expert then mostly read it from L2 rather than from HBM.
Each pair still reads its expert's block, so with many tokens sharing experts the HBM traffic can
exceed the unique bytes; ``MOE_DECODE_MAX_PAIRS`` bounds where this path is used.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# SparseMoE uses this path on CUDA for at most this many (token, slot) pairs.
MOE_DECODE_MAX_PAIRS = 512


def _gate_up_configs():
    if INTERPRET:
        return [triton.Config({"BI": 16, "BD": 32}, num_warps=4)]
    return [
        triton.Config({"BI": bi, "BD": bd}, num_warps=w, num_stages=s)
        for bi, bd, w, s in [
            (8, 256, 4, 3), (16, 256, 4, 3), (16, 512, 8, 3), (32, 256, 8, 3),
            (8, 512, 4, 4), (16, 128, 4, 4), (32, 128, 4, 4), (64, 128, 8, 3),
        ]
    ]


def _down_configs():
    if INTERPRET:
        return [triton.Config({"BD": 16, "BI": 32}, num_warps=4)]
    return [
        triton.Config({"BD": bd, "BI": bi}, num_warps=w, num_stages=s)
        for bd, bi, w, s in [
            (8, 256, 4, 3), (16, 256, 4, 3), (16, 512, 8, 3), (32, 256, 8, 3),
            (8, 512, 4, 4), (4, 512, 4, 4), (32, 128, 4, 4), (64, 128, 8, 3),
        ]
    ]


@triton.autotune(configs=_gate_up_configs(), key=["P", "I", "D"])
@triton.jit
def moe_gate_up_fwd_kernel(
    x, w1, w3, idx, h, P, I, D,
    K: tl.constexpr, BI: tl.constexpr, BD: tl.constexpr,
):
    i_p = tl.program_id(0)
    i_i = tl.program_id(1)
    i_t = i_p // K
    i_e = tl.load(idx + i_p).to(tl.int64)
    o_i = i_i * BI + tl.arange(0, BI)
    m_i = o_i < I
    o_w = i_e * I * D + o_i.to(tl.int64)[:, None] * D  # [BI, 1]
    b_a = tl.zeros([BI], dtype=tl.float32)
    b_b = tl.zeros([BI], dtype=tl.float32)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m_d = o_d < D
        b_x = tl.load(x + i_t.to(tl.int64) * D + o_d, mask=m_d, other=0.0).to(tl.float32)  # [BD]
        m_w = m_i[:, None] & m_d[None, :]
        b_w1 = tl.load(w1 + o_w + o_d[None, :], mask=m_w, other=0.0).to(tl.float32)  # [BI, BD]
        b_w3 = tl.load(w3 + o_w + o_d[None, :], mask=m_w, other=0.0).to(tl.float32)
        b_a += tl.sum(b_w1 * b_x[None, :], axis=1)
        b_b += tl.sum(b_w3 * b_x[None, :], axis=1)
    b_h = b_a * tl.sigmoid(b_a) * b_b
    tl.store(h + i_p.to(tl.int64) * I + o_i, b_h, mask=m_i)


@triton.autotune(configs=_down_configs(), key=["N", "I", "D"])
@triton.jit
def moe_down_fwd_kernel(
    h, w2, idx, weight, y, N, I, D,
    K: tl.constexpr, BD: tl.constexpr, BI: tl.constexpr,
):
    i_t = tl.program_id(0)
    i_d = tl.program_id(1)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    b_y = tl.zeros([BD], dtype=tl.float32)
    for s in range(K):
        i_p = i_t * K + s
        i_e = tl.load(idx + i_p).to(tl.int64)
        b_g = tl.load(weight + i_p).to(tl.float32)
        o_w = i_e * D * I + o_d.to(tl.int64)[:, None] * I  # [BD, 1]
        b_s = tl.zeros([BD], dtype=tl.float32)
        for i0 in range(0, I, BI):
            o_i = i0 + tl.arange(0, BI)
            m_i = o_i < I
            b_h = tl.load(h + i_p.to(tl.int64) * I + o_i, mask=m_i, other=0.0)  # [BI] fp32
            b_w = tl.load(w2 + o_w + o_i[None, :], mask=m_d[:, None] & m_i[None, :], other=0.0).to(tl.float32)
            b_s += tl.sum(b_w * b_h[None, :], axis=1)
        b_y += b_g * b_s
    tl.store(y + i_t.to(tl.int64) * D + o_d, b_y.to(y.dtype.element_ty), mask=m_d)


def moe_experts_decode(
    x: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weight: torch.Tensor,
) -> torch.Tensor:
    """Routed experts for few tokens; same math as ``moe_experts_reference``.

    ``x: [N, d]`` (fp32/bf16/fp16), ``w1/w3: [E, I, d]``, ``w2: [E, d, I]`` (contiguous, any of
    those dtypes), ``topk_idx: [N, k]`` integer, ``topk_weight: [N, k]`` float. Returns ``[N, d]`` in
    ``x.dtype``; accumulates in fp32; the intermediate ``h`` is kept in fp32.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be [N, d], got shape {tuple(x.shape)}")
    N, D = x.shape
    if w1.dim() != 3 or w1.shape[2] != D or w3.shape != w1.shape:
        raise ValueError(f"w1, w3 must both be [E, I, {D}], got {tuple(w1.shape)} and {tuple(w3.shape)}")
    E, I, _ = w1.shape
    if w2.shape != (E, D, I):
        raise ValueError(f"w2 must be [{E}, {D}, {I}], got {tuple(w2.shape)}")
    if topk_idx.dim() != 2 or topk_idx.shape[0] != N or topk_weight.shape != topk_idx.shape:
        raise ValueError(
            f"topk_idx and topk_weight must both be [{N}, k], "
            f"got {tuple(topk_idx.shape)} and {tuple(topk_weight.shape)}"
        )
    if topk_idx.dtype.is_floating_point:
        raise ValueError(f"topk_idx must be an integer tensor, got {topk_idx.dtype}")
    for name, t in (("x", x), ("w1", w1), ("w3", w3), ("w2", w2)):
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    k = topk_idx.shape[1]
    P = N * k
    x, w1, w3, w2 = x.contiguous(), w1.contiguous(), w3.contiguous(), w2.contiguous()
    idx = topk_idx.contiguous()
    wt = topk_weight.contiguous()
    h = torch.empty(P, I, device=x.device, dtype=torch.float32)
    y = torch.empty(N, D, device=x.device, dtype=x.dtype)
    if N == 0:
        return y
    moe_gate_up_fwd_kernel[lambda m: (P, triton.cdiv(I, m["BI"]))](x, w1, w3, idx, h, P, I, D, K=k)
    moe_down_fwd_kernel[lambda m: (N, triton.cdiv(D, m["BD"]))](h, w2, idx, wt, y, N, I, D, K=k)
    return y
