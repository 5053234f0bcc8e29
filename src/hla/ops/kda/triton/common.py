"""Small pieces shared by the KDA Triton kernels: the fused gate, softplus, helpers for launch shapes."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from hla.ops.device import capability

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The largest grid dimension after the first (CUDA's gridDim.y / z): a launch whose chunks run along it (a head-major
# grid) takes at most this many chunks.
MAX_GRID_Y = 65535


_INTERPRET = tl.constexpr(INTERPRET)
LOG2E = tl.constexpr(1.4426950408889634)


def reg_cap(max_registers: int | None) -> dict:
    """Launch option capping a kernel's registers per thread (more programs per SM, maybe spills);
    None or 0: ptxas chooses. The interpreter takes no such option."""
    return {"maxnreg": max_registers} if max_registers and not INTERPRET else {}


def refuse_one_stage_16bit(num_stages: int, K: int, tile_bytes: int, walk: str) -> None:
    """Refuse a chunk walk (the recurrence, its states launch, the chain) at one software-pipeline stage with
    16-bit tiles and K <= 128: on the H200 under Triton 3.6 the recurrence's output product then read shared memory
    out of bounds (compute-sanitizer, session 11: BV 16 and 32 at 4 warps, T 512 to 8192), and the states launch and
    the chain hit illegal addresses at B1 T8192 H32 (session 13). The launchers' defaults never pick it (fp32 tiles
    at one stage ran clean). Refused under the interpreter too (it ignores stages), so the CPU tests see the
    refusal."""
    if num_stages == 1 and K <= 128 and tile_bytes == 2:
        raise ValueError(f"num_stages: 1 faults for the {walk} with 16-bit tiles (K <= 128); use 2 or 3")


def on_hopper(x: torch.Tensor) -> bool:
    """Whether x lives on an sm_90 GPU and kernels really run there (not the interpreter): where the Gluon kernels
    (wgmma, TMA) apply."""
    return not INTERPRET and x.is_cuda and capability(x.device) == (9, 0)


def tma_descriptor(x: torch.Tensor, block: list[int]) -> TensorDescriptor:
    """TMA descriptor of a [TT, heads, D] tensor seen as [TT, heads * D], boxes of `block` in the default NVMMA
    shared layout (the Gluon kernels' operand tiles)."""
    return TensorDescriptor.from_tensor(x.view(x.shape[0], -1), block,
                                        _box_layout(tuple(block), x.dtype == torch.bfloat16))


@functools.lru_cache(maxsize=16)
def _box_layout(block: tuple[int, ...], bf16: bool) -> gl.NVMMASharedLayout:
    # the shared layout of a TMA box, built once per shape: building it took 7.6 of the 12 us a descriptor costs the
    # host (CPU, session 18), and a forward makes nine descriptors
    return gl.NVMMASharedLayout.get_default_for(list(block), gl.bfloat16 if bf16 else gl.float32)


@triton.jit
def bf16_halves(x):
    """fp32 x -> its bf16 hi and lo halves (x ~ hi + lo to ~16 mantissa bits): two bf16 tensor-core products
    with them keep that precision where one product of x rounded to bf16 or tf32 would keep 8 or 10 bits."""
    hi = x.to(tl.bfloat16)
    return hi, (x - hi.to(tl.float32)).to(tl.bfloat16)


@triton.jit
def exp_ftz(x):
    """e^x as one MUFU ex2 of x log2(e) (tl.exp2 lowers to ex2.approx.ftz: 2 SASS an element against
    tl.exp's 5, whose non-ftz ex2 adds a rescale for results below 2^-126). Results below 2^-126
    (x < -87.3) become 0: every exponential in these kernels is a decay factor whose underflow is
    harmless (the partner factor of an anchored product is <= exp(SAFE_SPAN) = exp(80), so a factor
    that matters is >= exp(-80)), or a term that is then multiplied by O(1) values. The interpreter
    keeps numpy's exp: its exp2 of a rounded x log2(e) only adds that rounding (2.6e-6 relative at x =
    -60) to the fp32 tests' comparisons, and the GPU's tl.exp rounded the same product before."""
    if _INTERPRET:
        return tl.exp(x)
    else:
        return tl.exp2(x * LOG2E)


@triton.jit
def _log2_approx(x):
    """log2 of fp32 x on the MUFU (lg2.approx.f32: absolute error about 2^-22 for x in [1, 2]); numpy's
    log2 under the interpreter."""
    if _INTERPRET:
        return tl.log2(x)
    else:
        return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)


@triton.jit
def softplus_f32(x):
    # log(1 + e^x) = max(x, 0) + log1p(t), t = e^-|x| in (0, 1]. log1p(t): below t = 1/64 four terms of its
    # series (the first dropped term, t^5 / 5, is < 2e-9 t), from there ln 2 * log2(1 + t) on the MUFU:
    # rounding 1 + t (2^-24) and lg2.approx (~2^-22 absolute) leave < 1e-5 of log1p(1/64) = 0.0155, and less
    # above. libdevice's logf (tl.log) costs ~25 instructions an element against ~4 here (sm_90a SASS), and
    # log(1 + t) itself lost up to 6e-4 relative at its old series cut (t = 1e-4). Above 20 it is x, as in
    # torch.
    t = exp_ftz(-tl.abs(x))
    series = t * (1.0 - t * (0.5 - t * (0.3333333333333333 - 0.25 * t)))
    lp = tl.where(t < 0.015625, series, 0.6931471805599453 * _log2_approx(1.0 + t))
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + lp)


