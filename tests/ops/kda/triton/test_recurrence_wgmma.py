"""The Gluon walk (recurrence_wgmma.py): where it is used, that it compiles for sm_90a without spills (offline, on
the CPU), and on an H100 / H200 that it matches the tl walk and a float64 walk over the same stage-1 tensors."""

import sys
from pathlib import Path

import pytest
import torch

from hla.ops.kda.triton.recurrence import kda_recurrence_fwd
from hla.ops.kda.triton.recurrence_wgmma import wgmma_walk_supported

sys.path.insert(0, str(Path(__file__).parent.parent))
from _triton_helpers import rel, sm90_regs_rows  # noqa: E402

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def _stage1(TT=200, HV=2, K=64, V=64, device="cpu"):
    """Random stage-1 tensors of the shapes and dtypes the intra stage hands over (bf16 tiles)."""
    bf = torch.bfloat16
    NC = -(-TT // 64)
    w, qg, kd = (torch.randn(TT, HV, K, device=device).mul(0.1).to(bf) for _ in range(3))
    aqk = torch.randn(TT, HV, 64, device=device).mul(0.1).tril(0).to(bf)  # rows i, cols j <= i within a chunk
    return dict(w=w, qg=qg, kd=kd, Aqk=aqk, u=torch.randn(TT, HV, V, device=device),
                dl=torch.rand(NC, HV, K, device=device) * 0.5 + 0.5)


def test_not_used_on_the_cpu_nor_for_other_tiles():
    st = _stage1()
    bf = torch.bfloat16
    assert not wgmma_walk_supported(st["w"], st["u"], st["Aqk"], write_o=True, store_h=False)
    if HOPPER:
        g = {n: t.cuda() for n, t in st.items()}
        assert wgmma_walk_supported(g["w"], g["u"], g["Aqk"], write_o=True, store_h=False)
        assert wgmma_walk_supported(g["w"], g["u"], g["Aqk"], write_o=False, store_h=True, h_dtype=bf, vnew_dtype=bf)
        # fp32 snapshots, both walks in one launch, fp32 tiles, V not a multiple of 64: the tl kernel
        assert not wgmma_walk_supported(g["w"], g["u"], g["Aqk"], write_o=False, store_h=True,
                                        h_dtype=torch.float32, vnew_dtype=bf)
        assert not wgmma_walk_supported(g["w"], g["u"], g["Aqk"], write_o=True, store_h=True, h_dtype=bf,
                                        vnew_dtype=bf)
        assert not wgmma_walk_supported(g["w"].float(), g["u"], g["Aqk"], write_o=True, store_h=False)
        assert not wgmma_walk_supported(g["w"], g["u"][..., :32], g["Aqk"], write_o=True, store_h=False)
        assert not wgmma_walk_supported(g["w"], g["u"], g["Aqk"], write_o=True, store_h=False,
                                        out_dtype=torch.float32)


def test_compiles_for_sm90_without_spills():
    for name, _warps, _stages, _regs, spill_st, spill_ld, shared_kb, _blocks in sm90_regs_rows("recurrence wgmma"):
        # the premultiplied walk's extra state-update operand leaves one 4-byte value spilled at 255 registers
        # (measured so, session 17), two with its o slot (session 18); every other row spills nothing
        allowed = 4 if name.endswith("premultiplied") else 8 if name.endswith("o slot") else 0
        assert int(spill_st) <= allowed and int(spill_ld) <= allowed, f"{name} spills"
        limit = 113 if name.endswith("o slot") else 227  # the o slot's walk runs two programs per SM
        assert int(shared_kb) <= limit, f"{name} needs {shared_kb} KB of shared memory"


def _walk_f64(st, cu, h0):
    w, u, qg, kd, A, dl = (st[n].double() for n in ("w", "u", "qg", "kd", "Aqk", "dl"))
    o = torch.zeros_like(u)
    states, c = [], 0
    for n in range(len(cu) - 1):
        S = h0[n].double().clone()
        for s in range(cu[n], cu[n + 1], 64):
            e = min(s + 64, cu[n + 1])
            tr = [x[s:e].transpose(0, 1) for x in (w, u, qg, kd)]
            a = A[s:e, :, : e - s].transpose(0, 1)
            vn = tr[1] - tr[0] @ S
            o[s:e] = (tr[2] @ S + a @ vn).transpose(0, 1)
            S = S * dl[c][:, :, None] + tr[3].transpose(1, 2) @ vn
            c += 1
        states.append(S)
    return o, torch.stack(states)


def _assert_walk_matches(walk_st, ref_st, meta, h0, premultiplied=False):
    """The Gluon output walk over walk_st against the tl walk over the same tensors and a float64 walk over ref_st (the
    plain operands of the same inputs): o and the final state. Both walks round v_new (or Z) to bf16 for the products
    and o to bf16 (~2.5e-3 from float64, session 15) and agree to ~2.5e-5 (the same fp32 values rounded)."""
    run = dict(initial_state=h0, output_final_state=True, out_dtype=torch.bfloat16, premultiplied=premultiplied)
    o_g, s_g, _, _ = kda_recurrence_fwd(walk_st, meta.cu, meta.chunk_offsets, **run)
    o_t, s_t, _, _ = kda_recurrence_fwd(walk_st, meta.cu, meta.chunk_offsets, block_v=32, **run)  # an override: tl
    o_r, s_r = _walk_f64(ref_st, meta.cu.tolist(), h0)
    assert rel(o_g, o_r) < 5e-3 and rel(s_g, s_r) < 5e-3
    assert rel(o_g, o_t) < 2e-4 and rel(s_g, s_t) < 2e-4


def _gpu_stage1(lengths, HV, K, V, premultiply=False):
    """Stage-1 tensors as the forward makes them (kda_intra_fwd on bf16 raw projections, bounded gate)."""
    from hla.ops.kda.triton.chunk import _ChunkMeta
    from hla.ops.kda.triton.intra import kda_intra_fwd

    dev = torch.device("cuda")
    TT = sum(lengths)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), device=dev, dtype=torch.int32)
    meta = _ChunkMeta(1, TT, cu, 64, dev)
    q, k, g = (torch.randn(TT, HV, K, device=dev, dtype=torch.bfloat16) for _ in range(3))
    v = torch.randn(TT, HV, V, device=dev, dtype=torch.bfloat16)
    beta = torch.randn(TT, HV, device=dev, dtype=torch.bfloat16)
    st = kda_intra_fwd(q, k, v, g, beta, meta.chunk_bounds, scale=K**-0.5,
                       A_log=torch.empty(HV, device=dev).uniform_(1, 16).log(),
                       dt_bias=torch.randn(HV * K, device=dev) * 0.5 - 3, lower_bound=-5.0, use_qk_l2norm=True,
                       use_beta_sigmoid=True, premultiply=premultiply)
    return st, meta


