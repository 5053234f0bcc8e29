"""benchmarks/kda_bf16_intermediates.py: its chunked float64 pipeline is the library's, and its bf16
storage changes the gradients only through the rounded tensors."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import kda_bf16_intermediates as b16  # noqa: E402
from hla.ops.kda.chunk_torch import chunk_kda_torch  # noqa: E402
from hla.ops.kda.gate import kda_gate, l2norm  # noqa: E402


def _inputs(T=128, HV=2, D=16):
    torch.manual_seed(0)
    return b16.make_inputs(1, T, HV, HV, D, D, "kimi", torch.device("cpu"), dtype=torch.float64)


@pytest.mark.parametrize("form", ["plain", "premultiplied"])
def test_exact_pipeline_matches_chunk_kda_torch(form):
    x = _inputs()
    d = {n: x[n].double() for n in b16.GRADS}
    gate = kda_gate(d["g"], d["A_log"], d["dt_bias"], None)
    q, k, beta = l2norm(d["q"]), l2norm(d["k"]), torch.sigmoid(d["beta"])
    o, s = b16.chunked_kda(q, k, d["v"], gate, beta, 16**-0.5, form=form)
    ref_o, ref_s = chunk_kda_torch(q, k, d["v"], gate, beta, scale=16**-0.5, output_final_state=True)
    o = o.permute(0, 2, 3, 1, 4).reshape(ref_o.shape)  # [1, HV, NT, BT, V] -> [1, T, HV, V]
    assert ((o - ref_o).norm() / ref_o.norm()).item() < 1e-12
    assert ((s - ref_s).norm() / ref_s.norm()).item() < 1e-12


def test_bf16_storage_moves_gradients_by_bf16_amounts():
    x = _inputs()
    exact, do, ds = b16.gradients(x, ())
    same, _, _ = b16.gradients(x, (), do, ds)
    rounded, _, _ = b16.gradients(x, b16.ROUNDABLE, do, ds)
    for n in b16.GRADS:
        assert torch.equal(same[n], exact[n])
        err = ((rounded[n] - exact[n]).norm() / exact[n].norm()).item()
        assert 1e-5 < err < 0.1, (n, err)


def test_pair_products_from_bf16_factors_are_the_pairs_to_bf16_precision():
    # the fast launch's anchored factors (anchors 31 across the halves, 15 / 47 inside them), rounded to bf16: the
    # same strictly-lower A_kk and lower A_qk to bf16 precision (a wrong anchor or mask would be far off)
    from hla.ops.kda.chunk_torch import chunk_kda_cumsum, chunk_kda_intra

    torch.manual_seed(0)
    B, HV, NT, BT, K = 1, 2, 2, 64, 16
    q = l2norm(torch.randn(B, HV, NT, BT, K, dtype=torch.float64)) * K**-0.5
    k = l2norm(torch.randn(B, HV, NT, BT, K, dtype=torch.float64))
    gc = chunk_kda_cumsum(-torch.rand(B, HV, NT, BT, K, dtype=torch.float64) * 0.2)
    beta = torch.rand(B, HV, NT, BT, dtype=torch.float64)
    A_kk, A_qk = chunk_kda_intra(q, k, gc, beta, "auto")
    kk, qk = b16._pairs_bf16(q, k, gc, beta)
    for got, ref in ((kk, A_kk), (qk, A_qk)):
        err = ((got - ref).norm() / ref.norm()).item()
        assert 1e-5 < err < 1e-2, err


def test_variants_option():
    assert b16.parse_variants("pairs+qg,w+kd+vn") == [("pairs", "qg"), ("w", "kd", "vn")]
    assert b16.parse_variants("w:values+vn:grads") == [("w:values", "vn:grads")]
    with pytest.raises(Exception, match="expected sets of"):
        b16.parse_variants("pairs+u")


def test_values_and_grads_sides_make_up_the_stored_rounding():
    x = _inputs()
    exact, do, ds = b16.gradients(x, ())
    both, _, _ = b16.gradients(x, ("w", "kd", "vn"), do, ds)
    sides, _, _ = b16.gradients(x, b16.SPLIT_ROUNDABLE, do, ds)
    values, _, _ = b16.gradients(x, ("w:values", "kd:values", "vn:values"), do, ds)
    grads, _, _ = b16.gradients(x, ("w:grads", "kd:grads", "vn:grads"), do, ds)
    for n in b16.GRADS:
        assert torch.equal(both[n], sides[n])
    # dq takes the states' values only and dv the gradient formulas only; the others take both sides
    assert torch.equal(grads["q"], exact["q"]) and not torch.equal(values["q"], exact["q"])
    assert torch.equal(values["v"], exact["v"]) and not torch.equal(grads["v"], exact["v"])
    for n in ("k", "g", "beta", "A_log", "dt_bias"):
        assert not torch.equal(values[n], exact[n]) and not torch.equal(grads[n], exact[n])
    with pytest.raises(ValueError, match="plain form"):
        b16.gradients(x, ("w:values",), do, ds, form="premultiplied")
