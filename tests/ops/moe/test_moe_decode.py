"""The Triton decode path of the routed experts against the float64 per-token reference."""

import pytest
import torch

from hla.ops.moe import moe_experts_decode, moe_experts_reference


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _inputs(N, E, I, D, k, dtype=torch.float32):
    x = torch.randn(N, D, dtype=dtype)
    w1 = torch.randn(E, I, D, dtype=dtype) / D**0.5
    w3 = torch.randn(E, I, D, dtype=dtype) / D**0.5
    w2 = torch.randn(E, D, I, dtype=dtype) / I**0.5
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(N)])
    wt = torch.rand(N, k)
    return x, w1, w3, w2, idx, wt


def _reference(x, w1, w3, w2, idx, wt):
    return moe_experts_reference(x.double(), w1.double(), w3.double(), w2.double(), idx, wt.double())


# Sizes not multiples of the interpreter's blocks (BI=16/32, BD=32/16), so the masks are exercised.
@pytest.mark.parametrize("N,k", [(1, 1), (3, 2), (2, 8)])
def test_matches_reference(N, k):
    args = _inputs(N, E=9, I=40, D=36, k=k)
    out = moe_experts_decode(*args)
    assert out.shape == (N, 36) and out.dtype == torch.float32
    assert _rel(out, _reference(*args)) < 1e-5


def test_duplicate_experts_across_tokens():
    x, w1, w3, w2, _, wt = _inputs(5, E=4, I=24, D=20, k=3)
    idx = torch.tensor([[0, 1, 2], [2, 1, 0], [0, 1, 2], [3, 0, 1], [1, 2, 3]])
    out = moe_experts_decode(x, w1, w3, w2, idx, wt)
    assert _rel(out, _reference(x, w1, w3, w2, idx, wt)) < 1e-5
    # Two tokens with the same input and routing get the same output exactly.
    x[2] = x[0]
    wt[2] = wt[0]
    out = moe_experts_decode(x, w1, w3, w2, idx, wt)
    assert torch.equal(out[0], out[2])


def test_poisoned_outputs_overwritten(monkeypatch):
    # Every torch.empty the wrapper makes starts as NaN; a skipped element would show up.
    real_empty = torch.empty

    def nan_empty(*a, **kw):
        return real_empty(*a, **kw).fill_(float("nan"))

    monkeypatch.setattr(torch, "empty", nan_empty)
    args = _inputs(3, E=6, I=33, D=17, k=2)
    out = moe_experts_decode(*args)
    assert torch.isfinite(out).all()
    assert _rel(out, _reference(*args)) < 1e-5


def test_bad_shapes():
    x, w1, w3, w2, idx, wt = _inputs(2, E=4, I=8, D=12, k=2)
    with pytest.raises(ValueError, match="w2"):
        moe_experts_decode(x, w1, w3, w2.transpose(1, 2), idx, wt)
    with pytest.raises(ValueError, match="topk_idx"):
        moe_experts_decode(x, w1, w3, w2, idx[:1], wt)


def test_matches_layer_paths():
    # The path SparseMoE takes on CUDA agrees with its CPU paths on the tiny config's experts.
    from hla.layers.moe import SparseMoE
    from hla.models.config import KimiLinearConfig

    layer = SparseMoE(KimiLinearConfig.preset("tiny"))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.2)
    x = torch.randn(5, layer.experts.w1.shape[2])
    idx, w = layer.gate(x)
    e = layer.experts
    with torch.no_grad():
        out = moe_experts_decode(x, e.w1, e.w3, e.w2, idx, w)
        assert _rel(out, layer._padded(x, idx, w)) < 1e-5
        assert _rel(out, layer._gathered(x, idx, w)) < 1e-5
