"""kda_decode: token steps against a state pool, updated in place, equal to the reference."""

import pytest
import torch

from hla.ops.kda import kda, kda_decode
from hla.ops.kda.selfcheck import random_kda_inputs, rel_error


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("step", [1, 3])
def test_kda_decode_steps_equal_reference(step, backend):
    B, T, H, HV, K, V = 3, 9, 1, 2, 8, 4
    x = random_kda_inputs(B, T, H, HV, K, V)
    h0 = torch.randn(B, HV, K, V, dtype=torch.float64)
    ref_o, ref_s = kda(**x, initial_state=h0, output_final_state=True, backend="reference")

    pool = torch.randn(7, HV, K, V, dtype=torch.float64)
    untouched = pool.clone()
    idx = torch.tensor([6, 0, 4])
    pool[idx] = h0
    outs = []
    for t in range(0, T, step):
        outs.append(kda_decode(**{n: v[:, t : t + step] for n, v in x.items()}, state=pool, state_indices=idx,
                               backend=backend))
    assert rel_error(torch.cat(outs, 1), ref_o) < 1e-12
    assert rel_error(pool[idx], ref_s) < 1e-12
    rest = torch.tensor([1, 2, 3, 5])
    assert torch.equal(pool[rest], untouched[rest])


def test_kda_decode_float32_pool_and_default_indices():
    B, T, H, HV, K, V = 2, 6, 2, 4, 16, 8
    x = random_kda_inputs(B, T, H, HV, K, V)
    ref_o, ref_s = kda(**x, output_final_state=True, backend="reference")
    pool = torch.zeros(B, HV, K, V)
    outs = [kda_decode(**{n: v[:, t : t + 1].float() for n, v in x.items()}, state=pool) for t in range(T)]
    o = torch.cat(outs, 1)
    assert o.dtype == torch.float32 and pool.dtype == torch.float32
    assert rel_error(o, ref_o) < 1e-5
    assert rel_error(pool, ref_s) < 1e-5


def test_kda_decode_continues_a_prefill_with_raw_projections():
    B, T, H, HV, K, V = 2, 40, 1, 2, 8, 8
    gen = torch.Generator().manual_seed(3)
    q, k = (torch.randn(B, T, H, K, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, T, HV, V, generator=gen, dtype=torch.float64)
    graw = torch.randn(B, T, HV, K, generator=gen, dtype=torch.float64)
    braw = torch.randn(B, T, HV, generator=gen, dtype=torch.float64)
    kw = dict(A_log=torch.rand(HV, dtype=torch.float64), dt_bias=torch.randn(HV, K, dtype=torch.float64),
              use_qk_l2norm=True, use_beta_sigmoid=True)
    full, _ = kda(q, k, v, graw, braw, backend="reference", **kw)
    a = 33
    _, s = kda(q[:, :a], k[:, :a], v[:, :a], graw[:, :a], braw[:, :a], output_final_state=True, backend="torch", **kw)
    outs = [kda_decode(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], graw[:, t : t + 1], braw[:, t : t + 1], s,
                       **kw) for t in range(a, T)]
    assert rel_error(torch.cat(outs, 1), full[:, a:]) < 1e-12


def test_kda_decode_torch_has_no_host_sync(monkeypatch):
    # Graph-capturable means no .item()/.tolist()/bool(tensor) on the decode path: make them raise.
    x = {n: v[:, :1] for n, v in random_kda_inputs(2, 1, 1, 1, 8, 8).items()}
    pool = torch.zeros(4, 1, 8, 8, dtype=torch.float64)
    idx = torch.tensor([2, 0])
    from hla.ops.kda.decode_torch import kda_decode_torch

    def boom(*args, **kwargs):
        raise AssertionError("host sync on the decode path")

    monkeypatch.setattr(torch.Tensor, "item", boom)
    monkeypatch.setattr(torch.Tensor, "tolist", boom)
    monkeypatch.setattr(torch.Tensor, "__bool__", boom)
    o = kda_decode_torch(**x, state=pool, scale=0.3, state_indices=idx)
    assert o.shape == (2, 1, 1, 8)
