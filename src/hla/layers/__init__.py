"""nn.Modules of Kimi Linear: one primitive per file."""

from hla.layers.kda import KimiDeltaAttention
from hla.layers.mla import MultiheadLatentAttention
from hla.layers.mlp import SwiGLUMLP
from hla.layers.moe import SparseMoE
from hla.layers.norm import RMSNorm
from hla.layers.short_conv import ShortConvolution

__all__ = [
    "KimiDeltaAttention",
    "MultiheadLatentAttention",
    "RMSNorm",
    "ShortConvolution",
    "SparseMoE",
    "SwiGLUMLP",
]
