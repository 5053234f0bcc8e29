"""hla.ops.kda.kda / kda_decode: exports, dispatch and every validation error."""

import sys

import pytest
import torch

import hla
from hla.ops.kda import kda, kda_decode, kda_gate, kda_reference, l2norm
from hla.ops.kda.selfcheck import random_kda_inputs, rel_error


def _x(B=1, T=10, H=2, HV=4, K=8, V=4):
    return random_kda_inputs(B, T, H, HV, K, V)


def test_public_exports():
    assert hla.kda is kda
    assert callable(kda_decode) and callable(kda_gate) and callable(kda_reference) and callable(l2norm)


def test_backends_agree_and_auto_is_torch_on_cpu():
    x = _x()
    o_ref, s_ref = kda(**x, output_final_state=True, backend="reference")
    o_t, s_t = kda(**x, output_final_state=True, backend="torch")
    o_a, s_a = kda(**x, output_final_state=True)
    assert rel_error(o_t, o_ref) < 1e-12 and rel_error(s_t, s_ref) < 1e-12
    assert torch.equal(o_a, o_t) and torch.equal(s_a, s_t)
    assert kda(**x)[1] is None


def test_triton_backend_unavailable(monkeypatch):
    # None in sys.modules makes `import hla.ops.kda.triton` raise ImportError.
    monkeypatch.setitem(sys.modules, "hla.ops.kda.triton", None)
    x = _x()
    with pytest.raises(ValueError, match="backend: 'triton' requested"):
        kda(**x, backend="triton")
    with pytest.raises(ValueError, match="backend: 'triton' requested"):
        kda_decode(**x, state=torch.zeros(1, 4, 8, 4), backend="triton")
    assert kda(**x, backend="auto")[0].shape == (1, 10, 4, 4)


def test_output_dtypes():
    x = {n: (t.half() if n != "g" else t.float()) for n, t in _x().items()}
    o, s = kda(**x, output_final_state=True)
    assert o.dtype == torch.float16 and s.dtype == torch.float32


def _bad(**changes):
    x = _x()
    x.update(changes)
    return x


ERRORS = {
    "q rank": (dict(q=torch.randn(10, 2, 8)), "q: expected 4 dims"),
    "beta rank": (dict(beta=torch.rand(1, 10, 4, 1)), "beta: expected 3 dims"),
    "k shape": (dict(k=torch.randn(1, 10, 2, 7)), "k: expected the shape of q"),
    "v length": (dict(v=torch.randn(1, 9, 4, 4)), r"v: expected \[B, T\]"),
    "HV not multiple": (dict(v=torch.randn(1, 10, 3, 4), g=torch.randn(1, 10, 3, 8), beta=torch.rand(1, 10, 3)),
                        "multiple of the q/k heads H = 2, got HV = 3"),
    "K too big": (dict(q=torch.randn(1, 10, 2, 257), k=torch.randn(1, 10, 2, 257), g=torch.randn(1, 10, 4, 257)),
                  "K, V <= 256"),
    "V too big": (dict(v=torch.randn(1, 10, 4, 300)), "K, V <= 256"),
    "g shape": (dict(g=torch.randn(1, 10, 2, 8)),
                r"g: expected \[B, T, HV, K\] = \(1, 10, 4, 8\), got \(1, 10, 2, 8\)"),
    "beta shape": (dict(beta=torch.rand(1, 10, 2)), r"beta: expected \[B, T, HV\]"),
    "int dtype": (dict(v=torch.ones(1, 10, 4, 4, dtype=torch.int64)), "v: expected a floating dtype"),
    "not a tensor": (dict(q=[1.0]), "q: expected a torch.Tensor"),
}


@pytest.mark.parametrize("changes,match", ERRORS.values(), ids=ERRORS.keys())
def test_kda_input_errors(changes, match):
    with pytest.raises(ValueError, match=match):
        kda(**_bad(**changes))


@pytest.mark.parametrize("changes,match", [v for k, v in ERRORS.items() if k != "HV not multiple"],
                         ids=[k for k in ERRORS if k != "HV not multiple"])
def test_kda_decode_input_errors(changes, match):
    with pytest.raises(ValueError, match=match):
        kda_decode(**_bad(**changes), state=torch.zeros(1, 4, 8, 4))


