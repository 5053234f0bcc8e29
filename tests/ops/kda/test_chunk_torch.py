"""The chunked torch path (hla.ops.kda.chunk_torch via kda(backend="torch")) against the reference loop."""

import pytest
import torch

from hla.ops.kda import kda, kda_gate, kda_reference, l2norm
from hla.ops.kda.chunk_torch import chunk_kda_stages
from hla.ops.kda.selfcheck import random_kda_inputs, rel_error


def assert_rel(name, out, ref, tol):
    err = rel_error(out, ref)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


SHAPES = [
    # B, T, H, HV, K, V, chunk
    (1, 1, 1, 1, 8, 8, 64),
    (2, 63, 2, 2, 16, 8, 64),
    (1, 64, 1, 2, 8, 16, 64),
    (1, 65, 2, 4, 16, 16, 64),
    (1, 200, 1, 3, 8, 8, 32),
    (2, 65, 2, 2, 8, 4, 32),
    (1, 200, 2, 2, 16, 16, 64),
]


SHAPE_IDS = [f"B{s[0]}T{s[1]}H{s[2]}HV{s[3]}K{s[4]}V{s[5]}c{s[6]}" for s in SHAPES]


@pytest.mark.parametrize("B,T,H,HV,K,V,BT", SHAPES, ids=SHAPE_IDS)
def test_kda_torch_matches_reference_float64(B, T, H, HV, K, V, BT):
    x = random_kda_inputs(B, T, H, HV, K, V)
    h0 = torch.randn(B, HV, K, V, dtype=torch.float64)
    ref_o, ref_s = kda_reference(**x, scale=0.37, initial_state=h0, output_final_state=True)
    o, s = kda(**x, scale=0.37, initial_state=h0, output_final_state=True, backend="torch", chunk_size=BT)
    assert o.dtype == torch.float64 and s.dtype == torch.float64
    assert_rel("o", o, ref_o, 1e-10)
    assert_rel("final_state", s, ref_s, 1e-10)


@pytest.mark.parametrize("T,BT", [(1, 64), (65, 64), (200, 32)])
def test_kda_torch_float32_matches_float64_reference(T, BT):
    x = random_kda_inputs(1, T, 1, 2, 32, 16)
    h0 = torch.randn(1, 2, 32, 16, dtype=torch.float64) * 0.1
    ref_o, ref_s = kda_reference(**x, initial_state=h0, output_final_state=True)
    x32 = {n: t.float() for n, t in x.items()}
    o, s = kda(**x32, initial_state=h0.float(), output_final_state=True, backend="torch", chunk_size=BT)
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    assert_rel("o", o, ref_o, 1e-5)
    assert_rel("final_state", s, ref_s, 1e-5)


def test_kda_torch_bfloat16_inputs_keep_fp32_state():
    x = random_kda_inputs(1, 70, 2, 2, 16, 16)
    ref_o, ref_s = kda_reference(**x, output_final_state=True)
    xb = {n: (t if n == "g" else t.bfloat16()) for n, t in x.items()}
    o, s = kda(**xb, output_final_state=True, backend="torch")
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert_rel("o", o, ref_o, 3e-2)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("per_token", [-20.0, -80.0, -1e-7], ids=["g-20", "g-80", "g~0"])
def test_kda_torch_extreme_gates(per_token, dtype, tol):
    # Strong decay within a chunk: exp(-gc) would overflow fp32 (and float64 at -80 * 64); the
    # chunked path must stay finite and exact. Near-zero decay: a pure delta rule, no forgetting.
    x = random_kda_inputs(1, 150, 1, 2, 16, 8)
    x["g"] = per_token * (0.5 + torch.rand_like(x["g"]))
    x["g"][:, :, 0, :8] *= 0.01  # half the channels of one head decay slowly: mixed magnitudes
    h0 = torch.randn(1, 2, 16, 8, dtype=torch.float64)
    names = ("q", "k", "v", "g", "beta")
    for n in names:
        x[n].requires_grad_(True)
    ref_o, ref_s = kda_reference(**x, initial_state=h0, output_final_state=True)
    (ref_o.square().sum() + ref_s.sum()).backward()
    xd = {n: t.detach().to(dtype).requires_grad_(True) for n, t in x.items()}
    o, s = kda(**xd, initial_state=h0.to(dtype), output_final_state=True, backend="torch")
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert_rel("o", o, ref_o, tol)
    assert_rel("final_state", s, ref_s, tol)
    (o.square().sum() + s.sum()).backward()
    for n in names:
        assert torch.isfinite(xd[n].grad).all(), f"grad of {n} is not finite"
        assert_rel(f"grad {n}", xd[n].grad, x[n].grad, 10 * tol)


