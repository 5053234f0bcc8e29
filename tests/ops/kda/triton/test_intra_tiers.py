"""The forward intra stage's three pair-decay tiers (fast two-product pass, level-16 + quarter anchor,
six levels), chosen per (chunk, head, key block), vs float64, fp32 under the Triton interpreter."""

import sys
from pathlib import Path

import pytest
import torch

from hla.ops.kda.reference import kda_reference
from hla.ops.kda.triton import kda_chunk_triton
from hla.ops.kda.triton.chunk import _ChunkMeta
from hla.ops.kda.triton.intra import aqk_dtype, kda_intra_fwd

sys.path.insert(0, str(Path(__file__).parent.parent))
from _triton_helpers import INTERPRETER_ONLY, rel  # noqa: E402

pytestmark = INTERPRETER_ONLY

BT, BK = 64, 64


def _tiered_gate(T: int, HV: int, K: int, tiers: torch.Tensor) -> torch.Tensor:
    """Log-decay g [1, T, HV, K] whose per-token size puts chunk c, head h, key block b in tiers[c, h, b]:
    0: |g| < 0.5, every 16-row span < 40 (fast pass); 1: |g| in [3, 3.5], 16-row spans ~ 50 but
    8-row spans < 30 (quarter anchors); 2: |g| in [8, 9], 8-row spans ~ 70 (six levels)."""
    lo = torch.tensor([0.0, 3.0, 8.0])
    width = torch.tensor([0.5, 0.5, 1.0])
    t = tiers.repeat_interleave(BT, 0)[:T].repeat_interleave(BK, 2)[..., :K]  # [T, HV, K]
    return -(lo[t] + width[t] * torch.rand(T, HV, K))[None]


