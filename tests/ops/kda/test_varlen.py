"""Packed sequences through cu_seqlens: each sequence alone, no state crossing a boundary."""

import pytest
import torch

from hla.ops.kda import kda
from hla.ops.kda.selfcheck import random_kda_inputs, rel_error

LENGTHS = [[5, 70, 1, 64], [64, 64], [130], [1, 1, 1]]


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda x: "-".join(map(str, x)))
def test_kda_varlen_equals_separate_calls(lengths, backend):
    N, T = len(lengths), sum(lengths)
    x = random_kda_inputs(1, T, 1, 2, 8, 4)
    h0 = torch.randn(N, 2, 8, 4, dtype=torch.float64)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    leaves = [t.requires_grad_(True) for t in (*x.values(), h0)]
    o, s = kda(**x, initial_state=h0, output_final_state=True, cu_seqlens=cu, backend=backend, chunk_size=32)
    assert o.shape == x["v"].shape and s.shape == h0.shape
    w = torch.randn_like(o)
    ((o * w).sum() + s.sum()).backward()
    grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None

    outs, finals = [], []
    for n in range(N):
        a, b = cu[n].item(), cu[n + 1].item()
        on, sn = kda(**{m: t[:, a:b] for m, t in x.items()}, initial_state=h0[n : n + 1], output_final_state=True,
                     backend=backend, chunk_size=32)
        outs.append(on)
        finals.append(sn)
    o_sep, s_sep = torch.cat(outs, 1), torch.cat(finals, 0)
    ((o_sep * w).sum() + s_sep.sum()).backward()
    assert rel_error(o, o_sep) < 1e-12, "o"
    assert rel_error(s, s_sep) < 1e-12, "final_state"
    for name, a, b in zip(["q", "k", "v", "g", "beta", "initial_state"], grads, leaves, strict=True):
        assert rel_error(a, b.grad) < 1e-12, f"grad {name}"


def test_kda_varlen_no_leakage_between_sequences():
    # Changing sequence 0 entirely (inputs and initial state) leaves sequence 1 bit-identical.
    x = random_kda_inputs(1, 100, 1, 1, 8, 8)
    cu = torch.tensor([0, 40, 100])
    h0 = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    o, s = kda(**x, initial_state=h0, output_final_state=True, cu_seqlens=cu, backend="torch")
    y = {n: t.clone() for n, t in x.items()}
    for n in y:
        y[n][:, :40] = torch.randn_like(y[n][:, :40]).abs().neg() if n == "g" else torch.rand_like(y[n][:, :40])
    h1 = h0.clone()
    h1[0] = 5.0
    o2, s2 = kda(**y, initial_state=h1, output_final_state=True, cu_seqlens=cu, backend="torch")
    assert torch.equal(o2[:, 40:], o[:, 40:])
    assert torch.equal(s2[1], s[1])
    assert not torch.equal(o2[:, :40], o[:, :40])


def test_kda_varlen_without_initial_state_starts_from_zero():
    x = random_kda_inputs(1, 50, 1, 1, 8, 8)
    cu = torch.tensor([0, 20, 50], dtype=torch.int32)
    o, s = kda(**x, output_final_state=True, cu_seqlens=cu, backend="torch")
    o1, _ = kda(**{n: t[:, 20:] for n, t in x.items()}, backend="torch")
    assert rel_error(o[:, 20:], o1) < 1e-12
