"""The forward's premultiplied walk operands (intra.kda_intra_fwd(premultiply=True)): what the solve writes,
and that the walk over them gives the walk over w, u; fp32 under the Triton interpreter."""

import sys
from pathlib import Path

import pytest
import torch

from hla.ops.kda.triton.chunk import _ChunkMeta
from hla.ops.kda.triton.intra import kda_intra_fwd
from hla.ops.kda.triton.recurrence import kda_recurrence_fwd

sys.path.insert(0, str(Path(__file__).parent.parent))
from _triton_helpers import INTERPRETER_ONLY, rel  # noqa: E402

pytestmark = INTERPRETER_ONLY

# fp32 tiles under the interpreter (exact products); on the GPU the premultiplied walk is tested with bf16 tiles in
# test_recurrence_wgmma.py and by benchmarks/check_kda_gpu.py

LENGTHS = [150, 64, 30]


def _raw_inputs(lengths, HV=2, K=32, V=16, seed=0):
    """(kda_intra_fwd's positional arguments, its options, meta) of random raw projections."""
    torch.manual_seed(seed)
    TT = sum(lengths)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    meta = _ChunkMeta(1, TT, cu, 64, cu.device)
    q, k, g = (torch.randn(TT, HV, K) for _ in range(3))
    v, beta = torch.randn(TT, HV, V), torch.randn(TT, HV)
    opts = dict(scale=K**-0.5, A_log=torch.rand(HV) * 2, dt_bias=torch.randn(HV * K) - 2,
                lower_bound=None, use_qk_l2norm=True, use_beta_sigmoid=True)
    return (q, k, v, g, beta, meta.chunk_bounds), opts, meta


def _stage1(lengths, HV=2, K=32, V=16, seed=0):
    """(the plain stage-1 dict, the premultiplied one, v, sigmoid(beta), meta) of random raw projections."""
    args, opts, meta = _raw_inputs(lengths, HV, K, V, seed)
    plain = kda_intra_fwd(*args, **opts)
    pre = kda_intra_fwd(*args, **opts, premultiply=True)
    v, beta = args[2], args[4]
    return plain, pre, v, torch.sigmoid(beta.double()), meta


def test_the_solve_folds_m_diag_beta_into_kd_and_aqk():
    plain, pre, v, b, meta = _stage1(LENGTHS)
    assert pre["u"] is v and "AqkM" in pre and "AqkM" not in plain
    # the fast pass's outputs and the inverse are the same in both
    for name in ("Aqk", "P", "M", "qg", "dl"):
        assert torch.equal(plain[name], pre[name]), name
    for c, (s, e) in enumerate(meta.chunk_bounds.tolist()):
        n = e - s
        for h in range(v.shape[1]):
            Mb = plain["M"][c, h, :n, :n].double() * b[s:e, h][None, :]  # M diag(beta)
            # pre's w is k exp(Gamma) as the fast pass left it; plain's w = M diag(beta) k exp(Gamma)
            assert rel(plain["w"][s:e, h], Mb @ pre["w"][s:e, h].double()) < 1e-5
            assert rel(plain["u"][s:e, h], Mb @ v[s:e, h].double()) < 1e-5
            assert rel(pre["kd"][s:e, h], Mb.T @ plain["kd"][s:e, h].double()) < 1e-5
            assert rel(pre["AqkM"][s:e, h, :n], plain["Aqk"][s:e, h, :n].double() @ Mb) < 1e-5


@pytest.mark.parametrize("h0", [False, True])
def test_the_premultiplied_walk_gives_the_plain_walk(h0):
    plain, pre, v, _, meta = _stage1(LENGTHS, seed=1)
    HV, K, V = v.shape[1], plain["w"].shape[-1], v.shape[-1]
    init = torch.randn(meta.N, HV, K, V) * 0.5 if h0 else None
    run = dict(initial_state=init, output_final_state=True, out_dtype=torch.float32)
    o_p, s_p, _, _ = kda_recurrence_fwd(plain, meta.cu, meta.chunk_offsets, **run)
    o_m, s_m, _, _ = kda_recurrence_fwd(dict(pre, Aqk=pre["AqkM"]), meta.cu, meta.chunk_offsets, **run,
                                        premultiplied=True)
    assert rel(o_m, o_p.double()) < 1e-5 and rel(s_m, s_p.double()) < 1e-5
    # the output walk only
    with pytest.raises(ValueError, match="premultiplied"):
        kda_recurrence_fwd(dict(pre, Aqk=pre["AqkM"]), meta.cu, meta.chunk_offsets, **run, premultiplied=True,
                           store_h=True)
    with pytest.raises(ValueError, match="premultiply"):
        kda_intra_fwd(*(torch.zeros(1),) * 6, scale=1.0, A_log=None, dt_bias=None, lower_bound=None,
                      use_qk_l2norm=False, use_beta_sigmoid=False, saved=plain, premultiply=True)


@pytest.mark.parametrize("premultiply", [False, True])
def test_the_solve_grid_orders_agree(premultiply, monkeypatch):
    """intra.SOLVE_HEAD_MAJOR (the grid (HV, NC), the default) and the chunk-major grid: the same bits."""
    from hla.ops.kda.triton import intra

    args, opts, _ = _raw_inputs(LENGTHS, seed=2)
    runs = []
    for head_major in (True, False):
        monkeypatch.setattr(intra, "SOLVE_HEAD_MAJOR", head_major)
        runs.append(kda_intra_fwd(*args, **opts, premultiply=premultiply))
    for name, x in runs[0].items():
        assert torch.equal(x, runs[1][name]), name