def _grads(fn, tensors):
    for t in tensors:
        t.grad = None
    o, s = fn()
    w_o = torch.linspace(-1, 1, o.numel(), dtype=o.dtype).reshape(o.shape)
    w_s = torch.linspace(1, -1, s.numel(), dtype=s.dtype).reshape(s.shape)
    ((o * w_o).sum() + (s * w_s).sum()).backward()
    return [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("BT", [16, 32])
def test_kda_torch_gradients_match_reference(BT):
    x = random_kda_inputs(2, 45, 1, 2, 8, 4)
    h0 = torch.randn(2, 2, 8, 4, dtype=torch.float64)
    leaves = [t.requires_grad_(True) for t in (*x.values(), h0)]
    kw = dict(scale=0.5, initial_state=h0, output_final_state=True)
    ref = _grads(lambda: kda_reference(**x, **kw), leaves)
    got = _grads(lambda: kda(**x, **kw, backend="torch", chunk_size=BT), leaves)
    for name, a, b in zip(["q", "k", "v", "g", "beta", "initial_state"], got, ref, strict=True):
        assert_rel(f"grad {name}", a, b, 1e-10)


def test_kda_torch_gradients_through_raw_projections():
    # A_log / dt_bias through the gate, l2norm and beta-sigmoid inside kda(...).
    B, T, H, HV, K, V = 1, 40, 1, 2, 8, 4
    gen = torch.Generator().manual_seed(1)
    q, k = (torch.randn(B, T, H, K, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, T, HV, V, generator=gen, dtype=torch.float64)
    graw = torch.randn(B, T, HV, K, generator=gen, dtype=torch.float64)
    braw = torch.randn(B, T, HV, generator=gen, dtype=torch.float64)
    A_log = torch.rand(HV, generator=gen, dtype=torch.float64).mul(15).add(1).log()
    dt_bias = torch.randn(HV * K, generator=gen, dtype=torch.float64) - 2
    leaves = [t.requires_grad_(True) for t in (q, k, v, graw, braw, A_log, dt_bias)]

    def manual():
        g = kda_gate(graw, A_log, dt_bias)
        return kda_reference(l2norm(q), l2norm(k), v, g, braw.sigmoid(), output_final_state=True)

    def fused():
        return kda(q, k, v, graw, braw, A_log=A_log, dt_bias=dt_bias, use_qk_l2norm=True, use_beta_sigmoid=True,
                   output_final_state=True, backend="torch", chunk_size=16)

    ref = _grads(manual, leaves)
    got = _grads(fused, leaves)
    for name, a, b in zip(["q", "k", "v", "g_raw", "beta_raw", "A_log", "dt_bias"], got, ref, strict=True):
        assert_rel(f"grad {name}", a, b, 1e-10)


def test_kda_torch_gradcheck_tiny():
    x = random_kda_inputs(1, 20, 1, 2, 4, 3)
    h0 = torch.randn(1, 2, 4, 3, dtype=torch.float64)
    leaves = [t.requires_grad_(True) for t in (*x.values(), h0)]

    def fn(q, k, v, g, beta, h0):
        o, s = kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, backend="torch", chunk_size=16)
        return o, s

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, fast_mode=True)


def test_kda_torch_lower_bound_gate():
    B, T, H, K = 1, 70, 2, 8
    x = random_kda_inputs(B, T, H, H, K, K)
    graw = torch.randn(B, T, H, K, dtype=torch.float64)
    A_log = torch.zeros(H, dtype=torch.float64)
    o, _ = kda(x["q"], x["k"], x["v"], graw, x["beta"], A_log=A_log, lower_bound=-5.0, backend="torch")
    g = kda_gate(graw, A_log, None, -5.0)
    assert g.min() >= -5.0
    ref_o, _ = kda_reference(x["q"], x["k"], x["v"], g, x["beta"])
    assert_rel("o", o, ref_o, 1e-10)


