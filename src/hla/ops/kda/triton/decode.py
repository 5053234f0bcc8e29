"""Fused KDA decode step: gate, l2norm, beta and the state update in one kernel.

Each program owns one value head's state slice ``S[:, v-block]`` of one sequence: it reads the fp32
state once from its pool slot, runs the T (1..a few) tokens of that sequence through it in
registers, writes the outputs and writes the state back in place. Bytes moved are the floor for
this op: the state read and written once, plus the token's q/k/v/g (small). No host sync, no
allocation besides the output, so the step can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hla.ops.kda.triton.common import kda_gate_f32, next_pow2


@triton.jit
def kda_decode_kernel(
    q, k, v, g, beta, state, state_indices, o, A_log, dt_bias,
    scale, lower_bound,
    T,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
    HAS_GATE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LB: tl.constexpr,
    USE_L2: tl.constexpr, USE_SIGMOID: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hv = i_bh // HV, i_bh % HV
    i_h = i_hv // (HV // H)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_s = m_k[:, None] & m_v[None, :]

    slot = tl.load(state_indices + i_b).to(tl.int64)
    # A negative slot marks a padded batch row (serving engines pad graph batches): it touches no
    # state and gets zeros.
    valid = slot >= 0
    slot = tl.maximum(slot, 0)
    # Addresses: one int64 scalar base per program (a pool can exceed 2^31 elements) plus an
    # int64 offset tile. The tile must be int64, not int32: each thread's 16 row vectors (BV=64,
    # 4 warps) then sit at constant distances from one base register pair and ptxas folds them
    # into the loads' and stores' immediates; an int32 tile is sign-extended per element, the
    # fold is lost and 16 address pairs (32 registers) stay live from the state load to its
    # store. Measured offline for sm_90a with T = 1 and aligned pointers (benchmarks/kda_regs.py):
    # BV=64 / 4 warps 127 registers (4 blocks per SM), BV=32 / 4 warps 72, BV=16 / 2 warps 72;
    # with an int32 tile 165 / 96 / 89 and with the former per-element int64 address
    # ((slot * HV + hv) * K + k) * V + v 165 / 96 / 93 (3 blocks per SM at BV=64). No spills.
    p_s = state + (slot * HV + i_hv) * (K * V)
    o_s = o_k[:, None].to(tl.int64) * V + o_v[None, :]
    b_s = tl.load(p_s + o_s, mask=m_s & valid, other=0.0).to(tl.float32)  # [BK, BV]

    if HAS_GATE:
        b_a = tl.exp(tl.load(A_log + i_hv).to(tl.float32))
        if HAS_BIAS:
            b_bias = tl.load(dt_bias + i_hv * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        else:
            b_bias = tl.zeros([BK], dtype=tl.float32)

    for t in range(T):
        tok = (i_b * T + t).to(tl.int64)
        p_qk = (tok * H + i_h) * K  # int64 scalars; the [BK] / [BV] offsets stay int32
        p_hv = tok * HV + i_hv
        b_q = tl.load(q + p_qk + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_k = tl.load(k + p_qk + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + p_hv * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_g = tl.load(g + p_hv * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_beta = tl.load(beta + p_hv).to(tl.float32)
        if USE_L2:
            b_q = b_q / tl.sqrt(tl.sum(b_q * b_q) + 1e-6)
            b_k = b_k / tl.sqrt(tl.sum(b_k * b_k) + 1e-6)
        if HAS_GATE:
            b_g = kda_gate_f32(b_g, b_a, b_bias, lower_bound, HAS_BIAS, HAS_LB)
        if USE_SIGMOID:
            b_beta = tl.sigmoid(b_beta)
        b_q = b_q * scale
        b_s = b_s * tl.exp(b_g)[:, None]
        b_kv = tl.sum(b_s * b_k[:, None], axis=0)  # [BV]
        b_d = (b_v - b_kv) * b_beta
        b_s = b_s + b_k[:, None] * b_d[None, :]
        b_o = tl.sum(b_s * b_q[:, None], axis=0)
        b_o = tl.where(valid, b_o, 0.0)
        tl.store(o + p_hv * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)

    tl.store(p_s + o_s, b_s.to(state.dtype.element_ty), mask=m_s & valid)


def _pick_bv(n_heads: int, V: int, K: int) -> int:
    """Value-block width: enough programs to cover the SMs at small batch, wide rows at large batch.

    Chosen from the H200 sweep at H=32, K=V=128 (benchmarks/kda_notes.md: best of BV 16/32/64/128
    at batch 1, 64 and 256), measured when BV=64 / 4 warps took 165 registers (3 blocks per SM).
    With the int64 offset tile it takes 127 (4 blocks per SM, 16 warps), which favours BV=64 at
    batch >= 32 further, so the thresholds are kept; the sweep in benchmarks/kda_kernels.py
    re-measures them. Warps (in kda_decode_triton): 4 from BV * BK = 4096 up (at BV=64, 2 warps
    take 234 registers and 8 warps give 2 blocks per SM), 2 below.
    """
    if n_heads >= 1024:
        bv = 64 if K <= 128 else 32
    elif n_heads >= 128:
        bv = 32
    else:
        bv = 16
    return min(bv, next_pow2(V))


def kda_decode_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    *,
    scale: float,
    state_indices: torch.Tensor | None = None,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    lower_bound: float | None = None,
    use_qk_l2norm: bool = False,
    use_beta_sigmoid: bool = False,
    block_v: int | None = None,
    num_warps: int | None = None,
    max_registers: int | None = None,
) -> torch.Tensor:
    """One (or a few) KDA decode steps, updating ``state`` in place.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, HV, V]``; g: ``[B, T, HV, K]`` log-decay, or the raw
            gate when ``A_log`` is given; beta: ``[B, T, HV]`` (logits if ``use_beta_sigmoid``).
        state: ``[P, HV, K, V]`` float32 pool, updated in place.
        state_indices: ``[B]`` int slot of each row (default ``arange(B)``); a negative slot
            leaves the pool untouched and gives zero outputs.
        block_v, num_warps, max_registers: launch overrides (benchmarks only); ``max_registers``
            caps registers per thread (ptx ``.maxnreg``), trading spills for blocks per SM.

    Returns:
        ``o: [B, T, HV, V]`` in ``v.dtype``.
    """
    B, T, H, K = q.shape
    HV, V = v.shape[-2], v.shape[-1]
    if state.dtype != torch.float32:
        raise ValueError(f"state: expected float32, got {state.dtype}")
    if not state.is_contiguous():
        raise ValueError("state: expected a contiguous tensor (it is updated in place)")
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    if state_indices is None:
        state_indices = torch.arange(B, device=q.device, dtype=torch.int32)
    o = torch.empty_like(v)
    BK = next_pow2(K)
    BV = block_v or _pick_bv(B * HV, V, K)
    grid = (triton.cdiv(V, BV), B * HV)
    has_gate = A_log is not None
    kda_decode_kernel[grid](
        q, k, v, g, beta, state, state_indices, o,
        A_log if has_gate else q, dt_bias if dt_bias is not None else q,
        float(scale), float(lower_bound) if lower_bound is not None else 0.0,
        T,
        H=H, HV=HV, K=K, V=V, BK=BK, BV=BV,
        HAS_GATE=has_gate, HAS_BIAS=has_gate and dt_bias is not None,
        HAS_LB=has_gate and lower_bound is not None,
        USE_L2=use_qk_l2norm, USE_SIGMOID=use_beta_sigmoid,
        num_warps=num_warps or (4 if BV * BK >= 4096 else 2),
        **({"maxnreg": max_registers} if max_registers else {}),
    )
    return o
