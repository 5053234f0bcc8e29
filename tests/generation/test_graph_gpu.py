"""CUDA-graph decode: replays must give the eager step's logits and tokens (skipped without a GPU)."""

import pytest
import torch

from hla.generation import generate
from hla.generation.graph import DecodeRunner

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _runner_logits(model, use_graph, steps=6):
    cls = getattr(model, "cache_class", None)
    if cls is None:
        from hla.generation.cache import HybridCache as cls
    dtype = max(model.parameters(), key=lambda p: p.numel()).dtype
    cache = cls.allocate(model.config, 3, 16, device="cuda", dtype=dtype)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]], device="cuda"), cache=cache)
        runner = DecodeRunner(model, cache, use_graph=use_graph)
        ids = torch.tensor([[3], [1], [4]], device="cuda")
        out = []
        for _ in range(steps):
            logits = runner(ids)
            out.append(logits.clone())
            ids = logits.argmax(-1, keepdim=True)
    return torch.stack(out), runner.captured


@pytest.mark.parametrize("which", ["mock", "tiny"])
def test_decode_runner_graph_equals_eager(which, mock_model, tiny_model):
    model = (mock_model if which == "mock" else tiny_model).to("cuda").float()
    eager, cap_e = _runner_logits(model, False)
    graph, cap_g = _runner_logits(model, True)
    assert not cap_e and cap_g
    torch.testing.assert_close(graph, eager, rtol=1e-4, atol=1e-4)


def test_generate_graph_equals_eager(tiny_model):
    # fp32: the graph attends over a static key span, eager over the live one; bf16 rounding of
    # the two reduction orders could flip a sampled token, fp32 rounding practically cannot.
    model = tiny_model.to("cuda").float()
    prompts = [[5, 9, 200, 17, 3], [42], [300, 301, 302, 7, 8, 9, 10, 11]]
    kw = dict(temperature=0.8, top_k=50, seed=1)
    assert generate(model, prompts, 12, use_cuda_graph=True, **kw) == generate(
        model, prompts, 12, use_cuda_graph=False, **kw
    )


def test_stream_equals_generate_on_cuda(tiny_model):
    # stream reads each step from pinned host memory while the next step already runs.
    from hla.generation import stream

    model = tiny_model.to("cuda").float()
    prompts = [[5, 9, 200, 17, 3], [42]]
    kw = dict(temperature=0.9, top_p=0.9, seed=2, stop_token_ids=[7, 11])
    rows = [[], []]
    for r, t in stream(model, prompts, 20, **kw):
        rows[r].append(t)
    assert rows == generate(model, prompts, 20, **kw)
