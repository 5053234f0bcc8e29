"""The kernels' fused softplus (a series below t = e^-|x| = 1/64, log2 of 1 + t above, x itself above
20) and the gate built on it, against float64 torch, fp32 under the Triton interpreter (which takes
numpy's exp / log2 where the GPU takes MUFU ex2 / lg2; the GPU's approximation error is bounded in
`common.softplus_f32` and checked end to end by benchmarks/check_kda_gpu.py)."""

import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

from hla.ops.kda.triton.common import kda_gate_f32, softplus_f32

sys.path.insert(0, str(Path(__file__).parent.parent))
from _triton_helpers import INTERPRETER_ONLY  # noqa: E402

pytestmark = INTERPRETER_ONLY


@triton.jit
def _softplus_kernel(x, y, n, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y + o, softplus_f32(tl.load(x + o, mask=o < n, other=0.0)), mask=o < n)


@triton.jit
def _gate_kernel(x, bias, y, n, a, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    g = kda_gate_f32(tl.load(x + o, mask=o < n, other=0.0), a, tl.load(bias + o, mask=o < n, other=0.0),
                     0.0, True, False)
    tl.store(y + o, g, mask=o < n)


def test_softplus_matches_float64_across_the_branches():
    # e^x down to -80 (the GPU flushes results below 2^-126, i.e. x < -87.3), both sides of the series cut
    # at t = 1/64 (x = -+4.16), and past the x > 20 shortcut
    x = torch.cat([torch.linspace(-80, 40, 4001), torch.linspace(-4.3, -4.0, 301), torch.linspace(4.0, 4.3, 301)])
    y = torch.empty_like(x)
    _softplus_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    ref = torch.nn.functional.softplus(x.double())
    err = ((y.double() - ref).abs() / ref).max().item()
    assert err < 1e-5, err
    # the series side keeps full relative precision where e^x is far below fp32's epsilon of 1
    tiny = x < -20
    assert ((y[tiny].double() - ref[tiny]).abs() / ref[tiny]).max().item() < 1e-6


def test_kda_gate_matches_float64():
    torch.manual_seed(0)
    raw, bias = torch.randn(2048) * 4, torch.randn(2048) * 0.5 - 3
    a = 5.0
    g = torch.empty_like(raw)
    _gate_kernel[(2,)](raw, bias, g, raw.numel(), a, BLOCK=1024)
    ref = -a * torch.nn.functional.softplus((raw + bias).double())
    assert ((g.double() - ref).abs() / ref.abs()).max().item() < 1e-5