@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU (wgmma)")
@pytest.mark.parametrize("K,lengths", [(128, [1000, 64, 333]), (64, [1, 900]), (128, [8192])])
def test_matches_the_tl_walk_and_float64(K, lengths):
    import hla.ops.kda.triton.recurrence as rec

    HV, V = 3, 128
    st, meta = _gpu_stage1(lengths, HV, K, V)
    h0 = torch.randn(meta.N, HV, K, V, device="cuda") * 0.1
    assert rec._use_wgmma_walk(st, True, False, True, (None, None, None))
    assert not rec._use_wgmma_walk(st, True, False, True, (None, None, None), out_dtype=torch.float32)
    _assert_walk_matches(st, st, meta, h0)


@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU (wgmma)")
@pytest.mark.parametrize("o_slot", [False, True], ids=["ring", "o-slot"])
@pytest.mark.parametrize("K,lengths", [(128, [1000, 64, 333]), (64, [1, 900])])
def test_premultiplied_walk_matches_the_tl_walk_and_float64(K, lengths, o_slot, monkeypatch):
    # the forward's walk over v, k exp(Gamma), (M diag(beta))^T kd and A_qk M diag(beta) (chunk.PREMULTIPLY), with qg
    # and A_qk in the ring or in a slot of their own (two programs per SM: recurrence_wgmma.TWO_PER_SM, which takes it
    # where the grid has more programs than SMs; here the SM count is set to make it so, or not)
    import hla.ops.kda.triton.recurrence as rec
    import hla.ops.kda.triton.recurrence_wgmma as walk

    monkeypatch.setattr(walk, "sm_count", lambda device: 1 if o_slot else 1 << 20)

    torch.manual_seed(0)
    pre, meta = _gpu_stage1(lengths, 3, K, 128, premultiply=True)
    torch.manual_seed(0)
    plain, _ = _gpu_stage1(lengths, 3, K, 128)
    walk_st = dict(pre, Aqk=pre["AqkM"])
    assert pre["u"].dtype == torch.bfloat16
    assert rec._use_wgmma_walk(walk_st, True, False, True, (None, None, None), premultiplied=True)
    # u is then the caller's v: rows off TMA's 16-byte alignment keep the tl walk
    odd = torch.empty(pre["u"].numel() + 1, device="cuda", dtype=torch.bfloat16)[1:].view(pre["u"].shape)
    assert not rec._use_wgmma_walk(dict(walk_st, u=odd), True, False, True, (None, None, None), premultiplied=True)
    h0 = torch.randn(meta.N, 3, K, 128, device="cuda") * 0.1
    _assert_walk_matches(walk_st, plain, meta, h0, premultiplied=True)


@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU (wgmma)")
def test_states_walk_matches_the_tl_states_walk():
    # the backward's states launch: each chunk's entry state and the v_new tiles, as bf16 snapshots
    st, meta = _gpu_stage1([1000, 64, 333], 3, 128, 128)
    h0 = torch.randn(meta.N, 3, 128, 128, device="cuda") * 0.1
    run = dict(initial_state=h0, output_final_state=False, out_dtype=torch.bfloat16, store_h=True, write_o=False)
    _, _, h_g, vn_g = kda_recurrence_fwd(st, meta.cu, meta.chunk_offsets, **run)
    _, _, h_t, vn_t = kda_recurrence_fwd(st, meta.cu, meta.chunk_offsets, block_v=32, **run)
    assert h_g.dtype == h_t.dtype == torch.bfloat16 and vn_g.dtype == vn_t.dtype == torch.bfloat16
    # bf16 snapshots of the same fp32 walk: they differ where the two walks' fp32 values round apart
    assert rel(h_g, h_t) < 2e-3 and rel(vn_g, vn_t) < 2e-3
