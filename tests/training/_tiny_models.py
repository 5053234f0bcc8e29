"""Tiny models for the training tests (importable by the torchrun worker too)."""

import torch
from torch import nn


class _Out:
    def __init__(self, logits):
        self.logits = logits
        self.loss = None


class StandInLM(nn.Module):
    """One causal attention block with the model's forward contract; used until hla.models lands."""

    def __init__(self, vocab_size: int, d: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d)
        self.pos = nn.Embedding(4096, d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.head = nn.Linear(d, vocab_size)

    def forward(self, input_ids, labels=None):
        T = input_ids.shape[1]
        h = self.embed(input_ids) + self.pos(torch.arange(T, device=input_ids.device))
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool, device=h.device), 1)
        h = h + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        h = h + self.mlp(self.norm(h))
        return _Out(self.head(h))


def build_tiny_model(vocab_size: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return StandInLM(vocab_size)
