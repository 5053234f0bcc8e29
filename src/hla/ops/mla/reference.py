"""Absorbed MLA decode attention in plain PyTorch: the spec the Triton kernel is checked against.

For query ``t`` of row ``b`` (at position ``lengths[b] + t``) and head ``h``::

    scores_h[j] = scale * (q_lat_h . c_j + q_pe_h . kpe_j)     for j <= lengths[b] + t, j < S
    p_h = softmax(scores_h),   o_lat_h = sum_j p_hj c_j

Runs in any dtype (float64 on the CPU is the reference); scores and softmax in fp32 (float64 for
float64 inputs).
"""

from __future__ import annotations

import torch


def mla_decode_reference(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    latent: torch.Tensor,
    k_pe: torch.Tensor,
    lengths: torch.Tensor,
    span: int,
    scale: float,
) -> torch.Tensor:
    """
    Args:
        q_lat: ``[B, T, H, R]`` (``q_nope`` already multiplied by ``W_uk``).
        q_pe: ``[B, T, H, dr]``.
        latent: ``[B, S_alloc, R]`` latent cache (already holding the new tokens).
        k_pe: ``[B, S_alloc, dr]`` shared rope-key cache.
        lengths: ``[B]`` integer, tokens cached before this call per row.
        span: keys ``[0, span)`` are considered (``span <= S_alloc``).
        scale: softmax scale.

    Returns:
        ``o_lat: [B, T, H, R]`` in ``q_lat.dtype``.
    """
    B, T, H, R = q_lat.shape
    acc = torch.float64 if q_lat.dtype == torch.float64 else torch.float32
    c = latent[:, :span].to(acc)
    pe = k_pe[:, :span].to(acc)
    scores = torch.einsum("bthr,bsr->bths", q_lat.to(acc), c) + torch.einsum("bthd,bsd->bths", q_pe.to(acc), pe)
    pos = lengths.to(latent.device)[:, None] + torch.arange(T, device=latent.device)  # [B, T]
    visible = torch.arange(span, device=latent.device)[None, None, :] <= pos[:, :, None]  # [B, T, S]
    scores = (scores * scale).masked_fill(~visible[:, :, None], float("-inf"))
    p = torch.softmax(scores, dim=-1)
    # Masked slots get p == 0 but may hold NaN/inf garbage (0 * NaN = NaN): zero them first.
    c = torch.where(visible[:, :, :, None], c[:, None], 0.0)  # [B, T, S, R]
    return torch.einsum("bths,btsr->bthr", p, c).to(q_lat.dtype)
