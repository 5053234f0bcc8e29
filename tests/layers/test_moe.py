import pytest
import torch
import torch.nn.functional as F

import hla.layers.moe as moe_mod
from hla.layers.moe import SparseMoE
from hla.models.config import KimiLinearConfig


def _moe(dtype=torch.float64, **changes):
    cfg = KimiLinearConfig.preset("tiny").replace(**changes)
    moe = SparseMoE(cfg)
    with torch.no_grad():
        for p in (moe.experts.w1, moe.experts.w2, moe.experts.w3, moe.gate.weight):
            p.normal_(0, 0.2)
        moe.gate.e_score_correction_bias.normal_(0, 0.3)  # large enough to change some choices
        for p in moe.shared_experts.parameters():
            p.normal_(0, 0.2)
    return cfg, moe.to(dtype)


def _loop_reference(cfg, moe, x):
    """One token at a time, straight from spec section 4."""
    out = torch.zeros_like(x)
    G = cfg.num_expert_group
    for n in range(x.shape[0]):
        scores = torch.sigmoid(moe.gate.weight @ x[n])
        biased = scores + moe.gate.e_score_correction_bias
        choice = biased.clone()
        if G > 1:
            groups = biased.view(G, -1)
            gscore = groups.topk(2, dim=-1).values.sum(-1)
            keep = set(gscore.topk(cfg.topk_group).indices.tolist())
            for gi in range(G):
                if gi not in keep:
                    choice.view(G, -1)[gi] = float("-inf")
        chosen = choice.topk(cfg.num_experts_per_token).indices.tolist()
        w = torch.stack([(biased if cfg.moe_biased_weights else scores)[e] for e in chosen])
        w = w / (w.sum() + 1e-20) * cfg.routed_scaling_factor
        for e, we in zip(chosen, w, strict=True):
            h = F.silu(moe.experts.w1[e] @ x[n]) * (moe.experts.w3[e] @ x[n])
            out[n] += we * (moe.experts.w2[e] @ h)
        s = moe.shared_experts
        out[n] += s.down_proj.weight @ (F.silu(s.gate_proj.weight @ x[n]) * (s.up_proj.weight @ x[n]))
    return out


@pytest.mark.parametrize("path", ["sorted", "gathered", "padded"])
@pytest.mark.parametrize("biased", [False, True], ids=["unbiased", "biased"])
def test_moe_equals_per_token_loop(path, biased, monkeypatch):
    monkeypatch.setattr(moe_mod, "GATHER_MAX_PAIRS", 10**6 if path == "gathered" else 0)
    monkeypatch.setattr(moe_mod, "PADDED_MAX_TOKENS", 10**6 if path == "padded" else 0)
    cfg, moe = _moe(moe_biased_weights=biased)
    x = torch.randn(3, 7, 64, dtype=torch.float64)
    with torch.no_grad():
        out = moe(x)
        ref = _loop_reference(cfg, moe, x.view(-1, 64)).view_as(x)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-12


def test_moe_biased_and_unbiased_weights_differ():
    _, a = _moe(moe_biased_weights=False)
    _, b = _moe(moe_biased_weights=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 5, 64, dtype=torch.float64)
    assert (a(x) - b(x)).abs().max() > 1e-6


def test_moe_grouped_topk_equals_loop():
    cfg, moe = _moe(num_expert_group=4, topk_group=2)
    x = torch.randn(2, 6, 64, dtype=torch.float64)
    with torch.no_grad():
        out = moe(x)
        ref = _loop_reference(cfg, moe, x.view(-1, 64)).view_as(x)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-12


def test_moe_forward_backward():
    _, moe = _moe(torch.float32)
    x = torch.randn(4, 32, 64, requires_grad=True)  # > PADDED_MAX_TOKENS: the sorted (training) path
    moe(x).square().mean().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in moe.named_parameters():
        if name == "gate.e_score_correction_bias":
            assert p.grad is None  # updated by balancing, not by backprop
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
