"""Small pieces shared by the KDA Triton kernels: the fused gate, softplus, helpers for launch shapes."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def softplus_f32(x):
    # log(1 + e^x) = max(x, 0) + log(1 + e^-|x|); for e^-|x| < 1e-4 the series t - t^2/2 keeps the
    # tiny values that log(1 + t) would round to zero in fp32. Above 20 it is x, as in torch.
    t = tl.exp(-tl.abs(x))
    lp = tl.where(t < 1e-4, t * (1.0 - 0.5 * t), tl.log(1.0 + t))
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


def next_pow2(x: int) -> int:
    return triton.next_power_of_2(int(x))


def tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]
