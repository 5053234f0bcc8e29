"""kda_decode_triton (fused decode step, state pool updated in place) vs the float64 reference."""

import sys
from pathlib import Path

import pytest
import torch

from hla.ops.kda.triton import kda_decode_triton

sys.path.insert(0, str(Path(__file__).parent))
from _triton_helpers import INTERPRETER_ONLY, make_inputs, precompute, reference, rel  # noqa: E402

pytestmark = INTERPRETER_ONLY


def _decode(x, pool, idx, **kw):
    K = x["q"].shape[-1]
    return kda_decode_triton(x["q"], x["k"], x["v"], x["g"], x["beta"], pool, scale=K**-0.5, state_indices=idx,
                             A_log=x["A_log"], dt_bias=x["dt_bias"], lower_bound=x["lower_bound"], **kw)


@pytest.mark.parametrize("gate", ["kimi", "safe", "veryneg"])
def test_decode_step_with_slot_indices(gate):
    B, P, T = 3, 5, 2
    x = make_inputs(B=B, T=T, H=1, HV=2, gate=gate, h0=False)
    pool = torch.randn(P, 2, 32, 32)
    idx = torch.tensor([4, 0, 2], dtype=torch.int32)
    untouched = pool[[1, 3]].clone()
    x["h0"] = pool[idx.long()].clone()
    ro, rs = reference(x)
    o = _decode(x, pool, idx, use_qk_l2norm=True, use_beta_sigmoid=True)
    assert rel(o, ro) < 1e-5
    assert rel(pool[idx.long()], rs) < 1e-5
    assert torch.equal(pool[[1, 3]], untouched)


def test_decode_precomputed_inputs_gva():
    x = precompute(make_inputs(B=2, T=1, H=1, HV=2, K=64, V=32))
    pool = x["h0"].clone()
    ro, rs = reference(x, precomputed=True)
    o = _decode(x, pool, None)
    assert rel(o, ro) < 1e-5
    assert rel(pool, rs) < 1e-5


def test_decode_negative_slot_leaves_pool_alone():
    x = make_inputs(B=2, T=1, h0=False)
    pool = torch.randn(2, 1, 32, 32)
    before = pool.clone()
    o = _decode(x, pool, torch.tensor([-1, 1], dtype=torch.int32), use_qk_l2norm=True, use_beta_sigmoid=True)
    assert torch.equal(pool[0], before[0])
    assert not torch.equal(pool[1], before[1])
    assert torch.equal(o[0], torch.zeros_like(o[0]))


def test_decode_token_by_token_equals_full_sequence():
    x = make_inputs(B=1, T=6)
    ro, rs = reference(x)
    pool = x["h0"].clone()
    outs = []
    for t in range(6):
        xt = {n: (v[:, t : t + 1] if torch.is_tensor(v) and v.dim() >= 3 and n != "h0" else v) for n, v in x.items()}
        outs.append(_decode(xt, pool, None, use_qk_l2norm=True, use_beta_sigmoid=True))
    assert rel(torch.cat(outs, 1), ro) < 1e-5
    assert rel(pool, rs) < 1e-5


def test_decode_rejects_non_fp32_state():
    x = make_inputs(B=1, T=1)
    with pytest.raises(ValueError, match="state"):
        _decode(x, x["h0"].double(), None)


@pytest.mark.parametrize("block_v", [16, 64])
def test_decode_launch_overrides_match_reference(block_v):
    # block_v / num_warps / max_registers are the benchmark's launch sweep: every setting must give
    # the same step (K != V, so the state offset tile's row stride is V, and 4 or 1 value blocks).
    x = make_inputs(B=2, T=1, H=1, HV=2, K=32, V=64)
    ro, rs = reference(x)
    pool = x["h0"].clone()
    o = _decode(x, pool, None, use_qk_l2norm=True, use_beta_sigmoid=True, block_v=block_v, num_warps=1,
                max_registers=128)
    assert rel(o, ro) < 1e-5
    assert rel(pool, rs) < 1e-5