CU_ERRORS = {
    "not start at 0": (torch.tensor([1, 5, 10]), r"cu_seqlens\[0\] = 0, got 1"),
    "not end at T": (torch.tensor([0, 5, 9]), r"cu_seqlens\[-1\] = T = 10, got 9"),
    "not increasing": (torch.tensor([0, 6, 5, 10]), "strictly increasing boundaries, got 6 then 5"),
    "empty sequence": (torch.tensor([0, 5, 5, 10]), "strictly increasing"),
    "float dtype": (torch.tensor([0.0, 10.0]), "cu_seqlens: expected dtype int32 or int64"),
    "2-D": (torch.tensor([[0, 10]]), "cu_seqlens: expected a 1-D integer tensor"),
    "too short": (torch.tensor([0]), "cu_seqlens: expected at least 2 entries"),
}


@pytest.mark.parametrize("cu,match", CU_ERRORS.values(), ids=CU_ERRORS.keys())
def test_kda_cu_seqlens_errors(cu, match):
    with pytest.raises(ValueError, match=match):
        kda(**_x(), cu_seqlens=cu)


def test_kda_option_errors():
    x = _x()
    with pytest.raises(ValueError, match="q: expected batch size B = 1 with cu_seqlens"):
        kda(**_x(B=2), cu_seqlens=torch.tensor([0, 4, 10]))
    with pytest.raises(ValueError, match=r"initial_state: expected .* = \(1, 4, 8, 4\), got \(1, 4, 4, 8\)"):
        kda(**x, initial_state=torch.zeros(1, 4, 4, 8))
    with pytest.raises(ValueError, match=r"initial_state: expected \[N, HV, K, V\] = \(2, 4, 8, 4\)"):
        kda(**x, initial_state=torch.zeros(1, 4, 8, 4), cu_seqlens=torch.tensor([0, 3, 10]))
    with pytest.raises(ValueError, match="initial_state: expected a floating dtype"):
        kda(**x, initial_state=torch.zeros(1, 4, 8, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="backend: expected one of"):
        kda(**x, backend="cuda")
    with pytest.raises(ValueError, match="chunk_size: expected one of"):
        kda(**x, chunk_size=48)
    with pytest.raises(ValueError, match="scale: expected a Python float"):
        kda(**x, scale=torch.tensor(0.5))
    with pytest.raises(ValueError, match="A_log: expected 4 elements"):
        kda(**x, A_log=torch.zeros(2))
    with pytest.raises(ValueError, match="dt_bias: expected 32 elements"):
        kda(**x, A_log=torch.zeros(4), dt_bias=torch.zeros(8))
    with pytest.raises(ValueError, match="dt_bias: expected None unless A_log"):
        kda(**x, dt_bias=torch.zeros(32))
    with pytest.raises(ValueError, match="lower_bound: expected None unless A_log"):
        kda(**x, lower_bound=-5.0)
    with pytest.raises(ValueError, match="lower_bound: expected a negative float"):
        kda(**x, A_log=torch.zeros(4), lower_bound=1.0)


def test_kda_decode_state_errors():
    x = _x(B=2, T=1)
    with pytest.raises(ValueError, match=r"state: expected \[P, HV, K, V\]"):
        kda_decode(**x, state=torch.zeros(2, 4, 8))
    with pytest.raises(ValueError, match="state: expected dtype float32"):
        kda_decode(**x, state=torch.zeros(2, 4, 8, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="state: expected a pool of at least B = 2"):
        kda_decode(**x, state=torch.zeros(1, 4, 8, 4))
    with pytest.raises(ValueError, match=r"state_indices: expected values in \[0, 2\]"):
        kda_decode(**x, state=torch.zeros(3, 4, 8, 4), state_indices=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"state_indices: expected values in \[0, 2\]"):
        kda_decode(**x, state=torch.zeros(3, 4, 8, 4), state_indices=torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match=r"state_indices: expected a \[B\] = \[2\] integer tensor"):
        kda_decode(**x, state=torch.zeros(3, 4, 8, 4), state_indices=torch.tensor([0]))
    with pytest.raises(ValueError, match="state_indices: expected dtype int32 or int64"):
        kda_decode(**x, state=torch.zeros(3, 4, 8, 4), state_indices=torch.tensor([0.0, 1.0]))


def test_empty_sequence_passes_state_through():
    x = {n: t[:, :0] for n, t in _x().items()}
    h0 = torch.randn(1, 4, 8, 4, dtype=torch.float64)
    for backend in ("reference", "torch"):
        o, s = kda(**x, initial_state=h0, output_final_state=True, backend=backend)
        assert o.shape == (1, 0, 4, 4) and torch.equal(s, h0)
    pool = h0.clone()
    assert kda_decode(**x, state=pool).shape == (1, 0, 4, 4) and torch.equal(pool, h0)
