"""kda_state_grad_chain + kda_state_grad_products (the two-launch recurrence backward) vs float64
autograd through a plain per-chunk walk, fp32 under the Triton interpreter."""

import sys
from pathlib import Path

import pytest
import torch

from hla.ops.kda.triton.chunk import _ChunkMeta
from hla.ops.kda.triton.intra import kda_intra_fwd
from hla.ops.kda.triton.recurrence import kda_recurrence_fwd, snapshot_dtypes
from hla.ops.kda.triton.recurrence_bwd import (
    dh_snapshot_dtype,
    kda_state_grad,
    kda_state_grad_chain,
    kda_state_grad_products,
)

sys.path.insert(0, str(Path(__file__).parent.parent))
from _triton_helpers import INTERPRETER_ONLY, rel  # noqa: E402

pytestmark = INTERPRETER_ONLY


@pytest.fixture
def nan_empty(monkeypatch):
    """Every torch.empty starts as NaN, so a row a kernel forgets to write shows up."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        x = empty(*args, **kwargs)
        return x.fill_(float("nan")) if x.is_floating_point() else x

    monkeypatch.setattr(torch, "empty", poisoned)


def _stages(B, T, H, HV, K, V, cu=None, *, h0, dht):
    """Realistic stage-3 inputs from the forward pieces: the intra dict, entry states, v_new, do, dht."""
    meta = _ChunkMeta(B, T, cu, 64, torch.device("cpu"))
    TT = B * T
    q, k = torch.randn(TT, H, K), torch.randn(TT, H, K)
    v, g = torch.randn(TT, HV, V), torch.randn(TT, HV, K) * 2
    beta = torch.randn(TT, HV)
    st = kda_intra_fwd(q, k, v, g, beta, meta.chunk_bounds, scale=K**-0.5, A_log=torch.rand(HV) * 2,
                       dt_bias=torch.randn(HV * K) * 0.5, lower_bound=None, use_qk_l2norm=True,
                       use_beta_sigmoid=True)
    s0 = torch.randn(meta.N, HV, K, V) * 0.5 if h0 else None
    _, _, h, vnew = kda_recurrence_fwd(st, meta.cu, meta.chunk_offsets, initial_state=s0,
                                       output_final_state=False, out_dtype=torch.float32, store_h=True)
    do = torch.randn(TT, HV, V)
    dS = torch.randn(meta.N, HV, K, V) if dht else None
    return meta, st, s0, h, vnew, do, dS


def _bounds(meta):
    return [tuple(int(x) for x in b) for b in meta.chunk_bounds[: meta.NC].tolist()]


def _walk_reference(meta, st, s0, do, dS, *, keep_exits=False):
    """float64 autograd through the per-chunk forward: the gradients the two kernels must produce."""
    names = ("w", "u", "qg", "kd", "Aqk", "dl")
    d = {n: st[n].double().detach().requires_grad_() for n in names}
    HV, K, V = st["w"].shape[1], st["w"].shape[2], st["u"].shape[2]
    s_init = (s0.double() if s0 is not None else torch.zeros(meta.N, HV, K, V, dtype=torch.float64)).requires_grad_()
    bounds, exits, loss = _bounds(meta), {}, 0.0
    for n in range(meta.N):
        for hv in range(HV):
            S = s_init[n, hv]
            for c in range(int(meta.chunk_offsets[n]), int(meta.chunk_offsets[n + 1])):
                s, e = bounds[c]
                A = d["Aqk"][s:e, hv, : e - s].tril()
                vn = d["u"][s:e, hv] - d["w"][s:e, hv] @ S
                o = d["qg"][s:e, hv] @ S + A @ vn
                S = d["dl"][c, hv][:, None] * S + d["kd"][s:e, hv].T @ vn
                if keep_exits:
                    S.retain_grad()
                    exits[c, hv] = S
                loss = loss + (o * do[s:e, hv].double()).sum()
            if dS is not None:
                loss = loss + (S * dS[n, hv].double()).sum()
    loss.backward()
    ref = dict(du=d["u"].grad, dqg=d["qg"].grad, dw=d["w"].grad, dkd=d["kd"].grad, dA=d["Aqk"].grad,
               ddl=d["dl"].grad, dh0=s_init.grad)
    if keep_exits:
        ref["dh"] = torch.stack([torch.stack([exits[c, hv].grad for hv in range(HV)]) for c in range(meta.NC)])
    return ref


CASES = [
    # B, T, H, HV, K, V, cu_seqlens, h0, dht, chain launch options, products BV
    pytest.param(2, 128, 1, 2, 32, 64, None, True, True, dict(block_v=32), 32, id="batch2-gva-k32v64"),
    pytest.param(1, 200, 1, 2, 32, 32, [0, 70, 200], False, False, {}, 16, id="varlen-70-130-bare"),
    pytest.param(1, 200, 2, 2, 64, 32, [0, 70, 70, 200], True, True, dict(block_v=16), None,
                 id="varlen-70-0-130-h0-dht-k64"),
    # A_qk^T do formed by its own launch first
    pytest.param(1, 200, 2, 2, 64, 32, [0, 70, 70, 200], True, True, dict(block_v=16, adv="launch"),
                 None, id="varlen-h0-dht-k64-preadv"),
    pytest.param(1, 130, 1, 1, 96, 32, None, True, True, dict(block_v=32, adv="launch"), None, id="k96-preadv"),
]


@pytest.mark.parametrize("B,T,H,HV,K,V,cu,h0,dht,chain_opts,bv_prod", CASES)
def test_state_grad_chain_and_products_match_float64_autograd(nan_empty, B, T, H, HV, K, V, cu, h0, dht,
                                                            chain_opts, bv_prod):
    cu = torch.tensor(cu, dtype=torch.int32) if cu is not None else None
    meta, st, s0, h, vnew, do, dS = _stages(B, T, H, HV, K, V, cu, h0=h0, dht=dht)
    ref = _walk_reference(meta, st, s0, do, dS)
    dh, dvnew, dh0 = kda_state_grad_chain(st, do, dS, meta.cu, meta.chunk_offsets, meta.chunk_bounds, need_dh0=h0,
                                          **chain_opts)
    out = kda_state_grad_products(st, h, vnew, dh, dvnew, do, meta.chunk_bounds, block_v=bv_prod)
    assert rel(dvnew, ref["du"]) < 1e-5
    for n in ("dqg", "dw", "dkd", "dA", "ddl"):
        assert rel(out[n], ref[n]) < 1e-5, n
    if h0:
        assert rel(dh0, ref["dh0"]) < 1e-5
    else:
        assert dh0 is None
    if h0 and dht and meta.N == 3:
        assert torch.equal(dh0[1], dS[1])  # the empty sequence passes its state gradient through
    # dA: causal, and zero in columns past a chunk's end (the 70-token sequence ends 6 rows into chunk 1).
    for s, e in _bounds(meta):
        keep = torch.ones(e - s, 64, dtype=torch.bool).tril()
        assert (out["dA"][s:e][~keep[:, None, :].expand(-1, HV, -1)] == 0).all()


def test_state_grad_k256_uses_two_key_blocks():
    # K = 256: the products kernel splits K into two 128-wide blocks (a grid axis); dA comes from block 0.
    # Through kda_state_grad, the one call chunk.py makes.
    meta, st, s0, h, vnew, do, dS = _stages(1, 80, 1, 1, 256, 32, h0=True, dht=True)
    ref = _walk_reference(meta, st, s0, do, dS)
    out = kda_state_grad(st, h, vnew, do, dS, meta.cu, meta.chunk_offsets, meta.chunk_bounds, need_dh0=True)
    assert out.keys() == ref.keys()
    for n in ref:
        assert rel(out[n], ref[n]) < 1e-5, n


@pytest.mark.parametrize("mixed,tol", [("tf32", 3e-3), ("hilo", 3e-3), ("bf16", 2e-2)])
@pytest.mark.parametrize("adv", ["tf32", "mixed", "launch"])
def test_state_grad_chain_bf16_inputs(mixed, tol, adv):
    # bf16 w/qg/kd/do: the chain multiplies bf16 tiles by the fp32 dS and dv_new as tf32, as bf16 hi + lo or
    # rounded to bf16 (emulated in fp32 under the interpreter, whose bf16 products are wrong and whose
    # fp32 -> bf16 rounding truncates, and h, v_new come from the fp32 forward: hence the looser bounds).
    # Against float64 autograd on the same bf16 values.
    meta, st, s0, h, vnew, do, dS = _stages(1, 130, 1, 2, 64, 32, h0=True, dht=True)
    st = dict(st, **{n: st[n].bfloat16() for n in ("w", "qg", "kd")})
    do = do.bfloat16()
    ref = _walk_reference(meta, st, s0, do, dS)
    # dS kept in fp32 (the bf16 snapshot is test_state_grad_bf16_snapshots'): this test is about the walk
    dh, dvnew, dh0 = kda_state_grad_chain(st, do, dS, meta.cu, meta.chunk_offsets, meta.chunk_bounds, need_dh0=True,
                                          mixed=mixed, adv=adv, dh_dtype=torch.float32)
    out = kda_state_grad_products(st, h, vnew, dh, dvnew, do, meta.chunk_bounds)
    assert rel(dvnew, ref["du"]) < tol
    assert rel(dh0, ref["dh0"]) < tol
    for n in ("dqg", "dw", "dkd", "dA", "ddl"):
        assert rel(out[n], ref[n]) < tol, n


def test_snapshot_dtypes_follow_the_tiles():
    # bf16 tiles: h, v_new and dS snapshots in bf16 (the defaults); fp16 and fp32 tiles keep fp32 snapshots
    assert snapshot_dtypes(torch.bfloat16) == (torch.bfloat16, torch.bfloat16)
    assert dh_snapshot_dtype(torch.bfloat16) == torch.bfloat16
    for dt in (torch.float16, torch.float32):
        assert snapshot_dtypes(dt) == (torch.float32, torch.float32)
        assert dh_snapshot_dtype(dt) == torch.float32


def test_state_grad_bf16_snapshots():
    # h, v_new and dS stored in bf16 for the products (the defaults for bf16 tiles): every gradient within
    # bf16 rounding of the float64 walk (the interpreter's fp32 -> bf16 conversion truncates: about twice
    # the rounding error of the GPU's), and dv_new, which the walk forms from fp32 values, unchanged.
    meta, st, s0, _, _, do, dS = _stages(1, 200, 2, 2, 64, 32, torch.tensor([0, 70, 200], dtype=torch.int32),
                                         h0=True, dht=True)
    ref = _walk_reference(meta, st, s0, do, dS)
    _, _, h, vnew = kda_recurrence_fwd(st, meta.cu, meta.chunk_offsets, initial_state=s0, output_final_state=False,
                                       out_dtype=torch.float32, store_h=True, h_dtype=torch.bfloat16,
                                       vnew_dtype=torch.bfloat16)
    dh, dvnew, dh0 = kda_state_grad_chain(st, do, dS, meta.cu, meta.chunk_offsets, meta.chunk_bounds, need_dh0=True,
                                          dh_dtype=torch.bfloat16)
    assert h.dtype == vnew.dtype == dh.dtype == torch.bfloat16
    out = kda_state_grad_products(st, h, vnew, dh, dvnew, do, meta.chunk_bounds)
    assert rel(dvnew, ref["du"]) < 1e-5 and rel(dh0, ref["dh0"]) < 1e-5
    for n in ("dqg", "dw", "dkd", "dA", "ddl"):
        assert 1e-5 < rel(out[n], ref[n]) < 1.5e-2, n  # rounded (not the fp32 path), within bf16's reach


def test_state_grad_chain_rejects_bad_launch():
    meta, st, s0, h, vnew, do, dS = _stages(1, 64, 1, 1, 32, 32, h0=False, dht=False)
    with pytest.raises(ValueError, match="mixed"):
        kda_state_grad_chain(st, do, None, meta.cu, meta.chunk_offsets, meta.chunk_bounds, need_dh0=False, mixed="fp8")
    with pytest.raises(ValueError, match="adv"):
        kda_state_grad_chain(st, do, None, meta.cu, meta.chunk_offsets, meta.chunk_bounds, need_dh0=False, adv="bf16")
    with pytest.raises(ValueError, match="chunk_bounds"):
        kda_state_grad_chain(st, do, None, meta.cu, meta.chunk_offsets, meta.chunk_bounds[:, :1], need_dh0=False)


def test_state_grad_chain_dh_equals_autograd_float64():
    # dh[c] must be the gradient of the loss w.r.t. chunk c's exit state, from plain float64 autograd.
    cu = torch.tensor([0, 70, 200], dtype=torch.int32)
    meta, st, s0, h, vnew, do, dS = _stages(1, 200, 1, 2, 32, 64, cu, h0=True, dht=True)
    dh, dvnew, dh0 = kda_state_grad_chain(st, do, dS, meta.cu, meta.chunk_offsets, meta.chunk_bounds, need_dh0=True)
    ref = _walk_reference(meta, st, s0, do, dS, keep_exits=True)
    assert rel(dh, ref["dh"]) < 1e-5
    assert rel(dh0, ref["dh0"]) < 1e-5


def test_walks_refuse_one_stage_with_16bit_tiles():
    # One pipeline stage with bf16 tiles faulted on the H200: the recurrence's output product read shared memory out
    # of bounds (compute-sanitizer, session 11), and the states launch (no output) and the chain's walk hit illegal
    # addresses (session 13). The launchers refuse these by name instead of launching them.
    meta, st, s0, h, vnew, do, dS = _stages(1, 64, 1, 1, 32, 32, h0=False, dht=False)
    st16 = dict(st, **{n: st[n].bfloat16() for n in ("w", "qg", "kd")})
    for write_o in (True, False):
        with pytest.raises(ValueError, match="num_stages"):
            kda_recurrence_fwd(st16, meta.cu, meta.chunk_offsets, initial_state=None, output_final_state=False,
                               out_dtype=torch.bfloat16, store_h=not write_o, write_o=write_o, num_stages=1)
    with pytest.raises(ValueError, match="num_stages"):
        kda_state_grad_chain(st16, do.bfloat16(), None, meta.cu, meta.chunk_offsets, meta.chunk_bounds, need_dh0=False,
                             num_stages=1)
    # fp32 tiles at one stage ran clean on the H200 and are not refused
    kda_recurrence_fwd(st, meta.cu, meta.chunk_offsets, initial_state=None, output_final_state=False,
                       out_dtype=torch.float32, num_stages=1)
    kda_state_grad_chain(st, do, None, meta.cu, meta.chunk_offsets, meta.chunk_bounds, need_dh0=False, num_stages=1)
