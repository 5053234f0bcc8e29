"""A small causal LM that honours the cache contract (CONTRACTS.md, Cache), for generation tests.

It has both kinds of memory the hybrid cache holds: a decaying fp32 recurrent state (like KDA)
and a per-token key/value cache with softmax attention (like MLA), so prefill-then-decode,
stacking and batching are exercised without depending on the real model's speed on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn


@dataclass
class MockConfig:
    vocab_size: int = 48
    hidden_size: int = 16


class MockCache:
    def __init__(self, state: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor):
        self.state, self.keys, self.values, self.lengths = state, keys, values, lengths

    @property
    def max_length(self) -> int:
        return self.keys.shape[1]

    @classmethod
    def allocate(cls, config: MockConfig, batch_size: int, max_length: int, *, device, dtype) -> MockCache:
        D = config.hidden_size
        return cls(
            torch.zeros(batch_size, D, device=device, dtype=torch.float32),
            torch.zeros(batch_size, max_length, D, device=device, dtype=dtype),
            torch.zeros(batch_size, max_length, D, device=device, dtype=dtype),
            torch.zeros(batch_size, dtype=torch.long, device=device),
        )

    @classmethod
    def stack(cls, caches: list[MockCache], max_length: int | None = None) -> MockCache:
        L = max_length or max(c.max_length for c in caches)
        keys = torch.zeros(sum(c.keys.shape[0] for c in caches), L, caches[0].keys.shape[2], dtype=caches[0].keys.dtype)
        values = torch.zeros_like(keys)
        row = 0
        for c in caches:
            n, m = c.keys.shape[:2]
            keys[row : row + n, :m] = c.keys
            values[row : row + n, :m] = c.values
            row += n
        dev = caches[0].keys.device
        return cls(
            torch.cat([c.state for c in caches]), keys.to(dev), values.to(dev), torch.cat([c.lengths for c in caches])
        )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.state, self.keys, self.values))


@dataclass
class MockOutput:
    logits: torch.Tensor


class MockModel(nn.Module):
    cache_class = MockCache

    def __init__(self, config: MockConfig):
        super().__init__()
        self.config = config
        V, D = config.vocab_size, config.hidden_size
        self.embed = nn.Embedding(V, D)
        self.wq, self.wk, self.wv = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.decay_logit = nn.Parameter(torch.randn(D))
        self.head = nn.Linear(D, V)
        self.calls: list[tuple[int, int]] = []

    def forward(self, input_ids: torch.Tensor, cache: MockCache | None = None) -> MockOutput:
        B, T = input_ids.shape
        self.calls.append((B, T))
        if cache is None:
            cache = MockCache.allocate(self.config, B, T, device=input_ids.device, dtype=self.embed.weight.dtype)
        x = self.embed(input_ids)  # [B, T, D]
        pos = cache.lengths[:, None] + torch.arange(T, device=x.device)  # [B, T]
        rows = torch.arange(B, device=x.device)[:, None].expand(B, T)
        cache.keys[rows, pos] = self.wk(x)
        cache.values[rows, pos] = self.wv(x)
        scores = torch.einsum("btd,bsd->bts", self.wq(x), cache.keys) / x.shape[-1] ** 0.5
        visible = torch.arange(cache.max_length, device=x.device)[None, None, :] <= pos[:, :, None]
        attn = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ cache.values
        a = torch.sigmoid(self.decay_logit.float())
        states = []
        for t in range(T):
            cache.state.mul_(a).add_(x[:, t].float())
            states.append(cache.state.clone())
        s = torch.stack(states, 1).to(x.dtype)
        cache.lengths.add_(T)
        return MockOutput(self.head(torch.tanh(x + attn + s)))


@pytest.fixture(autouse=True)
def _one_thread():
    # These tests run many tiny ops; on a small shared CPU, OpenMP's spin-waiting makes each one
    # 10-100x slower with 2 threads than with 1 (measured: a [4, 32, 4] depthwise conv1d 48 ms vs
    # 0.3 ms). Restored afterwards, so other directories keep their setting.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def mock_model() -> MockModel:
    torch.manual_seed(1)
    return MockModel(MockConfig()).eval()


@pytest.fixture(scope="module")
def tiny_model():
    """The real model, ``tiny`` preset, float64 so greedy ties cannot differ between paths."""
    from hla.models import KimiLinearConfig, KimiLinearForCausalLM

    torch.manual_seed(2)
    return KimiLinearForCausalLM(KimiLinearConfig.preset("tiny")).to_dtype(torch.float64).eval()