@pytest.mark.parametrize("a", [32, 64, 37, 1], ids=lambda a: f"split{a}")
def test_kda_torch_state_carrying(a):
    x = random_kda_inputs(2, 100, 1, 2, 8, 8)
    o, s = kda(**x, output_final_state=True, backend="torch", chunk_size=32)
    o1, s1 = kda(**{n: t[:, :a] for n, t in x.items()}, output_final_state=True, backend="torch", chunk_size=32)
    o2, s2 = kda(**{n: t[:, a:] for n, t in x.items()}, initial_state=s1, output_final_state=True,
                 backend="torch", chunk_size=32)
    assert_rel("o", torch.cat([o1, o2], 1), o, 1e-12)
    assert_rel("final_state", s2, s, 1e-12)


@pytest.mark.parametrize("t", [0, 31, 32, 50, 99])
def test_kda_torch_is_causal(t):
    # Perturbing every input at token t (including a huge decay) leaves earlier outputs bit-identical.
    x = random_kda_inputs(1, 100, 2, 2, 8, 8)
    o, _ = kda(**x, backend="torch", chunk_size=32)
    y = {n: v.clone() for n, v in x.items()}
    y["q"][:, t] += 1.0
    y["k"][:, t] = -y["k"][:, t]
    y["v"][:, t] += 3.0
    y["g"][:, t] = -500.0
    y["beta"][:, t] = 1.0 - y["beta"][:, t]
    o2, _ = kda(**y, backend="torch", chunk_size=32)
    assert torch.equal(o2[:, :t], o[:, :t])
    assert not torch.equal(o2[:, t:], o[:, t:])


