"""The Gluon fast launch (intra_wgmma.py): where it is used, that it compiles for sm_90a at the register cap it
launches with (offline, on the CPU), and on an H100 / H200 that the intra stage it starts returns what the tl fast
launch's does."""

import sys
from pathlib import Path

import pytest
import torch

from hla.ops.kda.triton import intra
from hla.ops.kda.triton.intra_wgmma import fast_wgmma_supported

sys.path.insert(0, str(Path(__file__).parent.parent))
from _triton_helpers import sm90_regs_rows  # noqa: E402

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def test_not_used_on_the_cpu_nor_for_other_inputs():
    bf = torch.bfloat16
    x = torch.randn(64, 2, 128, dtype=bf)
    assert not fast_wgmma_supported(x, x, x)
    if HOPPER:
        g = x.cuda()
        assert fast_wgmma_supported(g, g, g)
        assert not fast_wgmma_supported(g.half(), g.half(), g.half())
        assert not fast_wgmma_supported(g.float(), g.float(), g)
        assert not fast_wgmma_supported(g[..., :32].contiguous(), g[..., :32].contiguous(), g)


def test_compiles_for_sm90_at_two_programs_per_sm():
    rows = sm90_regs_rows("intra fast wgmma")
    assert len(rows) == 2  # both gates
    for name, _warps, _stages, regs, spill_st, spill_ld, shared_kb, _blocks in rows:
        # launched at intra_wgmma.MAX_REGISTERS = 128 (two programs per SM): 56-84 B of spills, measured faster
        # than the spill-free ~175 registers at one program per SM
        assert int(regs) <= 128 and int(spill_st) <= 256 and int(spill_ld) <= 256, f"{name}: {regs} registers, spills"
        assert int(shared_kb) <= 113, f"{name} needs {shared_kb} KB of shared memory: two programs would not fit"


def _inputs(lengths, H, HV, K, V, gate):
    from hla.ops.kda.triton.chunk import _ChunkMeta

    dev, bf = torch.device("cuda"), torch.bfloat16
    TT = sum(lengths)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), device=dev, dtype=torch.int32)
    meta = _ChunkMeta(1, TT, cu, 64, dev)
    q, k = (torch.randn(TT, H, K, device=dev, dtype=bf) for _ in range(2))
    v = torch.randn(TT, HV, V, device=dev, dtype=bf)
    beta = torch.randn(TT, HV, device=dev, dtype=bf)
    kw = dict(scale=K**-0.5, use_qk_l2norm=True, use_beta_sigmoid=True, A_log=None, dt_bias=None, lower_bound=None)
    if gate == "raw":  # the log-decay itself, no fused gate, raw q / k
        g = -torch.rand(TT, HV, K, device=dev).mul(0.3).to(bf)
        kw["use_qk_l2norm"] = False
        q, k = q * 0.3, k * 0.3
    else:  # the benchmark's gates: Kimi's (flags ~8% of chunk-heads) and the bounded one
        g = torch.randn(TT, HV, K, device=dev, dtype=bf)
        kw["A_log"] = torch.empty(HV, device=dev).uniform_(1, 16).log()
        kw["dt_bias"] = torch.randn(HV * K, device=dev) * 0.5 - 3
        kw["lower_bound"] = -5.0 if gate == "bounded" else None
    return (q, k, v, g, beta, meta.chunk_bounds), kw


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU (wgmma)")
@pytest.mark.parametrize("gate,lengths,H,HV,K,span", [
    ("kimi", [8192], 4, 4, 128, None),
    ("bounded", [1000, 64, 333, 1], 2, 2, 128, None),
    ("kimi", [1000, 64, 333, 1], 2, 4, 64, None),
    ("raw", [700, 77], 2, 2, 128, None),
    ("kimi", [500, 129], 2, 2, 128, -1.0),  # every key block flagged: the exact launch's six levels everywhere
])
def test_matches_the_tl_fast_launch(gate, lengths, H, HV, K, span, monkeypatch):
    from hla.ops.kda.triton import intra_wgmma

    args, kw = _inputs(lengths, H, HV, K, 128, gate)
    launched = []
    fast = intra_wgmma.kda_intra_fast_wgmma
    monkeypatch.setattr(intra_wgmma, "kda_intra_fast_wgmma", lambda *a, **k: launched.append(1) or fast(*a, **k))
    runs = {}
    for on in (False, True):
        monkeypatch.setattr(intra, "INTRA_WGMMA", "always" if on else "off")
        runs[on] = intra.kda_intra_fwd(*args, **kw, safe_span=span)
        assert len(launched) == int(on), "the Gluon launch ran when off, or did not run when on"
    # an explicit launch shape keeps the tl launch
    intra.kda_intra_fwd(*args, **kw, safe_span=span, num_warps=4)
    assert len(launched) == 1
    tl_, gl_ = runs[False], runs[True]
    torch.testing.assert_close(gl_["exact_flag"], tl_["exact_flag"], rtol=0, atol=0)
    flagged = tl_["exact_flag"].ne(0).float().mean().item()
    if span is not None:
        assert flagged == 1.0
    # the same operand tiles summed in another order: A_qk and P within fp32 rounding, the bf16 tiles identical up to
    # an occasional last-bit difference (the gate's exponentials are the same MUFU operations)
    for name in ("Aqk", "P", "M", "u", "w", "qg", "kd", "dl"):
        err = _rel(gl_[name], tl_[name])
        assert err < (4e-3 if name == "Aqk" else 1e-3), f"{name}: {err:.2e} (flagged {flagged:.1%})"
        assert torch.isfinite(gl_[name]).all(), name


