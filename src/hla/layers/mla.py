"""Multi-head Latent Attention as Kimi Linear uses it (spec section 3): NoPE, shared k_pe, latent cache.

Per head the query is ``[q_nope | q_pe]`` (``qk_nope_head_dim + qk_rope_head_dim``), the key
``[k_nope | k_pe]`` with one **unrotated** ``k_pe`` shared by all heads, the value ``v``; ``k_nope``
and ``v`` come from the normalised latent ``c`` through ``kv_b_proj``. There is no rotary
embedding anywhere, so position enters only through the causal mask.

Two ways to compute the same attention:

- **expanded**: ``kv_b_proj(c)`` gives per-head K and V for every key, then ordinary SDPA with
  head dim 192 / 128. Used for training and for prefill of more than ``ABSORB_MAX_TOKENS`` tokens.
- **absorbed**: because nothing rotates the keys, ``kv_b_proj`` folds into the query
  (``q_lat = q_nope W_uk``) and the output (``o = (p c) W_uv``); attention becomes MQA over the
  576-wide cached latent ``[c | k_pe]`` and K/V are never expanded. Used for decode.

Why the switch: per query token the absorbed form costs ``H * S * (576 + 512)`` multiply-adds
against ``H * S * (192 + 128)`` for the expanded one, but the expanded form first pays
``S * 512 * H * 256`` to expand all ``S`` keys. Absorbed wins while ``T < ~170`` new tokens per
call by FLOPs; expanded prefill also gets fused flash/efficient SDPA kernels, so the threshold
is set lower, at 32 tokens: decode and short continuations absorb, real prefills expand.

On CUDA (not float64) the absorbed attention over the latent runs in the Triton flash-decoding
kernel of ``hla.ops.mla`` (one pass over the cache, no ``[B, H, T, S]`` score buffer, sync-free);
the einsum path stays for the CPU and as the reference. ``MultiheadLatentAttention.triton_decode``
(``None`` = auto, ``True``/``False`` = force) chooses; no environment variable changes numerics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hla.layers.norm import RMSNorm
from hla.ops.mla import mla_decode

ABSORB_MAX_TOKENS = 32


class MultiheadLatentAttention(nn.Module):
    """MLA token mixer.

    Parameters (release names, ``H`` heads): ``q_proj [H*(dn+dr), hidden]``,
    ``kv_a_proj_with_mqa [R+dr, hidden]``, ``kv_a_layernorm [R]``, ``kv_b_proj [H*(dn+dv), R]``,
    ``o_proj [hidden, H*dv]`` and, only with ``config.mla_use_output_gate``, ``g_proj [H*dv, hidden]``.
    """

    # None: the Triton decode kernel on CUDA for non-float64 inputs; True/False: force it on/off.
    triton_decode: bool | None = None

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        d = config.hidden_size
        self.num_heads = H = config.num_attention_heads
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.kv_lora_rank = R = config.kv_lora_rank
        self.scale = (self.nope_dim + self.rope_dim) ** -0.5
        self.q_proj = nn.Linear(d, H * (self.nope_dim + self.rope_dim), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, R + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(R, config.kv_a_layernorm_eps)
        self.kv_b_proj = nn.Linear(R, H * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, d, bias=False)
        self.g_proj = nn.Linear(d, H * self.v_dim, bias=False) if config.mla_use_output_gate else None

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        """
        Args:
            x: ``[B, T, hidden]``.
            cache: a ``HybridCache`` or None. With a cache, row ``b``'s new latents are written at
                positions ``cache.lengths[b] + [0, T)`` and the queries attend to every cached
                position up to their own (the caller advances ``lengths`` afterwards).

        Returns:
            ``[B, T, hidden]`` in ``x.dtype``.
        """
        B, T, _ = x.shape
        H, dn = self.num_heads, self.nope_dim
        q = self.q_proj(x).view(B, T, H, dn + self.rope_dim)
        q_nope, q_pe = q[..., :dn], q[..., dn:]
        ckv = self.kv_a_proj_with_mqa(x)
        c = self.kv_a_layernorm(ckv[..., : self.kv_lora_rank])  # [B, T, R]
        k_pe = ckv[..., self.kv_lora_rank:]  # [B, T, dr]

        if cache is None:
            o = self._expanded(q_nope, q_pe, c, k_pe, mask=None)
        else:
            lc = cache.mla[self.layer_idx]
            pos = cache.lengths[:, None] + torch.arange(T, device=x.device)  # [B, T]
            lc.latent.scatter_(1, pos[..., None].expand(B, T, c.shape[-1]), c.to(lc.latent.dtype))
            lc.k_pe.scatter_(1, pos[..., None].expand(B, T, k_pe.shape[-1]), k_pe.to(lc.k_pe.dtype))
            # Keys beyond the longest row are never read; the span is a host-side int (no sync).
            S = cache.key_span(T)
            c_all, pe_all = lc.latent[:, :S], lc.k_pe[:, :S]
            if T <= ABSORB_MAX_TOKENS and self._use_triton(x):
                # The kernel masks by lengths itself and reads the cache in its own dtype.
                o = self._absorbed(q_nope, q_pe, c_all, pe_all, None, lengths=cache.lengths)
            else:
                # Slot j is visible to the query at position pos iff j <= pos; slots past a row's
                # length (other rows are longer, or stale data) are masked out.
                mask = torch.arange(S, device=x.device)[None, None, :] <= pos[:, :, None]  # [B, T, S]
                mix = self._absorbed if T <= ABSORB_MAX_TOKENS else self._expanded
                o = mix(q_nope, q_pe, c_all.to(x.dtype), pe_all.to(x.dtype), mask)

        if self.g_proj is not None:
            o = o * torch.sigmoid(self.g_proj(x).view(B, T, H, self.v_dim))
        return self.o_proj(o.reshape(B, T, H * self.v_dim))

    def _expanded(self, q_nope, q_pe, c, k_pe, mask):
        """q_*: ``[B, T, H, *]``; c ``[B, S, R]``; k_pe ``[B, S, dr]``; mask ``[B, T, S]`` bool or None (causal)."""
        B, T, H, dn = q_nope.shape
        S = c.shape[1]
        kv = self.kv_b_proj(c).view(B, S, H, dn + self.v_dim)
        k = torch.cat([kv[..., :dn], k_pe[:, :, None, :].expand(B, S, H, self.rope_dim)], dim=-1)
        v = kv[..., dn:]
        qh = torch.cat([q_nope, q_pe], dim=-1)
        o = F.scaled_dot_product_attention(
            qh.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=None if mask is None else mask[:, None], is_causal=mask is None, scale=self.scale,
        )
        return o.transpose(1, 2)  # [B, T, H, dv]

    def _use_triton(self, x: torch.Tensor) -> bool:
        if self.triton_decode is not None:
            return self.triton_decode
        return x.is_cuda and x.dtype != torch.float64

    def _absorbed(self, q_nope, q_pe, c, k_pe, mask, lengths=None):
        """MQA over the latent: same arguments as ``_expanded``.

        Either ``mask`` (einsum path) or ``lengths [B]`` (Triton path: query ``t`` of row ``b``
        sees slots ``j <= lengths[b] + t`` of ``c``/``k_pe``, which may be views of the cache in
        its own dtype) is given.
        """
        H, dn = self.num_heads, self.nope_dim
        w = self.kv_b_proj.weight.view(H, dn + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, :dn], w[:, dn:]  # [H, dn, R], [H, dv, R]
        q_lat = torch.einsum("bthd,hdr->bthr", q_nope, w_uk)
        if lengths is not None:
            o_lat = mla_decode(q_lat, q_pe, c, k_pe, lengths, c.shape[1], self.scale).to(q_nope.dtype)
            return torch.einsum("bthr,hvr->bthv", o_lat, w_uv)
        scores = torch.einsum("bthr,bsr->bhts", q_lat, c) + torch.einsum("bthd,bsd->bhts", q_pe, k_pe)
        acc = torch.float64 if c.dtype == torch.float64 else torch.float32
        scores = scores.to(acc) * self.scale
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        p = torch.softmax(scores, dim=-1).to(c.dtype)
        # Slots no query sees may hold anything (stale rows, poison); 0 * NaN would still leak.
        c = c.masked_fill(~mask.any(1)[..., None], 0)
        o_lat = torch.einsum("bhts,bsr->bthr", p, c)
        return torch.einsum("bthr,hvr->bthv", o_lat, w_uv)