def test_chunk_kda_stages_state_entering_each_chunk():
    # Stage "state" (h) at chunk n is the recurrent state after n * BT tokens: bisectable per stage.
    x = random_kda_inputs(1, 96, 1, 1, 8, 8)
    st = chunk_kda_stages(**x, scale=8**-0.5, chunk_size=32)
    assert st["h"].shape == (1, 1, 3, 8, 8)
    for n in range(3):
        _, s = kda_reference(**{m: t[:, : n * 32] for m, t in x.items()}, output_final_state=True)
        torch.testing.assert_close(st["h"][:, :, n], s, rtol=1e-12, atol=1e-12)
    eye = torch.eye(32, dtype=torch.float64)
    torch.testing.assert_close(st["Ai"] @ (eye + st["A_kk"]), eye.expand_as(st["Ai"]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["hierarchical", "auto"])
def test_chunk_kda_intra_methods_match_reference_with_gradients(method):
    from hla.ops.kda.chunk_torch import chunk_kda_torch

    x = random_kda_inputs(1, 70, 1, 2, 8, 4)
    h0 = torch.randn(1, 2, 8, 4, dtype=torch.float64)
    leaves = [t.requires_grad_(True) for t in (*x.values(), h0)]
    kw = dict(scale=0.3, initial_state=h0, output_final_state=True)
    ref = _grads(lambda: kda_reference(**x, **kw), leaves)
    got = _grads(lambda: chunk_kda_torch(**x, **kw, chunk_size=32, intra=method), leaves)
    o, s = chunk_kda_torch(**x, **kw, chunk_size=32, intra=method)
    ref_o, ref_s = kda_reference(**x, **kw)
    assert_rel("o", o, ref_o, 1e-10)
    assert_rel("final_state", s, ref_s, 1e-10)
    for name, a, b in zip(["q", "k", "v", "g", "beta", "initial_state"], got, ref, strict=True):
        assert_rel(f"grad {name}", a, b, 1e-10)


def test_chunk_kda_intra_auto_mixes_methods_per_row_float32():
    # Head 0 decays gently (block-start factorisation), head 1 by ~20 per token (hierarchical rows).
    from hla.ops.kda.chunk_torch import chunk_kda_intra, chunk_kda_stages

    x = random_kda_inputs(1, 128, 1, 2, 16, 8)
    x["g"][:, :, 0] = -0.3 * torch.rand_like(x["g"][:, :, 0])
    x["g"][:, :, 1] = -20.0 * (0.5 + torch.rand_like(x["g"][:, :, 1]))
    ref_o, ref_s = kda_reference(**x, output_final_state=True)
    x32 = {n: t.float() for n, t in x.items()}
    o, s = kda(**x32, output_final_state=True, backend="torch")
    assert_rel("o", o, ref_o, 1e-5)
    assert_rel("final_state", s, ref_s, 1e-5)
    st = chunk_kda_stages(**x32, scale=0.25)
    A_kk, A_qk = chunk_kda_intra(st["q"], st["k"], st["gc"], st["beta"], "auto")
    H_kk, H_qk = chunk_kda_intra(st["q"], st["k"], st["gc"], st["beta"], "hierarchical")
    gb = st["gc"].reshape(*st["gc"].shape[:3], 4, 16, 16)
    past = ((gb[..., :1, :] - gb).amax(-1) > 80).reshape(*st["gc"].shape[:3], 64)  # rows past the limit
    assert past[:, 1].any() and not past[:, 0].any()
    assert torch.equal(A_kk[past], H_kk[past]) and torch.equal(A_qk[past], H_qk[past])
    torch.testing.assert_close(A_qk, H_qk, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(A_kk, H_kk, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spike", [200.0, 1000.0])
def test_kda_torch_float32_reset_then_slow_decay(spike):
    # A strong forget early in each chunk, then almost none: exponent differences of large
    # cumulative decays must not lose fp32 precision (gc is kept in float64).
    x = random_kda_inputs(1, 128, 1, 1, 16, 16)
    x["g"][:] = -0.01
    x["g"][:, 2::64] = -spike
    ref_o, ref_s = kda_reference(**x, output_final_state=True)
    o, s = kda(**{n: t.float() for n, t in x.items()}, output_final_state=True, backend="torch")
    assert_rel("o", o, ref_o, 1e-6)
    assert_rel("final_state", s, ref_s, 1e-6)


class _SubnormalCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the subnormal values in the outputs of every aten op run under it (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.subnormal = self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if "empty" in func.__name__:  # uninitialised memory
            return out
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                a = t.detach().abs()
                self.subnormal += int(((a > 0) & (a < torch.finfo(torch.float32).tiny)).sum())
                self.total += t.numel()
        return out


@pytest.mark.parametrize("gate_scale", [3.0, 30.0])
def test_kda_torch_float32_strong_decay_makes_no_subnormals(gate_scale):
    # exp of large negative log-decays (and products of such factors) gave subnormal fp32 numbers, which x86
    # CPUs process in microcode: 3e3 (gate_scale 3) and 6e4 (30) per forward+backward here, 5e-4 and 4e-3 of all
    # values, before decay factors below exp(-40) became exact zeros. A few products of small factors remain.
    from hla.ops.kda.chunk_torch import chunk_kda_torch

    x = random_kda_inputs(2, 128, 2, K=32, gate_scale=gate_scale, generator=torch.Generator().manual_seed(1))
    x64 = {n: t.requires_grad_(True) for n, t in x.items()}
    x32 = {n: t.detach().float().requires_grad_(True) for n, t in x.items()}
    counter = _SubnormalCounter()
    with counter:
        o, _ = chunk_kda_torch(**x32, scale=32**-0.5)
        o.square().sum().backward()
    assert counter.subnormal <= 1e-4 * counter.total, f"{counter.subnormal} subnormals in {counter.total} values"
    ref_o, _ = kda_reference(**x64, scale=32**-0.5)
    ref_o.square().sum().backward()
    assert_rel("o", o, ref_o, 1e-5)
    for n in x:
        assert_rel(f"grad {n}", x32[n].grad, x64[n].grad, 1e-5)


def test_decay_floor_zeroes_tiny_factors_keeps_nan_and_float64():
    from hla.ops.kda.chunk_torch import _decay

    x = torch.tensor([0.0, -1.0, -40.0, -40.5, -100.0, float("-inf"), float("nan")], dtype=torch.float64,
                     requires_grad=True)
    y = _decay(x, torch.float32)
    assert y.dtype == torch.float32
    assert torch.equal(y[:3], x[:3].detach().float().exp()) and torch.equal(y[3:6], torch.zeros(3))
    assert y[6].isnan()
    y[:6].sum().backward()
    assert torch.equal(x.grad[3:6], torch.zeros(3, dtype=torch.float64))  # no gradient below the floor, no NaN
    assert torch.equal(_decay(x, torch.float64)[:6], x[:6].exp())  # float64 stays exact