@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU (wgmma)")
@pytest.mark.parametrize("gate,lengths,H,HV,K,g32", [
    ("bounded", [1000, 64, 333, 1], 2, 2, 128, False),  # chunks ending inside a sequence: the next one's rows zeroed
    ("kimi", [1000, 64, 333, 1], 2, 4, 64, False),
    ("raw", [700, 77], 2, 2, 128, False),
    ("raw", [700, 77], 2, 2, 128, True),  # fp32 g: loaded by pointer whatever TMA_LOADS says
])
def test_tma_loads_give_the_bits_of_pointer_loads(gate, lengths, H, HV, K, g32, monkeypatch):
    from hla.ops.kda.triton import intra_wgmma

    (q, k, v, g, beta, bounds), kw = _inputs(lengths, H, HV, K, 128, gate)
    args = (q, k, v, g.float() if g32 else g, beta, bounds)
    descriptors = []
    make = intra_wgmma.tma_descriptor
    monkeypatch.setattr(intra_wgmma, "tma_descriptor", lambda *a: descriptors.append(1) or make(*a))
    monkeypatch.setattr(intra, "INTRA_WGMMA", "always")
    runs = {}
    for on in (False, True):
        monkeypatch.setattr(intra_wgmma, "TMA_LOADS", on)
        runs[on] = intra.kda_intra_fwd(*args, **kw, safe_span=None)
    assert len(descriptors) == (0 if g32 else 3)
    torch.testing.assert_close(runs[True]["exact_flag"], runs[False]["exact_flag"], rtol=0, atol=0)
    for name in ("Aqk", "P", "M", "u", "w", "qg", "kd", "dl"):
        if gate == "raw":  # without the gate's exponentials the compiler contracts g log2(e) + Gamma differently in
            # the two programs: Gamma (dl) moves by one fp32 ulp, which the bf16 tiles and the inverse carry on
            err = _rel(runs[True][name], runs[False][name])
            assert err < (4e-3 if name == "Aqk" else 1e-3), f"{name}: {err:.2e}"
        else:
            assert torch.equal(runs[True][name], runs[False][name]), name


@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU (wgmma)")
@pytest.mark.parametrize("gate", ["kimi", "bounded"])
def test_inference_forward_takes_it(gate, monkeypatch):
    """By default (INTRA_WGMMA = "inference") a forward without gradients takes the Gluon launch and a training
    forward the tl one: both outputs and final states against the float64 reference and each other, varlen."""
    from hla.ops.kda.gate import kda_gate, l2norm
    from hla.ops.kda.reference import kda_reference
    from hla.ops.kda.triton import intra_wgmma
    from hla.ops.kda.triton.chunk import kda_chunk_triton

    launched = []
    fast = intra_wgmma.kda_intra_fast_wgmma
    monkeypatch.setattr(intra_wgmma, "kda_intra_fast_wgmma", lambda *a, **k: launched.append(1) or fast(*a, **k))
    dev, bf = torch.device("cuda"), torch.bfloat16
    lengths, H = [1500, 64, 700, 3], 4
    TT = sum(lengths)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), device=dev, dtype=torch.int32)
    q, k, v, g = (torch.randn(1, TT, H, 128, device=dev, dtype=bf) for _ in range(4))
    beta = torch.randn(1, TT, H, device=dev, dtype=bf)
    A_log = torch.empty(H, device=dev).uniform_(1, 16).log()
    dt_bias = torch.randn(H * 128, device=dev) * 0.5 - 3
    lb = -5.0 if gate == "bounded" else None
    h0 = torch.randn(len(lengths), H, 128, 128, device=dev)

    def ours():
        return kda_chunk_triton(q, k, v, g, beta, scale=128**-0.5, initial_state=h0, output_final_state=True,
                                cu_seqlens=cu, A_log=A_log, dt_bias=dt_bias, lower_bound=lb, use_qk_l2norm=True,
                                use_beta_sigmoid=True)

    o, s = ours()
    assert len(launched) == 1
    q.requires_grad_(True)
    o_train, s_train = ours()
    assert len(launched) == 1
    d = lambda t: t.detach().double()  # noqa: E731
    ro, rs = kda_reference(l2norm(d(q)), l2norm(d(k)), d(v), kda_gate(d(g), d(A_log), d(dt_bias), lb),
                           torch.sigmoid(d(beta)), initial_state=d(h0), output_final_state=True, cu_seqlens=cu.long())
    for name, a, b in (("o", o, ro), ("state", s, rs), ("o train", o_train, ro), ("state train", s_train, rs)):
        assert _rel(a, b) < 5e-3, f"{name}: {_rel(a, b):.2e}"
    assert _rel(o, o_train) < 2e-3 and _rel(s, s_train) < 1e-3, (_rel(o, o_train), _rel(s, s_train))
