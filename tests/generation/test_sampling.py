import pytest
import torch

from hla.generation.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    make_generator,
    mask_top_k,
    mask_top_p,
    sample,
)


def test_sample_greedy_is_argmax():
    logits = torch.randn(5, 37)
    torch.testing.assert_close(sample(logits, SamplingParams()), logits.argmax(-1))


def test_mask_top_k_keeps_k_largest():
    logits = torch.randn(4, 20)
    out = mask_top_k(logits, 3)
    kept = torch.isfinite(out)
    assert kept.sum(-1).tolist() == [3, 3, 3, 3]
    top = logits.topk(3, -1).indices
    assert kept.gather(-1, top).all()
    torch.testing.assert_close(out[kept], logits[kept])


def test_mask_top_p_keeps_smallest_prefix_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]])
    logits = probs.log()
    kept = torch.isfinite(mask_top_p(logits, 0.8))
    # 0.5 + 0.3 reaches 0.8: the third token is not needed.
    assert kept.tolist() == [[True, True, False, False], [False, False, True, True]]
    kept = torch.isfinite(mask_top_p(logits, 0.81))
    assert kept.tolist() == [[True, True, True, False], [False, True, True, True]]
    # The most likely token survives even a tiny p.
    assert torch.isfinite(mask_top_p(logits, 1e-6)).sum(-1).tolist() == [1, 1]


def test_sample_with_top_k_1_is_greedy():
    logits = torch.randn(6, 50)
    g = make_generator(0, "cpu")
    out = sample(logits, SamplingParams(temperature=1.5, top_k=1), generator=g)
    torch.testing.assert_close(out, logits.argmax(-1))


def test_sample_never_draws_masked_tokens():
    logits = torch.randn(64, 30)
    g = make_generator(3, "cpu")
    for _ in range(5):
        tok = sample(logits, SamplingParams(temperature=2.0, top_k=4), generator=g)
        allowed = logits.topk(4, -1).indices
        assert (allowed == tok[:, None]).any(-1).all()


def test_sample_seeded_is_reproducible_and_seed_matters():
    logits = torch.randn(8, 100)
    p = SamplingParams(temperature=1.0, top_p=0.9)
    a = sample(logits, p, generator=make_generator(7, "cpu"))
    b = sample(logits, p, generator=make_generator(7, "cpu"))
    c = torch.stack([sample(logits, p, generator=make_generator(s, "cpu")) for s in range(8)])
    torch.testing.assert_close(a, b)
    assert not (c == a).all()


def test_sample_frequencies_follow_softmax():
    # The exponential race draws index i with probability p_i: check on 20k draws.
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).expand(20000, 4)
    g = make_generator(0, "cpu")
    tok = sample(logits, SamplingParams(temperature=1.0), generator=g)
    freq = torch.bincount(tok, minlength=4).float() / tok.numel()
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.015, rtol=0)


def test_apply_repetition_penalty_divides_positive_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 3.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    torch.testing.assert_close(out, torch.tensor([[1.0, -4.0, 3.0, -1.0]]))


def test_sample_repetition_penalty_changes_greedy_choice():
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    seen = torch.tensor([[True, False, False]])
    assert sample(logits, SamplingParams(repetition_penalty=2.0), seen=seen).item() == 1
    with pytest.raises(ValueError, match="seen"):
        sample(logits, SamplingParams(repetition_penalty=2.0))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=-1.0), "repetition_penalty"),
    ],
    ids=lambda x: str(x) if isinstance(x, dict) else x,
)
def test_sampling_params_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_make_generator_rejects_non_int_seed():
    with pytest.raises(ValueError, match="seed"):
        make_generator(1.5, "cpu")


def test_sample_rejects_wrong_rank():
    with pytest.raises(ValueError, match="logits"):
        sample(torch.randn(2, 3, 4), SamplingParams())
