import pytest
import torch

from hla.layers.mla import MultiheadLatentAttention
from hla.models.config import KimiLinearConfig


def _layer(gate=False, dtype=torch.float64):
    cfg = KimiLinearConfig.preset("tiny").replace(mla_use_output_gate=gate)
    layer = MultiheadLatentAttention(cfg, 3).to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer


def _spec_mla(layer, x):
    """Spec section 3 as plain per-head softmax attention (float64)."""
    B, T, _ = x.shape
    H, dn, dr, dv, R = layer.num_heads, layer.nope_dim, layer.rope_dim, layer.v_dim, layer.kv_lora_rank
    q = (x @ layer.q_proj.weight.T).view(B, T, H, dn + dr)
    ckv = x @ layer.kv_a_proj_with_mqa.weight.T
    c = ckv[..., :R]
    c = c / torch.sqrt((c * c).mean(-1, keepdim=True) + 1e-6) * layer.kv_a_layernorm.weight
    k_pe = ckv[..., R:]  # one unrotated k_pe shared by every head
    kv = (c @ layer.kv_b_proj.weight.T).view(B, T, H, dn + dv)
    out = torch.zeros(B, T, H, dv, dtype=x.dtype)
    for b in range(B):
        for h in range(H):
            key = torch.cat([kv[b, :, h, :dn], k_pe[b]], -1)  # [T, dn + dr]
            s = q[b, :, h] @ key.T * (dn + dr) ** -0.5
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            out[b, :, h] = torch.softmax(s, -1) @ kv[b, :, h, dn:]
    if layer.g_proj is not None:
        out = out * torch.sigmoid((x @ layer.g_proj.weight.T).view(B, T, H, dv))
    return out.reshape(B, T, H * dv) @ layer.o_proj.weight.T


@pytest.mark.parametrize("gate", [False, True], ids=["release", "output_gate"])
def test_mla_equals_spec_softmax_attention(gate):
    layer = _layer(gate)
    x = torch.randn(2, 9, 64, dtype=torch.float64)
    with torch.no_grad():
        ref = _spec_mla(layer, x)
        out = layer(x)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-12


def test_mla_absorbed_equals_expanded():
    layer = _layer()
    B, T, H = 2, 7, layer.num_heads
    x = torch.randn(B, T, 64, dtype=torch.float64)
    q = layer.q_proj(x).view(B, T, H, -1)
    ckv = layer.kv_a_proj_with_mqa(x)
    c, k_pe = layer.kv_a_layernorm(ckv[..., :32]), ckv[..., 32:]
    mask = torch.ones(T, T, dtype=torch.bool).tril().expand(B, T, T)
    q_nope, q_pe = q[..., :16], q[..., 16:]
    a = layer._absorbed(q_nope, q_pe, c, k_pe, mask)
    e = layer._expanded(q_nope, q_pe, c, k_pe, mask)
    assert ((a - e).norm() / e.norm()).item() < 1e-12


def test_mla_absorbed_ignores_nan_in_unseen_slots():
    # Cache slots no query can see (past every row's length) may hold anything, NaN included.
    layer = _layer()
    B, T, S, H = 2, 1, 9, layer.num_heads
    x = torch.randn(B, T, 64, dtype=torch.float64)
    q = layer.q_proj(x).view(B, T, H, -1)
    c, k_pe = torch.randn(B, S, 32, dtype=torch.float64), torch.randn(B, S, 8, dtype=torch.float64)
    lengths = torch.tensor([3, 6])
    mask = torch.arange(S)[None, None, :] <= lengths[:, None, None]  # [B, T, S]
    clean = layer._absorbed(q[..., :16], q[..., 16:], c, k_pe, mask)
    c_bad, pe_bad = c.clone(), k_pe.clone()
    c_bad[~mask[:, 0]], pe_bad[~mask[:, 0]] = float("nan"), float("nan")
    assert torch.equal(layer._absorbed(q[..., :16], q[..., 16:], c_bad, pe_bad, mask), clean)


def test_mla_forward_backward():
    layer = _layer(gate=True, dtype=torch.float32)
    x = torch.randn(2, 5, 64, requires_grad=True)
    layer(x).square().mean().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_mla_release_shapes():
    cfg = KimiLinearConfig.preset("kimi-linear-48b")
    with torch.device("meta"):
        layer = MultiheadLatentAttention(cfg, 3)
    shapes = {n: list(p.shape) for n, p in layer.named_parameters()}
    assert shapes == {
        "q_proj.weight": [6144, 2304], "kv_a_proj_with_mqa.weight": [576, 2304], "kv_a_layernorm.weight": [512],
        "kv_b_proj.weight": [8192, 512], "o_proj.weight": [2304, 4096],
    }
