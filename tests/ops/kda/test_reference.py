import torch

from hla.ops.kda import kda_gate, kda_reference, l2norm


def _inputs(B=2, T=12, H=2, HV=4, K=8, V=6, dtype=torch.float64):
    q = l2norm(torch.randn(B, T, H, K, dtype=dtype))
    k = l2norm(torch.randn(B, T, H, K, dtype=dtype))
    v = torch.randn(B, T, HV, V, dtype=dtype)
    g = kda_gate(torch.randn(B, T, HV, K, dtype=dtype), torch.rand(HV, dtype=dtype).log1p())
    beta = torch.rand(B, T, HV, dtype=dtype)
    return q, k, v, g, beta


def test_reference_split_equals_full():
    q, k, v, g, beta = _inputs()
    o, s = kda_reference(q, k, v, g, beta, output_final_state=True)
    a = 5
    o1, s1 = kda_reference(q[:, :a], k[:, :a], v[:, :a], g[:, :a], beta[:, :a], output_final_state=True)
    o2, s2 = kda_reference(
        q[:, a:], k[:, a:], v[:, a:], g[:, a:], beta[:, a:], initial_state=s1, output_final_state=True
    )
    torch.testing.assert_close(torch.cat([o1, o2], 1), o, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s2, s, rtol=1e-12, atol=1e-12)


def test_reference_matches_closed_form_single_step():
    # One token from a zero state: S = beta k v^T, so o = beta (scale q.k) v.
    q, k, v, g, beta = _inputs(B=1, T=1, H=1, HV=1)
    o, _ = kda_reference(q, k, v, g, beta)
    K = q.shape[-1]
    expected = beta[0, 0, 0] * (q[0, 0, 0] @ k[0, 0, 0]) * K**-0.5 * v[0, 0, 0]
    torch.testing.assert_close(o[0, 0, 0], expected, rtol=1e-12, atol=1e-12)
