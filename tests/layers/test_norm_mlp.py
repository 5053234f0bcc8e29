import torch

from hla.layers.mlp import SwiGLUMLP
from hla.layers.norm import RMSNorm, rms_norm, rms_norm_explicit


def test_rmsnorm_formula_and_dtype():
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    ref = norm.weight.double() * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(norm(x), ref, rtol=1e-12, atol=1e-12)
    xb = x.to(torch.bfloat16)
    out = norm.to(torch.bfloat16)(xb)
    assert out.dtype == torch.bfloat16
    assert ((out.double() - ref).norm() / ref.norm()) < 1e-2


def test_rmsnorm_and_mlp_backward():
    norm, mlp = RMSNorm(16), SwiGLUMLP(16, 24)
    x = torch.randn(2, 4, 16, requires_grad=True)
    mlp(norm(x)).sum().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in list(norm.named_parameters()) + list(mlp.named_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    x0 = x[0, 0]
    ref = mlp.down_proj.weight @ (torch.nn.functional.silu(mlp.gate_proj.weight @ x0) * (mlp.up_proj.weight @ x0))
    torch.testing.assert_close(mlp(x)[0, 0], ref)


def test_fused_rms_norm_matches_explicit_formula():
    x = torch.randn(3, 7, 256) * 4
    w = torch.rand(256) + 0.5
    for dtype in (torch.float32, torch.bfloat16):
        a = rms_norm(x.to(dtype), w.to(dtype), 1e-5)
        b = rms_norm_explicit(x.to(dtype), w.to(dtype), 1e-5)
        assert a.dtype == dtype
        assert ((a.float() - b.float()).norm() / b.float().norm()) < (1e-6 if dtype == torch.float32 else 4e-3)
