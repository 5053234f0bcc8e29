"""generate/stream on the real Kimi Linear model (``tiny`` preset, float64, CPU)."""

import pytest
import torch

from hla.generation import generate, stream
from hla.generation.cache import HybridCache

PROMPTS = [[5, 9, 200, 17, 3], [42], [300, 301, 302, 7, 8, 9, 10, 11]]


def _recompute_greedy(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt) :]


def test_generate_model_greedy_cache_path_equals_recompute(tiny_model):
    out = generate(tiny_model, PROMPTS, 6)
    assert out == [_recompute_greedy(tiny_model, p, 6) for p in PROMPTS]
    assert out == generate(tiny_model, PROMPTS, 6)  # deterministic


def test_generate_model_batch_equals_each_alone_with_chunked_prefill(tiny_model):
    batch = generate(tiny_model, PROMPTS, 5, prefill_chunk_size=3)
    assert batch == [generate(tiny_model, [p], 5)[0] for p in PROMPTS]


def test_generate_model_stop_tokens_and_stream(tiny_model):
    free = generate(tiny_model, PROMPTS, 6)
    stop = free[2][1]
    kw = dict(stop_token_ids=[stop], temperature=0.7, top_p=0.95, seed=0)
    out = generate(tiny_model, PROMPTS, 6, **kw)
    rows = [[] for _ in PROMPTS]
    ts = stream(tiny_model, PROMPTS, 6, **kw)
    for r, t in ts:
        rows[r].append(t)
    assert rows == out
    assert all(stop not in row[:-1] for row in out)
    greedy = generate(tiny_model, PROMPTS, 6, stop_token_ids=[stop])
    assert greedy[2] == free[2][:2]
    assert isinstance(ts.cache, HybridCache) and ts.cache.batch_size == len(PROMPTS)
    assert ts.cache.max_length % 64 == 0 and ts.cache.max_length >= max(map(len, PROMPTS)) + 6


def test_generate_model_rejects_more_than_model_max_length(tiny_model):
    limit = tiny_model.config.model_max_length
    with pytest.raises(ValueError, match="model_max_length"):
        generate(tiny_model, [[1, 2, 3]], limit - 2)
