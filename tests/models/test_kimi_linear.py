import pytest
import torch
import torch.nn.functional as F

from hla.models.config import KimiLinearConfig
from hla.models.kimi_linear import KimiLinearForCausalLM


def _tiny(**changes):
    return KimiLinearForCausalLM(KimiLinearConfig.preset("tiny").replace(**changes))


def test_forward_shapes_and_shifted_loss():
    model = _tiny()
    ids = torch.randint(0, 512, (2, 10))
    labels = ids.clone()
    labels[0, 4] = -100
    out = model(ids, labels=labels)
    assert out.logits.shape == (2, 10, 512)
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, 512), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref)
    assert model(ids).loss is None
    last = model(ids, logits_to_keep=1).logits
    torch.testing.assert_close(last, out.logits[:, -1:])


def test_forward_backward_every_parameter():
    model = _tiny(mla_use_output_gate=True)
    ids = torch.randint(0, 512, (4, 40))  # 160 tokens: the MoE's sorted (training) path
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if name.endswith("e_score_correction_bias"):
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient"


def test_bad_inputs_raise():
    model = _tiny()
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.randn(2, 3))
    with pytest.raises(ValueError, match="labels"):
        model(torch.zeros(2, 3, dtype=torch.long), labels=torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("how", ["to_dtype", "to"])
def test_to_dtype_keeps_gate_and_router_fp32(how):
    model = getattr(_tiny(), how)(torch.bfloat16)
    fp32 = {n for n, p in model.named_parameters() if p.dtype == torch.float32}
    assert fp32 == model.fp32_param_names()
    assert any(n.endswith("A_log") for n in fp32) and any(n.endswith("dt_bias") for n in fp32)
    assert any(n.endswith("gate.weight") for n in fp32) and any(n.endswith("e_score_correction_bias") for n in fp32)
    out = model(torch.randint(0, 512, (1, 6)))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


def test_tiny_model_learns_a_fixed_batch():
    # Loss on one repeated batch must fall by at least half in 200 steps.
    torch.manual_seed(0)
    cfg = KimiLinearConfig.preset("tiny").replace(num_hidden_layers=2, linear_attn_config={
        "full_attn_layers": [2], "kda_layers": [1], "head_dim": 16, "num_heads": 2, "short_conv_kernel_size": 4})
    model = KimiLinearForCausalLM(cfg)
    ids = torch.randint(0, 512, (2, 12))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: intra-op threads only add contention (6x slower on 2 busy cores)
    try:
        for _ in range(200):
            loss = model(ids, labels=ids).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            first = loss.item() if first is None else first
        final = model(ids, labels=ids).loss.item()
    finally:
        torch.set_num_threads(threads)
    assert final <= 0.5 * first, (first, final)
