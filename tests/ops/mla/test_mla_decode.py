import math

import pytest
import torch

from hla.ops.mla import mla_decode, mla_decode_reference


def _inputs(B, T, H, R, DR, S_alloc, lengths, dtype=torch.float32, poison=None):
    q_lat = torch.randn(B, T, H, R, dtype=dtype)
    q_pe = torch.randn(B, T, H, DR, dtype=dtype)
    latent = torch.randn(B, S_alloc, R, dtype=dtype)
    k_pe = torch.randn(B, S_alloc, DR, dtype=dtype)
    lengths = torch.tensor(lengths, dtype=torch.long)
    if poison is not None:
        for b in range(B):
            end = int(lengths[b]) + T  # slots [0, end) hold real keys
            latent[b, end:] = poison
            k_pe[b, end:] = poison
    return q_lat, q_pe, latent, k_pe, lengths


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("T", [1, 2])
@pytest.mark.parametrize("H", [2, 4])
def test_decode_matches_float64_reference(T, H):
    R, DR = 32, 16
    lengths = [37, 5, 70]  # different lengths; span 70 + T is not a multiple of the block (16)
    span = max(lengths) + T
    q_lat, q_pe, latent, k_pe, lens = _inputs(3, T, H, R, DR, span + 9, lengths)
    scale = 1 / math.sqrt(R)
    ref = mla_decode_reference(q_lat.double(), q_pe.double(), latent.double(), k_pe.double(), lens, span, scale)
    for splits in (None, 1, 3):
        out = mla_decode(q_lat, q_pe, latent, k_pe, lens, span, scale, num_splits=splits)
        assert out.shape == (3, T, H, R) and out.dtype == torch.float32
        assert _rel(out, ref) < 1e-5, splits


def test_reference_is_per_query_softmax():
    """The reference against an explicit loop over rows, tokens and heads."""
    B, T, H, R, DR = 2, 2, 2, 8, 4
    q_lat, q_pe, latent, k_pe, lens = _inputs(B, T, H, R, DR, 12, [3, 7], dtype=torch.float64)
    ref = mla_decode_reference(q_lat, q_pe, latent, k_pe, lens, 9, 0.3)
    for b in range(B):
        for t in range(T):
            n = int(lens[b]) + t + 1
            for h in range(H):
                s = 0.3 * (latent[b, :n] @ q_lat[b, t, h] + k_pe[b, :n] @ q_pe[b, t, h])
                o = torch.softmax(s, 0) @ latent[b, :n]
                assert torch.allclose(ref[b, t, h], o, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("poison", [1e4, float("nan")], ids=["large", "nan"])
@pytest.mark.parametrize("T", [1, 2])
def test_poisoned_slots_past_length_do_not_leak(poison, T):
    R, DR, H = 32, 16, 4
    lengths = [20, 3, 41]
    span = max(lengths) + T + 6  # the span also covers poisoned slots of the longest row
    q_lat, q_pe, latent, k_pe, lens = _inputs(3, T, H, R, DR, span + 5, lengths, poison=poison)
    clean = [latent.clone(), k_pe.clone()]
    for b, n in enumerate(lengths):
        clean[0][b, n + T:] = 0.0
        clean[1][b, n + T:] = 0.0
    ref = mla_decode_reference(q_lat.double(), q_pe.double(), clean[0].double(), clean[1].double(), lens, span, 0.2)
    out = mla_decode(q_lat, q_pe, latent, k_pe, lens, span, 0.2, num_splits=3)
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < 1e-5


def test_output_fully_overwritten_and_strided_cache():
    """The kernel writes every output element (no reliance on a zeroed buffer), reading a view."""
    R, DR, H, T = 32, 16, 2, 1
    q_lat, q_pe, latent, k_pe, lens = _inputs(2, T, H, R, DR, 50, [10, 44])
    span = 45
    ref = mla_decode_reference(q_lat.double(), q_pe.double(), latent.double(), k_pe.double(), lens, span, 0.25)
    wide = torch.cat([latent, k_pe], dim=-1)  # [B, S, R + dr]: the caller may pass views of one buffer
    out = torch.full_like(q_lat, float("nan"))
    res = mla_decode(q_lat, q_pe, wide[..., :R], wide[..., R:], lens, span, 0.25, num_splits=4, out=out)
    assert res is out
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < 1e-5


def test_bad_inputs_raise():
    q_lat, q_pe, latent, k_pe, lens = _inputs(2, 1, 2, 32, 16, 20, [3, 4])
    with pytest.raises(ValueError, match="latent"):
        mla_decode(q_lat, q_pe, latent[..., :16], k_pe, lens, 10, 1.0)
    with pytest.raises(ValueError, match="span"):
        mla_decode(q_lat, q_pe, latent, k_pe, lens, 21, 1.0)
    with pytest.raises(ValueError, match="lengths"):
        mla_decode(q_lat, q_pe, latent, k_pe, lens.float(), 10, 1.0)
