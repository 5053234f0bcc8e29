"""Sparse mixture of SwiGLU experts with Kimi Linear's sigmoid router (spec section 4).

Router: fp32 logits, ``scores = sigmoid(logits)``; the top-k experts are chosen on
``scores + e_score_correction_bias`` (aux-loss-free balancing); their weights are the chosen
**unbiased** scores (transformers, vLLM) or, with ``moe_biased_weights``, the biased ones (what
the original remote code computes); renormalised to sum 1 (+1e-20) and multiplied by
``routed_scaling_factor``. The shared experts' output is added.

Experts are computed grouped by expert, in one of three ways by the number of tokens ``N``:

- ``sorted`` (training, prefill): the (token, slot) pairs are sorted by expert and each expert runs
  one matmul over exactly its tokens. Reads the per-expert counts on the host (one sync).
- ``gathered`` (``N * k <= GATHER_MAX_PAIRS``, e.g. batch-1 decode): the chosen experts' weights
  are gathered per pair and applied with batched matmuls; reads only the chosen experts; no sync.
- ``padded`` (``N <= PADDED_MAX_TOKENS``, batched decode): every expert gets a capacity of ``N``
  rows, pairs are scattered to their expert's rows and all experts run as one batched matmul.
  No sync (graph-capturable); reads every expert's weights, which a large decode batch touches
  anyway, and spends ``E / k`` times the useful FLOPs, cheap next to that read at small ``N``.

On CUDA, ``N * k <= MOE_DECODE_MAX_PAIRS`` (decode, batched decode) instead uses the Triton path of
``hla.ops.moe``: it indexes the stacked weights by expert id inside the kernels, so it reads only the
chosen experts, copies no weight and needs no sync. ``gathered`` and ``padded`` remain the CPU paths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hla.layers.mlp import SwiGLUMLP
from hla.ops.moe import MOE_DECODE_MAX_PAIRS, moe_experts_decode

# At most this many (token, slot) pairs use the gathered-weights path (no host sync).
GATHER_MAX_PAIRS = 16
# At most this many tokens use the capacity-padded path (no host sync).
PADDED_MAX_TOKENS = 64


class MoEGate(nn.Module):
    """Router: ``weight [E, hidden]`` and ``e_score_correction_bias [E]``, both fp32."""

    fp32_params = ("weight", "e_score_correction_bias")

    def __init__(self, config) -> None:
        super().__init__()
        E = config.num_experts
        self.top_k = config.num_experts_per_token
        self.num_groups = config.num_expert_group if config.use_grouped_topk else 1
        self.topk_group = config.topk_group if config.use_grouped_topk else 1
        self.renormalize = config.moe_renormalize
        self.scaling = config.routed_scaling_factor
        self.biased_weights = config.moe_biased_weights
        self.weight = nn.Parameter(torch.empty(E, config.hidden_size, dtype=torch.float32))
        # Updated by a balancing rule outside backprop, so not trained by the optimizer.
        self.e_score_correction_bias = nn.Parameter(torch.zeros(E, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x: [N, hidden]`` -> ``(topk_idx [N, k] long, topk_weight [N, k] fp32)``."""
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        scores = torch.sigmoid(F.linear(x.to(acc), self.weight.to(acc)))  # [N, E]
        biased = scores + self.e_score_correction_bias.to(acc)
        choice = biased
        if self.num_groups > 1:
            # DeepSeek-V3 grouping: rank groups by the sum of their two best biased scores.
            N, E = biased.shape
            grouped = biased.view(N, self.num_groups, E // self.num_groups)
            group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)  # [N, G]
            keep = torch.zeros_like(group_score).scatter_(1, group_score.topk(self.topk_group, dim=-1).indices, 1.0)
            choice = grouped.masked_fill(keep[..., None] == 0, float("-inf")).view(N, E)
        idx = choice.topk(self.top_k, dim=-1).indices
        w = (biased if self.biased_weights else scores).gather(1, idx)
        if self.renormalize:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return idx, w * self.scaling


