"""The inference forward with its walk beside the solve (chunk.BESIDE_SOLVE), on an H100 / H200: the walk on a
high-priority side stream, waiting chunk by chunk for the flags the solve sets. Same bits as the walk after the solve;
where the forward takes it."""

import pytest
import torch

from hla.ops.kda.triton import chunk
from hla.ops.kda.triton.chunk import kda_chunk_triton

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def _inputs(T, H, gate, dev):
    bf = torch.bfloat16
    q, k, v, g = (torch.randn(1, T, H, 128, device=dev, dtype=bf) for _ in range(4))
    return dict(q=q, k=k, v=v, g=g, beta=torch.randn(1, T, H, device=dev, dtype=bf),
                A_log=torch.empty(H, device=dev).uniform_(1, 16).log(),
                dt_bias=torch.randn(H * 128, device=dev) * 0.5 - 3,
                lower_bound=-5.0 if gate == "bounded" else None, h0=torch.randn(1, H, 128, 128, device=dev))


def _forward(x, cu=None):
    return kda_chunk_triton(x["q"], x["k"], x["v"], x["g"], x["beta"], scale=128**-0.5, initial_state=x["h0"],
                            output_final_state=True, cu_seqlens=cu, A_log=x["A_log"], dt_bias=x["dt_bias"],
                            lower_bound=x["lower_bound"], use_qk_l2norm=True, use_beta_sigmoid=True)


@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU (the Gluon walk)")
def test_walk_beside_the_solve_gives_the_same_bits(monkeypatch):
    """chunk.BESIDE_SOLVE: the walk on the side stream, waiting chunk by chunk for the solve's flags, gives the bits
    of the walk after the solve, on a varlen batch (chunks of three sequences, a partial one, a one-token one and an
    empty one), with the solve's flags read a chunk ahead."""
    from hla.ops.kda.triton import recurrence_wgmma

    dev = torch.device("cuda")
    T = 5000
    x = _inputs(T, 8, "kimi", dev)
    x["h0"] = torch.randn(4, 8, 128, 128, device=dev)
    cu = torch.tensor([0, 2100, 2100, 2101, T], device=dev, dtype=torch.int32)
    readies = []
    real = recurrence_wgmma.kda_walk_wgmma
    monkeypatch.setattr(recurrence_wgmma, "kda_walk_wgmma",
                        lambda *a, **k: readies.append(k["ready"] is not None) or real(*a, **k))
    with torch.no_grad():
        monkeypatch.setattr(chunk, "BESIDE_SOLVE", False)
        o, s = _forward(x, cu)
        monkeypatch.setattr(chunk, "BESIDE_SOLVE", True)
        for _ in range(3):
            o_b, s_b = _forward(x, cu)
            assert torch.equal(o_b, o) and torch.equal(s_b, s)
    assert readies == [False, True, True, True], readies
    # a forward that feeds a backward keeps the walk after the solve
    readies.clear()
    x["q"].requires_grad_(True)
    _forward(x, cu)
    assert readies == [False]


def test_where_the_walk_runs_beside_the_solve():
    """Never with gradients, nor on the CPU, nor where the walk's grid would take more than half the SMs, nor with
    more chunks than a grid's second dimension holds."""
    meta = chunk._ChunkMeta(1, 8192, None, 64, torch.device("cpu"))
    opts = dict(needs_grad=False)
    x = torch.zeros(1)
    assert not chunk._walk_beside_solve(meta, 32, 128, x, opts)
    if torch.cuda.is_available():
        g = x.cuda()
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        assert chunk._walk_beside_solve(meta, 32, 128, g, opts) == (64 <= sms // 2)
        assert not chunk._walk_beside_solve(meta, 32, 128, g, dict(needs_grad=True))
        assert not chunk._walk_beside_solve(meta, sms, 128, g, opts)
        # chunks past the grid's second dimension (the solve's head-major grid): the walk after the solve
        long = chunk._ChunkMeta(1, 64 * (chunk.MAX_GRID_Y + 1), None, 64, torch.device("cpu"))
        assert not chunk._walk_beside_solve(long, 1, 128, g, opts)
