"""LeanLaunch (launch.py): what it keys a compiled kernel on, and on a GPU that a repeated launch skips Triton's
per-call path yet computes what Triton's launch does, with a new compile where the specialization changes."""

import pytest
import torch
import triton
import triton.language as tl

from hla.ops.kda.triton.common import INTERPRET
from hla.ops.kda.triton.launch import LeanLaunch, _arg_signature


def test_signature_separates_what_triton_specializes_on():
    x = torch.zeros(64, dtype=torch.bfloat16)
    assert _arg_signature(x) == _arg_signature(torch.ones(64, dtype=torch.bfloat16))
    assert _arg_signature(x[1:]) != _arg_signature(x)  # 2 bytes off: no 16-byte alignment
    assert _arg_signature(x) != _arg_signature(x.float())
    assert _arg_signature(1) != _arg_signature(2) != _arg_signature(16)
    assert _arg_signature(3) == _arg_signature(5)
    assert _arg_signature(2**40) != _arg_signature(3)  # int64
    assert _arg_signature(True) != _arg_signature(1)
    assert _arg_signature(0.5) == _arg_signature(2.0)
    with pytest.raises(TypeError):
        _arg_signature("a string")


@triton.jit
def _axpb_kernel(x, y, n, a, b: tl.constexpr, BLOCK: tl.constexpr = 128):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(y + offs, tl.load(x + offs, mask=m) * a + b, mask=m)


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs a GPU")
def test_repeated_launch_skips_tritons_path(monkeypatch):
    from triton.runtime.jit import JITFunction

    runs = []
    run = JITFunction.run
    monkeypatch.setattr(JITFunction, "run", lambda self, *a, **k: runs.append(1) or run(self, *a, **k))
    launch = LeanLaunch(_axpb_kernel)
    x = torch.randn(1000, device="cuda")
    for i in range(3):
        y = torch.empty_like(x)
        launch[(8,)](x, y, x.numel(), 2.0 + i, b=1.0)
        torch.testing.assert_close(y, x * (2.0 + i) + 1.0)
    assert len(runs) == 1  # the first launch only
    y = torch.zeros(1000, device="cuda")
    launch[(8,)](x[1:], y[1:], x.numel() - 1, 3.0, b=1.0)  # 4 bytes off: another specialization, Triton's path
    torch.testing.assert_close(y[1:], x[1:] * 3.0 + 1.0)
    launch[(8,)](x, y, x.numel(), 3.0, b=2.0, BLOCK=256)  # other constexprs: Triton's path
    torch.testing.assert_close(y[:1000], x * 3.0 + 2.0)
    assert len(runs) == 3