class SparseMoE(nn.Module):
    """``block_sparse_moe``: router + ``E`` routed SwiGLU experts + shared experts.

    Routed expert weights are stored stacked, ``experts.w1/w3: [E, I, hidden]`` (gate, up) and
    ``experts.w2: [E, hidden, I]`` (down); the checkpoint's per-expert names
    (``experts.{e}.w1.weight``) map to slices in ``hla.models.checkpoint``.
    """

    def __init__(self, config) -> None:
        super().__init__()
        d, I, E = config.hidden_size, config.moe_intermediate_size, config.num_experts
        self.num_experts = E
        self.top_k = config.num_experts_per_token
        self.gate = MoEGate(config)
        self.experts = nn.Module()
        self.experts.w1 = nn.Parameter(torch.empty(E, I, d))
        self.experts.w3 = nn.Parameter(torch.empty(E, I, d))
        self.experts.w2 = nn.Parameter(torch.empty(E, d, I))
        self.shared_experts = (
            SwiGLUMLP(d, I * config.num_shared_experts) if config.num_shared_experts > 0 else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [B, T, hidden]`` -> same shape and dtype."""
        shape = x.shape
        xf = x.reshape(-1, shape[-1])
        idx, w = self.gate(xf)
        if xf.is_cuda and xf.dtype != torch.float64 and idx.numel() <= MOE_DECODE_MAX_PAIRS:
            e = self.experts
            out = moe_experts_decode(xf, e.w1, e.w3, e.w2, idx, w)
        elif idx.numel() <= GATHER_MAX_PAIRS:
            out = self._gathered(xf, idx, w)
        elif xf.shape[0] <= PADDED_MAX_TOKENS:
            out = self._padded(xf, idx, w)
        else:
            out = self._sorted(xf, idx, w)
        if self.shared_experts is not None:
            out = out + self.shared_experts(xf)
        return out.view(shape)

    def _sorted(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        N, k = idx.shape
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token = order // k  # which token each sorted pair belongs to
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # host sync
        xs = x[token]
        outs = []
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            h = xs[start:start + n]
            h = F.silu(h @ self.experts.w1[e].t()) * (h @ self.experts.w3[e].t())
            outs.append(h @ self.experts.w2[e].t())
            start += n
        ys = torch.cat(outs) * w.reshape(-1)[order, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token, ys)

    def _gathered(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        N, k = idx.shape
        flat = idx.reshape(-1)
        h = x.repeat_interleave(k, dim=0)[:, None, :]  # [N*k, 1, d]
        a = torch.bmm(h, self.experts.w1[flat].transpose(1, 2))
        b = torch.bmm(h, self.experts.w3[flat].transpose(1, 2))
        y = torch.bmm(F.silu(a) * b, self.experts.w2[flat].transpose(1, 2))[:, 0]  # [N*k, d]
        return (y.view(N, k, -1) * w[..., None].to(x.dtype)).sum(1)

    def _padded(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        N, k = idx.shape
        E = self.num_experts
        flat = idx.reshape(-1)  # [P]
        # Row of each pair inside its expert's block: how many earlier pairs chose the same expert.
        onehot = F.one_hot(flat, E)  # [P, E]
        rank = (onehot.cumsum(0) * onehot).sum(-1) - 1  # [P]
        token = torch.arange(N, device=x.device).repeat_interleave(k)
        buf = x.new_zeros(E, N, x.shape[-1])
        buf[flat, rank] = x[token]
        h = F.silu(torch.bmm(buf, self.experts.w1.transpose(1, 2))) * torch.bmm(buf, self.experts.w3.transpose(1, 2))
        y = torch.bmm(h, self.experts.w2.transpose(1, 2))[flat, rank]  # [P, d]
        return (y.view(N, k, -1) * w[..., None].to(x.dtype)).sum(1)