@triton.jit
def kda_gate_f32(raw, a, bias, lower_bound, HAS_BIAS: tl.constexpr, HAS_LB: tl.constexpr):
    """raw: [..., BK] fp32, a = exp(A_log[h]) scalar, bias: [BK] -> log-decay g <= 0 (fp32)."""
    x = raw
    if HAS_BIAS:
        x = x + bias
    if HAS_LB:
        return lower_bound * tl.sigmoid(a * x)
    return -a * softplus_f32(x)


@triton.jit
def kda_gate_f32_and_grads(raw, a, bias, lower_bound, HAS_BIAS: tl.constexpr, HAS_LB: tl.constexpr):
    """``kda_gate_f32`` for the backward: -> (g, dg/draw, dg/dA_log), all shaped like raw."""
    g = kda_gate_f32(raw, a, bias, lower_bound, HAS_BIAS, HAS_LB)
    x = raw
    if HAS_BIAS:
        x = x + bias
    if HAS_LB:
        s = tl.sigmoid(a * x)
        ds = lower_bound * s * (1.0 - s)
        return g, ds * a, ds * a * x
    return g, -a * tl.sigmoid(x), g


@triton.jit
def beta_rows(beta_base, rows, m_rows, HV: tl.constexpr, USE_SIGMOID: tl.constexpr):
    """beta of the given rows of a chunk ([R] fp32; beta_base points at the chunk's first token and
    value head, rows stride HV), through the sigmoid when the caller passes logits; 0 on masked rows."""
    b = tl.load(beta_base + rows * HV, mask=m_rows, other=0.0).to(tl.float32)
    if USE_SIGMOID:
        b = tl.where(m_rows, tl.sigmoid(b), 0.0)
    return b


@triton.jit
def qk_row_sumsq(q_base, k_base, o_t, m_t, SQ: tl.constexpr, K: tl.constexpr, BK: tl.constexpr):
    """Sum of squares of the chunk's q and k rows ([BT] fp32 each), read in key blocks of BK."""
    b_nq = tl.zeros([o_t.shape[0]], dtype=tl.float32)
    b_nk = tl.zeros([o_t.shape[0]], dtype=tl.float32)
    for i_k in range(0, K, BK):
        o_k = i_k + tl.arange(0, BK)
        m = m_t[:, None] & (o_k < K)[None, :]
        b_x = tl.load(q_base + o_t[:, None] * SQ + o_k[None, :], mask=m, other=0.0).to(tl.float32)
        b_nq += tl.sum(b_x * b_x, axis=1)
        b_x = tl.load(k_base + o_t[:, None] * SQ + o_k[None, :], mask=m, other=0.0).to(tl.float32)
        b_nk += tl.sum(b_x * b_x, axis=1)
    return b_nq, b_nk


@triton.jit
def tile_row(x, o_t, r):
    """Row r of a [BT, BK] tile as [BK] (a masked column sum; 0 when r is outside 0..BT-1)."""
    return tl.sum(tl.where(o_t[:, None] == r, x, 0.0), axis=0)


@triton.jit
def half_anchors(b_G, b_Gl, o_t, BT: tl.constexpr):
    """The fast path's anchors: Gamma at rows BT/4 - 1, BT/2 - 1, 3BT/4 - 1 ([BK] each) and the span,
    the largest exponent its factors would take (a scalar; Gamma is non-increasing down the rows)."""
    HB: tl.constexpr = BT // 2
    b_G1 = tile_row(b_G, o_t, HB // 2 - 1)
    b_G2 = tile_row(b_G, o_t, HB - 1)
    b_G3 = tile_row(b_G, o_t, HB + HB // 2 - 1)
    span = tl.max(tl.maximum(tl.maximum(-b_G1, b_G1 - b_G2), tl.maximum(b_G2 - b_G3, b_G3 - b_Gl)), axis=0)
    return b_G1, b_G2, b_G3, span


@triton.jit
def level_factors(b_G, o_t, lvl, BT: tl.constexpr, BK: tl.constexpr):
    """Level lvl of the six-level split (blocks of S = BT/2 >> lvl rows): up [BT] marks the rows of odd
    blocks, e [BT, BK] = exp(Gamma_i - Gamma_a) on them and exp(Gamma_a - Gamma_j) on even-block rows
    (a = the last row of the even block; both <= 1), pair [BT, BT] the (i, j) in one pair of blocks."""
    S = (BT // 2) >> lvl
    blk = o_t // S
    up = (blk % 2) == 1
    anchor = tl.where(up, blk * S - 1, blk * S + S - 1)
    b_Gx = tl.gather(b_G, tl.broadcast_to(anchor[:, None], [BT, BK]), 0)
    b_e = exp_ftz(tl.minimum(tl.where(up[:, None], b_G - b_Gx, b_Gx - b_G), 0.0))
    pair = (o_t[:, None] // (2 * S)) == (o_t[None, :] // (2 * S))
    return up, b_e, pair


def next_pow2(x: int) -> int:
    return triton.next_power_of_2(int(x))


def tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]
