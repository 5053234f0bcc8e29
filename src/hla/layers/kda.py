"""The Kimi Delta Attention layer (spec section 2).

``x -> q, k, v = silu(short_conv(W x))`` (three separate convolutions), a low-rank per-channel
forget gate ``f_b(f_a(x))`` turned into a log-decay with ``A_log``/``dt_bias`` inside the op,
``beta = sigmoid(b_proj(x))``, the KDA recurrence (``hla.ops.kda``), then
``o_proj(RMSNorm_head(o) * w * sigmoid(g_b(g_a(x))))``.

The raw projections go to the op with ``A_log=``, ``dt_bias=``, ``use_qk_l2norm=True`` and
``use_beta_sigmoid=True`` so that the Triton kernels fuse the gate, the l2 norms and the sigmoid
on CUDA instead of this layer materialising them in fp32.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hla.layers.norm import RMSNorm, rms_norm
from hla.layers.short_conv import ShortConvolution
from hla.ops import kda as kda_ops


class KimiDeltaAttention(nn.Module):
    """KDA token mixer.

    Parameters (release names and shapes, ``D = num_heads * head_dim``): ``{q,k,v}_proj [D, hidden]``,
    ``{q,k,v}_conv1d [D, 1, W]``, ``f_a_proj [head_dim, hidden]``, ``f_b_proj [D, head_dim]``,
    ``dt_bias [D]`` (fp32), ``A_log [1, 1, H, 1]`` (fp32), ``b_proj [H, hidden]``,
    ``g_a_proj [head_dim, hidden]``, ``g_b_proj [D, head_dim]``, ``o_norm [head_dim]``, ``o_proj [hidden, D]``.
    """

    # Parameters that stay in fp32 whatever the model dtype (the gate's exponent is sensitive).
    fp32_params = ("A_log", "dt_bias")

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = d = config.hidden_size
        self.num_heads = H = config.kda_num_heads
        self.head_dim = K = config.kda_head_dim
        self.lower_bound = config.kda_lower_bound
        # hla.ops.kda backend: "auto" (Triton on CUDA when available, else torch); benchmarks set others.
        self.kda_backend = "auto"
        self.eps = config.rms_norm_eps
        D = H * K
        W = config.kda_conv_size
        self.q_proj = nn.Linear(d, D, bias=False)
        self.k_proj = nn.Linear(d, D, bias=False)
        self.v_proj = nn.Linear(d, D, bias=False)
        self.q_conv1d = ShortConvolution(D, W)
        self.k_conv1d = ShortConvolution(D, W)
        self.v_conv1d = ShortConvolution(D, W)
        self.f_a_proj = nn.Linear(d, K, bias=False)
        self.f_b_proj = nn.Linear(K, D, bias=False)
        self.dt_bias = nn.Parameter(torch.empty(D, dtype=torch.float32))
        self.A_log = nn.Parameter(torch.empty(1, 1, H, 1, dtype=torch.float32))
        self.b_proj = nn.Linear(d, H, bias=False)
        self.g_a_proj = nn.Linear(d, K, bias=False)
        self.g_b_proj = nn.Linear(K, D, bias=False)
        self.o_norm = RMSNorm(K, config.rms_norm_eps)
        self.o_proj = nn.Linear(D, d, bias=False)
        self.reset_gate_parameters()

    @torch.no_grad()
    def reset_gate_parameters(self) -> None:
        """FLA/transformers init: ``A_log = log(U(1, 16))``, ``dt_bias = softplus^-1(dt)``, ``dt`` log-uniform."""
        if self.A_log.is_meta:
            return
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
        dt = torch.exp(torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(1e-1))).clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        nn.init.ones_(self.o_norm.weight)

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        """
        Args:
            x: ``[B, T, hidden]``.
            cache: a ``hla.generation.cache.HybridCache`` or None. With a cache, this layer's conv
                windows and fp32 state are read and updated in place (the caller advances lengths).

        Returns:
            ``[B, T, hidden]`` in ``x.dtype``.
        """
        B, T, _ = x.shape
        H, K = self.num_heads, self.head_dim
        lc = cache.kda[self.layer_idx] if cache is not None else None
        q, wq = self.q_conv1d(self.q_proj(x), lc.conv_q if lc is not None else None)
        k, wk = self.k_conv1d(self.k_proj(x), lc.conv_k if lc is not None else None)
        v, wv = self.v_conv1d(self.v_proj(x), lc.conv_v if lc is not None else None)
        q, k, v = (t.view(B, T, H, K) for t in (q, k, v))
        g_raw = self.f_b_proj(self.f_a_proj(x)).view(B, T, H, K)
        beta_raw = self.b_proj(x)  # [B, T, H]

        if lc is None:
            o, _ = self._kda(q, k, v, g_raw, beta_raw, None, False)
        else:
            lc.conv_q.copy_(wq)
            lc.conv_k.copy_(wk)
            lc.conv_v.copy_(wv)
            if T == 1:
                # In-place fp32 state update, no host sync (CUDA-graph capturable on GPU).
                o = kda_ops.kda_decode(
                    q, k, v, g_raw, beta_raw, lc.state, A_log=self.A_log.view(H), dt_bias=self.dt_bias,
                    lower_bound=self.lower_bound, use_qk_l2norm=True, use_beta_sigmoid=True, backend=self.kda_backend,
                )
            else:
                o, final = self._kda(q, k, v, g_raw, beta_raw, lc.state, True)
                lc.state.copy_(final)

        gate = self.g_b_proj(self.g_a_proj(x)).view(B, T, H, K)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        o = rms_norm(o.to(acc), self.o_norm.weight, self.eps) * torch.sigmoid(gate.to(acc))
        return self.o_proj(o.to(x.dtype).reshape(B, T, H * K))

    def _kda(self, q, k, v, g_raw, beta_raw, initial_state, output_final_state):
        return kda_ops.kda(
            q, k, v, g_raw, beta_raw, initial_state=initial_state, output_final_state=output_final_state,
            A_log=self.A_log.view(self.num_heads), dt_bias=self.dt_bias, lower_bound=self.lower_bound,
            use_qk_l2norm=True, use_beta_sigmoid=True, backend=self.kda_backend,
        )
