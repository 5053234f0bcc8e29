"""Causal depthwise 1-D convolution with SiLU, the "short convolution" in front of KDA's q, k, v."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ShortConvolution(nn.Module):
    """Depthwise causal conv over time, no bias, followed by SiLU.

    The weight has the release layout ``[D, 1, W]``. With a cache window (the last ``W - 1``
    inputs of the sequence so far) a call continues the sequence exactly; a zero window is the
    start of a sequence. The weight stays fp32 whatever the model dtype (as vLLM keeps it): the
    conv runs in fp32 anyway, so this saves a cast per call and loses nothing.
    """

    fp32_params = ("weight",)

    def __init__(self, dim: int, kernel_size: int = 4) -> None:
        super().__init__()
        self.dim = dim
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(dim, 1, kernel_size, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv1d's default for a depthwise conv (fan_in = kernel_size), as FLA's ShortConvolution.
        if self.weight.is_meta:
            return
        bound = self.kernel_size**-0.5
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor, window: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            x: ``[B, T, D]``.
            window: ``[B, D, W-1]`` previous inputs (oldest first), or None for a fresh sequence.

        Returns:
            ``y: [B, T, D]`` in ``x.dtype`` and the new window ``[B, D, W-1]`` (the last ``W - 1``
            inputs including this call's), in ``x.dtype``.
        """
        B, T, D = x.shape
        if D != self.dim:
            raise ValueError(f"x: expected last dim {self.dim}, got shape {tuple(x.shape)}")
        W = self.kernel_size
        xt = x.transpose(1, 2)  # [B, D, T]
        if window is None:
            window = xt.new_zeros(B, D, W - 1)
        elif window.shape != (B, D, W - 1):
            raise ValueError(f"window: expected shape {(B, D, W - 1)}, got {tuple(window.shape)}")
        full = torch.cat([window.to(x.dtype), xt], dim=2)  # [B, D, W-1+T]
        # The conv is cheap next to the projections; fp32 keeps bf16 rounding out of the 4-tap sum.
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        y = F.conv1d(full.to(acc), self.weight.to(acc), groups=D)  # [B, D, T]
        y = F.silu(y).to(x.dtype).transpose(1, 2)
        new_window = full[:, :, full.shape[2] - (W - 1):]
        return y, new_window
