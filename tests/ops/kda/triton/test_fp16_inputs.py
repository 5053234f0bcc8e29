"""fp16 inputs. The intra stage's pair-product factors reach exp(SAFE_SPAN) (5.5e34 at 80), past fp16's 65504:
with operands in the input dtype, fp16 inputs gave inf outputs on the H200, so 16-bit inputs take bf16
operands (the GPU check's fp16 case is the end-to-end guard; the interpreter multiplies in fp32)."""

import sys
from pathlib import Path

import pytest
import torch
import triton.language as tl

from hla.ops.kda.triton import intra, kda_chunk_triton

sys.path.insert(0, str(Path(__file__).parent.parent))
from _triton_helpers import INTERPRETER_ONLY, make_inputs, reference, rel  # noqa: E402

pytestmark = INTERPRETER_ONLY


def test_fp16_inputs_stay_finite_and_match_reference():
    torch.manual_seed(0)
    x = make_inputs(T=128, H=1, HV=1, K=32, V=16, gate="veryneg")
    names = ["q", "k", "v", "g", "beta"]
    x16 = {n: (x[n].half().requires_grad_(True) if n in names else x[n]) for n in x}
    ref_in = {n: (t.detach().double().requires_grad_(n in names) if torch.is_tensor(t) else t) for n, t in x16.items()}
    ro, rs = reference(ref_in)
    do, ds = torch.randn_like(ro), torch.randn_like(rs)
    ref = torch.autograd.grad([ro, rs], [ref_in[n] for n in names], [do, ds])
    o, s = kda_chunk_triton(x16["q"], x16["k"], x16["v"], x16["g"], x16["beta"], scale=32**-0.5,
                            initial_state=x["h0"], output_final_state=True, A_log=x["A_log"], dt_bias=x["dt_bias"],
                            use_qk_l2norm=True, use_beta_sigmoid=True)
    assert o.dtype == torch.float16
    assert rel(o, ro) < 2e-3 and rel(s, rs) < 2e-3, (rel(o, ro), rel(s, rs))
    grads = torch.autograd.grad([o, s], [x16[n] for n in names], [do.half(), ds.float()])
    for n, gr, rr in zip(names, grads, ref, strict=True):
        assert rel(gr, rr) < 1e-2, (n, rel(gr, rr))


@pytest.mark.parametrize("dtype, expected", [(torch.float16, tl.bfloat16), (torch.bfloat16, tl.bfloat16),
                                             (torch.float32, tl.float32)])
def test_pair_operands_never_take_fp16(dtype, expected, monkeypatch):
    monkeypatch.setattr(intra, "INTERPRET", False)  # the GPU's choice
    assert intra.pair_operand_dtype(dtype) == expected
