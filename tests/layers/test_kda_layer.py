import math

import torch

from hla.layers.kda import KimiDeltaAttention
from hla.layers.short_conv import ShortConvolution
from hla.models.config import KimiLinearConfig
from hla.ops.kda.reference import kda_reference


def _layer(dtype=torch.float64):
    cfg = KimiLinearConfig.preset("tiny")
    layer = KimiDeltaAttention(cfg, 0).to(dtype)
    with torch.no_grad():  # non-trivial norm weight so its use is checked
        layer.o_norm.weight.uniform_(0.5, 1.5)
    return cfg, layer


def _spec_kda_layer(layer, x):
    """Spec section 2 written out directly, float64, no hla helpers but the reference recurrence."""
    B, T, _ = x.shape
    H, K = layer.num_heads, layer.head_dim

    def conv_silu(proj, conv):
        u = x @ proj.weight.T  # [B, T, D]
        w = conv.weight[:, 0, :]  # [D, W]
        W = w.shape[1]
        y = torch.zeros_like(u)
        for tap in range(W):  # y_t = sum_j w[:, j] u_{t - (W - 1) + j}
            shift = W - 1 - tap
            y[:, shift:] += w[:, tap] * u[:, : T - shift]
        return (y * torch.sigmoid(y)).view(B, T, H, K)

    def l2(t):
        return t / torch.sqrt((t * t).sum(-1, keepdim=True) + 1e-6)

    q = l2(conv_silu(layer.q_proj, layer.q_conv1d))
    k = l2(conv_silu(layer.k_proj, layer.k_conv1d))
    v = conv_silu(layer.v_proj, layer.v_conv1d)
    raw = (x @ layer.f_a_proj.weight.T @ layer.f_b_proj.weight.T).view(B, T, H, K) + layer.dt_bias.view(H, K)
    softplus = torch.log1p(torch.exp(raw))
    g = -torch.exp(layer.A_log.view(H, 1)) * softplus
    beta = torch.sigmoid(x @ layer.b_proj.weight.T)
    o, _ = kda_reference(q, k, v, g, beta, scale=K**-0.5)
    o = o / torch.sqrt((o * o).mean(-1, keepdim=True) + layer.eps) * layer.o_norm.weight
    gate = (x @ layer.g_a_proj.weight.T @ layer.g_b_proj.weight.T).view(B, T, H, K)
    o = o * torch.sigmoid(gate)
    return o.reshape(B, T, H * K) @ layer.o_proj.weight.T


def test_kda_layer_equals_spec_composition_float64():
    _, layer = _layer()
    x = torch.randn(2, 11, 64, dtype=torch.float64)
    with torch.no_grad():
        out = layer(x)
        ref = _spec_kda_layer(layer, x)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 1e-12, rel


def test_kda_layer_forward_backward():
    _, layer = _layer(torch.float32)
    x = torch.randn(2, 9, 64, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape and out.dtype == torch.float32
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient"


def test_kda_layer_keeps_gate_params_fp32_after_init():
    _, layer = _layer(torch.float32)
    assert layer.A_log.shape == (1, 1, 2, 1) and layer.dt_bias.shape == (32,)
    a = layer.A_log.exp()
    assert (a >= 1).all() and (a <= 16).all()
    dt = torch.nn.functional.softplus(layer.dt_bias)  # init is the inverse softplus of dt in [1e-3, 1e-1]
    assert (dt > 1e-3 * (1 - 1e-5)).all() and (dt < 1e-1 * (1 + 1e-5)).all()


def test_short_conv_window_continues_the_sequence():
    conv = ShortConvolution(6, 4).double()
    x = torch.randn(2, 10, 6, dtype=torch.float64)
    full, _ = conv(x)
    a, w = conv(x[:, :3])
    b, w = conv(x[:, 3:4], w)
    c, _ = conv(x[:, 4:], w)
    torch.testing.assert_close(torch.cat([a, b, c], 1), full, rtol=1e-12, atol=1e-12)
    assert math.isclose(conv.weight.abs().max().item(), 0.5, rel_tol=0.2)  # U(-1/2, 1/2) init