def _tiered_inputs(seed: int, T: int, HV: int, K: int, V: int):
    """Row-normalised q, k [1, T, HV, K], v [1, T, HV, V], beta [1, T, HV], the gate of ``_tiered_gate`` over
    chunk c, head h, key block b in tier (c * HV * NK + h * NK + b) % 3, those tiers and the chunks' meta."""
    torch.manual_seed(seed)
    NC, NK = -(-T // BT), -(-K // BK)
    tiers = torch.arange(NC * HV * NK).view(NC, HV, NK) % 3
    q = torch.nn.functional.normalize(torch.randn(1, T, HV, K), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(1, T, HV, K), dim=-1)
    v, beta = torch.randn(1, T, HV, V), torch.rand(1, T, HV)
    g = _tiered_gate(T, HV, K, tiers)
    return q, k, v, beta, g, tiers, _ChunkMeta(1, T, None, BT, q.device)


def _pair_sums_f64(q, k, g, scale, T):
    """Per chunk: A_qk [T, HV, BT] (j <= i, scaled) and P [NC, HV, BT, BT] (j < i), float64."""
    NC = -(-T // BT)
    A = torch.zeros(T, q.shape[2], BT, dtype=torch.float64)
    P = torch.zeros(NC, q.shape[2], BT, BT, dtype=torch.float64)
    for c in range(NC):
        s, e = c * BT, min(T, c * BT + BT)
        n = e - s
        G = g[0, s:e].double().cumsum(0)  # [n, HV, K]
        d = G[:, None] - G[None, :]  # [i, j, HV, K]
        causal = torch.arange(n)[:, None] >= torch.arange(n)[None, :]
        dec = torch.where(causal[..., None, None], d, -torch.inf).exp()
        qq, kk = q[0, s:e].double(), k[0, s:e].double()
        A[s:e, :, :n] = scale * torch.einsum("ihd,jhd,ijhd->ihj", qq, kk, dec)
        p = torch.einsum("ihd,jhd,ijhd->hij", kk, kk, dec)
        P[c, :, :n, :n] = p * (~torch.eye(n, dtype=torch.bool))
    return A, P


@pytest.mark.parametrize("K", [128, 96])
def test_intra_tiers_per_key_block_match_float64(K):
    # 3 chunks (the last partial), 2 flag blocks of 64 channels (the second partial at K = 96), read
    # by the exact launch in blocks of 32
    T, HV, V = 170, 2, 16
    q, k, v, beta, g, tiers, meta = _tiered_inputs(0, T, HV, K, V)
    h0 = torch.randn(1, HV, K, V) * 0.5
    scale = K**-0.5

    st = kda_intra_fwd(q[0], k[0], v[0], g[0], beta[0], meta.chunk_bounds, scale=scale, A_log=None, dt_bias=None,
                       lower_bound=None, use_qk_l2norm=False, use_beta_sigmoid=False)
    # after both launches the flag says which tier produced each key block's pairs
    assert torch.equal(st["exact_flag"].long(), tiers)
    A, P = _pair_sums_f64(q, k, g, scale, T)
    assert rel(st["Aqk"], A) < 1e-5
    assert rel(st["P"], P) < 1e-5

    ro, rs = kda_reference(q.double(), k.double(), v.double(), g.double(), beta.double(), initial_state=h0.double(),
                           output_final_state=True)
    o, s = kda_chunk_triton(q, k, v, g, beta, scale=scale, initial_state=h0, output_final_state=True,
                            use_qk_l2norm=False, use_beta_sigmoid=False)
    assert rel(o, ro) < 1e-5
    assert rel(s, rs) < 1e-5


def test_intra_recompute_from_saved_matrices_matches_full_stage():
    # the backward's call: A_qk, P, M passed in, only the per-token tensors formed again
    torch.manual_seed(1)
    T, H, HV, K, V = 150, 1, 2, 32, 16
    q, k = torch.randn(T, H, K), torch.randn(T, H, K)
    v, g, beta = torch.randn(T, HV, V), torch.randn(T, HV, K) * 2, torch.randn(T, HV)
    A_log, dt_bias = torch.rand(HV) * 2, torch.randn(HV * K) * 0.5
    meta = _ChunkMeta(1, T, None, BT, q.device)
    kw = dict(scale=K**-0.5, A_log=A_log, dt_bias=dt_bias, lower_bound=None, use_qk_l2norm=True,
              use_beta_sigmoid=True)
    full = kda_intra_fwd(q, k, v, g, beta, meta.chunk_bounds, **kw)
    saved = {n: full[n].clone() for n in ("Aqk", "P", "M")}
    again = kda_intra_fwd(q, k, v, g, beta, meta.chunk_bounds, **kw, saved=saved)
    for n in ("qg", "kd", "dl", "w", "u"):
        assert rel(again[n], full[n]) < 1e-6, n
    for n in ("Aqk", "P", "M"):
        assert again[n] is saved[n]
    # w = M X and u = M (beta v) come from the saved M, not a new inverse
    saved["M"] = saved["M"] * 2
    doubled = kda_intra_fwd(q, k, v, g, beta, meta.chunk_bounds, **kw, saved=saved)
    assert rel(doubled["u"], 2 * full["u"]) < 1e-6


def test_intra_span_limit_with_fused_l2norm():
    """With the l2norm fused (|q|, |k| <= 1 per element) the fast pass takes half spans up to 80, not the
    raw-input 40: the gate above moves tier 1 (16-row spans ~50: masked-out products up to exp(100),
    past fp32's range, dropped by the select) to the fast pass and tier 2 (8-row spans ~70) to the
    quarter anchors, and the pair sums still match float64."""
    T, K = 170, 128
    q, k, v, beta, g, tiers, meta = _tiered_inputs(1, T, 2, K, 16)
    st = kda_intra_fwd(q[0], k[0], v[0], g[0], beta[0], meta.chunk_bounds, scale=K**-0.5, A_log=None, dt_bias=None,
                       lower_bound=None, use_qk_l2norm=True, use_beta_sigmoid=False)
    assert torch.equal(st["exact_flag"].long(), (tiers == 2).long())
    A, P = _pair_sums_f64(q, k, g, K**-0.5, T)
    assert torch.isfinite(st["Aqk"]).all() and torch.isfinite(st["P"]).all()
    assert rel(st["Aqk"], A) < 1e-5
    assert rel(st["P"], P) < 1e-5


def test_intra_aqk_stored_in_bf16_for_bf16_values():
    # bf16 values: A_qk is stored in bf16, the dtype the recurrence multiplies it in. Against the fp32 store of
    # the same sums (v does not enter them), every entry rounded once, also where the exact launch completes the
    # fast launch's partial sums (they wait in fp32; the interpreter's fp32 -> bf16 conversion truncates: up to
    # 2^-7 relative, twice round-to-nearest), over all three tiers.
    assert aqk_dtype(torch.bfloat16) == torch.bfloat16
    assert aqk_dtype(torch.float16) == aqk_dtype(torch.float32) == torch.float32
    K = 128
    q, k, v, beta, g, tiers, meta = _tiered_inputs(2, 170, 2, K, 16)
    v = v.bfloat16()
    sts = [kda_intra_fwd(q[0], k[0], vv[0], g[0], beta[0], meta.chunk_bounds, scale=K**-0.5, A_log=None,
                         dt_bias=None, lower_bound=None, use_qk_l2norm=False, use_beta_sigmoid=False)
           for vv in (v, v.float())]
    assert sts[0]["Aqk"].dtype == torch.bfloat16 and sts[1]["Aqk"].dtype == torch.float32
    assert torch.equal(sts[0]["exact_flag"].long(), tiers)
    assert torch.equal(sts[0]["P"], sts[1]["P"])  # P stays fp32
    a16, a32 = sts[0]["Aqk"].double(), sts[1]["Aqk"].double()
    assert ((a16 - a32).abs() <= 2.0**-7 * a32.abs() + 1e-37).all()  # (fp32 subnormals: bf16 least normal)
    assert rel(a16, a32) > 1e-4  # rounded, not an fp32 store
